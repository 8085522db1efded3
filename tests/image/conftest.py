"""The agent's image and its DaemonSet, run for real: fixtures.

The image is built once per test session by scripts/build-image.sh (its
Debian layer is cached across sessions, so a rebuild after a code change
takes seconds). Nothing here skips: a missing tool on this machine kind is a
failure that names the fix.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from tcbypass import attachments, health, loader
from tcbypass_lab.container import AgentPod, Podman

REPO = Path(__file__).resolve().parents[2]
DAEMONSET = REPO / "deploy" / "daemonset.yaml"
SERVER_IP = "10.16.0.2"


@dataclass(frozen=True)
class BuiltImage:
    name: str
    manifest: str
    image_id: str
    seconds: float
    summary: str


def build_image() -> BuiltImage:
    started = time.monotonic()
    proc = subprocess.run([str(REPO / "scripts" / "build-image.sh")], capture_output=True, text=True, timeout=900)
    took = time.monotonic() - started
    if proc.returncode != 0:
        pytest.fail(f"scripts/build-image.sh failed ({proc.returncode}):\n{proc.stderr[-3000:]}", pytrace=False)
    manifest = re.search(r"manifest (sha256:[0-9a-f]{64})", proc.stderr)
    image_id = re.search(r"image id (sha256:[0-9a-f]{64})", proc.stderr)
    summary = "\n".join(line for line in proc.stderr.splitlines() if "build-image:" in line)
    assert manifest and image_id, proc.stderr
    return BuiltImage(proc.stdout.strip().splitlines()[-1], manifest.group(1), image_id.group(1), took, summary)


@pytest.fixture(scope="session")
def agent_pod() -> AgentPod:
    return AgentPod.from_daemonset(DAEMONSET)


@pytest.fixture(scope="session")
def agent_image(request) -> BuiltImage:
    """The image, built once for the session; the name the DaemonSet uses."""
    for tool, package in (("podman", "podman"), ("runc", "runc"), ("skopeo", "skopeo"), ("mmdebstrap", "mmdebstrap")):
        if shutil.which(tool) is None:
            pytest.fail(f"{tool} is missing on this machine: scripts/setup.sh installs it (Debian package {package})",
                        pytrace=False)
    built = build_image()
    capture = request.config.pluginmanager.getplugin("capturemanager")
    with capture.global_and_fixture_disabled():
        summary = built.summary.replace("\n", "\n    ")
        print(f"\n    [image] built in {built.seconds:.1f} s\n    {summary}")
    return built


@pytest.fixture
def podman():
    with Podman() as runner:
        yield runner


@dataclass
class Node:
    """The emulated node the DaemonSet's pod runs on, and the host paths that stand in for the node's."""

    sb: object
    host_paths: dict

    @property
    def netns(self) -> str:
        return self.sb.netns_path(self.sb.node)


def make_node(sb) -> Node:
    sb.add_server_pod("web", SERVER_IP, namespace="prod")
    # The node's bpffs is this run's (loader.BPFFS: $TCBYPASS_BPFFS, else /sys/fs/bpf); OVS's run
    # directory is the sandbox's private one. Every other hostPath is the machine's own.
    return Node(sb, {"/sys/fs/bpf": loader.BPFFS, "/run/openvswitch": sb.run_dir})


def detach_ours(sb) -> set[str]:
    """Detach every attachment of this sandbox's pods, including those whose
    namespace is named by a process (/proc/PID/ns/net) rather than by the sandbox."""
    found = set()
    for name in health.names():
        record = attachments.read_record(attachments.pin_dir_of(name))
        if record is not None and (f"/tcb{sb.tag}-" in record.netns or record.vmi.endswith(sb.tag)):
            found.add(name)
            attachments.detach(name, remove_qdisc=True)
    return found


@pytest.fixture
def node(ovs_node) -> Node:
    try:
        yield make_node(ovs_node)
    finally:
        detach_ours(ovs_node)


@pytest.fixture(scope="module")
def shared_node():
    """One node for a module's tests (each test cleans up its own attachments)."""
    from tcbypass_lab.sandbox import Sandbox

    with Sandbox() as sb:
        try:
            yield make_node(sb)
        finally:
            detach_ours(sb)
