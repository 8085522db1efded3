"""The benchmark's scenarios: the same VM and peer, wired in different ways.

Every scenario gets a sandbox (namespaces) of its own, with identical
addressing (VM 10.16.0.5/24, peer 10.16.0.2/24), MTU and offloads, so they
can all stand side by side and be measured interleaved:

    direct            vm: eth0 <-veth-> peer           (the VM's NIC wired straight to its peer)
    bridge            vm: eth0 <-veth-> tap0 --[k6t-eth0]-- eth0-nic <-veth-> peer
                      (KubeVirt's bridge binding; the peer is the node end of the pod veth)
    bypass            bridge + the product, attached exactly as `tcbypass attach` does by default
    bypass-clsact     ... on a clsact filter instead of the best hook
    bypass-redirect   ... with plain bpf_redirect() from the VM instead of the best mode
    minimal           bridge + the reference program (lab/minimal.c) on the best hook, by the best mode
    minimal-clsact    ... on a clsact filter
    minimal-redirect  ... with plain bpf_redirect() from the VM
    bpfbridge         the pod without its bridge: every frame both ways by bpf_redirect() on clsact,
                      tap and NIC promiscuous; stands for Deckhouse's bpfbridge binding
                      (deckhouse/virtualization#2212: a tc L2 proxy between the tap and the pod veth)

The VM side is a veth, not a tap: a tap carries traffic only with a process
behind it (qemu, or a relay in user space), and that process would cost
more than the whole bridge here (qemu runs under TCG on these machines).
The programs, the bridge and the devices between them are the same either
way.

Everything a scenario builds is registered on the caller's ExitStack, in the
order that undoes it: programs off first, then the namespaces.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass, field
from typing import Iterator

from tcbypass import attachments, features, loader
from tcbypass.errors import InputError
from tcbypass.maps import AttachmentMaps, Counters
from tcbypass.model import AttachResult, AttachSpec
from . import minimal
from .sandbox import Sandbox, mac_for, mac_of, sh
from .traffic import PEER_IP, PREFIX, VM_IP

DIRECT, BRIDGE, BYPASS, MINIMAL, BPFBRIDGE = "direct", "bridge", "bypass", "minimal", "bpfbridge"
BASELINES = (DIRECT, BRIDGE)
VMI = "bench"

KIND_DIRECT, KIND_BRIDGE, KIND_PRODUCT, KIND_REFERENCE = "direct", "bridge", "product", "reference"


@dataclass(frozen=True)
class Variant:
    """A scenario as it can be asked for by name."""

    name: str
    kind: str
    hook: str = ""  # tcx | clsact; "" = the best this kernel has
    from_vm: str = ""  # peer | redirect; "" = the best this kernel and pod allow
    about: str = ""
    proxy: bool = False  # the reference program carries every frame, and the pod has no bridge


VARIANTS = {v.name: v for v in (
    Variant(DIRECT, KIND_DIRECT, about="the VM's NIC wired straight to its peer"),
    Variant(BRIDGE, KIND_BRIDGE, about="KubeVirt's bridge binding, nothing attached"),
    Variant(BYPASS, KIND_PRODUCT, about="the product as `tcbypass attach` attaches it by default"),
    Variant("bypass-clsact", KIND_PRODUCT, hook=features.HOOK_CLSACT, about="the product on a clsact filter"),
    Variant("bypass-redirect", KIND_PRODUCT, from_vm=features.MODE_REDIRECT,
            about="the product with bpf_redirect() from the VM"),
    Variant(MINIMAL, KIND_REFERENCE, about="the reference program on the best hook, by the best mode"),
    Variant("minimal-clsact", KIND_REFERENCE, hook=features.HOOK_CLSACT,
            about="the reference program on a clsact filter"),
    Variant("minimal-redirect", KIND_REFERENCE, from_vm=features.MODE_REDIRECT,
            about="the reference program with bpf_redirect() from the VM"),
    Variant(BPFBRIDGE, KIND_REFERENCE, hook=features.HOOK_CLSACT, from_vm=features.MODE_REDIRECT, proxy=True,
            about="Deckhouse's bpfbridge design: no bridge, clsact, every frame by bpf_redirect() both ways, "
                  "promiscuous devices"),
)}
DEFAULT = (DIRECT, BRIDGE, BYPASS, MINIMAL)


def parse(text: str) -> tuple[str, ...]:
    """'a,b,...' -> known scenario names, in the order given, without repeats."""
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in VARIANTS]
    if unknown or not names:
        raise InputError(f"unknown scenario(s): {', '.join(unknown) or '(none given)'}",
                         hint=f"choose from: {', '.join(VARIANTS)}")
    return tuple(dict.fromkeys(names))


def order(names) -> list[str]:
    """Scenario names in the order of VARIANTS (tables, plots)."""
    rank = {n: i for i, n in enumerate(VARIANTS)}
    return sorted(set(names), key=lambda n: rank.get(n, len(rank)))


@dataclass
class Scenario:
    """One built scenario: where the client (the VM) and the server (its peer) run,
    and the programs that carry its traffic, if any."""

    name: str
    kind: str
    vm_ns: str  # netns path of the VM side
    peer_ns: str  # netns path of the peer
    vm_mac: str
    peer_mac: str
    host_port: str = ""  # the node end of the VM's veth (of the pod's, or the direct one)
    host_mac: str = ""  # its MAC (the peer's too when the peer is that node end)
    mtu_devices: tuple[tuple[str, str], ...] = ()  # (netns name, device) of every device on the path
    pod_ns: str = ""  # the virt-launcher pod (not for direct)
    tap: str = ""
    nic: str = ""
    hook: str = ""  # where its programs run (tcx | clsact), "" without programs
    mode: str = ""  # how frames from the VM leave: peer | peer-host (the product only) | redirect
    spec: AttachSpec | None = None  # the product's attachment
    first_attach: AttachResult | None = None
    reference: minimal.Reference | None = None
    extra: dict = field(default_factory=dict)

    @property
    def has_programs(self) -> bool:
        return self.kind in (KIND_PRODUCT, KIND_REFERENCE)

    @contextlib.contextmanager
    def programs(self) -> Iterator[tuple[tuple[str, int], ...]]:
        """(name, fd) of the programs this scenario runs: from VM, to VM."""
        if self.kind == KIND_PRODUCT:
            with loader.open_programs(attachments.pin_dir_of(self.spec.name)) as progs:
                yield (("tcb_from_vm", progs.from_vm), ("tcb_to_vm", progs.to_vm))
        elif self.kind == KIND_REFERENCE:
            yield self.reference.programs
        else:
            yield ()

    def counters(self) -> Counters | None:
        """The product's counters (None for other scenarios)."""
        if self.kind != KIND_PRODUCT:
            return None
        with AttachmentMaps(attachments.pin_dir_of(self.spec.name), readonly=True) as maps:
            return maps.counters()


def _peer(sb: Sandbox) -> tuple[str, str, tuple[tuple[str, str], ...]]:
    """The VM's peer: on a node with OVS, a server pod on br-int; without, the
    node end of the VM's veth (set up by the caller). (netns name, MAC, devices)."""
    if not sb.ovs:
        return sb.node, "", ()
    ns = sb.add_server_pod("peer", PEER_IP, namespace="bench", prefix=PREFIX)
    return ns, mac_of(ns, "eth0"), ((ns, "eth0"), (sb.node, sb.host_port_of("peer")))


def _build_direct(sb: Sandbox) -> Scenario:
    """One veth pair, with the same addresses and VM MAC as the pod layouts: its node
    end is the peer, or, on a node with OVS, a port of br-int as an ordinary pod's."""
    peer_ns, peer_mac, peer_devices = _peer(sb)
    vm = sb.add_netns(f"vm-{VMI}")
    host = f"{sb.tag}dir_h"  # named like Kube-OVN's host ports (<id>_h)
    sh("ip", "link", "add", "eth0", "netns", vm, "type", "veth", "peer", "name", host, "netns", sb.node)
    sh("ip", "link", "set", "eth0", "address", mac_for(f"{sb.tag}{VMI}0"), netns=vm)
    sh("ip", "addr", "add", f"{VM_IP}/{PREFIX}", "dev", "eth0", netns=vm)
    sh("ip", "link", "set", "eth0", "up", netns=vm)
    sh("ip", "link", "set", host, "up", netns=sb.node)
    if sb.ovs:
        sb.add_kubeovn_port(host, vm, VMI, "bench", f"{VMI}-direct.bench", VM_IP)
        sb.offloads_as_kubeovn(vm, "eth0")
    else:
        sh("ip", "addr", "add", f"{PEER_IP}/{PREFIX}", "dev", host, netns=sb.node)
    host_mac = mac_of(sb.node, host)
    return Scenario(DIRECT, KIND_DIRECT, sb.netns_path(vm), sb.netns_path(peer_ns), mac_of(vm, "eth0"),
                    peer_mac or host_mac, host_port=host, host_mac=host_mac,
                    mtu_devices=((vm, "eth0"), (sb.node, host), *peer_devices))


def _build_pod(sb: Sandbox, variant: Variant) -> Scenario:
    """KubeVirt's bridge-binding pod; the peer is the node end of its veth, or a
    server pod on br-int."""
    peer_ns, peer_mac, peer_devices = _peer(sb)
    [nic] = sb.add_vm(VMI, [VM_IP], namespace="bench", vm_link="veth")
    if not sb.ovs:
        sb.serve_on_host_port(nic, PEER_IP)
    host_mac = mac_of(sb.node, nic.host_port)
    devices = ((nic.vm_ns, nic.vm_dev), (sb.node, nic.host_port), *((nic.pod_ns, d) for d in (nic.tap, nic.nic,
                                                                                               nic.dummy)))
    return Scenario(variant.name, variant.kind, sb.netns_path(nic.vm_ns), sb.netns_path(peer_ns), nic.mac,
                    peer_mac or host_mac, host_port=nic.host_port, host_mac=host_mac,
                    pod_ns=sb.netns_path(nic.pod_ns), tap=nic.tap, nic=nic.nic, mtu_devices=devices + peer_devices)


def _attach_product(scen: Scenario, variant: Variant, tag: str, stack: contextlib.ExitStack) -> None:
    scen.spec = AttachSpec(name=f"bench-{tag}", netns=scen.pod_ns, tap=scen.tap, nic=scen.nic, mac=scen.vm_mac,
                           vmi=VMI, namespace="bench", managed_by="bench", hook=variant.hook,
                           from_vm=variant.from_vm)
    stack.callback(attachments.detach, scen.spec.name)  # registered first: runs even if attach fails midway
    scen.first_attach = attachments.attach(scen.spec)
    scen.hook, scen.mode = scen.first_attach.record.hook, scen.first_attach.record.from_vm


def _hook_reference(scen: Scenario, variant: Variant, stack: contextlib.ExitStack) -> None:
    found = features.probe()
    scen.hook = variant.hook or found.best_hook
    peer = found.redirect_peer if not variant.from_vm else variant.from_vm == features.MODE_PEER
    scen.mode = features.MODE_PEER if peer else features.MODE_REDIRECT
    if variant.proxy:  # no bridge: the tap and the NIC stand alone, and take every frame
        pod = os.path.basename(scen.pod_ns)
        for dev in (scen.tap, scen.nic):
            sh("ip", "link", "set", dev, "nomaster", "promisc", "on", netns=pod)
    scen.reference = minimal.build(scen.pod_ns, scen.tap, scen.nic, scen.vm_mac, scen.host_mac, scen.hook, peer,
                                   proxy=variant.proxy)
    stack.callback(scen.reference.close)


def build(name: str, stack: contextlib.ExitStack, datapath: str = "") -> Scenario:
    """Build scenario `name` in a new sandbox; the stack tears it down. `datapath`
    (system | netdev): the node has its own OVS on that datapath and the peer is
    a pod on br-int; "" (the default): no OVS, the peer is the node end of the
    VM's veth, which keeps the figures to what the pod's wiring costs."""
    variant = VARIANTS[name]
    sb = stack.enter_context(Sandbox(ovs=bool(datapath), datapath=datapath))
    if variant.kind == KIND_DIRECT:
        return _build_direct(sb)
    scen = _build_pod(sb, variant)
    if variant.kind == KIND_PRODUCT:
        _attach_product(scen, variant, sb.tag, stack)
    elif variant.kind == KIND_REFERENCE:
        _hook_reference(scen, variant, stack)
    return scen


def set_mtu(scen: Scenario, mtu: int) -> None:
    """Give every device of the scenario `mtu`, as Kube-OVN and KubeVirt would have
    wired the pod on a network of that MTU (the bridge follows its ports); the
    product attaches again, so that its config holds the path's new MTU."""
    for ns, dev in scen.mtu_devices:
        sh("ip", "link", "set", dev, "mtu", str(mtu), netns=ns)
    if scen.kind == KIND_PRODUCT:
        result = attachments.attach(scen.spec)
        if result.record.mtu != mtu:
            raise InputError(f"{scen.name}: attach kept the MTU {result.record.mtu}, not {mtu}")


def sysctl_in(ns_path: str, key: str) -> str:
    return sh("sysctl", "-n", key, netns=os.path.basename(ns_path), check=False).stdout.strip()
