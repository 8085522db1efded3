"""The DHCPv4 server virt-launcher runs on k6t-eth0 for the bridge binding, played by
busybox udhcpd in the pod's namespace: one static lease, the VM's IP for the VM's MAC."""

from __future__ import annotations

import ipaddress
import os
import re
import shutil
import subprocess
import tempfile
import time

from .initramfs import BUSYBOX
from .procs import Child
from .qemu import GuestError, GuestTimeout

RUN_DIR = "/var/cache/tcbypass/run"


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
        self._child: Child | None = None
        try:
            conf = os.path.join(self.run_dir, "udhcpd.conf")
            with open(conf, "w") as f:
                f.write(udhcpd_config(bridge, mac, ip, prefix, self.run_dir, router, mtu))
            open(os.path.join(self.run_dir, "udhcpd.leases"), "wb").close()
            self._log_path = os.path.join(self.run_dir, "udhcpd.log")
            with open(self._log_path, "wb") as logf:
                self._child = Child([BUSYBOX, "udhcpd", "-f", conf], netns_path, stdin=subprocess.DEVNULL,
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
