"""`tcbypass-lab bench --quick` keeps working: every default scenario carries its
traffic through the path it is named for, the JSON has the documented shape
with issue 10's targets block, and nothing is left behind. No test here
asserts a timing (the pure parts are tested in tests/unit/test_bench_results.py).

Needs root, qperf, iperf3 and bcc (the minimal reference is compiled by the
bench); takes about two minutes.
"""

from __future__ import annotations

import json
import os
import secrets

import pytest

from tcbypass import features
from tcbypass_lab import bench, scenarios
from tcbypass_lab.sandbox import sh
from tcbypass_lab.traffic import UNITS
from tests.conftest import pins, run_lab

RESULT_KEYS = {"scenario", "test", "size", "median", "p10", "p90", "unit"}
TC_ACT_REDIRECT, TC_ACT_UNSPEC = 7, 0xFFFFFFFF


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
def test_bench_quick_carries_each_scenario_on_its_path_writes_its_json_and_leaves_nothing_behind(tmp_path):
    token = f"TCB_BENCH_SMOKE={secrets.token_hex(8)}"
    out = tmp_path / "bench.json"
    args = ["bench", "--quick", "--reps", "1", "--json", str(out), "--plot", str(tmp_path / "bench.png")]
    netns_before, pins_before = _bench_netns(), pins("bench-")

    proc = run_lab(*args, env={token.split("=")[0]: token.split("=")[1]}, timeout=600)

    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "recovered" in proc.stdout and "targets (issue 10)" in proc.stdout
    data = json.loads(out.read_text())
    assert {"machine", "plan", "results", "recovered", "targets", "program", "attach", "paths"} <= set(data)
    assert tuple(data["plan"]["scenarios"]) == scenarios.DEFAULT

    # Each scenario took its path: the product's counters moved, the reference's programs ran.
    found = features.probe()
    paths = {p["scenario"]: p for p in data["paths"]}
    assert set(paths) == set(scenarios.DEFAULT) and all(p["ok"] for p in paths.values()), paths
    # The bench's host side is no switch port, so the product hands by peer only what is for it: all of it here.
    modes = {"bypass": ("peer", "peer-host") if found.redirect_peer else ("redirect",),
             "minimal": ("peer",) if found.redirect_peer else ("redirect",)}
    for name in ("bypass", "minimal"):
        p = paths[name]
        assert p["hook"] == found.best_hook and p["mode"] in modes[name], p
        assert p["replies"] == p["pings"] and p["from_vm"] >= p["pings"] and p["to_vm"] >= p["pings"], p
    assert "counters" in paths["bypass"]["evidence"] and "program runs" in paths["minimal"]["evidence"]

    for row in data["results"]:
        assert RESULT_KEYS <= set(row), row
        assert row["scenario"] in scenarios.DEFAULT and row["test"] in UNITS
        assert row["p10"] <= row["median"] <= row["p90"]
    lat = {(r["scenario"], r["test"], r["size"]) for r in data["results"] if r["test"].endswith("_lat")}
    for scenario in scenarios.DEFAULT:
        for test in ("tcp_lat", "udp_lat"):
            for size in bench.QUICK_SIZES:
                assert (scenario, test, size) in lat, f"no {test} {size} B for {scenario}"
    assert {r["test"] for r in data["results"]} == {"tcp_lat", "udp_lat", "tcp_bw", "udp_pps", "udp_cpu", "tcp_cpu",
                                                    "tcp_bw_mtu", "tcp_per_core"}
    # CPU at the fixed load for every scenario; the TCP stream at the quick plan's MTU.
    cpu = {(r["scenario"], r["test"], r["size"]) for r in data["results"] if r["test"] in ("udp_cpu", "tcp_per_core")}
    for scenario in scenarios.DEFAULT:
        assert {(scenario, "udp_cpu", 64), (scenario, "tcp_per_core", 1400)} <= cpu, scenario
    assert {r["scenario"] for r in data["recovered"]} == {"bypass", "minimal"}

    # The targets block: the five headline metrics for both, side by side.
    t = data["targets"]
    assert (t["product"], t["reference"], t["quick"]) == ("bypass", "minimal", True)
    assert len(t["metrics"]) == 5
    for m in t["metrics"]:
        assert m["bypass"] is not None and m["minimal"] is not None and m["gap"] is not None, m
    assert {c["check"] for c in t["checks"]} >= {"median of the five >= 0.80", "none below 0.70",
                                                 "each within 0.05 of minimal",
                                                 "median of the five within 0.05 of minimal",
                                                 "CPU per packet at the fixed load: recovered >= 0.60"}
    assert all(c["pass"] in (True, False) for c in t["checks"]) and t["pass"] in (True, False)
    assert [p["talk"] for p in t["talk"]] == pytest.approx([0.81, 0.61, 0.56], abs=0.01)
    assert {r["direction"] for r in t["live_above_minimal"]} == {"from VM", "to VM"}

    # Program costs: test-run verdicts of both programs, live costs of every program that runs.
    test_runs = {(p["scenario"], p["program"], p["case"].split(":")[0]): p["retval"] for p in data["program"]
                 if p["method"] == "BPF_PROG_TEST_RUN"}
    for scen, from_vm, to_vm in (("bypass", "tcb_from_vm", "tcb_to_vm"), ("minimal", "min_from_vm", "min_to_vm")):
        assert test_runs[(scen, from_vm, "redirect")] == TC_ACT_REDIRECT
        assert test_runs[(scen, to_vm, "redirect")] == TC_ACT_REDIRECT
        assert test_runs[(scen, from_vm, "pass")] == TC_ACT_UNSPEC
    live = {(p["scenario"], p["program"]) for p in data["program"] if p["method"] == "bpf_stats"}
    assert {("bypass", "tcb_from_vm"), ("bypass", "tcb_to_vm"), ("minimal", "min_from_vm"),
            ("minimal", "min_to_vm"), (f"floor ({found.best_hook})", "bench_empty")} <= live
    assert {(a["scenario"], a["kind"]) for a in data["attach"]} == {("bypass", "first"), ("bypass", "repeated")}
    assert (tmp_path / "bench.png").stat().st_size > 10_000
    assert (tmp_path / "bench-cpu.png").stat().st_size > 10_000

    assert _processes_with(token) == [], "qperf/iperf3 servers outlived the benchmark"
    assert _bench_netns() - netns_before == set(), "namespaces left behind"
    assert pins("bench-") - pins_before == set(), "attachments left behind"
