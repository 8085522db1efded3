"""What the running kernel offers the fast path, found by asking it, never by
reading its version.

Each probe loads a program of a few instructions, or makes one call that
fails in a telling way, and leaves nothing behind (no device, no hook, no
pin). Together they take about a millisecond; the result is kept for the
life of the process.

  tcx             BPF_LINK_CREATE knows BPF_TCX_INGRESS (6.6+): a link on a
                  device that does not exist fails with ENODEV, not EINVAL
  redirect_peer   a SCHED_CLS program may call bpf_redirect_peer() (5.10+)
  devmap_lookup   a SCHED_CLS program may look up a DEVMAP, the basis of the
                  no-blackhole guarantee
  run_time_stats  BPF_ENABLE_STATS works (5.8+), for live per-packet costs
  memcg_accounting
                  BPF objects are charged to the memory cgroup (5.11+), not to
                  RLIMIT_MEMLOCK: 5.11 brought bpf_ktime_get_coarse_ns() in
                  the same release, so a program that calls it loads only
                  where memlock is no longer charged (libbpf asks the same
                  way). Where it is, the limit is raised first (see
                  `allow_locked_memory`): the kernel's default of 64 KiB
                  before 5.16, or a container runtime's, lets a few
                  attachments load and then refuses the next with EPERM.
  kernel_types_peer
                  a frame handed over by bpf_redirect_peer() arrives typed
                  PACKET_HOST whatever the program set (the helper scrubs
                  the frame since 6.15, and in stable kernels that took the
                  change, such as Debian 12's 6.1.0-57; the release says
                  nothing, so we ask): then the program need not set it. The one probe that moves a real
                  frame: two private network namespaces, two veth pairs and a
                  four-instruction program, about 0.2 s, so its answer is kept
                  in /run/tcbypass/features.json for the boot.

The path chosen from them is reported by `tcbypass doctor` and, per
attachment, by `status`.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import functools
import json
import logging
import os
import platform
import select
import socket
import struct
import tempfile
import threading
from dataclasses import asdict, dataclass

from . import bpfsys, netns, paths

log = logging.getLogger(__name__)

TC_ACT_UNSPEC = -1
BPF_FUNC_MAP_LOOKUP_ELEM = 1
BPF_FUNC_REDIRECT_PEER = 155
BPF_FUNC_KTIME_GET_COARSE_NS = 160

HOOK_TCX, HOOK_CLSACT = "tcx", "clsact"
HOOKS = (HOOK_TCX, HOOK_CLSACT)
# How frames from the VM leave: every one by bpf_redirect_peer(), only those
# for the host side's own MAC (the others by bpf_redirect()), or none.
MODE_PEER, MODE_PEER_HOST, MODE_REDIRECT = "peer", "peer-host", "redirect"


def _insn(code: int, dst: int = 0, src: int = 0, off: int = 0, imm: int = 0) -> bytes:
    return struct.pack("<BBhi", code, (src << 4) | dst, off, imm)


_EXIT_UNSPEC = _insn(0xB7, dst=0, imm=TC_ACT_UNSPEC) + _insn(0x95)  # r0 = -1; exit


def _load(name: str, code: bytes) -> int | None:
    """A tiny SCHED_CLS program's fd, or None when the kernel refuses it."""
    try:
        return bpfsys.prog_load(name, code)
    except OSError:
        return None


def _probe_redirect_peer() -> bool:
    code = _insn(0xB7, dst=1) + _insn(0xB7, dst=2) + _insn(0x85, imm=BPF_FUNC_REDIRECT_PEER) + _EXIT_UNSPEC
    fd = _load("tcb_probe_peer", code)
    if fd is None:
        return False
    os.close(fd)
    return True


def _probe_memcg_accounting() -> bool:
    fd = _load("tcb_probe_memcg", _insn(0x85, imm=BPF_FUNC_KTIME_GET_COARSE_NS) + _EXIT_UNSPEC)
    if fd is None:
        return False
    os.close(fd)
    return True


@dataclass(frozen=True)
class LockedMemory:
    """RLIMIT_MEMLOCK of this process, as kernels before 5.11 charge BPF objects to it."""

    charged: bool  # does the kernel charge BPF objects to it?
    before: int  # soft limit found (bytes; RLIM_INFINITY for none)
    now: int  # soft limit after raising it
    error: str = ""  # why it could not be raised further

    @property
    def unlimited(self) -> bool:
        import resource

        return self.now == resource.RLIM_INFINITY


@functools.lru_cache(maxsize=1)
def allow_locked_memory() -> LockedMemory:
    """Where the kernel charges BPF objects to RLIMIT_MEMLOCK, raise it as far as
    we may: to unlimited with CAP_SYS_RESOURCE (root has it), else the soft
    limit up to the hard one. Once per process; where memlock is not charged
    it is left alone."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_MEMLOCK)
    if _probe_memcg_accounting():
        return LockedMemory(False, soft, soft)
    try:
        resource.setrlimit(resource.RLIMIT_MEMLOCK, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
    except (OSError, ValueError) as exc:
        error = f"{exc}: no CAP_SYS_RESOURCE"
        with contextlib.suppress(OSError, ValueError):
            resource.setrlimit(resource.RLIMIT_MEMLOCK, (hard, hard))
        now = resource.getrlimit(resource.RLIMIT_MEMLOCK)[0]
        log.warning("this kernel charges BPF objects to RLIMIT_MEMLOCK and it can only be raised to %s bytes (%s)",
                    now, error)
        return LockedMemory(True, soft, now, error)
    log.info("this kernel charges BPF objects to RLIMIT_MEMLOCK: raised it from %s to unlimited", soft)
    return LockedMemory(True, soft, resource.RLIM_INFINITY)


def _probe_devmap_lookup() -> bool:
    try:
        map_fd = bpfsys.map_create(bpfsys.BPF_MAP_TYPE_DEVMAP, "tcb_probe_dev", 4, 4, 1)
    except OSError:
        return False
    try:
        ld_map = _insn(0x18, dst=1, src=bpfsys.BPF_PSEUDO_MAP_FD, imm=map_fd) + _insn(0)
        code = (_insn(0x62, dst=10, off=-4, imm=0)  # *(u32 *)(r10 - 4) = 0
                + ld_map  # r1 = the devmap
                + _insn(0xBF, dst=2, src=10) + _insn(0x07, dst=2, imm=-4)  # r2 = r10 - 4
                + _insn(0x85, imm=BPF_FUNC_MAP_LOOKUP_ELEM) + _EXIT_UNSPEC)
        fd = _load("tcb_probe_devm", code)
        if fd is None:
            return False
        os.close(fd)
        return True
    finally:
        os.close(map_fd)


def _probe_tcx() -> bool:
    fd = _load("tcb_probe_tcx", _EXIT_UNSPEC)
    if fd is None:
        return False
    try:
        link = bpfsys.tcx_link_create(fd, 0)  # ifindex 0 names no device
    except OSError as exc:
        return exc.errno == errno.ENODEV
    else:  # cannot happen, but never leave a link behind
        os.close(link)
        return True
    finally:
        os.close(fd)


ETH_P_PROBE = 0x88B5  # IEEE 802 local experimental ethertype
CACHE = f"{paths.RUN_DIR}/features.json"


def _probe_kernel_types_peer(tcx: bool) -> bool:
    """Does a frame redirected by peer arrive as PACKET_HOST, although it was
    PACKET_OTHERHOST where the program ran? Found by doing it, in two network
    namespaces of our own (made on a thread with unshare, gone with it):

        X: d2 -veth- d1 [program: bpf_redirect_peer(x0)]   x0 -veth- y0 :Y  <- packet socket on y0
    """
    from pyroute2 import IPRoute

    found: list = []
    libc = netns.libc()

    def enter_new() -> int:
        if libc.unshare(netns.CLONE_NEWNET) != 0:
            raise OSError(ctypes.get_errno(), "unshare(CLONE_NEWNET)")
        return os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)

    def body() -> None:
        held: list = []
        try:
            fd_x = enter_new()
            held.append(fd_x)
            fd_y = enter_new()
            held.append(fd_y)
            libc.setns(fd_x, netns.CLONE_NEWNET)
            with IPRoute() as ipr:
                ipr.link("add", ifname="d1", kind="veth", peer="d2")
                ipr.link("add", ifname="x0", kind="veth", peer={"ifname": "y0", "net_ns_fd": fd_y})
                index = {name: ipr.link_lookup(ifname=name)[0] for name in ("d1", "d2", "x0")}
                for name in index:
                    ipr.link("set", index=index[name], state="up")
            libc.setns(fd_y, netns.CLONE_NEWNET)
            with IPRoute() as ipr:
                ipr.link("set", index=ipr.link_lookup(ifname="y0")[0], state="up")
            capture = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_PROBE))
            held.append(capture)
            capture.bind(("y0", 0))
            libc.setns(fd_x, netns.CLONE_NEWNET)
            code = (_insn(0xB7, dst=1, imm=index["x0"]) + _insn(0xB7, dst=2)
                    + _insn(0x85, imm=BPF_FUNC_REDIRECT_PEER) + _insn(0x95))  # return bpf_redirect_peer(x0, 0)
            prog = bpfsys.prog_load("tcb_probe_type", code)
            held.append(prog)
            if tcx:
                held.append(bpfsys.tcx_link_create(prog, index["d1"]))
            else:
                with IPRoute() as ipr:
                    ipr.tc("add", kind="clsact", index=index["d1"])
                    ipr.tc("add-filter", kind="bpf", index=index["d1"], parent=0xFFFFFFF2, prio=1, handle=1,
                           protocol=0x0003, fd=prog, name="tcb_probe", direct_action=True)
            sender = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
            held.append(sender)
            sender.bind(("d2", 0))
            # For a MAC nobody has: PACKET_OTHERHOST on d1.
            sender.send(bytes.fromhex("02000000009902000000000188b5") + bytes(46))
            if select.select([capture], [], [], 1.0)[0]:
                found.append(capture.recvfrom(256)[1][2] == socket.PACKET_HOST)
        except Exception as exc:  # a probe that cannot run answers "no": the program sets the type
            log.debug("packet-type probe: %s", exc)
        finally:
            for thing in reversed(held):
                with contextlib.suppress(OSError):
                    thing.close() if isinstance(thing, socket.socket) else os.close(thing)

    thread = threading.Thread(target=body, name="tcbypass-probe", daemon=True)
    thread.start()
    thread.join(10)
    return bool(found and found[0])


def _boot_key() -> str:
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            boot = f.read().strip()
    except OSError:
        boot = ""
    return f"{boot} {platform.release()}"


def _cached_kernel_types_peer(tcx: bool) -> bool:
    """The packet-type probe's answer, kept for this boot of this kernel."""
    key = _boot_key()
    with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
        with open(CACHE) as f:
            data = json.load(f)
        if data["boot"] == key:
            return bool(data["kernel_types_peer"])
    answer = _probe_kernel_types_peer(tcx)
    with contextlib.suppress(OSError):
        os.makedirs(os.path.dirname(CACHE), exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".features-", dir=os.path.dirname(CACHE))
        with os.fdopen(fd, "w") as f:
            json.dump({"boot": key, "kernel_types_peer": answer}, f)
        os.replace(tmp, CACHE)
    return answer


def _probe_stats() -> bool:
    try:
        os.close(bpfsys.enable_run_time_stats())
        return True
    except OSError:
        return False


@dataclass(frozen=True)
class Features:
    tcx: bool
    redirect_peer: bool
    devmap_lookup: bool
    run_time_stats: bool
    kernel_types_peer: bool = False
    memcg_accounting: bool = True

    def to_json(self) -> dict:
        return asdict(self)

    @property
    def best_hook(self) -> str:
        return HOOK_TCX if self.tcx else HOOK_CLSACT


@functools.lru_cache(maxsize=1)
def probe() -> Features:
    """Ask the kernel (needs CAP_BPF or root). Cached for the process. Raises
    RLIMIT_MEMLOCK first where the kernel charges BPF objects to it."""
    memlock = allow_locked_memory()
    tcx, peer = _probe_tcx(), _probe_redirect_peer()
    return Features(tcx=tcx, redirect_peer=peer, devmap_lookup=_probe_devmap_lookup(),
                    run_time_stats=_probe_stats(), kernel_types_peer=peer and _cached_kernel_types_peer(tcx),
                    memcg_accounting=not memlock.charged)
