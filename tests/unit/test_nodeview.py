"""The node-wide view: plans (from recorded pods) merged with the attachments' statuses."""

from __future__ import annotations

import dataclasses

from prometheus_client import generate_latest

from tcbypass import metrics, nodeview
from tcbypass.discovery import plan_nic
from tcbypass.errors import NetnsError
from tcbypass.model import Record, Status
from tests.unit.snapshots import load

PODS = load()


def plans(*names):
    return [(PODS[n][0], plan_nic(PODS[n][0], PODS[n][1], PODS[n][2])) for n in names]


def status(name, state="active", problems=(), **record):
    base = dict(name=name, netns="/var/run/netns/p", netns_id="4:1", tap="tap0", tap_ifindex=5, nic="eth0-nic",
                nic_ifindex=3, bridge="k6t-eth0", bridge_mac="0a:bb:00:00:00:03", mac="0a:00:00:00:00:05",
                dhcp_to_bridge=True, digest="d", vmi=name.split(".")[0], namespace="prod", iface_id=name,
                complete=True)
    return Status(Record(**(base | record)), state, tuple(problems))


def by_vmi(rows):
    return {row.vmi: row for row in rows}


def test_one_row_per_vm_port_and_none_for_ordinary_pods():
    rows = by_vmi(nodeview.rows(plans(*PODS), []))
    assert set(rows) == set(PODS) - {"web"}
    assert {vmi: (r.binding, r.state) for vmi, r in rows.items()} == {
        "vm-bridge": ("bridge", "not attached"),
        "vm-mtap": ("managedTap", "not attached"),
        "vm-masq": ("masquerade", "not bypassable"),
        "vm-passt": ("passt", "not bypassable"),
        "vm-slirp": ("slirp", "not bypassable"),
        "vm-mvtap": ("macvtap", "not bypassable"),
        "vm-sriov": ("sriov", "not bypassable"),
        "vm-direct": ("kube-ovn-direct", "not bypassable"),
        "vm-pending": ("pending", "not attached"),
        "vm-2taps": ("bridge", "not bypassable"),
    }


def test_bypassable_and_not_attached_says_how_to_attach():
    [row] = nodeview.rows(plans("vm-bridge"), [])
    assert row.reason.endswith("; attach with: tcbypass attach vm-bridge -n prod")
    assert (row.nic, row.port, row.attachment) == ("vm-bridge.prod", PODS["vm-bridge"][0].name, "")


def test_attached_ports_take_the_attachments_state():
    rows = by_vmi(nodeview.rows(plans("vm-bridge", "vm-mtap"), [
        status("vm-bridge.prod"), status("vm-mtap.prod", "stale", ["tap tap0 is now ifindex 9 (was 5)"])]))
    assert (rows["vm-bridge"].state, rows["vm-bridge"].reason) == ("active", "fast path live (tap0 <-> eth0-nic)")
    assert rows["vm-bridge"].attachment == "vm-bridge.prod"
    assert (rows["vm-mtap"].state, rows["vm-mtap"].reason) == ("stale", "tap tap0 is now ifindex 9 (was 5)")


def test_direct_and_pending_reasons_lead_with_what_they_are():
    rows = by_vmi(nodeview.rows(plans("vm-direct", "vm-pending"), []))
    assert rows["vm-direct"].reason.startswith("already direct: the VM's tap ")
    assert rows["vm-pending"].reason.startswith("still being plugged: eth0 carries the pod's network")


def test_an_attachment_left_on_a_port_that_cannot_be_bypassed_any_more_is_stale():
    [row] = nodeview.rows(plans("vm-2taps"), [status("vm-2taps.prod")])
    assert row.state == "stale" and row.reason.startswith("attached, but now bridge binding, not bypassable:")


def test_attachments_whose_port_is_gone_are_listed_and_explicit_ones_are_not():
    rows = nodeview.rows([], [status("gone.prod", "orphaned", ["the pod's network namespace is gone"]),
                              status("manual", iface_id="", vmi="", namespace="")])
    [row] = rows
    assert (row.vmi, row.nic, row.binding, row.state) == ("gone", "gone.prod", "-", "orphaned")
    assert row.reason == "no Kube-OVN port for it on this node any more; the pod's network namespace is gone"
    assert nodeview.rows([], [status("gone.prod", "orphaned")], namespace="other") == []


def test_an_unreadable_pod_shows_only_when_something_of_ours_is_on_it():
    port = PODS["vm-bridge"][0]
    error = NetnsError("the pod network namespace of vm-bridge (/x) is gone")
    assert nodeview.rows([(port, error)], []) == []
    [row] = nodeview.rows([(port, error)], [status("vm-bridge.prod", "orphaned", ["the pod's netns is gone"])])
    assert (row.binding, row.state) == ("unknown", "orphaned")
    assert row.reason.startswith("the pod network namespace of vm-bridge (/x) is gone")


def test_rows_are_sorted_by_namespace_vmi_nic():
    rows = nodeview.rows(list(reversed(plans(*PODS))), [])
    assert [r.vmi for r in rows] == sorted(r.vmi for r in rows)


def test_gauge_counts_vm_ports_by_binding_and_state_with_every_pair_present():
    rows = nodeview.rows(plans(*PODS), [status("vm-bridge.prod")])
    reg = metrics.registry(statuses=lambda: [], ports=lambda: rows)
    text = generate_latest(reg).decode()
    assert 'tcbypass_vm_ports{binding="bridge",state="active"} 1.0' in text
    assert 'tcbypass_vm_ports{binding="bridge",state="not bypassable"} 1.0' in text  # the two-tap pod
    assert 'tcbypass_vm_ports{binding="masquerade",state="not bypassable"} 1.0' in text
    assert 'tcbypass_vm_ports{binding="kube-ovn-direct",state="not bypassable"} 1.0' in text
    assert 'tcbypass_vm_ports{binding="pending",state="not attached"} 1.0' in text
    assert 'tcbypass_vm_ports{binding="passt",state="active"} 0.0' in text
    samples = [line for line in text.splitlines() if line.startswith("tcbypass_vm_ports{")]
    assert len(samples) == (len(metrics.bindings.BINDINGS) + 1) * len(nodeview.STATES)
    assert sum(float(line.rsplit(" ", 1)[1]) for line in samples) == len(rows)


def test_gauge_is_left_out_when_the_ports_cannot_be_read():
    def broken():
        raise NetnsError("cannot read")
    text = generate_latest(metrics.registry(statuses=lambda: [], ports=broken)).decode()
    assert "tcbypass_vm_ports" not in text and "tcbypass_attachment_state" in text


def test_row_json_keys_are_stable():
    [row] = nodeview.rows(plans("vm-masq"), [])
    assert list(row.to_json()) == ["vmi", "namespace", "nic", "binding", "state", "reason", "port", "netns",
                                   "attachment"]
    assert dataclasses.asdict(row) == row.to_json()


def test_cached_ports_never_make_a_scrape_wait_for_the_survey():
    import threading

    release, calls = threading.Event(), []

    def slow_survey():
        calls.append(1)
        release.wait(5)
        return nodeview.rows(plans("vm-masq"), [])

    cache = metrics.CachedPorts(slow_survey, refresh=3600)
    assert cache() is None, "the first scrape does not wait for the first survey"
    assert cache() is None and len(calls) == 1, "one survey at a time"
    release.set()
    cache.wait(5)
    [row] = cache()
    assert row.binding == "masquerade" and len(calls) == 1, "fresh enough: no new survey"


def test_cached_ports_survey_again_once_stale_and_forget_rows_after_a_failure():
    results = [nodeview.rows(plans("vm-masq"), []), NetnsError("OVSDB went away")]

    def survey():
        result = results.pop(0)
        if isinstance(result, Exception):
            raise result
        return result

    cache = metrics.CachedPorts(survey, refresh=0)
    cache()
    cache.wait(5)
    assert [r.binding for r in cache()] == ["masquerade"]  # this call starts the second survey
    cache.wait(5)
    assert cache() is None, "rows from before a failed survey are not served as current"
