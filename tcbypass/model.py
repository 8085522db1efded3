"""The values tcbypass passes around: what to attach, what is attached, and
how an attachment is doing. Frozen, plain, free of I/O."""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field, fields

from .errors import InputError
from .maps import Counters

# Kubernetes names are DNS labels/subdomains; explicit names follow the same
# spirit. Dots are allowed (Kube-OVN iface-ids have them) and encoded for bpffs.
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,199}$")

STATE_ACTIVE = "active"
STATE_STALE = "stale"
STATE_ORPHANED = "orphaned"


def check_name(name: str) -> str:
    if not _NAME.match(name or ""):
        raise InputError(f"invalid attachment name {name!r}",
                         hint="use letters, digits, '-', '_' and '.', at most 200 characters")
    return name


def pin_id(name: str) -> str:
    """The bpffs directory name of an attachment: bpffs refuses dots."""
    return check_name(name).replace(".", "+")


def name_of_pin(pin: str) -> str:
    return pin.replace("+", ".")


@dataclass(frozen=True)
class AttachSpec:
    """One tap/NIC pair to bypass, as asked for."""

    name: str
    netns: str  # a name under /var/run/netns or a path
    tap: str
    nic: str
    mac: str  # the VM's MAC, canonical lower-case
    dhcp_to_bridge: bool = True
    vmi: str = ""
    namespace: str = ""
    iface_id: str = ""
    managed_by: str = "cli"
    hook: str = ""  # "tcx" or "clsact"; "" picks the best this kernel has
    from_vm: str = ""  # "peer" or "redirect"; "" picks peer wherever it works


@dataclass(frozen=True)
class Record:
    """What is attached, as stored in the attachment's tcb_meta map."""

    name: str
    netns: str
    netns_id: str  # dev:ino of the namespace when attached
    tap: str
    tap_ifindex: int
    nic: str
    nic_ifindex: int
    bridge: str
    bridge_mac: str
    mac: str
    dhcp_to_bridge: bool
    digest: str  # key of the program build the pins came from (build.key)
    vmi: str = ""
    namespace: str = ""
    iface_id: str = ""
    managed_by: str = "cli"
    from_vm: str = "redirect"  # peer | peer-host | redirect (features.MODE_*)
    host_mac: str = ""  # MAC of the pod veth's host side
    hook: str = "clsact"  # tcx or clsact (attachments of tcbypass 0.1 are all clsact)
    mtu: int = 0  # the smallest MTU of the pod NIC and its host side: longer frames never go by peer
    attached_at: float = 0.0
    complete: bool = False  # False while an attach is under way (or was interrupted)

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> "Record | None":
        names = {f.name for f in fields(cls)}
        try:
            return cls(**{k: v for k, v in data.items() if k in names})
        except TypeError:
            return None

    def same_wiring(self, other: "Record") -> bool:
        """Would `other` program the datapath exactly as this one does?"""
        keys = ("netns_id", "tap", "tap_ifindex", "nic", "nic_ifindex", "bridge_mac", "mac", "dhcp_to_bridge",
                "digest", "vmi", "namespace", "iface_id", "from_vm", "host_mac", "hook", "mtu")
        return all(getattr(self, k) == getattr(other, k) for k in keys)


@dataclass(frozen=True)
class AttachResult:
    record: Record
    action: str  # attached | refreshed | replaced | unchanged
    seconds: float


@dataclass(frozen=True)
class Status:
    record: Record
    state: str
    problems: tuple = ()
    counters: Counters = field(default_factory=Counters.zero)

    def to_json(self) -> dict:
        r = self.record
        return {
            "name": r.name,
            "vmi": r.vmi,
            "namespace": r.namespace,
            "iface_id": r.iface_id,
            "netns": r.netns,
            "tap": r.tap,
            "nic": r.nic,
            "bridge": r.bridge,
            "mac": r.mac,
            "dhcp_to_bridge": r.dhcp_to_bridge,
            "managed_by": r.managed_by,
            "hook": r.hook,
            "from_vm": r.from_vm,
            "state": self.state,
            "problems": list(self.problems),
            "counters": self.counters.to_json(),
        }
