"""Attach, detach and check one tap/NIC pair: the core of tcbypass.

An attachment is the unit everything else is built from (`attach <vmi>`
makes one per bridge-bound NIC). Its whole state lives in one bpffs
directory, PIN_ROOT/<id>/: the two programs, the maps, the record
(tcb_meta) and the tcx links. Removing that directory and our hooks
restores the bridge path exactly; nothing else is ever changed. How all
attachments of the node are doing, and gc, are in health.py.

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
import socket
import time
from dataclasses import dataclass
from typing import Callable, Iterator

from . import bpfsys, build, failpoints, features, loader, netdev, netns, paths, tc, tcx
from .errors import BpfError, BusyError, DeviceError, InputError, NetnsError, TcbError
from .maps import (F_DHCP_TO_BRIDGE, F_KERNEL_TYPES, F_PEER, F_PEER_ALL, META, TAP, AttachmentMaps, Direction,
                   config_entry, mtu_flags, parse_mac)
from .model import AttachResult, AttachSpec, Record, name_of_pin, pin_id

log = logging.getLogger(__name__)

ENV_HOOK = "TCBYPASS_HOOK"  # tcx or clsact instead of the best the kernel has
LOCK_DIR = f"{paths.RUN_DIR}/locks"
LOCK_TIMEOUT = 30.0
STAGING = "@staging"


def pin_dir_of(name: str) -> str:
    return f"{loader.PIN_ROOT}/{pin_id(name)}"


def _lock_path(name: str) -> str:
    return f"{LOCK_DIR}/{pin_id(name)}.lock"


def _open_lock(name: str) -> int:
    try:
        os.makedirs(LOCK_DIR, exist_ok=True)
        return os.open(_lock_path(name), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        raise TcbError(f"cannot create the lock of {name} in {LOCK_DIR} ({exc.strerror})",
                       hint="it must be writable and the node's own (a container mounts the node's /run/tcbypass)"
                       ) from None


@contextlib.contextmanager
def _locked(name: str, timeout: float = LOCK_TIMEOUT) -> Iterator[None]:
    """Serialise all work on one attachment across processes.

    Whoever holds the lock last for a name that has nothing pinned any more
    (after a detach, a failed attach, a gc that found nothing) unlinks the
    lock file while still holding it, so locks do not pile up for every VM
    ever run; a waiter that then wins the lock on the unlinked file notices
    the path names another inode now and starts over."""
    deadline = time.monotonic() + timeout
    while True:
        fd = _open_lock(name)
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
            try:
                yield
            finally:
                if not any(os.path.exists(d) for d in (pin_dir_of(name), pin_dir_of(name) + STAGING,
                                                      legacy_dir(name))):
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(_lock_path(name))  # still held: see above
            return
        finally:
            os.close(fd)


def read_record(pin_dir: str) -> Record | None:
    """The stored record, or None when there is none (or it cannot be read)."""
    if not os.path.isdir(pin_dir):
        return None
    try:
        with AttachmentMaps(pin_dir, readonly=True, only=(META,)) as maps:
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


def choose_hook(requested: str, found: features.Features) -> str:
    """tcx where the kernel has it, clsact otherwise; or what was asked for, if it can be had."""
    hook = requested or os.environ.get(ENV_HOOK, "") or found.best_hook
    if hook not in features.HOOKS:
        raise InputError(f"unknown hook {hook!r}", hint=f"use one of: {', '.join(features.HOOKS)}")
    if hook == features.HOOK_TCX and not found.tcx:
        raise InputError("this kernel has no tcx (it came with Linux 6.6)",
                         hint="use --hook clsact, or leave --hook out to pick the best hook by itself")
    return hook


def _check_mtus(tap: netdev.Link, nic: netdev.Link, host: netdev.Link | None) -> None:
    """Over the bridge, a frame for the VM longer than the tap's MTU is dropped
    (the bridge checks every port it forwards to), and one from the VM longer
    than the pod NIC's is dropped the same way. The program holds the smaller
    of the pod NIC's and its host side's MTU for frames from the VM (longer
    ones take the veth's own path, which drops them as the bridge does); a
    tap whose MTU is below the pod NIC's would let frames through to the VM
    that the bridge drops, so that wiring is refused. KubeVirt gives the tap
    the pod's MTU."""
    if tap.mtu and nic.mtu and tap.mtu < nic.mtu:
        raise DeviceError(f"{tap.name}'s MTU ({tap.mtu}) is below {nic.name}'s ({nic.mtu}): bypassing the bridge "
                          f"would hand the VM frames the bridge drops",
                          hint=f"give {tap.name} the pod's MTU, as KubeVirt does: ip link set {tap.name} mtu {nic.mtu}")


def choose_mode(requested: str, nic: netdev.Link, host: netdev.Link | None, found: features.Features) -> str:
    """How frames from the VM leave (features.MODE_*).

    By bpf_redirect_peer() straight into the host side of the pod veth
    wherever that works: every frame when the host side is a switch port
    (it has a master: OVS's kernel datapath, a bridge), else only frames for
    the host side's own MAC (see tcb_by_peer() in bpf/redirect.c for why).
    Asked for and impossible is an error; left to us, it falls back to
    bpf_redirect() through the pod NIC."""
    if requested not in ("", features.MODE_PEER, features.MODE_REDIRECT):
        raise InputError(f"unknown from-VM mode {requested!r}", hint="use peer or redirect")
    if requested == features.MODE_REDIRECT:
        return features.MODE_REDIRECT
    why = ""
    if not found.redirect_peer:
        why = "this kernel has no bpf_redirect_peer() (it came with Linux 5.10)"
    elif nic.kind != "veth":
        why = f"the pod NIC {nic.name} is a {nic.kind or 'plain'} device, not a veth"
    elif host is None:
        why = f"the host side of {nic.name} cannot be found in another namespace"
    if not why:
        return features.MODE_PEER if host.master else features.MODE_PEER_HOST
    if requested == features.MODE_PEER:
        raise DeviceError(f"cannot hand frames to the host side by peer: {why}",
                          hint="attach with --from-vm redirect (or leave the mode out to fall back by itself)")
    log.info("%s: frames from the VM take bpf_redirect(): %s", nic.name, why)
    return features.MODE_REDIRECT


def attach(spec: AttachSpec, test_build: bool = False) -> AttachResult:
    """Attach (or refresh) the fast path for one tap/NIC pair. Idempotent.

    `test_build` selects the TCB_TEST build (the datapath tests' recorder).
    """
    started = time.monotonic()
    vm_mac = parse_mac(spec.mac)
    pin_dir = pin_dir_of(spec.name)
    loader.bpffs_ready()
    found = features.probe()
    hook = choose_hook(spec.hook, found)
    which = build.Build(test=test_build, no_peer=not found.redirect_peer)
    with _locked(spec.name):
        ref = netns.resolve(spec.netns)
        with netdev.open_netns(ref.path) as ipr:
            tap, nic, bridge = _devices(netdev.list_links(ipr), spec)
            host = netdev.host_side(ipr, nic)
            failpoints.hit("devices-read", spec.name)
            mode = choose_mode(spec.from_vm, nic, host, found)
            old = read_record(pin_dir)
            if old is None and os.path.isdir(pin_dir):
                log.info("%s: clearing an incomplete earlier attach", spec.name)
                _teardown(ipr, pin_dir, None)
                loader.remove_pins(pin_dir)
            _check_mtus(tap, nic, host)
            want = Record(
                name=spec.name, netns=ref.path, netns_id=ref.identity,
                tap=tap.name, tap_ifindex=tap.index, nic=nic.name, nic_ifindex=nic.index,
                bridge=bridge.name, bridge_mac=bridge.mac, mac=spec.mac.lower(), dhcp_to_bridge=spec.dhcp_to_bridge,
                digest=build.key(which),
                vmi=spec.vmi, namespace=spec.namespace, iface_id=spec.iface_id, managed_by=spec.managed_by,
                from_vm=mode, host_mac=host.mac if host else "", hook=hook,
                mtu=min(m for m in (nic.mtu, host.mtu if host else 0) if m) if nic.mtu else 0,
                attached_at=old.attached_at if old else time.time(),
            )
            if old and old.complete and old.same_wiring(want) and not problems(old, pin_dir, ipr):
                return AttachResult(old, "unchanged", time.monotonic() - started)

            fresh = old is None or old.digest != want.digest
            work_dir = pin_dir + STAGING if (old and fresh) else pin_dir
            if fresh:
                loader.remove_pins(work_dir)
                loader.load_and_pin(work_dir, which)
            try:
                record = _program(ipr, ref, work_dir, pin_dir, want, vm_mac)
                for gone in {old.tap_ifindex, old.nic_ifindex} - {tap.index, nic.index} if old else ():
                    tc.forget_clsact(old.netns_id, gone)  # the old tap went, and its qdisc with it
                if work_dir != pin_dir:
                    tcx.move(pin_dir, work_dir)  # the links now run the new programs: they go with them
                    loader.remove_pins(pin_dir)
                    os.rename(work_dir, pin_dir)
                _forget_legacy(ipr, spec.name)
            except BaseException:
                log.warning("%s: attach failed; restoring the bridge path", spec.name)
                with contextlib.suppress(Exception):
                    _teardown(ipr, work_dir, read_record(work_dir) or want, remove_qdisc=True)
                with contextlib.suppress(Exception):
                    _teardown(ipr, pin_dir, None)
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
    log.info("%s: %s (%s -> %s, %s, %s, from the VM by %s)", spec.name, action, tap.name, nic.name, spec.mac,
             hook, record.from_vm)
    return AttachResult(record, action, time.monotonic() - started)


def _program(ipr, ref: netns.NetnsRef, work_dir: str, link_dir: str, want: Record, vm_mac: bytes) -> Record:
    """Fill the maps of the instance in `work_dir`, then hook its programs in;
    the record is marked complete last. tcx links stay pinned in `link_dir`
    (the attachment's directory) while their programs are swapped in place,
    so that status sees a half-done swap as it is."""
    flags = (F_DHCP_TO_BRIDGE if want.dhcp_to_bridge else 0) | {
        features.MODE_PEER: F_PEER | F_PEER_ALL, features.MODE_PEER_HOST: F_PEER}.get(want.from_vm, 0) | mtu_flags(want.mtu)
    if want.from_vm != features.MODE_REDIRECT and features.probe().kernel_types_peer:
        flags |= F_KERNEL_TYPES  # the kernel types peer-redirected frames: no call to do it
    bridge_mac = parse_mac(want.bridge_mac) if want.bridge_mac else bytes(6)
    host_mac = parse_mac(want.host_mac) if want.host_mac else bytes(6)
    with AttachmentMaps(work_dir) as maps, loader.open_programs(work_dir) as progs:
        maps.write_record(want.to_json())  # from here on an interrupted attach can be cleaned up
        maps.set_config(config_entry(vm_mac, bridge_mac, host_mac, flags, want.tap_ifindex, want.nic_ifindex))
        failpoints.hit("maps-filled", want.name)

        netns.run_in(ref.path, lambda: maps.set_tap(want.tap_ifindex))  # a devmap resolves in the writer's netns
        hooks = ((Direction.FROM_VM, want.tap_ifindex, progs.from_vm), (Direction.TO_VM, want.nic_ifindex, progs.to_vm))
        if want.hook == features.HOOK_TCX:
            for direction, ifindex, prog in hooks:
                tcx.ensure(link_dir, direction, ref.path, ifindex, prog)
                failpoints.hit("tap-hooked", want.name)
            # Our tcx links run before any clsact filter: only now take off the
            # filters an earlier clsact attachment left (this version's or an older one's).
            for _, ifindex, _ in hooks:
                tc.remove_filter(ipr, ifindex)
        else:
            names = _filter_names(want.name, progs)
            for (direction, ifindex, prog), name in zip(hooks, names):
                tc.ensure_clsact(ipr, ifindex, want.netns_id)
                tc.set_filter(ipr, ifindex, prog, name)
                failpoints.hit("tap-hooked", want.name)
            for direction in Direction:  # a switch from tcx: the filters are in, now the links go
                tcx.remove(link_dir, direction)
        record = dataclasses.replace(want, complete=True)
        maps.write_record(record.to_json())
    return record


def _filter_names(name: str, progs: loader.Programs) -> tuple[str, str]:
    """The names our filters on the tap and the NIC carry for these programs."""
    from_id, to_id = progs.ids()
    return (tc.filter_name(pin_id(name), "from_vm", from_id), tc.filter_name(pin_id(name), "to_vm", to_id))


# --- detach -------------------------------------------------------------

def _teardown(ipr, pin_dir: str, record: Record | None, remove_qdisc: bool = False) -> None:
    """Take our hooks off: the tcx links pinned in `pin_dir` (live or defunct)
    and, on the record's devices that are still there, our clsact filters;
    with `remove_qdisc`, also a clsact we added that nothing else uses."""
    for direction in Direction:
        tcx.remove(pin_dir, direction)
    if record is None:
        return
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
    with _locked(name):
        return _detach_locked(name, remove_qdisc)


def _open_pod(record: Record | None, name: str):
    """An rtnetlink socket in the recorded pod's namespace, or None when that
    namespace is gone: deleted before we looked or while we opened it (the
    pod's normal end, never an error). Once open, the socket holds the
    namespace, so it cannot go away under the caller."""
    if record is None or netns.identity_of(record.netns) != record.netns_id:
        return None
    failpoints.hit("detach-opening", name)
    try:
        return netdev.open_netns(record.netns)
    except NetnsError:
        if netns.identity_of(record.netns) == record.netns_id:
            raise  # there, but closed to us: not gone
        return None


def _detach_locked(name: str, remove_qdisc: bool) -> Record | None:
    pin_dir = pin_dir_of(name)
    legacy = legacy_dir(name)
    records = [(d, read_record(d)) for d in (pin_dir, pin_dir + STAGING, legacy)]
    found = next((r for _, r in records if r is not None), None)
    for directory, record in records:
        opened = _open_pod(record, name)
        if opened is not None:
            with opened as ipr:
                _teardown(ipr, directory, record, remove_qdisc)
        else:  # the pod is gone, and its devices and qdiscs with it
            for direction in Direction:
                tcx.remove(directory, direction)
            if record is not None:
                tc.forget_clsact(record.netns_id, record.tap_ifindex)
                tc.forget_clsact(record.netns_id, record.nic_ifindex)
    existed = found is not None or any(os.path.isdir(d) for d, _ in records)
    for directory, _ in records:
        loader.remove_pins(directory)
    if existed:
        log.info("%s: detached", name)
    return found


# --- clearing leftovers (health.gc decides what is one) ---------------------------

def entry_name(entry: str) -> str:
    """The attachment a PIN_ROOT entry belongs to (a staging directory's too)."""
    return name_of_pin(entry.removesuffix(STAGING))


def is_staging(entry: str) -> bool:
    """Is this PIN_ROOT entry a new instance being put in place (or left by a killed attach)?"""
    return entry.endswith(STAGING)


def clear_staging(name: str, timeout: float = 0.5) -> None:
    """Remove the staging directory a killed attach left; BusyError while an attach is under way."""
    with _locked(name, timeout=timeout):
        loader.remove_pins(pin_dir_of(name) + STAGING)


def detach_if(name: str, still: Callable[[], bool], timeout: float = 0.5) -> bool:
    """Detach `name` if `still()`, judged again under its lock (an attach may have
    finished meanwhile); BusyError when someone holds it longer than `timeout`."""
    with _locked(name, timeout=timeout):
        if not still():
            return False
        _detach_locked(name, remove_qdisc=False)
        return True


def remove_defunct_links(name: str, timeout: float = 0.5) -> list[Direction]:
    """Unpin the tcx links whose device was deleted (a restarted VM's old tap)."""
    removed = []
    with _locked(name, timeout=timeout):
        for direction in Direction:
            with contextlib.suppress(OSError):
                if (link := tcx.read(pin_dir_of(name), direction)) is not None and link.defunct:
                    tcx.remove(pin_dir_of(name), direction)
                    removed.append(direction)
    return removed


def prune_locks(pinned: set[str]) -> None:
    """Drop the lock files of names nothing is pinned for (a killed process's)."""
    for lock in netns.listdir(LOCK_DIR):
        name = name_of_pin(lock.removesuffix(".lock"))
        if lock.endswith(".lock") and name not in pinned:
            with contextlib.suppress(BusyError, InputError), _locked(name, timeout=0):
                pass  # leaving the lock unlinks the file: nothing is pinned


# --- pins of older tcbypass versions -------------------------------------------

def legacy_dir(name: str) -> str:
    return f"{loader.LEGACY_ROOTS[0]}/{pin_id(name)}"


def _forget_legacy(ipr, name: str) -> None:
    """After an attach replaced what an older tcbypass attached (its clsact
    filters carry the same priority, handle and name prefix as ours, so they
    were swapped or taken off on the way), drop its pins."""
    legacy = legacy_dir(name)
    if os.path.isdir(legacy):
        loader.remove_pins(legacy)
        log.info("%s: upgraded from an older tcbypass (pins in %s removed)", name, legacy)


# --- what differs from the kernel ---------------------------------------

@dataclass(frozen=True)
class _Devices:
    """What the pod's namespace says about an attachment's two devices."""

    index: dict  # device name -> its ifindex now (None: no such device)
    tcx: dict  # ifindex -> ids of the programs on its tcx ingress


def _look(record: Record) -> _Devices:
    """Read the devices from inside the pod's namespace, in one thread: an
    ioctl per name and a BPF_PROG_QUERY per device, no netlink dump (status
    does this for every attachment of the node)."""
    def body() -> _Devices:
        index, programs = {}, {}
        for name in (record.tap, record.nic):
            try:
                index[name] = socket.if_nametoindex(name)
            except OSError:
                index[name] = None
        if record.hook == features.HOOK_TCX:
            for ifindex in filter(None, index.values()):
                try:
                    programs[ifindex] = bpfsys.tcx_programs(ifindex)
                except OSError:
                    programs[ifindex] = []
        return _Devices(index, programs)
    return netns.run_in(record.netns, body)


def problems(record: Record, pin_dir: str, ipr=None) -> list[str]:
    """What differs between the record and the kernel; empty when all agrees.
    `ipr`: an rtnetlink socket in the pod, if the caller has one (clsact
    attachments need it to read filters; one is opened otherwise)."""
    problems = []
    if not record.complete:
        problems.append("attach did not finish")
    devices = _look(record)
    try:
        with loader.open_programs(pin_dir) as progs:
            prog_ids = progs.ids()
            filter_names = _filter_names(record.name, progs)
    except (BpfError, OSError):
        prog_ids, filter_names = (0, 0), ("", "")
        problems.append("the pinned programs cannot be opened")
    roles = (("tap", record.tap, record.tap_ifindex, Direction.FROM_VM),
             ("nic", record.nic, record.nic_ifindex, Direction.TO_VM))
    for role, name, ifindex, direction in roles:
        now = devices.index.get(name)
        if now is None:
            problems.append(f"{role} {name} is gone")
        elif now != ifindex:
            problems.append(f"{role} {name} is now ifindex {now} (was {ifindex})")
        if record.hook == features.HOOK_TCX:
            # Read from the device's side (BPF_PROG_QUERY), not by opening the
            # link pin: a link opens read-write only, and status must work on
            # a read-only bpffs too.
            if not os.path.exists(tcx.pin_of(pin_dir, direction)):
                problems.append(f"our tcx link on {name} is missing")
            elif now != ifindex:
                problems.append(f"our tcx link on {name} is defunct (its device was deleted)")
            elif prog_ids[direction] not in devices.tcx.get(ifindex, []):
                problems.append(f"our program is not on {name}'s tcx hook")
        elif now == ifindex:
            with contextlib.ExitStack() as stack:
                sock = ipr or stack.enter_context(netdev.open_netns(record.netns))
                ours_filter = tc.our_filter(sock, ifindex)
            if ours_filter is None:
                problems.append(f"our filter is missing on {name}")
            elif filter_names[direction] and ours_filter.name != filter_names[direction]:
                problems.append(f"our filter on {name} runs another program instance")
    with AttachmentMaps(pin_dir, readonly=True, only=(TAP,)) as maps:
        if maps.tap() != record.tap_ifindex:
            problems.append("no fast-path target towards the tap")
    return problems
