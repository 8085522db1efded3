"""Emulated nodes with state of their own, and the link that joins their switches.

An `EmulatedNode` is a sandbox (namespaces, a private Open vSwitch) plus what
tcbypass keeps on a node: a bpffs mount and a run directory of its own, and
its agent. Two of them on one machine never see each other's pins, locks or
probes, as two nodes of a cluster do not. `join` links their br-ints the way
a cluster's tunnel does, so a VM that moves from one to the other keeps its
peers: each switch learns where the VM's MAC went from the frames it sees
(the RARP QEMU sends after a migration among them), which stands in for OVN
moving the port's binding on that RARP (activation-strategy=rarp).
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import subprocess
import time
from dataclasses import dataclass, field
from typing import Iterator

from tcbypass import attachments
from tcbypass.maps import PIN_LAYOUT
from tcbypass.model import pin_id

from .agentproc import AgentProcess, cli_command
from .sandbox import Sandbox, sh


@dataclass
class EmulatedNode:
    name: str
    sb: Sandbox
    root: str  # this node's private directory: its bpffs mount and run directory
    agent: AgentProcess | None = None
    _mounted: bool = field(default=False, repr=False)

    @classmethod
    @contextlib.contextmanager
    def up(cls, name: str = "node", datapath: str = "") -> Iterator["EmulatedNode"]:
        """A node, torn down (agent, pods, switch, mounts) when the block ends."""
        node = cls(name, Sandbox(ovs=True, datapath=datapath), f"/run/tcbypass-{name}-{secrets.token_hex(3)}")
        try:
            os.makedirs(node.bpffs)
            sh("mount", "-t", "bpf", "bpf", node.bpffs)
            node._mounted = True
            node.sb.__enter__()
            yield node
        finally:
            node.stop_agent()
            node.sb.close()
            if node._mounted:
                sh("umount", node.bpffs, check=False)
            shutil.rmtree(node.root, ignore_errors=True)

    @property
    def bpffs(self) -> str:
        return f"{self.root}/bpffs"

    @property
    def run_dir(self) -> str:
        return f"{self.root}/run"

    @property
    def env(self) -> dict:
        """What tcbypass on this node is told: its OVSDB, OVS's namespace, its bpffs and run directory."""
        return {"TCBYPASS_BPFFS": self.bpffs, "TCBYPASS_RUN_DIR": self.run_dir, "TCBYPASS_OVSDB": self.sb.ovsdb_url,
                "TCBYPASS_OVS_NETNS": self.sb.netns_path(self.sb.node)}

    # --- the agent ---------------------------------------------------------------------------
    def start_agent(self, *extra: str) -> AgentProcess:
        self.agent = AgentProcess.on(self.sb, *extra, env=self.env, log_name=f"agent-{self.name}.log")
        deadline = time.monotonic() + 30
        while self.agent.metrics_text(timeout=1) is None:
            if time.monotonic() > deadline or not self.agent.alive():
                raise RuntimeError(f"the agent of {self.name} did not start; see {self.agent.log_path}")
            time.sleep(0.05)
        return self.agent

    def stop_agent(self) -> int | None:
        agent, self.agent = self.agent, None
        return agent.stop() if agent is not None else None

    # --- what tcbypass holds on this node ----------------------------------------------------
    def pin_dir(self, name: str) -> str:
        return f"{self.bpffs}/tcbypass/{PIN_LAYOUT}/{pin_id(name)}"

    def record(self, name: str):
        """The attachment record of `name` (an iface-id), or None."""
        return attachments.read_record(self.pin_dir(name))

    def pins(self) -> int:
        with contextlib.suppress(FileNotFoundError):
            return len(os.listdir(f"{self.bpffs}/tcbypass/{PIN_LAYOUT}"))
        return 0

    def run_entries(self) -> int:
        return sum(len(files) for _, _, files in os.walk(self.run_dir))

    def cli(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
        """`tcbypass ARGS` as run on this node."""
        return subprocess.run(cli_command() + list(args), capture_output=True, text=True, timeout=timeout,
                              env={**os.environ, **self.env})

    def statuses(self) -> list[dict]:
        return json.loads(self.cli("status", "--json").stdout or "[]")


def join(a: EmulatedNode, b: EmulatedNode) -> None:
    """Link the two nodes' br-ints with a veth between their namespaces, a plain
    port on each switch: the cluster's overlay between two nodes."""
    left, right = f"tcl{a.sb.tag}", f"tcl{b.sb.tag}"
    sh("ip", "link", "add", left, "netns", a.sb.node, "type", "veth", "peer", "name", right, "netns", b.sb.node)
    for node, dev in ((a, left), (b, right)):
        sh("ip", "link", "set", dev, "up", netns=node.sb.node)
        node.sb.switch.add_port(dev, {})
