"""Every KubeVirt binding, wired the way KubeVirt and Kube-OVN wire it (lab/tcbypass_lab/wirings.py),
against a real OVS: `attach` names the binding and why in one line, with the exit code a node
hook needs, attaches nothing and leaves nothing behind; `status --all` shows one row per VM port."""

from __future__ import annotations

import json
import os

import pytest

from tcbypass import attachments
from tcbypass_lab import wirings
from tcbypass_lab.wirings import VmPod
from tcbypass.model import pin_id
from tests.conftest import pins, run_cli, tc_state

NS = "prod"


def env_of(sb) -> dict:
    return {"TCBYPASS_OVSDB": sb.ovsdb_url, "TCBYPASS_OVS_NETNS": sb.netns_path(sb.node)}


def footprint(sb, pod: VmPod) -> dict:
    """What an attach could have touched: devices and their tc state in the pod (for the direct tap, the
    tap in the node namespace), our pins and lock files for the VMI."""
    devices = [pod.tap] if pod.pod_ns == sb.node else pod.devices()
    locks = sorted(f for f in os.listdir(attachments.LOCK_DIR) if f.startswith(pin_id(pod.iface_id))) \
        if os.path.isdir(attachments.LOCK_DIR) else []
    return {"devices": devices, "tc": {dev: tc_state(pod.pod_ns, dev) for dev in devices},
            "pins": pins(pod.vmi), "locks": locks}


def attach(sb, pod: VmPod):
    before = footprint(sb, pod)
    proc = run_cli("attach", pod.vmi, "-n", NS, env=env_of(sb))
    after = footprint(sb, pod)
    assert after == before, "attach changed something on a port it did not bypass"
    assert not after["pins"] and not after["locks"]
    return proc


def answer(proc, code: int) -> str:
    """The one line attach printed (stdout on success, stderr on failure)."""
    assert proc.returncode == code, (proc.returncode, proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr
    out, other = (proc.stdout, proc.stderr) if code == 0 else (proc.stderr, proc.stdout)
    lines = out.strip().splitlines()
    assert len(lines) == 1 and not other.strip(), (proc.stdout, proc.stderr)
    return lines[0]


# --- attach on each binding -------------------------------------------------------------------

def test_masquerade_with_virt_handlers_nat_rules(ovs_node):
    pod = wirings.masquerade_vm(ovs_node, "vmm", "10.16.0.21", "fd00:10:16::21", NS)
    assert answer(attach(ovs_node, pod), 0) == (
        "prod/vmm vmm.prod: masquerade binding, not bypassable: tap0 sits on k6t-eth0, which routes 10.0.2.1/24 "
        "and fd10:0:2::1/120, and nftables NAT joins k6t-eth0 to eth0 (ip nat and ip6 nat: prerouting sends eth0 "
        "to KUBEVIRT_PREINBOUND; dnat, masquerade, snat); an L2 redirect would skip the NAT; nothing to do")


def test_passt_with_no_bridge_and_no_tap(ovs_node):
    pod = wirings.passt_vm(ovs_node, "vmp", "10.16.0.22", NS)
    devices = {d for d in pod.devices() if d != "lo"}
    assert devices == {"eth0"}, "passt: the pod has its NIC and nothing else"
    assert answer(attach(ovs_node, pod), 0) == (
        "prod/vmp vmp.prod: passt binding, not bypassable: no bridge and no tap, and KubeVirt's passt sysctls are "
        "set (ping_group_range 107 107, ip_unprivileged_port_start 0): "
        f"passt (pid {pod.pid('passt')}) carries the VM's traffic on the pod's own sockets over eth0; nothing to do")


def test_slirp_is_a_qemu_with_its_own_user_network(ovs_node):
    pod = wirings.slirp_vm(ovs_node, "vmu", "10.16.0.29", NS)
    assert answer(attach(ovs_node, pod), 0) == (
        "prod/vmu vmu.prod: slirp binding, not bypassable: no bridge and no tap: QEMU's own user-mode network "
        f"(pid {pod.pid('qemu')}) carries the VM's traffic on the pod's own sockets over eth0; nothing to do")


def test_macvtap_on_the_pod_nic(ovs_node):
    # This kernel has macvtap (CONFIG_MACVTAP=y): the real device, no stand-in.
    pod = wirings.macvtap_vm(ovs_node, "vmv", "10.16.0.23", NS)
    assert answer(attach(ovs_node, pod), 0) == (
        "prod/vmv vmv.prod: macvtap binding, not bypassable: macvtap0 is a macvtap (bridge mode) on eth0: "
        "the VM's frames enter eth0 without a bridge; nothing to do")


def test_sriov_stand_in_with_a_pod_nic_that_is_no_veth(ovs_node):
    pod = wirings.sriov_vm(ovs_node, "vms", "10.16.0.24", NS)
    assert answer(attach(ovs_node, pod), 0) == (
        f"prod/vms vms.prod: sriov binding, not bypassable: OVS port {pod.host_port} is a macvlan device, not a veth "
        "into the pod, and the pod's address is on eth0, a macvlan device and not a veth: the VF; "
        "the VM's frames never cross a pod bridge; nothing to do")


def test_kubeovn_tap_straight_in_ovs_is_already_direct(ovs_node):
    pod = wirings.kubeovn_tap_vm(ovs_node, "vmd", "10.16.0.25", NS)
    assert pod.host_port in ovs_node.vsctl("list-ports", ovs_node.bridge).split()
    assert answer(attach(ovs_node, pod), 0) == (
        f"prod/vmd vmd.prod: kube-ovn-direct binding, already direct: the VM's tap {pod.host_port} is itself the "
        "OVS port, with no pod bridge in between; nothing to do")


def test_pod_still_being_plugged_fails_and_says_to_come_back(ovs_node):
    pod = wirings.pending_vm(ovs_node, "vmw", "10.16.0.26", NS)
    assert answer(attach(ovs_node, pod), 1) == (
        "error: VMI prod/vmw has no bypassable NIC (vmw.prod: no binding yet, the pod is still being plugged: eth0 "
        "carries the pod's network and nothing of the VM is attached to it yet "
        f"(seen: virt-launcher, pid {pod.pid('virt-launcher')})); attach again once virt-handler has plugged the "
        "pod (the agent does so by itself)")


def test_bridge_with_two_taps_is_refused(ovs_node):
    pod = wirings.bridge_vm_with_two_taps(ovs_node, "vm2", "10.16.0.27", NS)
    assert answer(attach(ovs_node, pod), 1) == (
        "error: VMI prod/vm2 has no bypassable NIC (vm2.prod: bridge binding, not bypassable: bridge k6t-eth0 has "
        "2 ports besides eth0-nic (tap0, tap1); expected exactly one tap); tcbypass bypasses the bridge of "
        "KubeVirt's bridge and managedTap bindings only")


@pytest.mark.parametrize("managed_tap", [False, True], ids=["bridge", "managedTap"])
def test_bridge_and_managed_tap_are_attached(ovs_node, managed_tap):
    wirings.bridge_vm(ovs_node, "vmb", "10.16.0.28", NS, managed_tap=managed_tap)
    proc = run_cli("attach", "vmb", "-n", NS, env=env_of(ovs_node))
    assert proc.returncode == 0 and "vmb.prod: attached (tap0 <-> eth0-nic" in proc.stdout, proc.stderr
    [row] = rows_of(ovs_node)
    expected = "managedTap" if managed_tap else "bridge"
    assert (row["binding"], row["state"], row["reason"]) == (expected, "active", "fast path live (tap0 <-> eth0-nic)")
    assert pins("vmb")


# --- the node-wide view ----------------------------------------------------------------------------

def rows_of(sb, *args) -> list[dict]:
    proc = run_cli("status", "--all", "--json", *args, env=env_of(sb))
    assert proc.returncode in (0, 3), proc.stderr
    return [row for row in json.loads(proc.stdout) if f"/tcb{sb.tag}-" in row["netns"]]


def test_status_all_shows_one_row_for_a_vm_of_each_binding(ovs_node, capsys):
    sb = ovs_node
    sb.add_server_pod("web", "10.16.0.2", namespace=NS)  # an ordinary pod: no row
    built = [
        wirings.bridge_vm(sb, "vm-bridge", "10.16.0.31", NS),
        wirings.bridge_vm(sb, "vm-managedtap", "10.16.0.32", NS, managed_tap=True),
        wirings.masquerade_vm(sb, "vm-masquerade", "10.16.0.33", "fd00:10:16::33", NS),
        wirings.passt_vm(sb, "vm-passt", "10.16.0.34", NS),
        wirings.slirp_vm(sb, "vm-slirp", "10.16.0.40", NS),
        wirings.macvtap_vm(sb, "vm-macvtap", "10.16.0.35", NS),
        wirings.sriov_vm(sb, "vm-sriov", "10.16.0.36", NS),
        wirings.kubeovn_tap_vm(sb, "vm-direct", "10.16.0.37", NS),
        wirings.pending_vm(sb, "vm-pending", "10.16.0.38", NS),
        wirings.bridge_vm(sb, "vm-idle", "10.16.0.39", NS),
    ]
    for vmi in ("vm-bridge", "vm-managedtap"):
        assert run_cli("attach", vmi, "-n", NS, env=env_of(sb)).returncode == 0
    rows = {row["vmi"]: row for row in rows_of(sb)}
    assert {vmi: (r["binding"], r["state"]) for vmi, r in rows.items()} == {
        "vm-bridge": ("bridge", "active"),
        "vm-managedtap": ("managedTap", "active"),
        "vm-masquerade": ("masquerade", "not bypassable"),
        "vm-passt": ("passt", "not bypassable"),
        "vm-slirp": ("slirp", "not bypassable"),
        "vm-macvtap": ("macvtap", "not bypassable"),
        "vm-sriov": ("sriov", "not bypassable"),
        "vm-direct": ("kube-ovn-direct", "not bypassable"),
        "vm-pending": ("pending", "not attached"),
        "vm-idle": ("bridge", "not attached"),
    }
    assert rows["vm-direct"]["reason"].startswith("already direct: ")
    assert rows["vm-idle"]["reason"].endswith("attach with: tcbypass attach vm-idle -n prod")
    for pod in built:
        assert rows[pod.vmi]["port"] == pod.host_port and rows[pod.vmi]["netns"] == sb.netns_path(pod.pod_ns)

    table = run_cli("status", "--all", env=env_of(sb))
    assert table.returncode == 3, "bypassable or plugging ports that are not attached make the node degraded"
    for vmi, row in rows.items():
        assert f"{NS}/{vmi}" in table.stdout and row["binding"] in table.stdout
    assert run_cli("status", "--all", "-n", "elsewhere", "--json", env=env_of(sb)).stdout.strip() == "[]"
    with capsys.disabled():
        print("\n" + table.stdout)
