"""Binding recognition on pods recorded from the lab (one VM of each binding, read back
from the kernel), and on variations of them that a real node can show."""

from __future__ import annotations

import dataclasses

import pytest

from tcbypass import bindings as b
from tcbypass.bindings import needs_deep, recognise
from tcbypass.podnet import Process
from tests.unit.snapshots import load, shallow

PODS = load()


def pid(name: str, comm: str) -> int:
    """The pid recorded for a process in the pod (virt-launcher, passt)."""
    return next(p.pid for p in PODS[name][2].processes if p.comm.startswith(comm))


def rec(name: str, **changes):
    port, host, pod = PODS[name]
    return recognise(port, host, dataclasses.replace(pod, **changes) if changes else pod)


def test_bridge_binding_is_bypassable_and_names_the_dhcp_address():
    r = rec("vm-bridge")
    assert (r.binding, r.outcome, r.tap, r.nic, r.bridge) == (b.BRIDGE, b.BYPASSABLE, "tap0", "eth0-nic", "k6t-eth0")
    assert r.reason == ("tap0 and eth0-nic are the ports of k6t-eth0; virt-launcher's DHCP server answers on "
                        "k6t-eth0 (169.254.75.10/32)")


def test_managed_tap_is_a_bridge_without_the_dhcp_address():
    r = rec("vm-mtap")
    assert (r.binding, r.outcome) == (b.MANAGED_TAP, b.BYPASSABLE)
    assert r.reason == ("tap0 and eth0-nic are the ports of k6t-eth0; k6t-eth0 has no address although the pod "
                        "has 10.16.0.12: OVN answers DHCP and RA")


def test_bridge_wiring_needs_no_deep_read():
    for name in ("vm-bridge", "vm-mtap", "vm-2taps", "vm-direct", "vm-mvtap"):
        port, host, pod = PODS[name]
        assert recognise(port, host, shallow(pod)) == recognise(port, host, pod), name
        assert not needs_deep(recognise(port, host, shallow(pod)), shallow(pod)), name


def test_masquerade_from_the_nat_rules_virt_handler_writes():
    r = rec("vm-masq")
    assert (r.binding, r.outcome, r.nic, r.tap, r.bridge) == (b.MASQUERADE, b.BY_DESIGN, "eth0", "tap0", "k6t-eth0")
    assert r.reason == ("tap0 sits on k6t-eth0, which routes 10.0.2.1/24 and fd10:0:2::1/120, and nftables NAT "
                        "joins k6t-eth0 to eth0 (ip nat and ip6 nat: prerouting sends eth0 to KUBEVIRT_PREINBOUND; "
                        "dnat, masquerade, snat); an L2 redirect would skip the NAT")
    assert r.line().startswith("masquerade binding, not bypassable: tap0 sits on k6t-eth0")
    assert r.line().endswith("; nothing to do")


def test_masquerade_is_only_seen_on_a_deep_read():
    port, host, pod = PODS["vm-masq"]
    first = recognise(port, host, shallow(pod))
    assert first.binding == b.PENDING and needs_deep(first, shallow(pod))


def test_masquerade_bridge_without_nat_rules_yet_is_still_being_plugged():
    r = rec("vm-masq", nat_rules=())
    assert (r.binding, r.outcome) == (b.PENDING, b.NOT_READY)
    assert f"(seen: virt-launcher, pid {pid('vm-masq', 'virt-launcher')})" in r.reason


def test_nat_rules_for_another_interface_are_not_masquerade():
    _, _, pod = PODS["vm-masq"]
    elsewhere = tuple(dataclasses.replace(r, iifname="net1") if r.iifname else r for r in pod.nat_rules)
    assert rec("vm-masq", nat_rules=elsewhere).binding == b.PENDING


def test_passt_by_its_process_and_kubevirts_sysctls():
    r = rec("vm-passt")
    assert (r.binding, r.outcome, r.nic) == (b.PASST, b.BY_DESIGN, "eth0")
    assert r.reason == ("no bridge and no tap, and KubeVirt's passt sysctls are set (ping_group_range 107 107, "
                        f"ip_unprivileged_port_start 0): passt (pid {pid('vm-passt', 'passt')}) carries the VM's "
                        "traffic on the pod's own sockets over eth0")


def test_passt_by_the_sysctls_alone_before_passt_runs():
    _, _, pod = PODS["vm-passt"]
    launcher_only = tuple(p for p in pod.processes if p.comm == "virt-launcher")
    r = rec("vm-passt", processes=launcher_only)
    assert r.binding == b.PASST and "passt carries the VM's traffic" in r.reason


def test_passt_by_the_process_alone_where_sysctls_are_default():
    r = rec("vm-passt", sysctls={"net/ipv4/ping_group_range": "1 0", "net/ipv4/ip_unprivileged_port_start": "1024"})
    assert r.binding == b.PASST and r.reason.startswith(f"no bridge and no tap: passt (pid {pid('vm-passt', 'passt')})")


def test_slirp_is_a_qemu_with_a_user_netdev():
    r = rec("vm-slirp")
    assert (r.binding, r.outcome, r.nic) == (b.SLIRP, b.BY_DESIGN, "eth0")
    assert r.reason == (f"no bridge and no tap: QEMU's own user-mode network (pid {pid('vm-slirp', 'qemu')}) "
                        "carries the VM's traffic on the pod's own sockets over eth0")


def test_slirp_in_the_older_netdev_syntax():
    _, _, pod = PODS["vm-pending"]
    qemu = Process(4242, "qemu-kvm", ("/usr/libexec/qemu-kvm", "-netdev", "user,id=hostua-default"))
    assert rec("vm-pending", processes=pod.processes + (qemu,)).binding == b.SLIRP


def test_a_qemu_on_a_tap_is_not_slirp():
    _, _, pod = PODS["vm-pending"]
    qemu = Process(4242, "qemu-kvm", ("/usr/libexec/qemu-kvm", "-netdev", '{"type":"tap","fd":"25"}'))
    assert rec("vm-pending", processes=pod.processes + (qemu,)).binding == b.PENDING


def test_macvtap_on_the_pod_nic():
    r = rec("vm-mvtap")
    assert (r.binding, r.outcome, r.nic, r.tap) == (b.MACVTAP, b.BY_DESIGN, "eth0", "macvtap0")
    assert r.reason == "macvtap0 is a macvtap (bridge mode) on eth0: the VM's frames enter eth0 without a bridge"


def test_sriov_stand_in_port_and_pod_nic_are_not_veths():
    r = rec("vm-sriov")
    port, _, _ = PODS["vm-sriov"]
    assert (r.binding, r.outcome, r.nic) == (b.SRIOV, b.BY_DESIGN, "eth0")
    assert r.reason == (f"OVS port {port.name} is a macvlan device, not a veth into the pod, and the pod's address "
                        "is on eth0, a macvlan device and not a veth: the VF; the VM's frames never cross a pod bridge")


def test_sriov_representor_with_the_vf_passed_to_the_vm():
    port, host, pod = PODS["vm-sriov"]
    representor = dataclasses.replace(host, kind="", peer=0, phys_port_name="pf0vf3", phys_switch_id="3c1f2e")
    vfio = dataclasses.replace(pod, links={k: v for k, v in pod.links.items() if k != "eth0"},
                               addresses=tuple(a for a in pod.addresses if a.index != pod.links["eth0"].index))
    r = recognise(port, representor, vfio)
    assert (r.binding, r.outcome) == (b.SRIOV, b.BY_DESIGN)
    assert r.reason == (f"OVS port {port.name} is the VF representor pf0vf3, not a veth into the pod, and no device "
                        "in the pod holds 10.16.0.16: the VF belongs to the VM (vfio); the VM's frames never cross "
                        "a pod bridge")


def test_a_non_veth_port_whose_pod_address_sits_on_a_veth_is_not_sriov():
    port, host, pod = PODS["vm-sriov"]
    veth = dataclasses.replace(pod.links["eth0"], kind="veth")
    r = recognise(port, host, dataclasses.replace(pod, links={**pod.links, "eth0": veth}))
    assert (r.binding, r.outcome) == (b.UNKNOWN, b.UNEXPECTED) and "not plugged into it" in r.reason


def test_an_sriov_pod_without_virt_launcher_is_not_a_vm():
    _, _, pod = PODS["vm-sriov"]
    assert rec("vm-sriov", processes=()).binding == b.NOT_A_VM
    assert rec("vm-sriov", processes=pod.processes).binding == b.SRIOV


def test_kubeovn_tap_straight_in_ovs_is_already_direct():
    r = rec("vm-direct")
    port, _, _ = PODS["vm-direct"]
    assert (r.binding, r.outcome, r.verdict) == (b.KUBEOVN_DIRECT, b.BY_DESIGN, "already direct")
    assert r.reason == f"the VM's tap {port.name} is itself the OVS port, with no pod bridge in between"
    assert r.summary == f"already direct: {r.reason}"
    assert r.line() == f"kube-ovn-direct binding, already direct: {r.reason}; nothing to do"


def test_vhost_user_port_is_already_direct_without_a_kernel_device():
    port, _, pod = PODS["vm-direct"]
    vhost = dataclasses.replace(port, type="dpdkvhostuserclient", ifindex=None)
    r = recognise(vhost, None, pod)
    assert (r.binding, r.verdict) == (b.KUBEOVN_DIRECT, "already direct")
    assert r.reason == (f"the VM's NIC is the vhost-user port {port.name} of OVS (dpdkvhostuserclient), "
                        "with no pod bridge in between")


def test_ovs_port_types_kube_ovn_never_gives_a_pod_are_not_taken_for_sriov():
    port, host, pod = PODS["vm-sriov"]
    r = recognise(dataclasses.replace(port, type="patch"), dataclasses.replace(host, kind="openvswitch"), pod)
    assert (r.binding, r.outcome) == (b.UNKNOWN, b.UNEXPECTED)
    assert r.reason == f"port {port.name} is an OVS patch port, not a pod's device"


def internal_port_pod(kind: str = "openvswitch", name: str = "eth0-nic"):
    """vm-bridge as Kube-OVN's internal-port type leaves it: the pod NIC is the OVS
    internal port itself (an "openvswitch" device, or a tap on the userspace datapath),
    the row of type internal named <id>_c, and no host side."""
    port, _host, pod = PODS["vm-bridge"]
    links = dict(pod.links)
    nic = links.pop("eth0-nic")
    links[name] = dataclasses.replace(nic, name=name, kind=kind, peer=0, peer_netnsid=None,
                                      tun_type="tap" if kind == "tun" else "")
    return dataclasses.replace(port, type="internal", name="abcdef123456_c", ifindex=0), \
        dataclasses.replace(pod, links=links)


@pytest.mark.parametrize("kind", ["openvswitch", "tun"], ids=["kernel-datapath", "userspace-datapath"])
def test_an_internal_port_pod_nic_on_the_kubevirt_bridge_is_bypassable(kind):
    port, pod = internal_port_pod(kind)
    r = recognise(port, None, pod)
    assert (r.binding, r.outcome, r.nic, r.tap, r.bridge) == (b.BRIDGE, b.BYPASSABLE, "eth0-nic", "tap0", "k6t-eth0")
    assert r.reason.endswith("the pod NIC eth0-nic is Kube-OVN's OVS internal port abcdef123456_c (no veth)")


def test_an_internal_port_not_moved_into_the_pod_yet_is_not_ready():
    port, pod = internal_port_pod()
    pod = dataclasses.replace(pod, links={k: v for k, v in pod.links.items() if k != "eth0-nic"})
    r = recognise(port, None, pod)
    assert (r.binding, r.outcome) == (b.UNKNOWN, b.NOT_READY)


def test_two_internal_ports_in_one_pod_cannot_be_told_apart():
    port, pod = internal_port_pod()
    extra = dataclasses.replace(pod.links["eth0-nic"], name="net1", index=99, master=0)
    r = recognise(port, None, dataclasses.replace(pod, links={**pod.links, "net1": extra}))
    assert (r.binding, r.outcome) == (b.UNKNOWN, b.UNEXPECTED)
    assert "cannot tell which one is abcdef123456_c" in r.reason


def test_a_dpdk_representor_is_sriov():
    port, _, pod = PODS["vm-sriov"]
    r = recognise(dataclasses.replace(port, type="dpdk", ifindex=None), None, pod)
    assert (r.binding, r.outcome) == (b.SRIOV, b.BY_DESIGN)


def test_a_port_ovs_has_not_resolved_is_not_ready_and_needs_no_deep_read():
    port, host, pod = PODS["vm-bridge"]
    r = recognise(dataclasses.replace(port, ifindex=None), host, shallow(pod))
    assert (r.binding, r.outcome) == (b.UNKNOWN, b.NOT_READY) and "try again" in r.reason
    assert not needs_deep(r, shallow(pod))


def test_a_tun_mode_device_in_ovs_is_not_a_vm_tap():
    port, host, pod = PODS["vm-direct"]
    r = recognise(port, dataclasses.replace(host, tun_type="tun"), pod)
    assert (r.binding, r.outcome) == (b.UNKNOWN, b.UNEXPECTED)


def test_pod_still_being_plugged():
    r = rec("vm-pending")
    assert (r.binding, r.outcome, r.nic) == (b.PENDING, b.NOT_READY, "eth0")
    assert r.reason == ("eth0 carries the pod's network and nothing of the VM is attached to it yet "
                        f"(seen: virt-launcher, pid {pid('vm-pending', 'virt-launcher')})")
    assert r.line() == f"no binding yet, the pod is still being plugged: {r.reason}"
    assert r.summary == f"still being plugged: {r.reason}"


def test_an_ordinary_pod_is_not_a_vm():
    r = rec("web")
    assert (r.binding, r.outcome) == (b.NOT_A_VM, b.UNEXPECTED)
    assert r.line() == ("not a VM: eth0 carries the pod's own network and nothing of KubeVirt's is in the pod "
                        "(no k6t bridge, tap, NAT rules, passt or virt-launcher)")


def test_bridge_with_two_taps_is_refused():
    r = rec("vm-2taps")
    assert (r.binding, r.outcome) == (b.BRIDGE, b.UNEXPECTED)
    assert r.reason == "bridge k6t-eth0 has 2 ports besides eth0-nic (tap0, tap1); expected exactly one tap"
    assert r.line() == f"bridge binding, not bypassable: {r.reason}"


def test_bridge_without_its_tap_yet_is_not_ready():
    port, host, pod = PODS["vm-bridge"]
    r = recognise(port, host, dataclasses.replace(pod, links={k: v for k, v in pod.links.items() if k != "tap0"}))
    assert (r.binding, r.outcome) == (b.BRIDGE, b.NOT_READY)
    assert r.reason == "bridge k6t-eth0 has no tap yet (VM not started?)"


def test_a_macvtap_whose_lower_device_is_elsewhere_does_not_count():
    port, host, pod = PODS["vm-mvtap"]
    moved = dataclasses.replace(pod.links["macvtap0"], peer_netnsid=0)
    r = recognise(port, host, dataclasses.replace(pod, links={**pod.links, "macvtap0": moved}))
    assert r.binding == b.PENDING


@pytest.mark.parametrize("name, binding", [
    ("vm-bridge", b.BRIDGE), ("vm-mtap", b.MANAGED_TAP), ("vm-masq", b.MASQUERADE), ("vm-passt", b.PASST),
    ("vm-slirp", b.SLIRP),
    ("vm-mvtap", b.MACVTAP), ("vm-sriov", b.SRIOV), ("vm-direct", b.KUBEOVN_DIRECT), ("vm-pending", b.PENDING),
    ("vm-2taps", b.BRIDGE), ("web", b.NOT_A_VM),
])
def test_recognition_does_not_depend_on_device_names(name, binding):
    """Rename every device in the pod (and in the NAT rules) but KubeVirt's k6t-* bridges, whose
    prefix is KubeVirt's contract: the answer must not change."""
    port, host, pod = PODS[name]
    rename = {n: f"x{i}" for i, n in enumerate(sorted(pod.links)) if n != "lo" and not n.startswith("k6t-")}
    links = {rename.get(n, n): dataclasses.replace(link, name=rename.get(n, n)) for n, link in pod.links.items()}
    rules = None if pod.nat_rules is None else tuple(
        dataclasses.replace(r, iifname=rename.get(r.iifname, r.iifname), oifname=rename.get(r.oifname, r.oifname))
        for r in pod.nat_rules)
    got = recognise(port, host, dataclasses.replace(pod, links=links, nat_rules=rules))
    assert got.binding == binding, got


def test_the_binding_list_covers_every_answer_but_not_a_vm():
    seen = {rec(name).binding for name in PODS}
    assert seen - {b.NOT_A_VM} <= set(b.BINDINGS)
    assert b.NOT_A_VM not in b.BINDINGS
