"""Races: several tcbypass processes on one attachment at once, and many
attachments at once. The end state is always one consistent attachment or
none (maps, pins and filters agree: see assert_one_attachment_or_none)."""

from __future__ import annotations

import collections
import concurrent.futures
import os
import re
import statistics
import subprocess
import sys
import time

import pytest

from tcbypass import attachments
from tcbypass_lab.sandbox import ping

from .conftest import (assert_one_attachment_or_none, explicit_args, instance_ids, loaded_ids, pin_entries, report,
                       status_rows, wait_until_freed)

pytestmark = pytest.mark.root


def env_of(sb) -> dict:
    return {**os.environ, "TCBYPASS_OVSDB": sb.ovsdb_url, "TCBYPASS_OVS_NETNS": sb.netns_path(sb.node)}


def start(sb, *args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "tcbypass", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env_of(sb))


def finish(proc: subprocess.Popen) -> tuple[int, str, str]:
    out, err = proc.communicate(timeout=90)
    return proc.returncode, out, err


def action_of(stdout: str) -> str:
    found = re.findall(r": (attached|refreshed|replaced|unchanged|detached|not attached)", stdout)
    assert len(found) == 1, stdout
    return found[0]


@pytest.fixture
def vm(ovs_node):
    [nic] = ovs_node.add_vm("vm1", ["10.16.0.5"], namespace="prod")
    return ovs_node, nic


def test_concurrent_attaches_of_one_vmi_make_one_attachment(vm, capsys):
    sb, nic = vm
    procs = [start(sb, "attach", "vm1", "-n", "prod") for _ in range(5)]
    results = [finish(p) for p in procs]
    assert all(rc == 0 for rc, _, _ in results), results
    actions = collections.Counter(action_of(out) for _, out, _ in results)
    report(capsys, f"5 concurrent 'attach vm1': {dict(actions)}")
    assert actions == {"attached": 1, "unchanged": 4}
    assert assert_one_attachment_or_none("vm1.prod", nic) == "active"
    assert pin_entries() == {"vm1+prod"}, "one pin directory, no staging or half-built leftovers"
    assert [r["state"] for r in status_rows(sb.tag)] == ["active"]


# Seconds between starting `attach` and starting `detach`; negative: detach
# starts first. Both CLIs need ~0.2 s to start and attach compiles for ~0.7 s,
# so these land before, during and after the attach's locked section.
DETACH_DELAYS = (-0.1, 0.0, 0.1, 0.25, 0.4, 0.6, 0.9, 1.3)


def test_attach_racing_detach_ends_in_one_attachment_or_none(vm, capsys):
    sb, nic = vm
    outcomes = []
    for i, delay in enumerate(DETACH_DELAYS):
        if i % 2:  # every other round starts from an existing attachment
            assert finish(start(sb, "attach", "vm1", "-n", "prod"))[0] == 0
        first, second = (("attach", "detach") if delay >= 0 else ("detach", "attach"))
        cmds = {"attach": ("attach", "vm1", "-n", "prod"), "detach": ("detach", "vm1", "-n", "prod")}
        procs = {first: start(sb, *cmds[first])}
        time.sleep(abs(delay))
        procs[second] = start(sb, *cmds[second])
        results = {k: finish(p) for k, p in procs.items()}
        for what, (rc, out, err) in results.items():
            assert rc == 0 and not err, (what, out, err)
        state = assert_one_attachment_or_none("vm1.prod", nic)
        rows = status_rows(sb.tag)
        assert [r["state"] for r in rows] == (["active"] if state == "active" else []), rows
        assert pin_entries() <= {"vm1+prod"}
        outcomes.append(f"{'attached' if i % 2 else 'none'} -> detach {delay:+.2f} s -> "
                        f"attach {action_of(results['attach'][1])}, detach {action_of(results['detach'][1])}: "
                        f"{state}")
        if state == "active":
            assert finish(start(sb, "detach", "vm1", "-n", "prod"))[0] == 0
    report(capsys, "attach racing detach, start state -> outcome:\n  " + "\n  ".join(outcomes))


def test_gc_during_an_attach_leaves_the_attachment_alone(vm, capsys):
    """gc used to judge 'orphaned' (pins without a record yet) before taking the
    lock and detach after it, undoing the attach that had just finished (B3)."""
    sb, nic = vm
    attach = start(sb, "attach", "vm1", "-n", "prod")
    time.sleep(0.45)  # the attach is compiling: its pin directory exists, its record does not yet
    gc = subprocess.run([sys.executable, "-m", "tcbypass", "gc"], capture_output=True, text=True, timeout=90,
                        env=env_of(sb))
    rc, out, err = finish(attach)
    report(capsys, f"gc during an attach: attach said {out.strip()!r}; gc said {gc.stdout.strip()!r}")
    assert gc.returncode == 0 and rc == 0 and action_of(out) == "attached"
    assert assert_one_attachment_or_none("vm1.prod", nic) == "active", "gc undid the attach"


VMIS = 50
POOL = 4


def test_fifty_vmis_attached_in_parallel_are_all_active(bare_node, capsys):
    sb = bare_node
    started = time.monotonic()
    nics = []
    for i in range(VMIS):
        [nic] = sb.add_vm(f"v{i}", [f"10.20.{i}.5"])
        sb.serve_on_host_port(nic, f"10.20.{i}.2")
        nics.append(nic)
    built = time.monotonic() - started
    names = [f"p{i}-{sb.tag}" for i in range(VMIS)]
    progs_before = len(loaded_ids("prog"))

    def attach(i: int) -> tuple[int, str, str, float]:
        t = time.monotonic()
        proc = subprocess.run([sys.executable, "-m", "tcbypass", *explicit_args(sb, nics[i], names[i])],
                              capture_output=True, text=True, timeout=120)
        return proc.returncode, proc.stdout, proc.stderr, time.monotonic() - t

    t0 = time.monotonic()
    with concurrent.futures.ThreadPoolExecutor(POOL) as pool:
        results = list(pool.map(attach, range(VMIS)))
    wall = time.monotonic() - t0
    failed = [(names[i], r[2]) for i, r in enumerate(results) if r[0] != 0]
    assert not failed, failed
    assert all(action_of(r[1]) == "attached" for r in results)
    inside = [float(re.search(r"in (\d+) ms", r[1]).group(1)) / 1000 for r in results]
    rows = {r["name"]: r for r in status_rows(sb.tag)}
    assert set(rows) == set(names) and all(r["state"] == "active" for r in rows.values())
    states = collections.Counter(assert_one_attachment_or_none(n, nic) for n, nic in zip(names, nics))
    assert states == {"active": VMIS}
    assert {e for e in pin_entries() if sb.tag in e} == set(names)

    carried = [ping(nic.vm_ns, f"10.20.{i}.2", count=1, wait=2) for i, nic in enumerate(nics)]
    assert all(got == (1, 1) for got in carried)
    rows = {r["name"]: r for r in status_rows(sb.tag)}
    assert all(rows[n]["counters"]["redirected_packets"]["from_vm"] >= 1 for n in names), "each on its fast path"
    progs_attached = len(loaded_ids("prog"))

    ids = [instance_ids(attachments.pin_dir_of(n)) for n in names]
    t1 = time.monotonic()
    detached = [attachments.detach(n) for n in names]
    detach_wall = time.monotonic() - t1
    assert all(r is not None for r in detached)
    leftovers = [wait_until_freed(i) for i in ids]
    assert all(p == set() and m == set() for p, m in leftovers), "every program and map freed"
    assert not {e for e in pin_entries() if sb.tag in e}
    report(capsys, f"{VMIS} VMIs (built in {built:.1f} s): attached by {POOL} parallel CLIs in {wall:.1f} s "
                   f"wall; per attach (in-process time as printed) median {statistics.median(inside) * 1000:.0f} ms, "
                   f"max {max(inside) * 1000:.0f} ms; CLI end to end median "
                   f"{statistics.median(r[3] for r in results) * 1000:.0f} ms; all {VMIS} active and each carried "
                   f"its ping on the fast path; loaded programs on the machine {progs_before} -> "
                   f"{progs_attached} while attached; {VMIS} detaches in {detach_wall:.2f} s, all "
                   f"{2 * VMIS} programs and {sum(len(i.maps) for i in ids)} maps freed")
