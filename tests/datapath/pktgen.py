"""pktgen for the datapath layer: who is who, and the frames the tests send."""

from __future__ import annotations

from dataclasses import dataclass

from scapy.layers.dhcp import BOOTP, DHCP
from scapy.layers.inet import IP, TCP, UDP
from scapy.layers.l2 import Ether

ETH_P_IP = 0x0800
ETH_P_RARP = 0x8035
BROADCAST = "ff:ff:ff:ff:ff:ff"


@dataclass(frozen=True)
class Addresses:
    """Locally administered MACs and pod-network addresses of the frames."""

    vm_mac: str = "0a:58:0a:10:00:05"  # the VM's own MAC (tcb_config.vm_mac)
    bridge_mac: str = "0a:58:0a:10:00:fe"  # the in-pod bridge's MAC (tcb_config.bridge_mac)
    host_mac: str = "0a:58:0a:10:00:0b"  # the host side of the pod veth (tcb_config.host_mac)
    peer_mac: str = "0a:58:0a:10:00:09"  # another pod behind OVS
    other_mac: str = "0a:58:0a:10:00:77"  # neither the VM's nor the bridge's
    vm_ip: str = "10.16.0.5"
    peer_ip: str = "10.16.0.9"
    other_ip: str = "10.16.0.77"
    dhcp_server_ip: str = "169.254.75.10"  # KubeVirt's in-pod DHCP server (on k6t-eth0)
    vm_ip6: str = "fd00:10:16::5"
    peer_ip6: str = "fd00:10:16::9"


ADDR = Addresses()


def from_vm(dst: str = ADDR.peer_mac, src: str = ADDR.vm_mac, **kw) -> Ether:
    """The Ethernet header of a frame the VM sends (on the tap)."""
    return Ether(src=src, dst=dst, **kw)


def to_vm(dst: str = ADDR.vm_mac, src: str = ADDR.peer_mac, **kw) -> Ether:
    """The Ethernet header of a frame OVS sends into the pod (on the NIC)."""
    return Ether(src=src, dst=dst, **kw)


def tcp_from_vm(payload: int = 0) -> bytes:
    """The VM opens a connection to a peer pod: unicast IPv4/TCP."""
    return bytes(from_vm() / IP(src=ADDR.vm_ip, dst=ADDR.peer_ip) / TCP(sport=40000, dport=80, flags="S")
                 / (b"p" * payload))


def tcp_to_vm(payload: int = 0) -> bytes:
    """The peer pod answers: unicast IPv4/TCP for the VM's MAC."""
    return bytes(to_vm() / IP(src=ADDR.peer_ip, dst=ADDR.vm_ip) / TCP(sport=80, dport=40000, flags="SA")
                 / (b"p" * payload))


def _chaddr() -> bytes:
    return bytes.fromhex(ADDR.vm_mac.replace(":", ""))


def dhcp_request_from_vm() -> bytes:
    """A renewal: the client unicasts DHCPREQUEST to the server, UDP 68 -> 67."""
    return bytes(from_vm() / IP(src=ADDR.vm_ip, dst=ADDR.dhcp_server_ip) / UDP(sport=68, dport=67)
                 / BOOTP(op=1, ciaddr=ADDR.vm_ip, chaddr=_chaddr())
                 / DHCP(options=[("message-type", "request"), "end"]))


def dhcp_ack_to_vm() -> bytes:
    """The server's unicast DHCPACK to the client, UDP 67 -> 68."""
    return bytes(to_vm() / IP(src=ADDR.dhcp_server_ip, dst=ADDR.vm_ip) / UDP(sport=67, dport=68)
                 / BOOTP(op=2, yiaddr=ADDR.vm_ip, chaddr=_chaddr())
                 / DHCP(options=[("message-type", "ack"), "end"]))


def raw_ipv4(ihl: int, protocol: int = 17, tail: bytes = b"") -> bytes:
    """A from-VM frame: Ethernet, then a raw 20-byte IPv4 header whose IHL
    field (in 32-bit words) is `ihl`, then `tail`. For headers scapy would fix."""
    header = bytes([0x40 | ihl, 0, 0, 20 + len(tail), 0, 0, 0, 0, 64, protocol, 0, 0,
                    10, 16, 0, 5, 10, 16, 0, 9])
    return bytes(from_vm(type=ETH_P_IP)) + header + tail
