"""Compile once, load many: the object cache with the real compiler and kernel.

- Two processes compiling at the same moment end with one valid entry (and
  one compile: the second waits for the first and takes its entry).
- A cached object the kernel refuses is rebuilt, with one log line.
- A prepared node needs neither bcc nor kernel headers: `attach`, the
  refresh after a VM restart, `detach` and the agent all work with bcc made
  unimportable and the headers pointed nowhere. Without a prepared build
  there, the error says what to run.
"""

from __future__ import annotations

import base64
import hashlib
import json
import subprocess
import sys
import textwrap

import pytest

from tcbypass import attachments, build
from tcbypass_lab.sandbox import wait_for_ping
from tcbypass.model import AttachSpec
from tests.conftest import RunningAgent, pins, run_cli, status_json

from .test_agent import SERVER_IP

pytestmark = pytest.mark.root


def entries(cache) -> list[str]:
    return sorted(p.name for p in cache.iterdir() if not p.name.startswith(".lock-"))


def test_two_processes_compiling_at_once_end_with_one_valid_entry(tmp_path):
    cache = tmp_path / "cache"
    code = textwrap.dedent("""
        import logging, sys
        logging.basicConfig(level=logging.INFO, stream=sys.stdout, format="%(message)s")
        from tcbypass import attachments, build
        build.get(build.Build())
    """)
    env = {"TCBYPASS_CACHE_DIR": str(cache), "PATH": "/usr/bin:/bin"}
    procs = [subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for _ in range(2)]
    outputs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs
    assert sum("compiled build" in out for out, _ in outputs) == 1, "one compiles, the other takes its entry"
    assert entries(cache) == [build.cache_path(build.Build(), cache).name], "one entry, no temporary file"
    assert build.Object.from_json(build.cache_path(build.Build(), cache).read_text()).key == build.key(build.Build())


def test_a_cached_object_the_kernel_refuses_is_rebuilt(tmp_path, bare_node, monkeypatch, caplog):
    """An entry whose checksum is sound but whose code the verifier refuses
    (here: a program that reads r0 before writing it) is compiled again."""
    cache = tmp_path / "cache"
    monkeypatch.setenv(build.ENV_CACHE_DIR, str(cache))
    good = build.get(build.Build())
    bad_code = bytes([0x95, 0, 0, 0, 0, 0, 0, 0])  # exit, with r0 never set
    data = json.loads(good.to_json())["object"]
    for prog in data["programs"]:
        prog["insns"], prog["relocs"] = base64.b64encode(bad_code).decode(), []
    checksum = hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()
    bad = build.Object.from_json(json.dumps({"checksum": checksum, "object": data}))
    build.store(bad)

    sb = bare_node
    [nic] = sb.add_vm("vm1", ["10.16.0.5"])
    spec = AttachSpec(name=f"rb-{sb.tag}", netns=sb.netns_path(nic.pod_ns), tap=nic.tap, nic=nic.nic, mac=nic.mac)
    try:
        assert attachments.attach(spec).action == "attached"
        assert "the kernel refused cached build" in caplog.text and "rebuilding it" in caplog.text
        assert build.cached(build.Build()) == good, "the entry is sound again"
    finally:
        attachments.detach(spec.name)


@pytest.fixture
def no_compiler(tmp_path) -> dict:
    """The environment of a node without bcc and without kernel headers: bcc
    cannot be imported (a stand-in package that refuses first on the path)
    and bcc's header search points at an empty directory."""
    fake = tmp_path / "no-bcc" / "bcc"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("raise ImportError('bcc is not installed on this node')\n")
    (tmp_path / "no-headers").mkdir()
    return {"PYTHONPATH": str(tmp_path / "no-bcc"), "BCC_KERNEL_SOURCE": str(tmp_path / "no-headers")}


def test_without_a_prepared_build_the_error_says_what_to_run(tmp_path, bare_node, no_compiler):
    sb = bare_node
    [nic] = sb.add_vm("vm1", ["10.16.0.5"])
    env = {**no_compiler, "TCBYPASS_CACHE_DIR": str(tmp_path / "empty")}
    proc = run_cli("attach", "--netns", sb.netns_path(nic.pod_ns), "--tap", nic.tap, "--nic", nic.nic,
                   "--mac", nic.mac, "--name", f"np-{sb.tag}", env=env)
    assert proc.returncode == 1 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert "bcc is not installed, and no prepared build" in proc.stderr and "tcbypass prepare" in proc.stderr
    assert not pins(f"np-{sb.tag}")


def test_a_prepared_node_attaches_refreshes_and_detaches_without_bcc_or_headers(tmp_path, bare_node, no_compiler):
    cache = tmp_path / "prepared"
    prepared = run_cli("prepare", "--cache-dir", str(cache))
    assert prepared.returncode == 0 and len(entries(cache)) == 2, prepared.stdout + prepared.stderr
    env = {**no_compiler, "TCBYPASS_CACHE_DIR": str(cache)}
    sb = bare_node
    [nic] = sb.add_vm("vm1", ["10.16.0.5"])
    sb.serve_on_host_port(nic, "10.16.0.2")
    args = ("attach", "--netns", sb.netns_path(nic.pod_ns), "--tap", nic.tap, "--nic", nic.nic, "--mac", nic.mac,
            "--name", f"pp-{sb.tag}")
    try:
        first = run_cli(*args, env=env)
        assert first.returncode == 0 and "attached" in first.stdout, first.stderr
        sb.restart_vm(nic)
        again = run_cli(*args, env=env)
        assert again.returncode == 0 and "refreshed" in again.stdout, again.stderr
        [row] = [r for r in status_json() if r["name"] == f"pp-{sb.tag}"]
        assert row["state"] == "active"
        sb.block_bridge_unicast(nic)
        assert wait_for_ping(nic.vm_ns, "10.16.0.2"), "the fast path carries the restarted VM"
        doctor = run_cli("doctor", env=env)
        assert doctor.returncode == 0 and "prepared:" in doctor.stdout, doctor.stdout
    finally:
        gone = run_cli("detach", f"pp-{sb.tag}", env=env)
    assert gone.returncode == 0 and "detached" in gone.stdout, gone.stderr
    assert not pins(f"pp-{sb.tag}")


def test_the_agent_runs_from_a_prepared_build_without_bcc_or_headers(tmp_path, ovs_node, no_compiler, monkeypatch):
    cache = tmp_path / "prepared"
    assert run_cli("prepare", "--cache-dir", str(cache)).returncode == 0
    for key, value in {**no_compiler, "TCBYPASS_CACHE_DIR": str(cache)}.items():
        monkeypatch.setenv(key, value)  # the agent's environment
    ovs_node.add_server_pod("web", SERVER_IP, namespace="prod")
    agent = RunningAgent(ovs_node)
    try:
        [nic] = ovs_node.add_vm("vm1", ["10.16.0.5"], namespace="prod")
        agent.wait_for(lambda: [r["state"] for r in status_json("vm1", "-n", "prod")] == ["active"], "vm1 active")
        assert wait_for_ping(nic.vm_ns, SERVER_IP)
    finally:
        assert agent.stop() == 0
