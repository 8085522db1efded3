"""Shared helpers for the root test layers (datapath, integration, vm).

Every object a test creates carries a random tag (see tcbypass.lab.sandbox) and
is removed at teardown, also when the test fails.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tcbypass import attachments, loader
from tcbypass.lab.sandbox import Sandbox, sh


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


def detach_sandbox_attachments(sb: Sandbox) -> set[str]:
    """Detach every attachment whose pod namespace belongs to `sb` (and only those:
    other processes may be attaching on this machine at the same time)."""
    found = set()
    for name in attachments.names():
        record = attachments.read_record(attachments.pin_dir_of(name))
        if record is not None and f"/tcb{sb.tag}-" in record.netns:
            found.add(name)
            attachments.detach(name, remove_qdisc=True)
    return found


def _node(ovs: bool):
    with Sandbox(ovs=ovs) as sb:
        try:
            yield sb
        finally:
            detach_sandbox_attachments(sb)


@pytest.fixture
def ovs_node():
    """A node with a private OVS (its own ovsdb-server and ovs-vswitchd)."""
    yield from _node(ovs=True)


@pytest.fixture
def bare_node():
    """A node without OVS: the pod's veth ends in the node namespace."""
    yield from _node(ovs=False)
