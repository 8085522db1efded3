"""How every attachment on the node is doing, and clearing what is left over.

status reads each attachment's record from its pins and compares it with
the kernel (attachments.problems): active, stale (a device or a hook is
not as recorded: attach again) or orphaned (the pod is gone). gc removes
what no live attachment needs. Neither needs a compiler; status works on a
read-only bpffs too.
"""

from __future__ import annotations

import contextlib
import os

from . import attachments, loader, netns, tc, tcx
from .attachments import legacy_dir, pin_dir_of, problems, read_record
from .errors import BpfError, BusyError, TcbError
from .maps import AttachmentMaps, Counters, Direction
from .model import STATE_ACTIVE, STATE_ORPHANED, STATE_STALE, Record, Status, name_of_pin


def names() -> list[str]:
    """Names of all attachments pinned on this node (by this version or an older one)."""
    found = set()
    for root in (loader.PIN_ROOT, *loader.LEGACY_ROOTS):
        try:
            found.update(name_of_pin(e) for e in os.listdir(root) if not attachments.is_staging(e))
        except FileNotFoundError:
            continue
    return sorted(found)


def status_of(name: str) -> Status | None:
    pin_dir = pin_dir_of(name)
    record = read_record(pin_dir)
    if record is None and not os.path.isdir(pin_dir):
        legacy = read_record(legacy_dir(name))
        if legacy is not None:
            state = STATE_STALE if netns.identity_of(legacy.netns) == legacy.netns_id else STATE_ORPHANED
            return Status(legacy, state, ("attached by an older tcbypass (pins in "
                                          f"{loader.LEGACY_ROOTS[0]}); attach it again to upgrade in place",))
        if not os.path.isdir(legacy_dir(name)):
            return None
    if record is None:
        # Pins without a readable record: an interrupted attach, or another build's layout.
        placeholder = Record(name=name, netns="?", netns_id="", tap="?", tap_ifindex=0, nic="?", nic_ifindex=0,
                             bridge="", bridge_mac="", mac="?", dhcp_to_bridge=True, digest="", hook="?")
        return Status(placeholder, STATE_ORPHANED, ("unreadable pins (an interrupted attach or a foreign "
                                                    "version); 'tcbypass gc' removes them",))
    try:
        with AttachmentMaps(pin_dir, readonly=True) as maps:
            counters = maps.counters()
    except BpfError:
        counters = Counters.zero()
    if netns.identity_of(record.netns) != record.netns_id:
        if netns.forbidden(record.netns):  # not gone: gc must leave it alone
            return Status(record, STATE_STALE, (f"cannot read {record.netns} (permission denied); tcbypass needs "
                                                "CAP_SYS_PTRACE and the node's PID namespace for pods named by "
                                                "/proc/PID/ns/net",), counters)
        return Status(record, STATE_ORPHANED, ("the pod's network namespace is gone",), counters)
    try:
        found = problems(record, pin_dir)
    except TcbError as exc:
        if not os.path.isdir(pin_dir):
            return None  # detached while we read it
        return Status(record, STATE_ORPHANED, (exc.message,), counters)
    return Status(record, STATE_STALE if found else STATE_ACTIVE, tuple(found), counters)


def statuses(namespace: str | None = None, vmi: str | None = None) -> list[Status]:
    """Every attachment's status (of one Kubernetes namespace, of one VMI)."""
    if loader.bpffs_missing():
        raise BpfError(f"bpffs is not mounted on {loader.BPFFS}: no attachment can be read (programs may still "
                       "run on devices whose pins vanished with the mount)",
                       hint=f"mount it again: mount -t bpf bpf {loader.BPFFS}")
    return [s for s in map(status_of, names()) if s is not None
            and (namespace is None or s.record.namespace == namespace) and (vmi is None or s.record.vmi == vmi)]


# --- garbage collection ---------------------------------------------------

def _leftover(status: Status) -> bool:
    """Orphaned, or an attach that never completed. (Attach holds the lock from
    before it writes the record until it completes it, so under the lock an
    incomplete record means that attach died.)"""
    return status.state == STATE_ORPHANED or not status.record.complete

def _defunct_links(name: str) -> list[Direction]:
    pin_dir = pin_dir_of(name)
    defunct = []
    for direction in Direction:
        with contextlib.suppress(OSError):
            if (link := tcx.read(pin_dir, direction)) is not None and link.defunct:
                defunct.append(direction)
    return defunct


def gc() -> list[str]:
    """Remove what no live attachment needs: attachments whose pod is gone,
    unreadable pins, staging directories left by a killed process, tcx links
    whose device was deleted (the tap of a VM that restarted; attach or the
    agent hooks the new one). Live attachments, even stale ones, stay."""
    loader.bpffs_ready()
    removed = []
    entries = []
    for root in (loader.PIN_ROOT, *loader.LEGACY_ROOTS):
        with contextlib.suppress(FileNotFoundError):
            entries += [(root, e) for e in sorted(os.listdir(root))]
    for root, entry in entries:
        name = attachments.entry_name(entry)
        try:
            if attachments.is_staging(entry):
                attachments.clear_staging(name)  # held while an attach is under way
                removed.append(entry)
            elif (status := status_of(name)) is not None and _leftover(status):
                if attachments.detach_if(name, lambda: (again := status_of(name)) is not None and _leftover(again)):
                    removed.append(name)
            elif root == loader.PIN_ROOT and _defunct_links(name):
                removed += [f"{name}: defunct tcx link ({direction.name.lower()})"
                            for direction in attachments.remove_defunct_links(name)]
        except BusyError:
            continue  # someone is working on it right now
    attachments.prune_locks({attachments.entry_name(e) for _, e in entries})
    if tc.forget_dead_owners(netns.live_identities()):
        removed.append("clsact ownership markers of deleted pods")
    return removed
