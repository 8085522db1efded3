"""`tcbypass-lab soak`: the agent for hours on a node where VMs come and go.

One emulated node (a private Open vSwitch, its own bpffs and run directory),
one `tcbypass agent` on it, and:

- long-lived VM pods (20 by default), each with a sequence-numbered UDP
  stream both ways to a server pod and a ping, on the fast path only (their
  bridges forward no unicast): they must lose nothing;
- churn: a few workers create and delete VM pods continuously, each pod
  living one lifecycle of a random kind:
    plain      plugged, attached, held a moment, deleted (namespace or ports first)
    mid-attach deleted 0-150 ms after it was plugged, while the agent attaches it
    restart    attached, then the VM restarts (a new tap), refreshed, deleted
    hotplug    attached, a NIC hot-plugged and unplugged, deleted;
- every `sample_every` seconds: the agent's RSS, open fds, threads and CPU
  time; the kernel's tcb_* programs and maps and the links running them; the
  entries under the pin root and the run directory; and the attach, cleanup,
  refresh and hotplug latencies of the window.

The report says whether the targets hold: no loss, attach and cleanup p99
within a second, resources flat (least-squares slope over the churn) and back
to where they started once the churn stops.
"""

from __future__ import annotations

import os
import random
import statistics
import threading
import time
from dataclasses import asdict, dataclass
from typing import Callable

from tcbypass.errors import TcbError

from .agentproc import parse_metrics
from .cluster import EmulatedNode
from .kobjects import tcb_objects
from .results import percentile
from .sandbox import sh, wait_for_ping
from .streams import MultiStream, PingFlow

Progress = Callable[[str], None]
NAMESPACE = "soak"
SERVER_IP = "10.16.0.2"
KINDS = {"plain": 0.55, "mid-attach": 0.15, "restart": 0.15, "hotplug": 0.15}
TARGETS = {"attach_p99_s": 1.0, "cleanup_p99_s": 1.0}
WAIT = 30.0  # seconds a lifecycle step may take before it counts as failed


class SoakError(TcbError):
    """The soak could not run (the agent died, the node could not be built)."""


@dataclass(frozen=True)
class SoakPlan:
    lifecycles: int = 2000
    long_lived: int = 20
    workers: int = 4  # churned pods at a time
    sample_every: float = 60.0
    stream_rate: float = 20.0  # datagrams a second, each way, per long-lived pod
    ping_interval: float = 1.0
    hold: tuple[float, float] = (0.0, 2.0)  # seconds a churned pod stays once attached
    settle: float = 15.0  # quiet seconds after the churn, before the last sample
    seed: int = 20261205


def ci_plan() -> SoakPlan:
    """What CI runs: 200 lifecycles, samples every 5 s."""
    return SoakPlan(lifecycles=200, sample_every=5.0, hold=(0.0, 0.5), settle=5.0)


@dataclass
class Lifecycle:
    kind: str
    ok: bool = True
    attach_s: float | None = None  # plugged -> attached
    cleanup_s: float | None = None  # deleted -> nothing pinned
    refresh_s: float | None = None  # new tap -> refreshed
    hotplug_s: float | None = None  # NIC plugged -> attached
    unplug_s: float | None = None  # NIC unplugged -> detached
    error: str = ""
    ended: float = 0.0


def _wait(predicate: Callable[[], bool], timeout: float = WAIT, poll: float = 0.01) -> float | None:
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        if predicate():
            return time.monotonic() - start
        time.sleep(poll)
    return None


def _ifindex(ns: str, dev: str) -> int | None:
    out = sh("cat", f"/sys/class/net/{dev}/ifindex", netns=ns, check=False)
    return int(out.stdout) if out.returncode == 0 and out.stdout.strip() else None


class Churn:
    """The workers that create and delete VM pods, and what each lifecycle measured."""

    def __init__(self, node: EmulatedNode, plan: SoakPlan):
        self.node, self.plan = node, plan
        self.rng = random.Random(plan.seed)
        self.lock = threading.Lock()
        self.started = 0
        self.done: list[Lifecycle] = []

    def _next(self) -> tuple[int, str] | None:
        with self.lock:
            if self.started >= self.plan.lifecycles:
                return None
            self.started += 1
            kind = self.rng.choices(list(KINDS), weights=list(KINDS.values()))[0]
            return self.started, kind

    def worker(self) -> None:
        while (job := self._next()) is not None:
            n, kind = job
            life = Lifecycle(kind)
            try:
                getattr(self, f"_{kind.replace('-', '_')}")(n, life)
            except Exception as exc:  # a lifecycle that broke is counted, the soak goes on
                life.ok, life.error = False, f"{type(exc).__name__}: {exc}"
            life.ended = time.monotonic()
            with self.lock:
                self.done.append(life)

    # --- the kinds of lifecycle ---------------------------------------------------------------
    def _plug(self, n: int):
        name = f"c{n}"
        nics = self.node.sb.add_vm(name, [f"10.17.{n // 250}.{n % 250 + 1}"], namespace=NAMESPACE, vm_link="tap")
        return name, nics, time.monotonic()

    def _attached(self, iface: str, since: float, tap: int | None = None) -> float | None:
        def ready() -> bool:
            record = self.node.record(iface)
            return record is not None and record.complete and (tap is None or record.tap_ifindex == tap)
        took = _wait(ready)
        return None if took is None else time.monotonic() - since

    def _delete(self, nics, life: Lifecycle) -> None:
        with self.lock:
            netns_first = self.rng.random() < 0.5
        since = time.monotonic()
        self.node.sb.delete_pod(nics, netns_first=netns_first)
        gone = _wait(lambda: all(not os.path.exists(self.node.pin_dir(nic.iface_id)) for nic in nics))
        life.cleanup_s = None if gone is None else time.monotonic() - since
        life.ok = life.ok and gone is not None

    def _hold(self) -> None:
        with self.lock:
            seconds = self.rng.uniform(*self.plan.hold)
        time.sleep(seconds)

    def _plain(self, n: int, life: Lifecycle) -> None:
        _, nics, plugged = self._plug(n)
        life.attach_s = self._attached(nics[0].iface_id, plugged)
        life.ok = life.attach_s is not None
        self._hold()
        self._delete(nics, life)

    def _mid_attach(self, n: int, life: Lifecycle) -> None:
        _, nics, _ = self._plug(n)
        with self.lock:
            pause = self.rng.uniform(0.0, 0.15)
        time.sleep(pause)
        self._delete(nics, life)

    def _restart(self, n: int, life: Lifecycle) -> None:
        _, nics, plugged = self._plug(n)
        nic = nics[0]
        life.attach_s = self._attached(nic.iface_id, plugged)
        self.node.sb.restart_vm(nic)
        restarted = time.monotonic()
        life.refresh_s = self._attached(nic.iface_id, restarted, tap=_ifindex(nic.pod_ns, nic.tap))
        life.ok = None not in (life.attach_s, life.refresh_s)
        self._delete(nics, life)

    def _hotplug(self, n: int, life: Lifecycle) -> None:
        _, nics, plugged = self._plug(n)
        life.attach_s = self._attached(nics[0].iface_id, plugged)
        started = time.monotonic()
        extra = self.node.sb.hotplug_nic(nics, f"10.18.{n // 250}.{n % 250 + 1}", "hot.soak.ovn")
        life.hotplug_s = self._attached(extra.iface_id, started)
        started = time.monotonic()
        self.node.sb.unplug_nic(nics, extra)
        gone = _wait(lambda: not os.path.exists(self.node.pin_dir(extra.iface_id)))
        life.unplug_s = None if gone is None else time.monotonic() - started
        life.ok = None not in (life.attach_s, life.hotplug_s, life.unplug_s)
        self._delete(nics, life)


def spread(values: list[float]) -> dict:
    if not values:
        return {"n": 0}
    return {"n": len(values), "p50": round(percentile(values, 50), 4), "p99": round(percentile(values, 99), 4),
            "max": round(max(values), 4)}


def slope_per_hour(points: list[tuple[float, float]]) -> float | None:
    """Least-squares slope of (seconds, value), per hour."""
    if len(points) < 3:
        return None
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    var = sum((x - mx) ** 2 for x in xs)
    return None if var == 0 else round(sum((x - mx) * (y - my) for x, y in points) / var * 3600, 3)


class Sampler:
    """Takes a sample of the agent and the kernel every `every` seconds on a thread."""

    def __init__(self, node: EmulatedNode, churn: Churn, every: float, started: float):
        self.node, self.churn, self.every, self.started = node, churn, every, started
        self.samples: list[dict] = []
        self._stop = threading.Event()
        self._seen = 0
        self.thread = threading.Thread(target=self._run, daemon=True, name="soak-sampler")

    def take(self, label: str = "") -> dict:
        agent = self.node.agent
        usage = agent.usage()
        with self.churn.lock:
            window = self.churn.done[self._seen:]
            self._seen = len(self.churn.done)
            lifecycles = len(self.churn.done)
        sample = {"t": round(time.monotonic() - self.started, 1), "label": label, "lifecycles": lifecycles,
                  "rss_mib": usage.rss_mib, "fds": usage.fds, "threads": usage.threads, "cpu_s": usage.cpu_s,
                  **tcb_objects(), "pins": self.node.pins(), "run_entries": self.node.run_entries(),
                  "attach_s": spread([life.attach_s for life in window if life.attach_s is not None])}
        self.samples.append(sample)
        return sample

    def _run(self) -> None:
        while not self._stop.wait(self.every):
            self.take()

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        self._stop.set()
        self.thread.join()


def _long_lived(node: EmulatedNode, plan: SoakPlan, step: Progress):
    """The long-lived VM pods, attached, their bridges forwarding no unicast."""
    sb = node.sb
    pods = []
    for i in range(plan.long_lived):
        step(f"long-lived VM pods: {i + 1}/{plan.long_lived}")
        [nic] = sb.add_vm(f"keep{i}", [f"10.16.0.{10 + i}"], namespace=NAMESPACE)
        pods.append(nic)
    for nic in pods:
        if _wait(lambda nic=nic: (r := node.record(nic.iface_id)) is not None and r.complete) is None:
            raise SoakError(f"the agent did not attach {nic.iface_id}", hint=f"see {node.agent.log_path}")
        if not wait_for_ping(nic.vm_ns, SERVER_IP):
            raise SoakError(f"{nic.iface_id} cannot reach the server")
        sb.block_bridge_unicast(nic)
    return pods


def run(plan: SoakPlan, progress: Progress | None = None) -> dict:
    """Build the node, soak it, tear it all down; the report."""
    step = progress or (lambda _text: None)
    report: dict = {"plan": asdict(plan), "targets": TARGETS}
    with EmulatedNode.up("soak") as node:
        step("building the node: a private Open vSwitch, a server pod, the agent")
        server = node.sb.add_server_pod("web", SERVER_IP, namespace=NAMESPACE)
        node.start_agent()
        pods = _long_lived(node, plan, step)
        flows = [(f"{nic.iface_id} ->", nic.vm_ns, server, SERVER_IP, 20000 + i) for i, nic in enumerate(pods)]
        flows += [(f"-> {nic.iface_id}", server, nic.vm_ns, nic.ip, 21000 + i) for i, nic in enumerate(pods)]
        streams = MultiStream(flows, plan.stream_rate)
        pings = [PingFlow(nic.vm_ns, SERVER_IP, plan.ping_interval, limit=24 * 3600) for nic in pods]
        streams.start()
        for pinger in pings:
            pinger.start()
        started = time.monotonic()
        churn = Churn(node, plan)
        sampler = Sampler(node, churn, plan.sample_every, started)
        time.sleep(2.0)
        report["baseline"] = sampler.take("baseline")
        sampler.start()
        workers = [threading.Thread(target=churn.worker, daemon=True) for _ in range(plan.workers)]
        for worker in workers:
            worker.start()
        while any(w.is_alive() for w in workers):
            step(f"churn: {len(churn.done)}/{plan.lifecycles} lifecycles")
            if not node.agent.alive():
                raise SoakError(f"the agent died ({node.agent.proc.returncode})", hint=f"see {node.agent.log_path}")
            time.sleep(0.5)
        churned = time.monotonic()
        report["churn_seconds"] = round(churned - started, 1)
        step(f"churn done; settling {plan.settle:.0f} s")
        time.sleep(plan.settle)
        sampler.stop()
        report["final"] = sampler.take("after the churn")
        report["samples"] = sampler.samples
        for pinger in pings:
            pinger.finish()
        results = streams.stop()
        ping_results = [pinger.result() for pinger in pings]
        report["streams"] = {"count": len(results), "sent": sum(r.sent for r in results),
                             "lost": sum(len(r.lost) for r in results),
                             "send_errors": sum(r.send_errors for r in results),
                             "lossy": [{"name": r.name, "lost": len(r.lost)} for r in results if r.lost]}
        report["pings"] = {"count": len(ping_results), "sent": sum(p.transmitted for p in ping_results),
                           "lost": sum(p.lost for p in ping_results)}
        report["lifecycles"] = _lifecycles(churn.done)
        report["agent"] = _agent_figures(node, report, churn)
        report["flat"] = _flatness(report)
        report["judged"] = judge(report)
        report["agent_exit"] = node.stop_agent()
        step("tearing down")
    return report


def _lifecycles(done: list[Lifecycle]) -> dict:
    out = {"total": len(done), "failed": sum(not life.ok for life in done),
           "by_kind": {kind: sum(life.kind == kind for life in done) for kind in KINDS},
           "errors": sorted({life.error for life in done if life.error})[:10]}
    for key in ("attach_s", "cleanup_s", "refresh_s", "hotplug_s", "unplug_s"):
        out[key] = spread([getattr(life, key) for life in done if getattr(life, key) is not None])
    return out


def _agent_figures(node: EmulatedNode, report: dict, churn: Churn) -> dict:
    metrics = parse_metrics(node.agent.metrics_text() or "")
    cpu = report["final"]["cpu_s"] - report["baseline"]["cpu_s"]
    return {"cpu_s_per_1000_lifecycles": round(cpu / max(1, len(churn.done)) * 1000, 2),
            **{k.removeprefix("tcbypass_agent_").removesuffix("_total"): v for k, v in metrics.items()
               if k.startswith("tcbypass_agent_")}}


FLAT = ("rss_mib", "fds", "threads", "programs", "maps", "links", "pins", "run_entries")
# How much a resource may grow over the churn, by its fitted slope, and still be flat: the
# counts move with the churned pods alive at each sample (up to 2 per worker); RSS by allocator noise.
TREND_ALLOWED = {"rss_mib": 3.0, "fds": 4, "threads": 1}
MIN_SAMPLES_FOR_TREND = 10


def _flatness(report: dict) -> dict:
    """Per resource: the slope during the churn, and the final value against the baseline."""
    during = [s for s in report["samples"] if s["label"] == ""]
    return {key: {"slope_per_hour": slope_per_hour([(s["t"], s[key]) for s in during]),
                  "baseline": report["baseline"][key], "final": report["final"][key]} for key in FLAT}


def judge(report: dict) -> list[dict]:
    life = report["lifecycles"]
    flat = report["flat"]
    out = [
        {"target": "long-lived pods lose nothing (streams and pings)",
         "value": report["streams"]["lost"] + report["pings"]["lost"], "pass":
             report["streams"]["lost"] + report["pings"]["lost"] == 0},
        {"target": "every lifecycle completed", "value": life["failed"], "pass": life["failed"] == 0},
        {"target": "attach p99 <= 1 s", "value": life["attach_s"].get("p99"),
         "pass": (life["attach_s"].get("p99") or 99) <= TARGETS["attach_p99_s"]},
        {"target": "cleanup p99 <= 1 s", "value": life["cleanup_s"].get("p99"),
         "pass": (life["cleanup_s"].get("p99") or 99) <= TARGETS["cleanup_p99_s"]},
        {"target": "kernel objects, pins and run entries back to the baseline",
         "value": {k: (flat[k]["baseline"], flat[k]["final"]) for k in ("programs", "maps", "links", "pins")},
         "pass": all(flat[k]["final"] <= flat[k]["baseline"] for k in ("programs", "maps", "links", "pins"))},
        {"target": "agent memory back to within 5 MiB of the baseline",
         "value": (flat["rss_mib"]["baseline"], flat["rss_mib"]["final"]),
         "pass": flat["rss_mib"]["final"] <= flat["rss_mib"]["baseline"] + 5},
        {"target": "agent fds and threads back to the baseline",
         "value": {k: (flat[k]["baseline"], flat[k]["final"]) for k in ("fds", "threads")},
         "pass": all(flat[k]["final"] <= flat[k]["baseline"] for k in ("fds", "threads"))},
        {"target": "no unexpected error in the agent", "value": report["agent"].get("unexpected_errors"),
         "pass": report["agent"].get("unexpected_errors") == 0},
    ]
    hours = report["churn_seconds"] / 3600
    if sum(s["label"] == "" for s in report["samples"]) >= MIN_SAMPLES_FOR_TREND:
        drift = {k: round((flat[k]["slope_per_hour"] or 0) * hours, 2) for k in FLAT}
        allowed = {k: TREND_ALLOWED.get(k, 2 * report["plan"]["workers"]) for k in FLAT}
        out.append({"target": "no upward trend during the churn (least-squares slope x duration, within noise)",
                    "value": drift, "pass": all(drift[k] <= allowed[k] for k in FLAT)})
    return out


# --- output ----------------------------------------------------------------------------------

def render(report: dict, console) -> None:
    from rich.table import Table

    life, agent = report["lifecycles"], report["agent"]
    t = Table(title=f"soak: {life['total']} pod lifecycles in {report['churn_seconds']:.0f} s next to "
                    f"{report['plan']['long_lived']} long-lived VM pods", title_justify="left")
    t.add_column("what")
    t.add_column("figure")
    t.add_row("lifecycles", ", ".join(f"{k} {v}" for k, v in life["by_kind"].items()) + f"; failed {life['failed']}")
    for key, what in (("attach_s", "plugged -> attached"), ("cleanup_s", "deleted -> nothing pinned"),
                      ("refresh_s", "VM restarted -> refreshed"), ("hotplug_s", "NIC hot-plugged -> attached"),
                      ("unplug_s", "NIC unplugged -> detached")):
        s = life[key]
        if s.get("n"):
            t.add_row(what, f"p50 {s['p50'] * 1000:.0f} ms, p99 {s['p99'] * 1000:.0f} ms, "
                            f"max {s['max'] * 1000:.0f} ms (n {s['n']})")
    st, pg = report["streams"], report["pings"]
    t.add_row("long-lived traffic", f"UDP {st['lost']} lost of {st['sent']} ({st['count']} streams); "
                                    f"ping {pg['lost']} lost of {pg['sent']}")
    t.add_row("agent CPU", f"{agent['cpu_s_per_1000_lifecycles']:.1f} s per 1000 lifecycles")
    for key, f in report["flat"].items():
        slope = f["slope_per_hour"]
        t.add_row(key, f"{f['baseline']} -> {f['final']} (slope {'-' if slope is None else slope}/h)")
    console.print(t)
    for check in report["judged"]:
        mark = "[green]ok[/]  " if check["pass"] else "[red]MISS[/]"
        console.print(f"{mark} {check['target']}: {check['value']}", highlight=False)


def plot(report: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    samples = report["samples"]
    ts = [s["t"] / 60 for s in samples]
    fig, axes = plt.subplots(2, 2, figsize=(11, 7), sharex=True)
    (a, b), (c, d) = axes
    a.plot(ts, [s["rss_mib"] for s in samples], marker=".")
    a.set_ylabel("agent RSS (MiB)")
    b.plot(ts, [s["fds"] for s in samples], marker=".", label="open fds")
    b.plot(ts, [s["threads"] for s in samples], marker=".", label="threads")
    b.legend()
    c.plot(ts, [s["programs"] for s in samples], marker=".", label="tcb programs")
    c.plot(ts, [s["maps"] for s in samples], marker=".", label="tcb maps")
    c.plot(ts, [s["pins"] for s in samples], marker=".", label="pinned attachments")
    c.legend()
    c.set_xlabel("minutes")
    p50 = [s["attach_s"].get("p50") for s in samples]
    p99 = [s["attach_s"].get("p99") for s in samples]
    d.plot(ts, [v * 1000 if v is not None else None for v in p50], marker=".", label="attach p50")
    d.plot(ts, [v * 1000 if v is not None else None for v in p99], marker=".", label="attach p99")
    d.set_ylabel("plugged -> attached (ms)")
    d.set_xlabel("minutes")
    d.legend()
    for ax in (a, b, c, d):
        ax.grid(alpha=0.3)
        ax.set_ylim(bottom=0)
    life = report["lifecycles"]
    fig.suptitle(f"tcbypass-lab soak: {life['total']} lifecycles, {report['plan']['long_lived']} long-lived VMs",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
