"""The command line: parse, call the core, render. No datapath logic here.

Exit codes: 0 done (or nothing to do, which includes a VMI whose bindings
have no bridge to bypass), 1 failure, 2 bad usage or input, 3 degraded
(status found attachments that are not active; status --all also counts VM
ports that could be on the fast path and are not).
"""

from __future__ import annotations

import json
import logging
import os
import sys
from dataclasses import dataclass

from typing import TYPE_CHECKING

import click

from . import __version__, ovsdb
from .backend import NodeBackend
from .errors import EXIT_DEGRADED, TcbError
from .model import STATE_ACTIVE, AttachSpec, Status

if TYPE_CHECKING:  # rich and the core load only when a command needs them: the CLI starts fast
    from rich.console import Console
    from rich.table import Table

    from .nodeview import PortRow
    from .discovery import Settings

DEFAULT_NAMESPACE = "default"


@dataclass
class App:
    """What every command shares: the node backend, one console for output, one for
    errors (made on first use: importing rich costs a command that prints nothing rich)."""

    backend: NodeBackend
    _console: "Console | None" = None
    _err: "Console | None" = None
    debug: bool = False

    @property
    def console(self) -> "Console":
        if self._console is None:
            from rich.console import Console

            # Not a terminal: $COLUMNS if set (as a terminal would say), else room for every column.
            self._console = Console() if sys.stdout.isatty() else Console(width=int(os.environ.get("COLUMNS") or 200))
        return self._console

    @property
    def err(self) -> "Console":
        if self._err is None:
            from rich.console import Console

            self._err = Console(stderr=True, width=None if sys.stderr.isatty() else 1000)
        return self._err


def _require_root(app: App, what: str) -> None:
    _run(app, app.backend.require_root, what)


def _run(app: App, fn, *args, **kwargs):
    """Call into the core; turn typed errors into one line and an exit code."""
    try:
        return fn(*args, **kwargs)
    except TcbError as exc:
        if app.debug:
            raise
        click.echo(f"{click.style('error:', fg='red', bold=True)} {exc}", err=True)  # colour only on a terminal
        sys.exit(exc.exit_code)


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="tcbypass")
@click.option("--debug", is_flag=True, help="Log every step and show tracebacks.")
@click.pass_context
def main(ctx: click.Context, debug: bool) -> None:
    """Fast path for KubeVirt VMs on Kube-OVN: carry a VM's unicast frames
    between its tap and the pod's veth with a tc eBPF program, past the
    in-pod bridge (k6t-eth0). Everything else (broadcast, multicast, DHCP,
    RARP, unknown MACs) still takes the bridge, so the VM never loses its
    network if tcbypass goes away.

    \b
    Typical use on a node (as root):
      tcbypass attach my-vm -n my-namespace     bypass all bridge-bound NICs of a VMI
      tcbypass status                           what is attached, and the counters
      tcbypass detach my-vm -n my-namespace     back to the bridge path
      tcbypass doctor                           is this node able to run the bypass?
    """
    logging.basicConfig(level=logging.DEBUG if debug else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if ctx.obj is None:  # tests hand in an App with a fake backend
        ctx.obj = App(NodeBackend())
    ctx.obj.debug = ctx.obj.debug or debug


def _settings(ovsdb_url: str | None, ovs_netns: str | None) -> "Settings":
    from .discovery import Settings

    return Settings(ovsdb_url=ovsdb_url or "", ovs_netns=ovs_netns or "")


_ovsdb_option = click.option(
    "--ovsdb", "ovsdb_url", metavar="URL", envvar=ovsdb.ENV_URL,
    help=f"OVSDB socket (unix:PATH or tcp:HOST:PORT). Default: ${ovsdb.ENV_URL}, else {ovsdb.DEFAULT_URL}.")
_ovs_netns_option = click.option(
    "--ovs-netns", metavar="NS", envvar="TCBYPASS_OVS_NETNS",
    help="Network namespace of OVS's ports, if not this one (sandboxes; $TCBYPASS_OVS_NETNS).")
_namespace_option = click.option("-n", "--namespace", default=DEFAULT_NAMESPACE, show_default=True,
                                 help="Kubernetes namespace of the VMI.")


@main.command()
@click.argument("vmi", required=False)
@_namespace_option
@_ovsdb_option
@_ovs_netns_option
@click.option("--no-dhcp-passthrough", is_flag=True,
              help="Fast-path DHCPv4 too (managedTap: OVN answers DHCP, no server on the bridge).")
@click.option("--hook", type=click.Choice(["auto", "tcx", "clsact"]), default="auto", show_default=True,
              envvar="TCBYPASS_HOOK",
              help="Where the programs hook in: tcx links (Linux 6.6+: no qdisc, no packet lost while "
                   "attaching, cheapest per packet) or a clsact filter (older kernels). auto takes tcx where "
                   "the kernel has it. $TCBYPASS_HOOK.")
@click.option("--from-vm", "from_vm", type=click.Choice(["auto", "peer", "redirect"]), default="auto",
              show_default=True,
              help="How frames from the VM leave: peer hands them straight to the host side of the pod's "
                   "veth (bpf_redirect_peer: skips the veth's queue too), redirect to the pod NIC's egress. "
                   "auto takes peer wherever it works (a veth pod NIC, Linux 5.10+): for every frame when the "
                   "host side is a switch port (OVS kernel datapath, a bridge), else for frames to the host "
                   "side's own MAC (status shows peer-host).")
@click.option("--netns", metavar="NS", help="Explicit mode: pod network namespace, a name under /var/run/netns "
              "or a path such as /proc/PID/ns/net.")
@click.option("--tap", metavar="TAP", help="Explicit mode: the VM's tap inside NS (tap0).")
@click.option("--nic", metavar="NIC", help="Explicit mode: the pod's veth inside NS (eth0-nic).")
@click.option("--mac", metavar="MAC", help="Explicit mode: the VM's MAC address.")
@click.option("--name", metavar="NAME", help="Explicit mode: name of the attachment (default: NS-TAP).")
@click.pass_obj
def attach(app: App, vmi: str | None, namespace: str, ovsdb_url: str | None, ovs_netns: str | None,
           no_dhcp_passthrough: bool, hook: str, from_vm: str, netns: str | None, tap: str | None, nic: str | None,
           mac: str | None, name: str | None) -> None:
    """Bypass the in-pod bridge for VMI's bridge-bound NICs.

    Finds the VMI's ports in OVSDB (Kube-OVN's external_ids: pod_name is the
    VM name, pod_namespace, pod_netns), recognises each NIC's KubeVirt
    binding from what is in the pod, and attaches the fast path where the
    pod NIC and exactly one tap share a KubeVirt bridge (bridge, managedTap).
    Exit 0 when attached, also when already attached; after a VM restart
    (new tap) it refreshes the maps and filters. Exit 0 too, with one line
    per NIC naming its binding, when every NIC uses a binding that has no
    bridge to bypass (masquerade, passt, macvtap, SR-IOV, Kube-OVN's direct
    tap). Exit 1 when the VMI is unknown, its pod is gone, or a NIC is not
    plugged yet or wired in a way tcbypass cannot serve.

    \b
    Examples:
      tcbypass attach my-vm -n prod
      tcbypass attach my-vm --ovsdb unix:/var/run/openvswitch/db.sock
    Explicit mode, without OVSDB (one tap/NIC pair):
      tcbypass attach --netns /proc/4242/ns/net --tap tap0 --nic eth0-nic \\
                      --mac 52:54:00:12:34:56
    """
    explicit = {"--netns": netns, "--tap": tap, "--nic": nic, "--mac": mac}
    if vmi and any(explicit.values()):
        raise click.UsageError("give either a VMI name or --netns/--tap/--nic/--mac, not both")
    if not vmi:
        missing = [flag for flag, value in explicit.items() if not value]
        if len(missing) == len(explicit):
            raise click.UsageError("give a VMI name (tcbypass attach VMI -n NAMESPACE), "
                                   "or --netns, --tap, --nic and --mac")
        if missing:
            raise click.UsageError(f"explicit attach also needs {', '.join(missing)}")
    _require_root(app, "attach")
    hook, from_vm = ("" if hook == "auto" else hook), ("" if from_vm == "auto" else from_vm)
    if not vmi:
        spec = AttachSpec(name=name or _default_name(netns, tap), netns=netns, tap=tap, nic=nic, mac=mac,
                          dhcp_to_bridge=not no_dhcp_passthrough, hook=hook, from_vm=from_vm)
        _print_result(app, "", _run(app, app.backend.attach_explicit, spec))
        return
    result = _run(app, app.backend.attach_vmi, vmi, namespace, _settings(ovsdb_url, ovs_netns),
                  not no_dhcp_passthrough, hook, from_vm)
    for done in result.attached:
        _print_result(app, f"{namespace}/{vmi} ", done)
    for plan in result.skipped:
        click.echo(f"{namespace}/{vmi} {plan.label}: {plan.recognition.line()}")
    for record in result.removed:
        click.echo(f"{namespace}/{vmi} {record.name}: detached (the VMI no longer has this NIC)")


def _print_result(app: App, prefix: str, result) -> None:
    r = result.record
    click.echo(f"{prefix}{r.name}: {result.action} ({r.tap} <-> {r.nic}, {r.mac}; {r.hook}, "
               f"from the VM by {r.from_vm}) in {result.seconds * 1000:.0f} ms")


def _default_name(netns: str, tap: str) -> str:
    parts = netns.rstrip("/").split("/")
    base = parts[2] if netns.startswith("/proc/") and len(parts) > 2 else parts[-1]
    return f"{base}-{tap}"


@main.command()
@click.argument("target", metavar="VMI|NAME")
@_namespace_option
@click.option("--remove-qdisc", is_flag=True,
              help="Also remove the (empty) clsact qdisc tcbypass added, if nothing else uses it. Adding or "
                   "removing a qdisc briefly stops the device's queues and can drop a frame in flight.")
@click.pass_obj
def detach(app: App, target: str, namespace: str, remove_qdisc: bool) -> None:
    """Restore the bridge path for VMI (all its NICs) or for attachment NAME.

    Removes tcbypass's own filters and pins and nothing else; the bridge
    carries everything again at once. An empty clsact qdisc that tcbypass
    added stays unless --remove-qdisc (it changes nothing on the path, and
    removing it can cost a packet). Needs no OVSDB. Exit 0 also when nothing
    was attached.
    """
    _require_root(app, "detach")
    records = _run(app, app.backend.detach, target, namespace, remove_qdisc)
    if not records:
        click.echo(f"{target}: not attached, nothing to do")
    for r in records:
        click.echo(f"{r.name}: detached, {r.tap} and {r.nic} use the bridge again")


@main.command()
@click.argument("vmi", required=False)
@click.option("-n", "--namespace", default=None,
              help="Only this Kubernetes namespace (default: all; 'default' when a VMI is given).")
@click.option("--all", "all_ports", is_flag=True,
              help="Every Kube-OVN VM port on this node, attached or not: binding, state and why.")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON list with stable snake_case keys.")
@click.option("-o", "--output", type=click.Choice(["wide"]), default=None,
              help="wide: every column and every problem (the table otherwise keeps what fits the terminal).")
@_ovsdb_option
@_ovs_netns_option
@click.pass_obj
def status(app: App, vmi: str | None, namespace: str | None, all_ports: bool, as_json: bool, output: str | None,
           ovsdb_url: str | None, ovs_netns: str | None) -> None:
    """Show attachments on this node: one row per NIC, its state and counters.

    \b
    States:
      active    programs, maps and devices agree; the fast path is live
      stale     a device or ifindex changed (VM restarted?): attach again
      orphaned  the pod's network namespace is gone: detach it
    The path column says where the programs hook in (tcx or clsact) and how
    frames from the VM leave: peer (all straight into the host side of the
    pod veth), peer-host (only those for the host side itself; the rest
    through the pod NIC) or redirect (all through the pod NIC).
    Exit code 3 when any row shown is not active.

    \b
    With --all, every Kube-OVN VM port on the node (read from OVSDB and the
    pods; --ovsdb as for attach), one row per NIC with its KubeVirt binding
    (bridge, managedTap, masquerade, passt, slirp, macvtap, sriov,
    kube-ovn-direct, pending) and a state: the three above, or
      not attached    bypassable, or still being plugged, and not attached
      not bypassable  no bridge to bypass (or a wiring tcbypass cannot serve)
    Exit code 3 when any port is stale, orphaned or not attached.
    """
    if all_ports and vmi:
        raise click.UsageError("--all lists every VM port of the node; filter with -n NAMESPACE, not a VMI")
    _require_root(app, "status")
    if all_ports:
        from .nodeview import DEGRADED

        port_rows = _run(app, app.backend.node_ports, namespace, _settings(ovsdb_url, ovs_netns))
        if as_json:
            click.echo(json.dumps([row.to_json() for row in port_rows], indent=2))
        else:
            app.console.print(ports_table(port_rows))
        if any(row.state in DEGRADED for row in port_rows):
            sys.exit(EXIT_DEGRADED)
        return
    if vmi and namespace is None:
        namespace = DEFAULT_NAMESPACE
    rows = _run(app, app.backend.statuses, namespace, vmi)
    if as_json:
        click.echo(json.dumps([s.to_json() for s in rows], indent=2))
    else:
        wide = output == "wide"
        app.console.print(status_table(rows, app.console.width, wide))
        if not wide:
            for line in problem_lines(rows):
                app.console.print(f"[yellow]![/] {line}", highlight=False, soft_wrap=True)
    if any(s.state != STATE_ACTIVE for s in rows):
        sys.exit(EXIT_DEGRADED)


_STATE_COLOUR = {"active": "green", "stale": "yellow", "orphaned": "red", "not attached": "yellow",
                 "not bypassable": "dim"}


# The columns of `status`, most important first. A terminal narrower than all of
# them gets the first ones that fit, one line per attachment, as `kubectl get`
# does (the first five always, cropped if they must be); `-o wide` shows them
# all, byte counts, and each problem in the table.
_STATUS_COLUMNS = ("VMI", "NIC (iface-id)", "state", "from VM", "to VM", "path", "tap", "pod NIC", "MAC", "netns",
                   "passed to the bridge")
_ALWAYS = 5
_RIGHT = {"from VM", "to VM"}


def _status_cells(s: Status, wide: bool) -> dict[str, str]:
    r, c = s.record, s.counters
    state = f"[{_STATE_COLOUR.get(s.state, 'white')}]{s.state}[/]"
    if wide and s.problems:
        state += "\n" + "\n".join(f"[dim]{p}[/]" for p in s.problems)
    elif s.problems:
        state += f" ({len(s.problems)})"
    traffic = {d: f"{c.redirect_packets[d]} / {_bytes(c.redirect_bytes[d])}" if wide else str(c.redirect_packets[d])
               for d in ("from_vm", "to_vm")}
    return {"VMI": f"{r.namespace}/{r.vmi}" if r.vmi else "-", "NIC (iface-id)": r.iface_id or r.name,
            "state": state, "from VM": traffic["from_vm"], "to VM": traffic["to_vm"],
            "path": f"{r.hook}{chr(10) if wide else ' '}{r.from_vm}", "tap": r.tap, "pod NIC": r.nic, "MAC": r.mac,
            "netns": r.netns,
            "passed to the bridge": (chr(10) if wide else " ").join(f"{k} {v}" for k, v in c.passed.items() if v)
            or "-"}


def _widths(cells: list[dict[str, str]]) -> dict[str, int]:
    """What each column needs to show every row on one line."""
    from rich.text import Text

    return {col: max([len(col)] + [Text.from_markup(row[col]).cell_len for row in cells]) for col in _STATUS_COLUMNS}


def _fitting(widths: dict[str, int], width: int) -> list[str]:
    """The leading columns that fit in `width`, one line per row (never fewer than _ALWAYS)."""
    chosen, used = [], 4  # the table's outer edges
    for i, col in enumerate(_STATUS_COLUMNS):
        if i >= _ALWAYS and used + widths[col] + 3 > width:
            break
        chosen.append(col)
        used += widths[col] + 3
    return chosen


def status_table(rows: list[Status], width: int = 200, wide: bool = False) -> "Table | str":
    """The attachments as a table for a terminal `width` columns wide (all columns with `wide`)."""
    from rich.table import Table

    if not rows:
        return "No attachments. Attach one with: tcbypass attach VMI -n NAMESPACE"
    cells = [_status_cells(s, wide) for s in rows]
    widths = _widths(cells)
    columns = list(_STATUS_COLUMNS) if wide else _fitting(widths, width)
    nic = "NIC (iface-id)"
    if not wide:  # only the names give way (cropped), never the state or a count
        names = widths["VMI"] + widths[nic]
        room = width - 4 - 3 * len(columns) - sum(widths[c] for c in columns if c not in ("VMI", nic))
        if names > room:
            widths["VMI"] = max(8, room * widths["VMI"] // names)
            widths[nic] = max(8, room - widths["VMI"])
    table = Table(title="tcbypass attachments", title_justify="left")
    for col in columns:
        unit = ("pkts / bytes" if wide else "pkts") if col in _RIGHT else ""
        table.add_column(f"{col}\n{unit}" if unit else col, justify="right" if col in _RIGHT else "left",
                         no_wrap=not wide, overflow="fold" if wide else "ellipsis",
                         width=None if wide else widths[col])
    for row in cells:
        table.add_row(*(row[col] for col in columns))
    if not wide:
        table.caption = "every column and problem: tcbypass status -o wide"
        table.caption_justify = "left"
    return table


def problem_lines(rows: list[Status]) -> list[str]:
    """One line per problem, for the narrow table (-o wide shows them in it)."""
    return [f"{s.record.iface_id or s.record.name}: {p}" for s in rows for p in s.problems]


def ports_table(rows: "list[PortRow]") -> "Table | str":
    from rich.markup import escape
    from rich.table import Table

    if not rows:
        return "No Kube-OVN VM ports on this node."
    table = Table(title="VM ports on this node", title_justify="left")
    table.add_column("VMI", overflow="fold")
    table.add_column("NIC (iface-id)", overflow="fold")
    table.add_column("binding", no_wrap=True)
    table.add_column("state", no_wrap=True)
    table.add_column("reason", ratio=1, overflow="fold")
    for row in rows:
        colour = _STATE_COLOUR.get(row.state, "white")
        table.add_row(f"{row.namespace}/{row.vmi}", row.nic, row.binding, f"[{colour}]{row.state}[/]",
                      escape(row.reason))
    return table


def _bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


@main.command()
@click.pass_obj
def gc(app: App) -> None:
    """Remove leftovers: attachments whose pod is gone, unreadable pins,
    directories left by an interrupted attach, and tcx links whose device
    was deleted (a restarted VM's old tap). Live attachments, even stale
    ones, are left alone (attach refreshes those)."""
    _require_root(app, "gc")
    removed = _run(app, app.backend.gc)
    click.echo(f"removed: {', '.join(removed)}" if removed else "nothing to remove")


@main.command()
@_ovsdb_option
@_ovs_netns_option
@click.option("--metrics-address", metavar="HOST:PORT", default="127.0.0.1:9477", show_default=True,
              help="Serve Prometheus metrics here ('' to turn off).")
@click.option("--detach-on-exit", is_flag=True,
              help="On SIGTERM, detach what the agent attached (default: leave the fast path running).")
@click.option("--ports-refresh", type=click.FloatRange(min=0.1), default=15.0, show_default=True, metavar="SECONDS",
              help="How often the tcbypass_vm_ports gauge re-reads every pod (in the background; a scrape never "
                   "waits for it).")
@click.pass_obj
def agent(app: App, ovsdb_url: str | None, ovs_netns: str | None, metrics_address: str,
          detach_on_exit: bool, ports_refresh: float) -> None:
    """Run on a node: keep every Kube-OVN VM port bypassed, as VMs come and go.

    Watches OVSDB (a monitor of the Interface table) and each pod's devices
    (rtnetlink link events): attaches new VMIs, refreshes after a VM restart
    or a migration lands, detaches when the pod is deleted. Reconnects when
    OVSDB restarts. On SIGTERM it exits and leaves the datapath carrying
    traffic (or detaches with --detach-on-exit). Logs to stderr.
    """
    _require_root(app, "agent")
    logging.getLogger().setLevel(logging.DEBUG if app.debug else logging.INFO)
    try:
        _run(app, app.backend.agent, _settings(ovsdb_url, ovs_netns), detach_on_exit, metrics_address, ports_refresh)
    except (OSError, ValueError) as exc:
        app.err.print(f"error: cannot serve metrics on {metrics_address} ({exc}); "
                      "choose another --metrics-address", highlight=False, soft_wrap=True)
        sys.exit(1)


@main.command()
@click.option("--json", "as_json", is_flag=True, help="Print the checks, the kernel's features and the path as JSON.")
@click.pass_obj
def doctor(app: App, as_json: bool) -> None:
    """Check that this node can run the bypass, say which path it takes, and
    print the fix for each failure.

    The kernel's features (tcx, bpf_redirect_peer, devmap lookups) are
    probed, not guessed from its version; the path is what attach will
    choose with them. Exit 1 when a required check fails.
    """
    report = _run(app, app.backend.doctor)
    if as_json:
        click.echo(json.dumps(report.to_json(), indent=2))
        sys.exit(0 if report.ok else 1)
    for check in report.checks:
        if check.ok:
            mark = "[green]ok[/]  "
        else:
            mark = "[red]FAIL[/]" if check.required else "[yellow]no[/]  "
        app.console.print(f"{mark} {check.name}: {check.detail}", highlight=False)
        if not check.ok and check.required:
            app.console.print(f"       fix: {check.fix}", highlight=False)
    if report.hook:
        app.console.print(f"path: {report.hook}, from the VM by "
                          f"{'bpf_redirect_peer' if report.from_vm == 'peer' else 'bpf_redirect'}", highlight=False)
    if not report.ok:
        failed = sum(1 for c in report.checks if not c.ok and c.required)
        app.err.print(f"error: {failed} check(s) failed; apply the fixes above")
        sys.exit(1)


@main.command()
@click.option("--cache-dir", type=click.Path(file_okay=False), metavar="DIR",
              help="Where to put the builds (default: $TCBYPASS_CACHE_DIR, else /var/lib/tcbypass/objects).")
@click.pass_obj
def prepare(app: App, cache_dir: str | None) -> None:
    """Compile the datapath program ahead of time, for nodes without a compiler.

    bcc compiles bpf/redirect.c once per build (this needs bcc and kernel
    headers) and keeps the result in the cache directory. Every attach then
    loads it with fresh maps in a few milliseconds, and a node (or a node
    image) that has the cache needs neither bcc nor headers. Safe to run
    again: an entry that is there and sound is kept.

    
    Examples:
      tcbypass prepare
      tcbypass prepare --cache-dir /image-root/var/lib/tcbypass/objects
    """

    for which, path in _run(app, app.backend.prepare, cache_dir):
        variant = "without bpf_redirect_peer (kernels before 5.10)" if which.no_peer else "default"
        click.echo(f"{path}: {variant}")


if __name__ == "__main__":
    main()
