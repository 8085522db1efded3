"""`tcbypass-lab`: the lab's door. Emulated nodes on this machine, and what runs on them.

The node tool (`tcbypass`) attaches, detaches, reports and runs the agent on
a real node and knows nothing of this; the lab builds KubeVirt/Kube-OVN
nodes out of namespaces, a private Open vSwitch and qemu guests, and drives
the node tool on them: the demo, the benchmarks, the kernel matrix, the
soak. Parse, call, render: the work is in the lab's modules.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import click

from tcbypass import __version__
from tcbypass.errors import TcbError

CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 100}


class Lab:
    """One console for output, one for errors (rich loads on first use)."""

    def __init__(self):
        self._console = self._err = None

    @property
    def console(self):
        if self._console is None:
            from rich.console import Console

            self._console = Console() if sys.stdout.isatty() else Console(width=200)
        return self._console

    @property
    def err(self):
        if self._err is None:
            from rich.console import Console

            self._err = Console(stderr=True, width=None if sys.stderr.isatty() else 1000)
        return self._err


def run(fn, *args, **kwargs):
    """Call into the lab; a typed error becomes one line and its exit code."""
    try:
        return fn(*args, **kwargs)
    except TcbError as exc:
        click.echo(f"{click.style('error:', fg='red', bold=True)} {exc}", err=True)
        sys.exit(exc.exit_code)


def require_root(what: str) -> None:
    import os

    if os.geteuid() != 0:
        click.echo(f"error: tcbypass-lab {what} needs root (namespaces, OVS, bpf); run: sudo tcbypass-lab {what}",
                   err=True)
        sys.exit(1)


@click.group(context_settings=CONTEXT)
@click.version_option(__version__, prog_name="tcbypass-lab")
@click.option("--debug", is_flag=True, help="Log every step.")
@click.pass_context
def main(ctx: click.Context, debug: bool) -> None:
    """The lab of tcbypass: KubeVirt/Kube-OVN nodes emulated on this machine
    (network namespaces, a private Open vSwitch, qemu guests), and what runs
    on them. Everything it builds carries a random tag and is removed when
    it is done.

    \b
      tcbypass-lab demo                 a pod, the bypass, traffic, what it wins (under a minute)
      tcbypass-lab bench                direct vs bridge vs bypass vs the best tc design
      tcbypass-lab bench scale 250      a node full of VMs
      tcbypass-lab kernels              the kernel matrix: the tests in qemu guests on other kernels
      tcbypass-lab soak                 the agent for hours while VM pods come and go
      tcbypass-lab migrate              live migration between two nodes, with and without tcbypass
    """
    logging.basicConfig(level=logging.DEBUG if debug else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    ctx.obj = Lab()


@main.command()
@click.option("--keep", is_flag=True, help="Leave the sandbox up for exploration (prints how to remove it).")
@click.option("--cleanup", metavar="TAG", help="Remove a sandbox left up by --keep.")
@click.pass_obj
def demo(lab: Lab, keep: bool, cleanup: str | None) -> None:
    """Build a KubeVirt-like pod on this machine, attach the bypass, send traffic, show the result.

    A private Open vSwitch (its own ovsdb-server and ovs-vswitchd, in a
    namespace of their own), a server pod and a virt-launcher pod wired
    like KubeVirt's bridge binding with Kube-OVN's port data. It attaches
    the bypass as `tcbypass attach` does, sends traffic, prints the status
    table, then measures what the in-pod bridge costs and how much of it
    the bypass wins back, with the node's switch out of the way. Touches
    nothing it did not create.
    """
    from tcbypass import vmi

    from . import demo as demo_mod
    from .sandbox import destroy

    require_root("demo")
    if cleanup:
        run(vmi.detach_target, demo_mod.VMI, demo_mod.NAMESPACE)
        removed = destroy(cleanup)
        lab.console.print(f"removed: {', '.join(removed) or 'nothing (unknown tag?)'}", highlight=False)
        return
    run(demo_mod.show, lab.console, keep)


@main.group(invoke_without_command=True, subcommand_metavar="[scale N]")
@click.option("--quick", is_flag=True,
              help="About 2 minutes: 4 sizes, 2 repetitions, 1-second runs. Checks the plumbing, not the "
                   "figures (what CI runs).")
@click.option("--reps", type=click.IntRange(1, 100), metavar="N",
              help="Repetitions (default 6, or 2 with --quick).")
@click.option("--scenarios", "scenario_names", metavar="A,B,...", default=None,
              help="Which scenarios, by name (default: direct,bridge,bypass,minimal): direct, bridge, bypass, "
                   "minimal, and for comparison bpfbridge, bypass-clsact, bypass-redirect, minimal-clsact, "
                   "minimal-redirect.")
@click.option("--datapath", type=click.Choice(["system", "netdev", "auto"]), default=None,
              help="Give every scenario's node its own Open vSwitch on this datapath (system: openvswitch.ko, "
                   "what Kube-OVN nodes run; auto: system where the module loads), with the peer a pod on "
                   "br-int. Default: no OVS, the peer on the node end of the VM's veth, so that the figures "
                   "hold only what the pod's wiring costs.")
@click.option("--paths-only", is_flag=True,
              help="Build the scenarios, prove each carries traffic on its named path, tear down: no figures "
                   "(a minute; what to run on a node's own datapath first).")
@click.option("--json", "json_file", type=click.Path(dir_okay=False, writable=True), metavar="FILE",
              help="Also write the results as JSON to FILE.")
@click.option("--plot", "plot_file", type=click.Path(dir_okay=False, writable=True), metavar="FILE.png",
              help="Also draw latency against message size, next to the reference talk, and the CPU figures "
                   "in FILE-cpu.png (needs matplotlib).")
@click.pass_context
def bench(ctx: click.Context, quick: bool, reps: int | None, scenario_names: str | None, datapath: str | None,
          paths_only: bool, json_file: str | None, plot_file: str | None) -> None:
    """Measure what the in-pod bridge costs and what the fast path wins back.

    Builds the scenarios side by side in namespaces of their own and measures
    them interleaved (the order rotates each repetition), qperf client and
    server pinned to CPU 0: qperf latency per message size, iperf3 TCP
    throughput and 64-byte UDP packet rate; the CPU the whole machine spends
    per packet at a fixed load (64-byte UDP both ways, a capped TCP stream);
    then each program's ns/packet (BPF_PROG_TEST_RUN, and in live traffic
    from the kernel's run-time statistics), the attach time, and last one
    TCP stream's Gbit/s per busy core at MTU 1500, 1400 and 9000. Removes
    everything it built. About 22 minutes (--quick: about 2.5).

    \b
    Scenarios:
      direct            the VM's NIC wired straight to its peer
      bridge            KubeVirt's bridge binding (the in-pod bridge)
      bypass            bridge + tcbypass, attached as `tcbypass attach` does by default
      minimal           bridge + the smallest correct program on the best hook (a reference,
                        built by the bench itself: lab/tcbypass_lab/minimal.c)
      bpfbridge         no bridge: every frame by bpf_redirect() both ways on clsact, devices
                        promiscuous (Deckhouse's bpfbridge binding, measured)
      bypass-clsact, bypass-redirect, minimal-clsact, minimal-redirect
                        the same on a clsact filter, or with plain bpf_redirect() from the VM

    recovered = (bridge - x) / (bridge - direct) for every scenario x.

    \b
    Examples:
      tcbypass-lab bench --quick
      tcbypass-lab bench --json docs/benchmarks.json --plot docs/benchmarks.png
      tcbypass-lab bench scale 250 --json scale.json      (see: tcbypass-lab bench scale --help)
    """
    if ctx.invoked_subcommand is not None:
        given = [flag for flag, value in (("--quick", quick), ("--reps", reps), ("--json", json_file),
                                          ("--plot", plot_file), ("--scenarios", scenario_names),
                                          ("--datapath", datapath), ("--paths-only", paths_only)) if value]
        if given:
            raise click.UsageError(f"{', '.join(given)} belong(s) to the datapath benchmark, not to "
                                   f"'{ctx.invoked_subcommand}': give its own options after it")
        return
    from . import bench as benchmark, report as bench_report, scenarios
    from .ovs import choose_datapath

    lab: Lab = ctx.obj
    names = run(scenarios.parse, scenario_names or ",".join(scenarios.DEFAULT))
    require_root("bench")
    if plot_file and not bench_report.can_plot():
        raise click.UsageError("--plot needs matplotlib (pip install matplotlib, the 'bench' extra)")
    if paths_only and plot_file:
        raise click.UsageError("--paths-only measures nothing to plot: leave out --plot")
    plan = benchmark.plan_for(quick=quick, reps=reps, names=names, paths_only=paths_only,
                              datapath=run(choose_datapath, datapath) if datapath else "")
    with bench_report.progress_display(lab.err, plan.steps()) as progress:
        report = run(benchmark.run, plan, progress)
    data = report.to_json()
    if paths_only:
        bench_report.render_paths(data, lab.console)
        if json_file:
            run(benchmark.write_json, data, json_file)
        if data["failures"]:
            raise SystemExit(1)
        return
    bench_report.render(data, lab.console)
    if json_file:
        run(benchmark.write_json, data, json_file)
        lab.err.print(f"results: {json_file}", highlight=False)
    if plot_file:
        run(bench_report.plot, data, plot_file)
        lab.err.print(f"plot: {plot_file}", highlight=False)
        if bench_report.has_cpu(data):
            cpu_plot = bench_report.cpu_plot_path(plot_file)
            run(bench_report.plot_cpu, data, cpu_plot)
            lab.err.print(f"CPU plot: {cpu_plot}", highlight=False)


@bench.command("scale")
@click.argument("vms", metavar="N", type=click.IntRange(1, 2000))
@click.option("--vm-link", type=click.Choice(["tap", "veth"]), default="tap", show_default=True,
              help="The VM side of each pod: a tap with no process behind it (as before qemu opens it), or "
                   "a veth into a namespace of its own (then the first and last VM are pinged through the "
                   "fast path).")
@click.option("--phases", default="agent,cli,inproc", show_default=True, metavar="A,B,...",
              help="Which ways of attaching to measure: agent, cli, inproc.")
@click.option("--json", "json_file", type=click.Path(dir_okay=False, writable=True), metavar="FILE",
              help="Also write the results as JSON to FILE.")
@click.option("--plot", "plot_file", type=click.Path(dir_okay=False, writable=True), metavar="FILE.png",
              help="Also draw attach time against N and the agent's progress (needs matplotlib).")
@click.pass_obj
def bench_scale(lab: Lab, vms: int, vm_link: str, phases: str, json_file: str | None, plot_file: str | None) -> None:
    """A node full of VMs: build N bridge-binding VM pods on a sandbox node
    with a private OVS, and attach them the ways a node does.

    While the node fills up, at 1, 10, 25, 50, 100, ... N pods, the newest
    VMI is attached a few times by the CLI and in process: one more VMI's
    attach time against the pods on the node. Then, all N pods plugged:

    \b
    agent   `tcbypass agent` starts with all N pods already plugged: time
            until all N are attached, its RSS; then `tcbypass status` with
            N rows and the kernel memory (memlock) of each attachment
    cli     N sequential `tcbypass attach VMI` calls, as a node hook makes
            them: wall time p50/p90/max, Python start-up included
    inproc  attach in this process: the attach's own time

    After each phase everything is detached, and no pin, lock file,
    program or map of the N attachments may remain.

    \b
    Examples:
      tcbypass-lab bench scale 100
      tcbypass-lab bench scale 250 --json scale.json --plot scale.png
    """
    from . import report as bench_report, scale
    from .bench import write_json

    require_root("bench scale")
    chosen = tuple(p.strip() for p in phases.split(",") if p.strip())
    if not chosen or any(p not in ("agent", "cli", "inproc") for p in chosen):
        raise click.UsageError("--phases takes agent, cli and inproc, separated by commas")
    if plot_file and not bench_report.can_plot():
        raise click.UsageError("--plot needs matplotlib (pip install matplotlib, the 'bench' extra)")
    plan = scale.ScalePlan(vms=vms, vm_link=vm_link, phases=chosen)
    with lab.err.status("building the node") as spinner:
        report = run(scale.run, plan, lambda text: spinner.update(text))
    scale.render(report, lab.console)
    if json_file:
        run(write_json, report, json_file)
        lab.err.print(f"results: {json_file}", highlight=False)
    if plot_file:
        run(scale.plot, report, plot_file)
        lab.err.print(f"plot: {plot_file}", highlight=False)
    if not all(c["pass"] for c in report["targets"] if c["target"].startswith("nothing left")):
        sys.exit(1)


@main.command()
@click.option("--lifecycles", type=click.IntRange(1, 100000), default=None, metavar="N",
              help="Pod lifecycles to churn through (default 2000; 200 with --ci).")
@click.option("--long-lived", type=click.IntRange(0, 200), default=None, metavar="N",
              help="VM pods that live through the whole soak with traffic (default 20).")
@click.option("--workers", type=click.IntRange(1, 32), default=None, metavar="N",
              help="Churned pods at a time (default 4).")
@click.option("--sample-every", type=click.FloatRange(min=0.5), default=None, metavar="SECONDS",
              help="Seconds between two samples of the agent and the kernel (default 60; 5 with --ci).")
@click.option("--ci", is_flag=True, help="The short soak CI runs: 200 lifecycles, a sample every 5 s.")
@click.option("--json", "json_file", type=click.Path(dir_okay=False, writable=True), metavar="FILE",
              help="Also write the report as JSON to FILE.")
@click.option("--plot", "plot_file", type=click.Path(dir_okay=False, writable=True), metavar="FILE.png",
              help="Also draw RSS, fds, programs and attach latency over time (needs matplotlib).")
@click.pass_obj
def soak(lab: Lab, lifecycles: int | None, long_lived: int | None, workers: int | None, sample_every: float | None,
         ci: bool, json_file: str | None, plot_file: str | None) -> None:
    """The agent for hours on a node where VMs come and go.

    Long-lived VM pods carry UDP streams and pings on the fast path while
    workers create and delete VM pods continuously: plain lifecycles, pods
    deleted mid-attach, VM restarts (a new tap), NIC hotplug and unplug.
    Every sample records the agent's RSS, fds, threads and CPU time, the
    kernel's programs, maps and links, the pins and the run directory, and
    the window's attach latency. Exit 1 when a target is missed: no loss,
    attach and cleanup p99 within a second, everything back to its baseline.

    \b
    Examples:
      tcbypass-lab soak --ci
      tcbypass-lab soak --json docs/soak.json --plot docs/soak.png      (about half an hour)
    """
    import dataclasses

    from . import report as bench_report, soak as soaking
    from .bench import write_json

    require_root("soak")
    if plot_file and not bench_report.can_plot():
        raise click.UsageError("--plot needs matplotlib (pip install matplotlib, the 'bench' extra)")
    plan = soaking.ci_plan() if ci else soaking.SoakPlan()
    given = {"lifecycles": lifecycles, "long_lived": long_lived, "workers": workers, "sample_every": sample_every}
    plan = dataclasses.replace(plan, **{k: v for k, v in given.items() if v is not None})
    with lab.err.status("soaking") as spinner:
        report = run(soaking.run, plan, lambda text: spinner.update(text))
    soaking.render(report, lab.console)
    if json_file:
        run(write_json, report, json_file)
        lab.err.print(f"results: {json_file}", highlight=False)
    if plot_file:
        run(soaking.plot, report, plot_file)
        lab.err.print(f"plot: {plot_file}", highlight=False)
    sys.exit(0 if all(check["pass"] for check in report["judged"]) else 1)


@main.command()
@click.option("--rebuild", is_flag=True, help="Build the box again even when the cache has this recipe's.")
@click.pass_obj
def box(lab: Lab, rebuild: bool) -> None:
    """Build the local Vagrant box (Debian 12, from Debian's packages), add it to
    Vagrant, and have libvirt running for it.

    Made with the kernel matrix's image builder and cached: rebuilt only when
    its recipe changes (a few minutes), otherwise a few seconds. Added to
    Vagrant as tcbypass/debian12, which vagrant/Vagrantfile uses by default
    (and builds it with this command on `vagrant up`). Where nothing runs
    libvirtd (no systemd), it is started here and left running for the VM.
    """
    from . import box as boxes, vagrant

    require_root("box")
    logging.getLogger().setLevel(logging.INFO)
    built = run(boxes.ensure_added, rebuild=rebuild)
    how = f"built in {built.built_seconds:.0f} s" if built.built_seconds else "from the cache"
    click.echo(f"{boxes.BOX_NAME}: {built.path} ({how})")
    started = run(vagrant.ensure_libvirt)
    if started:
        click.echo(f"started libvirt (pids {' '.join(map(str, started))}); stop it with kill when done")


@main.command()
def accel() -> None:
    """Print kvm or tcg: what the lab's guests use here (KVM only where a guest boots under it)."""
    from .accel import pick_accel
    from .initramfs import find_guest_kernel

    click.echo(run(pick_accel, "auto", str(find_guest_kernel().image)))


@main.command()
@click.option("--runs", type=click.IntRange(1, 50), default=5, show_default=True, metavar="N",
              help="Migrations each way, with the agents and again without tcbypass.")
@click.option("--json", "json_file", type=click.Path(dir_okay=False, writable=True), metavar="FILE",
              help="Also write every run as JSON to FILE.")
@click.pass_obj
def migrate(lab: Lab, runs: int, json_file: str | None) -> None:
    """Live-migrate a real VM between two emulated nodes under traffic, with tcbypass and without.

    Two nodes (private Open vSwitches joined like a cluster's overlay), a
    server pod on the first, a qemu guest (TCG where KVM does not work) in a
    bridge-binding virt-launcher pod. Each migration plugs a target pod on
    the other node (same MAC and IP), starts QEMU there with -incoming,
    migrates over a local socket with QMP, and deletes the source pod, while
    UDP streams both ways and a ping run. Printed per run: QEMU's downtime,
    what each stream lost and its longest gap; with the agents, whether the
    target was attached before the VM resumed and carried its traffic after.
    """
    from . import migration
    from .bench import write_json

    require_root("migrate")
    with lab.err.status("migrating") as spinner:
        report = run(migration.downtime, migration.DowntimePlan(runs=runs), lambda text: spinner.update(text))
    migration.render(report, lab.console)
    if json_file:
        run(write_json, report, json_file)
        lab.err.print(f"results: {json_file}", highlight=False)


@main.command()
@click.option("--kernel", "kernel_names", multiple=True, metavar="NAME",
              help="A kernel target (repeatable; default: 6.1, 5.10, 5.10-bullseye; --list shows them all).")
@click.option("--selection", default="full", show_default=True,
              help="Which test groups: full, ci, no-loss, kernel-datapath (--list shows them).")
@click.option("--pytest", "pytest_args", metavar="ARGS",
              help="Run these pytest arguments (one string) as one group instead of a selection (development), "
                   "e.g. --pytest '-s tests/switch/test_attach.py'.")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path),
              help="Results directory (default: <cache>/results/<UTC time>).")
@click.option("--cache-dir", default=None, metavar="DIR", help="Where the guest images are cached.")
@click.option("--accel", type=click.Choice(["auto", "kvm", "tcg"]), default="auto", show_default=True,
              help="KVM where it works (probed), TCG otherwise.")
@click.option("--rebuild", is_flag=True, help="Rebuild the images even when cached.")
@click.option("--list", "listing", is_flag=True, help="Print the targets and test groups and exit.")
@click.option("--report", "reports", multiple=True, type=click.Path(exists=True, dir_okay=False, path_type=Path),
              metavar="RESULT_JSON", help="Print the table of earlier runs (repeatable) and exit.")
def kernels(kernel_names: tuple[str, ...], selection: str, pytest_args: str | None, out: Path | None,
            cache_dir: str | None, accel: str, rebuild: bool, listing: bool, reports: tuple[Path, ...]) -> None:
    """The kernel matrix: the project's kernel-facing tests on the kernels users run.

    Each kernel target is a Debian release's kernel with a full userland,
    built once into a cached image (mmdebstrap) and booted by qemu; the
    tests run inside and their JUnit comes back. Every OVS in a guest runs
    the kernel datapath (openvswitch.ko). Exit 0 when every group passed on
    every kernel. docs/kernels.md has the results.

    \b
    Examples:
      tcbypass-lab kernels --list
      tcbypass-lab kernels --kernel 6.1 --selection ci          what CI runs
      tcbypass-lab kernels --kernel 6.1 --kernel 6.12 --selection kernel-datapath
    """
    from . import kernels as matrix
    from .kernel_image import DEFAULT_CACHE_DIR
    from .kernel_results import failures, markdown_table

    logging.getLogger().setLevel(logging.INFO)
    if listing:
        click.echo("\n".join(matrix.listing()))
        return
    if reports:
        found = run(matrix.load_results, reports)
        click.echo(markdown_table(found), nl=False)
        for line in failures(found):
            click.echo(f"  {line}")
        sys.exit(0 if all(r.ok for r in found) else 1)
    require_root("kernels")
    cache = cache_dir or DEFAULT_CACHE_DIR
    out = out or matrix.default_out(cache)
    out.mkdir(parents=True, exist_ok=True)
    chosen = matrix.adhoc_selection(pytest_args) if pytest_args else selection
    results = run(matrix.run_matrix, list(kernel_names) or list(matrix.DEFAULT_KERNELS), chosen, out,
                  cache_dir=cache, accel=accel, rebuild=rebuild)
    click.echo(markdown_table(results))
    for line in failures(results):
        click.echo(f"  {line}")
    click.echo(f"results: {out}/results.json")
    sys.exit(0 if all(r.ok for r in results) else 1)


if __name__ == "__main__":
    main()
