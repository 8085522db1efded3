"""Explicit attach on namespaces with real traffic: VM netns == tap0 --[k6t-eth0]-- eth0-nic <-> node.

The VM side is a veth standing in for the tap (a tap needs a process behind
it; tests/vm uses a real qemu guest). With the bridge made unable to forward
unicast, only the fast path can carry the VM's traffic.

Every test runs with both hooks: tcx links (the default where the kernel
has tcx) and clsact filters (the fallback), which must behave the same. On
a kernel without tcx the tcx cases fail, unless the run declared that the
kernel lacks it (tests/conftest.py: require_hook); what happens there
instead is the last test's subject.
"""

from __future__ import annotations

import subprocess
import sys

import pytest

from tcbypass import features
from tcbypass_lab.sandbox import ping, sh, tcp_transfer, wait_for_ping
from tests.conftest import ours_on, pins, require_hook, run_cli, status_json, tc_state

SERVER_IP, VM_IP = "10.16.0.2", "10.16.0.5"


@pytest.fixture(params=["tcx", "clsact"])
def pod(request):
    require_hook(request.param)  # before the node is built
    sb = request.getfixturevalue("bare_node")
    [nic] = sb.add_vm("vm1", [VM_IP])
    sb.serve_on_host_port(nic, SERVER_IP)
    assert wait_for_ping(nic.vm_ns, SERVER_IP), "the bridge path must work before any test"
    return sb, nic, request.param


def attach_args(sb, nic, hook, *extra):
    return ("attach", "--netns", sb.netns_path(nic.pod_ns), "--tap", nic.tap, "--nic", nic.nic,
            "--mac", nic.mac, "--name", f"t-{sb.tag}", "--hook", hook, *extra)


def counters(name):
    [row] = [r for r in status_json() if r["name"] == name]
    return row["counters"]


def test_fast_path_carries_ping_and_tcp_only_while_attached(pod):
    sb, nic, hook = pod
    sb.block_bridge_unicast(nic)
    assert ping(nic.vm_ns, SERVER_IP, count=2)[1] == 0, "the blocked bridge must not forward unicast"

    proc = run_cli(*attach_args(sb, nic, hook))
    assert proc.returncode == 0, proc.stderr
    assert "attached" in proc.stdout
    assert ping(nic.vm_ns, SERVER_IP, count=5) == (5, 5)
    assert tcp_transfer(nic.vm_ns, sb.node, SERVER_IP, 2 << 20) == 2 << 20

    assert run_cli("detach", f"t-{sb.tag}").returncode == 0
    assert ping(nic.vm_ns, SERVER_IP, count=2)[1] == 0, "after detach the (blocked) bridge is the only path"


def test_broadcast_arp_still_crosses_the_bridge(pod):
    sb, nic, hook = pod
    sb.block_bridge_unicast(nic)
    assert run_cli(*attach_args(sb, nic, hook)).returncode == 0
    sh("ip", "neigh", "flush", "all", netns=nic.vm_ns)
    sh("ip", "neigh", "flush", "all", netns=sb.node)
    before = counters(f"t-{sb.tag}")["passed_packets"]["multicast"]
    assert ping(nic.vm_ns, SERVER_IP, count=2) == (2, 2), "ARP request must cross the bridge as broadcast"
    assert counters(f"t-{sb.tag}")["passed_packets"]["multicast"] > before


def test_counters_match_the_packets_sent(pod):
    sb, nic, hook = pod
    sb.pin_neighbours(nic, SERVER_IP)
    assert run_cli(*attach_args(sb, nic, hook)).returncode == 0
    assert ping(nic.vm_ns, SERVER_IP, count=50, interval=0.01) == (50, 50)
    c = counters(f"t-{sb.tag}")
    assert c["redirected_packets"] == {"from_vm": 50, "to_vm": 50}
    # ICMP echo of ping's default 56 data bytes: 14 + 20 + 8 + 56 = 98 bytes per frame.
    assert c["redirected_bytes"] == {"from_vm": 50 * 98, "to_vm": 50 * 98}


def test_attaching_twice_gives_the_same_state(pod):
    sb, nic, hook = pod
    first = run_cli(*attach_args(sb, nic, hook))
    assert first.returncode == 0 and "attached" in first.stdout
    state = (pins(sb.tag), tc_state(nic.pod_ns, nic.tap), tc_state(nic.pod_ns, nic.nic))
    second = run_cli(*attach_args(sb, nic, hook))
    assert second.returncode == 0
    assert "unchanged" in second.stdout
    assert (pins(sb.tag), tc_state(nic.pod_ns, nic.tap), tc_state(nic.pod_ns, nic.nic)) == state
    [row] = [r for r in status_json() if r["name"] == f"t-{sb.tag}"]
    assert row["state"] == "active"


def test_detach_removes_every_filter_and_pin_of_ours(pod):
    sb, nic, hook = pod
    assert run_cli(*attach_args(sb, nic, hook)).returncode == 0
    assert ours_on(nic.pod_ns, nic.tap) and ours_on(nic.pod_ns, nic.nic)
    for _ in range(2):
        proc = run_cli("detach", f"t-{sb.tag}")
        assert proc.returncode == 0, proc.stderr
    assert "not attached" in proc.stdout
    for dev in (nic.tap, nic.nic):
        state = tc_state(nic.pod_ns, dev)
        assert not ours_on(nic.pod_ns, dev) and "filter" not in state
        # A clsact we added stays, empty (removing it can drop a frame); tcx added none.
        assert ("clsact" in state) == (hook == "clsact")
    assert not pins(sb.tag)
    assert ping(nic.vm_ns, SERVER_IP, count=2) == (2, 2)


def test_detach_with_remove_qdisc_restores_tc_exactly(pod):
    sb, nic, hook = pod
    before = (tc_state(nic.pod_ns, nic.tap), tc_state(nic.pod_ns, nic.nic), pins(sb.tag))
    assert run_cli(*attach_args(sb, nic, hook)).returncode == 0
    assert run_cli("detach", f"t-{sb.tag}").returncode == 0
    assert run_cli(*attach_args(sb, nic, hook)).returncode == 0, "re-attach over what detach left"
    assert run_cli("detach", f"t-{sb.tag}", "--remove-qdisc").returncode == 0
    assert (tc_state(nic.pod_ns, nic.tap), tc_state(nic.pod_ns, nic.nic), pins(sb.tag)) == before
    assert ping(nic.vm_ns, SERVER_IP, count=2) == (2, 2)


def test_foreign_filter_survives_attach_and_detach(pod):
    sb, nic, hook = pod
    sh("tc", "qdisc", "add", "dev", nic.tap, "clsact", netns=nic.pod_ns)
    # Another tool's u32 classifier, ahead of ours; it matches nothing here, so frames go on to ours.
    sh("tc", "filter", "add", "dev", nic.tap, "ingress", "prio", "1", "protocol", "all", "u32",
       "match", "u32", "0xdeadbeef", "0xffffffff", "at", "0", "classid", "1:1", netns=nic.pod_ns)
    foreign = tc_state(nic.pod_ns, nic.tap)
    sb.block_bridge_unicast(nic)
    assert run_cli(*attach_args(sb, nic, hook)).returncode == 0
    assert "u32" in tc_state(nic.pod_ns, nic.tap)
    assert ping(nic.vm_ns, SERVER_IP, count=3) == (3, 3), "ours must work beside the foreign filter"
    assert run_cli("detach", f"t-{sb.tag}", "--remove-qdisc").returncode == 0
    assert tc_state(nic.pod_ns, nic.tap) == foreign, "the foreign filter and its clsact must stay"


def test_dhcp_passthrough_can_be_turned_off_for_managed_tap(pod):
    sb, nic, hook = pod
    assert run_cli(*attach_args(sb, nic, hook, "--no-dhcp-passthrough")).returncode == 0
    [row] = [r for r in status_json() if r["name"] == f"t-{sb.tag}"]
    assert row["dhcp_to_bridge"] is False and row["hook"] == hook


@pytest.mark.parametrize("change, message, code", [
    ({"--netns": "/var/run/netns/tcb-no-such-ns"}, "does not exist", 1),
    ({"--tap": "tap9"}, "no device 'tap9'", 1),
    ({"--nic": "lo"}, "are not ports of one bridge", 1),
    ({"--mac": "52:54:00:zz:00:01"}, "malformed MAC", 2),
    ({"--mac": "01:00:5e:00:00:01"}, "multicast MAC", 2),
    ({"--name": "bad/name"}, "invalid attachment name", 2),
])
def test_bad_input_is_one_line_and_leaves_nothing(pod, change, message, code):
    sb, nic, hook = pod
    args = list(attach_args(sb, nic, hook))
    for flag, value in change.items():
        args[args.index(flag) + 1] = value
    before = (pins(sb.tag), tc_state(nic.pod_ns, nic.tap), tc_state(nic.pod_ns, nic.nic))
    proc = run_cli(*args)
    assert proc.returncode == code
    assert message in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and "Traceback" not in proc.stderr
    assert (pins(sb.tag), tc_state(nic.pod_ns, nic.tap), tc_state(nic.pod_ns, nic.nic)) == before


def test_attach_with_tcx_is_refused_where_the_kernel_has_none(bare_node):
    """Before Linux 6.6: --hook tcx is refused in one line naming the way out,
    nothing is left behind, and the bridge keeps carrying the VM's traffic;
    without --hook the same attach takes clsact."""
    if features.probe().tcx:
        pytest.skip("tcx present: this kernel has tcx, so --hook tcx is taken (the tests above)")
    sb = bare_node
    [nic] = sb.add_vm("vm1", [VM_IP])
    sb.serve_on_host_port(nic, SERVER_IP)
    assert wait_for_ping(nic.vm_ns, SERVER_IP), "the bridge path must work before the test"
    before = (tc_state(nic.pod_ns, nic.tap), tc_state(nic.pod_ns, nic.nic))
    proc = run_cli(*attach_args(sb, nic, "tcx"))
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "no tcx" in proc.stderr and "--hook clsact" in proc.stderr and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert (tc_state(nic.pod_ns, nic.tap), tc_state(nic.pod_ns, nic.nic)) == before and not pins(sb.tag)
    assert ping(nic.vm_ns, SERVER_IP, count=2) == (2, 2), "the bridge still carries the VM's traffic"
    args = [a for a in attach_args(sb, nic, "tcx") if a not in ("--hook", "tcx")]
    assert run_cli(*args).returncode == 0
    [row] = [r for r in status_json() if r["name"] == f"t-{sb.tag}"]
    assert (row["state"], row["hook"]) == ("active", "clsact")


def test_attach_under_a_64_kib_memlock_limit(bare_node):
    """Kernels before 5.11 charge every BPF map and program to RLIMIT_MEMLOCK,
    counted per user across processes, and their default limit is 64 KiB: a
    CLI that did not raise it would fail with EPERM once a few attachments
    hold that much. Five attachments, each by a CLI started under a 64 KiB
    limit, must all load and carry traffic. (On 5.11+ nothing is charged, and
    the same calls prove that nothing else stands in the way.)"""
    sb = bare_node
    for i in range(5):
        [nic] = sb.add_vm(f"vm{i}", [f"10.16.{i}.5"])
        sb.serve_on_host_port(nic, f"10.16.{i}.2")
        args = ("attach", "--netns", sb.netns_path(nic.pod_ns), "--tap", nic.tap, "--nic", nic.nic,
                "--mac", nic.mac, "--name", f"m{i}-{sb.tag}")
        proc = subprocess.run(["prlimit", "--memlock=65536:65536", "--", sys.executable, "-m", "tcbypass", *args],
                              capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, f"attachment {i + 1}: {proc.stderr}"
        sb.block_bridge_unicast(nic)
        assert ping(nic.vm_ns, f"10.16.{i}.2", count=2) == (2, 2)
    rows = [r for r in status_json() if r["name"].endswith(sb.tag)]
    assert sorted(r["state"] for r in rows) == ["active"] * 5
