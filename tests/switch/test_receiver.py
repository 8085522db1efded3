"""The fast path against the real receiver: OVS's datapath behind the host side
of the pod veth.

From the VM, frames are handed by bpf_redirect_peer() straight into the host
side, skipping the bridge and the veth's own receive path. On the kernel
datapath the host side is a port of ovs-system, so every frame goes that way
("peer"); on the userspace one it has no master ("peer-host"). Either way
the datapath must receive what it received over the bridge: the same frames
(flows and port counters show them), big GSO/TSO segments and partial
checksums intact both ways, IPv4 and IPv6, VLAN tags as they were, no
skb->mark from the pod, and the same packet type at the next receiver.
"""

from __future__ import annotations

import socket
import time

from scapy.layers.inet import IP, UDP
from scapy.layers.l2 import Dot1Q, Ether

from tcbypass_lab.ovs import SYSTEM
from tcbypass_lab.sandbox import ping, sh
from tests.conftest import Capture, send_frames, tcp_exchange, udp_delivered
from tests.switch.conftest import SERVER_IP, SERVER_IP6, VM_IP, VM_IP6, payloads

from tests.foreign import Foreign


def test_frames_from_the_vm_enter_the_datapath_through_the_host_port(pod):
    """OVS counts them on the VM's port (an OpenFlow rule's packet count; for a
    veth also the datapath's own rx counter of the host port), and its flow
    cache holds a flow for them."""
    sw = pod.sb.switch
    sw.ofctl("add-flow", f"priority=400,in_port={pod.vm_ofport},ip,actions=NORMAL")
    row = pod.attach()
    assert (row["state"], row["from_vm"]) == ("active", pod.peer_mode)
    pod.sb.block_bridge_unicast(pod.nic)  # from here on only the fast path can carry unicast
    veth = pod.nic_type == "veth-pair"
    before = (sw.flow_packets(f"in_port={pod.vm_ofport}"), sw.dp_port_rx(pod.nic.host_port) if veth else 0)
    got = udp_delivered(pod.nic.vm_ns, pod.server, SERVER_IP, 7001, payloads(20, 100))
    assert len(got) == 20
    assert sw.flow_packets(f"in_port={pod.vm_ofport}") - before[0] >= 20
    if veth:
        assert sw.dp_port_rx(pod.nic.host_port) - before[1] >= 20, "the host port's rx counter shows them"
    flows = sw.dp_flows()
    vm_flows = [f for f in flows.splitlines() if f"eth(src={pod.nic.mac}" in f and "eth_type(0x0800)" in f]
    assert vm_flows, f"the datapath has no flow for the VM's frames:\n{flows}"
    assert pod.redirected()[0] >= 20


def test_tcp_with_segments_larger_than_the_mtu_arrives_intact_both_ways(pod):
    """On the kernel datapath: TSO/GSO and checksum offload on at both ends (the
    VM's NIC and the server's), so frames carry CHECKSUM_PARTIAL and segments
    of up to 64 KiB; the fast path carries them as the bridge does, and both
    directions arrive byte for byte. The userspace datapath cannot take
    partial checksums (Kube-OVN turns tx checksumming off in every pod there,
    and the sandbox does as Kube-OVN does), so there the same transfer runs
    with MTU-sized segments."""
    kernel = pod.sb.datapath == SYSTEM
    if kernel:
        for ns, dev in ((pod.nic.vm_ns, pod.nic.vm_dev), (pod.server, "eth0")):
            sh("ethtool", "-K", dev, "tx", "on", "tso", "on", "gso", "on", netns=ns)
    assert tcp_exchange(pod.nic.vm_ns, pod.server, SERVER_IP, 4 << 20) == (True, True), "over the bridge"
    pod.attach()
    pod.sb.block_bridge_unicast(pod.nic)
    before = pod.row()["counters"]
    assert tcp_exchange(pod.nic.vm_ns, pod.server, SERVER_IP, 4 << 20, port=19771) == (True, True)
    after = pod.row()["counters"]
    packets = {d: after["redirected_packets"][d] - before["redirected_packets"][d] for d in ("from_vm", "to_vm")}
    octets = {d: after["redirected_bytes"][d] - before["redirected_bytes"][d] for d in ("from_vm", "to_vm")}
    assert all(packets.values()), packets
    biggest = max(octets[d] / packets[d] for d in packets)
    if kernel:
        assert biggest > 1514, f"no segment above the MTU went through the programs ({octets} in {packets})"
    assert _checksum_errors(pod.server) == _checksum_errors(pod.nic.vm_ns) == 0


def _checksum_errors(ns: str) -> int:
    out = sh("cat", "/proc/net/snmp", netns=ns).stdout
    total = 0
    for proto in ("Tcp", "Udp"):
        head, values = [line.split() for line in out.splitlines() if line.startswith(f"{proto}:")][:2]
        total += int(dict(zip(head, values)).get("InCsumErrors", 0))
    return total


def test_full_size_and_fragmented_udp_arrives_intact_both_ways(pod):
    """1472-byte datagrams (full frames) and 8000-byte ones (IP fragments), IPv4 and IPv6."""
    pod.attach()
    pod.sb.block_bridge_unicast(pod.nic)
    for size in (1472, 1452, 8000):
        for src, dst, dst_ip in ((pod.nic.vm_ns, pod.server, SERVER_IP), (pod.server, pod.nic.vm_ns, VM_IP),
                                 (pod.nic.vm_ns, pod.server, SERVER_IP6), (pod.server, pod.nic.vm_ns, VM_IP6)):
            if size == 1472 and ":" in dst_ip:
                continue  # 1452 is IPv6's full frame
            sent = payloads(5, size, b"u")
            assert sorted(udp_delivered(src, dst, dst_ip, 7002, sent, gap=0.01)) == sent, (size, dst_ip)
    assert all(pod.redirected())


def test_ipv6_takes_the_fast_path_both_ways(pod):
    pod.attach()
    pod.sb.block_bridge_unicast(pod.nic)
    before = pod.redirected()
    out = sh("ping", "-6", "-c", "5", "-i", "0.05", "-W", "1", SERVER_IP6, netns=pod.nic.vm_ns, check=False)
    assert " 0% packet loss" in out.stdout, out.stdout
    after = pod.redirected()
    assert after[0] - before[0] >= 5 and after[1] - before[1] >= 5


def test_a_mark_set_in_the_pod_reaches_the_switch_as_over_the_bridge(pod):
    """Somebody's program on the tap marks every frame (skb->mark 0x42) before
    ours sees it. Over the bridge and a veth, the crossing into the node's
    namespace clears the mark; by peer it would reach the host side, where OVS's
    kernel datapath matches on it (skb_mark in its flow key). An internal port's
    transmit hands the frame to the datapath as it is, on either path. OVS's
    own count of marked frames (an OpenFlow rule on pkt_mark) must not change
    with the bypass; at a veth's host side a program counts them too."""
    sw = pod.sb.switch
    hook = pod.attach()["hook"]
    pod.detach()
    sw.ofctl("add-flow", f"priority=500,in_port={pod.vm_ofport},pkt_mark=0x42,actions=NORMAL")
    marker = Foreign(pod.nic.pod_ns, pod.nic.tap, b"mark_frames", hook, prio=1)
    counter = None if pod.nic_type == "internal-port" else \
        Foreign(pod.sb.node, pod.nic.host_port, b"count_marked", "clsact", prio=1)
    try:
        seen = {}
        for path in ("bridge", "bypass"):
            if path == "bypass":
                assert pod.attach("--hook", hook)["from_vm"] == pod.peer_mode
                pod.sb.block_bridge_unicast(pod.nic)
            before = (sw.flow_packets("pkt_mark=0x42"), counter.count() if counter else 0)
            assert ping(pod.nic.vm_ns, SERVER_IP, count=5, interval=0.05) == (5, 5)
            seen[path] = (sw.flow_packets("pkt_mark=0x42") - before[0],
                          (counter.count() if counter else 0) - before[1])
        assert marker.count() >= 10, "the marking program ran on every frame"
        assert seen["bypass"] == seen["bridge"], seen
        if counter is not None:
            assert seen["bypass"] == (0, 0), "a veth's crossing clears the mark: nothing marked reaches the node"
    finally:
        marker.close()
        if counter is not None:
            counter.close()


def test_vlan_tagged_frames_reach_the_switch_tagged_as_over_the_bridge(pod):
    """A VLAN-tagged frame from the VM is not the fast path's (it takes the
    bridge): OVS sees it on the VM's port with its tag, attached or not."""
    sw = pod.sb.switch
    sw.ofctl("add-flow", f"priority=500,in_port={pod.vm_ofport},dl_vlan=100,actions=drop")
    frame = bytes(Ether(src=pod.nic.mac, dst="0a:00:00:00:00:99") / Dot1Q(vlan=100) /
                  IP(src=VM_IP, dst=SERVER_IP) / UDP(sport=5000, dport=5000) / (b"v" * 30))

    def tagged_seen() -> int:
        before = sw.flow_packets("dl_vlan=100")
        send_frames(pod.nic.vm_ns, pod.nic.vm_dev, [frame] * 4)
        time.sleep(0.5)
        return sw.flow_packets("dl_vlan=100") - before

    over_bridge = tagged_seen()
    pod.attach()
    assert (over_bridge, tagged_seen()) == (4, 4)
    assert pod.row()["counters"]["passed_packets"]["ethertype"] >= 4


def test_the_next_receiver_sees_the_packet_type_it_saw_over_the_bridge(pod):
    """The server behind OVS gets the VM's frames as PACKET_HOST either way.
    At the host side itself a peer redirect may type a frame for another MAC
    PACKET_HOST where the bridge path left it PACKET_OTHERHOST: a switch port
    takes every frame whatever its type, so nothing downstream can tell."""
    frames = [bytes(Ether(src=pod.nic.mac, dst=_server_mac(pod)) / IP(src=VM_IP, dst=SERVER_IP) /
                    UDP(sport=6000 + i, dport=6100) / (b"t" * 40)) for i in range(5)]

    def types_at_server() -> list[int]:
        with Capture(pod.server, "eth0") as cap:
            send_frames(pod.nic.vm_ns, pod.nic.vm_dev, frames)
            got = cap.frames(5, match=lambda f, _t: f[12:14] == b"\x08\x00" and f[23] == 17 and f[36:38] == b"\x17\xd4")
        return [t for _, t in got]

    over_bridge = types_at_server()
    pod.attach()
    pod.sb.block_bridge_unicast(pod.nic)
    assert types_at_server() == over_bridge == [socket.PACKET_HOST] * 5
    assert pod.redirected()[0] >= 5


def _server_mac(pod) -> str:
    from tcbypass_lab.sandbox import mac_of

    return mac_of(pod.server, "eth0")
