"""What one verdict costs inside the kernel, as BPF_PROG_TEST_RUN measures it.

A figure to print, not to assert on: it depends on the machine and says
nothing about the bridge or the devices. Shown even with -q.
"""

from __future__ import annotations

import pytest

from tcbypass.maps import TC_ACT_REDIRECT, Direction

from .pktgen import tcp_from_vm

pytestmark = pytest.mark.root

REPEAT = 100_000


def test_redirect_cost_per_packet_is_reported(dp, capsys, record_property):
    """tcb_from_vm on a unicast IPv4/TCP frame from the VM, with the default
    flags (DHCP to the bridge, so the IPv4 header is read too)."""
    frame = tcp_from_vm()
    m = dp.measure_ns_per_packet(Direction.FROM_VM, frame, repeat=REPEAT)

    assert m.retval == TC_ACT_REDIRECT
    record_property("ns_per_packet", m.ns_per_packet)
    with capsys.disabled():
        print(f"\n[datapath] tcb_from_vm redirect, {len(frame)}-byte IPv4/TCP frame: "
              f"{m.ns_per_packet} ns/packet (BPF_PROG_TEST_RUN, JIT, mean of {m.repeat} runs)")
