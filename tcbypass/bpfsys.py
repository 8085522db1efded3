"""The bpf(2) calls tcbypass makes outside bcc, through Debian's libbpf.so.1.

bcc compiles and loads; everything that a later process does with pinned
objects (open a pin, read and write maps, query a program's id, run it with
BPF_PROG_TEST_RUN) goes through these few wrappers, so `detach` and `status`
never need a compiler.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import functools
import os
from dataclasses import dataclass

from .errors import BpfError


@functools.lru_cache(maxsize=1)
def _lib() -> ctypes.CDLL:
    name = ctypes.util.find_library("bpf") or "libbpf.so.1"
    try:
        lib = ctypes.CDLL(name, use_errno=True)
    except OSError as exc:
        raise BpfError(f"cannot load libbpf ({exc})", hint="install libbpf1 (scripts/setup.sh does)") from exc
    lib.bpf_obj_get.argtypes = [ctypes.c_char_p]
    lib.bpf_obj_get_opts.argtypes = [ctypes.c_char_p, ctypes.c_void_p]
    lib.bpf_obj_pin.argtypes = [ctypes.c_int, ctypes.c_char_p]
    for fn in ("bpf_map_lookup_elem", "bpf_map_update_elem", "bpf_map_delete_elem"):
        getattr(lib, fn).restype = ctypes.c_int
    lib.bpf_map_update_elem.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_uint64]
    lib.bpf_map_lookup_elem.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p]
    lib.bpf_map_delete_elem.argtypes = [ctypes.c_int, ctypes.c_void_p]
    lib.bpf_map_get_next_key.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p]
    lib.bpf_obj_get_info_by_fd.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.POINTER(ctypes.c_uint32)]
    lib.bpf_prog_test_run_opts.argtypes = [ctypes.c_int, ctypes.c_void_p]
    lib.bpf_map_create.argtypes = [
        ctypes.c_int, ctypes.c_char_p, ctypes.c_uint32, ctypes.c_uint32, ctypes.c_uint32, ctypes.c_void_p,
    ]
    return lib


def _check(ret: int, what: str) -> int:
    if ret < 0:
        # libbpf 1.x returns -errno and also sets errno.
        code = -ret if ret != -1 else ctypes.get_errno()
        raise OSError(code, f"{what}: {os.strerror(code)}")
    return ret


BPF_ANY = 0
BPF_MAP_TYPE_ARRAY = 2


BPF_F_RDONLY = 1 << 3


class _ObjGetOpts(ctypes.Structure):
    _fields_ = [("sz", ctypes.c_size_t), ("file_flags", ctypes.c_uint32), ("path_fd", ctypes.c_int)]


def obj_get(path: str, readonly: bool = False) -> int:
    """Open a pinned map or program; the caller closes the fd. Read-only
    opens work on a read-only bpffs too (a plain open asks for read-write)."""
    if not readonly:
        return _check(_lib().bpf_obj_get(path.encode()), f"open pin {path}")
    opts = _ObjGetOpts(sz=ctypes.sizeof(_ObjGetOpts), file_flags=BPF_F_RDONLY)
    return _check(_lib().bpf_obj_get_opts(path.encode(), ctypes.byref(opts)), f"open pin {path}")


class _MapInfo(ctypes.Structure):
    # The head of struct bpf_map_info (uapi/linux/bpf.h).
    _fields_ = [
        ("type", ctypes.c_uint32),
        ("id", ctypes.c_uint32),
        ("key_size", ctypes.c_uint32),
        ("value_size", ctypes.c_uint32),
        ("max_entries", ctypes.c_uint32),
        ("map_flags", ctypes.c_uint32),
        ("name", ctypes.c_char * 16),
    ]


@dataclass(frozen=True)
class MapInfo:
    type: int
    id: int
    key_size: int
    value_size: int
    max_entries: int


def map_info(fd: int) -> MapInfo:
    info = _MapInfo()
    size = ctypes.c_uint32(ctypes.sizeof(info))
    _check(_lib().bpf_obj_get_info_by_fd(fd, ctypes.byref(info), ctypes.byref(size)), "map info")
    return MapInfo(info.type, info.id, info.key_size, info.value_size, info.max_entries)


def obj_pin(fd: int, path: str) -> None:
    _check(_lib().bpf_obj_pin(fd, path.encode()), f"pin {path}")


def map_create_array(name: str, value_size: int, max_entries: int) -> int:
    """A plain BPF array map made from user space (no program uses it)."""
    return _check(_lib().bpf_map_create(BPF_MAP_TYPE_ARRAY, name.encode(), 4, value_size, max_entries, None),
                  f"create map {name}")


def map_update(fd: int, key: ctypes.Structure | ctypes._SimpleCData, value, flags: int = BPF_ANY) -> None:
    _check(_lib().bpf_map_update_elem(fd, ctypes.byref(key), ctypes.byref(value), flags), "map update")


def map_lookup(fd: int, key, value) -> bool:
    """Fill `value` and return True, or return False when the key is absent."""
    ret = _lib().bpf_map_lookup_elem(fd, ctypes.byref(key), ctypes.byref(value))
    if ret < 0 and (-ret == errno.ENOENT or ctypes.get_errno() == errno.ENOENT):
        return False
    _check(ret, "map lookup")
    return True


def map_delete(fd: int, key) -> bool:
    """Delete `key`; False when it was not there (already done)."""
    ret = _lib().bpf_map_delete_elem(fd, ctypes.byref(key))
    if ret < 0 and (-ret == errno.ENOENT or ctypes.get_errno() == errno.ENOENT):
        return False
    _check(ret, "map delete")
    return True


def map_keys(fd: int, key_type) -> list:
    keys, prev, nxt = [], None, key_type()
    lib = _lib()
    while True:
        ret = lib.bpf_map_get_next_key(fd, ctypes.byref(prev) if prev is not None else None, ctypes.byref(nxt))
        if ret < 0:
            break
        keys.append(nxt)
        prev, nxt = nxt, key_type()
    return keys


class _ProgInfo(ctypes.Structure):
    # The head of struct bpf_prog_info (uapi/linux/bpf.h); the kernel fills
    # at most the size we pass, so the tail may be left out.
    _fields_ = [
        ("type", ctypes.c_uint32),
        ("id", ctypes.c_uint32),
        ("tag", ctypes.c_uint8 * 8),
        ("jited_prog_len", ctypes.c_uint32),
        ("xlated_prog_len", ctypes.c_uint32),
        ("jited_prog_insns", ctypes.c_uint64),
        ("xlated_prog_insns", ctypes.c_uint64),
        ("load_time", ctypes.c_uint64),
        ("created_by_uid", ctypes.c_uint32),
        ("nr_map_ids", ctypes.c_uint32),
        ("map_ids", ctypes.c_uint64),
        ("name", ctypes.c_char * 16),
        ("ifindex", ctypes.c_uint32),
        ("gpl_compatible_etc", ctypes.c_uint32),
        ("netns_dev", ctypes.c_uint64),
        ("netns_ino", ctypes.c_uint64),
        ("nr_jited_ksyms", ctypes.c_uint32),
        ("nr_jited_func_lens", ctypes.c_uint32),
        ("jited_ksyms", ctypes.c_uint64),
        ("jited_func_lens", ctypes.c_uint64),
        ("btf_id", ctypes.c_uint32),
        ("func_info_rec_size", ctypes.c_uint32),
        ("func_info", ctypes.c_uint64),
        ("nr_func_info", ctypes.c_uint32),
        ("nr_line_info", ctypes.c_uint32),
        ("line_info", ctypes.c_uint64),
        ("jited_line_info", ctypes.c_uint64),
        ("nr_jited_line_info", ctypes.c_uint32),
        ("line_info_rec_size", ctypes.c_uint32),
        ("jited_line_info_rec_size", ctypes.c_uint32),
        ("nr_prog_tags", ctypes.c_uint32),
        ("prog_tags", ctypes.c_uint64),
        ("run_time_ns", ctypes.c_uint64),
        ("run_cnt", ctypes.c_uint64),
    ]


@dataclass(frozen=True)
class ProgInfo:
    id: int
    name: str
    run_time_ns: int
    run_cnt: int


def prog_info(fd: int) -> ProgInfo:
    info = _ProgInfo()
    size = ctypes.c_uint32(ctypes.sizeof(info))
    _check(_lib().bpf_obj_get_info_by_fd(fd, ctypes.byref(info), ctypes.byref(size)), "program info")
    return ProgInfo(info.id, info.name.decode(errors="replace"), info.run_time_ns, info.run_cnt)


class SkBuffCtx(ctypes.Structure):
    """struct __sk_buff as BPF_PROG_TEST_RUN takes it (only some fields may be set)."""

    _fields_ = [
        ("len", ctypes.c_uint32),
        ("pkt_type", ctypes.c_uint32),
        ("mark", ctypes.c_uint32),
        ("queue_mapping", ctypes.c_uint32),
        ("protocol", ctypes.c_uint32),
        ("vlan_present", ctypes.c_uint32),
        ("vlan_tci", ctypes.c_uint32),
        ("vlan_proto", ctypes.c_uint32),
        ("priority", ctypes.c_uint32),
        ("ingress_ifindex", ctypes.c_uint32),
        ("ifindex", ctypes.c_uint32),
        ("tc_index", ctypes.c_uint32),
        ("cb", ctypes.c_uint32 * 5),
        ("hash", ctypes.c_uint32),
        ("tc_classid", ctypes.c_uint32),
        ("data", ctypes.c_uint32),
        ("data_end", ctypes.c_uint32),
        ("napi_id", ctypes.c_uint32),
        ("family", ctypes.c_uint32),
        ("remote_ip4", ctypes.c_uint32),
        ("local_ip4", ctypes.c_uint32),
        ("remote_ip6", ctypes.c_uint32 * 4),
        ("local_ip6", ctypes.c_uint32 * 4),
        ("remote_port", ctypes.c_uint32),
        ("local_port", ctypes.c_uint32),
        ("data_meta", ctypes.c_uint32),
        ("flow_keys", ctypes.c_uint64),
        ("tstamp", ctypes.c_uint64),
        ("wire_len", ctypes.c_uint32),
        ("gso_segs", ctypes.c_uint32),
        ("sk", ctypes.c_uint64),
        ("gso_size", ctypes.c_uint32),
        ("tstamp_type", ctypes.c_uint8),
        ("_pad", ctypes.c_uint8 * 3),
        ("hwtstamp", ctypes.c_uint64),
    ]


class _TestRunOpts(ctypes.Structure):
    _fields_ = [
        ("sz", ctypes.c_size_t),
        ("data_in", ctypes.c_void_p),
        ("data_out", ctypes.c_void_p),
        ("data_size_in", ctypes.c_uint32),
        ("data_size_out", ctypes.c_uint32),
        ("ctx_in", ctypes.c_void_p),
        ("ctx_out", ctypes.c_void_p),
        ("ctx_size_in", ctypes.c_uint32),
        ("ctx_size_out", ctypes.c_uint32),
        ("retval", ctypes.c_uint32),
        ("repeat", ctypes.c_int),
        ("duration", ctypes.c_uint32),
        ("flags", ctypes.c_uint32),
        ("cpu", ctypes.c_uint32),
        ("batch_size", ctypes.c_uint32),
    ]


@dataclass(frozen=True)
class TestRun:
    retval: int
    data_out: bytes
    duration_ns: int


def prog_test_run(prog_fd: int, frame: bytes, ifindex: int = 0, repeat: int = 1) -> TestRun:
    """Run a SCHED_CLS program on `frame` as if it arrived on `ifindex`.

    The device must exist in the calling thread's network namespace.
    """
    data_in = ctypes.create_string_buffer(frame, len(frame))
    out_size = len(frame) + 256
    data_out = ctypes.create_string_buffer(out_size)
    ctx = SkBuffCtx(ifindex=ifindex)
    opts = _TestRunOpts(
        sz=ctypes.sizeof(_TestRunOpts),
        data_in=ctypes.cast(data_in, ctypes.c_void_p),
        data_out=ctypes.cast(data_out, ctypes.c_void_p),
        data_size_in=len(frame),
        data_size_out=out_size,
        ctx_in=ctypes.cast(ctypes.pointer(ctx), ctypes.c_void_p),
        ctx_size_in=ctypes.sizeof(ctx),
        repeat=repeat,
    )
    _check(_lib().bpf_prog_test_run_opts(prog_fd, ctypes.byref(opts)), "BPF_PROG_TEST_RUN")
    return TestRun(opts.retval, data_out.raw[: opts.data_size_out], opts.duration)


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
