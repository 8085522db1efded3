"""The README's first command: `tcbypass-lab demo` builds, attaches, carries traffic,
reports what the bypass wins, and cleans up, in under a minute."""

from __future__ import annotations

import re
import time

from tcbypass_lab.sandbox import sh
from tests.conftest import pins, run_lab


def test_demo_shows_the_bypass_carrying_traffic_and_what_it_wins_and_leaves_nothing():
    started = time.monotonic()
    proc = run_lab("demo", timeout=300)
    took = time.monotonic() - started
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = proc.stdout
    assert "demo/demo-vm" in out and "active" in out
    assert "ping through the bypass: 20/20 replies" in out
    assert "TCP transfer: 4194304 bytes arrived" in out
    carried = re.search(r"fast path carried (\d+) packets from the VM and (\d+) to it", out)
    assert carried and int(carried[1]) > 2000 and int(carried[2]) > 20, out
    gain = re.search(r"the pod bridge adds ([\d.]+) µs to a 64-byte TCP message here .*; tcbypass wins back "
                     r"([\d.]+) µs of it \((-?\d+) %, (-?\d+)-(-?\d+) % over (\d) rounds\)", out)
    honest = "the pod bridge cost nothing measurable here" in out
    assert gain or honest, out
    if gain:
        assert float(gain[1]) > 0 and int(gain[6]) >= 3
    print(f"\n    [demo] {took:.0f} s; {gain[0] if gain else 'no measurable bridge cost'}")
    assert "demo-vm" not in sh("ip", "netns", "list").stdout
    assert not pins("demo-vm")
