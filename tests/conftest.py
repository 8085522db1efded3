"""Shared helpers for the root test layers (datapath, integration, vm).

Every object a test creates carries a random tag (see tcbypass_lab.sandbox) and
is removed at teardown, also when the test fails.
"""

from __future__ import annotations

import errno
import json
import os
import select
import socket
import subprocess
import sys
import time

import pytest

from tcbypass import attachments, bpfsys, features, health, loader, netns
from tcbypass_lab.agentproc import AgentProcess
from tcbypass_lab.sandbox import NETNS_DIR, Sandbox, sh

AGENT_BOUND = 15.0  # seconds: only a hung agent takes this long


def run_cli(*args: str, env: dict | None = None, timeout: float = 60) -> subprocess.CompletedProcess:
    """Run the installed CLI the way a user or a node hook does."""
    return subprocess.run([sys.executable, "-m", "tcbypass", *args], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **(env or {})})


def run_lab(*args: str, env: dict | None = None, timeout: float = 60) -> subprocess.CompletedProcess:
    """Run the lab's door (tcbypass-lab) as a user does."""
    return subprocess.run([sys.executable, "-m", "tcbypass_lab", *args], capture_output=True, text=True,
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


class RunningAgent(AgentProcess):
    """`tcbypass agent` on a sandbox node, up (metrics served) when made; waits fail the test."""

    def __init__(self, sb: Sandbox, *extra: str, env: dict | None = None, log_name: str = "agent.log",
                 command: list[str] | None = None):
        super().__init__(sb.ovsdb_url, sb.netns_path(sb.node), f"{sb.run_dir}/{log_name}", *extra, env=env,
                         command=command)
        self.wait_for(lambda: self.metrics_text() is not None, "metrics endpoint up")

    def wait_for(self, predicate, what: str = "", bound: float = AGENT_BOUND) -> float:
        took = super().wait_for(predicate, bound)
        if took is None:
            assert self.alive(), f"agent exited ({self.proc.returncode}) while waiting for {what}; log: " \
                                 f"{self.log_path}:\n{self.log_text()[-3000:]}"
            pytest.fail(f"agent did not get to: {what} within {bound} s; log: {self.log_path}")
        return took


# --- hooks and kernels without tcx ----------------------------------------------------
KERNEL_LACKS = "TCBYPASS_KERNEL_LACKS"  # set by the kernel matrix: features the guest's kernel lacks


def require_hook(hook: str) -> None:
    """Fail a test of `hook` that this kernel cannot run, unless the run said
    beforehand that the kernel lacks it ($TCBYPASS_KERNEL_LACKS, which the
    kernel matrix sets from the kernel's release): then skip, saying so. A
    missing tcx is thus never a silent pass or skip."""
    if hook != "tcx" or features.probe().tcx:
        return
    if "tcx" in os.environ.get(KERNEL_LACKS, "").split(","):
        pytest.skip("no tcx: this kernel has none (Linux 6.6+), as the run declared; the clsact case covers it")
    pytest.fail(f"this kernel has no tcx, so the tcx case cannot run; where that is expected (Linux before 6.6) "
                f"set {KERNEL_LACKS}=tcx to skip such cases")


def tcx_program_ids(ifindex: int) -> list[int]:
    """Ids of the programs on a device's tcx ingress (call it in the device's
    namespace). A kernel without tcx refuses the query (EINVAL): nothing can
    be there."""
    try:
        return bpfsys.tcx_programs(ifindex)
    except OSError as exc:
        if exc.errno == errno.EINVAL and not features.probe().tcx:
            return []
        raise


def tcx_entries(ns: str, dev: str) -> list[tuple[int, str]]:
    """(id, name) of the programs on a device's tcx ingress, in running order."""
    def body() -> list[tuple[int, str]]:
        found = []
        for prog_id in tcx_program_ids(socket.if_nametoindex(dev)):
            fd = bpfsys.prog_fd_by_id(prog_id)
            try:
                found.append((prog_id, bpfsys.prog_info(fd).name))
            finally:
                os.close(fd)
        return found
    return netns.run_in(f"{NETNS_DIR}/{ns}", body)


def tcx_programs(ns: str, dev: str) -> list[str]:
    """Names of the programs on a device's tcx ingress, in running order."""
    return [name for _, name in tcx_entries(ns, dev)]


def tc_state(ns: str, dev: str) -> str:
    """Every hook on a device: qdiscs, filters both ways, and tcx programs."""
    out = [sh("tc", "qdisc", "show", "dev", dev, netns=ns).stdout]
    for hook in ("ingress", "egress"):
        out.append(sh("tc", "filter", "show", "dev", dev, hook, netns=ns, check=False).stdout)
    out.append("tcx ingress: " + " ".join(tcx_programs(ns, dev)))
    return "\n".join(out)


def ours_on(ns: str, dev: str) -> bool:
    """Does a tcbypass program sit on the device (a tcx link or a clsact filter)?"""
    state = tc_state(ns, dev)
    return "tcbypass:" in state or "tcb_from_vm" in state or "tcb_to_vm" in state


# --- raw frames -------------------------------------------------------------------
def send_frames(ns: str, dev: str, frames: list[bytes]) -> None:
    """Put each frame on the wire of `dev` in `ns`, as it is (AF_PACKET)."""
    def body() -> None:
        with socket.socket(socket.AF_PACKET, socket.SOCK_RAW) as sock:
            sock.bind((dev, 0))
            for frame in frames:
                sock.send(frame)
    netns.run_in(f"{NETNS_DIR}/{ns}", body)


class Capture:
    """Frames received on `dev` in `ns` from now on (AF_PACKET, every protocol)."""

    def __init__(self, ns: str, dev: str):
        def make() -> socket.socket:
            sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x0003))
            sock.bind((dev, 0))
            return sock
        self.sock = netns.run_in(f"{NETNS_DIR}/{ns}", make)  # a socket keeps its namespace

    def frames(self, want: int, timeout: float = 2.0, match=lambda frame, pkt_type: True) -> list[tuple[bytes, int]]:
        """Up to `want` received frames that `match`, as (frame, packet type)."""
        got, deadline = [], time.monotonic() + timeout
        while len(got) < want and (left := deadline - time.monotonic()) > 0:
            if not select.select([self.sock], [], [], left)[0]:
                break
            data, addr = self.sock.recvfrom(65535)
            if addr[2] != socket.PACKET_OUTGOING and match(data, addr[2]):
                got.append((data, addr[2]))
        return got

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> "Capture":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def detach_sandbox_attachments(sb: Sandbox) -> set[str]:
    """Detach every attachment whose pod namespace belongs to `sb` (and only those:
    other processes may be attaching on this machine at the same time)."""
    found = set()
    for name in health.names():
        record = attachments.read_record(attachments.pin_dir_of(name))
        if record is not None and f"/tcb{sb.tag}-" in record.netns:
            found.add(name)
            attachments.detach(name, remove_qdisc=True)
    return found


def sandbox_node(ovs: bool, mtu: int = 0):
    """A sandbox node for a fixture (`mtu`: Kube-OVN's MTU); what the tests attached is detached at the end."""
    with Sandbox(ovs=ovs, mtu=mtu) as sb:
        try:
            yield sb
        finally:
            detach_sandbox_attachments(sb)


@pytest.fixture
def ovs_node():
    """A node with a private OVS (its own ovsdb-server and ovs-vswitchd)."""
    yield from sandbox_node(ovs=True)


@pytest.fixture
def bare_node():
    """A node without OVS: the pod's veth ends in the node namespace."""
    yield from sandbox_node(ovs=False)


# --- sockets inside namespaces ----------------------------------------------------------
def socket_in(ns: str, family: int = socket.AF_INET, kind: int = socket.SOCK_DGRAM) -> socket.socket:
    """A socket made inside the sandbox namespace `ns` (it stays there), used from this thread."""
    return netns.run_in(f"{NETNS_DIR}/{ns}", lambda: socket.socket(family, kind))


def family_of(ip: str) -> int:
    return socket.AF_INET6 if ":" in ip else socket.AF_INET


def udp_delivered(src_ns: str, dst_ns: str, dst_ip: str, port: int, payloads: list[bytes],
                  gap: float = 0.0, settle: float = 0.5) -> list[bytes]:
    """Send each payload as one UDP datagram from `src_ns` to dst_ip:port, where a
    socket in `dst_ns` listens; the payloads that arrived, in arrival order."""
    family = family_of(dst_ip)
    rx, tx = socket_in(dst_ns, family), socket_in(src_ns, family)
    try:
        rx.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 << 20)
        rx.bind((dst_ip, port))
        for payload in payloads:
            tx.sendto(payload, (dst_ip, port))
            if gap:
                time.sleep(gap)
        got, deadline = [], time.monotonic() + settle + len(payloads) * 0.002
        while time.monotonic() < deadline and len(got) < len(payloads):
            if select.select([rx], [], [], max(0.0, deadline - time.monotonic()))[0]:
                got.append(rx.recv(65535))
        return got
    finally:
        rx.close()
        tx.close()


def tcp_exchange(a_ns: str, b_ns: str, b_ip: str, nbytes: int, port: int = 19770,
                 timeout: float = 60) -> tuple[bool, bool]:
    """A TCP connection from `a_ns` to b_ip:port in `b_ns`; each side sends `nbytes`
    of its own random data and reads the other's. (a->b intact, b->a intact)."""
    import hashlib
    import threading

    family = family_of(b_ip)
    listener, client = socket_in(b_ns, family, socket.SOCK_STREAM), socket_in(a_ns, family, socket.SOCK_STREAM)
    data_a, data_b = os.urandom(nbytes), os.urandom(nbytes)
    got: dict[str, bytes] = {}

    def pump(sock: socket.socket, out: bytes, key: str) -> None:
        sender = threading.Thread(target=sock.sendall, args=(out,), daemon=True)
        sender.start()
        chunks, left = [], nbytes
        while left > 0:
            chunk = sock.recv(min(left, 1 << 20))
            if not chunk:
                break
            chunks.append(chunk)
            left -= len(chunk)
        sender.join(timeout)
        got[key] = b"".join(chunks)

    try:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind((b_ip, port))
        listener.listen(1)
        listener.settimeout(timeout)
        client.settimeout(timeout)
        client.connect((b_ip, port))
        server, _ = listener.accept()
        server.settimeout(timeout)
        with server:
            other = threading.Thread(target=pump, args=(server, data_b, "b"), daemon=True)
            other.start()
            pump(client, data_a, "a")
            other.join(timeout)
    except OSError:
        return False, False
    finally:
        listener.close()
        client.close()
    digest = lambda b: hashlib.sha256(b).digest()  # noqa: E731
    return digest(got.get("b", b"")) == digest(data_a), digest(got.get("a", b"")) == digest(data_b)
