"""A node with a hundred VM pods: the agent, starting with all of them
plugged, attaches every one, and detaching them all leaves no pin, lock
file, program or map behind. The scale bench's agent phase does the work;
nothing here asserts a timing (`tcbypass-lab bench scale` reports those).

About a minute and a half here: building the 100 pods on userspace OVS is
most of it.
"""

from __future__ import annotations

import pytest

from tcbypass_lab import scale

VMS = 100


@pytest.mark.root
def test_agent_attaches_a_hundred_plugged_pods_and_detaching_all_leaves_nothing(capsys):
    report = scale.run(scale.ScalePlan(vms=VMS, phases=("agent",), status_runs=1, checkpoint_samples=0))

    agent = report["agent"]
    assert agent["active"] == VMS and len(agent["timeline_s"]) == VMS
    assert agent["status"]["rows"] == VMS and agent["status"]["active"] == VMS
    assert agent["exit_code"] == 0 and agent["metrics_scrape_ok"]
    memory = report["memory"]
    assert (memory["programs_per_attachment"], memory["maps_per_attachment"]) == (2, 4)
    assert memory["per_attachment_bytes"]["min"] > 0
    left = report["leftovers"]["agent"]
    assert (left["programs_checked"], left["maps_checked"]) == (2 * VMS, 4 * VMS)
    assert left == {**left, "pins": 0, "locks": 0, "programs": 0, "maps": 0, "clean": True}
    with capsys.disabled():
        print(f"\n    [scale] {VMS} pods built in {report['build']['seconds']:.0f} s; agent had all attached "
              f"after {agent['all_attached_s']:.1f} s; VmHWM {agent['memory']['hwm_mib']} MiB; "
              f"{report['seconds']:.0f} s in all")
