"""The node's switch: what tcbypass hands to Open vSwitch, and what OVS does with it.

Every test here runs a private OVS (lab/tcbypass_lab/ovs.py) on the datapath the
run asks for: the kernel datapath (openvswitch.ko, what Kube-OVN nodes run)
in the kernel matrix's guests, where $TCBYPASS_DATAPATH=system makes a
missing module a failure; the userspace datapath on a build machine whose
kernel has no module. Each module says which one it ran on.

The pod is a dual-stack VM pod wired as KubeVirt's bridge binding, next to
a dual-stack server pod on the same br-int.
"""

from __future__ import annotations

import json
import socket
from dataclasses import dataclass

import pytest

from tcbypass_lab.ovs import SYSTEM
from tcbypass_lab.sandbox import Sandbox, VmNic, mac_of, sh, v6_of, wait_for_ping
from tests.conftest import run_cli

pytestmark = pytest.mark.root

SERVER_IP, VM_IP = "10.16.0.2", "10.16.0.5"
SERVER_IP6, VM_IP6 = v6_of(SERVER_IP), v6_of(VM_IP)


@dataclass
class Pod:
    """One VM pod and its server on a node, and the CLI as a node hook runs it."""

    sb: Sandbox
    nic: VmNic
    server: str  # the server pod's namespace
    nic_type: str = "veth-pair"

    @property
    def env(self) -> dict:
        return {"TCBYPASS_OVSDB": self.sb.ovsdb_url, "TCBYPASS_OVS_NETNS": self.sb.netns_path(self.sb.node)}

    def cli(self, *args: str):
        return run_cli(*args, env=self.env)

    def attach(self, *extra: str) -> dict:
        proc = self.cli("attach", "vm1", "-n", "prod", *extra)
        assert proc.returncode == 0, proc.stderr
        return self.row()

    def detach(self) -> None:
        assert self.cli("detach", "vm1", "-n", "prod").returncode == 0

    def row(self) -> dict:
        proc = self.cli("status", "vm1", "-n", "prod", "--json")
        [row] = json.loads(proc.stdout)
        return row

    def redirected(self) -> tuple[int, int]:
        c = self.row()["counters"]["redirected_packets"]
        return c["from_vm"], c["to_vm"]

    @property
    def vm_ofport(self) -> int:
        return self.sb.switch.ofport(self.nic.host_port)

    @property
    def server_ofport(self) -> int:
        return self.sb.switch.ofport(self.server_port)

    @property
    def server_port(self) -> str:
        ports = self.sb.vsctl("--format=json", "--columns=name,external_ids", "list", "interface")
        for name, ids in json.loads(ports)["data"]:
            if dict(ids[1]).get("pod_name") == "web":
                return name
        raise AssertionError("no server port in OVSDB")

    @property
    def peer_mode(self) -> str:
        """How attach must hand frames from the VM over: an internal port has no
        peer (bpf_redirect() to it); the kernel datapath makes a veth's host side
        a switch port (ovs-system is its master), so every frame goes by peer;
        the userspace one reads the host side with AF_PACKET and leaves it
        without a master."""
        if self.nic_type == "internal-port":
            return "redirect"
        return "peer" if self.sb.datapath == SYSTEM else "peer-host"


@pytest.fixture(scope="module")
def datapath_reported(request):
    """Say once per module which datapath its tests ran on."""
    seen: list[str] = []
    yield seen
    if seen:
        capman = request.config.pluginmanager.getplugin("capturemanager")
        with capman.global_and_fixture_disabled():
            print(f"\n    [switch] {request.module.__name__.rsplit('.', 1)[-1]}: OVS {seen[0]} datapath", flush=True)


NIC_TYPES = ("veth-pair", "internal-port")  # Kube-OVN's pod NIC types (internal-port: up to 1.14)


@pytest.fixture(params=NIC_TYPES)
def pod(request, ovs_node, datapath_reported) -> Pod:
    """The VM pod, plugged by Kube-OVN as a veth pair or as an OVS internal port."""
    return make_pod(ovs_node, request.param, datapath_reported)


def make_pod(sb: Sandbox, nic_type: str, datapath_reported: list) -> Pod:
    """A dual-stack server pod and the VM pod on the node `sb`, the bridge path
    proven, neighbours static."""
    assert sb.switch.datapath_kind() == sb.datapath, "vswitchd runs the datapath the sandbox asked for"
    datapath_reported[:] = [sb.datapath]
    server = sb.add_server_pod("web", SERVER_IP, namespace="prod", dual_stack=True)
    [nic] = sb.add_vm("vm1", [VM_IP], namespace="prod", dual_stack=True, pod_nic_type=nic_type)
    assert wait_for_ping(nic.vm_ns, SERVER_IP), "the bridge path must work before any test"
    # Static neighbours both ways: only a test's own frames cross, no ARP or ND of their own.
    for ns, dev, ip, mac in ((nic.vm_ns, nic.vm_dev, SERVER_IP, mac_of(server, "eth0")),
                             (nic.vm_ns, nic.vm_dev, SERVER_IP6, mac_of(server, "eth0")),
                             (server, "eth0", VM_IP, nic.mac), (server, "eth0", VM_IP6, nic.mac)):
        sh("ip", "neigh", "replace", ip, "lladdr", mac, "dev", dev, "nud", "permanent", netns=ns)
    return Pod(sb, nic, server, nic_type)


def payloads(n: int, size: int, tag: bytes = b"p") -> list[bytes]:
    """n distinct payloads of `size` bytes (a sequence number, then padding)."""
    return [i.to_bytes(4, "big") + tag * (size - 4) for i in range(n)]


AF = {4: socket.AF_INET, 6: socket.AF_INET6}
