"""A real VM guest on a virt-launcher pod's tap, for the `tests/vm` layer.

Three pieces:

- `build_initramfs()` packs a tiny initramfs: static busybox, the virtio-net
  modules of the guest kernel (a Debian kernel from /boot), and an /init that
  configures every NIC (DHCP, or static addresses from the kernel command
  line), prints `TCB-GUEST-READY ...` on the serial console and then serves
  commands there.
- `Guest` boots `qemu-system-x86_64` on that initramfs inside the pod's
  network namespace, plugged into the pod's tap device(s) as virtio-net NICs,
  exactly where virt-launcher's qemu sits. `run()` executes shell commands in
  the guest over the serial console.
- `start_dhcp_server()` plays the DHCPv4 server that virt-launcher runs on
  k6t-eth0 for bridge binding: one static lease, the VM's IP for the VM's MAC.

The serial protocol. qemu's first serial port is qemu's stdin/stdout (two
pipes; no monitor multiplexed in). After READY the guest reads lines

    <tag> <limit-seconds> <base64 of the script>

runs the script with `sh` in a session of its own, stdin from /dev/null and
stdout+stderr to the console, kills that session after <limit> seconds, and
ends with a line `TCB-DONE <exit code> <tag>` (plus ` expired` when it killed
it). Base64 keeps quotes, newlines and control bytes out of the tty.

Processes we start never outlive us: each one runs in a process group of its
own with a parent-death signal (util-linux `setpriv --pdeathsig`), is killed
and reaped by `close()`/`stop()`, and an atexit hook catches the rest.
"""

from __future__ import annotations

import atexit
import base64
import collections
import contextlib
import fcntl
import functools
import gzip
import hashlib
import ipaddress
import logging
import lzma
import math
import os
import re
import shutil
import signal
import stat
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Sequence

from .. import netdev
from ..errors import TcbError

log = logging.getLogger(__name__)

DEFAULT_CACHE_DIR = "/var/cache/tcbypass/guest"
RUN_DIR = "/var/cache/tcbypass/run"
QEMU = "qemu-system-x86_64"
BUSYBOX = "/bin/busybox"

# The drivers the guest needs, by the modules that provide the devices; their
# dependencies come from modules.dep. On Debian's 6.1 kernel this resolves to
# virtio_ring virtio virtio_pci_modern_dev virtio_pci_legacy_dev virtio_pci
# failover net_failover virtio_net.
GUEST_DRIVERS = ("virtio_pci", "virtio_net")

# Bumped whenever the layout of the archive changes, so that old cache entries
# are never picked up.
INITRAMFS_FORMAT = 1

READY_MARKER = "TCB-GUEST-READY"
DONE_MARKER = "TCB-DONE"
PROBE_MARKER = "TCB-PROBE-OK"

# How long a KVM probe boot may stay silent before we call KVM broken. A
# working KVM prints "Linux version" well under a second after start; TCG
# needs about 3 s just to decompress the kernel.
KVM_FIRST_OUTPUT_S = 4.0
KVM_PROBE_TOTAL_S = 15.0

# Extra time the host allows a command beyond its own limit before it gives
# up on the guest: a TCG guest under load answers slowly.
RUN_SLACK_S = 15.0
MAX_SCRIPT_BYTES = 64 * 1024


class GuestError(TcbError):
    """qemu, the guest or the pod's DHCP server failed or did not answer in time."""


class GuestTimeout(GuestError):
    """A guest command or the boot overran its time limit."""


# --- the initramfs -------------------------------------------------------------

INIT_SCRIPT = r"""#!/bin/sh
# PID 1 of the tcbypass test guest (built by tcbypass/lab/guest.py).
# Kernel parameters read here:
#   tcb.nics=N                 wait until N ethN devices exist
#   tcb.ip=DEV:ADDR/LEN[:GW]   static address for DEV instead of DHCP (repeatable)
#   tcb.probe=1                print the probe marker and power off at once
export PATH=/bin:/sbin:/usr/bin:/usr/sbin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mkdir -p /run/tcb /tmp

say() { echo "$*" >/dev/ttyS0; }

if grep -qw tcb.probe=1 /proc/cmdline; then
    say TCB-PROBE-OK
    poweroff -f
fi

while read -r mod; do
    insmod "/lib/modules/tcb/$mod.ko" || say "TCB-GUEST-WARN insmod $mod failed"
done </etc/tcb/modules

want=0
for arg in $(cat /proc/cmdline); do
    case "$arg" in tcb.nics=*) want=${arg#tcb.nics=} ;; esac
done
tries=0
while [ "$(ls -d /sys/class/net/eth* 2>/dev/null | wc -l)" -lt "$want" ] && [ $tries -lt 100 ]; do
    usleep 100000
    tries=$((tries + 1))
done

ip link set lo up
nics=$(cd /sys/class/net && ls -d eth* 2>/dev/null)
for dev in $nics; do
    ip link set "$dev" up
done

for arg in $(cat /proc/cmdline); do
    case "$arg" in
    tcb.ip=*)
        spec=${arg#tcb.ip=}
        dev=${spec%%:*}
        addr=${spec#*:}
        gw=
        case "$addr" in *:*) gw=${addr#*:}; addr=${addr%%:*} ;; esac
        if ip addr add "$addr" dev "$dev"; then
            [ -z "$gw" ] || ip route replace default via "$gw" dev "$dev"
            echo "static:$addr" >"/run/tcb/addr.$dev"
        else
            say "TCB-GUEST-WARN cannot set $addr on $dev"
        fi
        ;;
    esac
done

for dev in $nics; do
    [ -e "/run/tcb/addr.$dev" ] && continue
    udhcpc -i "$dev" -f -q -n -t 5 -T 2 -s /etc/udhcpc.script >"/run/tcb/udhcpc.$dev.log" 2>&1 &
done
wait

# Keep kernel chatter off the console from here on: it carries our protocol.
echo 1 >/proc/sys/kernel/printk

# The command loop: raw mode first, so that no line the host sends after
# READY is echoed back or cooked by the tty.
exec </dev/ttyS0 >/dev/ttyS0 2>&1
stty raw -echo

ready=TCB-GUEST-READY
for dev in $nics; do
    if [ -e "/run/tcb/addr.$dev" ]; then
        ready="$ready $dev=$(cat "/run/tcb/addr.$dev")"
    else
        ready="$ready $dev=none"
    fi
done
echo "$ready"

while read -r tag limit payload; do
    [ -n "$payload" ] || continue
    if ! echo "$payload" | base64 -d >/run/tcb/cmd.sh 2>/dev/null; then
        echo "TCB-DONE 127 $tag"
        continue
    fi
    rm -f /run/tcb/expired
    # A session of its own, so that the limit kills everything it started.
    setsid sh /run/tcb/cmd.sh </dev/null 2>&1 &
    job=$!
    ( sleep "$limit" && touch /run/tcb/expired && kill -KILL -"$job" ) >/dev/null 2>&1 &
    dog=$!
    wait "$job"
    rc=$?
    kill "$dog" 2>/dev/null
    if [ -e /run/tcb/expired ]; then
        echo "TCB-DONE $rc $tag expired"
    else
        echo "TCB-DONE $rc $tag"
    fi
done
poweroff -f
"""

UDHCPC_SCRIPT = r"""#!/bin/sh
# Called by udhcpc with $1 = deconfig|bound|renew|leasefail|nak and the lease
# in the environment ($interface $ip $mask $router $serverid $mtu).
case "$1" in
deconfig)
    ip -4 addr flush dev "$interface"
    ip link set "$interface" up
    ;;
bound|renew)
    [ -z "$mtu" ] || ip link set "$interface" mtu "$mtu"
    ip -4 addr flush dev "$interface"
    ip addr add "$ip/${mask:-32}" dev "$interface"
    if [ "$interface" = eth0 ] && [ -n "$router" ]; then
        set -- $router
        ip route replace default via "$1" dev "$interface" 2>/dev/null ||
            { ip route replace "$1" dev "$interface"; ip route replace default via "$1" dev "$interface"; }
    fi
    echo "dhcp:$ip/${mask:-32}@$serverid" >"/run/tcb/addr.$interface"
    ;;
esac
exit 0
"""


@dataclass(frozen=True)
class GuestKernel:
    """A bootable kernel image and the module tree that belongs to it."""

    image: Path
    version: str

    @property
    def modules_dir(self) -> Path:
        return Path("/lib/modules") / self.version


def find_guest_kernel(version: str | None = None) -> GuestKernel:
    """The kernel to boot: `version`, or the newest /boot/vmlinuz-* whose
    modules are installed. (The host's own kernel is not used: it has no
    modules directory here and may lack virtio drivers.)"""
    candidates = []
    for image in Path("/boot").glob("vmlinuz-*"):
        kver = image.name[len("vmlinuz-"):]
        if (Path("/lib/modules") / kver / "modules.dep").exists():
            candidates.append(GuestKernel(image, kver))
    if version:
        for kernel in candidates:
            if kernel.version == version:
                return kernel
        raise GuestError(f"no kernel {version} with modules in /boot and /lib/modules",
                         hint="apt-get install linux-image-amd64")
    if not candidates:
        raise GuestError("no /boot/vmlinuz-* with a matching /lib/modules tree",
                         hint="apt-get install linux-image-amd64")
    return max(candidates, key=lambda k: _version_key(k.version))


def _version_key(version: str) -> tuple:
    return tuple(int(p) if p.isdigit() else p for p in re.split(r"[.-]", version))


def _module_name(path: str) -> str:
    base = path.rsplit("/", 1)[-1]
    return base.split(".ko", 1)[0].replace("-", "_")


def resolve_module_order(modules_dep: str, builtin: str, wanted: Iterable[str]) -> list[tuple[str, str]]:
    """(name, relative path) of every module `wanted` needs, dependencies
    first, each once. Modules built into the kernel are left out.

    modules.dep lists, for each module, all its dependencies (transitively)
    in the order modprobe unloads them, so loading goes in reverse.
    """
    deps: dict[str, tuple[str, list[str]]] = {}
    for line in modules_dep.splitlines():
        if ":" not in line:
            continue
        mod, _, rest = line.partition(":")
        deps[_module_name(mod)] = (mod, rest.split())
    builtins = {_module_name(line) for line in builtin.splitlines() if line.strip()}

    order: list[tuple[str, str]] = []
    seen: set[str] = set()
    for name in wanted:
        name = name.replace("-", "_")
        if name in builtins:
            continue
        if name not in deps:
            raise GuestError(f"kernel module {name} is neither in modules.dep nor built in",
                             hint="is this a kernel with virtio-net support?")
        path, needs = deps[name]
        for rel in [*reversed(needs), path]:
            dep = _module_name(rel)
            if dep not in seen:
                seen.add(dep)
                order.append((dep, rel))
    return order


def _read_module(path: Path) -> bytes:
    """A module's ELF image. Compressed modules are unpacked here, because
    busybox insmod may not understand the compression."""
    data = path.read_bytes()
    if path.name.endswith(".ko.xz"):
        return lzma.decompress(data)
    if path.name.endswith(".ko.gz"):
        return gzip.decompress(data)
    if path.name.endswith(".ko.zst"):
        if not shutil.which("zstd"):
            raise GuestError(f"{path} is zstd-compressed and no zstd tool is installed",
                             hint="apt-get install zstd")
        return subprocess.run(["zstd", "-dcq", str(path)], check=True, capture_output=True, timeout=30).stdout
    return data


@dataclass(frozen=True)
class _Entry:
    """One member of a newc cpio archive."""

    path: str
    mode: int
    data: bytes = b""
    rdev: tuple[int, int] = (0, 0)


def _cpio_newc(entries: Sequence[_Entry]) -> bytes:
    """A "newc" (SVR4, no CRC) cpio archive, the format the kernel unpacks.
    Owner root, mtime 0: the same inputs give the same bytes."""
    out = bytearray()

    def member(ino: int, name: str, mode: int, data: bytes, rdev: tuple[int, int], nlink: int) -> None:
        encoded = name.encode() + b"\0"
        fields = (ino, mode, 0, 0, nlink, 0, len(data), 0, 0, rdev[0], rdev[1], len(encoded), 0)
        out.extend(b"070701" + b"".join(b"%08X" % f for f in fields) + encoded)
        out.extend(b"\0" * (-len(out) % 4))
        out.extend(data)
        out.extend(b"\0" * (-len(out) % 4))

    for ino, entry in enumerate(entries, start=1):
        nlink = 2 if stat.S_ISDIR(entry.mode) else 1
        member(ino, entry.path, entry.mode, entry.data, entry.rdev, nlink)
    member(0, "TRAILER!!!", 0, b"", (0, 0), 1)
    return bytes(out)


def _initramfs_entries(busybox: bytes, applets: list[str], modules: list[tuple[str, bytes]]) -> list[_Entry]:
    d, f, x, ln = stat.S_IFDIR | 0o755, stat.S_IFREG | 0o644, stat.S_IFREG | 0o755, stat.S_IFLNK | 0o777
    entries = [_Entry(p, d) for p in ("bin", "sbin", "usr", "usr/bin", "usr/sbin", "dev", "proc", "sys",
                                      "run", "tmp", "etc", "etc/tcb", "lib", "lib/modules", "lib/modules/tcb")]
    # The kernel opens /dev/console for init before anything is mounted.
    entries.append(_Entry("dev/console", stat.S_IFCHR | 0o600, rdev=(5, 1)))
    entries.append(_Entry("bin/busybox", x, busybox))
    for applet in applets:
        if applet != "bin/busybox":
            entries.append(_Entry(applet, ln, b"/bin/busybox"))
    entries.append(_Entry("init", x, INIT_SCRIPT.encode()))
    entries.append(_Entry("etc/udhcpc.script", x, UDHCPC_SCRIPT.encode()))
    entries.append(_Entry("etc/tcb/modules", f, "".join(f"{name}\n" for name, _ in modules).encode()))
    for name, image in modules:
        entries.append(_Entry(f"lib/modules/tcb/{name}.ko", f, image))
    return entries


def build_initramfs(cache_dir: str | os.PathLike = DEFAULT_CACHE_DIR, *, kernel: GuestKernel | None = None) -> Path:
    """The guest initramfs for `kernel` (default: `find_guest_kernel()`),
    built once and cached under `cache_dir` by a hash of everything in it."""
    kernel = kernel or find_guest_kernel()
    if not os.access(BUSYBOX, os.X_OK):
        raise GuestError(f"{BUSYBOX} is missing", hint="apt-get install busybox-static")
    order = resolve_module_order((kernel.modules_dir / "modules.dep").read_text(),
                                 _read_optional(kernel.modules_dir / "modules.builtin"), GUEST_DRIVERS)
    modules = [(name, _read_module(kernel.modules_dir / rel)) for name, rel in order]
    busybox = Path(BUSYBOX).read_bytes()
    applets = subprocess.run([BUSYBOX, "--list-full"], check=True, capture_output=True, text=True,
                             timeout=10).stdout.split()

    digest = hashlib.sha256()
    for part in (str(INITRAMFS_FORMAT).encode(), kernel.version.encode(), busybox, " ".join(applets).encode(),
                 INIT_SCRIPT.encode(), UDHCPC_SCRIPT.encode(), *(name.encode() + image for name, image in modules)):
        digest.update(hashlib.sha256(part).digest())
    cache = Path(cache_dir)
    target = cache / f"initramfs-{kernel.version}-{digest.hexdigest()[:16]}.cpio.gz"
    if target.exists():
        return target

    cache.mkdir(parents=True, exist_ok=True)
    archive = gzip.compress(_cpio_newc(_initramfs_entries(busybox, applets, modules)), compresslevel=6, mtime=0)
    fd, tmp = tempfile.mkstemp(dir=cache, prefix=".initramfs-", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as out:
            out.write(archive)
        os.chmod(tmp, 0o644)
        os.replace(tmp, target)  # atomic: a concurrent builder writes the same bytes
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    log.info("built guest initramfs %s (%d modules, %d KiB)", target, len(modules), len(archive) // 1024)
    # Older builds for this kernel are stale (qemu reads the initrd at start,
    # so a running guest does not mind).
    for old in cache.glob(f"initramfs-{kernel.version}-*.cpio.gz"):
        if old != target:
            with contextlib.suppress(OSError):
                old.unlink()
    return target


def _read_optional(path: Path) -> str:
    try:
        return path.read_text()
    except FileNotFoundError:
        return ""


# --- child processes that never outlive us -----------------------------------

class _Child:
    """A process we started in its own process group, with SIGKILL as its
    parent-death signal, optionally inside a network namespace.

    The death signal is tied to the *thread* that spawned it: spawn from a
    thread that lives as long as the child should (the main thread in tests).
    The set of live children is the one piece of process-wide state here: the
    atexit hook needs it.
    """

    _live: "set[_Child]" = set()
    _lock = threading.Lock()

    def __init__(self, argv: Sequence[str], netns_path: str | None = None, **popen):
        wrapped = ["setpriv", "--pdeathsig", "KILL"]
        if netns_path:
            wrapped += ["nsenter", f"--net={netns_path}", "--"]
        self.argv = list(argv)
        self.proc = subprocess.Popen([*wrapped, *argv], start_new_session=True, close_fds=True, **popen)
        with _Child._lock:
            _Child._live.add(self)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def kill(self, grace: float = 3.0) -> int | None:
        """SIGTERM the group, SIGKILL it after `grace` seconds, reap. Idempotent.

        The group is only signalled while its leader is unreaped, so its id
        cannot have been reused. setpriv and nsenter exec, so the leader is
        the program itself."""
        try:
            if self.proc.poll() is None:
                self._signal(signal.SIGTERM)
                try:
                    self.proc.wait(timeout=grace)
                except subprocess.TimeoutExpired:
                    self._signal(signal.SIGKILL)
                    self.proc.wait(timeout=10)
        finally:
            with _Child._lock:
                _Child._live.discard(self)
        return self.proc.returncode

    def _signal(self, sig: int) -> None:
        try:
            os.killpg(self.proc.pid, sig)
        except (ProcessLookupError, PermissionError):
            pass

    @staticmethod
    def kill_all() -> None:
        with _Child._lock:
            children = list(_Child._live)
        for child in children:
            child.kill(grace=1.0)


atexit.register(_Child.kill_all)


# --- KVM or TCG ------------------------------------------------------------------

KVM_GET_API_VERSION = 0xAE00
KVM_API_VERSION = 12


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
def _kvm_boots(image: str, initrd: str) -> bool:
    """Boot the guest once under KVM without NICs and see whether it reaches
    /init. On some hosts (nested virtualisation, this project's CI) a KVM
    guest prints the real-mode setup banner and then hangs forever, so the
    probe gives the kernel KVM_FIRST_OUTPUT_S to print "Linux version".
    Cached per process and kernel."""
    argv = [QEMU, "-accel", "kvm", "-cpu", "host", *_machine_args(128),
            "-kernel", image, "-initrd", initrd,
            "-append", "console=ttyS0 earlyprintk=ttyS0 panic=-1 tcb.probe=1"]
    child = _Child(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    console = _Console(child.proc.stdout)
    start = time.monotonic()
    try:
        kernel_up = console.wait_for(lambda line: "Linux version" in line, KVM_FIRST_OUTPUT_S)
        if kernel_up is None:
            log.info("KVM probe: no kernel output after %.0f s; using TCG", KVM_FIRST_OUTPUT_S)
            return False
        left = KVM_PROBE_TOTAL_S - (time.monotonic() - start)
        if console.wait_for(lambda line: PROBE_MARKER in line, left) is None:
            log.info("KVM probe: kernel started but never reached /init; using TCG")
            return False
        log.info("KVM probe: guest reached /init in %.1f s", time.monotonic() - start)
        return True
    finally:
        child.kill(grace=0.5)
        console.close()


def pick_accel(requested: str, kvm_boots_here) -> str:
    """"kvm" or "tcg". "auto" (overridable with TCBYPASS_GUEST_ACCEL) uses
    KVM only when /dev/kvm works and `kvm_boots_here()`, a probe boot, gets
    through."""
    if requested == "auto":
        requested = os.environ.get("TCBYPASS_GUEST_ACCEL", "auto")
    if requested in ("kvm", "tcg"):
        return requested
    if requested != "auto":
        raise GuestError(f"unknown accelerator {requested!r}", hint="use auto, kvm or tcg")
    return "kvm" if kvm_device_usable() and kvm_boots_here() else "tcg"


def choose_accel(accel: str, kernel: GuestKernel, initrd: Path) -> str:
    """pick_accel for this guest's kernel and initrd."""
    return pick_accel(accel, lambda: _kvm_boots(str(kernel.image), str(initrd)))


def _machine_args(memory: int, cpus: int = 1) -> list[str]:
    # -nodefaults: no default NIC (no user-mode network), no monitor, no VGA.
    # The first serial port goes to stdio un-multiplexed, so every byte we
    # write reaches the guest (with -nographic, qemu would watch for Ctrl-A).
    return ["-m", str(memory), "-smp", str(cpus), "-nodefaults", "-no-user-config", "-display", "none",
            "-serial", "stdio", "-no-reboot"]


# --- the serial console ------------------------------------------------------------

class _Console:
    """Reads qemu's serial output on a thread and hands complete lines to waiters."""

    def __init__(self, stream, log_path: str | None = None, tail: int = 400):
        self._stream = stream
        self._cond = threading.Condition()
        self._lines: collections.deque[str] = collections.deque()  # not yet consumed by a waiter
        self.tail: collections.deque[str] = collections.deque(maxlen=tail)
        self.eof = False
        self._log = open(log_path, "a", encoding="utf-8") if log_path else None
        self._thread = threading.Thread(target=self._pump, name="tcb-guest-console", daemon=True)
        self._thread.start()

    def _pump(self) -> None:
        fd = self._stream.fileno()
        pending = b""
        try:
            while True:
                try:
                    chunk = os.read(fd, 65536)
                except OSError:
                    break
                if not chunk:
                    break
                pending += chunk
                *complete, pending = pending.split(b"\n")
                if complete:
                    self._feed([raw.decode("utf-8", "replace").rstrip("\r") for raw in complete])
        finally:
            if pending:
                self._feed([pending.decode("utf-8", "replace").rstrip("\r")])
            with self._cond:
                self.eof = True
                self._cond.notify_all()

    def _feed(self, lines: list[str]) -> None:
        with self._cond:
            self._lines.extend(lines)
            self.tail.extend(lines)
            if self._log:
                self._log.write("".join(f"{line}\n" for line in lines))
                self._log.flush()
            self._cond.notify_all()

    def wait_for(self, match: Callable[[str], bool], timeout: float,
                 collect: list[str] | None = None) -> str | None:
        """Consume lines until one satisfies `match`; return it, or None on
        timeout or end of output. Consumed lines that do not match go to `collect`."""
        deadline = time.monotonic() + max(timeout, 0.0)
        with self._cond:
            while True:
                while self._lines:
                    line = self._lines.popleft()
                    if match(line):
                        return line
                    if collect is not None:
                        collect.append(line)
                left = deadline - time.monotonic()
                if self.eof or left <= 0:
                    return None
                self._cond.wait(left)

    def discard(self) -> None:
        with self._cond:
            self._lines.clear()

    def close(self) -> None:
        self._thread.join(timeout=2)
        with contextlib.suppress(OSError):
            self._stream.close()
        if self._log:
            self._log.close()

    def last(self, n: int = 30) -> str:
        return "\n".join(list(self.tail)[-n:])


# --- what the guest reports ----------------------------------------------------------

@dataclass(frozen=True)
class NicAddress:
    """How the guest configured one NIC: method "dhcp", "static" or "none"."""

    dev: str
    method: str
    address: str = ""  # "10.16.0.5/24"
    server: str = ""  # the DHCP server identifier of the lease

    @property
    def ip(self) -> str:
        return self.address.split("/")[0]


@dataclass(frozen=True)
class Boot:
    """The outcome of a boot: seconds from qemu start to READY, the accelerator, the NICs."""

    seconds: float
    accel: str
    nics: tuple[NicAddress, ...]

    @property
    def ips(self) -> tuple[str, ...]:
        return tuple(n.ip for n in self.nics if n.address)

    def nic(self, dev: str) -> NicAddress:
        for n in self.nics:
            if n.dev == dev:
                return n
        raise KeyError(dev)


_NIC_RE = re.compile(r"^(?P<dev>[\w.-]+)=(?:none|(?P<method>dhcp|static):(?P<addr>[0-9.]+/\d+)(?:@(?P<server>\S*))?)$")
_DONE_RE = re.compile(r"TCB-DONE (?P<rc>\d+) (?P<tag>\S+)(?P<expired> expired)?$")


def _done_tag(line: str) -> str | None:
    m = _DONE_RE.search(line)
    return m["tag"] if m else None


def parse_ready_line(line: str) -> tuple[NicAddress, ...] | None:
    """The NICs in a `TCB-GUEST-READY eth0=dhcp:10.16.0.5/24@169.254.75.10 eth1=none` line."""
    at = line.find(READY_MARKER)
    if at < 0:
        return None
    nics = []
    for token in line[at + len(READY_MARKER):].split():
        m = _NIC_RE.match(token)
        if not m:
            continue
        if m["method"]:
            nics.append(NicAddress(m["dev"], m["method"], m["addr"], m["server"] or ""))
        else:
            nics.append(NicAddress(m["dev"], "none"))
    return tuple(nics)


def kernel_cmdline(nics: int, static: dict[str, str] | None = None, extra: str = "") -> str:
    """The guest's command line. `static` maps a device to "ADDR/LEN" or "ADDR/LEN:GW"."""
    parts = ["console=ttyS0", "quiet", "panic=-1", f"tcb.nics={nics}"]
    for dev, spec in (static or {}).items():
        addr = spec.split(":")[0]
        ipaddress.ip_interface(addr)  # raises ValueError on nonsense
        parts.append(f"tcb.ip={dev}:{spec}")
    if extra:
        parts.append(extra)
    return " ".join(parts)


def encode_command(tag: str, cmd: str, limit: int) -> bytes:
    """One protocol line for the guest's command loop."""
    payload = base64.b64encode(cmd.encode()).decode()
    return f"{tag} {limit} {payload}\n".encode()


# --- the guest -------------------------------------------------------------------------

class Guest:
    """A qemu guest on tap devices inside a pod's network namespace. Use `with`.

    `taps` lists (tap name, MAC) per NIC; the first becomes the guest's eth0.
    `static` maps a guest device to "ADDR/LEN[:GW]" to skip DHCP on it.
    `accel` is "auto", "kvm" or "tcg" (see `choose_accel`).

    `csum_offload` lets the guest hand frames with partial checksums to the
    tap (virtio-net's default, and KubeVirt's). It is off by default because
    the sandbox's userspace OVS datapath forwards such frames unfixed and the
    receiving pod drops them: ICMP works either way, TCP and UDP do not. Kube-OVN
    turns tx offload off in pods on the userspace datapath for the same reason.

    Nothing runs until `start()` (or entering the `with` block).
    """

    def __init__(self, netns_path: str, taps: Sequence[tuple[str, str]], memory: int = 256,
                 accel: str = "auto", *, static: dict[str, str] | None = None, cpus: int = 1,
                 csum_offload: bool = False, kernel_args: str = "", kernel: GuestKernel | None = None,
                 cache_dir: str | os.PathLike = DEFAULT_CACHE_DIR, console_log: str | None = None):
        if not taps:
            raise GuestError("a guest needs at least one tap", hint="pass taps=[('tap0', mac)]")
        self.netns_path = netns_path
        self.taps = [(tap, mac.lower()) for tap, mac in taps]
        self.memory = memory
        self.cpus = cpus
        self.requested_accel = accel
        self.static = dict(static or {})
        self.csum_offload = csum_offload
        self.kernel_args = kernel_args
        self.cache_dir = cache_dir
        self.console_log = console_log
        self.kernel = kernel
        self.accel = ""
        self.boot: Boot | None = None
        self._child: _Child | None = None
        self._console: _Console | None = None
        self._started_at = 0.0
        self._seq = 0
        self._broken = ""

    # --- lifecycle ---
    def __enter__(self) -> "Guest":
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def start(self) -> None:
        if self._child:
            return
        if not os.path.exists(self.netns_path):
            raise GuestError(f"network namespace {self.netns_path} does not exist")
        if not shutil.which(QEMU):
            raise GuestError(f"{QEMU} is not installed", hint="apt-get install qemu-system-x86")
        self._check_taps()
        os.makedirs(os.path.dirname(self.qmp_path), exist_ok=True)
        self.kernel = self.kernel or find_guest_kernel()
        initrd = build_initramfs(self.cache_dir, kernel=self.kernel)
        self.accel = choose_accel(self.requested_accel, self.kernel, initrd)
        argv = self.qemu_argv(initrd)
        log.info("starting guest (%s) in %s: %s", self.accel, self.netns_path, " ".join(argv))
        self._started_at = time.monotonic()
        self._child = _Child(argv, self.netns_path, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT)
        try:
            self._console = _Console(self._child.proc.stdout, self.console_log)
        except BaseException:
            self.close()
            raise

    def _check_taps(self) -> None:
        """Every tap must exist already: given a missing name, qemu would
        quietly create a fresh tap that is plugged into nothing."""
        with netdev.open_netns(self.netns_path) as ipr:
            links = netdev.list_links(ipr)
        for tap, _ in self.taps:
            link = links.get(tap)
            if link is None or link.kind != "tun":
                found = f"a {link.kind or 'plain'} device" if link else "nothing"
                raise GuestError(f"{tap} in {self.netns_path} is {found}, not a tap",
                                 hint="create the tap first, as virt-handler does (Sandbox.add_vm(vm_link='tap'))")

    def qemu_argv(self, initrd: Path) -> list[str]:
        accel = ["-accel", "kvm", "-cpu", "host"] if self.accel == "kvm" else ["-accel", "tcg"]
        offload = "" if self.csum_offload else ",csum=off"  # csum=off also rules out TSO
        nics = []
        for i, (tap, mac) in enumerate(self.taps):
            # The tap already exists (virt-handler's job); qemu only attaches.
            nics += ["-netdev", f"tap,id=n{i},ifname={tap},script=no,downscript=no,vhost=off",
                     "-device", f"virtio-net-pci,netdev=n{i},mac={mac}{offload}"]
        return [QEMU, "-name", "tcbypass-guest", *accel, *_machine_args(self.memory, self.cpus),
                "-qmp", f"unix:{self.qmp_path},server=on,wait=off",
                "-kernel", str(self.kernel.image), "-initrd", str(initrd),
                "-append", kernel_cmdline(len(self.taps), self.static, self.kernel_args), *nics]

    @property
    def qmp_path(self) -> str:
        return os.path.join(self.cache_dir, "..", "run", f"qmp-{os.getpid()}-{id(self):x}.sock")

    def announce(self, rounds: int = 3) -> None:
        """Make QEMU announce the guest's NICs (RARP from each NIC's MAC), as it
        does when a live migration lands on the target node."""
        import json as _json
        import socket as _socket

        with _socket.socket(_socket.AF_UNIX) as sock:
            sock.settimeout(10)
            sock.connect(self.qmp_path)
            stream = sock.makefile("rwb")
            stream.readline()  # greeting
            for command in ({"execute": "qmp_capabilities"},
                            {"execute": "announce-self",
                             "arguments": {"initial": 50, "max": 100, "rounds": rounds, "step": 50}}):
                stream.write(_json.dumps(command).encode() + b"\n")
                stream.flush()
                while True:
                    reply = _json.loads(stream.readline() or b"{}")
                    if "return" in reply or "error" in reply:
                        break
                if "error" in reply:
                    raise GuestError(f"QMP {command['execute']} failed: {reply['error']}")

    def close(self) -> None:
        """Kill qemu and reap it. Safe to call more than once."""
        child, self._child = self._child, None
        if child:
            with contextlib.suppress(OSError):
                if child.proc.stdin:
                    child.proc.stdin.close()
            child.kill()
        console, self._console = self._console, None
        if console:
            console.close()
        with contextlib.suppress(OSError):
            os.unlink(self.qmp_path)

    @property
    def pid(self) -> int | None:
        return self._child.pid if self._child else None

    def console_tail(self, n: int = 30) -> str:
        return self._console.last(n) if self._console else ""

    # --- boot ---
    def wait_ready(self, timeout: float = 120) -> Boot:
        """Wait for the guest's READY line: boot time and addresses."""
        if self.boot:
            return self.boot
        console = self._running()
        line = console.wait_for(lambda l: READY_MARKER in l, timeout)
        if line is None:
            if self._qemu_gone(console):
                raise GuestError(f"qemu exited ({self._child.proc.returncode}) before the guest was ready:\n"
                                 f"{console.last()}")
            raise GuestTimeout(f"guest not ready after {timeout:.0f} s ({self.accel}):\n{console.last()}")
        self.boot = Boot(round(time.monotonic() - self._started_at, 2), self.accel, parse_ready_line(line) or ())
        log.info("guest ready in %.1f s (%s): %s", self.boot.seconds, self.accel, self.boot.nics)
        return self.boot

    # --- commands ---
    def run(self, cmd: str, timeout: float = 30) -> tuple[int, str]:
        """Run `cmd` with sh in the guest; (exit code, stdout+stderr).

        The guest kills the command (its whole session) after `timeout`
        seconds and GuestTimeout is raised; the guest stays usable. If the
        guest does not answer at all within `timeout` plus some slack, it is
        marked broken. A command may leave a daemon running (`srv &`): it
        survives, and should send its output somewhere other than the console."""
        if self._broken:
            raise GuestError(f"guest no longer usable: {self._broken}")
        if not self.boot:
            raise GuestError("guest not ready", hint="call wait_ready() first")
        if len(cmd.encode()) > MAX_SCRIPT_BYTES:
            raise GuestError(f"command longer than {MAX_SCRIPT_BYTES} bytes")
        console = self._running()
        self._seq += 1
        tag = f"c{self._seq}"
        limit = max(1, math.ceil(timeout))
        console.discard()  # stray output between commands is not ours
        try:
            self._child.proc.stdin.write(encode_command(tag, cmd, limit))
            self._child.proc.stdin.flush()
        except OSError as exc:
            self._broken = f"console write failed ({exc})"
            raise GuestError(f"cannot write to the guest console ({exc})") from None
        output: list[str] = []
        started = time.monotonic()
        line = console.wait_for(lambda l: _done_tag(l) == tag, limit + RUN_SLACK_S, collect=output)
        m = _DONE_RE.search(line) if line else None
        if not m:
            if self._qemu_gone(console):
                self._broken = f"qemu exited ({self._child.proc.returncode})"
                raise GuestError(f"qemu exited ({self._child.proc.returncode}) while running {cmd!r}:\n"
                                 f"{console.last()}")
            self._broken = f"no answer to {cmd!r} within {limit + RUN_SLACK_S:.0f} s"
            raise GuestTimeout(f"guest did not answer {cmd!r} within {limit + RUN_SLACK_S:.0f} s:\n"
                               f"{console.last()}")
        # Output that did not end in a newline shares the marker's line.
        text = "".join(f"{l}\n" for l in output) + line[:m.start()]
        if m["expired"]:
            raise GuestTimeout(f"{cmd!r} still running after {limit} s; the guest killed it\n{text}")
        log.debug("guest ran %r in %.2f s: rc %s", cmd, time.monotonic() - started, m["rc"])
        return int(m["rc"]), text

    def _qemu_gone(self, console: _Console) -> bool:
        """Whether qemu has exited. Its output ends a moment before the
        process can be reaped, so give it that moment after EOF."""
        if console.eof:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self._child.proc.wait(timeout=2)
        return not self._child.alive()

    def _running(self) -> _Console:
        if not self._child or not self._console:
            raise GuestError("guest not started", hint="use 'with Guest(...)' or call start()")
        return self._console


# --- the pod's DHCP server ----------------------------------------------------------

def udhcpd_config(bridge: str, mac: str, ip: str, prefix: int, run_dir: str, router: str | None = None,
                  mtu: int | None = None, lease_seconds: int = 86400) -> str:
    """A udhcpd configuration that serves exactly one address: `ip` to `mac`."""
    addr = ipaddress.IPv4Interface(f"{ip}/{prefix}")
    if not re.fullmatch(r"(?:[0-9a-f]{2}:){5}[0-9a-f]{2}", mac.lower()):
        raise GuestError(f"{mac!r} is not a MAC address")
    lines = [
        f"interface {bridge}",
        # The pool is the one address; the static lease pins it to the MAC, so
        # any other client gets nothing.
        f"start {addr.ip}",
        f"end {addr.ip}",
        "max_leases 1",
        f"static_lease {mac.lower()} {addr.ip}",
        f"lease_file {run_dir}/udhcpd.leases",
        f"pidfile {run_dir}/udhcpd.pid",
        "auto_time 0",
        f"option subnet {addr.netmask}",
        f"option lease {lease_seconds}",
    ]
    if router:
        lines.append(f"option router {ipaddress.IPv4Address(router)}")
    if mtu:
        lines.append(f"option mtu {int(mtu)}")
    return "\n".join(lines) + "\n"


class DhcpServer:
    """busybox udhcpd serving one static lease on a bridge inside a pod. Use `with` or `stop()`.

    udhcpd takes its server identifier from the bridge's IPv4 address; in a
    KubeVirt pod that is the link-local 169.254.75.10/32 on k6t-eth0. It
    answers through a packet socket, so the /32 needs no route to the client.
    """

    def __init__(self, netns_path: str, bridge: str, mac: str, ip: str, prefix: int = 24,
                 router: str | None = None, mtu: int | None = None):
        os.makedirs(RUN_DIR, exist_ok=True)
        self.run_dir = tempfile.mkdtemp(prefix="dhcp-", dir=RUN_DIR)
        self.netns_path = netns_path
        self.bridge = bridge
        self._child: _Child | None = None
        try:
            conf = os.path.join(self.run_dir, "udhcpd.conf")
            with open(conf, "w") as f:
                f.write(udhcpd_config(bridge, mac, ip, prefix, self.run_dir, router, mtu))
            open(os.path.join(self.run_dir, "udhcpd.leases"), "wb").close()
            self._log_path = os.path.join(self.run_dir, "udhcpd.log")
            with open(self._log_path, "wb") as logf:
                self._child = _Child([BUSYBOX, "udhcpd", "-f", conf], netns_path, stdin=subprocess.DEVNULL,
                                     stdout=logf, stderr=subprocess.STDOUT)
            self._wait_listening(timeout=5.0)
        except BaseException:
            self.stop()
            raise

    def _wait_listening(self, timeout: float) -> None:
        """Until udhcpd has a socket on port 67 in the pod (its /proc view of UDP
        is the pod's namespace), or it has died."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self._child.alive():
                raise GuestError(f"udhcpd on {self.bridge} exited ({self._child.proc.returncode}): {self.log()}",
                                 hint="does the bridge exist and carry an IPv4 address?")
            try:
                with open(f"/proc/{self._child.pid}/net/udp") as f:
                    if any(row.split()[1].endswith(":0043") for row in f.read().splitlines()[1:]):
                        return
            except OSError:
                pass
            time.sleep(0.05)
        raise GuestTimeout(f"udhcpd on {self.bridge} not listening after {timeout:.0f} s: {self.log()}")

    def log(self) -> str:
        try:
            with open(self._log_path, errors="replace") as f:
                return f.read().strip()
        except (OSError, AttributeError):
            return ""

    @property
    def pid(self) -> int | None:
        return self._child.pid if self._child else None

    def stop(self) -> None:
        child, self._child = self._child, None
        if child:
            child.kill()
        shutil.rmtree(self.run_dir, ignore_errors=True)

    def __enter__(self) -> "DhcpServer":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def start_dhcp_server(netns_path: str, bridge: str = "k6t-eth0", *, mac: str, ip: str, prefix: int = 24,
                      router: str | None = None, mtu: int | None = None) -> DhcpServer:
    """Run the pod's DHCPv4 server, as virt-launcher does for bridge binding:
    it offers `ip`/`prefix` (and `router`, `mtu`) to `mac` and to nobody else."""
    return DhcpServer(netns_path, bridge, mac, ip, prefix, router, mtu)
