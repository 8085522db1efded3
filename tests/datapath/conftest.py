"""The datapath layer: bpf/redirect.c run through BPF_PROG_TEST_RUN.

Cilium's pktgen -> setup -> check, in Python: a test builds a frame with
scapy (pktgen.py), the `dp` fixture has filled the maps of a TCB_TEST
instance, and `dp.from_vm(frame)` / `dp.to_vm(frame)` run one of the two
programs on it and return an `Outcome`: the tc verdict, the frame the kernel
hands back, the redirect the test build recorded (target, by peer or not,
the packet type set), and how every counter moved.

Why a network namespace: the ifindex in the test context and the ifindex a
devmap entry holds are both resolved in the network namespace of the calling
thread. So the devices are real veths in a namespace of our own, and both the
devmap write (set_tap) and every test run happen on a thread inside it
(netns.run_in). Pins stay in the host's bpffs view.

Objects made here carry a random tag (netns `tcbdp-<tag>`, pins
`/sys/fs/bpf/tcbypass/v2/dptest-<tag>`) and are removed even after a failure.
An instance's maps and programs are opened once, right after pinning, and
used through those fds from then on.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import secrets
import socket
from dataclasses import dataclass
from typing import Callable, Iterator, TypeVar

import pytest

from tcbypass import bpfsys, build, loader, netns
from tcbypass.maps import (
    TC_ACT_REDIRECT,
    TC_ACT_UNSPEC,
    TEST_OUT,
    AttachmentMaps,
    Counters,
    Direction,
    F_DHCP_TO_BRIDGE,
    Reason,
    config_entry,
    parse_mac,
)
from tcbypass_lab.sandbox import NETNS_DIR, sh

from .pktgen import ADDR

T = TypeVar("T")

# Device names inside the test namespace. Each is one end of a veth pair
# whose other end is `<name>-p`; only the first end is ever given to the program.
TAP, NIC, STRAY = "dptap", "dpnic", "dpstray"


# --- kernel objects ----------------------------------------------------------
@dataclass(frozen=True)
class Pod:
    """A network namespace with a tap, a NIC and a device no port entry names."""

    name: str
    tap: int
    nic: int
    stray: int

    @property
    def path(self) -> str:
        return f"{NETNS_DIR}/{self.name}"

    def run(self, fn: Callable[[], T]) -> T:
        """Run `fn` on a thread inside the namespace."""
        return netns.run_in(self.path, fn)

    def delete_tap(self) -> None:
        """Unregister the tap (and its peer), as when a VM restarts."""
        sh("ip", "link", "delete", TAP, netns=self.name)

    def delete_nic(self) -> None:
        """Unregister the NIC (and its peer), as when a pod's interface vanishes."""
        sh("ip", "link", "delete", NIC, netns=self.name)


@contextlib.contextmanager
def pod_namespace() -> Iterator[Pod]:
    """A uniquely named namespace with three veth pairs, all up; deleted on exit."""
    name = f"tcbdp-{secrets.token_hex(3)}"
    sh("ip", "netns", "add", name)
    try:
        for dev in (TAP, NIC, STRAY):
            sh("ip", "link", "add", dev, "type", "veth", "peer", "name", f"{dev}-p", netns=name)
            sh("ip", "link", "set", dev, "up", netns=name)
            sh("ip", "link", "set", f"{dev}-p", "up", netns=name)
        index = netns.run_in(f"{NETNS_DIR}/{name}",
                             lambda: {dev: socket.if_nametoindex(dev) for dev in (TAP, NIC, STRAY)})
        yield Pod(name, tap=index[TAP], nic=index[NIC], stray=index[STRAY])
    finally:
        # Deleting the namespace destroys the veths in it.
        sh("ip", "netns", "delete", name, check=False)


@dataclass(frozen=True)
class Recorded:
    """What the test build recorded of the last redirect."""

    target: int  # 0 = no redirect recorded
    peer: bool  # by bpf_redirect_peer()
    pkt_type: int  # the packet type set for the peer (0 when not by peer)


@dataclass(frozen=True)
class Instance:
    """A TCB_TEST instance: its pin directory and open fds of what is pinned there."""

    pin_dir: str
    maps: AttachmentMaps
    programs: loader.Programs
    test_out_fd: int  # tcb_test_out, only in TCB_TEST builds

    def recorded(self) -> Recorded:
        values = []
        for slot in range(3):
            value = ctypes.c_uint32()
            bpfsys.map_lookup(self.test_out_fd, ctypes.c_uint32(slot), value)
            values.append(value.value)
        return Recorded(values[0], bool(values[1]), values[2])

    def clear_recorded(self) -> None:
        """Reset the record, so that a target of 0 afterwards means 'not redirected'."""
        for slot in range(3):
            bpfsys.map_update(self.test_out_fd, ctypes.c_uint32(slot), ctypes.c_uint32(0))


@contextlib.contextmanager
def loaded_instance(which: build.Build = build.Build(test=True)) -> Iterator[Instance]:
    """A fresh TCB_TEST instance (from the object cache) pinned in its own directory."""
    pin_dir = f"{loader.PIN_ROOT}/dptest-{secrets.token_hex(3)}"
    loader.load_and_pin(pin_dir, which)  # removes its pins itself when it fails
    try:
        with AttachmentMaps(pin_dir) as maps, loader.open_programs(pin_dir) as programs:
            fd = bpfsys.obj_get(f"{pin_dir}/{TEST_OUT}")
            try:
                yield Instance(pin_dir, maps, programs, fd)
            finally:
                os.close(fd)
    finally:
        loader.remove_pins(pin_dir)


# --- counters ------------------------------------------------------------------
def counters_delta(before: Counters, after: Counters) -> Counters:
    def sub(a: dict, b: dict) -> dict:
        return {k: a[k] - b[k] for k in a}

    return Counters(sub(after.redirect_packets, before.redirect_packets),
                    sub(after.redirect_bytes, before.redirect_bytes),
                    sub(after.passed, before.passed))


def expected_delta(*, redirected: Direction | None = None, nbytes: int = 0,
                   passed: Reason | None = None, packets: int = 1) -> Counters:
    """The counter movement of `packets` runs with one verdict; everything else 0."""
    zero = Counters.zero()
    rp, rb, ps = dict(zero.redirect_packets), dict(zero.redirect_bytes), dict(zero.passed)
    if redirected is not None:
        rp[redirected.name.lower()] = packets
        rb[redirected.name.lower()] = nbytes * packets
    if passed is not None:
        ps[passed.name.lower()] = packets
    return Counters(rp, rb, ps)


def describe(delta: Counters) -> str:
    """What the counters say happened, e.g. 'redirect from_vm' or 'pass multicast'."""
    moved = [f"redirect {d}" for d, n in delta.redirect_packets.items() if n]
    moved += [f"pass {r}" for r, n in delta.passed.items() if n]
    return ", ".join(moved) or "nothing counted"


@dataclass(frozen=True)
class Outcome:
    """One BPF_PROG_TEST_RUN of one program on one frame."""

    frame: bytes
    direction: Direction  # the program that ran
    retval: int
    data_out: bytes
    recorded: Recorded  # tcb_test_out after the run
    delta: Counters
    mark: int = 0  # skb->mark when the program returned

    @property
    def verdict(self) -> str:
        return describe(self.delta)

    @property
    def target(self) -> int:
        return self.recorded.target

    def expect_redirect(self, to: int) -> None:
        """Redirected by bpf_redirect() to ifindex `to`, counted once with the
        frame's length, frame untouched."""
        assert (self.retval, self.verdict) == (TC_ACT_REDIRECT, f"redirect {self.direction.name.lower()}")
        assert self.recorded == Recorded(to, False, 0)
        assert self.data_out == self.frame
        assert self.delta == expected_delta(redirected=self.direction, nbytes=len(self.frame))

    def expect_peer_redirect(self, to: int, pkt_type: int) -> None:
        """Redirected by bpf_redirect_peer() into the peer of `to`, with the
        packet type set to `pkt_type`; counted once, frame untouched."""
        assert (self.retval, self.verdict) == (TC_ACT_REDIRECT, f"redirect {self.direction.name.lower()}")
        assert self.recorded == Recorded(to, True, pkt_type)
        assert self.data_out == self.frame
        assert self.delta == expected_delta(redirected=self.direction, nbytes=len(self.frame))

    def expect_pass(self, reason: Reason) -> None:
        """Left to the bridge ("continue", TC_ACT_UNSPEC) for `reason`, counted
        once, frame untouched."""
        assert (self.retval, self.verdict) == (TC_ACT_UNSPEC, f"pass {reason.name.lower()}")
        assert self.target == 0
        assert self.data_out == self.frame
        assert self.delta == expected_delta(passed=reason)


# --- the runner ------------------------------------------------------------------
@dataclass(frozen=True)
class Measurement:
    retval: int
    ns_per_packet: int
    repeat: int


def measure_ns_per_packet(pod: Pod, prog_fd: int, frame: bytes, ifindex: int,
                          repeat: int = 100_000) -> Measurement:
    """Run a program `repeat` times on `frame` in the kernel and return the
    kernel's mean run time per packet (BPF_PROG_TEST_RUN's `duration`, JIT
    on). It covers the program alone: no driver, no queue, no transmit."""
    run = pod.run(lambda: bpfsys.prog_test_run(prog_fd, frame, ifindex=ifindex, repeat=repeat))
    return Measurement(run.retval, run.duration_ns, repeat)


class Datapath:
    """One instance wired to one Pod the way `tcbypass attach` wires it."""

    def __init__(self, pod: Pod, instance: Instance):
        self.pod = pod
        self.instance = instance
        self.maps = instance.maps
        self.addr = ADDR

    def wire(self, flags: int = F_DHCP_TO_BRIDGE) -> None:
        """The config as attach writes it (the tap for FROM_VM, the NIC for
        TO_VM, the MACs of pktgen's addressing plan); both devmap slots
        written from inside the namespace."""
        vm, bridge, host = (parse_mac(m) for m in (self.addr.vm_mac, self.addr.bridge_mac, self.addr.host_mac))
        self.maps.set_config(config_entry(vm, bridge, host, flags, self.pod.tap, self.pod.nic))

        self.pod.run(lambda: self.maps.set_tap(self.pod.tap))

    def program(self, direction: Direction) -> int:
        programs = self.instance.programs
        return programs.from_vm if direction is Direction.FROM_VM else programs.to_vm

    def run(self, direction: Direction, frame: bytes, ifindex: int, cpu: int | None = None,
            mark: int = 0) -> Outcome:
        """Run the program of `direction` on `frame` arriving on `ifindex` with
        skb->mark `mark` (optionally pinned to one CPU) and report what happened."""
        prog = self.program(direction)

        def body() -> bpfsys.TestRun:
            if cpu is not None:
                os.sched_setaffinity(0, {cpu})  # this thread only
            return bpfsys.prog_test_run(prog, frame, ifindex=ifindex, mark=mark)

        self.instance.clear_recorded()
        before = self.maps.counters()
        result = self.pod.run(body)
        after = self.maps.counters()
        return Outcome(frame, direction, result.retval, result.data_out,
                       self.instance.recorded(), counters_delta(before, after), result.mark)

    def from_vm(self, frame: bytes, ifindex: int | None = None, cpu: int | None = None, mark: int = 0) -> Outcome:
        """tcb_from_vm on `frame`, by default as if it came in on the tap."""
        return self.run(Direction.FROM_VM, frame, self.pod.tap if ifindex is None else ifindex, cpu, mark)

    def to_vm(self, frame: bytes, ifindex: int | None = None, cpu: int | None = None, mark: int = 0) -> Outcome:
        """tcb_to_vm on `frame`, by default as if it came in on the NIC."""
        return self.run(Direction.TO_VM, frame, self.pod.nic if ifindex is None else ifindex, cpu, mark)

    def measure_ns_per_packet(self, direction: Direction, frame: bytes, repeat: int = 100_000) -> Measurement:
        """measure_ns_per_packet() for the program of `direction` on its own device."""
        ifindex = self.pod.tap if direction is Direction.FROM_VM else self.pod.nic
        return measure_ns_per_packet(self.pod, self.program(direction), frame, ifindex, repeat)


# --- fixtures ------------------------------------------------------------------------
def _require_root() -> None:
    if os.geteuid() != 0:
        pytest.fail("the datapath layer needs root (bpf(2), network namespaces): run the suite as root")


@pytest.fixture(scope="session")
def instance() -> Iterator[Instance]:
    """The session's TCB_TEST instance (compiled once per source change, then cached)."""
    _require_root()
    with loaded_instance() as inst:
        yield inst


@pytest.fixture(scope="session")
def pod() -> Iterator[Pod]:
    _require_root()
    with pod_namespace() as p:
        yield p


@pytest.fixture
def dp(instance: Instance, pod: Pod) -> Datapath:
    """The shared instance, rewired before every test to its default: DHCPv4
    to the bridge (the in-pod DHCP server of bridge binding)."""
    d = Datapath(pod, instance)
    d.wire()
    return d


@pytest.fixture
def private_dp() -> Iterator[Datapath]:
    """A namespace and an instance of its own, for tests that destroy devices."""
    _require_root()
    with pod_namespace() as p, loaded_instance() as inst:
        d = Datapath(p, inst)
        d.wire()
        yield d


@pytest.fixture(scope="session")
def no_peer_dp(pod: Pod) -> Iterator[Datapath]:
    """An instance of the TCB_NO_PEER test build, wired to the session's namespace."""
    _require_root()
    with loaded_instance(build.Build(test=True, no_peer=True)) as inst:
        d = Datapath(pod, inst)
        d.wire()
        yield d
