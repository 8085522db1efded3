"""`attach <vmi>`, `detach <vmi>`, `status`: VMIs on top of attachments.

A VMI's NICs are discovered from Kube-OVN's port rows in OVSDB and what is
in the pod (discovery.py, bindings.py); each bridge-bound NIC becomes one
attachment named by its Kube-OVN iface-id. Attaching a VMI is all or
nothing: if one NIC fails, the NICs this call attached are detached again.
A VMI whose NICs all use healthy bindings with no bridge to bypass
(masquerade, passt, macvtap, SR-IOV, Kube-OVN's direct tap) is a no-op,
not a failure: nothing is wrong with it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from dataclasses import dataclass

from . import attachments, health, bindings, netdev, netns, ovsdb, podnet
from .discovery import NicPlan, plan_nic
from .errors import NetnsError, NotBypassableError, TcbError, UnknownVmiError
from .model import AttachResult, Record, Status, check_name

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Settings:
    ovsdb_url: str = ""  # "" means $TCBYPASS_OVSDB or the Kube-OVN default socket
    ovs_netns: str = ""  # where OVS's ports live; "" means this process's namespace
    ovsdb_timeout: float = ovsdb.TIMEOUT

    @property
    def url(self) -> str:
        return self.ovsdb_url or ovsdb.default_url()


@dataclass(frozen=True)
class VmiResult:
    vmi: str
    namespace: str
    attached: tuple[AttachResult, ...]
    skipped: tuple[NicPlan, ...]  # NICs that are not bypassed (with their binding and the reason)
    removed: tuple[Record, ...]  # attachments of NICs the VMI no longer has


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


def attach_vmi(vmi: str, namespace: str, settings: Settings, dhcp_to_bridge: bool = True,
               managed_by: str = "cli", hook: str = "", from_vm: str = "",
               ports: list[ovsdb.Port] | None = None) -> VmiResult:
    """Attach every bridge-bound NIC of the VMI (all or nothing); `managed_by` is recorded for status,
    `hook` and `from_vm` as in AttachSpec ("" lets the kernel's features decide), `ports` as for discover.

    Returns with nothing attached when every NIC uses a healthy binding that
    has no bridge to bypass; raises NotBypassableError when no NIC can be
    bypassed and some NIC is not ready or wired in a way tcbypass does not know.
    """
    plans = discover(vmi, namespace, settings, dhcp_to_bridge, ports)
    good = [p for p in plans if p.ok]
    skipped = tuple(p for p in plans if not p.ok)
    if not good and not all(p.healthy for p in plans):
        reasons = "; ".join(f"{p.label}: {p.recognition.line()}" for p in skipped)
        waiting = any(p.recognition.outcome == bindings.NOT_READY for p in skipped)
        hint = ("attach again once virt-handler has plugged the pod (the agent does so by itself)" if waiting
                else "tcbypass bypasses the bridge of KubeVirt's bridge and managedTap bindings only")
        raise NotBypassableError(f"VMI {namespace}/{vmi} has no bypassable NIC ({reasons})", hint=hint)
    done: list[AttachResult] = []
    try:
        for plan in good:
            spec = dataclasses.replace(plan.spec, managed_by=managed_by, hook=hook, from_vm=from_vm)
            done.append(attachments.attach(spec))
    except BaseException:
        for result in done:
            if result.action == "attached":  # only what this call created
                with contextlib.suppress(Exception):
                    attachments.detach(result.record.name)
        raise
    wanted = {p.spec.name for p in good}
    gone = [n for n in attachment_names(vmi, namespace) if n not in wanted]
    removed = tuple(r for r in map(attachments.detach, gone) if r is not None)
    return VmiResult(vmi, namespace, tuple(done), skipped, removed)


def attachment_names(vmi: str, namespace: str) -> list[str]:
    """Attachments recorded for the VMI's NICs."""
    names = []
    for name in health.names():
        record = attachments.read_record(attachments.pin_dir_of(name))
        if record is not None and record.vmi == vmi and record.namespace == namespace:
            names.append(name)
    return names


def detach_vmi(vmi: str, namespace: str, remove_qdisc: bool = False) -> list[Record]:
    """Detach every NIC of the VMI. Needs no OVSDB: the records say what is attached."""
    return [r for r in (attachments.detach(n, remove_qdisc) for n in attachment_names(vmi, namespace))
            if r is not None]


def detach_target(target: str, namespace: str, remove_qdisc: bool = False) -> list[Record]:
    """`detach VMI|NAME`: the VMI's NICs in `namespace` if it has any, else the attachment NAME."""
    check_name(target)
    records = detach_vmi(target, namespace, remove_qdisc)
    if not records:
        record = attachments.detach(target, remove_qdisc)
        records = [record] if record else []
    return records


def statuses(namespace: str | None = None, vmi: str | None = None) -> list[Status]:
    return [s for s in health.statuses()
            if (namespace is None or s.record.namespace == namespace) and (vmi is None or s.record.vmi == vmi)]
