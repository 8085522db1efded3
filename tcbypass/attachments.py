"""Attach, detach and inspect one tap/NIC pair: the core of tcbypass.

An attachment is the unit everything else is built from (`attach <vmi>`
makes one per bridge-bound NIC). Its whole state lives in one bpffs
directory, PIN_ROOT/<id>/: the two programs, the maps, and the record
(tcb_meta). Removing that directory and our two filters restores the bridge
path exactly; nothing else is ever changed.

Every operation takes the attachment's lock, so concurrent callers see one
consistent attachment or none. A failed attach tears down what it built, so
the bridge carries the traffic as before and nothing is left half-applied.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import fcntl
import logging
import os
import signal
import time
from typing import Iterator

from . import bpfsys, loader, netdev, netns, tc
from .errors import BpfError, BusyError, DeviceError, TcbError
from .maps import F_DHCP_TO_BRIDGE, AttachmentMaps, Counters, Direction, parse_mac, port_entry
from .model import (STATE_ACTIVE, STATE_ORPHANED, STATE_STALE, AttachResult, AttachSpec, Record, Status,
                    name_of_pin, pin_id)

log = logging.getLogger(__name__)

LOCK_DIR = "/run/tcbypass/locks"
LOCK_TIMEOUT = 30.0
STAGING = "@staging"


def failpoint(name: str) -> None:
    """Die here, as `kill -9` would, when $TCBYPASS_FAILPOINT names this point.
    The reliability tests use it to prove an interrupted attach is recovered."""
    if os.environ.get("TCBYPASS_FAILPOINT") == name:
        os.kill(os.getpid(), signal.SIGKILL)


def pin_dir_of(name: str) -> str:
    return f"{loader.PIN_ROOT}/{pin_id(name)}"


def _lock_path(name: str) -> str:
    return f"{LOCK_DIR}/{pin_id(name)}.lock"


@contextlib.contextmanager
def locked(name: str, timeout: float = LOCK_TIMEOUT) -> Iterator[None]:
    """Serialise all work on one attachment across processes.

    `detach` unlinks the lock file while holding it (so locks do not pile up
    for every VM ever run); a waiter that then wins the lock on the unlinked
    file notices the path names another inode now and starts over."""
    os.makedirs(LOCK_DIR, exist_ok=True)
    deadline = time.monotonic() + timeout
    while True:
        fd = os.open(_lock_path(name), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except OSError as exc:
                    if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                        raise
                    if time.monotonic() > deadline:
                        raise BusyError(f"attachment {name} is busy: another tcbypass holds its lock",
                                        hint="wait for it to finish and try again") from None
                    time.sleep(0.02)
            try:
                current = os.stat(_lock_path(name)).st_ino
            except FileNotFoundError:
                current = None
            if current != os.fstat(fd).st_ino:
                continue  # the holder removed the file: lock the new one
            yield
            return
        finally:
            os.close(fd)


def read_record(pin_dir: str) -> Record | None:
    """The stored record, or None when there is none (or it cannot be read)."""
    if not os.path.isdir(pin_dir):
        return None
    try:
        with AttachmentMaps(pin_dir, readonly=True) as maps:
            data = maps.read_record()
    except BpfError:
        return None
    return Record.from_json(data) if data else None


# --- attach -------------------------------------------------------------

def _devices(links: dict[str, netdev.Link], spec: AttachSpec) -> tuple[netdev.Link, netdev.Link, netdev.Link]:
    """The tap, the NIC and the bridge joining them, or a DeviceError saying what is wrong."""
    where = f"in {spec.netns}"
    for role, name in (("tap", spec.tap), ("NIC", spec.nic)):
        if name not in links:
            raise DeviceError(f"no device {name!r} {where} (the {role})",
                              hint="check the names with: nsenter --net=NETNS ip link")
    tap, nic = links[spec.tap], links[spec.nic]
    if tap.index == nic.index:
        raise DeviceError(f"the tap and the NIC are the same device ({spec.tap})", hint="give two devices")
    by_index = {link.index: link for link in links.values()}
    bridge = by_index.get(tap.master)
    if bridge is None or bridge.kind != "bridge" or nic.master != tap.master:
        raise DeviceError(f"{spec.tap} and {spec.nic} are not ports of one bridge {where}",
                          hint="tcbypass bypasses the bridge that joins them (k6t-eth0 with bridge binding)")
    return tap, nic, bridge


def attach(spec: AttachSpec, test_build: bool = False, peer: bool = False) -> AttachResult:
    """Attach (or refresh) the fast path for one tap/NIC pair. Idempotent.

    `test_build` selects the test build; `peer` (or spec.redirect_peer) the
    bpf_redirect_peer() build for the from-VM direction.
    """
    peer = peer or spec.redirect_peer
    started = time.monotonic()
    vm_mac = parse_mac(spec.mac)
    pin_dir = pin_dir_of(spec.name)
    loader.bpffs_ready()
    with locked(spec.name):
        ref = netns.resolve(spec.netns)
        with netdev.open_netns(ref.path) as ipr:
            tap, nic, bridge = _devices(netdev.list_links(ipr), spec)
            if peer and nic.kind != "veth":
                raise DeviceError(f"--redirect-peer needs a veth pod NIC; {nic.name} is a {nic.kind or 'plain'} "
                                  "device", hint="attach without --redirect-peer")
            old = read_record(pin_dir)
            if old is None and os.path.isdir(pin_dir):
                log.info("%s: clearing an incomplete earlier attach", spec.name)
                loader.remove_pins(pin_dir)
            want = Record(
                name=spec.name, netns=ref.path, netns_id=ref.identity,
                tap=tap.name, tap_ifindex=tap.index, nic=nic.name, nic_ifindex=nic.index,
                bridge=bridge.name, bridge_mac=bridge.mac, mac=spec.mac.lower(), dhcp_to_bridge=spec.dhcp_to_bridge,
                digest=loader.digest(test_build, peer),
                vmi=spec.vmi, namespace=spec.namespace, iface_id=spec.iface_id, managed_by=spec.managed_by,
                redirect_peer=peer,
                attached_at=old.attached_at if old else time.time(),
            )
            if old and old.complete and old.same_wiring(want) and not _problems(ipr, old, pin_dir):
                return AttachResult(old, "unchanged", time.monotonic() - started)

            fresh = old is None or old.digest != want.digest
            work_dir = pin_dir + STAGING if (old and fresh) else pin_dir
            if fresh:
                loader.remove_pins(work_dir)
                if not loader.claim_spare(work_dir, test_build, peer):
                    loader.compile_and_pin(work_dir, test=test_build, peer=peer)
            try:
                record = _program(ipr, ref, work_dir, want, vm_mac, tap, nic)
                for gone in {old.tap_ifindex, old.nic_ifindex} - {tap.index, nic.index} if old else ():
                    tc.forget_clsact(old.netns_id, gone)  # the old tap went, and its qdisc with it
                if work_dir != pin_dir:
                    loader.remove_pins(pin_dir)
                    os.rename(work_dir, pin_dir)
            except BaseException:
                log.warning("%s: attach failed; restoring the bridge path", spec.name)
                with contextlib.suppress(Exception):
                    _teardown(ipr, read_record(work_dir) or want, remove_qdisc=True)
                with contextlib.suppress(Exception):
                    loader.remove_pins(work_dir)
                with contextlib.suppress(Exception):
                    loader.remove_pins(pin_dir)
                raise
    if old is None:
        action = "attached"
    elif fresh:
        action = "replaced"
    else:
        action = "refreshed"
    log.info("%s: %s (%s -> %s, %s)", spec.name, action, tap.name, nic.name, spec.mac)
    return AttachResult(record, action, time.monotonic() - started)


def _program(ipr, ref: netns.NetnsRef, work_dir: str, want: Record, vm_mac: bytes,
             tap: netdev.Link, nic: netdev.Link) -> Record:
    """Fill the maps, then hook the programs in; the record is marked complete last."""
    flags = F_DHCP_TO_BRIDGE if want.dhcp_to_bridge else 0
    local_mac = parse_mac(want.bridge_mac) if want.bridge_mac else bytes(6)
    with AttachmentMaps(work_dir) as maps, loader.open_programs(work_dir) as progs:
        maps.write_record(want.to_json())  # from here on an interrupted attach can be cleaned up
        for ifindex in maps.port_ifindexes():
            if ifindex not in (tap.index, nic.index):
                maps.drop_port(ifindex)  # the devices of an earlier VM run, first: the map is bounded
        maps.set_port(tap.index, port_entry(vm_mac, local_mac, Direction.FROM_VM, flags))
        maps.set_port(nic.index, port_entry(vm_mac, local_mac, Direction.TO_VM, flags))
        failpoint("maps-filled")

        def point_targets() -> None:  # devmap ifindexes resolve in the writer's namespace
            maps.set_target(Direction.FROM_VM, nic.index)
            maps.set_target(Direction.TO_VM, tap.index)

        netns.run_in(ref.path, point_targets)

        tc.ensure_clsact(ipr, tap.index, want.netns_id)
        tc.ensure_clsact(ipr, nic.index, want.netns_id)
        names = _filter_names(want.name, progs)
        tc.set_filter(ipr, tap.index, progs.from_vm, names[0])
        failpoint("tap-filter-set")
        tc.set_filter(ipr, nic.index, progs.to_vm, names[1])
        record = dataclasses.replace(want, complete=True)
        maps.write_record(record.to_json())
    return record


def _filter_names(name: str, progs: loader.Programs) -> tuple[str, str]:
    """The names our filters on the tap and the NIC carry for these programs."""
    return (tc.filter_name(pin_id(name), "from_vm", bpfsys.prog_info(progs.from_vm).id),
            tc.filter_name(pin_id(name), "to_vm", bpfsys.prog_info(progs.to_vm).id))


# --- detach -------------------------------------------------------------

def _teardown(ipr, record: Record, remove_qdisc: bool = False) -> None:
    """Remove our filters from the devices that are still there; with
    `remove_qdisc`, also a clsact we added that nothing else uses."""
    links = {link.index: link for link in netdev.list_links(ipr).values()}
    for ifindex, name in ((record.tap_ifindex, record.tap), (record.nic_ifindex, record.nic)):
        link = links.get(ifindex)
        if link is None or link.name != name:
            tc.forget_clsact(record.netns_id, ifindex)  # gone, and its filters with it
            continue
        tc.remove_filter(ipr, ifindex)
        if remove_qdisc:
            tc.release_clsact(ipr, ifindex, record.netns_id)


def detach(name: str, remove_qdisc: bool = False) -> Record | None:
    """Restore the bridge path for one attachment. Returns what was attached, or None.

    A clsact qdisc tcbypass added stays (empty) unless `remove_qdisc`: adding
    or removing a qdisc can drop frames in flight (see tc.py)."""
    loader.bpffs_ready()
    with locked(name):
        return _detach_locked(name, remove_qdisc)


def _detach_locked(name: str, remove_qdisc: bool) -> Record | None:
    pin_dir = pin_dir_of(name)
    record = read_record(pin_dir) or read_record(pin_dir + STAGING)
    if record is not None and netns.identity_of(record.netns) == record.netns_id:
        with netdev.open_netns(record.netns) as ipr:
            _teardown(ipr, record, remove_qdisc)
    elif record is not None:  # the pod is gone, and its devices and qdiscs with it
        tc.forget_clsact(record.netns_id, record.tap_ifindex)
        tc.forget_clsact(record.netns_id, record.nic_ifindex)
    loader.remove_pins(pin_dir + STAGING)
    existed = record is not None or os.path.isdir(pin_dir)
    loader.remove_pins(pin_dir)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(_lock_path(name))  # still held: see locked()
    if existed:
        log.info("%s: detached", name)
    return record


# --- status -------------------------------------------------------------

def names() -> list[str]:
    """Names of all attachments pinned on this node."""
    try:
        entries = sorted(os.listdir(loader.PIN_ROOT))
    except FileNotFoundError:
        return []
    return [name_of_pin(e) for e in entries if "@" not in e]  # not staging dirs, not spares


def _problems(ipr, record: Record, pin_dir: str) -> list[str]:
    """What differs between the record and the kernel; empty when all agrees."""
    problems = []
    if not record.complete:
        problems.append("attach did not finish")
    links = netdev.list_links(ipr)
    try:
        with loader.open_programs(pin_dir) as progs:
            expected = _filter_names(record.name, progs)
    except (BpfError, OSError):
        expected = ("", "")
        problems.append("the pinned programs cannot be opened")
    for role, name, ifindex, want in (("tap", record.tap, record.tap_ifindex, expected[0]),
                                      ("nic", record.nic, record.nic_ifindex, expected[1])):
        link = links.get(name)
        ours = tc.our_filter(ipr, ifindex) if link is not None and link.index == ifindex else None
        if link is None:
            problems.append(f"{role} {name} is gone")
        elif link.index != ifindex:
            problems.append(f"{role} {name} is now ifindex {link.index} (was {ifindex})")
        elif ours is None:
            problems.append(f"our filter is missing on {name}")
        elif want and ours.name != want:
            problems.append(f"our filter on {name} runs another program instance")
    with AttachmentMaps(pin_dir, readonly=True) as maps:
        if maps.target(Direction.FROM_VM) != record.nic_ifindex:
            problems.append("no fast-path target towards the NIC")
        if maps.target(Direction.TO_VM) != record.tap_ifindex:
            problems.append("no fast-path target towards the tap")
    return problems


def status_of(name: str) -> Status | None:
    pin_dir = pin_dir_of(name)
    record = read_record(pin_dir)
    if record is None:
        if not os.path.isdir(pin_dir):
            return None
        # Pins without a readable record: an interrupted attach, or another build's layout.
        placeholder = Record(name=name, netns="?", netns_id="", tap="?", tap_ifindex=0, nic="?", nic_ifindex=0,
                             bridge="", bridge_mac="", mac="?", dhcp_to_bridge=True, digest="")
        return Status(placeholder, STATE_ORPHANED, ("unreadable pins (an interrupted attach or a foreign "
                                                    "version); 'tcbypass gc' removes them",))
    try:
        with AttachmentMaps(pin_dir, readonly=True) as maps:
            counters = maps.counters()
    except BpfError:
        counters = Counters.zero()
    if netns.identity_of(record.netns) != record.netns_id:
        return Status(record, STATE_ORPHANED, ("the pod's network namespace is gone",), counters)
    try:
        with netdev.open_netns(record.netns) as ipr:
            problems = _problems(ipr, record, pin_dir)
    except TcbError as exc:
        return Status(record, STATE_ORPHANED, (exc.message,), counters)
    return Status(record, STATE_STALE if problems else STATE_ACTIVE, tuple(problems), counters)


def statuses() -> list[Status]:
    if not os.path.ismount(loader.BPFFS):
        raise BpfError(f"bpffs is not mounted on {loader.BPFFS}: no attachment can be read (programs may still "
                       "run on devices whose pins vanished with the mount)",
                       hint=f"mount it again: mount -t bpf bpf {loader.BPFFS}")
    return [s for s in map(status_of, names()) if s is not None]


# --- garbage collection ---------------------------------------------------

def _leftover(status: Status) -> bool:
    """Orphaned, or an attach that never completed. (Attach holds the lock from
    before it writes the record until it completes it, so under the lock an
    incomplete record means that attach died.)"""
    return status.state == STATE_ORPHANED or not status.record.complete

def gc() -> list[str]:
    """Remove what no live attachment needs: attachments whose pod is gone,
    unreadable pins, staging and half-built directories left by a killed
    process. Live attachments (even stale ones) are left alone."""
    loader.bpffs_ready()
    removed = []
    try:
        entries = sorted(os.listdir(loader.PIN_ROOT))
    except FileNotFoundError:
        return removed
    for entry in entries:
        if entry.startswith(loader.SPARE_PREFIX):
            continue  # complete spares belong to a running agent
        if entry.startswith("@building-"):
            pid = entry.split("-")[1]
            if not os.path.exists(f"/proc/{pid}"):
                loader.remove_pins(f"{loader.PIN_ROOT}/{entry}")
                removed.append(entry)
            continue
        name = name_of_pin(entry.removesuffix(STAGING))
        try:
            if entry.endswith(STAGING):
                with locked(name, timeout=0.5):  # held while an attach is under way
                    loader.remove_pins(f"{loader.PIN_ROOT}/{entry}")
                removed.append(entry)
            elif (status := status_of(name)) is not None and _leftover(status):
                with locked(name, timeout=0.5):
                    # Judge again under the lock: an attach may have finished meanwhile.
                    status = status_of(name)
                    if status is not None and _leftover(status):
                        _detach_locked(name, remove_qdisc=False)
                        removed.append(name)
        except BusyError:
            continue  # someone is working on it right now
    if tc.forget_dead_owners(netns.live_identities()):
        removed.append("clsact ownership markers of deleted pods")
    return removed
