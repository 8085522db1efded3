"""Every Kube-OVN VM port on this node: its binding and its fast-path state.

One row per VM NIC (a Kube-OVN port whose pod shows anything of KubeVirt's),
plus one per attachment whose port is gone:

  active          attached, and programs, maps and devices agree
  stale           attached, but a device or the wiring changed: attach again
  orphaned        attached, but the pod's namespace is gone: detach (or gc)
  not attached    bypassable (or still being plugged) and not attached
  not bypassable  a binding with no bridge to bypass, or a wiring tcbypass cannot serve

`rows` is pure: it merges the plans with the attachments' statuses.
`node_ports` reads OVSDB, the pods and bpffs to get them.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass
from typing import Iterable

from . import bindings, health, ovsdb
from .discovery import NicPlan, Settings, survey
from .errors import TcbError
from .model import STATE_ACTIVE, STATE_ORPHANED, STATE_STALE, Status

STATE_NOT_ATTACHED = "not attached"
STATE_NOT_BYPASSABLE = "not bypassable"
STATES = (STATE_ACTIVE, STATE_STALE, STATE_ORPHANED, STATE_NOT_ATTACHED, STATE_NOT_BYPASSABLE)
DEGRADED = (STATE_STALE, STATE_ORPHANED, STATE_NOT_ATTACHED)  # could be on the fast path and is not
NO_BINDING = "-"  # an attachment whose Kube-OVN port is gone: nothing left to recognise


@dataclass(frozen=True)
class PortRow:
    vmi: str
    namespace: str
    nic: str  # Kube-OVN iface-id
    binding: str
    state: str
    reason: str
    port: str = ""  # the OVS port
    netns: str = ""
    attachment: str = ""  # the attachment's name, if there is one

    def to_json(self) -> dict:
        return asdict(self)


def _attached_reason(status: Status) -> str:
    r = status.record
    if status.state == STATE_ACTIVE:
        return f"fast path live ({r.tap} <-> {r.nic})"
    return "; ".join(status.problems) or status.state


def _row(port: ovsdb.Port, plan: NicPlan, status: Status | None) -> PortRow:
    rec = plan.recognition
    base = dict(vmi=port.pod_name, namespace=port.pod_namespace, nic=port.iface_id or port.name,
                binding=rec.binding, port=port.name, netns=port.pod_netns)
    if status is not None:
        if plan.ok or status.state != STATE_ACTIVE:
            reason = _attached_reason(status)
            if port.type == "internal":
                reason += f"; the pod NIC is Kube-OVN's OVS internal port {port.name}"
            return PortRow(**base, state=status.state, reason=reason, attachment=status.record.name)
        return PortRow(**base, state=STATE_STALE, attachment=status.record.name,
                       reason=f"attached, but now {rec.line()}; detach it")
    if plan.ok:
        return PortRow(**base, state=STATE_NOT_ATTACHED,
                       reason=f"{rec.reason}; attach with: tcbypass attach {port.pod_name} -n {port.pod_namespace}")
    if rec.outcome == bindings.NOT_READY:
        return PortRow(**base, state=STATE_NOT_ATTACHED, reason=rec.summary)
    return PortRow(**base, state=STATE_NOT_BYPASSABLE, reason=rec.summary)


def rows(found: Iterable[tuple[ovsdb.Port, NicPlan | TcbError]], statuses: Iterable[Status],
         namespace: str | None = None) -> list[PortRow]:
    """The node-wide view from plans (or the error that kept a pod from being read) and statuses."""
    by_name = {s.record.name: s for s in statuses}
    out = []
    for port, plan in found:
        status = by_name.pop(port.iface_id or port.name, None)
        if isinstance(plan, TcbError):
            if status is None:
                continue  # an unreadable pod with nothing of ours: we cannot tell whether it is a VM
            out.append(PortRow(port.pod_name, port.pod_namespace, port.iface_id or port.name, bindings.UNKNOWN,
                               status.state, f"{plan.message}; {_attached_reason(status)}", port.name,
                               port.pod_netns, status.record.name))
            continue
        if plan.recognition.binding == bindings.NOT_A_VM and status is None:
            continue
        out.append(_row(port, plan, status))
    for status in by_name.values():  # attachments of VM ports that are gone
        r = status.record
        if not r.iface_id or (namespace is not None and r.namespace != namespace):
            continue  # explicit attachments are not VM ports; `status` lists them
        out.append(PortRow(r.vmi, r.namespace, r.iface_id, NO_BINDING, status.state,
                           f"no Kube-OVN port for it on this node any more; {_attached_reason(status)}",
                           netns=r.netns, attachment=r.name))
    return sorted(out, key=lambda row: (row.namespace, row.vmi, row.nic))


def counts(port_rows: Iterable[PortRow]) -> Counter:
    """How many VM ports there are of each (binding, state)."""
    return Counter((row.binding, row.state) for row in port_rows)


def node_ports(settings: Settings, namespace: str | None = None,
               ports: list[ovsdb.Port] | None = None) -> list[PortRow]:
    """Read OVSDB (unless `ports` is given), every pod and the attachments; return the rows."""
    if ports is None:
        ids = {"pod_namespace": namespace} if namespace else {}
        ports = ovsdb.kubeovn_ports(settings.url, settings.ovsdb_timeout, **ids)
    mine = [p for p in ports if p.pod_name and (namespace is None or p.pod_namespace == namespace)]
    found = survey(sorted(mine, key=lambda p: (p.pod_namespace, p.pod_name, p.iface_id)), settings)
    return rows(found, health.statuses(), namespace)
