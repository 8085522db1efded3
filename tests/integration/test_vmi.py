"""`attach <vmi>` against a real ovsdb-server + ovs-vswitchd holding Kube-OVN-style rows,
with pods wired like KubeVirt's bridge binding and real traffic through OVS."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import time

import pytest

from tcbypass_lab.sandbox import mac_of, ping, sh, tcp_transfer, wait_for_ping
from tests.conftest import pins, run_cli, tc_state

SERVER_IP = "10.16.0.2"


def env_of(sb) -> dict:
    return {"TCBYPASS_OVSDB": sb.ovsdb_url, "TCBYPASS_OVS_NETNS": sb.netns_path(sb.node)}


def cli(sb, *args):
    return run_cli(*args, env=env_of(sb))


@pytest.fixture
def node(ovs_node):
    server = ovs_node.add_server_pod("web", SERVER_IP, namespace="prod")
    return ovs_node, server


def rows(sb, vmi=None, namespace=None):
    args = ([vmi] if vmi else []) + (["-n", namespace] if namespace else [])
    proc = run_cli("status", "--json", *args, env=env_of(sb))
    assert proc.returncode in (0, 3), proc.stderr
    return [r for r in json.loads(proc.stdout) if sb.tag in r["netns"]]


def test_primary_nic_is_discovered_and_bypassed(node):
    sb, server = node
    [nic] = sb.add_vm("vm1", ["10.16.0.5"], namespace="prod")
    assert wait_for_ping(nic.vm_ns, SERVER_IP)
    sb.block_bridge_unicast(nic)
    assert ping(nic.vm_ns, SERVER_IP, count=2)[1] == 0

    proc = cli(sb, "attach", "vm1", "-n", "prod")
    assert proc.returncode == 0, proc.stderr
    assert "prod/vm1 vm1.prod: attached (tap0 <-> eth0-nic" in proc.stdout
    assert ping(nic.vm_ns, SERVER_IP, count=5) == (5, 5)
    assert tcp_transfer(nic.vm_ns, server, SERVER_IP, 1 << 20) == 1 << 20

    [row] = rows(sb, "vm1", "prod")
    assert {k: row[k] for k in ("vmi", "namespace", "iface_id", "tap", "nic", "mac", "state")} == {
        "vmi": "vm1", "namespace": "prod", "iface_id": "vm1.prod", "tap": "tap0", "nic": "eth0-nic",
        "mac": nic.mac, "state": "active"}
    assert row["netns"] == sb.netns_path(nic.pod_ns)
    assert row["counters"]["redirected_packets"]["from_vm"] >= 5
    assert row["counters"]["redirected_packets"]["to_vm"] >= 5


def test_secondary_nic_is_bypassed_too(node):
    sb, _ = node
    server2 = sb.add_server_pod("web2", "10.17.0.2", namespace="prod")
    primary, secondary = sb.add_vm("vm2", ["10.16.0.6", "10.17.0.6"], namespace="prod",
                                   providers=("attachnet.prod.ovn",))
    assert secondary.tap.startswith("tap") and secondary.nic.endswith("-nic") and secondary.bridge.startswith("k6t-")
    for nic, ip in ((primary, SERVER_IP), (secondary, "10.17.0.2")):
        assert wait_for_ping(nic.vm_ns, ip)
        sb.block_bridge_unicast(nic)
    proc = cli(sb, "attach", "vm2", "-n", "prod")
    assert proc.returncode == 0, proc.stderr
    assert ping(primary.vm_ns, SERVER_IP, count=3) == (3, 3)
    # The secondary NIC's traffic leaves the VM on eth1.
    out = sh("ping", "-c", "3", "-i", "0.05", "-W", "1", "-I", "eth1", "10.17.0.2", netns=secondary.vm_ns,
             check=False)
    assert out.returncode == 0, out.stdout
    by_iface = {r["iface_id"]: r for r in rows(sb, "vm2", "prod")}
    assert set(by_iface) == {"vm2.prod", "vm2.prod.attachnet.prod.ovn"}
    sec = by_iface["vm2.prod.attachnet.prod.ovn"]
    assert (sec["tap"], sec["nic"], sec["mac"]) == (secondary.tap, secondary.nic, secondary.mac)
    assert sec["counters"]["redirected_packets"]["from_vm"] >= 3
    assert server2


def test_two_vmis_with_the_same_ifindexes_each_carry_only_their_own_traffic(node):
    sb, server = node
    [a] = sb.add_vm("vma", ["10.16.0.7"], namespace="team-a")
    [b] = sb.add_vm("vmb", ["10.16.0.8"], namespace="team-b")
    index = lambda nic, dev: int(sh("ip", "-o", "link", "show", "dev", dev, netns=nic.pod_ns).stdout.split(":")[0])
    assert (index(a, "tap0"), index(a, "eth0-nic")) == (index(b, "tap0"), index(b, "eth0-nic")), \
        "the two pods must number their devices alike for this test to mean anything"
    web_mac = mac_of(server, "eth0")
    for nic in (a, b):
        assert wait_for_ping(nic.vm_ns, SERVER_IP)
        sb.block_bridge_unicast(nic)
        # Static neighbours both ways, so that only the pings below leave the VM as unicast: no ARP
        # probes of its own, and no replies to the server's (a slow guest lets its entries go stale).
        sh("ip", "neigh", "replace", SERVER_IP, "lladdr", web_mac, "dev", "eth0", "nud", "permanent",
           netns=nic.vm_ns)
        sh("ip", "neigh", "replace", nic.ip, "lladdr", nic.mac, "dev", "eth0", "nud", "permanent", netns=server)
    assert cli(sb, "attach", "vma", "-n", "team-a").returncode == 0
    assert cli(sb, "attach", "vmb", "-n", "team-b").returncode == 0
    before = {r["vmi"]: r["counters"]["redirected_packets"] for r in rows(sb)}
    assert ping(a.vm_ns, SERVER_IP, count=7, interval=0.02) == (7, 7)
    assert ping(b.vm_ns, SERVER_IP, count=3, interval=0.02) == (3, 3)
    after = {r["vmi"]: r["counters"]["redirected_packets"] for r in rows(sb)}
    delta = {vmi: after[vmi]["from_vm"] - before[vmi]["from_vm"] for vmi in ("vma", "vmb")}
    assert delta == {"vma": 7, "vmb": 3}


def test_attach_status_detach_each_twice(node):
    sb, _ = node
    [nic] = sb.add_vm("vm3", ["10.16.0.9"], namespace="prod")
    tc_before = (tc_state(nic.pod_ns, "tap0"), tc_state(nic.pod_ns, "eth0-nic"))
    first, second = cli(sb, "attach", "vm3", "-n", "prod"), cli(sb, "attach", "vm3", "-n", "prod")
    assert (first.returncode, second.returncode) == (0, 0)
    assert "attached" in first.stdout and "unchanged" in second.stdout
    for _ in range(2):
        proc = cli(sb, "status", "vm3", "-n", "prod")
        assert proc.returncode == 0 and "vm3.prod" in proc.stdout and "active" in proc.stdout
    first = cli(sb, "detach", "vm3", "-n", "prod", "--remove-qdisc")
    second = cli(sb, "detach", "vm3", "-n", "prod", "--remove-qdisc")
    assert (first.returncode, second.returncode) == (0, 0)
    assert "detached" in first.stdout and "not attached" in second.stdout
    assert (tc_state(nic.pod_ns, "tap0"), tc_state(nic.pod_ns, "eth0-nic")) == tc_before
    assert not pins("vm3")


def test_vm_restart_is_stale_until_attach_refreshes_it(node):
    sb, _ = node
    [nic] = sb.add_vm("vm4", ["10.16.0.10"], namespace="prod")
    assert wait_for_ping(nic.vm_ns, SERVER_IP)
    assert cli(sb, "attach", "vm4", "-n", "prod").returncode == 0

    sb.restart_vm(nic)  # new tap0, new ifindex
    proc = cli(sb, "status", "vm4", "-n", "prod")
    assert proc.returncode == 3
    [row] = rows(sb, "vm4", "prod")
    assert row["state"] == "stale"
    assert any("tap tap0 is now ifindex" in p for p in row["problems"])
    assert wait_for_ping(nic.vm_ns, SERVER_IP), "while stale, the bridge still carries the VM"

    sb.block_bridge_unicast(nic)
    proc = cli(sb, "attach", "vm4", "-n", "prod")
    assert proc.returncode == 0 and "refreshed" in proc.stdout, proc.stdout + proc.stderr
    [row] = rows(sb, "vm4", "prod")
    assert row["state"] == "active"
    before = row["counters"]["redirected_packets"]["from_vm"]
    assert ping(nic.vm_ns, SERVER_IP, count=4) == (4, 4)
    [row] = rows(sb, "vm4", "prod")
    assert row["counters"]["redirected_packets"]["from_vm"] - before == 4


def test_pod_deleted_shows_orphaned_and_detach_cleans_up(node):
    sb, _ = node
    [nic] = sb.add_vm("vm5", ["10.16.0.11"], namespace="prod")
    assert cli(sb, "attach", "vm5", "-n", "prod").returncode == 0
    sh("ip", "netns", "delete", nic.pod_ns)
    sb.netns_names.remove(nic.pod_ns)
    [row] = rows(sb, "vm5", "prod")
    assert row["state"] == "orphaned"
    assert cli(sb, "detach", "vm5", "-n", "prod").returncode == 0
    assert not pins("vm5")


# --- errors that teach ---------------------------------------------------------

def assert_one_line_error(proc, code, *fragments):
    assert proc.returncode == code, (proc.returncode, proc.stdout, proc.stderr)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    for fragment in fragments:
        assert fragment in lines[0]


def test_unknown_vmi_lists_the_vmis_that_exist(node):
    sb, _ = node
    sb.add_vm("vm6", ["10.16.0.12"], namespace="prod")
    proc = cli(sb, "attach", "nosuchvm", "-n", "prod")
    assert_one_line_error(proc, 1, "no VMI 'nosuchvm' in namespace 'prod'", "vm6", "web")
    assert not pins(sb.tag) and not pins("nosuchvm")


def test_ovsdb_socket_missing(node):
    sb, _ = node
    proc = run_cli("attach", "vm1", "--ovsdb", f"unix:{sb.run_dir}/nope.sock")
    assert_one_line_error(proc, 1, "no OVSDB socket at unix:", "nope.sock", "--ovsdb")


def test_ovsdb_socket_refusing(node):
    sb, _ = node
    path = f"{sb.run_dir}/refusing.sock"
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(path)  # bound but never listening: connect() is refused
    try:
        proc = run_cli("attach", "vm1", "--ovsdb", f"unix:{path}")
        assert_one_line_error(proc, 1, "refused", path)
    finally:
        listener.close()


def test_pod_netns_gone(node):
    sb, _ = node
    [nic] = sb.add_vm("vm7", ["10.16.0.13"], namespace="prod")
    sh("ip", "netns", "delete", nic.pod_ns)
    sb.netns_names.remove(nic.pod_ns)
    proc = cli(sb, "attach", "vm7", "-n", "prod")
    assert_one_line_error(proc, 1, "pod network namespace of vm7", "is gone")
    assert not pins("vm7")


def test_pod_nic_taken_off_its_bridge_is_not_bypassable(node):
    sb, _ = node
    [nic] = sb.add_vm("vm8", ["10.16.0.14"], namespace="prod")
    sh("ip", "link", "set", nic.nic, "nomaster", netns=nic.pod_ns)  # the NIC is no bridge port, and no NAT either
    before = tc_state(nic.pod_ns, nic.nic)
    proc = cli(sb, "attach", "vm8", "-n", "prod")
    # Each binding has its own test in test_bindings.py; this one is a bridge pod half taken apart.
    assert_one_line_error(proc, 1, "no bypassable NIC", "still being plugged", "(seen: bridge k6t-eth0)")
    assert tc_state(nic.pod_ns, nic.nic) == before and not pins("vm8")


def test_not_bypassable_with_two_taps_on_the_bridge(node):
    sb, _ = node
    [nic] = sb.add_vm("vm9", ["10.16.0.15"], namespace="prod")
    sh("ip", "tuntap", "add", "dev", "tap1", "mode", "tap", netns=nic.pod_ns)
    sh("ip", "link", "set", "tap1", "master", nic.bridge, netns=nic.pod_ns)
    proc = cli(sb, "attach", "vm9", "-n", "prod")
    assert_one_line_error(proc, 1, "expected exactly one tap")
    assert not pins("vm9")


def test_not_root_is_refused(node):
    sb, _ = node
    proc = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
                           sys.executable, "-m", "tcbypass", "attach", "vm1"],
                          capture_output=True, text=True, timeout=60, env={**os.environ, **env_of(sb)})
    assert_one_line_error(proc, 1, "needs root", "sudo")


def ovs_rx_packets(sb, port: str) -> int:
    """Frames OVS's datapath received on `port` (live, not the 5-second OVSDB statistics)."""
    out = sh("ovs-appctl", "-t", f"{sb.run_dir}/ovs-vswitchd.ctl", "dpctl/show", "-s").stdout
    lines = out.splitlines()
    for i, line in enumerate(lines):
        if line.strip().startswith("port ") and line.split(":", 1)[1].split()[0] == port:
            for follow in lines[i + 1:]:
                if "RX packets:" in follow:
                    return int(follow.split("RX packets:")[1].split()[0])
    raise AssertionError(f"port {port} not in the datapath:\n{out}")


@pytest.mark.parametrize("mode", ["auto", "redirect"])
def test_both_from_vm_modes_carry_traffic_through_ovs(node, mode):
    """With OVS's userspace datapath the host side of the pod veth is no switch
    port in the kernel (OVS reads it through a packet socket, and the node's
    stack sees its frames too), so auto takes peer-host: only frames for the
    host side's own MAC go by peer, the rest through the pod NIC. On the
    kernel datapath the host side is a port of ovs-system, so auto takes peer
    for every frame. Either way OVS receives every frame and switches it to
    the server pod, so ping and TCP work with the bridge blocked; switching
    modes is a refresh."""
    from tcbypass import features
    from tcbypass_lab.ovs import SYSTEM

    sb, server = node
    peer = "peer" if sb.datapath == SYSTEM else "peer-host"
    hook = features.probe().best_hook
    [nic] = sb.add_vm("vmp", ["10.16.0.20"], namespace="prod")
    assert wait_for_ping(nic.vm_ns, SERVER_IP)
    sb.block_bridge_unicast(nic)
    proc = cli(sb, "attach", "vmp", "-n", "prod", *(() if mode == "auto" else ("--from-vm", mode)))
    assert proc.returncode == 0, proc.stderr
    [row] = rows(sb, "vmp", "prod")
    assert (row["from_vm"], row["hook"]) == (peer if mode == "auto" else "redirect", hook)
    rx = ovs_rx_packets(sb, nic.host_port)
    assert ping(nic.vm_ns, SERVER_IP, count=5) == (5, 5)
    assert ovs_rx_packets(sb, nic.host_port) >= rx + 5, "OVS received the echo requests on the pod's port"
    assert tcp_transfer(nic.vm_ns, server, SERVER_IP, 1 << 20) == 1 << 20
    assert rows(sb, "vmp", "prod")[0]["counters"]["redirected_packets"]["from_vm"] >= 5
    other = "redirect" if mode == "auto" else "peer"
    proc = cli(sb, "attach", "vmp", "-n", "prod", "--from-vm", other)
    assert proc.returncode == 0 and "refreshed" in proc.stdout, proc.stdout
    assert rows(sb, "vmp", "prod")[0]["from_vm"] == ("redirect" if other == "redirect" else peer)
    assert ping(nic.vm_ns, SERVER_IP, count=3) == (3, 3)


def test_frames_handed_over_by_peer_reach_ovs(node):
    """Frames for the host side's own MAC are the ones peer-host hands over by
    peer: OVS's packet socket still receives each of them on the pod's port."""
    from scapy.layers.inet import IP, UDP
    from scapy.layers.l2 import Ether

    from tests.conftest import send_frames

    sb, _ = node
    [nic] = sb.add_vm("vmq", ["10.16.0.21"], namespace="prod")
    assert wait_for_ping(nic.vm_ns, SERVER_IP)
    assert cli(sb, "attach", "vmq", "-n", "prod").returncode == 0
    host_mac = mac_of(sb.node, nic.host_port)
    frames = [bytes(Ether(src=nic.mac, dst=host_mac) / IP(src="10.16.0.21", dst=SERVER_IP) / UDP(dport=9000 + i))
              for i in range(20)]
    before = rows(sb, "vmq", "prod")[0]["counters"]["redirected_packets"]["from_vm"]
    rx = ovs_rx_packets(sb, nic.host_port)
    send_frames(nic.vm_ns, nic.vm_dev, frames)
    deadline = time.monotonic() + 2
    while ovs_rx_packets(sb, nic.host_port) < rx + 20 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert ovs_rx_packets(sb, nic.host_port) >= rx + 20
    assert rows(sb, "vmq", "prod")[0]["counters"]["redirected_packets"]["from_vm"] == before + 20
