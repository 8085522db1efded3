"""KVM or TCG: the one accelerator choice of the lab's guests (the VM tests, the
kernel matrix, Vagrant).

/dev/kvm may exist and still not run a guest: on this project's build
machines (nested virtualisation) a KVM guest prints the real-mode banner
and hangs. So "auto" boots the guest's kernel once under KVM, without a
disk or a NIC, and takes KVM only when that kernel gets to run /init (or
panics for lack of one: a kernel that ran). Asked once per process and
kernel; $TCBYPASS_GUEST_ACCEL forces the choice.
"""

from __future__ import annotations

import fcntl
import functools
import logging
import os
import subprocess
import time

from .console import SerialConsole
from .procs import Child
from .qemu import QEMU, GuestError, machine_args

log = logging.getLogger(__name__)

KVM_GET_API_VERSION = 0xAE00
KVM_API_VERSION = 12
# How long a KVM probe boot may stay silent before we call KVM broken. A
# working KVM prints "Linux version" well under a second after start; TCG
# needs about 3 s just to decompress the kernel.
KVM_FIRST_OUTPUT_S = 4.0
KVM_PROBE_TOTAL_S = 15.0
RAN = ("Run /init", "Kernel panic", "TCB-PROBE-OK")  # what a kernel that ran prints


def kvm_device_usable() -> bool:
    """/dev/kvm opens read-write and speaks the stable KVM API."""
    try:
        fd = os.open("/dev/kvm", os.O_RDWR | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        return fcntl.ioctl(fd, KVM_GET_API_VERSION) == KVM_API_VERSION
    except OSError:
        return False
    finally:
        os.close(fd)


@functools.lru_cache(maxsize=None)
def kvm_boots(kernel: str, initrd: str = "") -> bool:
    """Does this kernel get through early boot under KVM here?"""
    argv = [QEMU, "-accel", "kvm", "-cpu", "host", *machine_args(256), "-kernel", kernel,
            *(["-initrd", initrd] if initrd else []),
            "-append", "console=ttyS0 earlyprintk=ttyS0 panic=-1 tcb.probe=1"]
    child = Child(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    console = SerialConsole(child.proc.stdout)
    start = time.monotonic()
    try:
        if console.wait_for(lambda line: "Linux version" in line, KVM_FIRST_OUTPUT_S) is None:
            log.info("KVM probe: no kernel output after %.0f s; using TCG", KVM_FIRST_OUTPUT_S)
            return False
        left = KVM_PROBE_TOTAL_S - (time.monotonic() - start)
        if console.wait_for(lambda line: any(mark in line for mark in RAN), left) is None:
            log.info("KVM probe: the kernel started but never ran /init; using TCG")
            return False
        log.info("KVM probe: the kernel ran under KVM in %.1f s", time.monotonic() - start)
        return True
    finally:
        child.kill(grace=0.5)
        console.close()


def pick_accel(requested: str, kernel: str, initrd: str = "") -> str:
    """"kvm" or "tcg" for a guest booting `kernel`. "auto" (overridable with
    $TCBYPASS_GUEST_ACCEL) uses KVM only when /dev/kvm works and the kernel
    boots under it."""
    if requested == "auto":
        requested = os.environ.get("TCBYPASS_GUEST_ACCEL", "auto")
    if requested in ("kvm", "tcg"):
        return requested
    if requested != "auto":
        raise GuestError(f"unknown accelerator {requested!r}", hint="use auto, kvm or tcg")
    return "kvm" if kvm_device_usable() and kvm_boots(kernel, initrd) else "tcg"
