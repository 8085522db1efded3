"""The agent under pod churn: pods, devices and namespaces vanish at every step.

A pod's end is the normal case on a node: Kube-OVN takes its port out of
OVS and the runtime deletes its namespace, at any moment of whatever the
agent is doing for it. Each test here makes that moment land where it
hurts (a failpoint holds the agent at the step for a second while the pod
goes), or at random under churn, and checks that the agent keeps serving:
alive, nothing counted as a bug or a failure, nothing of the pod left.
An exception nothing expects (injected) is logged once with its traceback,
counted, and the other pods are still served.
"""

from __future__ import annotations

import random
import time

import pytest

from tcbypass_lab.sandbox import ping
from tests.conftest import RunningAgent, pins
from tests.reliability.conftest import loaded_ids, pin_entries, report

SERVER_IP = "10.16.0.2"


@pytest.fixture
def node(ovs_node):
    ovs_node.add_server_pod("web", SERVER_IP, namespace="prod")
    return ovs_node


def agent_on(node, failpoint: str = "") -> RunningAgent:
    return RunningAgent(node, env={"TCBYPASS_FAILPOINT": failpoint} if failpoint else None)


def state(name: str) -> str:
    from tcbypass import health

    status = health.status_of(name)
    return status.state if status else "none"


def assert_served_without_fault(agent: RunningAgent) -> None:
    m = agent.metrics()
    assert agent.alive()
    assert m.get("tcbypass_agent_unexpected_errors_total") == 0, agent.log_text()[-3000:]
    assert m.get("tcbypass_agent_failures_total") == 0, agent.log_text()[-3000:]
    assert "Traceback" not in agent.log_text()


@pytest.mark.parametrize("netns_first", [False, True], ids=["ports-then-netns", "netns-then-ports"])
def test_a_pod_deleted_while_the_agent_detaches_it_is_already_gone(node, netns_first):
    """The agent checks the pod's namespace, then opens it to take the hooks off:
    the namespace is deleted in between (held there for a second)."""
    agent = agent_on(node, "detach-opening=sleep:1")
    try:
        [nic] = node.add_vm("vm1", ["10.16.0.5"], namespace="prod")
        agent.wait_for(lambda: state("vm1.prod") == "active", "vm1 active")
        node.delete_pod([nic], netns_first=netns_first)
        agent.wait_for(lambda: not pins("vm1+prod"), "vm1 detached")
        [nic2] = node.add_vm("vm2", ["10.16.0.6"], namespace="prod")
        agent.wait_for(lambda: state("vm2.prod") == "active", "vm2 active after vm1 went")
        assert ping(nic2.vm_ns, SERVER_IP, count=3) == (3, 3)
        assert_served_without_fault(agent)
    finally:
        agent.stop()


@pytest.mark.parametrize("netns_first", [False, True], ids=["ports-then-netns", "netns-then-ports"])
def test_a_pod_deleted_while_the_agent_attaches_it_leaves_nothing(node, netns_first):
    """The pod goes after the agent has read its devices and before it hooks them:
    the attach undoes itself, the pod counts as gone, not as a failure."""
    agent = agent_on(node, "devices-read/vm1.prod=sleep:1.5")
    try:
        [nic] = node.add_vm("vm1", ["10.16.0.5"], namespace="prod")
        time.sleep(0.5)  # the agent is now inside the attach, held at the failpoint
        node.delete_pod([nic], netns_first=netns_first)
        agent.wait_for(lambda: agent.metric("tcbypass_agent_pods_gone_total") >= 1, "the pod counted as gone")
        agent.wait_for(lambda: not pins("vm1+prod"), "nothing of vm1 pinned")
        [nic2] = node.add_vm("vm2", ["10.16.0.6"], namespace="prod")
        agent.wait_for(lambda: state("vm2.prod") == "active", "vm2 active")
        assert_served_without_fault(agent)
    finally:
        agent.stop()


def test_an_unexpected_exception_is_logged_once_counted_and_the_others_are_served(node):
    agent = agent_on(node, "devices-read/bad.prod=raise")
    try:
        node.add_vm("bad", ["10.16.0.5"], namespace="prod")
        [good] = node.add_vm("good", ["10.16.0.6"], namespace="prod")
        agent.wait_for(lambda: state("good.prod") == "active", "the other VM served")
        agent.wait_for(lambda: agent.metric("tcbypass_agent_unexpected_errors_total") >= 3, "bad retried")
        assert agent.alive()
        assert state("bad.prod") == "none" and not pins("bad+prod"), "nothing half-applied"
        log = agent.log_text()
        assert log.count("Traceback") == 1, log[-3000:]
        assert "InjectedFault" in log and "again" in log
        assert ping(good.vm_ns, SERVER_IP, count=3) == (3, 3)
    finally:
        agent.stop()


def test_churn_with_pods_deleted_at_random_moments_never_stops_the_agent(node, capsys):
    """Pods plugged in bursts and deleted at random moments: before, during or after
    their attach, ports or namespace first. A long-lived VM keeps its fast path."""
    rng = random.Random(20261205)
    agent = agent_on(node)
    try:
        [keeper] = node.add_vm("keeper", ["10.16.0.4"], namespace="prod")
        agent.wait_for(lambda: state("keeper.prod") == "active", "the long-lived VM active")
        node.block_bridge_unicast(keeper)
        progs_before = len(loaded_ids("prog"))
        lifecycles, n = 0, 0
        for _round in range(4):
            pods = []
            for _ in range(10):
                n += 1
                pods.append((f"c{n}", node.add_vm(f"c{n}", [f"10.16.1.{n}"], namespace="prod")))
                if rng.random() < 0.3:  # deleted at once: mid-attach, or before the agent looked
                    time.sleep(rng.uniform(0, 0.15))
                    node.delete_pod(pods.pop()[1], netns_first=rng.random() < 0.5)
                    lifecycles += 1
            time.sleep(rng.uniform(0, 0.5))
            rng.shuffle(pods)
            for _name, nics in pods:
                node.delete_pod(nics, netns_first=rng.random() < 0.5)
                lifecycles += 1
                time.sleep(rng.uniform(0, 0.05))
            assert agent.alive(), agent.log_text()[-3000:]
        agent.wait_for(lambda: {p for p in pin_entries() if p.startswith("c")} == set(), "every churned pod gone",
                       bound=30)
        assert ping(keeper.vm_ns, SERVER_IP, count=5) == (5, 5), "the long-lived VM kept its fast path"
        assert state("keeper.prod") == "active"
        deadline = time.monotonic() + 10
        while len(loaded_ids("prog")) > progs_before and time.monotonic() < deadline:
            time.sleep(0.1)
        assert len(loaded_ids("prog")) <= progs_before, "programs of deleted pods are still loaded"
        m = agent.metrics()
        report(capsys, f"churn: {lifecycles} pod lifecycles; agent {m.get('tcbypass_agent_attaches_total'):.0f} "
                       f"attaches, {m.get('tcbypass_agent_detaches_total'):.0f} detaches, "
                       f"{m.get('tcbypass_agent_pods_gone_total'):.0f} pods gone mid-attach, "
                       f"{m.get('tcbypass_agent_failures_total'):.0f} failures")
        assert_served_without_fault(agent)
    finally:
        agent.stop()
