"""The bpf(2) system call, as tcbypass uses it: a few typed wrappers and
nothing else.

Everything after compilation goes through here: creating maps and loading
programs from a compiled object (loader.py), pinning and opening pins,
reading and writing maps, tcx links (BPF_LINK_CREATE with BPF_TCX_INGRESS,
kernel 6.6+), object info, BPF_PROG_TEST_RUN and run-time statistics. The
calls are made directly, not through libbpf: Debian 12's libbpf 1.1
predates tcx, and a node that attaches from a prepared build then needs
neither a compiler nor a BPF library, only the kernel.

Each wrapper fills one member of `union bpf_attr` (uapi/linux/bpf.h) as a
ctypes structure laid out like the kernel's, and raises OSError with the
kernel's errno on failure.
"""

from __future__ import annotations

import ctypes
import errno
import functools
import os
import platform
from dataclasses import dataclass

# Commands (enum bpf_cmd).
BPF_MAP_CREATE = 0
BPF_MAP_LOOKUP_ELEM = 1
BPF_MAP_UPDATE_ELEM = 2
BPF_MAP_DELETE_ELEM = 3
BPF_MAP_GET_NEXT_KEY = 4
BPF_PROG_LOAD = 5
BPF_OBJ_PIN = 6
BPF_OBJ_GET = 7
BPF_PROG_TEST_RUN = 10
BPF_PROG_GET_FD_BY_ID = 13
BPF_OBJ_GET_INFO_BY_FD = 15
BPF_PROG_QUERY = 16
BPF_LINK_CREATE = 28
BPF_LINK_UPDATE = 29
BPF_LINK_GET_FD_BY_ID = 30
BPF_ENABLE_STATS = 32
BPF_LINK_DETACH = 34

# Program, map, attach and link types used here.
BPF_PROG_TYPE_SCHED_CLS = 3
BPF_MAP_TYPE_HASH = 1
BPF_MAP_TYPE_ARRAY = 2
BPF_MAP_TYPE_PERCPU_ARRAY = 6
BPF_MAP_TYPE_DEVMAP = 14
BPF_TCX_INGRESS = 46
BPF_LINK_TYPE_TCX = 11
BPF_STATS_RUN_TIME = 0

BPF_ANY = 0
BPF_F_RDONLY = 1 << 3  # file flags of a read-only open
BPF_PSEUDO_MAP_FD = 1  # src_reg of a ld_imm64 that loads a map by fd

_SYS_BPF = {"x86_64": 321, "aarch64": 280, "arm64": 280}


@functools.lru_cache(maxsize=1)
def _syscall():
    libc = ctypes.CDLL(None, use_errno=True)
    fn = libc.syscall
    fn.restype = ctypes.c_long
    fn.argtypes = [ctypes.c_long, ctypes.c_int, ctypes.c_void_p, ctypes.c_uint]
    return fn


def _bpf(cmd: int, attr: ctypes.Structure, what: str) -> int:
    number = _SYS_BPF.get(platform.machine())
    if number is None:
        raise OSError(errno.ENOSYS, f"{what}: no bpf(2) number known for {platform.machine()}")
    ret = _syscall()(number, cmd, ctypes.byref(attr), ctypes.sizeof(attr))
    if ret < 0:
        code = ctypes.get_errno()
        raise OSError(code, f"{what}: {os.strerror(code)}")
    return ret


def _addr(obj) -> int:
    return ctypes.addressof(obj) if obj is not None else 0


# --- maps ------------------------------------------------------------------
class _MapCreateAttr(ctypes.Structure):
    _fields_ = [("map_type", ctypes.c_uint32), ("key_size", ctypes.c_uint32), ("value_size", ctypes.c_uint32),
                ("max_entries", ctypes.c_uint32), ("map_flags", ctypes.c_uint32), ("inner_map_fd", ctypes.c_uint32),
                ("numa_node", ctypes.c_uint32), ("map_name", ctypes.c_char * 16)]


def map_create(map_type: int, name: str, key_size: int, value_size: int, max_entries: int, flags: int = 0) -> int:
    """A new map; returns its fd (the caller closes it)."""
    attr = _MapCreateAttr(map_type, key_size, value_size, max_entries, flags, 0, 0, name.encode()[:15])
    return _bpf(BPF_MAP_CREATE, attr, f"create map {name}")


class _MapElemAttr(ctypes.Structure):
    _fields_ = [("map_fd", ctypes.c_uint32), ("key", ctypes.c_uint64), ("value", ctypes.c_uint64),
                ("flags", ctypes.c_uint64)]


def map_update(fd: int, key, value, flags: int = BPF_ANY) -> None:
    _bpf(BPF_MAP_UPDATE_ELEM, _MapElemAttr(fd, _addr(key), _addr(value), flags), "map update")


def map_lookup(fd: int, key, value) -> bool:
    """Fill `value` and return True, or return False when the key is absent."""
    try:
        _bpf(BPF_MAP_LOOKUP_ELEM, _MapElemAttr(fd, _addr(key), _addr(value), 0), "map lookup")
    except OSError as exc:
        if exc.errno == errno.ENOENT:
            return False
        raise
    return True


def map_delete(fd: int, key) -> bool:
    """Delete `key`; False when it was not there (already done)."""
    try:
        _bpf(BPF_MAP_DELETE_ELEM, _MapElemAttr(fd, _addr(key), 0, 0), "map delete")
    except OSError as exc:
        if exc.errno == errno.ENOENT:
            return False
        raise
    return True


def map_keys(fd: int, key_type) -> list:
    keys, prev = [], None
    while True:
        nxt = key_type()
        try:
            _bpf(BPF_MAP_GET_NEXT_KEY, _MapElemAttr(fd, _addr(prev), _addr(nxt), 0), "map next key")
        except OSError as exc:
            if exc.errno == errno.ENOENT:
                return keys
            raise
        keys.append(nxt)
        prev = nxt


# --- programs ----------------------------------------------------------------
class _ProgLoadAttr(ctypes.Structure):
    _fields_ = [("prog_type", ctypes.c_uint32), ("insn_cnt", ctypes.c_uint32), ("insns", ctypes.c_uint64),
                ("license", ctypes.c_uint64), ("log_level", ctypes.c_uint32), ("log_size", ctypes.c_uint32),
                ("log_buf", ctypes.c_uint64), ("kern_version", ctypes.c_uint32), ("prog_flags", ctypes.c_uint32),
                ("prog_name", ctypes.c_char * 16), ("prog_ifindex", ctypes.c_uint32),
                ("expected_attach_type", ctypes.c_uint32)]


class VerifierError(OSError):
    """The kernel refused a program; `log` holds the verifier's explanation."""

    def __init__(self, code: int, message: str, log: str):
        super().__init__(code, message)
        self.log = log


def prog_load(name: str, insns: bytes, prog_type: int = BPF_PROG_TYPE_SCHED_CLS, license: str = "GPL") -> int:
    """Load raw instructions (8 bytes each, map fds already in place); returns the fd.

    On refusal the load is repeated with the verifier log on, and a
    VerifierError carries the log's last lines."""
    code = ctypes.create_string_buffer(insns, len(insns))
    lic = ctypes.create_string_buffer(license.encode())
    attr = _ProgLoadAttr(prog_type=prog_type, insn_cnt=len(insns) // 8, insns=_addr(code), license=_addr(lic),
                         prog_name=name.encode()[:15])
    try:
        return _bpf(BPF_PROG_LOAD, attr, f"load program {name}")
    except OSError as exc:
        if exc.errno not in (errno.EACCES, errno.EINVAL):
            raise
        log = ctypes.create_string_buffer(1 << 20)
        attr.log_level, attr.log_size, attr.log_buf = 1, len(log), _addr(log)
        try:
            fd = _bpf(BPF_PROG_LOAD, attr, f"load program {name}")
        except OSError as again:
            text = log.value.decode(errors="replace").strip()
            raise VerifierError(again.errno, f"the kernel refused program {name} ({os.strerror(again.errno)})",
                                "\n".join(text.splitlines()[-12:])) from None
        return fd  # refused once, accepted with the log on: keep it


class _TestRunAttr(ctypes.Structure):
    _fields_ = [("prog_fd", ctypes.c_uint32), ("retval", ctypes.c_uint32), ("data_size_in", ctypes.c_uint32),
                ("data_size_out", ctypes.c_uint32), ("data_in", ctypes.c_uint64), ("data_out", ctypes.c_uint64),
                ("repeat", ctypes.c_uint32), ("duration", ctypes.c_uint32), ("ctx_size_in", ctypes.c_uint32),
                ("ctx_size_out", ctypes.c_uint32), ("ctx_in", ctypes.c_uint64), ("ctx_out", ctypes.c_uint64),
                ("flags", ctypes.c_uint32), ("cpu", ctypes.c_uint32), ("batch_size", ctypes.c_uint32)]


class SkBuffCtx(ctypes.Structure):
    """The head of struct __sk_buff as BPF_PROG_TEST_RUN takes it (only some fields may be set)."""

    _fields_ = [("len", ctypes.c_uint32), ("pkt_type", ctypes.c_uint32), ("mark", ctypes.c_uint32),
                ("queue_mapping", ctypes.c_uint32), ("protocol", ctypes.c_uint32), ("vlan_present", ctypes.c_uint32),
                ("vlan_tci", ctypes.c_uint32), ("vlan_proto", ctypes.c_uint32), ("priority", ctypes.c_uint32),
                ("ingress_ifindex", ctypes.c_uint32), ("ifindex", ctypes.c_uint32), ("tc_index", ctypes.c_uint32),
                ("cb", ctypes.c_uint32 * 5)]


@dataclass(frozen=True)
class TestRun:
    retval: int
    data_out: bytes
    duration_ns: int
    mark: int = 0  # skb->mark when the program returned


def prog_test_run(prog_fd: int, frame: bytes, ifindex: int = 0, repeat: int = 1, mark: int = 0) -> TestRun:
    """Run a SCHED_CLS program on `frame` as if it arrived on `ifindex` carrying `mark`.

    The device must exist in the calling thread's network namespace.
    """
    data_in = ctypes.create_string_buffer(frame, len(frame))
    data_out = ctypes.create_string_buffer(len(frame) + 256)
    ctx = SkBuffCtx(ifindex=ifindex, mark=mark)
    ctx_out = ctypes.create_string_buffer(1024)  # the kernel writes its whole struct __sk_buff back
    attr = _TestRunAttr(prog_fd=prog_fd, data_size_in=len(frame), data_size_out=len(data_out),
                        data_in=_addr(data_in), data_out=_addr(data_out), repeat=repeat,
                        ctx_size_in=ctypes.sizeof(ctx), ctx_in=_addr(ctx),
                        ctx_size_out=len(ctx_out), ctx_out=_addr(ctx_out))
    _bpf(BPF_PROG_TEST_RUN, attr, "BPF_PROG_TEST_RUN")
    returned = SkBuffCtx.from_buffer_copy(ctx_out.raw[:ctypes.sizeof(SkBuffCtx)])
    return TestRun(attr.retval, data_out.raw[: attr.data_size_out], attr.duration, returned.mark)


# --- pins and ids --------------------------------------------------------------
class _ObjAttr(ctypes.Structure):
    _fields_ = [("pathname", ctypes.c_uint64), ("bpf_fd", ctypes.c_uint32), ("file_flags", ctypes.c_uint32)]


def obj_pin(fd: int, path: str) -> None:
    name = ctypes.create_string_buffer(path.encode())
    _bpf(BPF_OBJ_PIN, _ObjAttr(_addr(name), fd, 0), f"pin {path}")


def obj_get(path: str, readonly: bool = False) -> int:
    """Open a pinned map, program or link; the caller closes the fd. Read-only
    opens work on a read-only bpffs too (a plain open asks for read-write)."""
    name = ctypes.create_string_buffer(path.encode())
    return _bpf(BPF_OBJ_GET, _ObjAttr(_addr(name), 0, BPF_F_RDONLY if readonly else 0), f"open pin {path}")


class _IdAttr(ctypes.Structure):
    _fields_ = [("id", ctypes.c_uint32), ("next_id", ctypes.c_uint32), ("open_flags", ctypes.c_uint32)]


def prog_fd_by_id(prog_id: int) -> int:
    return _bpf(BPF_PROG_GET_FD_BY_ID, _IdAttr(prog_id, 0, 0), f"open program id {prog_id}")


# --- object info -----------------------------------------------------------------
class _InfoAttr(ctypes.Structure):
    _fields_ = [("bpf_fd", ctypes.c_uint32), ("info_len", ctypes.c_uint32), ("info", ctypes.c_uint64)]


def _info(fd: int, info: ctypes.Structure, what: str) -> None:
    _bpf(BPF_OBJ_GET_INFO_BY_FD, _InfoAttr(fd, ctypes.sizeof(info), _addr(info)), what)


class _MapInfo(ctypes.Structure):
    # The head of struct bpf_map_info; the kernel fills at most what we pass.
    _fields_ = [("type", ctypes.c_uint32), ("id", ctypes.c_uint32), ("key_size", ctypes.c_uint32),
                ("value_size", ctypes.c_uint32), ("max_entries", ctypes.c_uint32), ("map_flags", ctypes.c_uint32),
                ("name", ctypes.c_char * 16)]


@dataclass(frozen=True)
class MapInfo:
    type: int
    id: int
    key_size: int
    value_size: int
    max_entries: int
    flags: int = 0
    name: str = ""


def map_info(fd: int) -> MapInfo:
    info = _MapInfo()
    _info(fd, info, "map info")
    return MapInfo(info.type, info.id, info.key_size, info.value_size, info.max_entries, info.map_flags,
                   info.name.decode(errors="replace"))


class _ProgInfo(ctypes.Structure):
    # The head of struct bpf_prog_info, up to the run-time statistics.
    _fields_ = [
        ("type", ctypes.c_uint32), ("id", ctypes.c_uint32), ("tag", ctypes.c_uint8 * 8),
        ("jited_prog_len", ctypes.c_uint32), ("xlated_prog_len", ctypes.c_uint32),
        ("jited_prog_insns", ctypes.c_uint64), ("xlated_prog_insns", ctypes.c_uint64),
        ("load_time", ctypes.c_uint64), ("created_by_uid", ctypes.c_uint32), ("nr_map_ids", ctypes.c_uint32),
        ("map_ids", ctypes.c_uint64), ("name", ctypes.c_char * 16), ("ifindex", ctypes.c_uint32),
        ("gpl_compatible_etc", ctypes.c_uint32), ("netns_dev", ctypes.c_uint64), ("netns_ino", ctypes.c_uint64),
        ("nr_jited_ksyms", ctypes.c_uint32), ("nr_jited_func_lens", ctypes.c_uint32),
        ("jited_ksyms", ctypes.c_uint64), ("jited_func_lens", ctypes.c_uint64), ("btf_id", ctypes.c_uint32),
        ("func_info_rec_size", ctypes.c_uint32), ("func_info", ctypes.c_uint64), ("nr_func_info", ctypes.c_uint32),
        ("nr_line_info", ctypes.c_uint32), ("line_info", ctypes.c_uint64), ("jited_line_info", ctypes.c_uint64),
        ("nr_jited_line_info", ctypes.c_uint32), ("line_info_rec_size", ctypes.c_uint32),
        ("jited_line_info_rec_size", ctypes.c_uint32), ("nr_prog_tags", ctypes.c_uint32),
        ("prog_tags", ctypes.c_uint64), ("run_time_ns", ctypes.c_uint64), ("run_cnt", ctypes.c_uint64),
    ]


@dataclass(frozen=True)
class ProgInfo:
    id: int
    name: str
    run_time_ns: int
    run_cnt: int
    xlated_len: int = 0
    jited_len: int = 0


def prog_info(fd: int) -> ProgInfo:
    info = _ProgInfo()
    _info(fd, info, "program info")
    return ProgInfo(info.id, info.name.decode(errors="replace"), info.run_time_ns, info.run_cnt,
                    info.xlated_prog_len, info.jited_prog_len)


def prog_map_ids(fd: int) -> list[int]:
    """Ids of the maps a program uses."""
    info = _ProgInfo()
    _info(fd, info, "program info")
    ids = (ctypes.c_uint32 * max(info.nr_map_ids, 1))()
    info2 = _ProgInfo(nr_map_ids=info.nr_map_ids, map_ids=_addr(ids))
    _info(fd, info2, "program info")
    return list(ids[: info.nr_map_ids])


# --- tcx links -------------------------------------------------------------------
class _LinkCreateAttr(ctypes.Structure):
    _fields_ = [("prog_fd", ctypes.c_uint32), ("target_ifindex", ctypes.c_uint32), ("attach_type", ctypes.c_uint32),
                ("flags", ctypes.c_uint32), ("relative_fd", ctypes.c_uint32), ("expected_revision", ctypes.c_uint64)]


def tcx_link_create(prog_fd: int, ifindex: int) -> int:
    """Attach a SCHED_CLS program to a device's tcx ingress, after the programs
    already there; returns the link fd. The device is resolved in the calling
    thread's network namespace (netns.run_in)."""
    attr = _LinkCreateAttr(prog_fd=prog_fd, target_ifindex=ifindex, attach_type=BPF_TCX_INGRESS)
    return _bpf(BPF_LINK_CREATE, attr, f"tcx link on ifindex {ifindex}")


class _LinkUpdateAttr(ctypes.Structure):
    _fields_ = [("link_fd", ctypes.c_uint32), ("new_prog_fd", ctypes.c_uint32), ("flags", ctypes.c_uint32),
                ("old_prog_fd", ctypes.c_uint32)]


def link_update(link_fd: int, prog_fd: int) -> None:
    """Swap the program of a link in place: frames see the old or the new one, never neither."""
    _bpf(BPF_LINK_UPDATE, _LinkUpdateAttr(link_fd, prog_fd, 0, 0), "link update")


class _LinkFdAttr(ctypes.Structure):
    _fields_ = [("link_fd", ctypes.c_uint32)]


def link_detach(link_fd: int) -> None:
    """Take a link's program off its hook now, whoever else holds the link."""
    _bpf(BPF_LINK_DETACH, _LinkFdAttr(link_fd), "link detach")


class _LinkInfo(ctypes.Structure):
    # struct bpf_link_info: type, id, prog_id, then a union (8-byte aligned) whose
    # tcx member is { ifindex, attach_type }.
    _fields_ = [("type", ctypes.c_uint32), ("id", ctypes.c_uint32), ("prog_id", ctypes.c_uint32),
                ("_pad", ctypes.c_uint32), ("ifindex", ctypes.c_uint32), ("attach_type", ctypes.c_uint32),
                ("_rest", ctypes.c_uint64 * 6)]


@dataclass(frozen=True)
class LinkInfo:
    type: int
    id: int
    prog_id: int
    ifindex: int  # for tcx: 0 once the device is gone (the link is defunct)
    attach_type: int

    @property
    def defunct(self) -> bool:
        return self.type == BPF_LINK_TYPE_TCX and self.ifindex == 0


def link_info(fd: int) -> LinkInfo:
    info = _LinkInfo()
    _info(fd, info, "link info")
    return LinkInfo(info.type, info.id, info.prog_id, info.ifindex, info.attach_type)


class _QueryAttr(ctypes.Structure):
    _fields_ = [("target_ifindex", ctypes.c_uint32), ("attach_type", ctypes.c_uint32),
                ("query_flags", ctypes.c_uint32), ("attach_flags", ctypes.c_uint32), ("prog_ids", ctypes.c_uint64),
                ("prog_cnt", ctypes.c_uint32), ("_pad", ctypes.c_uint32), ("prog_attach_flags", ctypes.c_uint64),
                ("link_ids", ctypes.c_uint64), ("link_attach_flags", ctypes.c_uint64), ("revision", ctypes.c_uint64)]


def tcx_programs(ifindex: int) -> list[int]:
    """Ids of the programs on a device's tcx ingress, in the order they run.
    Call it inside the device's namespace."""
    ids = (ctypes.c_uint32 * 64)()
    attr = _QueryAttr(target_ifindex=ifindex, attach_type=BPF_TCX_INGRESS, prog_ids=_addr(ids), prog_cnt=64)
    _bpf(BPF_PROG_QUERY, attr, f"tcx query on ifindex {ifindex}")
    return list(ids[: attr.prog_cnt])


# --- statistics ------------------------------------------------------------------------
class _StatsAttr(ctypes.Structure):
    _fields_ = [("type", ctypes.c_uint32)]


def enable_run_time_stats() -> int:
    """Count run time and runs of every program while the returned fd is open
    (what kernel.bpf_stats_enabled does, without changing the sysctl)."""
    return _bpf(BPF_ENABLE_STATS, _StatsAttr(BPF_STATS_RUN_TIME), "enable run-time statistics")


@functools.lru_cache(maxsize=1)
def possible_cpus() -> int:
    """Number of possible CPUs: the stride of a per-CPU map value."""
    with open("/sys/devices/system/cpu/possible") as f:
        text = f.read().strip()
    count = 0
    for part in text.split(","):
        lo, _, hi = part.partition("-")
        count += int(hi or lo) - int(lo) + 1
    return count
