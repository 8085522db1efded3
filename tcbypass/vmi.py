"""`attach <vmi>`, `detach <vmi>`: VMIs on top of attachments.

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

from . import attachments, bindings, health, ovsdb
from .discovery import NicPlan, Settings, discover
from .errors import NotBypassableError
from .model import AttachResult, Record, check_name

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class VmiResult:
    vmi: str
    namespace: str
    attached: tuple[AttachResult, ...]
    skipped: tuple[NicPlan, ...]  # NICs that are not bypassed (with their binding and the reason)
    removed: tuple[Record, ...]  # attachments of NICs the VMI no longer has


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
