"""`tcbypass-lab bench --datapath`: the bench's scenarios built on a node with its
own Open vSwitch, the peer a pod on br-int, so that a user with openvswitch.ko
measures the path their nodes take. Under TCG (the kernel matrix's guests)
timings mean nothing; what must hold is that each scenario's traffic takes
the path it is named for, on the datapath asked for, and that nothing stays.
"""

from __future__ import annotations

import json

from tcbypass_lab.ovs import SYSTEM, choose_datapath
from tcbypass_lab.sandbox import sh
from tests.conftest import pins, run_lab

SCENARIOS = ("direct", "bridge", "bypass", "minimal")


def bench_netns() -> set[str]:
    return {line.split()[0] for line in sh("ip", "netns", "list").stdout.splitlines() if "-bench" in line}


def test_every_scenario_takes_its_path_through_the_nodes_own_switch(tmp_path, datapath_reported):
    datapath = choose_datapath()
    datapath_reported[:] = [datapath]
    netns_before, pins_before = bench_netns(), pins("bench-")
    out = tmp_path / "paths.json"
    proc = run_lab("bench", "--paths-only", "--datapath", datapath, "--scenarios", ",".join(SCENARIOS),
                   "--json", str(out), timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    data = json.loads(out.read_text())
    assert data["machine"]["datapath"].startswith(f"OVS {datapath} datapath")
    assert f"OVS {datapath} datapath" in proc.stdout
    paths = {p["scenario"]: p for p in data["paths"]}
    assert set(paths) == set(SCENARIOS) and all(p["ok"] and p["replies"] == p["pings"] for p in paths.values())
    # On the kernel datapath the host side is a switch port: every frame goes by peer.
    assert paths["bypass"]["mode"] == ("peer" if datapath == SYSTEM else "peer-host"), paths["bypass"]
    assert paths["bypass"]["from_vm"] >= paths["bypass"]["pings"] <= paths["bypass"]["to_vm"]
    assert "results" not in data or not data["results"], "--paths-only measures nothing"
    assert bench_netns() - netns_before == set(), "namespaces left behind"
    assert pins("bench-") == pins_before
