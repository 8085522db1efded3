"""The Vagrant path, run here: libvirt started where nothing runs it, the local
box (box.py), `vagrant up` on vagrant/Vagrantfile with a test selection, the
results brought back, and `vagrant destroy -f` leaving nothing.

This machine has no systemd: nothing starts libvirtd, so `ensure_libvirt`
starts libvirtd and virtlogd itself (and says which, so that whoever started
them stops them). The Vagrantfile chooses KVM or TCG the way the lab's guests
do (accel.py), through `tcbypass-lab accel`.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from tcbypass.errors import TcbError

from .box import BOX_NAME, remove_base_volumes

REPO = Path(__file__).resolve().parents[2]
VAGRANT_DIR = REPO / "vagrant"
LIBVIRT_SOCKET = "/var/run/libvirt/libvirt-sock"
RESULTS = "vagrant/results"  # in the checkout: what the guest's run leaves for the host (JUnit)


class VagrantError(TcbError):
    """libvirt or Vagrant could not be brought to run here."""


def virsh(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(["virsh", "-c", "qemu:///system", *args], capture_output=True, text=True,
                          timeout=timeout)


def ensure_libvirt() -> list[int]:
    """Have libvirtd and virtlogd running; the pids of those started here (stop them with stop())."""
    if virsh("version").returncode == 0:
        return []
    started = []
    for daemon in ("virtlogd", "libvirtd"):
        if subprocess.run(["pgrep", "-x", daemon], capture_output=True).returncode == 0:
            continue
        try:
            subprocess.run([daemon, "-d"], check=True, capture_output=True, timeout=30)
        except FileNotFoundError:
            raise VagrantError(f"{daemon} is not installed",
                               hint="apt-get install libvirt-daemon-system (scripts/setup.sh does)") from None
        pid = subprocess.run(["pgrep", "-nx", daemon], capture_output=True, text=True).stdout.strip()
        if pid:
            started.append(int(pid))
    deadline = time.monotonic() + 30
    while virsh("version").returncode != 0:
        if time.monotonic() > deadline:
            raise VagrantError("libvirtd did not answer on qemu:///system within 30 s",
                               hint="see /var/log/libvirt/libvirtd.log")
        time.sleep(0.2)
    return started


def stop(pids: list[int]) -> None:
    for pid in pids:
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            continue


def vagrant(*args: str, env: dict | None = None, timeout: float = 3600) -> subprocess.CompletedProcess:
    return subprocess.run(["vagrant", *args], cwd=VAGRANT_DIR, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "VAGRANT_CHECKPOINT_DISABLE": "1", **(env or {})})


@dataclass
class Leftovers:
    domains: list[str] = field(default_factory=list)
    volumes: list[str] = field(default_factory=list)
    networks: list[str] = field(default_factory=list)

    @property
    def none(self) -> bool:
        return not (self.domains or self.volumes or self.networks)


def leftovers(base_volumes_too: bool = True) -> Leftovers:
    """What of the Vagrant VM is still in libvirt: its domain, volumes, management network."""
    found = Leftovers()
    found.domains = [n for n in virsh("list", "--all", "--name").stdout.split() if n.startswith("vagrant_")]
    pools = [line.split()[0] for line in virsh("pool-list", "--all").stdout.splitlines()[2:] if line.split()]
    prefix = BOX_NAME.replace("/", "-VAGRANTSLASH-")
    for pool in pools:
        for line in virsh("vol-list", pool).stdout.splitlines()[2:]:
            name = line.split()[0] if line.split() else ""
            if name.startswith("vagrant_") or (base_volumes_too and name.startswith(prefix)):
                found.volumes.append(f"{pool}/{name}")
    found.networks = [n for n in virsh("net-list", "--all", "--name").stdout.split() if n == "vagrant-libvirt"]
    return found


def destroy() -> Leftovers:
    """`vagrant destroy -f`, then the box's base volume too; what is still there (nothing, when all went)."""
    vagrant("destroy", "-f", timeout=600)
    remove_base_volumes()
    return leftovers()


def summary_line(output: str) -> str:
    """pytest's last summary line in `vagrant up`'s output ("12 passed in 80.1s"),
    framed by "=" or not (pytest -q leaves the frame off when nothing else is said),
    after Vagrant's "default: " prefix."""
    pattern = re.compile(r"^(?:=+ )?(\d+ (?:passed|failed|errors?|skipped)\b.*? in [\d.]+s(?: \(.*?\))?)(?: =+)?$")
    found = [m.group(1) for line in output.splitlines()
             if (m := pattern.match(line.strip().removeprefix("default:").strip()))]
    return found[-1] if found else ""
