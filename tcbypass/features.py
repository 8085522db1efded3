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

The choice made from them (`choose`) is reported by `tcbypass doctor` and,
per attachment, by `status`.
"""

from __future__ import annotations

import errno
import functools
import os
import struct
from dataclasses import asdict, dataclass

from . import bpfsys

TC_ACT_UNSPEC = -1
BPF_FUNC_MAP_LOOKUP_ELEM = 1
BPF_FUNC_REDIRECT_PEER = 155

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

    def to_json(self) -> dict:
        return asdict(self)

    @property
    def best_hook(self) -> str:
        return HOOK_TCX if self.tcx else HOOK_CLSACT


@functools.lru_cache(maxsize=1)
def probe() -> Features:
    """Ask the kernel (needs CAP_BPF or root). Cached for the process."""
    return Features(tcx=_probe_tcx(), redirect_peer=_probe_redirect_peer(),
                    devmap_lookup=_probe_devmap_lookup(), run_time_stats=_probe_stats())
