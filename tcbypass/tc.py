"""Our tc hook on a device: clsact plus one direct-action bpf filter on ingress.

Ours is found by priority, handle and name; nothing else on the device is
touched. The filter is replaced in place (same priority and handle), so a
re-attach never leaves a gap in which frames miss the program.

Adding or deleting a qdisc (clsact included) makes the kernel deactivate
the device's transmit queues for a moment (qdisc_graft -> dev_deactivate):
frames queued or sent to the device in that window are dropped. Measured
on a qemu guest: 1 ping in 300 lost in two of three runs of three
detach/re-attach cycles. So a clsact we add stays when we detach (an empty
clsact changes nothing on the path) and is removed only on request
(`release_clsact`). Which clsact qdiscs are ours is remembered in small
marker files, since it must outlive the attachment's pins.
"""

from __future__ import annotations

import contextlib
import errno
import os
from dataclasses import dataclass

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from . import paths
from .errors import TcError

INGRESS = 0xFFFFFFF2  # ffff:fff2
EGRESS = 0xFFFFFFF3  # ffff:fff3
CLSACT = 0xFFFF0000  # ffff:
PRIORITY = 0xCB  # low enough to run before most filters others add later
HANDLE = 0xCB
ETH_P_ALL = 0x0003
NAME_PREFIX = "tcbypass"


@dataclass(frozen=True)
class Filter:
    parent: int
    priority: int
    handle: int
    kind: str
    name: str  # TCA_BPF_NAME, "" for non-bpf filters

    @property
    def ours(self) -> bool:
        return self.priority == PRIORITY and self.handle == HANDLE and self.name.startswith(NAME_PREFIX)


def filter_name(attachment_id: str, program: str, prog_id: int) -> str:
    """Names our filter after the attachment and the program instance it runs, so that
    status can tell a filter left on an older instance (an interrupted upgrade)."""
    return f"{NAME_PREFIX}:{attachment_id}:{program}:{prog_id}"


OWNER_DIR = f"{paths.RUN_DIR}/clsact"


def _owner_marker(netns_id: str, ifindex: int) -> str:
    return f"{OWNER_DIR}/{netns_id.replace(':', '-')}-{ifindex}"


def owns_clsact(netns_id: str, ifindex: int) -> bool:
    return os.path.exists(_owner_marker(netns_id, ifindex))


def has_clsact(ipr: IPRoute, ifindex: int) -> bool:
    return any(q.get_attr("TCA_KIND") == "clsact" for q in ipr.get_qdiscs(index=ifindex))


def ensure_clsact(ipr: IPRoute, ifindex: int, netns_id: str) -> bool:
    """Add clsact if missing and remember that it is ours; True when we created it."""
    if has_clsact(ipr, ifindex):
        return False
    os.makedirs(OWNER_DIR, exist_ok=True)
    marker = _owner_marker(netns_id, ifindex)
    with open(marker, "w"):  # first, so that an interrupted attach still knows it is ours
        pass
    try:
        ipr.tc("add", kind="clsact", index=ifindex)
    except NetlinkError as exc:
        os.unlink(marker)
        if exc.code == errno.EEXIST:
            return False
        raise TcError(f"cannot add clsact to ifindex {ifindex} ({exc})",
                      hint="does this kernel have CONFIG_NET_SCH_INGRESS? run 'tcbypass doctor'") from None
    return True


def filters(ipr: IPRoute, ifindex: int, parent: int = INGRESS) -> list[Filter]:
    try:
        msgs = ipr.get_filters(index=ifindex, parent=parent)
    except NetlinkError as exc:
        if exc.code in (errno.EINVAL, errno.ENOENT, errno.ENODEV):
            return []
        raise
    found = []
    for msg in msgs:
        kind = msg.get_attr("TCA_KIND")
        if not kind:
            continue  # the chain header the kernel reports once per priority
        options = msg.get_attr("TCA_OPTIONS")
        name = (options.get_attr("TCA_BPF_NAME") if options is not None and kind == "bpf" else None) or ""
        found.append(Filter(parent, (msg["info"] >> 16) & 0xFFFF, msg["handle"], kind, name))
    return found


def our_filter(ipr: IPRoute, ifindex: int) -> Filter | None:
    return next((f for f in filters(ipr, ifindex) if f.ours), None)


def set_filter(ipr: IPRoute, ifindex: int, prog_fd: int, name: str) -> None:
    """Install our ingress filter, or swap its program in place."""
    try:
        ipr.tc("replace-filter", kind="bpf", index=ifindex, parent=INGRESS, prio=PRIORITY, handle=HANDLE,
               protocol=ETH_P_ALL, fd=prog_fd, name=name, direct_action=True)
    except NetlinkError as exc:
        raise TcError(f"cannot install the tc filter on ifindex {ifindex} ({exc})",
                      hint="run 'tcbypass doctor'") from None


def remove_filter(ipr: IPRoute, ifindex: int) -> bool:
    """Delete our filter if it is there; False when it was already gone."""
    if our_filter(ipr, ifindex) is None:
        return False
    try:
        ipr.tc("del-filter", kind="bpf", index=ifindex, parent=INGRESS, prio=PRIORITY, handle=HANDLE,
               protocol=ETH_P_ALL)
    except NetlinkError as exc:
        if exc.code in (errno.ENOENT, errno.ENODEV, errno.EINVAL):
            return False
        raise TcError(f"cannot remove the tc filter from ifindex {ifindex} ({exc})") from None
    return True


def release_clsact(ipr: IPRoute, ifindex: int, netns_id: str) -> bool:
    """Delete clsact if we created it and nothing is left on it. Briefly
    deactivates the device's queues (see the module comment)."""
    if not owns_clsact(netns_id, ifindex):
        return False
    if filters(ipr, ifindex, INGRESS) or filters(ipr, ifindex, EGRESS):
        return False  # someone else uses it now: it is theirs as much as ours
    try:
        ipr.tc("del", kind="clsact", index=ifindex)
    except NetlinkError as exc:
        if exc.code not in (errno.ENOENT, errno.EINVAL, errno.ENODEV):
            raise TcError(f"cannot remove clsact from ifindex {ifindex} ({exc})") from None
    forget_clsact(netns_id, ifindex)
    return True


def forget_clsact(netns_id: str, ifindex: int) -> None:
    """Drop the ownership marker (the device or its namespace is gone)."""
    with contextlib.suppress(FileNotFoundError):
        os.unlink(_owner_marker(netns_id, ifindex))


def forget_dead_owners(live_netns_ids: set[str]) -> int:
    """Drop markers of namespaces that no longer exist; returns how many."""
    try:
        markers = os.listdir(OWNER_DIR)
    except FileNotFoundError:
        return 0
    live = {n.replace(":", "-") for n in live_netns_ids}
    dropped = 0
    for marker in markers:
        if marker.rsplit("-", 1)[0] not in live:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(f"{OWNER_DIR}/{marker}")
            dropped += 1
    return dropped
