"""Virt-launcher pods wired the way each KubeVirt binding wires them, on a Sandbox.

Each builder does, with the same tools, what Kube-OVN's CNI and KubeVirt's
virt-handler do on a node (KubeVirt pkg/network/setup/netpod and
netpod/masquerade, cmd/cniplugins/passt-binding; Kube-OVN pkg/daemon/ovs_linux.go):

  bridge, managedTap  Sandbox.add_vm (a real tap with vm_link="tap")
  masquerade          k6t-eth0 routing 10.0.2.1/24 and fd10:0:2::1/120 with MAC
                      02:00:00:00:00:00, tap0 on it, the pod's eth0 left alone, and
                      the nftables NAT rules virt-handler writes with `nft`
  passt               the pod's eth0 left alone, the two sysctls KubeVirt sets for
                      passt, and a real passt process in the pod
  slirp               the pod's eth0 left alone and a real QEMU in the pod with a
                      user-mode netdev, as libvirt passed it (KubeVirt dropped slirp in 1.3)
  macvtap             a macvtap device on the pod's eth0
  sriov               stand-in (this kernel has no SR-IOV device and no netdevsim):
                      the OVS port and the pod NIC are two macvlans of one "PF"
                      device, like a VF representor and its VF: neither is a veth
  kube-ovn-direct     the VM pod on the host network: a tap in the node namespace,
                      straight in br-int with Kube-OVN's external_ids
  pending             the pod as the CNI leaves it, virt-launcher running, nothing
                      of the VM attached yet

Every VM pod but the direct one runs a virt-launcher stand-in (a process named
virt-launcher), as a real one does from before its network is plugged. All
objects live in the sandbox's namespaces and run directory and go with it.
"""

from __future__ import annotations

import ipaddress
import json
import os
import secrets
import shutil
import subprocess
import time
from dataclasses import dataclass

from .sandbox import Sandbox, VmNic, mac_for, sh

MASQUERADE_MAC = "02:00:00:00:00:00"  # KubeVirt's static MAC for the masquerade bridge
MASQUERADE_V4 = "10.0.2.0/24"  # KubeVirt's default vmNetworkCIDR
MASQUERADE_V6 = "fd10:0:2::/120"  # and vmIPv6NetworkCIDR
PASST_UID = "107"  # the qemu user in virt-launcher


@dataclass(frozen=True)
class VmPod:
    """A virt-launcher pod built for one binding, and where its parts are."""

    vmi: str
    namespace: str
    binding: str
    pod_ns: str  # netns name (the node's for kube-ovn-direct)
    iface_id: str
    host_port: str  # the OVS port
    nic: str = ""  # the pod NIC, when there is one
    tap: str = ""
    bridge: str = ""
    pids: tuple = ()  # (name, pid) of the helper processes in the pod: virt-launcher, passt

    def pid(self, name: str) -> int:
        return dict(self.pids)[name]

    def devices(self) -> list[str]:
        """Every device in the pod's namespace (to check that nothing changed on them)."""
        return sorted(link["ifname"] for link in json.loads(sh("ip", "-j", "link", "show", netns=self.pod_ns).stdout))


def _launcher(sb: Sandbox, pod_ns: str) -> tuple:
    """A process named virt-launcher in the pod, as a real virt-launcher pod has; (("virt-launcher", pid),)."""
    path = os.path.join(sb.run_dir, "virt-launcher")
    if not os.path.exists(path):
        shutil.copy(shutil.which("sleep"), path)
    return (("virt-launcher", sb.spawn(pod_ns, path, "infinity").pid),)


def _cni_pod(sb: Sandbox, vmi: str, namespace: str, ips: list[str], dev: str = "eth0") -> tuple[str, str, str]:
    """A pod as Kube-OVN's CNI leaves it: a veth `dev` with the pod's MAC, addresses and route.
    Returns (pod netns, OVS port, pod MAC)."""
    pod_ns = sb.add_netns(f"pod-{vmi}"[:20])
    cid = secrets.token_hex(32)
    iface_id = f"{vmi}.{namespace}"
    host = sb.plug(pod_ns, dev, vmi, namespace, iface_id, ",".join(ip.split("/")[0] for ip in ips), cid)
    mac = mac_for(f"{sb.tag}{vmi}0")
    sh("ip", "link", "set", dev, "address", mac, netns=pod_ns)
    for ip in ips:
        sh("ip", "addr", "add", ip, "dev", dev, *(["nodad"] if ":" in ip else []), netns=pod_ns)
    sh("ip", "link", "set", dev, "up", netns=pod_ns)
    return pod_ns, host, mac


def _first(network: str, n: int) -> str:
    return str(ipaddress.ip_network(network)[n])


# --- the bindings --------------------------------------------------------------------------

def bridge_vm(sb: Sandbox, vmi: str, ip: str, namespace: str = "default", managed_tap: bool = False) -> VmPod:
    [nic] = sb.add_vm(vmi, [ip], namespace=namespace, vm_link="tap", managed_tap=managed_tap)
    return _of(vmi, namespace, "managedTap" if managed_tap else "bridge", nic, _launcher(sb, nic.pod_ns))


def bridge_vm_with_two_taps(sb: Sandbox, vmi: str, ip: str, namespace: str = "default") -> VmPod:
    """A bridge-bound pod with a second tap on k6t-eth0 (nothing KubeVirt builds; the bypass must refuse it)."""
    [nic] = sb.add_vm(vmi, [ip], namespace=namespace, vm_link="tap")
    sh("ip", "tuntap", "add", "dev", "tap1", "mode", "tap", netns=nic.pod_ns)
    sh("ip", "link", "set", "tap1", "master", nic.bridge, netns=nic.pod_ns)
    return _of(vmi, namespace, "bridge", nic, _launcher(sb, nic.pod_ns))


def _of(vmi: str, namespace: str, binding: str, nic: VmNic, pids: tuple) -> VmPod:
    return VmPod(vmi, namespace, binding, nic.pod_ns, nic.iface_id, nic.host_port, nic.nic, nic.tap, nic.bridge,
                 pids)


def masquerade_vm(sb: Sandbox, vmi: str, ip: str, ip6: str, namespace: str = "default") -> VmPod:
    """Masquerade as KubeVirt builds it for a dual-stack pod, NAT rules included."""
    pod_ns, host, _mac = _cni_pod(sb, vmi, namespace, [f"{ip}/24", f"{ip6}/64"])
    p = pod_ns
    gw4, gw6 = f"{_first(MASQUERADE_V4, 1)}/24", f"{_first(MASQUERADE_V6, 1)}/120"
    guest4, guest6 = _first(MASQUERADE_V4, 2), _first(MASQUERADE_V6, 2)
    # virt-handler (nmstate): the bridge with the guest's gateway addresses, and the tap on it.
    sh("ip", "link", "add", "k6t-eth0", "type", "bridge", netns=p)
    sh("ip", "link", "set", "k6t-eth0", "address", MASQUERADE_MAC, netns=p)
    sh("ip", "addr", "add", gw4, "dev", "k6t-eth0", netns=p)
    sh("ip", "addr", "add", gw6, "dev", "k6t-eth0", "nodad", netns=p)
    sh("ip", "tuntap", "add", "dev", "tap0", "mode", "tap", "vnet_hdr", "multi_queue", netns=p)
    sh("ip", "link", "set", "tap0", "master", "k6t-eth0", netns=p)
    for dev in ("tap0", "k6t-eth0"):
        sh("ip", "link", "set", dev, "up", netns=p)
    sh("sysctl", "-q", "-w", "net.ipv4.ip_forward=1", "net.ipv6.conf.all.forwarding=1",
       "net.ipv4.conf.k6t-eth0.route_localnet=1", netns=p)
    # virt-handler then writes the NAT with the nft tool, family by family (no ports listed in the VMI).
    for family, guest, gw, loopback in (("ip", guest4, gw4.split("/")[0], "127.0.0.1"),
                                        ("ip6", guest6, gw6.split("/")[0], "::1")):
        nft = lambda *args: sh("nft", *args, netns=p)  # noqa: E731
        nft("add", "table", family, "nat")
        nft("add", "chain", family, "nat", "prerouting", "{ type nat hook prerouting priority -100; }")
        nft("add", "chain", family, "nat", "input", "{ type nat hook input priority 100; }")
        nft("add", "chain", family, "nat", "output", "{ type nat hook output priority -100; }")
        nft("add", "chain", family, "nat", "postrouting", "{ type nat hook postrouting priority 100; }")
        nft("add", "chain", family, "nat", "KUBEVIRT_PREINBOUND")
        nft("add", "chain", family, "nat", "KUBEVIRT_POSTINBOUND")
        nft("add", "rule", family, "nat", "postrouting", family, "saddr", guest, "counter", "masquerade")
        nft("add", "rule", family, "nat", "prerouting", "iifname", "eth0", "counter", "jump", "KUBEVIRT_PREINBOUND")
        nft("add", "rule", family, "nat", "postrouting", "oifname", "k6t-eth0", "counter", "jump",
            "KUBEVIRT_POSTINBOUND")
        nft("add", "rule", family, "nat", "KUBEVIRT_PREINBOUND", "counter", "dnat", "to", guest)
        nft("add", "rule", family, "nat", "KUBEVIRT_POSTINBOUND", family, "saddr", f"{{ {loopback} }}", "counter",
            "snat", "to", gw)
        nft("add", "rule", family, "nat", "output", family, "daddr", f"{{ {loopback} }}", "counter", "dnat", "to",
            guest)
    return VmPod(vmi, namespace, "masquerade", p, f"{vmi}.{namespace}", host, "eth0", "tap0", "k6t-eth0",
                 _launcher(sb, p))


def passt_vm(sb: Sandbox, vmi: str, ip: str, namespace: str = "default", timeout: float = 10.0) -> VmPod:
    """passt: the pod's eth0 as the CNI left it, KubeVirt's sysctls, and passt itself running in the pod."""
    pod_ns, host, _mac = _cni_pod(sb, vmi, namespace, [f"{ip}/24"])
    sh("ip", "route", "add", "default", "via", str(ipaddress.ip_interface(f"{ip}/24").network[1]), netns=pod_ns)
    sh("sysctl", "-q", "-w", f"net.ipv4.ping_group_range={PASST_UID} {PASST_UID}",
       "net.ipv4.ip_unprivileged_port_start=0", netns=pod_ns)
    launcher = _launcher(sb, pod_ns)
    run = os.path.join(sb.run_dir, f"passt-{vmi}")
    os.makedirs(run, exist_ok=True)
    os.chmod(run, 0o777)  # passt drops to nobody before it binds its socket
    socket_path = os.path.join(run, "passt.sock")
    with open(os.path.join(run, "passt.log"), "wb") as log:
        child = sb.spawn(pod_ns, "passt", "--foreground", "--stderr", "--quiet", "--socket", socket_path,
                         stdout=log, stderr=log)
    deadline = time.monotonic() + timeout
    while not os.path.exists(socket_path):
        if child.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"passt did not come up in {pod_ns} (see {run}/passt.log)")
        time.sleep(0.02)
    return VmPod(vmi, namespace, "passt", pod_ns, f"{vmi}.{namespace}", host, "eth0",
                 pids=launcher + (("passt", child.pid),))


def slirp_vm(sb: Sandbox, vmi: str, ip: str, namespace: str = "default") -> VmPod:
    """slirp: QEMU's own user-mode network in the pod (a QEMU with no guest, holding just the netdev)."""
    pod_ns, host, _mac = _cni_pod(sb, vmi, namespace, [f"{ip}/24"])
    launcher = _launcher(sb, pod_ns)
    qemu = sb.spawn(pod_ns, "qemu-system-x86_64", "-machine", "none", "-nodefaults", "-display", "none", "-S",
                    "-netdev", '{"type":"user","id":"hostua-default"}',
                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return VmPod(vmi, namespace, "slirp", pod_ns, f"{vmi}.{namespace}", host, "eth0",
                 pids=launcher + (("qemu", qemu.pid),))


def macvtap_vm(sb: Sandbox, vmi: str, ip: str, namespace: str = "default") -> VmPod:
    """macvtap: a macvtap device on the pod's NIC, carrying the VM's MAC."""
    pod_ns, host, _mac = _cni_pod(sb, vmi, namespace, [f"{ip}/24"])
    sh("ip", "link", "add", "link", "eth0", "name", "macvtap0", "type", "macvtap", "mode", "bridge", netns=pod_ns)
    sh("ip", "link", "set", "macvtap0", "address", mac_for(f"{sb.tag}{vmi}-vm"), "up", netns=pod_ns)
    return VmPod(vmi, namespace, "macvtap", pod_ns, f"{vmi}.{namespace}", host, "eth0", "macvtap0",
                 pids=_launcher(sb, pod_ns))


def sriov_vm(sb: Sandbox, vmi: str, ip: str, namespace: str = "default") -> VmPod:
    """SR-IOV stand-in: OVS port and pod NIC are sibling macvlans of one device, neither a veth.

    Kube-OVN renames the VF representor to <cid>_h, puts it in br-int with the
    pod's external_ids and moves the VF into the pod with the pod's MAC and IP.
    """
    pod_ns = sb.add_netns(f"pod-{vmi}"[:20])
    cid = secrets.token_hex(32)
    pf = "pf0"
    if sh("ip", "link", "show", "dev", pf, netns=sb.node, check=False).returncode != 0:
        sh("ip", "link", "add", pf, "type", "bridge", netns=sb.node)  # the PF's stand-in: any Ethernet device
        sh("ip", "link", "set", pf, "up", netns=sb.node)
    host = Sandbox.host_port_name(cid)
    sh("ip", "link", "add", host, "link", pf, "type", "macvlan", "mode", "bridge", netns=sb.node)
    sh("ip", "link", "set", host, "up", netns=sb.node)
    sb.add_kubeovn_port(host, pod_ns, vmi, namespace, f"{vmi}.{namespace}", ip)
    vf = f"vf{cid[:8]}"
    sh("ip", "link", "add", vf, "link", pf, "type", "macvlan", "mode", "bridge", netns=sb.node)
    sh("ip", "link", "set", vf, "netns", pod_ns, netns=sb.node)
    sh("ip", "link", "set", vf, "name", "eth0", netns=pod_ns)
    sh("ip", "link", "set", "eth0", "address", mac_for(f"{sb.tag}{vmi}0"), netns=pod_ns)
    sh("ip", "addr", "add", f"{ip}/24", "dev", "eth0", netns=pod_ns)
    sh("ip", "link", "set", "eth0", "up", netns=pod_ns)
    return VmPod(vmi, namespace, "sriov", pod_ns, f"{vmi}.{namespace}", host, "eth0", pids=_launcher(sb, pod_ns))


def kubeovn_tap_vm(sb: Sandbox, vmi: str, ip: str, namespace: str = "default") -> VmPod:
    """Kube-OVN's direct binding: the VM pod on the host network, its tap straight in br-int."""
    host = Sandbox.host_port_name(secrets.token_hex(32))
    sh("ip", "tuntap", "add", "dev", host, "mode", "tap", "vnet_hdr", netns=sb.node)
    sh("ip", "link", "set", host, "address", mac_for(f"{sb.tag}{vmi}-tap"), "up", netns=sb.node)
    sb.add_kubeovn_port(host, sb.node, vmi, namespace, f"{vmi}.{namespace}", ip)
    return VmPod(vmi, namespace, "kube-ovn-direct", sb.node, f"{vmi}.{namespace}", host, tap=host)


def pending_vm(sb: Sandbox, vmi: str, ip: str, namespace: str = "default") -> VmPod:
    """A virt-launcher pod the CNI has plugged and virt-handler has not wired yet."""
    pod_ns, host, _mac = _cni_pod(sb, vmi, namespace, [f"{ip}/24"])
    return VmPod(vmi, namespace, "pending", pod_ns, f"{vmi}.{namespace}", host, "eth0", pids=_launcher(sb, pod_ns))
