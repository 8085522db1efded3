"""Discovery's pure planning: Kube-OVN rows + the pod's device table -> what to attach, or why not."""

from __future__ import annotations

from tcbypass import bindings
from tcbypass.discovery import dummy_name, plan_nic
from tcbypass.netdev import Link
from tcbypass.ovsdb import Port
from tcbypass.podnet import PodNet

VM_MAC = "0a:00:00:00:00:05"


def port(ifindex=7, **ids) -> Port:
    external = {"vendor": "kube-ovn", "iface-id": "vm1.prod", "pod_name": "vm1", "pod_namespace": "prod",
                "pod_netns": "/var/run/netns/pod1", **ids}
    return Port(name="0123456789ab_h", iface_id=external["iface-id"], pod_name="vm1", pod_namespace="prod",
                pod_netns=external["pod_netns"], ip="10.16.0.5", ifindex=ifindex, ofport=3, external_ids=external)


HOST = Link(index=7, name="0123456789ab_h", kind="veth", mac="0a:aa:00:00:00:07", master=0, peer=3, up=True)


def pod(*extra: Link, nic_master=4, nic_kind="veth", tap_kind="tun", bridge_name="k6t-eth0", dummy=True):
    links = [
        Link(1, "lo", "", "00:00:00:00:00:00", 0, 0, True),
        Link(3, "eth0-nic", nic_kind, "0a:bb:00:00:00:03", nic_master, 7, True),
        Link(4, bridge_name, "bridge", "0a:bb:00:00:00:03", 0, 0, True),
        Link(5, "tap0", tap_kind, "fe:00:00:00:00:05", 4, 0, True),
    ]
    if dummy:
        links.append(Link(6, "eth0", "dummy", VM_MAC, 0, 0, True))
    return PodNet("/var/run/netns/pod1", {link.name: link for link in links + list(extra)})


def of(links: dict) -> PodNet:
    return PodNet("/var/run/netns/pod1", links)


def test_primary_nic_plans_tap0_eth0_nic_with_the_dummy_mac():
    plan = plan_nic(port(), HOST, pod())
    assert plan.ok, plan.reason
    s = plan.spec
    assert (s.name, s.netns, s.tap, s.nic, s.mac) == ("vm1.prod", "/var/run/netns/pod1", "tap0", "eth0-nic", VM_MAC)
    assert (s.vmi, s.namespace, s.iface_id, s.dhcp_to_bridge) == ("vm1", "prod", "vm1.prod", True)


def test_attached_mac_in_ovsdb_wins_over_the_dummy():
    plan = plan_nic(port(**{"attached-mac": "0a:00:00:00:00:99"}), HOST, pod())
    assert plan.spec.mac == "0a:00:00:00:00:99"


def test_secondary_nic_names_follow_kubevirt_hashing():
    assert dummy_name("eth0-nic") == "eth0"
    assert dummy_name("16477688c0e-nic") == "pod16477688c0e"
    links = {
        "16477688c0e-nic": Link(3, "16477688c0e-nic", "veth", "0a:bb:00:00:00:03", 4, 7, True),
        "k6t-16477688c0e": Link(4, "k6t-16477688c0e", "bridge", "0a:bb:00:00:00:03", 0, 0, True),
        "tap16477688c0e": Link(5, "tap16477688c0e", "tun", "fe:00:00:00:00:05", 4, 0, True),
        "pod16477688c0e": Link(6, "pod16477688c0e", "dummy", VM_MAC, 0, 0, True),
    }
    plan = plan_nic(port(**{"iface-id": "vm1.prod.attachnet.prod.ovn"}), HOST, of(links))
    assert plan.ok, plan.reason
    assert (plan.spec.tap, plan.spec.nic, plan.spec.name) == ("tap16477688c0e", "16477688c0e-nic",
                                                              "vm1.prod.attachnet.prod.ovn")


def test_the_nic_is_found_by_the_host_ports_peer_not_by_name():
    # A decoy veth whose peer ifindex collides with the host port's ifindex in another namespace.
    decoy = Link(9, "eth0-nic-decoy", "veth", "0a:cc:00:00:00:09", 0, 7, True)
    plan = plan_nic(port(), HOST, pod(decoy))
    assert plan.spec.nic == "eth0-nic"


def test_a_pod_nic_off_the_bridge_is_not_bypassable():
    plan = plan_nic(port(), HOST, pod(nic_master=0))
    assert not plan.ok and not plan.healthy
    assert plan.recognition.binding == bindings.PENDING
    assert "nothing of the VM is attached to it yet (seen: bridge k6t-eth0)" in plan.reason


def test_a_bridge_that_is_not_kubevirts_is_not_bypassable():
    assert "not of a KubeVirt bridge" in plan_nic(port(), HOST, pod(bridge_name="br0")).reason


def test_two_taps_on_one_bridge_is_not_bypassable():
    extra = Link(8, "tap1", "tun", "fe:00:00:00:00:08", 4, 0, True)
    plan = plan_nic(port(), HOST, pod(extra))
    assert not plan.ok and "expected exactly one tap" in plan.reason and "tap1" in plan.reason


def test_a_pod_nic_that_is_not_a_veth_is_not_bypassable():
    assert "not a veth" in plan_nic(port(), HOST, pod(nic_kind="macvlan")).reason


def test_a_bridge_port_that_is_not_a_tap_is_not_bypassable():
    assert "not a tap" in plan_nic(port(), HOST, pod(tap_kind="vxlan")).reason


def test_no_mac_source_is_not_bypassable():
    plan = plan_nic(port(), HOST, pod(dummy=False))
    assert "cannot tell the VM's MAC" in plan.reason and not plan.healthy


def test_port_not_yet_resolved_by_ovs_says_retry():
    assert "try again" in plan_nic(port(ifindex=None), HOST, pod()).reason


def test_port_missing_where_ovs_runs():
    assert "not on this node" in plan_nic(port(), None, pod()).reason


def test_bridge_without_tap_yet():
    links = dict(pod().links)
    del links["tap0"]
    assert "no tap yet" in plan_nic(port(), HOST, of(links)).reason


def test_dhcp_passthrough_flag_is_carried():
    assert plan_nic(port(), HOST, pod(), dhcp_to_bridge=False).spec.dhcp_to_bridge is False
