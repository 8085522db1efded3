"""A snapshot of what is in a pod's network namespace, for telling bindings apart.

Shallow: the devices and addresses (one rtnetlink dump each), which is all a
bridge-bound pod needs. Deep, on top: the nftables rules, the two sysctls
KubeVirt sets for passt, and the processes living in the namespace
(virt-launcher, passt, qemu). Only pods whose NIC is not on a bridge need
the deep read, so the attach path of a bridge-bound VM stays as cheap as
before.

The snapshot is plain data (`PodNet`); bindings.py judges it without I/O.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field

from . import netdev, netns, nftrules
from .errors import NetnsError
from .netdev import Address, Link
from .nftrules import NatRule

# Per-namespace sysctls KubeVirt writes for the passt binding (its CNI plugin, or virt-handler).
PASST_SYSCTLS = ("net/ipv4/ping_group_range", "net/ipv4/ip_unprivileged_port_start")
# Processes worth knowing about in a VM pod, by the start of their comm.
PROCESS_PREFIXES = ("virt-launcher", "virtqemud", "passt", "qemu")


@dataclass(frozen=True)
class Process:
    pid: int
    comm: str
    args: tuple[str, ...] = ()


@dataclass(frozen=True)
class PodNet:
    """Devices, addresses and (when `deep`) NAT rules, sysctls and processes of one namespace."""

    path: str
    links: dict = field(default_factory=dict, hash=False)  # name -> Link
    addresses: tuple[Address, ...] = ()
    nat_rules: tuple[NatRule, ...] | None = None  # None: not read (a shallow snapshot)
    sysctls: dict | None = field(default=None, hash=False)  # "net/ipv4/..." -> value, whitespace squeezed
    processes: tuple[Process, ...] | None = None

    @property
    def deep(self) -> bool:
        return self.nat_rules is not None

    def by_index(self) -> dict[int, Link]:
        return {link.index: link for link in self.links.values()}

    def addresses_of(self, link: Link) -> tuple[Address, ...]:
        return tuple(a for a in self.addresses if a.index == link.index)

    def holder_of(self, ip: str) -> Link | None:
        """The device that holds address `ip` (an IP without prefix)."""
        by_index = self.by_index()
        for a in self.addresses:
            if a.address == ip and a.index in by_index:
                return by_index[a.index]
        return None


# --- processes -------------------------------------------------------------------

def _read(path: str) -> str:
    try:
        with open(path, "rb") as f:
            return f.read().decode(errors="replace")
    except OSError:
        return ""


def processes_by_netns(proc: str = "/proc") -> dict[str, tuple[Process, ...]]:
    """The processes of interest on this node, by the dev:ino of their network namespace.

    Needs the host's PID namespace (the DaemonSet runs with hostPID) to see pods' processes.
    """
    found: dict[str, list[Process]] = {}
    try:
        pids = [p for p in os.listdir(proc) if p.isdigit()]
    except OSError:
        return {}
    for pid in pids:
        comm = _read(f"{proc}/{pid}/comm").strip()
        if not comm.startswith(PROCESS_PREFIXES):
            continue
        identity = netns.identity_of(f"{proc}/{pid}/ns/net")
        if identity is None:
            continue  # gone meanwhile
        args = tuple(a for a in _read(f"{proc}/{pid}/cmdline").split("\0") if a)
        found.setdefault(identity, []).append(Process(int(pid), comm, args))
    return {k: tuple(sorted(v, key=lambda p: p.pid)) for k, v in found.items()}


# --- reading one namespace -------------------------------------------------------------

def _sysctls_here() -> dict[str, str]:
    return {name: " ".join(_read(f"/proc/sys/{name}").split()) for name in PASST_SYSCTLS}


def read(path: str) -> PodNet:
    """The shallow snapshot: devices and addresses."""
    if netns.identity_of(path) is None:
        raise NetnsError(f"the network namespace {path} is gone", hint="is the pod still running?")
    with netdev.open_netns(path) as ipr:
        return PodNet(path, netdev.list_links(ipr), netdev.list_addresses(ipr))


def deepen(pod: PodNet, processes: dict[str, tuple[Process, ...]] | None = None) -> PodNet:
    """`pod` with its NAT rules, passt sysctls and processes added.

    `processes` is a `processes_by_netns()` result to share between pods; read here when None.
    """
    if pod.deep:
        return pod
    if processes is None:
        processes = processes_by_netns()
    identity = netns.identity_of(pod.path)
    return dataclasses.replace(pod, nat_rules=nftrules.read(pod.path),
                               sysctls=netns.run_in(pod.path, _sysctls_here),
                               processes=processes.get(identity or "", ()))
