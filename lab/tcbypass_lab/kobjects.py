"""The kernel's BPF objects as the lab counts them: every loaded program, map and
link by id, what one attachment holds (its footprint), and what is left of
attachments after they went. The scale bench and the soak count with it.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import time
from dataclasses import dataclass
from typing import Sequence

from tcbypass import attachments, bpfsys, loader, netns
from tcbypass.maps import META, PROG_FROM_VM, PROG_TO_VM
from tcbypass.model import pin_id

# bpfsys wraps what the node needs; walking every object id is only the lab's
# business, so these commands are made here.
_NEXT_ID = {"prog": 11, "map": 12, "link": 31}  # BPF_{PROG,MAP,LINK}_GET_NEXT_ID
_BPF_MAP_GET_FD_BY_ID = 14


class _IdAttr(ctypes.Structure):
    _fields_ = [("id", ctypes.c_uint32), ("next_id", ctypes.c_uint32), ("open_flags", ctypes.c_uint32)]


def ids(kind: str) -> list[int]:
    """Ids of every loaded BPF object of `kind` (prog, map, link) on the machine."""
    cmd, out, current = _NEXT_ID[kind], [], 0
    while True:
        attr = _IdAttr(current, 0, 0)
        try:
            bpfsys._bpf(cmd, attr, "next id")  # noqa: SLF001 - see above
        except OSError as exc:
            if exc.errno == errno.ENOENT:
                return out
            raise
        current = attr.next_id
        out.append(current)


def _map_fd_by_id(map_id: int) -> int:
    return bpfsys._bpf(_BPF_MAP_GET_FD_BY_ID, _IdAttr(map_id, 0, 0), f"open map id {map_id}")  # noqa: SLF001


def _exists(opener, object_id: int) -> bool:
    try:
        os.close(opener(object_id))
    except OSError as exc:
        if exc.errno == errno.ENOENT:
            return False
        raise
    return True


def _link_fd_by_id(link_id: int) -> int:
    return bpfsys._bpf(bpfsys.BPF_LINK_GET_FD_BY_ID, _IdAttr(link_id, 0, 0), f"open link id {link_id}")  # noqa: SLF001


def tcb_objects() -> dict:
    """Programs and maps named tcb_* on the whole machine (any bpffs, any process),
    and the links that run such a program."""
    progs, maps, ours = 0, 0, set()
    for prog_id in ids("prog"):
        with contextlib.suppress(OSError):
            fd = bpfsys.prog_fd_by_id(prog_id)
            try:
                if bpfsys.prog_info(fd).name.startswith("tcb_"):
                    progs += 1
                    ours.add(prog_id)
            finally:
                os.close(fd)
    for map_id in ids("map"):
        with contextlib.suppress(OSError):
            fd = _map_fd_by_id(map_id)
            try:
                maps += bpfsys.map_info(fd).name.startswith("tcb_")
            finally:
                os.close(fd)
    links = 0
    for link_id in ids("link"):
        with contextlib.suppress(OSError):
            fd = _link_fd_by_id(link_id)
            try:
                links += bpfsys.link_info(fd).prog_id in ours
            finally:
                os.close(fd)
    return {"programs": progs, "maps": maps, "links": links}


def _memlock(fd: int) -> int:
    with open(f"/proc/self/fdinfo/{fd}") as f:
        for line in f:
            if line.startswith("memlock:"):
                return int(line.split()[1])
    return 0


@dataclass
class Footprint:
    """What one attachment holds in the kernel."""

    name: str
    prog_ids: tuple[int, ...]
    map_ids: tuple[int, ...]
    prog_bytes: int
    map_bytes: int


def footprint(name: str) -> Footprint:
    """The programs and maps pinned for one attachment: ids and memlock."""
    pin_dir = attachments.pin_dir_of(name)
    prog_ids, map_ids, prog_bytes, map_bytes = [], [], 0, 0
    for prog in (PROG_FROM_VM, PROG_TO_VM):
        fd = bpfsys.obj_get(f"{pin_dir}/{prog}", readonly=True)
        try:
            prog_ids.append(bpfsys.prog_info(fd).id)
            prog_bytes += _memlock(fd)
            used = bpfsys.prog_map_ids(fd)
        finally:
            os.close(fd)
        map_ids += [m for m in used if m not in map_ids]
    fd = bpfsys.obj_get(f"{pin_dir}/{META}", readonly=True)
    try:
        map_ids.append(bpfsys.map_info(fd).id)
    finally:
        os.close(fd)
    for map_id in map_ids:
        fd = _map_fd_by_id(map_id)
        try:
            map_bytes += _memlock(fd)
        finally:
            os.close(fd)
    return Footprint(name, tuple(prog_ids), tuple(map_ids), prog_bytes, map_bytes)


def leftovers(names: Sequence[str], prints: Sequence[Footprint], wait: float = 5.0) -> dict:
    """What remains of these attachments: pins, lock files, and programs and maps by
    id (the kernel frees them after an RCU grace period: waited for up to `wait` s)."""
    ours = {pin_id(n) for n in names}
    pins = [e for e in netns.listdir(loader.PIN_ROOT) if e.split("@")[0] in ours]
    locks = [n for n in names if os.path.exists(f"{attachments.LOCK_DIR}/{pin_id(n)}.lock")]
    deadline = time.monotonic() + wait
    while True:
        progs = [i for p in prints for i in p.prog_ids if _exists(bpfsys.prog_fd_by_id, i)]
        maps = [i for p in prints for i in p.map_ids if _exists(_map_fd_by_id, i)]
        if not (progs or maps) or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    return {"pins": len(pins), "locks": len(locks), "programs": len(progs), "maps": len(maps),
            "programs_checked": sum(len(p.prog_ids) for p in prints),
            "maps_checked": sum(len(p.map_ids) for p in prints),
            "clean": not (pins or locks or progs or maps)}


