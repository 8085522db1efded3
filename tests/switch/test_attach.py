"""Discovery, attach, status, status --all and detach against this datapath, for
each of Kube-OVN's pod NIC types: the node tool's whole cycle, as a node hook
runs it, with the fast path carrying the traffic both ways."""

from __future__ import annotations

import json

from tcbypass_lab.sandbox import ping
from tests.conftest import tc_state, tcp_exchange
from tests.switch.conftest import SERVER_IP


def test_attach_status_and_detach_leave_the_pod_exactly_as_it_was(pod):
    nic = pod.nic
    before = (tc_state(nic.pod_ns, nic.tap), tc_state(nic.pod_ns, nic.nic))
    proc = pod.cli("attach", "vm1", "-n", "prod")
    assert proc.returncode == 0, proc.stderr
    assert "prod/vm1 vm1.prod: attached (tap0 <-> eth0-nic" in proc.stdout
    again = pod.cli("attach", "vm1", "-n", "prod")
    assert again.returncode == 0 and "unchanged" in again.stdout

    row = pod.row()
    assert (row["state"], row["from_vm"], row["tap"], row["nic"], row["mac"]) == \
        ("active", pod.peer_mode, "tap0", "eth0-nic", nic.mac)
    pod.sb.block_bridge_unicast(nic)
    assert ping(nic.vm_ns, SERVER_IP, count=5) == (5, 5)
    assert tcp_exchange(nic.vm_ns, pod.server, SERVER_IP, 1 << 20) == (True, True)
    assert all(n >= 5 for n in pod.redirected())

    ports = pod.cli("status", "--all", "--json", "-n", "prod")
    assert ports.returncode == 0, ports.stderr
    [vm_port] = [r for r in json.loads(ports.stdout) if r["vmi"] == "vm1"]
    assert (vm_port["binding"], vm_port["state"]) == ("bridge", "active")
    if pod.nic_type == "internal-port":
        assert f"Kube-OVN's OVS internal port {nic.host_port}" in vm_port["reason"], vm_port["reason"]

    assert pod.cli("detach", "vm1", "-n", "prod", "--remove-qdisc").returncode == 0  # clsact: the qdisc too
    assert pod.cli("detach", "vm1", "-n", "prod").stdout.strip() == "vm1: not attached, nothing to do"
    assert (tc_state(nic.pod_ns, nic.tap), tc_state(nic.pod_ns, nic.nic)) == before
    assert json.loads(pod.cli("status", "--json", "-n", "prod").stdout) == []
