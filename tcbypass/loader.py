"""Compile bpf/redirect.c with bcc, load both entry programs as SCHED_CLS and
pin one attachment's instance (programs and maps) under our bpffs directory.

Why one instance per attachment: ifindexes are per network namespace, so
`tap0` is ifindex 3 in every virt-launcher pod. An instance's maps receive
only its own attachment's entries and its programs are attached only to
that attachment's two devices, so pods can never read each other's entries,
on any kernel (bpf_get_netns_cookie() in tc programs is too new to rely on).
The price is one compile per attachment (a few hundred ms), paid once:
re-attach, detach and status reuse the pins.
"""

from __future__ import annotations

import functools
import hashlib
import os
import contextlib
import logging
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from . import bpfsys
from .errors import BpfError
from .maps import EGRESS, META, META_SIZE, PORTS, PROG_FROM_VM, PROG_TO_VM, STATS

# Where bpffs is mounted. Only tests point elsewhere (a private bpffs mount, to
# prove the errors for a missing or read-only one without touching the node's).
log = logging.getLogger(__name__)

BPFFS = os.environ.get("TCBYPASS_BPFFS", "/sys/fs/bpf")
PIN_VERSION = "v1"
PIN_ROOT = f"{BPFFS}/tcbypass/{PIN_VERSION}"
MAX_PORTS = 4  # tap + NIC, and room for a new tap while the old one is dropped


def source_path() -> Path:
    """redirect.c as installed in the wheel, or in a source checkout."""
    packaged = resources.files("tcbypass") / "bpf" / "redirect.c"
    if packaged.is_file():
        return Path(str(packaged))
    return Path(__file__).resolve().parent.parent / "bpf" / "redirect.c"


def cflags(test: bool = False, peer: bool = False) -> list[str]:
    """Build options. `peer`: bpf_redirect_peer() from the VM (benchmark variant)."""
    flags = [f"-DTCB_MAX_PORTS={MAX_PORTS}"]
    if test:
        flags.append("-DTCB_TEST")
    if peer:
        flags.append("-DTCB_FROM_VM_PEER")
    return flags


@functools.lru_cache(maxsize=8)
def digest(test: bool = False, peer: bool = False) -> str:
    """Identifies the program a pin was built from: source and cflags."""
    h = hashlib.sha256(source_path().read_bytes())
    h.update(" ".join(cflags(test, peer)).encode())
    return h.hexdigest()[:16]


def bpffs_ready() -> None:
    if not os.path.ismount(BPFFS):
        raise BpfError(f"bpffs is not mounted on {BPFFS}", hint=f"run: mount -t bpf bpf {BPFFS}")
    try:
        os.makedirs(PIN_ROOT, exist_ok=True)
    except OSError as exc:
        raise BpfError(f"cannot create {PIN_ROOT} ({exc.strerror})",
                       hint=f"bpffs must be mounted read-write (mount -o remount,rw {BPFFS}) and we must be root"
                       ) from None
    if not os.access(PIN_ROOT, os.W_OK):
        raise BpfError(f"{PIN_ROOT} is not writable (bpffs read-only?)",
                       hint=f"remount it read-write: mount -o remount,rw {BPFFS}")


def compile_and_pin(pin_dir: str, test: bool = False, peer: bool = False) -> None:
    """Build a fresh instance and pin it in `pin_dir` (which must not exist)."""
    try:
        from bcc import BPF  # a system package; imported only where compiling
    except ImportError:
        raise BpfError("bcc is not importable", hint="install python3-bpfcc and use a venv with "
                       "--system-site-packages (scripts/setup.sh)") from None
    bpffs_ready()
    try:
        os.mkdir(pin_dir)
    except FileExistsError:
        raise BpfError(f"{pin_dir} already exists", hint="another tcbypass is building it; try again") from None
    except OSError as exc:
        raise BpfError(f"cannot create {pin_dir} ({exc.strerror})",
                       hint=f"bpffs must be mounted read-write on {BPFFS}; 'tcbypass doctor' checks it") from None
    try:
        with _captured_output() as output:
            try:
                bpf = BPF(src_file=str(source_path()).encode(), cflags=cflags(test, peer))
            except Exception:
                bpf = None
        if bpf is None:
            first = _first_meaningful(output.text)
            log.debug("bcc said:\n%s", output.text)
            raise BpfError(f"bcc could not compile {source_path().name}: {first}",
                           hint="kernel headers missing? run 'tcbypass doctor' (scripts/setup.sh installs them)")
        if output.text.strip():
            log.debug("bcc said:\n%s", output.text)
        try:
            for prog in (PROG_FROM_VM, PROG_TO_VM):
                fn = bpf.load_func(prog.encode(), BPF.SCHED_CLS)
                bpfsys.obj_pin(fn.fd, f"{pin_dir}/{prog}")
            for table in (PORTS, EGRESS, STATS) + (("tcb_test_target",) if test else ()):
                bpfsys.obj_pin(bpf[table.encode()].map_fd, f"{pin_dir}/{table}")
        finally:
            bpf.cleanup()
        meta_fd = bpfsys.map_create_array(META, META_SIZE, 1)
        try:
            bpfsys.obj_pin(meta_fd, f"{pin_dir}/{META}")
        finally:
            os.close(meta_fd)
    except BaseException:
        remove_pins(pin_dir)
        raise


class _Captured:
    text = ""


@contextlib.contextmanager
def _captured_output():
    """Catch what bcc and clang print on fds 1 and 2 (warnings, "Unable to find
    kernel headers"), so a failure is one line of ours and the rest goes to the log."""
    captured = _Captured()
    with tempfile.TemporaryFile(mode="w+b") as sink:
        sys.stdout.flush()
        sys.stderr.flush()
        saved = [os.dup(1), os.dup(2)]
        try:
            os.dup2(sink.fileno(), 1)
            os.dup2(sink.fileno(), 2)
            yield captured
        finally:
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            for fd in saved:
                os.close(fd)
            sink.seek(0)
            captured.text = sink.read().decode(errors="replace")


def _first_meaningful(text: str) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    for line in lines:
        if "Unable to find kernel headers" in line or "fatal error" in line or "error:" in line:
            return line
    return lines[0] if lines else "no output"


SPARE_PREFIX = "@spare-"


def _spares(test: bool, peer: bool) -> list[str]:
    prefix = f"{SPARE_PREFIX}{digest(test, peer)}-"
    try:
        return sorted(e for e in os.listdir(PIN_ROOT) if e.startswith(prefix))
    except FileNotFoundError:
        return []


def make_spare(test: bool = False, peer: bool = False) -> str:
    """Compile an instance ahead of need and park it under PIN_ROOT/@spare-<digest>-<id>.

    Compiling is the slow part of a first attach (hundreds of ms, seconds on
    a busy node); an agent keeps a spare so that a new VM is attached in
    milliseconds. A spare's maps are empty and nothing is attached to it.
    """
    unique = f"{os.getpid()}-{time.monotonic_ns()}"
    building = f"{PIN_ROOT}/@building-{unique}"
    pin_dir = f"{PIN_ROOT}/{SPARE_PREFIX}{digest(test, peer)}-{unique}"
    compile_and_pin(building, test, peer)
    os.rename(building, pin_dir)  # only a complete instance is ever visible as a spare
    return pin_dir


def claim_spare(pin_dir: str, test: bool = False, peer: bool = False) -> bool:
    """Move a spare of this build to `pin_dir`; False when there is none.
    rename() is atomic, so two processes never claim the same spare."""
    for spare in _spares(test, peer):
        try:
            os.rename(f"{PIN_ROOT}/{spare}", pin_dir)
            return True
        except OSError:
            continue  # taken by someone else a moment ago
    return False


def spare_count(test: bool = False, peer: bool = False) -> int:
    return len(_spares(test, peer))


def remove_spares() -> int:
    """Drop every spare (an agent does on exit: nothing of ours stays unused)."""
    removed = 0
    try:
        entries = os.listdir(PIN_ROOT)
    except FileNotFoundError:
        return 0
    for entry in entries:
        if entry.startswith((SPARE_PREFIX, "@building-")):
            remove_pins(f"{PIN_ROOT}/{entry}")
            removed += 1
    return removed


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
