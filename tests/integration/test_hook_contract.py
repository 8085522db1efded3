"""The post-plug contract in docs/hooks.md, run as a node hook would run it."""

from __future__ import annotations

import json
import time

from tcbypass.lab.sandbox import ping, sh, wait_for_ping
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
