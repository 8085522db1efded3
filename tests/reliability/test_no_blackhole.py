"""No blackhole: when a device or the whole pod goes away under an
attachment, traffic falls back to the bridge at once, status says what
happened, and cleaning up leaves nothing behind."""

from __future__ import annotations

import dataclasses
import json
import os
import time

import pytest

from tcbypass import attachments, health, tc
from tcbypass.errors import TcbError
from tcbypass.maps import AttachmentMaps
from tcbypass_lab.sandbox import ping, sh
from tests.conftest import run_cli

from .conftest import (quiet_pod, assert_one_attachment_or_none, instance_ids, links, loaded_ids, pin_entries, report,
                       status_rows, wait_until_freed)
from tcbypass_lab.streams import UdpFlow

pytestmark = pytest.mark.root

SERVER_IP, VM_IP = "10.16.0.2", "10.16.0.5"


@pytest.fixture
def pod(bare_pod):
    sb, nic, spec = quiet_pod(bare_pod, "bh")
    return sb, nic, spec


def tx_packets(netns: str, dev: str) -> int:
    [link] = json.loads(sh("ip", "-j", "-s", "link", "show", "dev", dev, netns=netns).stdout)
    return link["stats64"]["tx"]["packets"]


def test_vm_restart_falls_back_to_the_bridge_at_once_and_is_stale_until_attach(pod, capsys):
    """The tap goes and a new one comes (new ifindex); a decoy device then
    takes the old tap's ifindex. Frames for the VM must never be redirected
    (not into the vanished tap, not into the decoy): the bridge carries them
    to the new tap as soon as it exists. Status says stale until `attach`."""
    sb, nic, spec = pod
    attachments.attach(spec)
    rate = 2000
    flow = UdpFlow("server -> VM", sb.node, nic.vm_ns, VM_IP, 17101, rate, cpu=1)
    try:
        flow.start_receiver(idle=2.0)
        flow.start_sender()
        time.sleep(1.0)
        before = health.status_of(spec.name).counters
        assert before.redirect_packets["to_vm"] > 0.5 * rate * 0.9, "the fast path carries the stream first"
        old_tap = links(nic.pod_ns)[nic.tap]

        t_gone = time.monotonic()
        sb.restart_vm(nic)  # ip link del tap0; a new veth pair; tap0 back on the bridge, up
        t_back = time.monotonic()
        new_tap = links(nic.pod_ns)[nic.tap]
        # Something else now owns the old ifindex: our program must not send the VM's frames there.
        sh("ip", "link", "add", "decoy", "index", str(old_tap), "type", "veth", "peer", "name", "decoy-p",
           netns=nic.pod_ns)
        sh("sysctl", "-qw", "net.ipv6.conf.decoy.disable_ipv6=1", netns=nic.pod_ns)
        sh("ip", "link", "set", "decoy", "up", netns=nic.pod_ns)
        sh("ip", "link", "set", "decoy-p", "up", netns=nic.pod_ns)
        after_restart = health.status_of(spec.name)

        proc = run_cli("status", "--json")
        [row] = [r for r in json.loads(proc.stdout) if r["name"] == spec.name]
        assert proc.returncode == 3 and row["state"] == "stale", row
        assert f"tap tap0 is now ifindex {new_tap} (was {old_tap})" in row["problems"], row["problems"]
        time.sleep(1.5)
        still = health.status_of(spec.name)
        assert still.state == "stale", "stale until the next attach"
        decoy_tx = tx_packets(nic.pod_ns, "decoy")

        t_attach = time.monotonic()
        result = attachments.attach(spec)
        t_attached = time.monotonic()
        assert result.action == "refreshed"
        time.sleep(1.0)
        final = health.status_of(spec.name)
        flow.finish()
        stream = flow.result()
    finally:
        flow.stop()

    moved = lambda a, b, key: b.redirect_packets[key] - a.redirect_packets[key]  # noqa: E731
    passed = lambda a, b, key: b.passed[key] - a.passed[key]  # noqa: E731
    redirected_while_stale = moved(after_restart.counters, still.counters, "to_vm")
    no_target = passed(after_restart.counters, still.counters, "no_target")
    gap = stream.sent_in(t_gone, t_back)
    lost_after_back = sorted(set(stream.sent_in(t_back, t_attach)) & set(stream.lost))
    first = stream.first_arrival_after(t_back)
    lost_in_refresh = sorted(set(stream.sent_in(t_attach, t_attached + 0.01)) & set(stream.lost))
    lost_after_refresh = sorted(set(stream.sent_in(t_attached + 0.01, t_attached + 1.0)) & set(stream.lost))
    report(capsys, f"VM restart under a {rate} pps stream to the VM: tap gone for {(t_back - t_gone) * 1000:.0f} ms "
                   f"({len(gap)} packets sent meanwhile, {len(set(gap) & set(stream.lost))} lost: there is no VM "
                   f"device to deliver to); first packet delivered {((first or t_back) - t_back) * 1000:.1f} ms after "
                   f"the new tap was up; lost after that until re-attach: {len(lost_after_back)}; while stale: "
                   f"{redirected_while_stale} redirected, {no_target} left to the bridge as no_target; "
                   f"decoy on the old ifindex {old_tap} transmitted {decoy_tx}; status stale "
                   f"{t_attach - t_back:.1f} s until attach ({result.seconds * 1000:.0f} ms, refreshed); "
                   f"lost during the refresh ({result.record.hook}: a new link on the new tap, nothing grafted): "
                   f"{len(lost_in_refresh)}, after it: {len(lost_after_refresh)}")

    assert redirected_while_stale == 0, "nothing may be redirected while the target is gone"
    assert no_target > 0, "the program saw the VM's frames and left them to the bridge"
    assert decoy_tx == 0, "nothing may reach the device that took the old ifindex"
    assert first is not None and first - t_back < 0.1
    assert not lost_after_back, f"lost after the new tap was up: {lost_after_back[:10]}"
    assert final.state == "active" and moved(still.counters, final.counters, "to_vm") > 0.5 * rate * 0.9
    # With tcx the refresh creates a link on the new tap: no qdisc graft, so
    # not even the moments of the refresh may lose a frame.
    assert result.record.hook == "tcx"
    assert not lost_in_refresh and not lost_after_refresh
    sh("ip", "link", "del", "decoy", netns=nic.pod_ns)
    assert assert_one_attachment_or_none(spec.name, nic) == "active"


def clsact_markers(netns_id: str) -> set[str]:
    prefix = netns_id.replace(":", "-") + "-"
    try:
        return {m for m in os.listdir(tc.OWNER_DIR) if m.startswith(prefix)}
    except FileNotFoundError:
        return set()


@pytest.mark.parametrize("hook", ["tcx", "clsact"])
@pytest.mark.parametrize("cleanup", ["gc", "detach"])
def test_deleted_pod_is_orphaned_quietly_and_cleanup_leaves_nothing(pod, cleanup, hook, capsys):
    sb, nic, spec = pod
    spec = dataclasses.replace(spec, hook=hook)
    entries_before = pin_entries()
    progs_before, maps_before = loaded_ids("prog"), loaded_ids("map")
    record = attachments.attach(spec).record
    ids = instance_ids(attachments.pin_dir_of(spec.name))
    markers = clsact_markers(record.netns_id)
    # tcx adds no qdisc; with clsact we would add it to the tap and the NIC, and remember it.
    assert len(markers) == (2 if record.hook == "clsact" else 0)

    sh("ip", "netns", "delete", nic.pod_ns)  # the pod is deleted: its devices, filters and qdiscs go with it
    sb.netns_names.remove(nic.pod_ns)
    for _ in range(3):
        proc = run_cli("status")
        assert proc.returncode == 3 and proc.stderr == "", proc.stderr
    rows = status_rows(sb.tag)
    assert [(r["name"], r["state"], r["problems"]) for r in rows] == [
        (spec.name, "orphaned", ["the pod's network namespace is gone"])]

    if cleanup == "gc":
        first, second = run_cli("gc"), run_cli("gc")
        assert (first.returncode, first.stderr) == (0, "") and spec.name in first.stdout
        assert second.returncode == 0 and second.stderr == "" and spec.name not in second.stdout
    else:
        proc = run_cli("detach", spec.name)
        assert (proc.returncode, proc.stderr) == (0, "") and "detached" in proc.stdout
    assert status_rows(sb.tag) == []
    still_progs, still_maps = wait_until_freed(ids)
    progs_after, maps_after = loaded_ids("prog"), loaded_ids("map")
    report(capsys, f"pod deleted, cleaned up by {cleanup}: bpffs entries {len(entries_before)} -> "
                   f"{len(pin_entries())}; our {len(ids.progs)} programs and {len(ids.maps)} maps still loaded "
                   f"after: {len(still_progs)} / {len(still_maps)}; machine-wide loaded programs "
                   f"{len(progs_before)} -> {len(progs_after)}, maps {len(maps_before)} -> {len(maps_after)} "
                   f"(other processes may load some meanwhile); clsact markers {len(markers)} -> "
                   f"{len(clsact_markers(record.netns_id))}")
    assert pin_entries() == entries_before
    assert (still_progs, still_maps) == (set(), set())
    assert clsact_markers(record.netns_id) == set()


def test_detach_gc_and_failed_attaches_leave_no_lock_file_behind(pod):
    """One lock file per attachment name used to stay in /run/tcbypass/locks for good (L1)."""
    sb, nic, spec = pod
    lock = f"{attachments.LOCK_DIR}/{spec.name}.lock"
    with pytest.raises(TcbError):
        attachments.attach(dataclasses.replace(spec, tap="no-such-tap"))
    assert not os.path.exists(lock), f"{lock} is left behind by a failed attach"
    attachments.attach(spec)
    assert os.path.exists(lock)
    attachments.detach(spec.name)
    assert not os.path.exists(lock), f"{lock} is left behind by detach"
    attachments.attach(spec)
    sh("ip", "netns", "delete", nic.pod_ns)
    sb.netns_names.remove(nic.pod_ns)
    assert spec.name in run_cli("gc").stdout
    assert not os.path.exists(lock), f"{lock} is left behind by gc"


def test_vanished_tap_is_never_a_redirect_target(pod):
    """The kernel empties the devmap slot when the tap is unregistered, before
    anything else happens: checked right after `ip link del`."""
    sb, nic, spec = pod
    attachments.attach(spec)
    sb.block_bridge_unicast(nic)
    assert ping(nic.vm_ns, SERVER_IP, count=2, interval=0.05) == (2, 2), "the fast path carries the ping"
    old = health.status_of(spec.name).counters
    sh("ip", "link", "del", nic.tap, netns=nic.pod_ns)
    with AttachmentMaps(attachments.pin_dir_of(spec.name)) as m:
        assert m.tap() is None, "the slot of the vanished tap is empty at once"
    # Frames for the VM keep arriving on the NIC: left to the bridge, never redirected.
    sh("ping", "-c", "3", "-i", "0.05", "-W", "0.2", VM_IP, netns=sb.node, check=False)
    now = health.status_of(spec.name).counters
    assert now.redirect_packets["to_vm"] == old.redirect_packets["to_vm"]
    assert now.passed["no_target"] - old.passed["no_target"] == 3
