"""A real guest (qemu, virtio-net) on tap0 of an emulated virt-launcher pod, with
Kube-OVN port data in a real OVS, and tcbypass attached the way a node does it.

    guest eth0 == tap0 --[ k6t-eth0 (DHCP server) ]-- eth0-nic <-veth-> br-int (OVS) <-veth-> web pod
"""

from __future__ import annotations

import subprocess
import time

import pytest

from tcbypass import health
from tcbypass_lab.dhcp import start_dhcp_server
from tcbypass_lab.guest import Guest
from tcbypass_lab.sandbox import sh
from tests.conftest import run_cli

pytestmark = pytest.mark.root

WEB_IP, WEB2_IP = "10.16.0.2", "10.17.0.2"


def env_of(sb) -> dict:
    return {"TCBYPASS_OVSDB": sb.ovsdb_url, "TCBYPASS_OVS_NETNS": sb.netns_path(sb.node)}


def counters(vm: str) -> dict:
    return {s.record.iface_id: s.counters for s in health.statuses("prod", vm)}


def report(capsys, text: str) -> None:
    with capsys.disabled():
        print(f"\n    [vm] {text}")


@pytest.fixture
def one_nic_vm(ovs_node, capsys):
    """A booted guest whose NIC got its address from the pod's DHCP server
    while tcbypass was already attached."""
    sb = ovs_node
    web = sb.add_server_pod("web", WEB_IP, namespace="prod")
    (nic,) = sb.add_vm("vm1", ["10.16.0.5"], namespace="prod", vm_link="tap")
    pod = sb.netns_path(nic.pod_ns)
    assert run_cli("attach", "vm1", "-n", "prod", env=env_of(sb)).returncode == 0
    with start_dhcp_server(pod, nic.bridge, mac=nic.mac, ip=nic.ip, prefix=nic.prefix), \
            Guest(pod, [(nic.tap, nic.mac)]) as guest:
        boot = guest.wait_ready(timeout=180)
        report(capsys, f"guest booted in {boot.seconds:.1f} s ({boot.accel})")
        yield sb, nic, guest, boot, web


def test_dhcp_keeps_working_with_the_bypass_attached(one_nic_vm):
    sb, nic, guest, boot, _ = one_nic_vm
    eth0 = boot.nic("eth0")
    assert (eth0.method, eth0.address, eth0.server) == ("dhcp", f"{nic.ip}/24", "169.254.75.10")
    # DISCOVER and REQUEST are broadcast: the program leaves them to the bridge, where the
    # server listens (unicast DHCP is left there too; tests/datapath proves that case).
    assert counters("vm1")["vm1.prod"].passed["multicast"] >= 2


def test_guest_traffic_takes_the_fast_path_when_the_bridge_cannot_forward(one_nic_vm, capsys):
    sb, nic, guest, _, web = one_nic_vm
    sb.block_bridge_unicast(nic)
    before = counters("vm1")["vm1.prod"]
    rc, out = guest.run(f"ping -c 20 -i 0.05 -W 3 {WEB_IP}", timeout=60)
    assert rc == 0 and "20 packets received" in out, out
    # A TCP transfer from the guest: 1 MiB to a listener in the server pod.
    listener = subprocess.Popen(["nsenter", f"--net=/var/run/netns/{web}", "--", "python3", "-c",
                                 "import socket\n"
                                 "s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\n"
                                 f"s.bind(('{WEB_IP}', 19800)); s.listen(1); s.settimeout(60)\n"
                                 "c, _ = s.accept(); c.settimeout(60); n = 0\n"
                                 "while True:\n    d = c.recv(65536)\n    if not d: break\n    n += len(d)\n"
                                 "print(n)\n"], stdout=subprocess.PIPE, text=True)
    try:
        time.sleep(0.5)
        rc, out = guest.run(f"dd if=/dev/zero bs=1024 count=1024 2>/dev/null | nc -w 10 {WEB_IP} 19800",
                            timeout=90)
        received = int(listener.communicate(timeout=60)[0].strip() or 0)
    finally:
        if listener.poll() is None:
            listener.kill()
    assert received == 1 << 20, out
    after = counters("vm1")["vm1.prod"]
    carried = {d: after.redirect_packets[d] - before.redirect_packets[d] for d in ("from_vm", "to_vm")}
    report(capsys, f"fast path carried {carried['from_vm']} packets from the guest and {carried['to_vm']} to it "
                   f"({(after.redirect_bytes['from_vm'] - before.redirect_bytes['from_vm']) / 1e6:.2f} MB out)")
    assert carried["from_vm"] >= 20 + (1 << 20) // 1500 and carried["to_vm"] >= 20


def test_detach_and_reattach_under_a_continuous_ping_lose_nothing(one_nic_vm, capsys):
    sb, nic, guest, _, _ = one_nic_vm
    count, interval = 300, 0.02
    rc, _ = guest.run(f"ping -c {count} -i {interval} -W 5 {WEB_IP} > /tmp/ping.out 2>&1 &", timeout=10)
    assert rc == 0
    for _ in range(3):
        time.sleep(0.6)
        assert run_cli("detach", "vm1", "-n", "prod").returncode == 0
        time.sleep(0.6)
        assert run_cli("attach", "vm1", "-n", "prod", env=env_of(sb)).returncode == 0
    time.sleep(count * interval + 3)
    rc, out = guest.run("cat /tmp/ping.out", timeout=10)
    summary = [line for line in out.splitlines() if "packets transmitted" in line]
    assert summary, out
    report(capsys, f"across 3 detach/re-attach cycles: {summary[0].strip()}")
    assert f"{count} packets transmitted, {count} packets received, 0% packet loss" in summary[0]


def test_guest_announcements_reach_ovs(one_nic_vm):
    """After a live migration QEMU announces the guest (RARP from its MAC); Kube-OVN
    relies on it. Broadcast, so it takes the bridge, and it must arrive at OVS."""
    sb, nic, guest, _, _ = one_nic_vm
    capture = subprocess.Popen(["nsenter", f"--net=/var/run/netns/{sb.node}", "--", "tcpdump", "-n", "-e", "-c",
                                "2", "-i", nic.host_port, "ether proto 0x8035 or arp"],
                               stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        time.sleep(1.0)
        guest.announce()
        rc, out = guest.run("arping -U -c 1 -I eth0 10.16.0.5", timeout=20)  # gratuitous ARP
        text = capture.communicate(timeout=20)[0]
    finally:
        if capture.poll() is None:
            capture.kill()
    assert nic.mac in text.lower() and "(0x8035)" in text and "(0x0806)" in text, text
    assert counters("vm1")["vm1.prod"].passed["multicast"] >= 1


def test_two_nics_are_both_bypassed(ovs_node):
    sb = ovs_node
    sb.add_server_pod("web", WEB_IP, namespace="prod")
    sb.add_server_pod("web2", WEB2_IP, namespace="prod")
    primary, secondary = sb.add_vm("vm2", ["10.16.0.6", "10.17.0.6"], namespace="prod", vm_link="tap",
                                   providers=("attachnet.prod.ovn",))
    pod = sb.netns_path(primary.pod_ns)
    proc = run_cli("attach", "vm2", "-n", "prod", env=env_of(sb))
    assert proc.returncode == 0 and proc.stdout.count("attached") == 2, proc.stdout + proc.stderr
    with start_dhcp_server(pod, primary.bridge, mac=primary.mac, ip=primary.ip), \
            start_dhcp_server(pod, secondary.bridge, mac=secondary.mac, ip=secondary.ip), \
            Guest(pod, [(primary.tap, primary.mac), (secondary.tap, secondary.mac)]) as guest:
        boot = guest.wait_ready(timeout=180)
        assert boot.nic("eth1").address == "10.17.0.6/24", boot.nics
        for nic in (primary, secondary):
            sb.block_bridge_unicast(nic)
        for dev, ip in (("eth0", WEB_IP), ("eth1", WEB2_IP)):
            rc, out = guest.run(f"ping -c 5 -i 0.05 -W 3 -I {dev} {ip}", timeout=60)
            assert rc == 0 and "5 packets received" in out, out
    c = counters("vm2")
    assert c["vm2.prod"].redirect_packets["from_vm"] >= 5
    assert c["vm2.prod.attachnet.prod.ovn"].redirect_packets["from_vm"] >= 5
    assert sh("ip", "netns", "list").returncode == 0
