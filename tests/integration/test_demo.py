"""The README's first command: `tcbypass demo` builds, attaches, carries traffic, reports and cleans up."""

from __future__ import annotations

import re

from tcbypass.lab.sandbox import sh
from tests.conftest import pins, run_cli


def test_demo_shows_the_bypass_carrying_traffic_and_leaves_nothing():
    proc = run_cli("demo", timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = proc.stdout
    assert "demo/demo-vm" in out and "active" in out
    assert "ping through the bypass: 20/20 replies" in out
    assert "TCP transfer: 4194304 bytes arrived" in out
    carried = re.search(r"fast path carried (\d+) packets from the VM and (\d+) to it", out)
    assert carried and int(carried[1]) > 2000 and int(carried[2]) > 20, out
    assert "latency (qperf tcp_lat 64 B" in out
    assert "demo-vm" not in sh("ip", "netns", "list").stdout
    assert not pins("demo-vm")
