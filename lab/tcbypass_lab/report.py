"""The benchmark's output for people: rich tables on the CLI's console,
Markdown for docs/benchmarks.md, and a plot.

Everything here reads a report's JSON form (Report.to_json() or a saved
file), so a saved run can be rendered again without measuring. rich is
imported only by render() and progress_display(), matplotlib only by plot().
"""

from __future__ import annotations

import contextlib
from typing import Callable, Iterator, Sequence

from .results import TALK, TARGET_FLOOR, TARGET_GAP, TARGET_MEDIAN, recovered_share
from .scenarios import BASELINES, BRIDGE, DIRECT, order
from .traffic import (IPERF3_TCP_LEN, LAT_TESTS, PPS_PAYLOAD, TCP_BW, TCP_CPU, TCP_MTU, TCP_PER_CORE, UDP_CPU,
                      UDP_PPS, size_label)

COLOURS = {"direct": "tab:green", "bridge": "tab:red", "bypass": "tab:blue", "minimal": "tab:orange",
           "bypass-clsact": "tab:cyan", "bypass-redirect": "navy", "minimal-clsact": "gold",
           "minimal-redirect": "tab:brown", "bpfbridge": "tab:purple"}


def fmt(value: float | None, digits: int = 3) -> str:
    if value is None:
        return "—"
    if abs(value) >= 100:
        return f"{value:.0f}"
    return f"{value:.{digits}g}"


def pct(value: float | None, clear: bool = True) -> str:
    if value is None:
        return "—"
    return f"{value * 100:.0f} %" + ("" if clear else " ~")


def _scenarios(data: dict) -> tuple[list[str], list[str]]:
    """All scenarios of a report in table order, and those measured against the baselines."""
    names = order({r["scenario"] for r in data["results"]})
    return names, [n for n in names if n not in BASELINES]


def _spread(r: dict | None) -> str:
    return f"{fmt(r['median'])} ±{fmt((r['p90'] - r['p10']) / 2, 2)}" if r else "—"


def _ratio(r: dict | None, direct: dict | None) -> str:
    return f"{r['median'] / direct['median']:.3f}" if r and direct else "—"


def latency_rows(data: dict, test: str) -> tuple[list[str], list[list[str]]]:
    """One latency test per size: medians ± half the p10–p90 spread, ratios to direct, recovered."""
    results = {(r["scenario"], r["size"]): r for r in data["results"] if r["test"] == test}
    rec = {(r["scenario"], r["size"]): r for r in data["recovered"] if r["test"] == test}
    names, others = _scenarios(data)
    names = [n for n in names if any(k[0] == n for k in results)]
    header = ["size"] + [f"{s} µs" for s in names] + [f"{s}/direct" for s in names if s != DIRECT]
    header += [f"recovered {s}" for s in others]
    rows = []
    for size in sorted({k[1] for k in results}):
        direct = results.get((DIRECT, size))
        row = [size_label(size)] + [_spread(results.get((s, size))) for s in names]
        row += [_ratio(results.get((s, size)), direct) for s in names if s != DIRECT]
        row += [pct(r["value"], r["clear"]) if (r := rec.get((s, size))) else "—" for s in others]
        rows.append(row)
    return header, rows


THROUGHPUT = ((TCP_BW, IPERF3_TCP_LEN, 1, "TCP Gbit/s, 1 stream"), (TCP_BW, IPERF3_TCP_LEN, 4, "TCP Gbit/s, 4 streams"),
              (UDP_PPS, PPS_PAYLOAD, 1, "UDP 64 B, kpps received"))


def figure_rows(data: dict, figures: Sequence[tuple[str, int, int, str]]) -> tuple[list[str], list[list[str]]]:
    """One row per figure (test, size, streams, label): each scenario's median ±
    spread, its ratio to direct, and what the others recover."""
    wanted = {f[:3] for f in figures}
    results = {(r["scenario"], r["test"], r["size"], r["streams"]): r for r in data["results"]
               if (r["test"], r["size"], r["streams"]) in wanted}
    rec = {(r["scenario"], r["test"], r["size"], r["streams"]): r for r in data["recovered"]
           if (r["test"], r["size"], r["streams"]) in wanted}
    names, others = _scenarios(data)
    header = ["figure"] + names + [f"{s}/direct" for s in names if s != DIRECT] + [f"recovered {s}" for s in others]
    rows = []
    for test, size, streams, label in figures:
        key = (test, size, streams)
        if not any(k[1:] == key for k in results):
            continue
        direct = results.get((DIRECT, *key))
        row = [label] + [_spread(results.get((s, *key))) for s in names]
        row += [_ratio(results.get((s, *key)), direct) for s in names if s != DIRECT]
        row += [pct(r["value"], r["clear"]) if (r := rec.get((s, *key))) else "—" for s in others]
        rows.append(row)
    return header, rows


def throughput_rows(data: dict) -> tuple[list[str], list[list[str]]]:
    return figure_rows(data, THROUGHPUT)


def cpu_rows(data: dict) -> tuple[list[str], list[list[str]]]:
    """CPU at the fixed loads (lower is better)."""
    load = (data["plan"].get("load") or {})
    figures = [(UDP_CPU, PPS_PAYLOAD, 1, f"UDP 64 B, {load.get('pps', 0) // 1000} kpps each way: ns CPU/packet")]
    caps = sorted({r["size"] for r in data["results"] if r["test"] == TCP_CPU})
    figures += [(TCP_CPU, cap, 1, f"TCP capped at {cap} Mbit/s: ns CPU/KiB") for cap in caps]
    return figure_rows(data, figures)


def per_core_rows(data: dict) -> tuple[list[str], list[list[str]]]:
    """One TCP stream at each MTU: Gbit/s, and Gbit/s per busy core."""
    mtus = sorted({r["size"] for r in data["results"] if r["test"] == TCP_MTU}, key=lambda m: (m != 1500, m))
    figures = []
    for mtu in mtus:
        figures += [(TCP_MTU, mtu, 1, f"MTU {mtu}: Gbit/s"), (TCP_PER_CORE, mtu, 1, f"MTU {mtu}: Gbit/s per busy core")]
    return figure_rows(data, figures)


def _signed(value: float | None) -> str:
    return "—" if value is None else f"{value:+.2f}"


def _verdict(ok: bool | None) -> str:
    return "—" if ok is None else ("pass" if ok else "FAIL")


def has_targets(data: dict) -> bool:
    """Did the run measure the product or the reference at all (are there targets to show)?"""
    t = data.get("targets") or {}
    return bool(t) and any(m[t["product"]] is not None or m[t["reference"]] is not None for m in t["metrics"])


def target_rows(data: dict) -> tuple[list[str], list[list[str]]]:
    """The five headline metrics, product and reference side by side, then the checks."""
    t = data.get("targets") or {}
    if not t:
        return [], []
    product, reference = t["product"], t["reference"]
    header = ["recovered", product, reference, f"gap ({reference} − {product})"]
    rows = [[m["metric"], pct(m[product], m["clear"] is not False), pct(m[reference]), _signed(m["gap"])]
            for m in t["metrics"]]
    for what in ("median", "min"):
        rows.append([f"{what} of the five", pct(t["overall"][product][what]), pct(t["overall"][reference][what]), ""])
    for c in t["checks"]:
        if c["value"] is None:
            value = "—"
        elif "ns" in c["check"]:
            value = f"{c['value']:+.0f} ns"
        elif "within" in c["check"]:
            value = _signed(c["value"])
        else:
            value = pct(c["value"])
        rows.append([f"target: {c['check']}", value, "", _verdict(c["pass"])])
    return header, rows


def talk_rows(data: dict) -> tuple[list[str], list[list[str]]]:
    t = data.get("targets") or {}
    if not t:
        return [], []
    product, reference = t["product"], t["reference"]
    header = ["recovered", "reference talk", product, reference, f"{product} beats the talk"]
    rows = [[p["metric"], pct(p["talk"]), pct(p[product]), pct(p[reference]),
             "—" if p["beats"] is None else ("yes" if p["beats"] else "no")] for p in t["talk"]]
    return header, rows


def program_rows(data: dict) -> tuple[list[str], list[list[str]]]:
    header = ["instance", "program", "frame / window", "method", "ns/packet (median)", "p10–p90"]
    rows = [[p["scenario"], p["program"], p["case"], p["method"], fmt(p["median_ns"]),
             f"{fmt(p['p10_ns'])}–{fmt(p['p90_ns'])}" if p["n"] > 1 else f"{p['repeat']} runs"]
            for p in data["program"]]
    return header, rows


def live_rows(data: dict) -> tuple[list[str], list[list[str]]]:
    t = data.get("targets") or {}
    live = t.get("live_above_minimal") or []
    header = ["live window", "direction", f"{t.get('product', 'bypass')} ns", f"{t.get('reference', 'minimal')} ns",
              "above minimal", "empty program ns"]
    rows = [[r["window"], r["direction"], fmt(r["bypass_ns"]), fmt(r["minimal_ns"]), f"{r['above_ns']:+.1f}",
             fmt(r["floor_ns"])] for r in live]
    return header, rows


def attach_rows(data: dict) -> tuple[list[str], list[list[str]]]:
    header = ["scenario", "attach", "median ms", "p10–p90 ms", "n", "actions"]
    rows = [[a.get("scenario", ""), a["kind"], fmt(a["median_ms"]), f"{fmt(a['p10_ms'])}–{fmt(a['p90_ms'])}",
             str(a["n"]), ", ".join(a["actions"])] for a in data["attach"]]
    return header, rows


def path_rows(data: dict) -> tuple[list[str], list[list[str]]]:
    header = ["scenario", "hook", "from VM by", "replies", "evidence", "from VM", "to VM", "path"]
    rows = [[p["scenario"], p["hook"] or "—", p["mode"] or "—", f"{p['replies']}/{p['pings']}", p["evidence"],
             "—" if p["from_vm"] is None else str(p["from_vm"]), "—" if p["to_vm"] is None else str(p["to_vm"]),
             "ok" if p["ok"] else "WRONG"] for p in data.get("paths", [])]
    return header, rows


def comparison_rows(data: dict, test: str) -> tuple[list[str], list[list[str]]]:
    """This machine's medians and recovered shares next to the reference talk's, per size."""
    results = {(r["scenario"], r["size"]): r["median"] for r in data["results"] if r["test"] == test}
    rec = {(r["scenario"], r["size"]): r for r in data["recovered"] if r["test"] == test}
    names, others = _scenarios(data)
    header = ["size"] + names + [f"recovered {s}" for s in others]
    header += ["talk: direct", "talk: bridge", "talk: bypass", "talk: recovered"]
    rows = []
    for size in sorted({k[1] for k in results} | set(TALK[test])):
        row = [size_label(size)] + [fmt(results.get((s, size))) for s in names]
        row += [pct(r["value"], r["clear"]) if (r := rec.get((s, size))) else "—" for s in others]
        d, b, p = TALK[test].get(size, (None, None, None))
        row += [fmt(d), fmt(b), fmt(p), pct(recovered_share(d, b, p) if None not in (d, b, p) else None)]
        rows.append(row)
    return header, rows


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    right = ["---"] + ["---:"] * (len(header) - 1)
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join(right) + " |"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def markdown(data: dict) -> str:
    """All tables of a report in Markdown, for docs/benchmarks.md."""
    parts = []
    if has_targets(data):
        parts += ["#### Issue 10's targets", markdown_table(*target_rows(data)),
                  "#### Against the reference talk", markdown_table(*talk_rows(data))]
    for test in LAT_TESTS:
        parts += [f"#### {test}: medians (µs) here and in the reference talk",
                  markdown_table(*comparison_rows(data, test)),
                  f"#### {test}: spread (± half the p10–p90 range) and ratios",
                  markdown_table(*latency_rows(data, test))]
    parts += ["#### Throughput", markdown_table(*throughput_rows(data))]
    if any(r["test"] in (UDP_CPU, TCP_CPU) for r in data["results"]):
        parts += ["#### CPU at a fixed load (whole machine, less idle; lower is better)",
                  markdown_table(*cpu_rows(data))]
    if any(r["test"] == TCP_MTU for r in data["results"]):
        parts += ["#### One TCP stream at Kube-OVN's MTUs", markdown_table(*per_core_rows(data))]
    parts += ["#### Live program cost above the minimal reference", markdown_table(*live_rows(data)),
              "#### Program cost", markdown_table(*program_rows(data)),
              "#### Attach time", markdown_table(*attach_rows(data)),
              "#### Paths", markdown_table(*path_rows(data))]
    return "\n\n".join(parts) + "\n"


def _table(title: str, header: Sequence[str], rows: Sequence[Sequence[str]]):
    from rich.table import Table

    t = Table(title=title, title_justify="left")
    for i, col in enumerate(header):
        t.add_column(col, justify="left" if i == 0 else "right")
    for row in rows:
        t.add_row(*row)
    return t


def render_paths(data: dict, console) -> None:
    """A --paths-only run: which path each scenario's traffic took, on which datapath."""
    console.print(_table("paths: a burst of pings through each scenario", *path_rows(data)))
    console.print(f"{data['machine'].get('datapath', '')}; kernel {data['machine']['kernel']}; "
                  f"{data['machine'].get('seconds', 0):.0f} s.", highlight=False)
    for failure in data["failures"]:
        console.print(f"[red]wrong path:[/] {failure}", highlight=False)


def render(data: dict, console) -> None:
    """Print a report's tables on a rich Console (the CLI's)."""
    machine = data["machine"]
    reps = data["plan"]["reps"]
    table = _table

    console.print(table("paths: a burst of pings before measuring", *path_rows(data)))
    for test in LAT_TESTS:
        console.print(table(f"{test}: median of {reps} (± half the p10–p90 spread), "
                            f"{machine['placement']['latency']}", *latency_rows(data, test)))
    console.print(table(f"throughput: median of {reps}, {machine['placement']['throughput']}",
                        *throughput_rows(data)))
    cpu_reps = data["plan"].get("cpu_reps", 0)
    if any(r["test"] in (UDP_CPU, TCP_CPU) for r in data["results"]):
        console.print(table(f"CPU at a fixed load: median of {cpu_reps}, whole machine less idle (lower is better)",
                            *cpu_rows(data)))
    if any(r["test"] == TCP_MTU for r in data["results"]):
        console.print(table(f"one TCP stream at each MTU: median of {cpu_reps}", *per_core_rows(data)))
    console.print(table("program cost", *program_rows(data)))
    if data.get("targets", {}).get("live_above_minimal"):
        console.print(table("live program cost above the minimal reference (ns/packet)", *live_rows(data)))
    console.print(table("attach time (one NIC)", *attach_rows(data)))
    if has_targets(data):
        t = data["targets"]
        title = f"targets (issue 10): {t['product']} against {t['reference']}"
        if t["quick"]:
            title += ": a --quick run, not for judging"
        console.print(table(title, *target_rows(data)))
        console.print(table("against the reference talk", *talk_rows(data)))
    console.print("recovered = (bridge − x) / (bridge − direct); '~': bridge − direct is within the noise there. "
                  f"Targets for the product: median of the five headline figures ≥ {TARGET_MEDIAN:.2f}, none below "
                  f"{TARGET_FLOOR:.2f}, each within {TARGET_GAP:.2f} of the minimal reference. "
                  f"{machine['cpus']} CPUs, {machine['cpu_model']}, kernel {machine['kernel']}, "
                  f"VM side: veth; {machine.get('datapath', 'no OVS')}. {machine.get('seconds', 0):.0f} s.",
                  highlight=False)
    for failure in data["failures"]:
        console.print(f"[yellow]no result:[/] {failure}", highlight=False)


@contextlib.contextmanager
def progress_display(console, total: int) -> Iterator[Callable[[str], None]]:
    """A rich progress bar on `console`; yields the `progress` callback for bench.run()."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress as Bar, TextColumn, TimeElapsedColumn

    with Bar(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
             console=console, transient=True) as bar:
        task = bar.add_task("bench", total=total)
        first = [True]

        def step(what: str) -> None:
            if first[0]:
                first[0] = False
            else:
                bar.advance(task)
            bar.update(task, description=what)

        yield step


def can_plot() -> bool:
    """Can plot() work here (is matplotlib installed)?"""
    import importlib.util

    return importlib.util.find_spec("matplotlib") is not None


def plot(data: dict, path: str) -> None:
    """Latency against message size for every scenario, next to the reference
    talk's; below, the share of the bridge's cost each scenario recovers."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names, others = _scenarios(data)
    fig, axes = plt.subplots(2, 2, figsize=(12, 8.5), sharex=True, gridspec_kw={"height_ratios": [3, 2]})
    for col, test in enumerate(LAT_TESTS):
        ax, rax = axes[0][col], axes[1][col]
        res = [r for r in data["results"] if r["test"] == test]
        for scen in names:
            rows = sorted((r for r in res if r["scenario"] == scen), key=lambda r: r["size"])
            if not rows:
                continue
            x = [r["size"] for r in rows]
            y = [r["median"] for r in rows]
            err = [[r["median"] - r["p10"] for r in rows], [r["p90"] - r["median"] for r in rows]]
            ax.errorbar(x, y, yerr=err, marker="o", ms=4, capsize=2, color=COLOURS.get(scen), label=f"{scen} (here)")
        for i, scen in enumerate((DIRECT, BRIDGE, "bypass")):
            pts = [(size, v[i]) for size, v in sorted(TALK[test].items()) if v[i] is not None]
            ax.plot([p[0] for p in pts], [p[1] for p in pts], ls="--", marker="s", ms=4, mfc="none",
                    color=COLOURS[scen], alpha=0.6, label=f"{scen} (talk)")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_title(f"{test}: qperf latency (half the round trip)")
        ax.set_ylabel("µs (median, p10–p90)")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7, ncol=2)
        width = 0.6 / (len(others) + 1)
        for j, scen in enumerate(others):
            rec = sorted((r for r in data["recovered"] if r["test"] == test and r["scenario"] == scen),
                         key=lambda r: r["size"])
            if rec:
                xs = [r["size"] * 2 ** ((j - len(others) / 2) * width) for r in rec]
                bars = rax.bar(xs, [r["value"] * 100 for r in rec], width=[x * width * 0.6 for x in xs],
                               color=COLOURS.get(scen), label=f"{scen} (here)")
                for bar, r in zip(bars, rec):
                    bar.set_alpha(1.0 if r["clear"] else 0.35)
        talk = [(size, recovered_share(*v)) for size, v in sorted(TALK[test].items()) if None not in v]
        xs = [size * 2 ** (len(others) / 2 * width) for size, _ in talk]
        rax.bar(xs, [v * 100 for _, v in talk], width=[x * width * 0.6 for x in xs], color="grey", alpha=0.6,
                label="bypass (talk)")
        rax.axhline(TARGET_MEDIAN * 100, color="black", ls=":", lw=1, label=f"target {TARGET_MEDIAN:.0%}")
        rax.axhline(0, color="black", lw=0.5)
        rax.set_ylim(-50, 150)
        rax.set_ylabel("recovered %")
        rax.set_xlabel("message size (bytes)")
        rax.grid(True, axis="y", alpha=0.3)
        rax.legend(fontsize=7, ncol=2)
        sizes = sorted({r["size"] for r in res})
        rax.set_xticks(sizes)
        rax.set_xticklabels([size_label(s) for s in sizes], fontsize=7)
    m = data["machine"]
    fig.suptitle(f"tcbypass-lab bench: {m['cpus']} × {m['cpu_model']}, kernel {m['kernel']}, "
                 f"{m['placement']['latency']}; pale bars: bridge − direct within the noise", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def has_cpu(data: dict) -> bool:
    return any(r["test"] in (UDP_CPU, TCP_MTU) for r in data["results"])


def cpu_plot_path(path: str) -> str:
    """Where plot() puts the CPU figure next to the latency one: bench.png -> bench-cpu.png."""
    stem, dot, ext = path.rpartition(".")
    return f"{stem}-cpu.{ext}" if dot else f"{path}-cpu"


def plot_cpu(data: dict, path: str) -> None:
    """Left: CPU per packet at the fixed UDP load, per scenario. Right: one TCP
    stream's Gbit/s per busy core at each MTU, per scenario."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names, _ = _scenarios(data)
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    cpu = {r["scenario"]: r for r in data["results"] if r["test"] == UDP_CPU}
    shown = [n for n in names if n in cpu]
    spread = [[cpu[n]["median"] - cpu[n]["p10"] for n in shown], [cpu[n]["p90"] - cpu[n]["median"] for n in shown]]
    left.bar(shown, [cpu[n]["median"] for n in shown], color=[COLOURS.get(n, "grey") for n in shown], yerr=spread,
             capsize=3)
    pps = (data["plan"].get("load") or {}).get("pps", 0)
    left.set_title(f"CPU per packet, 64 B UDP at {pps // 1000} kpps each way (median, p10–p90)", fontsize=9)
    left.set_ylabel("ns of CPU per packet (whole machine, less idle)")
    left.tick_params(axis="x", labelsize=8, rotation=20)
    left.grid(True, axis="y", alpha=0.3)
    per_core = [r for r in data["results"] if r["test"] == TCP_PER_CORE]
    mtus = sorted({r["size"] for r in per_core}, key=lambda m: (m != 1500, m))
    width = 0.8 / max(1, len(names))
    for j, scen in enumerate(names):
        got = {r["size"]: r["median"] for r in per_core if r["scenario"] == scen}
        if got:
            right.bar([i + (j - len(names) / 2 + 0.5) * width for i in range(len(mtus))],
                      [got.get(m, 0) for m in mtus], width=width, color=COLOURS.get(scen, "grey"), label=scen)
    right.set_xticks(range(len(mtus)))
    right.set_xticklabels([f"MTU {m}" for m in mtus])
    right.set_title("one TCP stream: Gbit/s per busy core (median)", fontsize=9)
    right.set_ylabel("Gbit/s per core")
    right.grid(True, axis="y", alpha=0.3)
    right.legend(fontsize=7)
    m = data["machine"]
    fig.suptitle(f"tcbypass-lab bench, CPU: {m['cpus']} × {m['cpu_model']}, kernel {m['kernel']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
