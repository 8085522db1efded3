"""A multi-queue VM: KubeVirt's networkInterfaceMultiqueue gives the tap one
queue per vCPU (a tap made with IFF_MULTI_QUEUE, QEMU holding one fd per
queue, virtio-net with mq=on). A real guest with two vCPUs and two queue
pairs, on a node with its own OVS and bpffs (lab/tcbypass_lab/cluster.py).

The tap's queues are invisible to tc: frames from every queue meet the
program on the tap's ingress, and bpf_redirect() to the tap's egress lets
the tun driver pick the queue by flow. These tests prove both directions
carry flows spread over both queues, with nothing lost and counted right,
across attach, detach and a refresh after the VM restarts.
"""

from __future__ import annotations

import re
import time

import pytest

from tcbypass_lab import migration as mig
from tcbypass_lab.cluster import EmulatedNode
from tcbypass_lab.sandbox import sh

pytestmark = pytest.mark.root

QUEUES = 2
TO_VM_FLOWS = 8  # flows hash to queues: eight leave both queues idle but one with odds of 1 in 128
FROM_VM_FLOWS = 4


@pytest.fixture
def node():
    with EmulatedNode.up("mq") as n:
        n.sb.add_server_pod("web", mig.SERVER_IP, namespace=mig.NAMESPACE)
        yield n


def server_of(node: EmulatedNode) -> str:
    return next(ns for ns in node.sb.netns_names if "-srv-web" in ns)


def input_interrupts(guest) -> dict[int, int]:
    """virtio-net receive interrupts per queue, from the guest's /proc/interrupts."""
    _, out = guest.run("cat /proc/interrupts")
    per_queue: dict[int, int] = {}
    for line in out.splitlines():
        m = re.search(r"virtio\d+-input\.(\d+)", line)
        if m:
            per_queue[int(m.group(1))] = sum(int(v) for v in line.split()[1:] if v.isdigit())
    return per_queue


def attached(node: EmulatedNode) -> dict:
    proc = node.cli("attach", mig.VMI, "-n", mig.NAMESPACE)
    assert proc.returncode == 0, proc.stderr
    [row] = node.statuses()
    return row


def flows_over_both_queues(node: EmulatedNode, guest, seconds: float = 3.0) -> tuple[dict, dict]:
    """Run TO_VM_FLOWS flows to the guest and FROM_VM_FLOWS from it; (per-flow results, interrupts per queue)."""
    before = input_interrupts(guest)
    to_vm, from_vm = mig.start_flows(server_of(node), guest, range(31200, 31200 + TO_VM_FLOWS),
                                     range(31300, 31300 + FROM_VM_FLOWS), rate=20)
    for flow in to_vm:
        flow.start()
    time.sleep(seconds)
    results = mig.stop_flows(guest, to_vm, from_vm)
    after = input_interrupts(guest)
    return results, {q: after[q] - before.get(q, 0) for q in after}


def test_a_multi_queue_vm_keeps_every_flow_on_the_fast_path_through_attach_detach_and_a_restart(node, capsys):
    vm = mig.start_vm(node, queues=QUEUES)
    guest = vm.guest
    try:
        nic = vm.nics[0]
        tap = sh("ip", "-d", "link", "show", nic.tap, netns=nic.pod_ns).stdout
        assert "multi_queue" in tap and f"numqueues {QUEUES}" in tap, tap
        _, queues = guest.run("ls /sys/class/net/eth0/queues")
        assert {f"rx-{q}" for q in range(QUEUES)} <= set(queues.split()), "the guest uses both queue pairs"

        # Detach and attach twice while flows run over the bridge's path: nothing lost.
        to_vm_flows, from_vm_flows = mig.start_flows(server_of(node), guest, range(31400, 31400 + TO_VM_FLOWS),
                                                     range(31500, 31500 + FROM_VM_FLOWS), rate=20)
        for flow in to_vm_flows:
            flow.start()
        for _ in range(2):
            assert attached(node)["state"] == "active"
            time.sleep(0.5)
            assert node.cli("detach", mig.VMI, "-n", mig.NAMESPACE).returncode == 0
            time.sleep(0.5)
        results = mig.stop_flows(guest, to_vm_flows, from_vm_flows)
        assert all(r["sent"] > 0 for r in results.values()), results
        lost = {flow: r["lost"] for flow, r in results.items()}
        assert sum(lost.values()) == 0 and len(lost) == TO_VM_FLOWS + FROM_VM_FLOWS, lost
        assert node.pins() == 0, "detach leaves nothing pinned"

        # The fast path alone (the bridge forwards no unicast): flows both ways spread over
        # both queues, none lost, and status counts every datagram in its direction.
        row = attached(node)
        node.sb.block_bridge_unicast(nic)
        before = row["counters"]["redirected_packets"]
        results, interrupts = flows_over_both_queues(node, guest)
        after = node.statuses()[0]["counters"]["redirected_packets"]
        with capsys.disabled():
            print(f"\n    [mq] receive interrupts per queue: {interrupts}; "
                  f"{sum(r['sent'] for r in results.values())} datagrams in {len(results)} flows")
        assert all(interrupts.get(q, 0) > 0 for q in range(QUEUES)), f"a queue carried nothing: {interrupts}"
        assert all(r["sent"] > 0 for r in results.values()), results
        assert all(r["lost"] == 0 for r in results.values()), results
        to_vm = sum(r["sent"] for k, r in results.items() if k.startswith("to"))
        from_vm = sum(r["sent"] for k, r in results.items() if k.startswith("from"))
        assert after["to_vm"] - before["to_vm"] >= to_vm and after["from_vm"] - before["from_vm"] >= from_vm, \
            (before, after, to_vm, from_vm)

        # The VM restarts: a new multi-queue tap, a new QEMU; attach refreshes it, and both
        # queues carry the fast path again.
        guest.close()
        node.sb.restart_vm(nic)
        guest = mig.guest_on(node, vm.nics, queues=QUEUES, cpus=QUEUES)
        guest.start()
        guest.wait_ready(180)
        assert node.statuses()[0]["state"] == "stale"
        proc = node.cli("attach", mig.VMI, "-n", mig.NAMESPACE)
        assert proc.returncode == 0 and "refreshed" in proc.stdout + proc.stderr, proc.stdout + proc.stderr
        node.sb.block_bridge_unicast(nic)
        results, interrupts = flows_over_both_queues(node, guest)
        assert all(interrupts.get(q, 0) > 0 for q in range(QUEUES)), interrupts
        assert all(r["lost"] == 0 for r in results.values()), results
    finally:
        guest.close()
