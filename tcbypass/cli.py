"""The command line: parse, call the core, render. No datapath logic here.

Exit codes: 0 done (or nothing to do), 1 failure, 2 bad usage or input,
3 degraded (status found attachments that are not active).
"""

from __future__ import annotations

import json
import logging
import os
import sys
from dataclasses import dataclass

import click
from rich.console import Console
from rich.table import Table

from . import __version__, attachments, maps
from .errors import EXIT_DEGRADED, EXIT_USAGE, InputError, NotRootError, TcbError
from .model import STATE_ACTIVE, AttachSpec, Status

DEFAULT_NAMESPACE = "default"


@dataclass
class App:
    """What every command shares: one console for output, one for errors."""

    console: Console
    err: Console
    debug: bool


def _require_root(what: str) -> None:
    if os.geteuid() != 0:
        raise NotRootError(f"tcbypass {what} needs root (CAP_BPF, CAP_NET_ADMIN, bpffs)",
                           hint=f"run: sudo tcbypass {what} ...")


def _run(app: App, fn, *args, **kwargs):
    """Call into the core; turn typed errors into one line and an exit code."""
    try:
        return fn(*args, **kwargs)
    except TcbError as exc:
        if app.debug:
            raise
        app.err.print(f"[bold red]error:[/] {exc}", highlight=False, soft_wrap=True)
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
                        format="%(levelname)s %(name)s: %(message)s")
    ctx.obj = App(Console(), Console(stderr=True), debug)


@main.command()
@click.option("--netns", metavar="NS", help="Pod network namespace: a name under /var/run/netns or a path "
              "such as /proc/PID/ns/net.")
@click.option("--tap", metavar="TAP", help="The VM's tap device inside NS (tap0).")
@click.option("--nic", metavar="NIC", help="The pod's veth inside NS (eth0-nic).")
@click.option("--mac", metavar="MAC", help="The VM's MAC address.")
@click.option("--name", metavar="NAME", help="Name of the attachment (default: derived from NS and TAP).")
@click.option("--no-dhcp-passthrough", is_flag=True,
              help="Fast-path DHCPv4 too (managedTap: OVN answers DHCP, no server on the bridge).")
@click.pass_obj
def attach(app: App, netns: str | None, tap: str | None, nic: str | None, mac: str | None, name: str | None,
           no_dhcp_passthrough: bool) -> None:
    """Attach the fast path to one tap/NIC pair (explicit mode).

    Idempotent: attaching again with the same devices changes nothing;
    after a VM restart (new tap) it refreshes the maps and filters.

    \b
    Example:
      tcbypass attach --netns /proc/4242/ns/net --tap tap0 --nic eth0-nic \\
                      --mac 52:54:00:12:34:56
    """
    missing = [flag for flag, value in (("--netns", netns), ("--tap", tap), ("--nic", nic), ("--mac", mac))
               if not value]
    if missing:
        raise click.UsageError(f"explicit attach needs {', '.join(missing)}")
    _require_root("attach")
    spec = AttachSpec(name=name or _default_name(netns, tap), netns=netns, tap=tap, nic=nic, mac=mac,
                      dhcp_to_bridge=not no_dhcp_passthrough)
    result = _run(app, attachments.attach, spec)
    app.console.print(f"{result.record.name}: {result.action} "
                      f"({result.record.tap} <-> {result.record.nic}, {result.record.mac}) "
                      f"in {result.seconds * 1000:.0f} ms", highlight=False)


def _default_name(netns: str, tap: str) -> str:
    base = os.path.basename(netns.rstrip("/")) if "/proc/" not in netns else netns.split("/")[2]
    return f"{base}-{tap}"


@main.command()
@click.argument("name")
@click.pass_obj
def detach(app: App, name: str) -> None:
    """Detach attachment NAME and restore the bridge path exactly.

    Removes only tcbypass's own filters, its clsact qdisc if it created it
    and nothing else uses it, and its pins. Exit 0 also when nothing was
    attached.
    """
    _require_root("detach")
    _run(app, _check_name, name)
    record = _run(app, attachments.detach, name)
    if record is None:
        app.console.print(f"{name}: not attached, nothing to do", highlight=False)
    else:
        app.console.print(f"{name}: detached, {record.tap} and {record.nic} use the bridge again", highlight=False)


def _check_name(name: str) -> None:
    from .model import check_name
    check_name(name)


@main.command()
@click.option("--json", "as_json", is_flag=True, help="Print a JSON list (stable snake_case keys).")
@click.pass_obj
def status(app: App, as_json: bool) -> None:
    """Show every attachment on this node, its state and its counters.

    \b
    States:
      active    programs, maps and devices agree; the fast path is live
      stale     a device or ifindex changed (VM restarted?): attach again
      orphaned  the pod's network namespace is gone: detach (or gc)
    Exit code 3 when any attachment is not active.
    """
    _require_root("status")
    rows = _run(app, attachments.statuses)
    if as_json:
        click.echo(json.dumps([s.to_json() for s in rows], indent=2))
    else:
        app.console.print(status_table(rows))
    if any(s.state != STATE_ACTIVE for s in rows):
        sys.exit(EXIT_DEGRADED)


def status_table(rows: list[Status]) -> Table | str:
    if not rows:
        return "No attachments. Attach one with: tcbypass attach VMI -n NAMESPACE"
    table = Table(title="tcbypass attachments", title_justify="left")
    for col in ("name", "netns", "tap", "nic", "mac", "state"):
        table.add_column(col)
    table.add_column("from VM pkts / bytes", justify="right")
    table.add_column("to VM pkts / bytes", justify="right")
    table.add_column("passed to the bridge")
    colour = {"active": "green", "stale": "yellow", "orphaned": "red"}
    for s in rows:
        c = s.counters
        passed = ", ".join(f"{k} {v}" for k, v in c.passed.items() if v) or "-"
        state = f"[{colour.get(s.state, 'white')}]{s.state}[/]"
        if s.problems:
            state += "\n" + "\n".join(f"[dim]{p}[/]" for p in s.problems)
        table.add_row(s.record.name, s.record.netns, s.record.tap, s.record.nic, s.record.mac, state,
                      f"{c.redirect_packets['from_vm']} / {_bytes(c.redirect_bytes['from_vm'])}",
                      f"{c.redirect_packets['to_vm']} / {_bytes(c.redirect_bytes['to_vm'])}",
                      passed)
    return table


def _bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


@main.command()
@click.pass_obj
def doctor(app: App) -> None:
    """Check that this node can run the bypass, and print the fix for each failure."""
    from .doctor import run_checks

    failed = 0
    for check in run_checks():
        mark = "[green]ok[/]  " if check.ok else "[red]FAIL[/]"
        app.console.print(f"{mark} {check.name}: {check.detail}", highlight=False)
        if not check.ok:
            failed += 1
            app.console.print(f"       fix: {check.fix}", highlight=False)
    if failed:
        app.err.print(f"error: {failed} check(s) failed; apply the fixes above")
        sys.exit(1)


if __name__ == "__main__":
    main()
