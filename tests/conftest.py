"""Shared helpers for the root test layers (datapath, integration, vm).

Every object a test creates carries a random tag (see tcbypass.sandbox) and
is removed at teardown, also when the test fails.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tcbypass import attachments, loader
from tcbypass.model import name_of_pin
from tcbypass.sandbox import Sandbox, sh


def run_cli(*args: str, env: dict | None = None, timeout: float = 60) -> subprocess.CompletedProcess:
    """Run the installed CLI the way a user or a node hook does."""
    return subprocess.run([sys.executable, "-m", "tcbypass", *args], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **(env or {})})


def status_json(*args: str) -> list[dict]:
    proc = run_cli("status", "--json", *args)
    assert proc.returncode in (0, 3), proc.stderr
    return json.loads(proc.stdout)


def pins(containing: str = "") -> set[str]:
    """Attachment directories in bpffs (only those whose name contains `containing`)."""
    try:
        return {p for p in os.listdir(loader.PIN_ROOT) if containing in p}
    except FileNotFoundError:
        return set()


def tc_state(netns: str, dev: str) -> str:
    """Everything tc shows on a device: qdiscs and filters both ways."""
    out = [sh("tc", "qdisc", "show", "dev", dev, netns=netns).stdout]
    for hook in ("ingress", "egress"):
        out.append(sh("tc", "filter", "show", "dev", dev, hook, netns=netns, check=False).stdout)
    return "\n".join(out)


@pytest.fixture
def attachment_guard():
    """Detach whatever a test attached, even when it fails, and report leaks."""
    before = pins()
    yield
    for name in sorted(pins() - before):
        if not name.endswith(attachments.STAGING):
            attachments.detach(name_of_pin(name))
    leaked = pins() - before
    for name in leaked:
        loader.remove_pins(f"{loader.PIN_ROOT}/{name}")
    assert not leaked, f"pins left behind: {leaked}"


@pytest.fixture
def ovs_node(attachment_guard):
    """A node with a private OVS (its own ovsdb-server and ovs-vswitchd)."""
    with Sandbox(ovs=True) as sb:
        yield sb


@pytest.fixture
def bare_node(attachment_guard):
    """A node without OVS: the pod's veth ends in the node namespace."""
    with Sandbox(ovs=False) as sb:
        yield sb
