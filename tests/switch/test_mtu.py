"""The MTUs Kube-OVN runs: 1400 on its Geneve overlay (its default), 9000 on
jumbo-frame underlays. Kube-OVN gives both ends of the pod veth (or the
internal port) the network's MTU, KubeVirt gives the tap the pod's MTU, and
the guest takes it from KubeVirt's DHCP server; the sandbox does the same.

On the kernel datapath TSO/GSO and checksum offload are on at both ends, so
the fast path carries segments of up to 64 KiB; the userspace datapath
cannot take partial checksums (Kube-OVN turns tx checksumming off in every
pod there, as the sandbox does), so there the frames are MTU-sized.

A frame longer than the path's MTU must meet the fate it meets over the
bridge: the bypass neither delivers what the bridge drops nor drops what it
delivers. Only a VM whose MTU is wrong sends such frames; the tests give the
VM (and its tap) a larger MTU than the pod's, which a tap does not police.
"""

from __future__ import annotations

import json
import select
import socket
import time

import pytest

from tcbypass_lab.ovs import NETDEV, SYSTEM, choose_datapath
from tcbypass_lab.sandbox import sh
from tests.conftest import sandbox_node, socket_in, tcp_exchange, udp_delivered
from tests.switch.conftest import NIC_TYPES, SERVER_IP, SERVER_IP6, VM_IP, VM_IP6, Pod, make_pod, payloads

MTUS = (1400, 9000)
UDP_SEGMENT = 103  # linux/udp.h: the socket option that makes the stack send one GSO frame of UDP datagrams
IP_HEADERS = {4: 20 + 8, 6: 40 + 8}  # IP and UDP headers of a datagram


@pytest.fixture(params=[(m, t) for m in MTUS for t in NIC_TYPES], ids=lambda p: f"{p[0]}-{p[1]}")
def mtu_pod(request, datapath_reported) -> Pod:
    mtu, nic_type = request.param
    if nic_type == "internal-port" and mtu > 1500 and choose_datapath() == NETDEV:
        pytest.skip("the userspace datapath reads an internal port moved into a pod with 1500-byte buffers (it "
                    "cannot see the device's MTU there): over the bridge too, no frame above 1518 bytes leaves "
                    "the pod; the kernel datapath runs this case")
    node = sandbox_node(ovs=True, mtu=mtu)
    sb = next(node)
    try:
        pod = make_pod(sb, nic_type, datapath_reported)
        if sb.datapath == SYSTEM:
            for ns, dev in ((pod.nic.vm_ns, pod.nic.vm_dev), (pod.server, "eth0")):
                sh("ethtool", "-K", dev, "tx", "on", "tso", "on", "gso", "on", netns=ns)
        assert _mtu(pod.nic.pod_ns, pod.nic.nic) == _mtu(pod.nic.vm_ns, pod.nic.vm_dev) == mtu
        yield pod
    finally:
        node.close()


def _mtu(ns: str, dev: str) -> int:
    return json.loads(sh("ip", "-j", "link", "show", "dev", dev, netns=ns).stdout)[0]["mtu"]


def test_tcp_and_udp_arrive_intact_both_ways(mtu_pod):
    """TCP both ways at once (IPv4 and IPv6), on the kernel datapath in GSO segments
    above the MTU; then UDP datagrams that fill a frame exactly, and ones the
    sender fragments. Only the fast path can carry unicast meanwhile."""
    pod = mtu_pod
    pod.attach()
    pod.sb.block_bridge_unicast(pod.nic)
    before = pod.row()["counters"]
    for server_ip, port in ((SERVER_IP, 19781), (SERVER_IP6, 19782)):
        assert tcp_exchange(pod.nic.vm_ns, pod.server, server_ip, 4 << 20, port=port) == (True, True), server_ip
    after = pod.row()["counters"]
    packets = {d: after["redirected_packets"][d] - before["redirected_packets"][d] for d in ("from_vm", "to_vm")}
    octets = {d: after["redirected_bytes"][d] - before["redirected_bytes"][d] for d in ("from_vm", "to_vm")}
    assert all(packets.values()), packets
    biggest = max(octets[d] / packets[d] for d in packets)
    frame = 14 + pod.sb.mtu
    if pod.sb.datapath == SYSTEM:
        assert biggest > frame, f"no GSO segment above the MTU went by the fast path ({octets} in {packets})"
    else:
        assert biggest <= frame, "the userspace datapath's pods send MTU-sized frames (tx checksumming off)"

    before = pod.redirected()
    for src, dst, dst_ip, version in ((pod.nic.vm_ns, pod.server, SERVER_IP, 4), (pod.server, pod.nic.vm_ns, VM_IP, 4),
                                      (pod.nic.vm_ns, pod.server, SERVER_IP6, 6),
                                      (pod.server, pod.nic.vm_ns, VM_IP6, 6)):
        for size in (pod.sb.mtu - IP_HEADERS[version], 2 * pod.sb.mtu + 100):
            sent = payloads(5, size, b"u")
            assert sorted(udp_delivered(src, dst, dst_ip, 7102, sent, gap=0.01)) == sent, (size, dst_ip)
    after = pod.redirected()
    assert after[0] - before[0] >= 2 * 5 * 2 and after[1] - before[1] >= 2 * 5 * 2, (before, after)


def test_frames_longer_than_the_path_meet_the_bridges_fate(mtu_pod):
    """The VM believes in an MTU 1000 bytes above the pod's. Datagrams of one
    frame: the last that fits, one byte more, 500 more. On the kernel datapath
    also GSO frames of UDP datagrams (UDP_SEGMENT), whose segments fit or are
    one byte too long: the veth judges a GSO frame by its segments. What
    arrives over the bypass is exactly what arrives over the bridge, and the
    bridge's own result for a single frame is the one the MTU dictates."""
    pod, mtu = mtu_pod, mtu_pod.sb.mtu
    for ns, dev in ((pod.nic.vm_ns, pod.nic.vm_dev), (pod.nic.pod_ns, pod.nic.tap)):
        sh("ip", "link", "set", dev, "mtu", str(mtu + 1000), netns=ns)
    fits = mtu - IP_HEADERS[4]
    single = [fits, fits + 1, fits + 500]
    gso = [fits, fits + 1] if pod.sb.datapath == SYSTEM else []

    def probe(port: int) -> tuple[list[int], list[int]]:
        got = [len(p) for p in udp_delivered(pod.nic.vm_ns, pod.server, SERVER_IP, port,
                                             [b"s" * n for n in single], gap=0.05)]
        return got, [_gso_delivered(pod, port + 1, seg) for seg in gso]

    over_bridge = probe(7110)
    # One frame is judged by the MTU. A GSO frame whose segments are one byte too long is
    # the kernel's call (6.1 delivers its segments, 6.12 drops them): the bypass must only agree.
    assert over_bridge[0] == [fits] and over_bridge[1][:1] == [3][:len(gso)], f"the bridge's verdicts: {over_bridge}"
    pod.attach()
    before = pod.redirected()
    assert probe(7120) == over_bridge
    assert pod.redirected()[0] > before[0], "the frames from the VM went through the program"


def _gso_delivered(pod: Pod, port: int, segment: int) -> int:
    """Send one GSO frame of three `segment`-byte UDP datagrams from the VM;
    how many of them arrived."""
    rx, tx = socket_in(pod.server), socket_in(pod.nic.vm_ns)
    try:
        rx.bind((SERVER_IP, port))
        tx.setsockopt(socket.SOL_UDP, UDP_SEGMENT, segment)
        tx.sendto(b"g" * (3 * segment), (SERVER_IP, port))
        got, deadline = 0, time.monotonic() + 0.5
        while got < 3 and select.select([rx], [], [], max(0.0, deadline - time.monotonic()))[0]:
            assert len(rx.recv(65535)) == segment
            got += 1
        return got
    finally:
        rx.close()
        tx.close()
