"""The post-plug contract in docs/hooks.md, run as a node hook would run it."""

from __future__ import annotations

import json
import time

import pytest

from tcbypass_lab import wirings
from tcbypass_lab.sandbox import ping, sh, wait_for_ping
from tests.conftest import pins, run_cli

SERVER_IP = "10.16.0.2"


def env_of(sb, ovsdb=None) -> dict:
    return {"TCBYPASS_OVSDB": ovsdb or sb.ovsdb_url, "TCBYPASS_OVS_NETNS": sb.netns_path(sb.node)}


def test_post_plug_attach_is_idempotent_and_cheap_when_repeated(ovs_node, capsys):
    sb = ovs_node
    sb.add_server_pod("web", SERVER_IP, namespace="prod")
    sb.add_vm("vm1", ["10.16.0.5"], namespace="prod")
    timings = []
    for _ in range(3):
        started = time.monotonic()
        proc = run_cli("attach", "vm1", "-n", "prod", env=env_of(sb))
        timings.append(time.monotonic() - started)
        assert proc.returncode == 0, proc.stderr
    with capsys.disabled():
        print(f"\n    [hook] attach via the CLI, wall time incl. Python start-up: first {timings[0]:.2f} s, "
              f"repeated {timings[1]:.2f} s / {timings[2]:.2f} s")
    proc = run_cli("status", "vm1", "-n", "prod", "--json", env=env_of(sb))
    assert proc.returncode == 0 and json.loads(proc.stdout)[0]["state"] == "active"


def test_a_failed_attach_leaves_the_vm_on_the_bridge(ovs_node):
    sb = ovs_node
    sb.add_server_pod("web", SERVER_IP, namespace="prod")
    [nic] = sb.add_vm("vm2", ["10.16.0.6"], namespace="prod")
    proc = run_cli("attach", "vm2", "-n", "prod", env=env_of(sb, ovsdb=f"unix:{sb.run_dir}/down.sock"))
    assert proc.returncode == 1 and proc.stderr.startswith("error: no OVSDB socket")
    assert not pins("vm2")
    assert wait_for_ping(nic.vm_ns, SERVER_IP), "the VM keeps its network through the bridge"


def test_teardown_detach_succeeds_whatever_the_state(ovs_node):
    sb = ovs_node
    [nic] = sb.add_vm("vm3", ["10.16.0.7"], namespace="prod")
    assert run_cli("detach", "vm3", "-n", "prod").returncode == 0, "nothing attached yet"
    assert run_cli("attach", "vm3", "-n", "prod", env=env_of(sb)).returncode == 0
    sh("ip", "netns", "delete", nic.pod_ns)  # the pod went first
    sb.netns_names.remove(nic.pod_ns)
    proc = run_cli("detach", "vm3", "-n", "prod")  # no OVSDB needed
    assert proc.returncode == 0 and "detached" in proc.stdout
    assert not pins("vm3")


def test_post_migration_target_attaches_the_new_pod(ovs_node):
    sb = ovs_node
    sb.add_server_pod("web", SERVER_IP, namespace="prod")
    [old] = sb.add_vm("vm4", ["10.16.0.8"], namespace="prod")
    assert run_cli("attach", "vm4", "-n", "prod", env=env_of(sb)).returncode == 0
    # The migration lands: the source pod goes away, a new virt-launcher pod serves the VMI.
    sb.vsctl("del-port", sb.bridge, old.host_port)
    sh("ip", "netns", "delete", old.pod_ns)
    sb.netns_names.remove(old.pod_ns)
    [new] = sb.add_vm("vm4", ["10.16.0.8"], namespace="prod")
    proc = run_cli("attach", "vm4", "-n", "prod", env=env_of(sb))
    assert proc.returncode == 0 and "refreshed" in proc.stdout, proc.stdout + proc.stderr
    [row] = json.loads(run_cli("status", "vm4", "-n", "prod", "--json").stdout)
    assert row["state"] == "active" and row["netns"] == sb.netns_path(new.pod_ns)
    sb.block_bridge_unicast(new)
    assert ping(new.vm_ns, SERVER_IP, count=3) == (3, 3)


# --- exit codes a hook sees for each binding (docs/hooks.md) ----------------------------------------

HEALTHY_WITHOUT_BRIDGE = {
    "masquerade": lambda sb: wirings.masquerade_vm(sb, "vm5", "10.16.0.9", "fd00:10:16::9", "prod"),
    "passt": lambda sb: wirings.passt_vm(sb, "vm5", "10.16.0.9", "prod"),
    "slirp": lambda sb: wirings.slirp_vm(sb, "vm5", "10.16.0.9", "prod"),
    "macvtap": lambda sb: wirings.macvtap_vm(sb, "vm5", "10.16.0.9", "prod"),
    "sriov": lambda sb: wirings.sriov_vm(sb, "vm5", "10.16.0.9", "prod"),
    "kube-ovn-direct": lambda sb: wirings.kubeovn_tap_vm(sb, "vm5", "10.16.0.9", "prod"),
}


@pytest.mark.parametrize("binding", sorted(HEALTHY_WITHOUT_BRIDGE))
def test_post_plug_attach_on_a_healthy_binding_without_a_bridge_exits_0(ovs_node, binding):
    """A hook that fails on non-zero must not fail the start of a masquerade, passt, macvtap,
    SR-IOV or Kube-OVN-direct VM: nothing is wrong with it, there is just nothing to bypass."""
    sb = ovs_node
    pod = HEALTHY_WITHOUT_BRIDGE[binding](sb)
    proc = run_cli("attach", "vm5", "-n", "prod", env=env_of(sb))
    assert (proc.returncode, proc.stderr) == (0, ""), proc.stderr
    [line] = proc.stdout.splitlines()
    assert line.startswith(f"prod/vm5 vm5.prod: {binding} binding, ") and line.endswith("; nothing to do")
    assert not pins("vm5")
    proc = run_cli("status", "vm5", "-n", "prod", "--json")  # the hook's check: nothing attached, nothing degraded
    assert (proc.returncode, json.loads(proc.stdout)) == (0, [])
    assert pod.binding == binding


def test_post_plug_attach_before_the_pod_is_plugged_exits_1(ovs_node):
    sb = ovs_node
    wirings.pending_vm(sb, "vm6", "10.16.0.10", "prod")
    proc = run_cli("attach", "vm6", "-n", "prod", env=env_of(sb))
    assert proc.returncode == 1 and proc.stdout == ""
    assert proc.stderr.startswith("error: VMI prod/vm6 has no bypassable NIC (vm6.prod: no binding yet, the pod is "
                                  "still being plugged")
    assert not pins("vm6")


def test_post_plug_attach_on_an_unknown_vmi_exits_1(ovs_node):
    sb = ovs_node
    wirings.masquerade_vm(sb, "vm7", "10.16.0.11", "fd00:10:16::11", "prod")
    proc = run_cli("attach", "nosuchvm", "-n", "prod", env=env_of(sb))
    assert proc.returncode == 1 and proc.stderr.startswith("error: no VMI 'nosuchvm' in namespace 'prod'")
    assert "vm7" in proc.stderr


def test_post_plug_attach_when_the_pod_is_gone_exits_1(ovs_node):
    sb = ovs_node
    pod = wirings.passt_vm(sb, "vm8", "10.16.0.12", "prod")
    sh("ip", "netns", "delete", pod.pod_ns)
    sb.netns_names.remove(pod.pod_ns)
    proc = run_cli("attach", "vm8", "-n", "prod", env=env_of(sb))
    assert proc.returncode == 1 and "pod network namespace of vm8" in proc.stderr and "is gone" in proc.stderr
