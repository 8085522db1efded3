"""Which KubeVirt binding connects a Kube-OVN VM port, told from what is there. Pure.

KubeVirt wires a VM into its virt-launcher pod in several ways (shared/KUBEVIRT.md;
KubeVirt's pkg/network/setup/netpod, Kube-OVN's pkg/daemon/ovs_linux.go). Each
leaves its own marks, and `recognise` reads them from a Kube-OVN port row, the
port's device where OVS runs and a snapshot of the pod's namespace (podnet.py):

  bridge       pod NIC (a veth) and the VM's tap are the two ports of a k6t-* bridge,
               which carries the link-local address virt-launcher's DHCP server
               answers on (169.254.75.1x/32)
  managedTap   the same bridge, with no address on it although the pod has IPv4:
               OVN answers DHCP and RA
  masquerade   the pod NIC is no bridge port; the tap sits on a bridge that routes
               (10.0.2.1/24, fd10:0:2::1/120 by default) and nftables NAT rules
               join the pod NIC to that bridge
  passt        no bridge, no tap: KubeVirt's passt sysctls (ping_group_range
               "107 107", ip_unprivileged_port_start 0) or a passt process
  slirp        no bridge, no tap: a QEMU with a user-mode netdev in the pod
  macvtap      a macvtap device whose lower device is the pod NIC
  sriov        the OVS port is not a veth: Kube-OVN plugs a VF representor that way
               (or, on a DPDK smart NIC, an OVS port of type dpdk); the VF is in the
               pod or passed through to the VM
  kube-ovn-direct  the OVS port is the VM's own tap (or a vhost-user port): already direct

The pod NIC is usually a veth whose host side is the OVS port. Kube-OVN up to
1.14 could also plug an OVS internal port moved into the pod
(pod_nic_type internal-port): no veth and no host side. Such a NIC on a
KubeVirt bridge is bypassed too; frames from the VM then take bpf_redirect()
to it, whose transmit enters the datapath directly.

Only bridge and managedTap can be bypassed. A VM pod whose NIC has none of
these yet is still being plugged; a pod with nothing of KubeVirt's at all is
not a VM.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

from .netdev import Link
from .ovsdb import Port
from .podnet import PodNet

BRIDGE_PREFIX = "k6t-"
VM_SIDE_KINDS = ("tun", "veth")  # a real tap, or a veth standing in for one in emulated pods

BRIDGE = "bridge"
MANAGED_TAP = "managedTap"
MASQUERADE = "masquerade"
PASST = "passt"
SLIRP = "slirp"
MACVTAP = "macvtap"
SRIOV = "sriov"
KUBEOVN_DIRECT = "kube-ovn-direct"
PENDING = "pending"  # a VM pod whose NIC nothing is attached to yet
UNKNOWN = "unknown"  # a wiring none of the above explains
NOT_A_VM = "none"  # a pod with nothing of KubeVirt's: not a VM port

BINDINGS = (BRIDGE, MANAGED_TAP, MASQUERADE, PASST, SLIRP, MACVTAP, SRIOV, KUBEOVN_DIRECT, PENDING, UNKNOWN)

# What can be done about a port.
BYPASSABLE = "bypassable"  # complete bridge wiring: attach it
BY_DESIGN = "by design"  # a healthy binding with no bridge to bypass: nothing to do
NOT_READY = "not ready"  # still being wired (or torn down): look again later
UNEXPECTED = "unexpected"  # a wiring tcbypass cannot serve, or not a VM

PASST_UID = "107"  # the qemu user in virt-launcher; KubeVirt opens ping to it for passt
LINK_LOCAL_V4 = ipaddress.ip_network("169.254.0.0/16")


@dataclass(frozen=True)
class Recognition:
    binding: str
    outcome: str
    reason: str  # what was seen, and why it leads to `outcome`
    nic: str = ""  # the pod-side device, when there is one
    tap: str = ""
    bridge: str = ""

    @property
    def verdict(self) -> str:
        if self.binding == KUBEOVN_DIRECT:
            return "already direct"
        return {BYPASSABLE: "bypassable", NOT_READY: "not ready"}.get(self.outcome, "not bypassable")

    @property
    def summary(self) -> str:
        """The reason as the node-wide view shows it, next to a state column."""
        if self.binding == KUBEOVN_DIRECT:
            return f"already direct: {self.reason}"
        if self.binding == PENDING:
            return f"still being plugged: {self.reason}"
        return self.reason

    def line(self) -> str:
        """One line for `attach`: the binding, the verdict and why."""
        if self.binding == PENDING:
            return f"no binding yet, the pod is still being plugged: {self.reason}"
        if self.binding == NOT_A_VM:
            return f"not a VM: {self.reason}"
        if self.binding == UNKNOWN:
            return f"unrecognised wiring, {self.verdict}: {self.reason}"
        tail = "; nothing to do" if self.outcome == BY_DESIGN else ""
        return f"{self.binding} binding, {self.verdict}: {self.reason}{tail}"


def needs_deep(recognition: Recognition, pod: PodNet | None) -> bool:
    """Would a deep snapshot (NAT rules, sysctls, processes) change this answer?

    Only the branches for a pod NIC that is no bridge port, and for a port that
    is not a veth, look at those; on a shallow snapshot they answer with one of
    the bindings below.
    """
    return pod is not None and not pod.deep and recognition.binding in (PENDING, NOT_A_VM, SRIOV)


def recognise(port: Port, host: Link | None, pod: PodNet) -> Recognition:
    """The binding of one Kube-OVN port, from its row, its device where OVS runs and its pod."""
    if port.type.startswith("dpdkvhostuser"):
        return Recognition(KUBEOVN_DIRECT, BY_DESIGN,
                           f"the VM's NIC is the vhost-user port {port.name} of OVS ({port.type}), "
                           "with no pod bridge in between")
    if port.type == "dpdk":  # Kube-OVN's representor of a VF on a DPDK smart NIC
        return Recognition(SRIOV, BY_DESIGN, f"OVS port {port.name} is the DPDK representor of a VF; "
                                             "the VM's frames never cross a pod bridge")
    if port.type == "internal":
        return _internal_port(port, pod)
    if port.type not in ("", "system"):
        return Recognition(UNKNOWN, UNEXPECTED, f"port {port.name} is an OVS {port.type} port, not a pod's device")
    if port.ifindex is None:
        return Recognition(UNKNOWN, NOT_READY,
                           f"OVS has not resolved port {port.name} yet (no ifindex); try again in a moment")
    if host is None:
        return Recognition(UNKNOWN, NOT_READY,
                           f"port {port.name} is in OVSDB but not on this node's network (pod being deleted?)")
    if host.kind == "tun":
        if host.tun_type == "tun":
            return Recognition(UNKNOWN, UNEXPECTED, f"port {port.name} is a layer-3 tun device, not a VM's tap")
        return Recognition(KUBEOVN_DIRECT, BY_DESIGN,
                           f"the VM's tap {port.name} is itself the OVS port, with no pod bridge in between",
                           tap=port.name)
    if host.kind != "veth":
        return _sriov(port, host, pod)
    by_index = pod.by_index()
    nic = by_index.get(host.peer) if host.peer else None
    if nic is None:
        return Recognition(UNKNOWN, UNEXPECTED, f"the peer of {port.name} is not in {port.pod_netns}")
    if nic.kind != "veth":
        return Recognition(UNKNOWN, UNEXPECTED,
                           f"the pod side of {port.name} ({nic.name}) is a {nic.kind or 'plain'} device, not a veth")
    macvtaps = sorted(link.name for link in pod.links.values()
                      if link.kind == "macvtap" and link.peer == nic.index and link.peer_netnsid is None)
    if macvtaps:
        mode = pod.links[macvtaps[0]].mode
        return Recognition(MACVTAP, BY_DESIGN,
                           f"{', '.join(macvtaps)} is a macvtap{f' ({mode} mode)' if mode else ''} on {nic.name}: "
                           f"the VM's frames enter {nic.name} without a bridge", nic=nic.name, tap=macvtaps[0])
    bridge = by_index.get(nic.master) if nic.master else None
    if bridge is not None:
        return _bridged(port, nic, bridge, pod)
    return _unbridged(port, nic, pod)


# --- Kube-OVN's internal-port pod NIC ----------------------------------------------------------

OVS_INTERNAL_KIND = "openvswitch"  # IFLA_INFO_KIND of an internal port of OVS's kernel datapath
NIC_SUFFIX = "-nic"


def _internal_port(port: Port, pod: PodNet) -> Recognition:
    """An OVS internal port in the pod: its device there is the pod NIC. Kube-OVN keeps
    its name (<id>_c) and KubeVirt may rename it <name>-nic; on the kernel datapath it is
    an "openvswitch" device, on the userspace datapath a tap that vswitchd holds."""
    by_index = pod.by_index()
    candidates = {link.name: link for link in pod.links.values()
                  if link.kind == OVS_INTERNAL_KIND or link.name == port.name
                  or (link.kind == "tun" and link.name.endswith(NIC_SUFFIX)
                      and by_index.get(link.master, link).name.startswith(BRIDGE_PREFIX))}
    if not candidates:
        return Recognition(UNKNOWN, NOT_READY, f"OVS internal port {port.name} is not in {port.pod_netns} yet "
                                               "(Kube-OVN moves it into the pod when it plugs it)")
    if len(candidates) > 1:
        return Recognition(UNKNOWN, UNEXPECTED,
                           f"{len(candidates)} OVS internal ports in the pod ({', '.join(sorted(candidates))}): "
                           f"cannot tell which one is {port.name}")
    nic = next(iter(candidates.values()))
    where = f"the pod NIC {nic.name} is Kube-OVN's OVS internal port {port.name} (no veth)"
    bridge = by_index.get(nic.master) if nic.master else None
    if bridge is None:
        found = _unbridged(port, nic, pod)
        return Recognition(found.binding, found.outcome, f"{where}; {found.reason}", nic=nic.name)
    found = _bridged(port, nic, bridge, pod)
    return Recognition(found.binding, found.outcome, f"{found.reason}; {where}", nic=found.nic, tap=found.tap,
                       bridge=found.bridge)


# --- a pod NIC on a bridge: bridge or managedTap ------------------------------------------------

def _bridged(port: Port, nic: Link, bridge: Link, pod: PodNet) -> Recognition:
    if bridge.kind != "bridge" or not bridge.name.startswith(BRIDGE_PREFIX):
        return Recognition(UNKNOWN, UNEXPECTED,
                           f"{nic.name} is a port of {bridge.name}, not of a KubeVirt bridge ({BRIDGE_PREFIX}*)",
                           nic=nic.name)
    binding, dhcp = _bridge_flavour(port, bridge, pod)
    others = sorted((link for link in pod.links.values() if link.master == bridge.index and link.index != nic.index),
                    key=lambda link: link.name)

    def rec(outcome: str, reason: str, tap: str = "") -> Recognition:
        return Recognition(binding, outcome, reason, nic=nic.name, tap=tap, bridge=bridge.name)

    if not others:
        return rec(NOT_READY, f"bridge {bridge.name} has no tap yet (VM not started?)")
    if len(others) > 1:
        return rec(UNEXPECTED, f"bridge {bridge.name} has {len(others)} ports besides {nic.name} "
                               f"({', '.join(p.name for p in others)}); expected exactly one tap")
    tap = others[0]
    if tap.kind not in VM_SIDE_KINDS or tap.tun_type == "tun":
        return rec(UNEXPECTED, f"the other port of {bridge.name}, {tap.name}, is a {tap.kind or 'plain'} device, "
                               "not a tap")
    return rec(BYPASSABLE, f"{tap.name} and {nic.name} are the ports of {bridge.name}; {dhcp}", tap=tap.name)


def _bridge_flavour(port: Port, bridge: Link, pod: PodNet) -> tuple[str, str]:
    """bridge or managedTap, by where DHCPv4 is answered."""
    local = [a for a in pod.addresses_of(bridge)
             if a.interface.version == 4 and a.interface.ip in LINK_LOCAL_V4]
    if local:
        return BRIDGE, f"virt-launcher's DHCP server answers on {bridge.name} ({local[0]})"
    pod_v4 = [a for a in _pod_addresses(port, pod) if a.version == 4]
    if pod_v4:
        return MANAGED_TAP, (f"{bridge.name} has no address although the pod has {pod_v4[0]}: "
                             "OVN answers DHCP and RA")
    return BRIDGE, "the pod has no IPv4, so bridge and managedTap look alike"


def _pod_addresses(port: Port, pod: PodNet) -> list:
    """The pod's own addresses: Kube-OVN's `ip` for the port, where a device in the pod holds them."""
    out = []
    for ip in filter(None, (s.strip() for s in port.ip.split(","))):
        try:
            parsed = ipaddress.ip_address(ip)
        except ValueError:
            continue
        if pod.holder_of(str(parsed)) is not None:
            out.append(parsed)
    return out


# --- a pod NIC on no bridge: masquerade, passt, slirp, or not plugged yet ---------------------------

def _unbridged(port: Port, nic: Link, pod: PodNet) -> Recognition:
    masquerade = _masquerade(nic, pod)
    if masquerade is not None:
        return masquerade
    userspace = _userspace(nic, pod)
    if userspace is not None:
        return userspace
    seen = _kubevirt_marks(pod)
    if seen:
        return Recognition(PENDING, NOT_READY,
                           f"{nic.name} carries the pod's network and nothing of the VM is attached to it yet "
                           f"(seen: {seen})", nic=nic.name)
    return Recognition(NOT_A_VM, UNEXPECTED,
                       f"{nic.name} carries the pod's own network and nothing of KubeVirt's is in the pod "
                       "(no k6t bridge, tap, NAT rules, passt or virt-launcher)", nic=nic.name)


def _masquerade(nic: Link, pod: PodNet) -> Recognition | None:
    """NAT rules that send what enters the pod NIC on to a bridge, with an address translation."""
    rules = pod.nat_rules or ()
    inbound = [r for r in rules if r.iifname == nic.name and r.jump]
    for rule in inbound:
        same_table = [r for r in rules if (r.family, r.table) == (rule.family, rule.table)]
        bridges = [pod.links[r.oifname] for r in same_table
                   if r.oifname in pod.links and pod.links[r.oifname].kind == "bridge"]
        if not bridges or not any(r.action for r in same_table):
            continue
        bridge = bridges[0]
        taps = sorted(link.name for link in pod.links.values() if link.master == bridge.index)
        routes = " and ".join(str(a) for a in pod.addresses_of(bridge)) or "no address yet"
        tables = " and ".join(sorted({f"{r.family} {r.table}" for r in inbound}))
        actions = ", ".join(sorted({r.action for r in rules if r.action and (r.family, r.table) in
                                    {(i.family, i.table) for i in inbound}}))
        where = f"{' and '.join(taps)} sits on {bridge.name}" if taps else f"{bridge.name} (no tap yet)"
        return Recognition(MASQUERADE, BY_DESIGN,
                           f"{where}, which routes {routes}, and nftables NAT joins {bridge.name} to {nic.name} "
                           f"({tables}: {rule.chain} sends {nic.name} to {rule.jump}; {actions}); "
                           "an L2 redirect would skip the NAT",
                           nic=nic.name, tap=taps[0] if taps else "", bridge=bridge.name)
    return None


def _userspace(nic: Link, pod: PodNet) -> Recognition | None:
    """passt or slirp: user-space networking on the pod's own sockets."""
    processes = pod.processes or ()
    sysctls = pod.sysctls or {}
    marked = (sysctls.get("net/ipv4/ping_group_range") == f"{PASST_UID} {PASST_UID}"
              and sysctls.get("net/ipv4/ip_unprivileged_port_start") == "0")
    passt = [p for p in processes if p.comm.startswith("passt")]
    carries = f"carries the VM's traffic on the pod's own sockets over {nic.name}"
    if passt or marked:
        who = f"passt (pid {passt[0].pid})" if passt else "passt"
        why = (f", and KubeVirt's passt sysctls are set (ping_group_range {PASST_UID} {PASST_UID}, "
               "ip_unprivileged_port_start 0)") if marked else ""
        return Recognition(PASST, BY_DESIGN, f"no bridge and no tap{why}: {who} {carries}", nic=nic.name)
    qemu = [p for p in processes if p.comm.startswith("qemu") and _user_netdev(p.args)]
    if qemu:
        return Recognition(SLIRP, BY_DESIGN,
                           f"no bridge and no tap: QEMU's own user-mode network (pid {qemu[0].pid}) {carries}",
                           nic=nic.name)
    return None


def _user_netdev(args: tuple[str, ...]) -> bool:
    """Does a QEMU command line define a user-mode (slirp) network backend?"""
    for flag, value in zip(args, args[1:]):
        if flag in ("-netdev", "-net", "--netdev") and (value.startswith("user") or '"type":"user"' in value):
            return True
    return False


def _kubevirt_marks(pod: PodNet) -> str:
    """What in the pod shows that it is a virt-launcher pod, or ''."""
    launcher = [p for p in (pod.processes or ()) if p.comm.startswith("virt-launcher")]
    if launcher:
        return f"virt-launcher, pid {launcher[0].pid}"
    bridges = sorted(link.name for link in pod.links.values()
                     if link.kind == "bridge" and link.name.startswith(BRIDGE_PREFIX))
    if bridges:
        return f"bridge {bridges[0]}"
    taps = sorted(link.name for link in pod.links.values() if link.kind == "tun" and link.tun_type != "tun")
    if taps:
        return f"tap {taps[0]}"
    return ""


# --- a port that is not a veth: SR-IOV ------------------------------------------------------------

def _sriov(port: Port, host: Link, pod: PodNet) -> Recognition:
    """Kube-OVN puts a non-veth device in OVS for a pod only for SR-IOV: the VF's representor."""
    what = f"the VF representor {host.phys_port_name}" if host.phys_port_name else \
        f"a {host.kind} device" if host.kind else "a hardware device"
    vf = next((link for ip in (s.strip() for s in port.ip.split(",")) if ip
               for link in [pod.holder_of(ip)] if link is not None), None)
    if vf is not None and vf.kind == "veth":
        return Recognition(UNKNOWN, UNEXPECTED, f"OVS port {port.name} is {what}, but the pod's address is on "
                                                f"the veth {vf.name}, which is not plugged into it", nic=vf.name)
    if vf is not None:
        side = f"the pod's address is on {vf.name}, a {vf.kind or 'hardware'} device and not a veth: the VF"
    else:
        side = f"no device in the pod holds {port.ip or 'its address'}: the VF belongs to the VM (vfio)"
    if pod.deep and vf is not None and not _kubevirt_marks(pod):
        return Recognition(NOT_A_VM, UNEXPECTED, f"an SR-IOV pod with no virt-launcher in it ({side})",
                           nic=vf.name)
    return Recognition(SRIOV, BY_DESIGN,
                       f"OVS port {port.name} is {what}, not a veth into the pod, and {side}; "
                       "the VM's frames never cross a pod bridge", nic=vf.name if vf else "")
