"""Fuzz bpf/redirect.c through BPF_PROG_TEST_RUN: random and malformed
frames, on every device of the test namespace, through both programs, with
DHCP passthrough on and off and each way of handing frames over by peer.

The property: the program returns only TC_ACT_UNSPEC ("continue") or
TC_ACT_REDIRECT, never
changes a frame, counts each frame exactly once, and redirects only a frame
that a plain reading of the design allows: unicast, on a device registered
for that program's direction, from the VM's own MAC (towards the NIC, not
for the bridge itself) or to the VM's own MAC (towards the tap), of a type
we parse, and not DHCP when DHCP belongs to the bridge; then to the other
device of the pair, by peer (with the right packet type) exactly when the
flags allow it for that destination. `expected()` below is that reading, written
independently of the C code; every verdict and pass reason must match it.

Deterministic in CI: hypothesis runs derandomized (the seed comes from the
test name), without an example database, and a fixed number of examples.
BPF_PROG_TEST_RUN needs at least an Ethernet header (14 bytes), so shorter
runts cannot be fed here (tests/datapath covers the program's own checks).
"""

from __future__ import annotations

import collections
import errno
import struct
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tcbypass import bpfsys
from tcbypass.maps import (F_DHCP_TO_BRIDGE, F_PEER, F_PEER_ALL, PACKET_HOST, PACKET_OTHERHOST, TC_ACT_REDIRECT,
                           TC_ACT_UNSPEC, Direction, Reason, config_entry, parse_mac)
from tests.datapath.conftest import Datapath, Recorded, counters_delta, describe, loaded_instance, pod_namespace
from tests.datapath.pktgen import ADDR

from .conftest import report

pytestmark = pytest.mark.root

EXAMPLES_STRUCTURED = 4000
EXAMPLES_RANDOM = 2000

VM, BRIDGE, HOST = parse_mac(ADDR.vm_mac), parse_mac(ADDR.bridge_mac), parse_mac(ADDR.host_mac)
FLAGS = [F_DHCP_TO_BRIDGE, 0, F_DHCP_TO_BRIDGE | F_PEER, F_DHCP_TO_BRIDGE | F_PEER | F_PEER_ALL, F_PEER_ALL]
MACS = [VM, BRIDGE, HOST, parse_mac(ADDR.peer_mac), parse_mac(ADDR.other_mac), b"\xff" * 6,
        bytes.fromhex("01005e000001"), bytes.fromhex("333300000001"), bytes.fromhex("0180c200000e")]
ETHERTYPES = [0x0800, 0x86DD, 0x0806, 0x8100, 0x88A8, 0x8035, 0x88CC, 0x0000, 0x05DC, 0xFFFF]
IPV4, IPV6, ARP = 0x0800, 0x86DD, 0x0806


@pytest.fixture(scope="module")
def fuzz_dp():
    """A TCB_TEST instance of its own, wired to a namespace of its own."""
    with pod_namespace() as pod, loaded_instance() as instance:
        dp = Datapath(pod, instance)
        dp.wire()
        yield dp


# --- the reading of the design -----------------------------------------------------------
def expected(frame: bytes, direction: Direction, ifindex: int, dp: Datapath, flags: int) -> tuple[str, object]:
    """("redirect", Recorded) or ("pass", Reason) for one frame."""
    registered = {dp.pod.tap: Direction.FROM_VM, dp.pod.nic: Direction.TO_VM}
    if registered.get(ifindex) is not direction:
        return "pass", Reason.UNKNOWN_DEV
    dst, src, ethertype = frame[0:6], frame[6:12], int.from_bytes(frame[12:14], "big")
    if dst[0] & 1:
        return "pass", Reason.MULTICAST
    if direction is Direction.FROM_VM:
        if src != VM:
            return "pass", Reason.FOREIGN_MAC
        if dst == BRIDGE:
            return "pass", Reason.LOCAL
    elif dst != VM:
        return "pass", Reason.FOREIGN_MAC
    if ethertype == IPV4 and flags & F_DHCP_TO_BRIDGE:
        ip = frame[14:]
        if len(ip) < 20:
            return "pass", Reason.RUNT
        if ip[9] == 17 and not int.from_bytes(ip[6:8], "big") & 0x1FFF:  # UDP, first fragment
            ihl = (ip[0] & 0x0F) * 4
            if ihl < 20 or len(ip) < ihl + 8:
                return "pass", Reason.RUNT
            sport, dport = struct.unpack("!HH", ip[ihl:ihl + 4])
            if {sport, dport} & {67, 68}:
                return "pass", Reason.DHCP
    elif ethertype not in (IPV4, IPV6, ARP):
        return "pass", Reason.ETHERTYPE
    if direction is Direction.TO_VM:
        return "redirect", Recorded(dp.pod.tap, False, 0)
    if flags & (F_PEER | F_PEER_ALL) and (dst == HOST or flags & F_PEER_ALL):
        return "redirect", Recorded(dp.pod.nic, True, PACKET_HOST if dst == HOST else PACKET_OTHERHOST)
    return "redirect", Recorded(dp.pod.nic, False, 0)


# --- frames ----------------------------------------------------------------------------------
# Each field is drawn from values that matter (the VM's and the bridge's MAC,
# group addresses, the ethertypes we parse and some we do not, DHCP's ports)
# or from anything at all; a case is aimed at the program's own device and
# the VM's own MAC often enough to reach the deep verdicts (DHCP, LOCAL).
macs = st.one_of(st.sampled_from(MACS), st.binary(min_size=6, max_size=6))
ethertypes = st.one_of(st.just(IPV4), st.sampled_from(ETHERTYPES), st.integers(0, 0xFFFF))


@st.composite
def ipv4_packets(draw) -> bytes:
    """An IPv4 header with every field fair game, maybe UDP to/from DHCP's ports, maybe cut short."""
    ver_ihl = draw(st.one_of(st.just(0x45), st.integers(0x40, 0x4F), st.integers(0, 255)))
    frag = draw(st.one_of(st.just(0), st.just(0x4000), st.integers(0, 0xFFFF)))
    proto = draw(st.one_of(st.just(17), st.sampled_from([6, 1]), st.integers(0, 255)))
    header = struct.pack("!BBHHHBBH4s4s", ver_ihl, 0, draw(st.integers(0, 0xFFFF)), 0, frag, 64, proto, 0,
                         b"\x0a\x10\x00\x05", b"\x0a\x10\x00\x09")
    options = b"\x00" * 4 * max(0, (ver_ihl & 0x0F) - 5) if draw(st.booleans()) else draw(st.binary(max_size=40))
    ports = st.one_of(st.sampled_from([67, 68]), st.integers(0, 0xFFFF))
    udp = struct.pack("!HHHH", draw(ports), draw(ports), 8, 0)
    packet = header + options + udp + draw(st.binary(max_size=64))
    cut = draw(st.one_of(st.none(), st.integers(0, len(packet))))
    return packet if cut is None else packet[:cut]


@st.composite
def cases(draw, dp: Datapath) -> tuple[bytes, Direction, int, int]:
    """(frame, program direction, ingress ifindex, tcb_port flags)."""
    direction = draw(st.sampled_from(list(Direction)))
    own = dp.pod.tap if direction is Direction.FROM_VM else dp.pod.nic
    ifindex = draw(st.one_of(st.just(own), st.sampled_from([dp.pod.tap, dp.pod.nic, dp.pod.stray, 1])))
    dst, src = draw(macs), draw(macs)
    aim = draw(st.sampled_from(["the VM's own", "anything"]))
    if aim != "anything":
        if direction is Direction.FROM_VM:
            src = VM
        else:
            dst = VM
    ethertype = draw(ethertypes)
    body = draw(ipv4_packets()) if ethertype == IPV4 else draw(st.binary(max_size=128))
    flags = draw(st.sampled_from(FLAGS))
    return dst + src + ethertype.to_bytes(2, "big") + body, direction, ifindex, flags


@st.composite
def random_cases(draw, dp: Datapath) -> tuple[bytes, Direction, int, int]:
    """Any bytes at all, on any device, through either program."""
    return (draw(st.binary(min_size=14, max_size=1600)), draw(st.sampled_from(list(Direction))),
            draw(st.sampled_from([dp.pod.tap, dp.pod.nic, dp.pod.stray, 1])),
            draw(st.sampled_from(FLAGS)))


# --- the run -----------------------------------------------------------------------------------
class Fuzzer:
    """Runs frames through one instance from a thread inside its namespace and checks each."""

    def __init__(self, dp: Datapath):
        self.dp = dp
        self.flags = F_DHCP_TO_BRIDGE  # as dp.wire() left it
        self.verdicts: collections.Counter = collections.Counter()

    def set_flags(self, flags: int) -> None:
        if flags != self.flags:
            self.dp.maps.set_config(config_entry(VM, BRIDGE, HOST, flags, self.dp.pod.tap, self.dp.pod.nic))
            self.flags = flags

    def check(self, frame: bytes, direction: Direction, ifindex: int, flags: int) -> None:
        dp = self.dp
        self.set_flags(flags)
        dp.instance.clear_recorded()
        before = dp.maps.counters()
        try:
            run = bpfsys.prog_test_run(dp.program(direction), frame, ifindex=ifindex)  # on this netns thread
        except OSError as exc:
            # The kernel refuses to build an skb for an IPv4/IPv6 frame shorter
            # than its fixed header (measured on 6.18); the program never runs.
            ethertype, body = int.from_bytes(frame[12:14], "big"), len(frame) - 14
            assert exc.errno == errno.EINVAL and (
                (ethertype == IPV4 and body < 20) or (ethertype == IPV6 and body < 40)), (exc, frame.hex())
            assert dp.maps.counters() == before and dp.instance.recorded().target == 0
            self.verdicts["refused by BPF_PROG_TEST_RUN (short IPv4/IPv6 header)"] += 1
            return
        moved = counters_delta(before, dp.maps.counters())
        recorded = dp.instance.recorded()
        kind, what = expected(frame, direction, ifindex, dp, flags)
        detail = what.name.lower() if kind == "pass" else ("by peer" if what.peer else "")
        self.verdicts[f"{direction.name.lower()} {kind} {detail}".strip()] += 1

        assert run.retval in (TC_ACT_UNSPEC, TC_ACT_REDIRECT), run.retval
        assert run.data_out == frame, "the program must never change a frame"
        if run.retval == TC_ACT_REDIRECT:
            # The safety property, spelled out: only well-formed unicast of the VM's MAC on its own device.
            assert frame[0] & 1 == 0 and ifindex in (dp.pod.tap, dp.pod.nic)
            assert (frame[6:12] == VM) if direction is Direction.FROM_VM else (frame[0:6] == VM)
        if kind == "redirect":
            assert (run.retval, recorded, describe(moved)) == (
                TC_ACT_REDIRECT, what, f"redirect {direction.name.lower()}"), frame.hex()
        else:
            assert (run.retval, recorded.target, describe(moved)) == (
                TC_ACT_UNSPEC, 0, f"pass {what.name.lower()}"), frame.hex()

    def run(self, test) -> float:
        """Run a hypothesis test on a thread inside the namespace; seconds taken."""
        started = time.monotonic()
        try:
            self.dp.pod.run(test)
        finally:
            self.set_flags(F_DHCP_TO_BRIDGE)
        return time.monotonic() - started


def fuzz_settings(examples: int):
    return settings(max_examples=examples, derandomize=True, database=None, deadline=None,
                    suppress_health_check=list(HealthCheck), print_blob=True)


def test_malformed_frames_are_redirected_only_when_well_formed_and_ours(fuzz_dp, capsys):
    fuzzer = Fuzzer(fuzz_dp)

    @fuzz_settings(EXAMPLES_STRUCTURED)
    @given(case=cases(fuzz_dp))
    def structured(case):
        fuzzer.check(*case)

    took = fuzzer.run(structured)
    runs = sum(fuzzer.verdicts.values())
    report(capsys, f"fuzz, structured and malformed frames: {runs} runs in {took:.1f} s; verdicts: "
                   + ", ".join(f"{k.strip()} {v}" for k, v in sorted(fuzzer.verdicts.items())))
    assert runs >= EXAMPLES_STRUCTURED
    for reason in ("redirect", "multicast", "foreign_mac", "local", "ethertype", "dhcp", "runt", "unknown_dev"):
        assert any(reason in k for k in fuzzer.verdicts), f"the fuzzer never reached '{reason}'"


def test_random_bytes_are_never_redirected_unless_well_formed_and_ours(fuzz_dp, capsys):
    fuzzer = Fuzzer(fuzz_dp)

    @fuzz_settings(EXAMPLES_RANDOM)
    @given(case=random_cases(fuzz_dp))
    def random_bytes(case):
        fuzzer.check(*case)

    took = fuzzer.run(random_bytes)
    runs = sum(fuzzer.verdicts.values())
    report(capsys, f"fuzz, random bytes (14-1600): {runs} runs in {took:.1f} s; verdicts: "
                   + ", ".join(f"{k.strip()} {v}" for k, v in sorted(fuzzer.verdicts.items())))
    assert runs >= EXAMPLES_RANDOM
