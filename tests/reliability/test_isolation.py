"""Nothing carried that should not be, with real frames on real devices:
frames the VM sends from a MAC that is not its own never take the fast path,
and frames for MACs that are not the VM's are never redirected towards it.

Frames are written with AF_PACKET sockets opened inside the sandbox's
namespaces (so any source MAC can be sent), and each carries a marker so
that the receiving side counts only the test's own frames.
"""

from __future__ import annotations

import select
import socket
import struct
import time

import pytest
from scapy.layers.inet import IP, UDP
from scapy.layers.l2 import Ether

from tcbypass import attachments, health, netns
from tcbypass_lab.sandbox import mac_of

from .conftest import quiet_pod, report

pytestmark = pytest.mark.root

SERVER_IP, VM_IP = "10.16.0.2", "10.16.0.5"
SPOOFED_MAC = "0a:66:66:66:66:01"
OTHER_MAC = "0a:66:66:66:66:02"
PORT = 17201
N = 100
MARKER = b"tcbypass-reliability"
ETH_P_ALL = 0x0003


@pytest.fixture
def pod(bare_pod):
    sb, nic, spec = quiet_pod(bare_pod, "iso")
    attachments.attach(spec)
    return sb, nic, spec


def raw_socket(netns_name: str, dev: str) -> socket.socket:
    """An AF_PACKET socket on `dev`, opened inside the namespace (it stays there)."""
    def open_it() -> socket.socket:
        s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
        s.bind((dev, 0))
        return s

    return netns.run_in(f"/var/run/netns/{netns_name}", open_it)


def udp_socket(netns_name: str, port: int) -> socket.socket:
    def open_it() -> socket.socket:
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.bind(("0.0.0.0", port))
        return s

    return netns.run_in(f"/var/run/netns/{netns_name}", open_it)


def frame(src: str, dst: str, src_ip: str, dst_ip: str, kind: int, seq: int) -> bytes:
    payload = MARKER + struct.pack("!BI", kind, seq)
    return bytes(Ether(src=src, dst=dst) / IP(src=src_ip, dst=dst_ip) / UDP(sport=PORT, dport=PORT) / payload)


def drain(sock: socket.socket, seconds: float = 0.5) -> list[tuple[int, int]]:
    """(kind, seq) of every marked datagram or frame that arrives within `seconds`."""
    got, deadline = [], time.monotonic() + seconds
    while True:
        left = deadline - time.monotonic()
        if left <= 0 or not select.select([sock], [], [], left)[0]:
            return got
        data = sock.recv(65535)
        at = data.find(MARKER)
        if at >= 0:
            got.append(struct.unpack("!BI", data[at + len(MARKER):at + len(MARKER) + 5]))


def counters(spec):
    return health.status_of(spec.name).counters


def delta(before, after) -> dict:
    """Counters that moved, but multicast: the namespaces' own IPv6 chatter lands there."""
    moved = {f"redirect {k}": after.redirect_packets[k] - before.redirect_packets[k] for k in before.redirect_packets}
    moved |= {f"pass {k}": after.passed[k] - before.passed[k] for k in before.passed if k != "multicast"}
    return {k: v for k, v in moved.items() if v}


OWN, SPOOFED = 1, 2


def test_frames_from_a_spoofed_source_mac_never_take_the_fast_path(pod, capsys):
    sb, nic, spec = pod
    server_mac = mac_of(sb.node, nic.host_port)
    tx = raw_socket(nic.vm_ns, nic.vm_dev)
    rx = udp_socket(sb.node, PORT)
    try:
        results = {}
        for bridge in ("open", "blocked"):  # KubeVirt's bridge as it is; then unable to forward unicast
            if bridge == "blocked":
                sb.block_bridge_unicast(nic)
            before = counters(spec)
            for i in range(N):
                tx.send(frame(nic.mac, server_mac, VM_IP, SERVER_IP, OWN, i))
                tx.send(frame(SPOOFED_MAC, server_mac, VM_IP, SERVER_IP, SPOOFED, i))
            got = drain(rx)
            moved = delta(before, counters(spec))
            arrived = {kind: sum(1 for k, _ in got if k == kind) for kind in (OWN, SPOOFED)}
            results[bridge] = (moved, arrived)
            assert moved == {"redirect from_vm": N, "pass foreign_mac": N}, moved
            assert arrived[OWN] == N, "the VM's own frames take the fast path"
            if bridge == "open":
                assert arrived[SPOOFED] == N, "by default the bridge still carries them, as without tcbypass"
            else:
                assert arrived[SPOOFED] == 0, "with the bridge unable to forward, nothing carries them"
    finally:
        tx.close()
        rx.close()
    report(capsys, f"VM sent {N} frames from its own MAC and {N} from {SPOOFED_MAC}: " + "; ".join(
        f"bridge {b}: counters {m}, arrived own {a[OWN]} spoofed {a[SPOOFED]}" for b, (m, a) in results.items()))


TO_VM, TO_OTHER, TO_BRIDGE = 1, 2, 3


def test_frames_for_other_macs_are_never_redirected_towards_the_vm(pod, capsys):
    sb, nic, spec = pod
    server_mac = mac_of(sb.node, nic.host_port)
    bridge_mac = mac_of(nic.pod_ns, nic.bridge)
    sb.block_bridge_unicast(nic)  # so that only our program could carry a unicast frame to the tap
    tx = raw_socket(sb.node, nic.host_port)
    seen_by_vm = raw_socket(nic.vm_ns, nic.vm_dev)  # every frame that reaches the VM, whatever its address
    sink = udp_socket(nic.vm_ns, PORT)  # so that the VM answers no datagram with an ICMP error
    try:
        drain(seen_by_vm, 0.1)
        before = counters(spec)
        for i in range(N):
            for kind, dst in ((TO_VM, nic.mac), (TO_OTHER, OTHER_MAC), (TO_BRIDGE, bridge_mac)):
                tx.send(frame(server_mac, dst, SERVER_IP, VM_IP, kind, i))
        got = drain(seen_by_vm)
        moved = delta(before, counters(spec))
    finally:
        for s in (tx, seen_by_vm, sink):
            s.close()
    arrived = {kind: sum(1 for k, _ in got if k == kind) for kind in (TO_VM, TO_OTHER, TO_BRIDGE)}
    report(capsys, f"node sent {N} frames each to the VM's MAC, to {OTHER_MAC} and to the bridge's MAC: "
                   f"counters {moved}; the VM saw {arrived[TO_VM]} / {arrived[TO_OTHER]} / {arrived[TO_BRIDGE]}")
    assert moved == {"redirect to_vm": N, "pass foreign_mac": 2 * N}, moved
    assert arrived == {TO_VM: N, TO_OTHER: 0, TO_BRIDGE: 0}


def test_vlan_tagged_frames_from_the_vm_are_left_to_the_bridge(pod, capsys):
    """An 802.1Q-tagged frame from the VM's own MAC: the stack moves the tag
    into skb metadata before tc runs, and the program leaves such frames to
    the bridge (ethertype), as it leaves everything it does not parse."""
    sb, nic, spec = pod
    server_mac = mac_of(sb.node, nic.host_port)
    tx = raw_socket(nic.vm_ns, nic.vm_dev)
    try:
        before = counters(spec)
        for i in range(N):
            inner = frame(nic.mac, server_mac, VM_IP, SERVER_IP, OWN, i)
            tx.send(inner[:12] + struct.pack("!HH", 0x8100, 100) + inner[12:])
        time.sleep(0.2)
        moved = delta(before, counters(spec))
    finally:
        tx.close()
    report(capsys, f"VM sent {N} 802.1Q-tagged unicast frames from its own MAC: counters {moved}")
    assert moved == {"pass ethertype": N}, moved
