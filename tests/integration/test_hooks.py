"""Where the programs hook in, and what the neighbours on those hooks see.

- tcx (the default on this kernel) hooks both programs with links and no
  qdisc; detach leaves the devices exactly as they were.
- A tap deleted under a tcx link leaves the link defunct: status says so,
  gc removes it, attach hooks the new tap.
- Other programs and filters on the tap keep their view: a tcx program
  attached before ours still sees every frame, and a clsact filter behind
  ours still sees every frame we leave to the bridge (we return "continue",
  not "ok"), with either hook.
- From the VM by bpf_redirect_peer (the default), frames reach the host side
  of the pod veth exactly as over the bridge (same bytes, same packet type),
  and that side's own ingress processing still runs (a tc filter there
  still drops what it drops). Where the host side's own stack sees its
  frames (here: an address on it), only frames for its MAC go by peer
  ("peer-host"); where it is a switch port (here: a bridge's; on a node:
  OVS's kernel datapath), every frame does ("peer").

The VM is a veth standing in for the tap (tests/vm has a real guest).
"""

from __future__ import annotations

import os
import socket
import time

import pytest
from scapy.layers.inet import IP, UDP
from scapy.layers.l2 import ARP, Ether

from tcbypass import netns
from tcbypass_lab.sandbox import NETNS_DIR, mac_of, ping, sh, wait_for_ping
from tests.conftest import Capture, pins, run_cli, send_frames, status_json, tc_state, tcx_programs
from tests.foreign import Foreign

pytestmark = pytest.mark.root

SERVER_IP, VM_IP = "10.16.0.2", "10.16.0.5"


@pytest.fixture
def pod(bare_node):
    [nic] = bare_node.add_vm("vm1", [VM_IP])
    bare_node.serve_on_host_port(nic, SERVER_IP)
    assert wait_for_ping(nic.vm_ns, SERVER_IP), "the bridge path must work before any test"
    bare_node.pin_neighbours(nic, SERVER_IP)  # no ARP of their own in the counts below
    # Nor IPv6 of their own: router solicitations and MLD reports come at odd moments after link-up.
    sh("sysctl", "-qw", f"net.ipv6.conf.{nic.vm_dev}.disable_ipv6=1", netns=nic.vm_ns)
    return bare_node, nic


def attach(sb, nic, *extra) -> None:
    proc = run_cli("attach", "--netns", sb.netns_path(nic.pod_ns), "--tap", nic.tap, "--nic", nic.nic,
                   "--mac", nic.mac, "--name", f"h-{sb.tag}", *extra)
    assert proc.returncode == 0, proc.stderr


def row(sb) -> dict:
    [found] = [r for r in status_json() if r["name"] == f"h-{sb.tag}"]
    return found


def udp_frames(sb, nic, count: int, dst_mac: str | None = None, dport: int = 7000) -> list[bytes]:
    """Unicast UDP frames from the VM, by default for the host side of the pod veth."""
    dst = dst_mac or mac_of(sb.node, nic.host_port)
    return [bytes(Ether(src=nic.mac, dst=dst) / IP(src=VM_IP, dst=SERVER_IP, ttl=64, id=i + 1)
                  / UDP(sport=40000 + i, dport=dport) / (b"t" * 40)) for i in range(count)]


def arp_requests(nic, count: int) -> list[bytes]:
    return [bytes(Ether(src=nic.mac, dst="ff:ff:ff:ff:ff:ff")
                  / ARP(op=1, hwsrc=nic.mac, psrc=VM_IP, pdst=f"10.16.0.{100 + i}")) for i in range(count)]


# --- tcx ---------------------------------------------------------------------------
def test_tcx_hooks_both_programs_with_links_and_no_qdisc(pod):
    sb, nic = pod
    before = (tc_state(nic.pod_ns, nic.tap), tc_state(nic.pod_ns, nic.nic))
    attach(sb, nic)
    r = row(sb)
    assert (r["hook"], r["from_vm"], r["state"]) == ("tcx", "peer-host", "active")
    assert tcx_programs(nic.pod_ns, nic.tap) == ["tcb_from_vm"]
    assert tcx_programs(nic.pod_ns, nic.nic) == ["tcb_to_vm"]
    for dev in (nic.tap, nic.nic):
        assert "clsact" not in sh("tc", "qdisc", "show", "dev", dev, netns=nic.pod_ns).stdout
    assert {"link_from_vm", "link_to_vm"} <= set(os.listdir(f"{pins_root()}/h-{sb.tag}"))

    assert run_cli("detach", f"h-{sb.tag}").returncode == 0
    assert (tc_state(nic.pod_ns, nic.tap), tc_state(nic.pod_ns, nic.nic)) == before
    assert not pins(f"h-{sb.tag}")


def pins_root() -> str:
    from tcbypass import loader
    return loader.PIN_ROOT


def test_a_deleted_tap_leaves_a_defunct_link_that_status_reports_and_gc_removes(pod):
    sb, nic = pod
    attach(sb, nic)
    sb.restart_vm(nic)  # the tap goes, a new one (new ifindex) joins the bridge

    r = row(sb)
    assert r["state"] == "stale"
    assert any("defunct" in p for p in r["problems"]), r["problems"]
    gc = run_cli("gc")
    assert gc.returncode == 0 and f"h-{sb.tag}: defunct tcx link (from_vm)" in gc.stdout, gc.stdout
    assert not os.path.exists(f"{pins_root()}/h-{sb.tag}/link_from_vm")
    assert os.path.exists(f"{pins_root()}/h-{sb.tag}/link_to_vm"), "the NIC's link is alive and stays"
    assert row(sb)["state"] == "stale", "the new tap is not hooked until attach runs"

    attach(sb, nic)
    r = row(sb)
    assert r["state"] == "active" and tcx_programs(nic.pod_ns, nic.tap) == ["tcb_from_vm"]
    assert wait_for_ping(nic.vm_ns, SERVER_IP)
    sb.pin_neighbours(nic, SERVER_IP)  # the new VM device has no static entry yet: no ARP probes below
    time.sleep(0.2)
    before = row(sb)["counters"]["redirected_packets"]["from_vm"]
    send_frames(nic.vm_ns, nic.vm_dev, udp_frames(sb, nic, 5))
    assert row(sb)["counters"]["redirected_packets"]["from_vm"] == before + 5


# --- neighbours ---------------------------------------------------------------------
@pytest.mark.parametrize("hook", ["tcx", "clsact"])
def test_other_programs_and_filters_on_the_tap_keep_their_view(pod, hook):
    """A tcx program attached before ours sees every frame; a clsact filter
    behind ours (ARP only, at a later priority) sees every frame we leave to
    the bridge. Had we returned TC_ACT_OK, the filter would see nothing: on
    tcx it ends the chain before clsact, on clsact it ends classification."""
    sb, nic = pod
    first = Foreign(nic.pod_ns, nic.tap, b"count_frames", "tcx")
    behind = Foreign(nic.pod_ns, nic.tap, b"count_frames", "clsact", prio=300, protocol=0x0806)
    try:
        frames = arp_requests(nic, 4) + udp_frames(sb, nic, 6)

        def seen() -> tuple[int, int]:
            before = (first.count(), behind.count())
            send_frames(nic.vm_ns, nic.vm_dev, frames)
            time.sleep(0.2)
            return first.count() - before[0], behind.count() - before[1]

        assert seen() == (10, 4), "before the attach"
        attach(sb, nic, "--hook", hook)
        assert seen() == (10, 4), "with ours on the tap"
        c = row(sb)["counters"]
        # Ours counted the six unicast frames it redirected and the four broadcasts it left; the
        # VM's own stack may add a multicast of its own meanwhile (IPv6 MLD, a router solicitation).
        assert c["redirected_packets"]["from_vm"] == 6 and 4 <= c["passed_packets"]["multicast"] <= 6, c
        if hook == "tcx":
            assert tcx_programs(nic.pod_ns, nic.tap) == ["count_frames", "tcb_from_vm"], "ours goes last"

        assert run_cli("detach", f"h-{sb.tag}").returncode == 0
        assert tcx_programs(nic.pod_ns, nic.tap) == ["count_frames"], "theirs stays"
        assert "foreign" in sh("tc", "filter", "show", "dev", nic.tap, "ingress", netns=nic.pod_ns).stdout
        assert seen() == (10, 4), "after the detach"
    finally:
        first.close()
        behind.close()


# --- bpf_redirect_peer and the host side ---------------------------------------------
@pytest.mark.parametrize("mode", ["auto", "redirect"])
def test_frames_reach_the_host_side_exactly_as_over_the_bridge(pod, mode):
    """Same bytes and the same packet type at the host side of the pod veth,
    for frames addressed to it (PACKET_HOST, by peer under auto) and to
    another host (PACKET_OTHERHOST: through the pod NIC, so that the host's
    stack, which sees them, drops them as it did behind the bridge)."""
    sb, nic = pod
    other = "0a:58:0a:10:00:77"
    mine, theirs = udp_frames(sb, nic, 5), udp_frames(sb, nic, 5, dst_mac=other)

    def arrivals() -> list[tuple[bytes, int]]:
        with Capture(sb.node, nic.host_port) as cap:
            send_frames(nic.vm_ns, nic.vm_dev, mine + theirs)
            return cap.frames(10, match=lambda f, _t: f[12:14] == b"\x08\x00" and f[23] == 17)

    over_bridge = arrivals()
    attach(sb, nic, *(() if mode == "auto" else ("--from-vm", mode)))
    assert row(sb)["from_vm"] == ("peer-host" if mode == "auto" else "redirect")
    bypassed = arrivals()

    assert row(sb)["counters"]["redirected_packets"]["from_vm"] == 10, "the bypass carried them"
    assert [f for f, _ in bypassed] == [f for f, _ in over_bridge] == mine + theirs
    assert [t for _, t in bypassed] == [t for _, t in over_bridge] == \
        [socket.PACKET_HOST] * 5 + [socket.PACKET_OTHERHOST] * 5


def test_every_frame_goes_by_peer_to_a_switch_port_and_is_switched_on(bare_node):
    """The host side enslaved to a switch (a bridge here, OVS's kernel
    datapath on a node) takes frames whatever their packet type: auto hands
    every frame over by peer, and the switch delivers them to a server on
    another of its ports."""
    sb = bare_node
    [nic] = sb.add_vm("vm1", [VM_IP])
    switch, server = "tcbsw0", sb.add_netns("srv")
    sh("ip", "link", "add", switch, "type", "bridge", netns=sb.node)
    sh("ip", "link", "set", nic.host_port, "master", switch, netns=sb.node)
    sh("ip", "link", "add", "srv0", "netns", sb.node, "type", "veth", "peer", "name", "eth0", "netns", server)
    sh("ip", "link", "set", "srv0", "master", switch, netns=sb.node)
    for dev in (switch, "srv0"):
        sh("ip", "link", "set", dev, "up", netns=sb.node)
    sh("ip", "addr", "add", f"{SERVER_IP}/24", "dev", "eth0", netns=server)
    sh("ip", "link", "set", "eth0", "up", netns=server)
    assert wait_for_ping(nic.vm_ns, SERVER_IP), "the bridge path must work first"
    server_mac = mac_of(server, "eth0")
    sh("ip", "neigh", "replace", SERVER_IP, "lladdr", server_mac, "dev", nic.vm_dev, "nud", "permanent",
       netns=nic.vm_ns)
    sh("ip", "neigh", "replace", VM_IP, "lladdr", nic.mac, "dev", "eth0", "nud", "permanent", netns=server)

    attach(sb, nic)
    assert row(sb)["from_vm"] == "peer"
    frames = udp_frames(sb, nic, 5, dst_mac=server_mac, dport=7100)
    got = udp_received(server, 7100, lambda: send_frames(nic.vm_ns, nic.vm_dev, frames))
    assert got == 5
    assert row(sb)["counters"]["redirected_packets"]["from_vm"] >= 5
    assert ping(nic.vm_ns, SERVER_IP, count=5) == (5, 5)


def udp_received(ns: str, port: int, sender, timeout: float = 1.0) -> int:
    """Datagrams a server on SERVER_IP:`port` in `ns` receives while `sender()` runs."""
    def make() -> socket.socket:
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.bind((SERVER_IP, port))
        return s
    server = netns.run_in(f"{NETNS_DIR}/{ns}", make)
    try:
        sender()
        got, deadline = 0, time.monotonic() + timeout
        server.settimeout(0.2)
        while time.monotonic() < deadline:
            try:
                server.recv(2048)
                got += 1
            except socket.timeout:
                if got:
                    break
        return got
    finally:
        server.close()


def test_peer_redirect_keeps_the_host_sides_ingress_filters(pod):
    """A tc ingress filter on the host side of the pod veth (where Kube-OVN's
    QoS and others hook in) still applies to frames handed over by peer."""
    sb, nic = pod
    dropper = Foreign(sb.node, nic.host_port, b"drop_port_9999", "clsact", prio=1, protocol=0x0800)
    try:
        def blast(port: int):
            return lambda: send_frames(nic.vm_ns, nic.vm_dev, udp_frames(sb, nic, 5, dport=port))

        results = {}
        for path in ("bridge", "bypass"):
            if path == "bypass":
                attach(sb, nic)
                assert row(sb)["from_vm"] == "peer-host"  # every frame here is for the host side
            results[path] = (udp_received(sb.node, 9999, blast(9999)), udp_received(sb.node, 9998, blast(9998)))
        assert results == {"bridge": (0, 5), "bypass": (0, 5)}
        assert row(sb)["counters"]["redirected_packets"]["from_vm"] == 10
        assert dropper.count() == 10, "the filter dropped the bridge's five and the bypass's five"
    finally:
        dropper.close()
