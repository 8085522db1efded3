"""A real qemu guest in an emulated virt-launcher pod: it leases the VM's
address from the pod's DHCP server on k6t-eth0 and reaches a server pod
through tap0, the pod bridge, the Kube-OVN veth and the private OVS.

    guest eth0 -- tap0 --[ k6t-eth0 (udhcpd) ]-- eth0-nic <-veth-> br-int (OVS) <-veth-> web pod

One boot serves every test in the module (about 6-15 s under TCG).
"""

from __future__ import annotations

import pytest

from tcbypass_lab.dhcp import start_dhcp_server
from tcbypass_lab.guest import Guest
from tcbypass_lab.sandbox import Sandbox

pytestmark = pytest.mark.root

WEB_IP = "10.16.0.2"
VM_IP = "10.16.0.5"
POD_DHCP_SERVER = "169.254.75.10"  # k6t-eth0's link-local address in a KubeVirt pod


@pytest.fixture(scope="module")
def booted():
    with Sandbox(ovs=True) as sb:
        sb.add_server_pod("web", WEB_IP)
        (nic,) = sb.add_vm("vm1", [VM_IP], vm_link="tap")
        pod = sb.netns_path(nic.pod_ns)
        with start_dhcp_server(pod, nic.bridge, mac=nic.mac, ip=nic.ip, prefix=nic.prefix) as dhcp, \
                Guest(pod, [(nic.tap, nic.mac)]) as guest:
            boot = guest.wait_ready(timeout=120)
            yield guest, boot, dhcp


def test_guest_leases_the_vm_ip_from_the_pod_dhcp_server(booted, capsys):
    guest, boot, dhcp = booted
    with capsys.disabled():
        print(f"\nguest booted in {boot.seconds:.1f} s ({boot.accel}): {boot.nics}")
    eth0 = boot.nic("eth0")
    assert (eth0.method, eth0.address, eth0.server) == ("dhcp", f"{VM_IP}/24", POD_DHCP_SERVER), dhcp.log()
    rc, out = guest.run("ip -4 -o addr show dev eth0", timeout=10)
    assert rc == 0 and f"inet {VM_IP}/24" in out, out


def test_guest_pings_the_server_pod_through_the_bridge_and_ovs(booted):
    guest, _, _ = booted
    rc, out = guest.run(f"ping -c 3 -W 3 {WEB_IP}", timeout=30)
    assert rc == 0, out
    assert "3 packets received" in out, out
