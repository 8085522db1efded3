"""deploy/: the manifests parse, carry what the agent needs, and call flags that exist."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import yaml

from tcbypass.cli import main

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"


def docs(name: str) -> list[dict]:
    return [d for d in yaml.safe_load_all((DEPLOY / name).read_text()) if d]


def test_every_manifest_is_valid_yaml_with_kind_and_name():
    for path in DEPLOY.glob("*.yaml"):
        for doc in docs(path.name):
            assert doc.get("apiVersion") and doc.get("kind") and doc["metadata"].get("name"), path


def test_daemonset_asks_for_the_host_access_the_agent_needs_and_no_more():
    """The minimum tests/image/test_daemonset_contract.py shows to be needed."""
    [ds] = [d for d in docs("daemonset.yaml") if d["kind"] == "DaemonSet"]
    pod = ds["spec"]["template"]["spec"]
    assert pod["hostNetwork"] is True and pod["hostPID"] is True
    [agent] = pod["containers"]
    security = agent["securityContext"]
    assert not security.get("privileged")
    assert security["capabilities"] == {"drop": ["ALL"], "add": ["NET_ADMIN", "SYS_ADMIN", "SYS_PTRACE"]}
    assert security["readOnlyRootFilesystem"] is True and security["seccompProfile"] == {"type": "RuntimeDefault"}
    mounts = {m["mountPath"]: m for m in agent["volumeMounts"]}
    assert set(mounts) == {"/sys/fs/bpf", "/run/openvswitch", "/var/run/netns", "/run/tcbypass"}, \
        "the image carries the program compiled: no /lib/modules, no /usr/src"
    assert all(m.get("mountPropagation", "None") != "Bidirectional" for m in mounts.values())
    volumes = {v["name"] for v in pod["volumes"]}
    assert {m["name"] for m in agent["volumeMounts"]} == volumes
    assert ds["spec"]["selector"]["matchLabels"].items() <= ds["spec"]["template"]["metadata"]["labels"].items()


def test_daemonset_runs_the_image_the_build_script_builds():
    [ds] = [d for d in docs("daemonset.yaml") if d["kind"] == "DaemonSet"]
    script = DEPLOY.parent / "scripts" / "build-image.sh"
    printed = subprocess.run([str(script), "--print-name"], capture_output=True, text=True, check=True,
                             env={k: v for k, v in os.environ.items() if k != "TCBYPASS_IMAGE"}).stdout.strip()
    assert ds["spec"]["template"]["spec"]["containers"][0]["image"] == printed


def test_daemonset_command_uses_flags_the_cli_has():
    [ds] = [d for d in docs("daemonset.yaml") if d["kind"] == "DaemonSet"]
    command = ds["spec"]["template"]["spec"]["containers"][0]["command"]
    assert command[:2] == ["tcbypass", "agent"]
    agent = main.commands["agent"]
    known = {opt for p in agent.params for opt in p.opts}
    assert {arg for arg in command[2:] if arg.startswith("--")} <= known


def test_binding_plugin_registration_uses_managed_tap():
    [kv] = [d for d in docs("kubevirt-binding.yaml") if d["kind"] == "KubeVirt"]
    binding = kv["spec"]["configuration"]["network"]["binding"]["tcbypass"]
    assert binding["domainAttachmentType"] == "managedTap"
    [vm] = [d for d in docs("kubevirt-binding.yaml") if d["kind"] == "VirtualMachine"]
    [iface] = vm["spec"]["template"]["spec"]["domain"]["devices"]["interfaces"]
    assert iface["binding"]["name"] == "tcbypass"
