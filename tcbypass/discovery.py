"""From a VMI name to the tap/NIC pairs to bypass, the way Kube-OVN and
KubeVirt lay them out (shared/KUBEVIRT.md). The one place a VMI is discovered:
`discover` (one VMI) and `survey` (any set of port rows, as status --all and
the agent's metrics read the node) read OVSDB, OVS's ports and the pods;
`plan_nic` decides from what they read.

1. Kube-OVN's Interface rows with pod_name=<vmi> (the VM name for VM pods)
   and pod_namespace=<namespace>: one row per NIC, primary and secondary.
2. The binding of each NIC is recognised from what is there (bindings.py):
   the pod NIC is the veth peer of the host port (the host port's IFLA_LINK,
   read where OVS runs, is the pod NIC's ifindex inside pod_netns; no name
   guessing), and only a pod NIC that shares a KubeVirt bridge (k6t-*) with
   exactly one tap, as the bridge and managedTap bindings build it, can be
   bypassed.
3. The VM's MAC: an `attached-mac` in the port's external_ids wins when
   present (it is what the OVN port's security is built from); otherwise the
   MAC of KubeVirt's dummy, which kept the pod's original MAC when KubeVirt
   gave that MAC to the VM (eth0 for eth0-nic, pod<hash> for <hash>-nic).

`plan_nic` is pure: it takes the rows and the devices already read.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from . import bindings, netdev, netns, ovsdb, podnet
from .bindings import Recognition
from .errors import NetnsError, TcbError, UnknownVmiError
from .model import AttachSpec
from .netdev import Link
from .ovsdb import Port
from .podnet import PodNet


@dataclass(frozen=True)
class Settings:
    ovsdb_url: str = ""  # "" means $TCBYPASS_OVSDB or the Kube-OVN default socket
    ovs_netns: str = ""  # where OVS's ports live; "" means this process's namespace
    ovsdb_timeout: float = ovsdb.TIMEOUT

    @property
    def url(self) -> str:
        return self.ovsdb_url or ovsdb.default_url()

NIC_SUFFIX = "-nic"


@dataclass(frozen=True)
class NicPlan:
    port: Port
    spec: AttachSpec | None
    recognition: Recognition

    @property
    def ok(self) -> bool:
        return self.spec is not None

    @property
    def reason(self) -> str:
        return self.recognition.reason

    @property
    def healthy(self) -> bool:
        """Bypassable, or a healthy binding that has nothing to bypass."""
        return self.ok or self.recognition.outcome == bindings.BY_DESIGN

    @property
    def label(self) -> str:
        return self.port.iface_id or self.port.name


def dummy_name(nic: str) -> str:
    """KubeVirt's dummy for a pod NIC: eth0-nic -> eth0, <hash>-nic -> pod<hash>."""
    base = nic[: -len(NIC_SUFFIX)] if nic.endswith(NIC_SUFFIX) else nic
    return base if base.startswith("eth") else f"pod{base}"


def plan_nic(port: Port, host: Link | None, pod: PodNet, dhcp_to_bridge: bool = True) -> NicPlan:
    """Decide whether one Kube-OVN port of a VM pod can be bypassed, and how.

    `host` is the port's device where OVS runs, `pod` what is in the pod's namespace.
    """
    found = bindings.recognise(port, host, pod)
    if found.outcome != bindings.BYPASSABLE:
        return NicPlan(port, None, found)
    mac = port.external_ids.get("attached-mac", "")
    if not mac:
        dummy = pod.links.get(dummy_name(found.nic))
        mac = dummy.mac if dummy is not None else ""
    if not mac:
        return NicPlan(port, None, dataclasses.replace(
            found, outcome=bindings.UNEXPECTED,
            reason=f"cannot tell the VM's MAC: no attached-mac in OVSDB and no dummy {dummy_name(found.nic)} "
                   f"in {port.pod_netns}"))
    spec = AttachSpec(name=port.iface_id or port.name, netns=port.pod_netns, tap=found.tap, nic=found.nic,
                      mac=mac, dhcp_to_bridge=dhcp_to_bridge, vmi=port.pod_name, namespace=port.pod_namespace,
                      iface_id=port.iface_id)
    return NicPlan(port, spec, found)


# --- reading the node -------------------------------------------------------------

FEW_PORTS = 8  # up to this many, the host ports are looked up by name; more, one dump


def _host_links(settings: Settings, names: list[str]) -> dict[str, netdev.Link]:
    """The host ports `names` where OVS runs. A node holds a port per pod, so a
    VMI's few are looked up by name (a dump would grow with the node)."""
    if settings.ovs_netns:
        opened = netdev.open_netns(netns.path_of(settings.ovs_netns))
    else:
        from pyroute2 import IPRoute

        opened = IPRoute()
    with opened as ipr:
        if len(names) <= FEW_PORTS:
            return netdev.links_named(ipr, names)
        return netdev.list_links(ipr)


def _readable(vmi: str, path: str) -> None:
    """Raise when the pod's namespace is there but we may not open it (another
    process's /proc/PID/ns/net without CAP_SYS_PTRACE): that is not a gone pod."""
    if netns.forbidden(path):
        raise NetnsError(f"cannot open the pod network namespace of {vmi} ({path}): Permission denied",
                         hint="opening another process's /proc/PID/ns/net needs CAP_SYS_PTRACE")


def survey(ports: list[ovsdb.Port], settings: Settings,
           dhcp_to_bridge: bool = True) -> list[tuple[ovsdb.Port, NicPlan | TcbError]]:
    """A plan for each port, or the error that kept its pod from being read.

    Pods are read shallow first (devices, addresses); NAT rules, sysctls and
    processes only for the pods whose answer depends on them.
    """
    host = _host_links(settings, [p.name for p in ports])
    pods: dict[str, podnet.PodNet | TcbError] = {}
    processes = None
    out: list[tuple[ovsdb.Port, NicPlan | TcbError]] = []
    for port in ports:
        path = port.pod_netns
        if path not in pods:
            try:
                if netns.identity_of(path) is None:
                    _readable(port.pod_name or port.name, path)
                    raise NetnsError(f"the pod network namespace of {port.pod_name or port.name} "
                                     f"({path or 'unset'}) is gone",
                                     hint="the virt-launcher pod is not running on this node; nothing to attach")
                pods[path] = podnet.read(path)
            except TcbError as exc:
                pods[path] = exc
        pod = pods[path]
        if isinstance(pod, TcbError):
            out.append((port, pod))
            continue
        plan = plan_nic(port, host.get(port.name), pod, dhcp_to_bridge)
        if bindings.needs_deep(plan.recognition, pod):
            if processes is None:
                processes = podnet.processes_by_netns()
            try:
                pods[path] = pod = podnet.deepen(pod, processes)
            except TcbError as exc:
                pods[path] = exc
                out.append((port, exc))
                continue
            plan = plan_nic(port, host.get(port.name), pod, dhcp_to_bridge)
        out.append((port, plan))
    return out


def discover(vmi: str, namespace: str, settings: Settings, dhcp_to_bridge: bool = True,
             ports: list[ovsdb.Port] | None = None) -> list[NicPlan]:
    """One plan per Kube-OVN port of the VMI; raises when the VMI is unknown or its pod is gone.
    `ports`: the namespace's port rows, when the caller has them (the agent's OVSDB monitor);
    read from OVSDB otherwise."""
    if ports is None:
        ports = ovsdb.kubeovn_ports(settings.url, settings.ovsdb_timeout, pod_namespace=namespace)
    mine = sorted((p for p in ports if p.pod_name == vmi), key=lambda p: p.iface_id)
    if not mine:
        known = sorted({p.pod_name for p in ports if p.pod_name})
        listing = ", ".join(known) if known else "none"
        raise UnknownVmiError(f"no VMI {vmi!r} in namespace {namespace!r} on this node",
                              hint=f"pods and VMIs with Kube-OVN ports in {namespace!r} here: {listing}")
    plans = []
    for _port, found in survey(mine, settings, dhcp_to_bridge):
        if isinstance(found, TcbError):
            raise found
        plans.append(found)
    return plans
