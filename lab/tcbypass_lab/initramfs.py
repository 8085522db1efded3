"""The VM tests' guest: a Debian kernel from /boot and a tiny initramfs.

`build_initramfs()` packs static busybox, the virtio-net modules of the
guest kernel and an /init that configures every NIC (DHCP, or static
addresses from the kernel command line), prints `TCB-GUEST-READY ...` on
the serial console and then serves commands there (guest.py speaks that
protocol). Built once per kernel and cached.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import logging
import lzma
import os
import re
import shutil
import stat
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

from .qemu import GuestError

log = logging.getLogger(__name__)

DEFAULT_CACHE_DIR = "/var/cache/tcbypass/guest"
BUSYBOX = "/bin/busybox"

# The drivers the guest needs, by the modules that provide the devices; their
# dependencies come from modules.dep. On Debian's 6.1 kernel this resolves to
# virtio_ring virtio virtio_pci_modern_dev virtio_pci_legacy_dev virtio_pci
# failover net_failover virtio_net.
GUEST_DRIVERS = ("virtio_pci", "virtio_net")

# Bumped whenever the layout of the archive changes, so that old cache entries
# are never picked up.
INITRAMFS_FORMAT = 1


INIT_SCRIPT = r"""#!/bin/sh
# PID 1 of the tcbypass test guest (built by lab/tcbypass_lab/guest.py).
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


TOOLS_DIR = Path(__file__).with_name("guest_tools")
TOOLS = ("tcb-udp",)  # C programs of ours the guest carries (static), from guest_tools/<name>.c


def build_tools() -> list[tuple[str, bytes]]:
    """Our guest tools, compiled static with the host's gcc: (name, binary)."""
    out = []
    with tempfile.TemporaryDirectory(prefix="tcb-guest-tools-") as tmp:
        for name in TOOLS:
            binary = f"{tmp}/{name}"
            try:
                proc = subprocess.run(["gcc", "-static", "-O2", "-o", binary, str(TOOLS_DIR / f"{name}.c")],
                                      capture_output=True, text=True, timeout=120)
            except FileNotFoundError:
                raise GuestError("gcc is missing: the guest's tools are built with it",
                                 hint="apt-get install gcc libc6-dev (scripts/setup.sh does)") from None
            if proc.returncode != 0:
                raise GuestError(f"cannot build the guest tool {name}: {proc.stderr.strip()[-500:]}",
                                 hint="apt-get install gcc libc6-dev (a static libc is needed)")
            out.append((name, Path(binary).read_bytes()))
    return out


def _initramfs_entries(busybox: bytes, applets: list[str], modules: list[tuple[str, bytes]],
                       tools: Sequence[tuple[str, bytes]] = ()) -> list[_Entry]:
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
    for name, binary in tools:
        entries.append(_Entry(f"usr/bin/{name}", x, binary))
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
    sources = [(TOOLS_DIR / f"{name}.c").read_bytes() for name in TOOLS]
    for part in (str(INITRAMFS_FORMAT).encode(), kernel.version.encode(), busybox, " ".join(applets).encode(),
                 INIT_SCRIPT.encode(), UDHCPC_SCRIPT.encode(), *(name.encode() + image for name, image in modules),
                 *sources):
        digest.update(hashlib.sha256(part).digest())
    cache = Path(cache_dir)
    target = cache / f"initramfs-{kernel.version}-{digest.hexdigest()[:16]}.cpio.gz"
    if target.exists():
        return target

    cache.mkdir(parents=True, exist_ok=True)
    archive = gzip.compress(_cpio_newc(_initramfs_entries(busybox, applets, modules, build_tools())),
                            compresslevel=6, mtime=0)
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


