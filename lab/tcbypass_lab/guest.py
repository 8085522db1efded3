"""A real VM guest on a virt-launcher pod's tap, for the `tests/vm` layer.

`Guest` boots `qemu-system-x86_64` on the initramfs of initramfs.py inside
the pod's network namespace, plugged into the pod's tap device(s) as
virtio-net NICs, exactly where virt-launcher's qemu sits. `run()` executes
shell commands in the guest over the serial console. Next to it: the
kernel and initramfs (initramfs.py), KVM or TCG (accel.py), the console
(console.py), processes that never outlive us (procs.py), and the pod's
DHCP server (dhcp.py).

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

import base64
import contextlib
import ipaddress
import logging
import math
import os
import re
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from tcbypass import netdev

from .accel import pick_accel
from .console import SerialConsole
from .initramfs import DEFAULT_CACHE_DIR, GuestKernel, build_initramfs, find_guest_kernel
from .procs import Child
from .qemu import QEMU, GuestError, GuestTimeout, machine_args
from .qmp import Qmp

log = logging.getLogger(__name__)

READY_MARKER = "TCB-GUEST-READY"
DONE_MARKER = "TCB-DONE"

# Extra time the host allows a command beyond its own limit before it gives
# up on the guest: a TCG guest under load answers slowly.
RUN_SLACK_S = 15.0
MAX_SCRIPT_BYTES = 64 * 1024


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
    `accel` is "auto", "kvm" or "tcg" (see accel.py).

    `csum_offload` lets the guest hand frames with partial checksums to the
    tap (virtio-net's default, and KubeVirt's). It is off by default because
    the sandbox's userspace OVS datapath forwards such frames unfixed and the
    receiving pod drops them: ICMP works either way, TCP and UDP do not. Kube-OVN
    turns tx offload off in pods on the userspace datapath for the same reason.

    `incoming` starts QEMU waiting for a live migration on that URI (as on the
    target node of a KubeVirt migration); `arrived_from()` then takes over the
    source guest's boot once the migration has landed. `queues` gives every
    NIC that many queues (a multi-queue tap, as KubeVirt's
    networkInterfaceMultiqueue makes one per vCPU).

    Nothing runs until `start()` (or entering the `with` block).
    """

    def __init__(self, netns_path: str, taps: Sequence[tuple[str, str]], memory: int = 256,
                 accel: str = "auto", *, static: dict[str, str] | None = None, cpus: int = 1,
                 csum_offload: bool = False, kernel_args: str = "", kernel: GuestKernel | None = None,
                 cache_dir: str | os.PathLike = DEFAULT_CACHE_DIR, console_log: str | None = None,
                 incoming: str = "", queues: int = 1):
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
        self.incoming = incoming
        self.queues = queues
        self.kernel = kernel
        self.accel = ""
        self.boot: Boot | None = None
        self._child: Child | None = None
        self._console: SerialConsole | None = None
        self._started_at = 0.0
        self._seq = 0
        self.nudges = 0  # commands answered only after _nudge()
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
        self.accel = pick_accel(self.requested_accel, str(self.kernel.image), str(initrd))
        argv = self.qemu_argv(initrd)
        log.info("starting guest (%s) in %s: %s", self.accel, self.netns_path, " ".join(argv))
        self._started_at = time.monotonic()
        self._child = Child(argv, self.netns_path, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT)
        try:
            self._console = SerialConsole(self._child.proc.stdout, self.console_log)
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
        # TCG's own CPU model, not "max": a migration needs the same CPU on both sides.
        accel = ["-accel", "kvm", "-cpu", "host"] if self.accel == "kvm" else ["-accel", "tcg"]
        nics = []
        for i, (tap, mac) in enumerate(self.taps):
            # The tap already exists (virt-handler's job); qemu only attaches.
            nics += ["-netdev", self.netdev_spec(f"n{i}", tap), "-device", self.device_spec(f"n{i}", mac)]
        return [QEMU, "-name", "tcbypass-guest", *accel, *machine_args(self.memory, self.cpus),
                "-qmp", f"unix:{self.qmp_path},server=on,wait=off",
                "-kernel", str(self.kernel.image), "-initrd", str(initrd),
                "-append", kernel_cmdline(len(self.taps), self.static, self.kernel_args), *nics,
                *(["-incoming", self.incoming] if self.incoming else [])]

    def netdev_spec(self, netdev: str, tap: str) -> str:
        queues = f",queues={self.queues}" if self.queues > 1 else ""
        return f"tap,id={netdev},ifname={tap},script=no,downscript=no,vhost=off{queues}"

    def device_spec(self, netdev: str, mac: str, device_id: str = "") -> str:
        offload = "" if self.csum_offload else ",csum=off"  # csum=off also rules out TSO
        queues = f",mq=on,vectors={2 * self.queues + 2}" if self.queues > 1 else ""
        named = f",id={device_id}" if device_id else ""
        return f"virtio-net-pci,netdev={netdev},mac={mac}{offload}{queues}{named}"

    def qmp(self, timeout: float = 30.0) -> Qmp:
        """A QMP session with this guest's QEMU (use `with`)."""
        return Qmp(self.qmp_path, timeout)

    def arrived_from(self, source: "Guest") -> None:
        """After a migration from `source` landed here: the guest is the one that
        booted there (same addresses); commands now go through this QEMU's console."""
        self.boot = source.boot

    def hotplug(self, tap: str, mac: str, device_id: str) -> None:
        """Plug a virtio-net NIC on `tap` into the running guest, as KubeVirt's
        NIC hotplug does through libvirt (netdev_add, then device_add)."""
        queues = {"queues": self.queues} if self.queues > 1 else {}
        with self.qmp() as q:
            q.execute("netdev_add", type="tap", id=f"{device_id}-net", ifname=tap, script="no", downscript="no",
                      vhost=False, **queues)
            extra = {"mq": True, "vectors": 2 * self.queues + 2} if self.queues > 1 else {}
            q.execute("device_add", driver="virtio-net-pci", netdev=f"{device_id}-net", mac=mac, id=device_id,
                      **({} if self.csum_offload else {"csum": False}), **extra)

    def unplug(self, device_id: str, timeout: float = 60.0) -> None:
        """Unplug a hot-plugged NIC (device_del, which the guest acknowledges, then netdev_del)."""
        with self.qmp() as q:
            q.execute("device_del", id=device_id)
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                if any(e.get("event") == "DEVICE_DELETED" and e.get("data", {}).get("device") == device_id
                       for e in q.events):
                    break
                q.execute("query-status")  # reads the events that came meanwhile
                time.sleep(0.1)
            else:
                raise GuestTimeout(f"the guest did not release {device_id} within {timeout:.0f} s")
            q.execute("netdev_del", id=f"{device_id}-net")

    @property
    def qmp_path(self) -> str:
        return os.path.join(self.cache_dir, "..", "run", f"qmp-{os.getpid()}-{id(self):x}.sock")

    def announce(self, rounds: int = 3) -> None:
        """Make QEMU announce the guest's NICs (RARP from each NIC's MAC), as it
        does when a live migration lands on the target node."""
        with self.qmp() as q:
            q.execute("announce-self", initial=50, max=100, rounds=rounds, step=50)

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
        if line is None and not self._qemu_gone(console):
            line = self._nudge(console, tag, output, cmd)
        m = _DONE_RE.search(line) if line else None
        if not m:
            if self._qemu_gone(console):
                self._broken = f"qemu exited ({self._child.proc.returncode})"
                raise GuestError(f"qemu exited ({self._child.proc.returncode}) while running {cmd!r}:\n"
                                 f"{console.last()}")
            waited = limit + 2 * RUN_SLACK_S
            self._broken = f"no answer to {cmd!r} within {waited:.0f} s"
            raise GuestTimeout(f"guest did not answer {cmd!r} within {waited:.0f} s (nudged once):\n"
                               f"{console.last()}")
        # Output that did not end in a newline shares the marker's line.
        text = "".join(f"{l}\n" for l in output) + line[:m.start()]
        if m["expired"]:
            raise GuestTimeout(f"{cmd!r} still running after {limit} s; the guest killed it\n{text}")
        log.debug("guest ran %r in %.2f s: rc %s", cmd, time.monotonic() - started, m["rc"])
        return int(m["rc"]), text

    def _nudge(self, console: SerialConsole, tag: str, output: list[str], cmd: str) -> str | None:
        """One more newline on a console that went quiet, and a last wait. Under TCG
        with two vCPUs the guest's UART has been seen to sit on a command (or on its
        answer) until the next byte arrives; an empty line is ignored by the
        guest's loop, and its interrupt gets a stalled UART moving."""
        with contextlib.suppress(OSError):
            self._child.proc.stdin.write(b"\n")
            self._child.proc.stdin.flush()
        line = console.wait_for(lambda l: _done_tag(l) == tag, RUN_SLACK_S, collect=output)
        if line is not None:
            self.nudges += 1
            log.warning("the guest answered %r only after a nudge on its console", cmd)
        return line

    def _qemu_gone(self, console: SerialConsole) -> bool:
        """Whether qemu has exited. Its output ends a moment before the
        process can be reaped, so give it that moment after EOF."""
        if console.eof:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self._child.proc.wait(timeout=2)
        return not self._child.alive()

    def _running(self) -> SerialConsole:
        if not self._child or not self._console:
            raise GuestError("guest not started", hint="use 'with Guest(...)' or call start()")
        return self._console


