"""deploy/: the manifests parse, carry what the agent needs, and call flags that exist."""

from __future__ import annotations

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


def test_daemonset_has_the_host_access_the_agent_needs():
    [ds] = [d for d in docs("daemonset.yaml") if d["kind"] == "DaemonSet"]
    pod = ds["spec"]["template"]["spec"]
    assert pod["hostNetwork"] is True and pod["hostPID"] is True
    [agent] = pod["containers"]
    assert agent["securityContext"]["privileged"] is True
    mounts = {m["mountPath"] for m in agent["volumeMounts"]}
    assert {"/sys/fs/bpf", "/run/openvswitch", "/var/run/netns", "/lib/modules", "/usr/src",
            "/run/tcbypass"} <= mounts
    volumes = {v["name"] for v in pod["volumes"]}
    assert {m["name"] for m in agent["volumeMounts"]} <= volumes
    assert ds["spec"]["selector"]["matchLabels"].items() <= ds["spec"]["template"]["metadata"]["labels"].items()


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
