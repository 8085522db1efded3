"""`tcbypass agent` against a real private OVS: it reacts to OVSDB and netlink events.

Reaction times are printed (not asserted beyond a generous bound that only
catches a stuck agent); the benchmark and the closing note carry the figures.
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import time

import pytest

from tcbypass import health
from tcbypass_lab import wirings
from tcbypass_lab.sandbox import ping, wait_for_ping
from tests.conftest import RunningAgent, pins

SERVER_IP = "10.16.0.2"


@pytest.fixture
def node(ovs_node):
    ovs_node.add_server_pod("web", SERVER_IP, namespace="prod")
    return ovs_node


@pytest.fixture
def agent(node):
    running = RunningAgent(node)
    try:
        yield running
    finally:
        running.stop()


def state_of(name: str, namespace: str = "prod") -> list[str]:
    return [s.state for s in health.statuses(namespace, name)]


def report(capsys, text: str) -> None:
    with capsys.disabled():
        print(f"\n    [agent] {text}")


def test_new_vm_port_is_attached(node, agent, capsys):
    [nic] = node.add_vm("vm1", ["10.16.0.5"], namespace="prod")
    took = agent.wait_for(lambda: state_of("vm1") == ["active"], "vm1 active")
    report(capsys, f"new VM port attached {took * 1000:.0f} ms after the pod was wired")
    [status] = health.statuses("prod", "vm1")
    assert status.record.managed_by == "agent"
    node.block_bridge_unicast(nic)
    assert ping(nic.vm_ns, SERVER_IP, count=3) == (3, 3)


def test_tap_recreation_is_refreshed(node, agent, capsys):
    [nic] = node.add_vm("vm2", ["10.16.0.6"], namespace="prod")
    agent.wait_for(lambda: state_of("vm2") == ["active"], "vm2 active")
    old = health.statuses("prod", "vm2")[0].record.tap_ifindex
    node.restart_vm(nic)
    took = agent.wait_for(lambda: (s := health.statuses("prod", "vm2")) and s[0].state == "active"
                          and s[0].record.tap_ifindex != old, "vm2 refreshed")
    report(capsys, f"tap recreation refreshed after {took * 1000:.0f} ms")
    node.block_bridge_unicast(nic)
    assert ping(nic.vm_ns, SERVER_IP, count=3) == (3, 3)


def test_deleted_pod_is_cleaned_up(node, agent, capsys):
    [nic] = node.add_vm("vm3", ["10.16.0.7"], namespace="prod")
    agent.wait_for(lambda: state_of("vm3") == ["active"], "vm3 active")
    node.delete_pod([nic])
    took = agent.wait_for(lambda: not pins("vm3+prod"), "vm3 pins removed")
    report(capsys, f"deleted pod cleaned up after {took * 1000:.0f} ms")
    assert health.status_of("vm3.prod") is None


def test_ovsdb_restart_is_survived(node, agent):
    agent.wait_for(lambda: agent.metric("tcbypass_agent_ovsdb_connects_total") == 1, "connected to OVSDB")
    node.restart_ovsdb()
    [nic] = node.add_vm("vm4", ["10.16.0.8"], namespace="prod")
    agent.wait_for(lambda: state_of("vm4") == ["active"], "vm4 active after an OVSDB restart")
    assert "tcbypass_agent_ovsdb_connects_total 2.0" in agent.metrics_text()
    assert wait_for_ping(nic.vm_ns, SERVER_IP)


def test_sigterm_leaves_the_fast_path_carrying_traffic(node, agent):
    [nic] = node.add_vm("vm5", ["10.16.0.9"], namespace="prod")
    agent.wait_for(lambda: state_of("vm5") == ["active"], "vm5 active")
    node.block_bridge_unicast(nic)
    assert agent.stop() == 0
    assert ping(nic.vm_ns, SERVER_IP, count=3) == (3, 3), "the programs stay after the agent exits"
    assert state_of("vm5") == ["active"]
    assert not [p for p in pins("@spare-")], "the agent removes its spare instances on exit"


def test_sigterm_taken_by_another_thread_stops_the_agent_at_once(node):
    """The kernel hands a process-directed signal to any thread that does not block
    it (in a container it was often the metrics server's), and Python runs the
    handler only once the main thread wakes up. An idle agent must still stop at once."""
    running = RunningAgent(node)
    try:
        assert running.metrics_text() is not None
        time.sleep(1.0)  # past the first reconcile: the agent idles in select()
        pid = running.proc.pid
        others = sorted(int(t) for t in os.listdir(f"/proc/{pid}/task") if int(t) != pid)
        assert others, "the metrics server runs on a thread of its own"
        tgkill = {"x86_64": 234, "aarch64": 131}[os.uname().machine]
        started = time.monotonic()
        assert ctypes.CDLL(None, use_errno=True).syscall(tgkill, pid, others[0], signal.SIGTERM) == 0
        try:
            running.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            pytest.fail("the agent did not notice a SIGTERM taken by another thread")
        took = time.monotonic() - started
    finally:
        running.stop()
    assert running.proc.returncode == 0 and took < 1.0, f"the agent took {took:.1f} s to stop"


def test_detach_on_exit_restores_the_bridge(node):
    running = RunningAgent(node, "--detach-on-exit")
    try:
        node.add_vm("vm6", ["10.16.0.10"], namespace="prod")
        running.wait_for(lambda: state_of("vm6") == ["active"], "vm6 active")
    finally:
        assert running.stop() == 0
    assert not pins("vm6+prod")


def test_metrics_endpoint_serves_the_counters(node, agent, capsys):
    [nic] = node.add_vm("vm7", ["10.16.0.11"], namespace="prod")
    agent.wait_for(lambda: state_of("vm7") == ["active"], "vm7 active")
    assert ping(nic.vm_ns, SERVER_IP, count=5) == (5, 5)
    text = agent.metrics_text()
    lines = [line for line in text.splitlines() if line.startswith("tcbypass_redirected_packets_total")
             and 'vmi="vm7"' in line and 'direction="from_vm"' in line]
    assert len(lines) == 1 and float(lines[0].rsplit(" ", 1)[1]) >= 5
    assert 'tcbypass_attachment_state{iface_id="vm7.prod",name="vm7.prod",namespace="prod",state="active",' \
           'vmi="vm7"} 1.0' in text
    report(capsys, "metrics sample:\n      " + "\n      ".join(
        line for line in text.splitlines() if 'vmi="vm7"' in line and not line.endswith(" 0.0"))[:1500])


def vm_ports(text: str | None) -> dict[tuple[str, str], float]:
    """tcbypass_vm_ports samples: (binding, state) -> value."""
    out = {}
    for line in (text or "").splitlines():
        if line.startswith("tcbypass_vm_ports{"):
            labels, value = line.rsplit(" ", 1)
            pairs = dict(p.split("=", 1) for p in labels[len("tcbypass_vm_ports{"):-1].split(","))
            out[(pairs["binding"].strip('"'), pairs["state"].strip('"'))] = float(value)
    return out


def test_metrics_count_vm_ports_by_binding_and_state(node):
    agent = RunningAgent(node, "--ports-refresh", "0.2")
    try:
        node.add_vm("vm8", ["10.16.0.12"], namespace="prod")
        wirings.masquerade_vm(node, "vm9", "10.16.0.13", "fd00:10:16::13", "prod")
        wirings.kubeovn_tap_vm(node, "vm10", "10.16.0.14", "prod")
        wirings.pending_vm(node, "vm11", "10.16.0.15", "prod")
        want = {("bridge", "active"): 1.0, ("masquerade", "not bypassable"): 1.0,
                ("kube-ovn-direct", "not bypassable"): 1.0, ("pending", "not attached"): 1.0}
        agent.wait_for(lambda: {k: v for k, v in vm_ports(agent.metrics_text()).items() if v} == want,
                       "tcbypass_vm_ports counting one bridge (attached), masquerade, direct and pending VM")
        assert not pins("vm9") and not pins("vm10") and not pins("vm11"), "the agent attached nothing to them"
    finally:
        assert agent.stop() == 0
