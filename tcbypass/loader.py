"""Load one attachment's instance of the program from a compiled object and
pin it under our bpffs directory.

Why one instance per attachment: ifindexes are per network namespace, so
`tap0` is ifindex 3 in every virt-launcher pod. An instance's maps receive
only its own attachment's entries and its programs are attached only to
that attachment's two devices, so pods can never read each other's entries,
on any kernel. An instance costs two verifier runs and four small maps
(a few milliseconds); the compiling was done once, in build.py.

A pinned instance directory holds:
  tcb_from_vm, tcb_to_vm                the two programs
  tcb_config, tcb_tap, tcb_stats        their maps (see maps.py)
  tcb_meta                              the attachment record, made here
  link_from_vm, link_to_vm              tcx links, when attached with tcx (tcx.py)
"""

from __future__ import annotations

import logging
import os
import shutil
from dataclasses import dataclass

from . import bpfsys, build, features
from .errors import BpfError
from .maps import META, META_SIZE, PIN_LAYOUT, PROG_FROM_VM, PROG_TO_VM

log = logging.getLogger(__name__)

# Where bpffs is mounted. Only tests point elsewhere (a private bpffs mount, to
# prove the errors for a missing or read-only one without touching the node's).
BPFFS = os.environ.get("TCBYPASS_BPFFS", "/sys/fs/bpf")
PIN_VERSION = PIN_LAYOUT  # one version for the pins' paths and the maps' layout (maps.py)
PIN_ROOT = f"{BPFFS}/tcbypass/{PIN_VERSION}"
LEGACY_ROOTS = (f"{BPFFS}/tcbypass/v1",)  # layouts older tcbypass versions pinned


def mounted_type(path: str) -> str:
    """The type of the filesystem mounted on `path` ("bpf" for bpffs), "" when
    none is. A container's hostPath is a mount point whatever it holds, so
    being one says nothing: only the type does."""
    path = os.path.realpath(path)
    found = ""
    try:
        with open("/proc/self/mountinfo") as f:
            for line in f:
                mount, _, fs = line.partition(" - ")
                if mount.split()[4].replace("\\040", " ") == path:
                    found = fs.split()[0]  # of mounts stacked on one path, the last is the one seen
    except (OSError, IndexError):
        return "bpf" if os.path.ismount(path) else ""
    return found


def bpffs_missing() -> str:
    """Why there is no bpffs on BPFFS ("" when there is one)."""
    kind = mounted_type(BPFFS)
    if kind == "bpf":
        return ""
    return f"bpffs is not mounted on {BPFFS}" + (f" ({kind} is)" if kind else "")


def bpffs_ready() -> None:
    if missing := bpffs_missing():
        raise BpfError(missing, hint=f"run: mount -t bpf bpf {BPFFS}")
    try:
        os.makedirs(PIN_ROOT, exist_ok=True)
    except OSError as exc:
        raise BpfError(f"cannot create {PIN_ROOT} ({exc.strerror})",
                       hint=f"bpffs must be mounted read-write (mount -o remount,rw {BPFFS}) and we must be root"
                       ) from None
    if not os.access(PIN_ROOT, os.W_OK):
        raise BpfError(f"{PIN_ROOT} is not writable (bpffs read-only?)",
                       hint=f"remount it read-write: mount -o remount,rw {BPFFS}")


def instantiate(obj: build.Object, pin_dir: str) -> None:
    """Create fresh maps, load both programs against them and pin it all in
    `pin_dir` (which must not exist). Raises bpfsys.VerifierError when the
    kernel refuses the programs; nothing is left behind on failure."""
    bpffs_ready()
    try:
        os.mkdir(pin_dir)
    except FileExistsError:
        raise BpfError(f"{pin_dir} already exists", hint="another tcbypass is building it; try again") from None
    except OSError as exc:
        raise BpfError(f"cannot create {pin_dir} ({exc.strerror})",
                       hint=f"bpffs must be mounted read-write on {BPFFS}; 'tcbypass doctor' checks it") from None
    fds: dict[str, int] = {}
    try:
        for spec in obj.maps:
            fds[spec.name] = bpfsys.map_create(spec.type, spec.name, spec.key_size, spec.value_size,
                                               spec.max_entries, spec.flags)
        fds[META] = bpfsys.map_create(bpfsys.BPF_MAP_TYPE_ARRAY, META, 4, META_SIZE, 1)
        for name, fd in fds.items():
            bpfsys.obj_pin(fd, f"{pin_dir}/{name}")
        for prog in obj.programs:
            fd = bpfsys.prog_load(prog.name, prog.linked(fds), license=obj.license)
            try:
                bpfsys.obj_pin(fd, f"{pin_dir}/{prog.name}")
            finally:
                os.close(fd)
    except bpfsys.VerifierError:
        remove_pins(pin_dir)
        raise
    except OSError as exc:
        remove_pins(pin_dir)
        raise BpfError(f"cannot load the program into {pin_dir} ({exc})",
                       hint="run 'tcbypass doctor'") from None
    except BaseException:
        remove_pins(pin_dir)
        raise
    finally:
        for fd in fds.values():
            os.close(fd)


def load_and_pin(pin_dir: str, which: build.Build) -> None:
    """Instantiate `which` in `pin_dir`, from the cache when it can. A cached
    object the kernel refuses is rebuilt once (with a log line) and retried."""
    features.allow_locked_memory()  # before 5.11 every map and program counts against RLIMIT_MEMLOCK
    obj = build.get(which)
    try:
        instantiate(obj, pin_dir)
        return
    except bpfsys.VerifierError as exc:
        log.warning("the kernel refused cached build %s (%s); rebuilding it", obj.key, exc.log.splitlines()[-1:])
        refused = exc
    try:
        obj = build.get(which, rebuild=True)
        instantiate(obj, pin_dir)
    except bpfsys.VerifierError as exc:
        raise BpfError(f"the kernel refuses the program: {exc.strerror}; verifier: "
                       f"{' / '.join(exc.log.splitlines()[-3:]) or refused.log}",
                       hint="this kernel cannot run the fast path; 'tcbypass doctor' shows its features") from None


def remove_pins(pin_dir: str) -> None:
    """Unpin everything in `pin_dir`; the kernel frees what nothing else holds."""
    if os.path.isdir(pin_dir):
        shutil.rmtree(pin_dir, ignore_errors=True)
        if os.path.isdir(pin_dir):  # rmtree is best effort; say so rather than leak quietly
            raise BpfError(f"could not remove {pin_dir}", hint=f"remove it by hand: rm -r {pin_dir}")


@dataclass
class Programs:
    """Open fds of an instance's two programs."""

    from_vm: int
    to_vm: int

    def close(self) -> None:
        for fd in (self.from_vm, self.to_vm):
            os.close(fd)

    def __enter__(self) -> "Programs":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def ids(self) -> tuple[int, int]:
        return bpfsys.prog_info(self.from_vm).id, bpfsys.prog_info(self.to_vm).id


def open_programs(pin_dir: str) -> Programs:
    try:
        from_vm = bpfsys.obj_get(f"{pin_dir}/{PROG_FROM_VM}", readonly=True)
    except OSError as exc:
        raise BpfError(f"cannot open {pin_dir}/{PROG_FROM_VM} ({exc.strerror})") from None
    try:
        to_vm = bpfsys.obj_get(f"{pin_dir}/{PROG_TO_VM}", readonly=True)
    except OSError as exc:
        os.close(from_vm)
        raise BpfError(f"cannot open {pin_dir}/{PROG_TO_VM} ({exc.strerror})") from None
    return Programs(from_vm, to_vm)
