"""tcb_stats as `tcbypass status` reads it: per-direction redirect packets and
bytes, per-reason pass packets, summed over CPUs. Deltas only: the shared
instance's counters carry whatever earlier tests ran."""

from __future__ import annotations

import os

import pytest

from tcbypass.maps import TC_ACT_REDIRECT, Direction, Reason

from .pktgen import BROADCAST, from_vm, tcp_from_vm, tcp_to_vm

pytestmark = pytest.mark.root


def test_redirect_bytes_add_up_the_whole_frames_of_each_direction(dp):
    sizes = (0, 100, 1400)
    before = dp.maps.counters()
    for payload in sizes:
        dp.from_vm(tcp_from_vm(payload)).expect_redirect(to=dp.pod.nic)
        dp.to_vm(tcp_to_vm(payload)).expect_redirect(to=dp.pod.tap)
    after = dp.maps.counters()

    assert after.redirect_packets["from_vm"] - before.redirect_packets["from_vm"] == len(sizes)
    assert after.redirect_packets["to_vm"] - before.redirect_packets["to_vm"] == len(sizes)
    assert after.redirect_bytes["from_vm"] - before.redirect_bytes["from_vm"] == sum(
        len(tcp_from_vm(p)) for p in sizes)
    assert after.redirect_bytes["to_vm"] - before.redirect_bytes["to_vm"] == sum(len(tcp_to_vm(p)) for p in sizes)
    assert after.passed == before.passed


def test_passed_frames_count_packets_per_reason_and_no_bytes(dp):
    before = dp.maps.counters()
    for _ in range(3):
        dp.from_vm(bytes(from_vm(dst=BROADCAST) / (b"\x00" * 46))).expect_pass(Reason.MULTICAST)
    dp.from_vm(tcp_from_vm(), ifindex=dp.pod.stray).expect_pass(Reason.UNKNOWN_DEV)
    after = dp.maps.counters()

    assert after.passed["multicast"] - before.passed["multicast"] == 3
    assert after.passed["unknown_dev"] - before.passed["unknown_dev"] == 1
    assert after.redirect_packets == before.redirect_packets
    assert after.redirect_bytes == before.redirect_bytes


def test_every_repeated_run_is_counted(dp):
    """BPF_PROG_TEST_RUN with repeat=N runs the program N times: N packets, N x bytes."""
    frame = tcp_from_vm()
    before = dp.maps.counters()
    m = dp.measure_ns_per_packet(Direction.FROM_VM, frame, repeat=1000)
    after = dp.maps.counters()

    assert m.retval == TC_ACT_REDIRECT
    assert after.redirect_packets["from_vm"] - before.redirect_packets["from_vm"] == 1000
    assert after.redirect_bytes["from_vm"] - before.redirect_bytes["from_vm"] == 1000 * len(frame)


def test_counters_are_summed_over_all_cpus(dp):
    """tcb_stats is per CPU: a frame counted on each CPU shows up once in the sum."""
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        pytest.skip("needs two CPUs to run on")
    frame = tcp_from_vm()
    before = dp.maps.counters()
    for cpu in cpus:
        dp.from_vm(frame, cpu=cpu).expect_redirect(to=dp.pod.nic)
    after = dp.maps.counters()

    assert after.redirect_packets["from_vm"] - before.redirect_packets["from_vm"] == len(cpus)
    assert after.redirect_bytes["from_vm"] - before.redirect_bytes["from_vm"] == len(cpus) * len(frame)
