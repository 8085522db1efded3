"""`tcbypass bench --quick` keeps working: it runs, writes its JSON in the
documented shape, and leaves nothing behind. No test here asserts a timing.

The first tests are pure (the parsers and the arithmetic the tables rest
on); the smoke test needs root, qperf and iperf3, and takes about a minute
and a half.
"""

from __future__ import annotations

import json
import os
import secrets

import pytest

from tcbypass.lab import bench
from tcbypass.lab.sandbox import sh
from tests.conftest import pins, run_cli

QPERF_OUTPUT = """\
tcp_lat:
    latency   =  7.32 us
    msg_size  =    64 bytes
    time      =     1 sec
udp_lat:
    latency   =  1.25 ms
    msg_size  =  16 KiB (16,384)
    time      =     1 sec
"""

QPERF_FAILED_UDP = """\
udp_lat:
    latency   =   0 ns
    msg_size  =  64 KiB (65,536)
    time      =   1 sec
"""


def iperf3_json(udp: bool) -> str:
    received = {"seconds": 2.0, "bits_per_second": 14.5e9, "packets": 340_000, "lost_packets": 140_000}
    return json.dumps({"end": {"sum_received": received, "sum_sent": {"seconds": 2.0}}})


# --- pure --------------------------------------------------------------------

def test_qperf_latencies_are_read_in_microseconds():
    assert bench.parse_qperf(QPERF_OUTPUT) == {"tcp_lat": 7.32, "udp_lat": 1250.0}


def test_a_qperf_run_that_reports_zero_gives_no_figure():
    assert bench.parse_qperf(QPERF_FAILED_UDP) == {}


def test_iperf3_gives_gbits_for_tcp_and_received_kpps_for_udp():
    assert bench.parse_iperf3(iperf3_json(False), udp=False) == pytest.approx(14.5)
    assert bench.parse_iperf3(iperf3_json(True), udp=True) == pytest.approx(100.0)  # (340k - 140k) / 2 s


def test_recovered_is_the_share_of_the_bridge_cost_won_back_for_latency_and_throughput():
    assert bench.recovered_share(direct=10.0, bridge=12.0, bypass=10.2) == pytest.approx(0.9)
    assert bench.recovered_share(direct=100.0, bridge=80.0, bypass=98.0) == pytest.approx(0.9)  # higher is better
    assert bench.recovered_share(direct=10.0, bridge=10.0, bypass=10.0) is None


def test_medians_and_spread_come_from_all_repetitions():
    s = bench.Summary.of([5.0, 1.0, 3.0, 2.0, 4.0])
    assert (s.median, s.p10, s.p90, s.n) == (3.0, pytest.approx(1.4), pytest.approx(4.6), 5)


def test_recovered_is_marked_unclear_when_the_bridge_cost_is_within_the_noise():
    samples = [bench.Sample(scen, "tcp_lat", 64, v) for scen, vals in
               (("direct", (10.0, 10.1)), ("bridge", (10.05, 10.1)), ("bypass", (10.0, 10.05)))
               for v in vals]
    [rec] = bench.recovered(bench.summarize(samples))
    assert (rec.scenario, rec.clear) == ("bypass", False)


def test_the_quick_plan_keeps_the_four_sizes_of_the_issue_and_two_repetitions():
    plan = bench.plan_for(quick=True)
    assert (plan.sizes, plan.reps) == ((64, 1024, 16384, 32768), 2)
    assert bench.plan_for(quick=True, peer=False).scenarios == ("direct", "bridge", "bypass")


def test_frames_for_the_program_cost_are_well_formed():
    frame = bench.udp_frame("0a:00:00:00:00:05", "0a:00:00:00:00:02", "10.16.0.5", "10.16.0.2")
    assert len(frame) == 14 + 20 + 8 + 64 and frame[12:14] == b"\x08\x00"
    assert bench._ipv4_checksum(frame[14:34]) == 0  # a header with its checksum sums to zero
    arp = bench.arp_request("0a:00:00:00:00:05", "10.16.0.5", "10.16.0.2")
    assert arp[:6] == b"\xff" * 6 and arp[12:14] == b"\x08\x06" and len(arp) == 60


# --- the smoke test -------------------------------------------------------------

RESULT_KEYS = {"scenario", "test", "size", "median", "p10", "p90", "unit"}


def _processes_with(token: str) -> list[str]:
    """Live processes whose environment carries `token` (so: started by the run)."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/environ", "rb") as f:
                if token.encode() in f.read():
                    with open(f"/proc/{pid}/cmdline", "rb") as c:
                        cmdline = c.read().replace(b"\0", b" ").decode(errors="replace")
                    found.append(f"{pid}: {cmdline}")
        except OSError:
            continue
    return found


def _bench_netns() -> set[str]:
    return {line.split()[0] for line in sh("ip", "netns", "list").stdout.splitlines()
            if line.split() and ("-bench" in line.split()[0])}


@pytest.mark.root
def test_bench_quick_runs_writes_its_json_and_leaves_nothing_behind(tmp_path):
    token = f"TCB_BENCH_SMOKE={secrets.token_hex(8)}"
    out = tmp_path / "bench.json"
    args = ["bench", "--quick", "--json", str(out)]
    try:
        import matplotlib  # noqa: F401
        args += ["--plot", str(tmp_path / "bench.png")]
    except ImportError:
        pass
    netns_before, pins_before = _bench_netns(), pins("bench-")

    proc = run_cli(*args, env={token.split("=")[0]: token.split("=")[1]}, timeout=600)

    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "recovered" in proc.stdout  # the table was printed
    data = json.loads(out.read_text())
    assert {"machine", "results", "recovered"} <= set(data)
    assert data["machine"]["cpus"] and data["machine"]["kernel"]
    for row in data["results"]:
        assert RESULT_KEYS <= set(row), row
        assert row["scenario"] in bench.SCENARIOS and row["test"] in bench.UNITS
        assert row["p10"] <= row["median"] <= row["p90"]
    lat = {(r["scenario"], r["test"], r["size"]) for r in data["results"] if r["test"].endswith("_lat")}
    for scenario in ("direct", "bridge", "bypass", "bypass_peer"):
        for test in ("tcp_lat", "udp_lat"):
            for size in bench.QUICK_SIZES:
                assert (scenario, test, size) in lat, f"no {test} {size} B for {scenario}"
    assert {r["test"] for r in data["results"]} == {"tcp_lat", "udp_lat", "tcp_bw", "udp_pps"}
    assert all({"test", "size", "value"} <= set(r) for r in data["recovered"])
    assert {p["program"] for p in data["program"]} >= {"tcb_from_vm", "tcb_to_vm"}
    assert {a["kind"] for a in data["attach"]} == {"first", "repeated"}
    if "--plot" in args:
        assert (tmp_path / "bench.png").stat().st_size > 10_000

    assert _processes_with(token) == [], "qperf/iperf3 servers outlived the benchmark"
    assert _bench_netns() - netns_before == set(), "namespaces left behind"
    assert pins("bench-") - pins_before == set(), "attachments left behind"
