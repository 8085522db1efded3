"""The benchmark's pure parts: reading the tools, the arithmetic the tables and
issue 10's targets rest on, scenario names, the reference program's build
options, the scale bench's summaries. No root, no kernel."""

from __future__ import annotations

import json
import os
import shutil

import pytest
from click.testing import CliRunner
from rich.console import Console

from tcbypass_lab.cli import main
from tcbypass.errors import InputError
from tcbypass_lab import bench, costs, minimal, report, scale, scenarios, traffic
from tcbypass_lab import cpu
from tcbypass_lab.traffic import TCP_MTU, TCP_PER_CORE, UDP_CPU
from tcbypass_lab.results import (HEADLINE, ProgramCost, Sample, Summary, live_above_minimal, recovered,
                                  recovered_share, summarize, talk_share, targets)

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


def iperf3_json() -> str:
    received = {"seconds": 2.0, "bits_per_second": 14.5e9, "packets": 340_000, "lost_packets": 140_000}
    return json.dumps({"end": {"sum_received": received, "sum_sent": {"seconds": 2.0}}})


def test_qperf_latencies_are_read_in_microseconds():
    assert traffic.parse_qperf(QPERF_OUTPUT) == {"tcp_lat": 7.32, "udp_lat": 1250.0}


def test_a_qperf_run_that_reports_zero_gives_no_figure():
    assert traffic.parse_qperf(QPERF_FAILED_UDP) == {}


def test_iperf3_gives_gbits_for_tcp_and_received_kpps_for_udp():
    assert traffic.parse_iperf3(iperf3_json(), udp=False) == pytest.approx(14.5)
    assert traffic.parse_iperf3(iperf3_json(), udp=True) == pytest.approx(100.0)  # (340k - 140k) / 2 s


def test_recovered_is_the_share_of_the_bridge_cost_won_back_for_latency_and_throughput():
    assert recovered_share(direct=10.0, bridge=12.0, x=10.2) == pytest.approx(0.9)
    assert recovered_share(direct=100.0, bridge=80.0, x=98.0) == pytest.approx(0.9)  # higher is better
    assert recovered_share(direct=10.0, bridge=10.0, x=10.0) is None


def test_medians_and_spread_come_from_all_repetitions():
    s = Summary.of([5.0, 1.0, 3.0, 2.0, 4.0])
    assert (s.median, s.p10, s.p90, s.n) == (3.0, pytest.approx(1.4), pytest.approx(4.6), 5)


def test_recovered_is_computed_for_every_scenario_but_the_baselines():
    samples = [Sample(scen, "tcp_lat", 64, v) for scen, v in
               (("direct", 10.0), ("bridge", 12.0), ("bypass", 10.4), ("minimal", 10.2), ("bypass-clsact", 11.0))]
    got = {r.scenario: r.value for r in recovered(summarize(samples))}
    assert got == pytest.approx({"bypass": 0.8, "minimal": 0.9, "bypass-clsact": 0.5})


def test_recovered_is_marked_unclear_when_the_bridge_cost_is_within_the_noise():
    samples = [Sample(scen, "tcp_lat", 64, v) for scen, vals in
               (("direct", (10.0, 10.1)), ("bridge", (10.05, 10.1)), ("bypass", (10.0, 10.05)))
               for v in vals]
    [rec] = recovered(summarize(samples))
    assert (rec.scenario, rec.clear) == ("bypass", False)


def _samples(shares: dict[str, float]) -> list[Sample]:
    """Samples giving each scenario the recovered share `shares[scenario]` on all five headline metrics."""
    out = []
    for m in HEADLINE:
        direct, bridge = (100.0, 50.0) if m.test == "udp_pps" else (10.0, 12.0)
        out += [Sample("direct", m.test, m.size, direct, m.streams), Sample("bridge", m.test, m.size, bridge, m.streams)]
        for scen, share in shares.items():
            out.append(Sample(scen, m.test, m.size, bridge - share * (bridge - direct), m.streams))
    return out


def test_targets_pass_when_the_product_is_close_to_the_minimal_and_above_the_bars():
    t = targets(recovered(summarize(_samples({"bypass": 0.82, "minimal": 0.85}))))
    assert [m["metric"] for m in t["metrics"]] == [m.label for m in HEADLINE]
    assert all(m["bypass"] == pytest.approx(0.82) and m["gap"] == pytest.approx(0.03) for m in t["metrics"])
    assert t["overall"]["bypass"]["median"] == pytest.approx(0.82)
    assert [c["pass"] for c in t["checks"]] == [True, True, True, True] and t["pass"] is True


@pytest.mark.parametrize("bypass, minimal, failing", [
    (0.75, 0.78, ["median of the five >= 0.80"]),
    (0.82, 0.95, ["each within 0.05 of minimal", "median of the five within 0.05 of minimal"]),
])
def test_targets_fail_with_the_check_that_is_missed(bypass, minimal, failing):
    t = targets(recovered(summarize(_samples({"bypass": bypass, "minimal": minimal}))))
    assert t["pass"] is False
    assert [c["check"] for c in t["checks"] if c["pass"] is False] == failing


@pytest.mark.parametrize("bypass_ns, share, passes", [(260.0, 0.70, True), (300.0, 0.50, False)])
def test_the_cpu_target_is_the_share_of_the_bridges_cpu_won_back(bypass_ns, share, passes):
    """Direct 200 ns of CPU per packet, bridge 400: the bypass must win back 60 % of the 200."""
    cpu = [Sample("direct", UDP_CPU, 64, 200.0), Sample("bridge", UDP_CPU, 64, 400.0),
           Sample("bypass", UDP_CPU, 64, bypass_ns)]
    t = targets(recovered(summarize(_samples({"bypass": 0.9, "minimal": 0.9}) + cpu)))
    [check] = [c for c in t["checks"] if c["check"].startswith("CPU per packet")]
    assert check["value"] == pytest.approx(share) and check["pass"] is passes and t["pass"] is passes


def test_one_metric_below_the_floor_fails_the_targets():
    samples = _samples({"bypass": 0.9, "minimal": 0.9})
    samples = [s if (s.scenario, s.test, s.size) != ("bypass", "tcp_lat", 16384) else
               Sample(s.scenario, s.test, s.size, 12.0 - 0.6 * 2.0) for s in samples]
    t = targets(recovered(summarize(samples)))
    assert t["overall"]["bypass"]["min"] == pytest.approx(0.6)
    assert {c["check"]: c["pass"] for c in t["checks"]}["none below 0.70"] is False


def test_targets_without_the_minimal_scenario_are_undecided():
    t = targets(recovered(summarize(_samples({"bypass": 0.9}))))
    assert t["pass"] is None and t["metrics"][0]["minimal"] is None


def test_the_talk_figures_are_those_of_issue_10():
    assert [round(talk_share(t, s), 2) for t, s in (("tcp_lat", 64), ("tcp_lat", 1024), ("udp_lat", 32768))] == \
        [0.81, 0.61, 0.56]
    t = targets(recovered(summarize(_samples({"bypass": 0.9, "minimal": 0.9}))))
    assert [p["talk"] for p in t["talk"]] == pytest.approx([0.806, 0.613, 0.561], abs=0.001)


def test_live_cost_above_minimal_is_per_window_and_direction():
    def live(scen, prog, ns, window="qperf tcp_lat 64 B"):
        return ProgramCost(scen, prog, f"live: {window}", None, 10_000, Summary(ns, ns, ns, 1), "bpf_stats")

    rows = live_above_minimal([live("bypass", "tcb_from_vm", 130.0), live("minimal", "min_from_vm", 115.0),
                               live("bypass", "tcb_to_vm", 120.0), live("minimal", "min_to_vm", 90.0),
                               live("floor (tcx)", "bench_empty", 60.0)])
    assert [(r["direction"], r["above_ns"], r["pass"], r["floor_ns"]) for r in rows] == \
        [("from VM", 15.0, True, 60.0), ("to VM", 30.0, False, 60.0)]


def test_scenarios_are_chosen_by_name_in_the_order_given():
    assert scenarios.parse("direct, bridge,bypass,minimal,bypass") == ("direct", "bridge", "bypass", "minimal")
    with pytest.raises(InputError, match="unknown scenario"):
        scenarios.parse("direct,bypass_peer")
    variants = scenarios.VARIANTS
    assert (variants["bypass"].hook, variants["bypass"].from_vm) == ("", "")  # as `tcbypass attach` by default
    assert variants["minimal-redirect"].from_vm == "redirect" and variants["bypass-clsact"].hook == "clsact"


def test_the_quick_plan_keeps_the_four_sizes_of_the_issue_two_repetitions_and_the_default_scenarios():
    plan = bench.plan_for(quick=True)
    assert (plan.sizes, plan.reps, plan.scenarios) == ((64, 1024, 16384, 32768), 2, scenarios.DEFAULT)
    assert bench.plan_for(names=("direct", "bridge")).scenarios == ("direct", "bridge")


def test_the_reference_program_gets_its_macs_and_ifindexes_as_constants():
    flags = minimal.cflags("0a:11:22:33:44:55", "ee:ee:ee:00:00:01", 4, 2)
    assert flags == ["-DTCB_VM_MAC=0x0a1122334455ULL", "-DTCB_HOST_MAC=0xeeeeee000001ULL", "-DTCB_TAP_IFINDEX=4",
                     "-DTCB_NIC_IFINDEX=2"]
    assert minimal.cflags("0a:11:22:33:44:55", "ee:ee:ee:00:00:01", 4, 2, peer=False)[-1] == "-DTCB_PLAIN_REDIRECT"
    text = minimal.SOURCE.read_text()
    assert text.startswith("// SPDX-License-Identifier: GPL-2.0") and "What it is not" in text


def test_frames_for_the_program_cost_are_well_formed():
    frame = costs.udp_frame("0a:00:00:00:00:05", "0a:00:00:00:00:02", "10.16.0.5", "10.16.0.2")
    assert len(frame) == 14 + 20 + 8 + 64 and frame[12:14] == b"\x08\x00"
    assert costs.ipv4_checksum(frame[14:34]) == 0  # a header with its checksum sums to zero
    arp = costs.arp_request("0a:00:00:00:00:05", "10.16.0.5", "10.16.0.2")
    assert arp[:6] == b"\xff" * 6 and arp[12:14] == b"\x08\x06" and len(arp) == 60


def test_a_saved_report_renders_again_without_measuring():
    samples = _samples({"bypass": 0.82, "minimal": 0.85})
    rec = recovered(summarize(samples))
    data = {"machine": {"cpus": 2, "cpu_model": "x", "kernel": "6.18", "placement": {"latency": "l",
                                                                                      "throughput": "t"}},
            "plan": {"reps": 1}, "results": [r.to_json() for r in summarize(samples)],
            "recovered": [r.to_json() for r in rec], "targets": targets(rec), "program": [], "attach": [],
            "paths": [], "failures": []}
    text = report.markdown(data)
    assert "| tcp_lat 64 B | 82 % | 85 % | +0.03 |" in text
    console = Console(width=200, record=True)
    report.render(data, console)
    assert "targets (issue 10)" in console.export_text()


def test_the_cpu_figures_render_with_what_each_scenario_wins_back(tmp_path):
    samples = [Sample(scen, UDP_CPU, 64, ns) for scen, ns in (("direct", 200.0), ("bridge", 400.0),
                                                               ("bypass", 250.0), ("bpfbridge", 300.0))]
    samples += [Sample(scen, test, mtu, v) for mtu in (1500, 9000) for scen, v in (("direct", 8.0), ("bridge", 6.0))
                for test in (TCP_MTU, TCP_PER_CORE)]
    rec = recovered(summarize(samples))
    data = {"machine": {"cpus": 2, "cpu_model": "x", "kernel": "6.18", "placement": {"latency": "l",
                                                                                      "throughput": "t"}},
            "plan": {"reps": 1, "cpu_reps": 1, "load": {"pps": 40000}}, "results": [r.to_json() for r in
                                                                                    summarize(samples)],
            "recovered": [r.to_json() for r in rec], "targets": {}, "program": [], "attach": [], "paths": [],
            "failures": []}
    text = report.markdown(data)
    assert "| UDP 64 B, 40 kpps each way: ns CPU/packet | 200 ±0 | 400 ±0 | 250 ±0 | 300 ±0 |" in text
    assert "75 % | 50 % |" in text, "bypass wins back 150 of the bridge's 200 ns, bpfbridge 100"
    assert "| MTU 1500: Gbit/s per busy core |" in text and "| MTU 9000: Gbit/s |" in text
    if report.can_plot():
        report.plot_cpu(data, str(tmp_path / "cpu.png"))
        assert (tmp_path / "cpu.png").stat().st_size > 10_000
    assert report.cpu_plot_path("docs/benchmarks.png") == "docs/benchmarks-cpu.png"


def test_busy_time_is_read_from_the_aggregate_line_of_proc_stat():
    stat = "cpu  100 5 50 1000 7 3 40 2 0 0\ncpu0 50 0 25 500 3 1 20 1 0 0\n"
    assert cpu.parse_stat(stat, hz=100) == pytest.approx(2.0), "user nice system irq softirq steal, not idle/iowait"


def test_busy_time_comes_from_cpuidle_residency_where_there_is_one():
    start = cpu.Snapshot(at=10.0, stat_busy=5.0, idle_us=1_000_000)
    end = cpu.Snapshot(at=12.0, stat_busy=6.0, idle_us=2_500_000)
    cpus = __import__("os").cpu_count() or 1
    assert cpu.busy_between(start, end) == pytest.approx(2.0 * cpus - 1.5)
    assert cpu.busy_between(start, cpu.Snapshot(12.0, 6.0, None)) == pytest.approx(1.0), "ticks without cpuidle"


def test_a_bidir_udp_run_counts_what_arrived_both_ways():
    end = {"sum_received": {"packets": 1000, "lost_packets": 10},
           "sum_received_bidir_reverse": {"packets": 900, "lost_packets": 0}}
    assert cpu.udp_packets({"end": end}) == 1890


def test_scale_summaries_and_ips():
    s = scale.spread([0.3, 0.1, 0.2, 0.4], scale=1000)
    assert (s["p50"], s["max"], s["n"]) == (250.0, 400.0, 4)
    ips = [scale.vm_ip(i) for i in range(300)]
    assert len(set(ips)) == 300 and ips[0] == "10.16.0.4" and "10.16.0.2" not in ips
    assert all(not ip.endswith((".0", ".255")) for ip in ips)


def _invoke(*args):
    return CliRunner().invoke(main, list(args))


def test_bench_refuses_an_unknown_scenario_before_building_anything():
    res = _invoke("bench", "--scenarios", "direct,bypass_peer")
    assert res.exit_code == 2 and "unknown scenario(s): bypass_peer" in res.output


def test_datapath_options_given_to_the_scale_bench_are_refused():
    res = _invoke("bench", "--quick", "scale", "10")
    assert res.exit_code == 2 and "--quick" in res.output


def test_only_a_measuring_run_needs_qperf_and_iperf3(tmp_path, monkeypatch):
    """--paths-only proves the paths with pings: a node (or a matrix guest) without the
    traffic generators runs it; a measuring run asks for them by name."""
    for tool in traffic.REQUIRED_TOOLS:
        if tool not in traffic.SERVER_TOOLS:
            os.symlink(shutil.which(tool) or "/bin/true", tmp_path / tool)
    monkeypatch.setenv("PATH", str(tmp_path))
    bench.check_tools(bench.plan_for(paths_only=True))
    with pytest.raises(bench.BenchError, match="missing tools: qperf, iperf3"):
        bench.check_tools(bench.plan_for())
    assert not bench.plan_for(paths_only=True).warm_up, "the warm-up is a qperf run"
