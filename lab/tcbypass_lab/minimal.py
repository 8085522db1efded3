"""The benchmark's reference programs, and hooking programs onto a pod for
the life of a scenario.

`build()` compiles lab/minimal.c with bcc for one pod (its MACs and
ifindexes become -D constants) and hooks the pair on the tap's and the NIC's
ingress. `empty_program()` loads a program that does nothing but return
"continue": hooked the same way on the bridge pod, it is the floor of what
any tc program costs per packet.

Hooks are either tcx links (the fds are held here; closing them detaches)
or a clsact qdisc with a direct-action filter (removed again at close).
None of this uses the product's code paths beyond the bpf(2) wrappers:
that is the point of a reference.
"""

from __future__ import annotations

import contextlib
import os
import socket
import struct
from dataclasses import dataclass, field
from pathlib import Path

from tcbypass import bpfsys, netdev, netns
from tcbypass.errors import BpfError
from tcbypass.features import HOOK_CLSACT, HOOK_TCX

SOURCE = Path(__file__).with_name("minimal.c")
FROM_VM, TO_VM = "min_from_vm", "min_to_vm"
EMPTY = "bench_empty"
TC_ACT_UNSPEC = -1
CLSACT_INGRESS = 0xFFFFFFF2
ETH_P_ALL = 0x0003
FILTER_PRIO = 0x7E  # not tcbypass's priority, so the two can never be confused
FILTER_NAME = "tcbypass-bench"


def mac_number(mac: str) -> int:
    """'0a:11:22:33:44:55' -> 0x0a1122334455."""
    return int(mac.replace(":", "").replace("-", ""), 16)


def cflags(vm_mac: str, host_mac: str, tap_ifindex: int, nic_ifindex: int, peer: bool = True,
           proxy: bool = False) -> list[str]:
    flags = [f"-DTCB_VM_MAC={mac_number(vm_mac):#014x}ULL", f"-DTCB_HOST_MAC={mac_number(host_mac):#014x}ULL",
             f"-DTCB_TAP_IFINDEX={tap_ifindex}", f"-DTCB_NIC_IFINDEX={nic_ifindex}"]
    if not peer:
        flags.append("-DTCB_PLAIN_REDIRECT")
    if proxy:
        flags.append("-DTCB_PROXY_ALL")
    return flags


@dataclass
class Hooks:
    """Programs hooked on devices of one namespace; close() takes them off."""

    netns: str
    hook: str
    links: list[int] = field(default_factory=list)  # tcx link fds
    clsact: list[int] = field(default_factory=list)  # ifindexes we added clsact to

    def add(self, dev: str, prog_fd: int) -> None:
        if self.hook == HOOK_TCX:
            def create() -> int:
                return bpfsys.tcx_link_create(prog_fd, socket.if_nametoindex(dev))

            self.links.append(netns.run_in(self.netns, create))
            return
        with netdev.open_netns(self.netns) as ipr:
            index = ipr.link_lookup(ifname=dev)[0]
            ipr.tc("add", kind="clsact", index=index)
            self.clsact.append(index)
            ipr.tc("add-filter", kind="bpf", index=index, parent=CLSACT_INGRESS, prio=FILTER_PRIO, handle=1,
                   protocol=ETH_P_ALL, fd=prog_fd, name=FILTER_NAME, direct_action=True)

    def close(self) -> None:
        while self.links:
            os.close(self.links.pop())
        if self.clsact:
            with contextlib.suppress(Exception), netdev.open_netns(self.netns) as ipr:
                while self.clsact:
                    index = self.clsact.pop()
                    with contextlib.suppress(Exception):
                        ipr.tc("del", kind="clsact", index=index)
        self.clsact.clear()


def hook_pair(pod_ns: str, hook: str, tap: str, tap_prog: int, nic: str, nic_prog: int) -> Hooks:
    """`tap_prog` on the tap's ingress and `nic_prog` on the NIC's, by `hook`."""
    if hook not in (HOOK_TCX, HOOK_CLSACT):
        raise ValueError(f"unknown hook {hook!r}")
    hooks = Hooks(pod_ns, hook)
    try:
        hooks.add(tap, tap_prog)
        hooks.add(nic, nic_prog)
    except BaseException:
        hooks.close()
        raise
    return hooks


@dataclass
class Reference:
    """The minimal pair built for one pod and hooked on it."""

    hook: str
    peer: bool
    from_vm: int  # program fds (owned by the bcc module)
    to_vm: int
    _bpf: object = None
    _hooks: Hooks | None = None

    @property
    def programs(self) -> tuple[tuple[str, int], ...]:
        return ((FROM_VM, self.from_vm), (TO_VM, self.to_vm))

    def close(self) -> None:
        if self._hooks is not None:
            self._hooks.close()
            self._hooks = None
        if self._bpf is not None:
            self._bpf.cleanup()
            self._bpf = None


def build(pod_ns: str, tap: str, nic: str, vm_mac: str, host_mac: str, hook: str, peer: bool,
          proxy: bool = False) -> Reference:
    """Compile minimal.c for this pod and hook it (`proxy`: every frame both
    ways by bpf_redirect()). bcc is needed here (the benchmark builds a
    reference; nodes never do)."""
    without = "leave the minimal scenarios out (--scenarios direct,bridge,bypass)"
    try:
        from bcc import BPF
    except ImportError:
        raise BpfError("the minimal reference program is compiled by the bench, and bcc is not installed",
                       hint=f"install python3-bpfcc and kernel headers (scripts/setup.sh), or {without}") from None

    def indexes() -> tuple[int, int]:
        return socket.if_nametoindex(tap), socket.if_nametoindex(nic)

    tap_ifindex, nic_ifindex = netns.run_in(pod_ns, indexes)
    try:
        bpf = BPF(src_file=str(SOURCE).encode(),
                  cflags=cflags(vm_mac, host_mac, tap_ifindex, nic_ifindex, peer, proxy))
    except Exception as exc:  # bcc raises plain Exceptions; clang's messages went to stderr
        raise BpfError(f"bcc could not compile {SOURCE.name} ({exc})",
                       hint=f"kernel headers missing? 'tcbypass doctor' says; or {without}") from None
    try:
        from_vm = bpf.load_func(FROM_VM.encode(), BPF.SCHED_CLS).fd
        to_vm = bpf.load_func(TO_VM.encode(), BPF.SCHED_CLS).fd
        hooks = hook_pair(pod_ns, hook, tap, from_vm, nic, to_vm)
    except BaseException:
        bpf.cleanup()
        raise
    return Reference(hook, peer, from_vm, to_vm, bpf, hooks)


def empty_program() -> int:
    """A SCHED_CLS program that returns TC_ACT_UNSPEC and nothing else; its fd."""
    code = struct.pack("<BBhi", 0xB7, 0, 0, TC_ACT_UNSPEC) + struct.pack("<BBhi", 0x95, 0, 0, 0)  # r0 = -1; exit
    return bpfsys.prog_load(EMPTY, code)
