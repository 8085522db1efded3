"""The short soak (the lab's `tcbypass-lab soak --ci`): 200 pod lifecycles of every
kind next to 20 long-lived VM pods carrying traffic, the agent watched throughout.

Asserted: nothing lost, every lifecycle completed, the kernel's objects, the pins,
the run directory and the agent's fds, threads and memory back where they started,
no unexpected error. The latencies are printed, not asserted (the long soak's
figures, measured on an idle machine, are in docs/reliability.md).
"""

from __future__ import annotations

import pytest

from tcbypass_lab import soak
from tests.reliability.conftest import report as say

pytestmark = pytest.mark.root


def test_a_short_soak_loses_nothing_and_leaves_every_resource_where_it_started(capsys):
    plan = soak.ci_plan()
    report = soak.run(plan)
    life, agent = report["lifecycles"], report["agent"]
    say(capsys, f"soak: {life['total']} lifecycles ({life['by_kind']}) in {report['churn_seconds']:.0f} s; "
                f"attach p50/p99 {life['attach_s'].get('p50')}/{life['attach_s'].get('p99')} s, cleanup p99 "
                f"{life['cleanup_s'].get('p99')} s, hotplug p99 {life['hotplug_s'].get('p99')} s; streams "
                f"{report['streams']['lost']} lost of {report['streams']['sent']}, pings {report['pings']['lost']} "
                f"lost of {report['pings']['sent']}; agent {agent['cpu_s_per_1000_lifecycles']} s CPU per 1000; "
                f"baseline -> final: " + ", ".join(f"{k} {v['baseline']} -> {v['final']}"
                                                   for k, v in report["flat"].items()))
    assert life["total"] == plan.lifecycles and all(life["by_kind"].values()), life
    judged = {check["target"]: check for check in report["judged"]}
    for target in ("long-lived pods lose nothing (streams and pings)", "every lifecycle completed",
                   "kernel objects, pins and run entries back to the baseline",
                   "agent memory back to within 5 MiB of the baseline", "agent fds and threads back to the baseline",
                   "no unexpected error in the agent"):
        assert judged[target]["pass"], judged[target]
    assert report["agent_exit"] == 0
