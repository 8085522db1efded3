"""OVN's policy is never skipped: the bypass changes where a frame crosses the
pod, not what the node's switch decides about it.

OVN enforces ACLs, stateful ACLs, port security and QoS with OpenFlow rules
on br-int, matched on the VM's port (its ofport) or the server's. Each test
installs a stand-in for one kind of rule, sends the same traffic both ways
over the bridge and then over the bypass, and requires the same verdict.
Between the two, the bridge's unicast forwarding is blocked, so the second
run is carried by the fast path only (its counters prove it).
"""

from __future__ import annotations

import socket
import time

from scapy.layers.inet import IP, UDP
from scapy.layers.l2 import Ether

from tcbypass_lab.sandbox import mac_of
from tests.conftest import send_frames, socket_in, tcp_exchange, udp_delivered
from tests.switch.conftest import SERVER_IP, VM_IP, payloads


def both_paths(pod, measure) -> dict:
    """measure() over the bridge, then attached with the bridge's unicast blocked."""
    over_bridge = measure()
    pod.attach()
    pod.sb.block_bridge_unicast(pod.nic)
    before = pod.redirected()
    bypassed = measure()
    after = pod.redirected()
    assert after[0] > before[0] and after[1] > before[1], "the fast path carried traffic both ways"
    return {"bridge": over_bridge, "bypass": bypassed}


def udp_count(src: str, dst: str, dst_ip: str, port: int, n: int = 5) -> int:
    return len(udp_delivered(src, dst, dst_ip, port, payloads(n, 64), gap=0.005))


def test_an_acl_dropping_one_udp_port_drops_it_on_the_fast_path_too(pod):
    sw = pod.sb.switch
    sw.ofctl("add-flow", f"priority=100,udp,in_port={pod.vm_ofport},tp_dst=5001,actions=drop")
    sw.ofctl("add-flow", f"priority=100,udp,in_port={pod.server_ofport},tp_dst=5002,actions=drop")
    vm, srv = pod.nic.vm_ns, pod.server

    def verdict() -> dict:
        return {"from VM, denied port": udp_count(vm, srv, SERVER_IP, 5001),
                "from VM, other port": udp_count(vm, srv, SERVER_IP, 5003),
                "to VM, denied port": udp_count(srv, vm, VM_IP, 5002),
                "to VM, other port": udp_count(srv, vm, VM_IP, 5004)}

    seen = both_paths(pod, verdict)
    assert seen["bypass"] == seen["bridge"] == {"from VM, denied port": 0, "from VM, other port": 5,
                                                "to VM, denied port": 0, "to VM, other port": 5}


def udp_replies(client_ns: str, server_ns: str, server_ip: str, port: int, n: int = 5) -> int:
    """Datagrams from `client_ns` to an echo socket in `server_ns`: replies that came back."""
    client, server = socket_in(client_ns), socket_in(server_ns)
    try:
        server.bind((server_ip, port))
        server.settimeout(1.0)
        client.settimeout(1.0)
        replies = 0
        for i in range(n):
            client.sendto(b"ping%d" % i, (server_ip, port))
            try:
                data, peer = server.recvfrom(100)
                server.sendto(b"re-" + data, peer)
                if client.recv(100) == b"re-" + data:
                    replies += 1
            except socket.timeout:
                continue
        return replies
    finally:
        client.close()
        server.close()


def test_a_stateful_acl_allows_replies_and_denies_new_connections_from_outside(pod):
    """An allow-related pair with conntrack (OVN's stateful ACLs): the VM may open
    connections and get replies; the server may not open one to the VM."""
    sw, vm_port, srv_port = pod.sb.switch, pod.vm_ofport, pod.server_ofport
    for flow in ("table=0,priority=100,ip,actions=ct(table=1,zone=7)",
                 f"table=1,priority=100,ct_state=+trk+new,ip,in_port={vm_port},actions=ct(commit,zone=7),NORMAL",
                 "table=1,priority=100,ct_state=+trk+est,ip,actions=NORMAL",
                 "table=1,priority=100,ct_state=+trk+rel,ip,actions=NORMAL",
                 f"table=1,priority=90,ct_state=+trk+new,ip,in_port={srv_port},actions=drop"):
        sw.ofctl("add-flow", flow)
    vm, srv = pod.nic.vm_ns, pod.server
    ports = iter(range(5100, 5200))

    def verdict() -> dict:
        return {"VM opens UDP, replies": udp_replies(vm, srv, SERVER_IP, next(ports)),
                "server opens UDP, replies": udp_replies(srv, vm, VM_IP, next(ports)),
                "VM opens TCP": tcp_exchange(vm, srv, SERVER_IP, 64 << 10, port=next(ports), timeout=10),
                "server opens TCP": tcp_exchange(srv, vm, VM_IP, 64 << 10, port=next(ports), timeout=3)}

    seen = both_paths(pod, verdict)
    assert seen["bypass"] == seen["bridge"] == {"VM opens UDP, replies": 5, "server opens UDP, replies": 0,
                                                "VM opens TCP": (True, True), "server opens TCP": (False, False)}


def test_port_security_drops_spoofed_sources_on_the_fast_path_too(pod):
    """Only the VM's own MAC and IP leave its port (and the server's from its own);
    a spoofed source IP behind the right MAC is exactly what the fast path carries."""
    sw, vm_port, srv_port = pod.sb.switch, pod.vm_ofport, pod.server_ofport
    srv_mac = mac_of(pod.server, "eth0")
    for port, mac, ip in ((vm_port, pod.nic.mac, VM_IP), (srv_port, srv_mac, SERVER_IP)):
        sw.ofctl("add-flow", f"priority=200,in_port={port},dl_src={mac},ip,nw_src={ip},actions=NORMAL")
        sw.ofctl("add-flow", f"priority=200,in_port={port},dl_src={mac},arp,arp_spa={ip},arp_sha={mac},"
                             "actions=NORMAL")
        sw.ofctl("add-flow", f"priority=150,in_port={port},actions=drop")
    vm, srv = pod.nic.vm_ns, pod.server

    def raw(src_ns: str, dev: str, src_mac: str, dst_mac: str, src_ip: str, dst_ip: str, dport: int, rx_ns: str):
        frames = [bytes(Ether(src=src_mac, dst=dst_mac) / IP(src=src_ip, dst=dst_ip) / UDP(sport=7777, dport=dport)
                        / (b"s" * 30)) for _ in range(5)]
        rx = socket_in(rx_ns)
        try:
            rx.bind(("0.0.0.0", dport))
            rx.settimeout(0.3)
            send_frames(src_ns, dev, frames)
            got = 0
            deadline = time.monotonic() + 1.0
            while time.monotonic() < deadline:
                try:
                    rx.recv(100)
                    got += 1
                except socket.timeout:
                    break
            return got
        finally:
            rx.close()

    def verdict() -> dict:
        nic = pod.nic
        return {"VM, own addresses": raw(vm, nic.vm_dev, nic.mac, srv_mac, VM_IP, SERVER_IP, 5201, srv),
                "VM, spoofed IP": raw(vm, nic.vm_dev, nic.mac, srv_mac, "10.16.0.66", SERVER_IP, 5202, srv),
                "VM, spoofed MAC": raw(vm, nic.vm_dev, "0a:66:66:66:66:66", srv_mac, VM_IP, SERVER_IP, 5203, srv),
                "server, own addresses": raw(srv, "eth0", srv_mac, nic.mac, SERVER_IP, VM_IP, 5204, vm),
                "server, spoofed IP": raw(srv, "eth0", srv_mac, nic.mac, "10.16.0.77", VM_IP, 5205, vm)}

    seen = both_paths(pod, verdict)
    assert seen["bypass"] == seen["bridge"] == {"VM, own addresses": 5, "VM, spoofed IP": 0, "VM, spoofed MAC": 0,
                                                "server, own addresses": 5, "server, spoofed IP": 0}


def test_a_meter_polices_the_fast_path_as_it_polices_the_bridge(pod):
    """QoS: an OpenFlow meter (drop band, 20 packets/s, burst 10) on each port's UDP.
    Sent: 100 datagrams in half a second each way; the meter lets through about
    its rate plus its burst on either path."""
    sw = pod.sb.switch
    sw.ofctl("add-meter", "meter=1,pktps,burst,band=type=drop,rate=20,burst_size=10")
    sw.ofctl("add-meter", "meter=2,pktps,burst,band=type=drop,rate=20,burst_size=10")
    sw.ofctl("add-flow", f"priority=100,udp,in_port={pod.vm_ofport},actions=meter:1,NORMAL")
    sw.ofctl("add-flow", f"priority=100,udp,in_port={pod.server_ofport},actions=meter:2,NORMAL")
    vm, srv = pod.nic.vm_ns, pod.server

    def verdict() -> dict:
        out = {}
        for name, src, dst, ip, port in (("from VM", vm, srv, SERVER_IP, 5301), ("to VM", srv, vm, VM_IP, 5302)):
            time.sleep(1.0)  # the bucket refills
            out[name] = len(udp_delivered(src, dst, ip, port, payloads(100, 64), gap=0.005))
        return out

    seen = both_paths(pod, verdict)
    for path, counts in seen.items():
        for direction, n in counts.items():
            assert 5 <= n <= 45, f"{path} {direction}: {n} of 100 passed the meter"
    for direction in ("from VM", "to VM"):
        assert abs(seen["bridge"][direction] - seen["bypass"][direction]) <= 12, seen
