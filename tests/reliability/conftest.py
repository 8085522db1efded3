"""The reliability layer: each fault of docs/reliability.md proved with real
kernel objects, and with real traffic where the datapath is concerned.

Isolation. Every test module runs against a private bpffs mount of its own
($TCBYPASS_BPFFS for the CLI, loader.PIN_ROOT in this process): `status` and
`gc` look at every attachment under PIN_ROOT, and on a machine where other
test runs pin things at the same time, `gc` would remove their pins (a
datapath test instance has no record, so it looks orphaned). A private mount
also makes "nothing leaks" exact: whatever is left in it is ours. The lock
and clsact-marker directories under /run/tcbypass stay shared; names carry
the sandbox's random tag.

Helpers here observe the kernel independently of the code under test:
program ids of our tc filters come from `tc -j`, loaded program and map ids
from the bpf(2) id iterators, devices from `ip -j`.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import functools
import json
import os
import secrets
import time
from dataclasses import dataclass
from typing import Iterator

import pytest

from tcbypass import attachments, bpfsys, health, loader, maps
from tcbypass.maps import AttachmentMaps
from tcbypass.model import AttachSpec, Record
from tcbypass_lab.sandbox import VmNic, sh, wait_for_ping


def require_root() -> None:
    if os.geteuid() != 0:
        pytest.fail("the reliability layer needs root (bpf(2), namespaces, mounts): run the suite as root")


def report(capsys, text: str) -> None:
    """Print a measured figure so that it shows with -q too."""
    with capsys.disabled():
        print(f"\n[reliability] {text}", flush=True)


# --- a private bpffs -------------------------------------------------------------
@contextlib.contextmanager
def mounted_bpffs(read_only: bool = False) -> Iterator[str]:
    """A bpffs mount of our own, unmounted (and its pins freed) on exit."""
    where = f"/run/tcbypass-rel-{secrets.token_hex(3)}"
    os.makedirs(where)
    try:
        sh("mount", "-t", "bpf", "bpf", where)
        try:
            if read_only:
                sh("mount", "-o", "remount,ro", where)
            yield where
        finally:
            if sh("umount", where, check=False).returncode != 0:
                sh("umount", "-l", where, check=False)
    finally:
        with contextlib.suppress(OSError):
            os.rmdir(where)


@contextlib.contextmanager
def pin_root_at(bpffs: str) -> Iterator[str]:
    """Point tcbypass (this process and every CLI it starts) at `bpffs`."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TCBYPASS_BPFFS", bpffs)
        mp.setattr(loader, "BPFFS", bpffs)
        mp.setattr(loader, "PIN_ROOT", f"{bpffs}/tcbypass/{loader.PIN_VERSION}")
        mp.setattr(loader, "LEGACY_ROOTS", (f"{bpffs}/tcbypass/v1",))
        yield loader.PIN_ROOT


@pytest.fixture(scope="module", autouse=True)
def private_bpffs() -> Iterator[str]:
    require_root()
    with mounted_bpffs() as where, pin_root_at(where):
        yield where


def pin_entries() -> set[str]:
    """Everything under PIN_ROOT (attachments, staging, junk)."""
    try:
        return set(os.listdir(loader.PIN_ROOT))
    except FileNotFoundError:
        return set()


# --- loaded BPF objects, by id ----------------------------------------------------
class _IdInfo(ctypes.Structure):
    # The head shared by struct bpf_prog_info and struct bpf_map_info; the
    # kernel fills no more than the size we pass.
    _fields_ = [("type", ctypes.c_uint32), ("id", ctypes.c_uint32)]


@functools.lru_cache(maxsize=1)
def _lib() -> ctypes.CDLL:
    """Our own handle on Debian's libbpf (the project's is left as it set it up)."""
    lib = ctypes.CDLL(ctypes.util.find_library("bpf") or "libbpf.so.1", use_errno=True)
    for fn in ("bpf_prog_get_next_id", "bpf_map_get_next_id"):
        getattr(lib, fn).argtypes = [ctypes.c_uint32, ctypes.POINTER(ctypes.c_uint32)]
    lib.bpf_obj_get_info_by_fd.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.POINTER(ctypes.c_uint32)]
    return lib


def tcbypass_programs(ids: set[int]) -> set[int]:
    """Those of the program ids that are tcbypass's (by name: tcb_from_vm, tcb_to_vm),
    so that programs other software loads meanwhile never count."""
    from tcbypass import bpfsys

    ours = set()
    for prog_id in ids:
        try:
            fd = bpfsys.prog_fd_by_id(prog_id)
        except OSError:
            continue  # freed meanwhile
        try:
            if bpfsys.prog_info(fd).name.startswith("tcb_"):
                ours.add(prog_id)
        finally:
            os.close(fd)
    return ours


def loaded_ids(kind: str) -> set[int]:
    """Ids of every loaded BPF program ("prog") or map ("map") on the machine."""
    next_id = getattr(_lib(), f"bpf_{kind}_get_next_id")
    found, current = set(), 0
    for _ in range(1_000_000):  # bounded; the kernel ends the walk with ENOENT long before
        nxt = ctypes.c_uint32()
        if next_id(current, ctypes.byref(nxt)) != 0:
            break
        found.add(nxt.value)
        current = nxt.value
    return found


def object_id(fd: int) -> int:
    info = _IdInfo()
    size = ctypes.c_uint32(ctypes.sizeof(info))
    ret = _lib().bpf_obj_get_info_by_fd(fd, ctypes.byref(info), ctypes.byref(size))
    assert ret == 0, f"bpf_obj_get_info_by_fd: {ret}"
    return info.id


@dataclass(frozen=True)
class InstanceIds:
    """Kernel ids of what one pin directory holds."""

    progs: dict  # pin name -> program id
    maps: dict  # pin name -> map id


def instance_ids(pin_dir: str) -> InstanceIds:
    """Programs and maps of the instance pinned in `pin_dir` (its tcx link pins left out)."""
    progs, found_maps = {}, {}
    for entry in sorted(os.listdir(pin_dir)):
        if entry.startswith("link_"):
            continue
        fd = bpfsys.obj_get(f"{pin_dir}/{entry}")
        try:
            (progs if entry in (maps.PROG_FROM_VM, maps.PROG_TO_VM) else found_maps)[entry] = object_id(fd)
        finally:
            os.close(fd)
    return InstanceIds(progs, found_maps)


def wait_until_freed(ids: InstanceIds, timeout: float = 5.0) -> tuple[set, set]:
    """Program and map ids of `ids` still loaded after `timeout` (the kernel
    frees an object a moment after its last reference goes)."""
    deadline = time.monotonic() + timeout
    while True:
        progs = set(ids.progs.values()) & loaded_ids("prog")
        found = set(ids.maps.values()) & loaded_ids("map")
        if not (progs or found) or time.monotonic() > deadline:
            return progs, found
        time.sleep(0.05)


# --- what the kernel holds for one attachment ---------------------------------------
def links(netns: str) -> dict[str, int]:
    return {link["ifname"]: link["ifindex"] for link in json.loads(sh("ip", "-j", "link", "show", netns=netns).stdout)}


def tc_filters(netns: str, dev: str) -> list[dict]:
    """Ingress filters on `dev` as `tc -j` reports them (chain headers left out)."""
    out = sh("tc", "-j", "filter", "show", "dev", dev, "ingress", netns=netns, check=False).stdout
    return [f for f in json.loads(out or "[]") if "options" in f]


def our_filter_prog_ids(netns: str, dev: str) -> list[int]:
    return [f["options"]["prog"]["id"] for f in tc_filters(netns, dev)
            if f["kind"] == "bpf" and f["options"].get("bpf_name", "").startswith("tcbypass")]


def our_tcx_prog_ids(netns: str, dev: str) -> list[int]:
    """Ids of our programs (tcb_from_vm, tcb_to_vm) on the device's tcx ingress."""
    from tests.conftest import tcx_entries

    return [i for i, name in tcx_entries(netns, dev) if name in (maps.PROG_FROM_VM, maps.PROG_TO_VM)]


def our_hooks(netns: str, dev: str) -> tuple[int, ...]:
    """Program ids of ours that run on the device: tcx links, then clsact filters."""
    return tuple(our_tcx_prog_ids(netns, dev) + our_filter_prog_ids(netns, dev))


@dataclass(frozen=True)
class Observed:
    """One attachment as the kernel and bpffs hold it right now."""

    pin_dir: bool
    staging: bool
    record: Record | None
    progs: tuple | None  # pinned (from_vm, to_vm) program ids
    devices: tuple | None  # tcb_config (tap_ifindex, nic_ifindex)
    tap_slot: int | None  # tcb_tap
    tap_hooks: tuple  # program ids of ours hooked on the tap (tcx or clsact)
    nic_hooks: tuple
    tap_ifindex: int | None
    nic_ifindex: int | None


def observe(name: str, nic: VmNic) -> Observed:
    pin_dir = attachments.pin_dir_of(name)
    record = progs = configured = tap_slot = None
    present = os.path.isdir(pin_dir)
    if present:
        record = attachments.read_record(pin_dir)
        ids = instance_ids(pin_dir)
        progs = (ids.progs.get(maps.PROG_FROM_VM), ids.progs.get(maps.PROG_TO_VM))
        with AttachmentMaps(pin_dir) as m:
            config = m.config()
            configured = (config.tap_ifindex, config.nic_ifindex)
            tap_slot = m.tap()
    devices = links(nic.pod_ns)
    return Observed(
        pin_dir=present, staging=os.path.isdir(pin_dir + attachments.STAGING), record=record, progs=progs,
        devices=configured, tap_slot=tap_slot,
        tap_hooks=our_hooks(nic.pod_ns, nic.tap) if nic.tap in devices else (),
        nic_hooks=our_hooks(nic.pod_ns, nic.nic) if nic.nic in devices else (),
        tap_ifindex=devices.get(nic.tap), nic_ifindex=devices.get(nic.nic))


def assert_one_attachment_or_none(name: str, nic: VmNic) -> str:
    """Maps, pins and hooks agree: either one complete attachment whose pinned
    programs are the ones that run on its devices (once each, by the hook its
    record names), or nothing of ours at all. Returns "active" or "none"."""
    o = observe(name, nic)
    assert not o.staging, f"{name}: a staging directory was left behind"
    if not o.pin_dir:
        assert (o.tap_hooks, o.nic_hooks) == ((), ()), f"{name}: hooks without pins: {o}"
        return "none"
    assert o.record is not None and o.record.complete, f"{name}: pins without a complete record: {o}"
    assert (o.record.tap_ifindex, o.record.nic_ifindex) == (o.tap_ifindex, o.nic_ifindex), o
    assert o.tap_hooks == (o.progs[0],), f"{name}: the tap runs {o.tap_hooks}, pinned is {o.progs[0]}"
    assert o.nic_hooks == (o.progs[1],), f"{name}: the NIC runs {o.nic_hooks}, pinned is {o.progs[1]}"
    by_tcx = tuple(our_tcx_prog_ids(nic.pod_ns, nic.tap)) == o.tap_hooks
    assert by_tcx == (o.record.hook == "tcx"), f"{name}: recorded hook {o.record.hook}, runs {o}"
    assert o.devices == (o.tap_ifindex, o.nic_ifindex), o
    assert o.tap_slot == o.tap_ifindex, o
    status = health.status_of(name)
    assert status is not None and status.state == "active", status
    return "active"


def status_rows(tag: str, *args: str) -> list[dict]:
    """`tcbypass status --json` rows of one sandbox (by its tag in the netns path)."""
    from tests.conftest import run_cli

    proc = run_cli("status", "--json", *args)
    assert proc.returncode in (0, 3), proc.stderr
    return [r for r in json.loads(proc.stdout) if tag in r["netns"] or tag in r["name"]]


def explicit_args(sb, nic: VmNic, name: str, *extra: str) -> tuple[str, ...]:
    return ("attach", "--netns", sb.netns_path(nic.pod_ns), "--tap", nic.tap, "--nic", nic.nic,
            "--mac", nic.mac, "--name", name, *extra)


def assert_one_line_error(proc, code: int, *fragments: str) -> str:
    """The CLI failed with `code` and said so in exactly one line on stderr
    (nothing on stdout, no traceback) containing every fragment."""
    assert proc.returncode == code, (proc.returncode, proc.stdout, proc.stderr)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr and proc.stdout.strip() == "", \
        (proc.stdout, proc.stderr)
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    return lines[0]


@pytest.fixture
def bare_pod(bare_node):
    """vm1 (10.16.0.5) in a bridge-binding pod; the node end of its veth is the server (10.16.0.2)."""
    [nic] = bare_node.add_vm("vm1", ["10.16.0.5"])
    bare_node.serve_on_host_port(nic, "10.16.0.2")
    return bare_node, nic


def quiet_pod(bare_pod, prefix: str):
    """bare_pod with the bridge path checked and static neighbours (only a test's own
    frames cross), and the spec to attach it as `<prefix>-<tag>`."""
    sb, nic = bare_pod
    assert wait_for_ping(nic.vm_ns, "10.16.0.2")
    sb.pin_neighbours(nic, "10.16.0.2")
    spec = AttachSpec(name=f"{prefix}-{sb.tag}", netns=sb.netns_path(nic.pod_ns), tap=nic.tap, nic=nic.nic,
                      mac=nic.mac)
    return sb, nic, spec
