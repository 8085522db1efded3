"""A VM's life across nodes: live migration between two emulated nodes, as KubeVirt
does it on Kube-OVN, with a real guest and traffic both ways throughout.

How a migration looks on the nodes, and how it is built here:
- KubeVirt creates a target virt-launcher pod on another node; Kube-OVN plugs it
  with the same MAC, IP and iface-id (its own OVSDB row on that node) and binds
  the logical port to both chassis until the VM's RARP is seen on the target
  (kube-ovn pkg/controller/kubevirt.go, handleAddOrUpdateVMIMigration:
  requested-chassis=src,target, activation-strategy=rarp). Here: the target
  pod on the second node with the source's MAC and IP; the two switches learn
  where the MAC is from the frames they see.
- virt-handler wires the target pod exactly as the source (k6t-eth0, tap0,
  eth0-nic), and QEMU waits with -incoming.
- Memory is copied, the source pauses, the target resumes, and QEMU announces
  the VM with RARP (its default announce rounds; KubeVirt sets none), which
  must reach OVS through the bridge.
- The source pod is deleted afterwards.

Traffic: the server pod (on the first node) sends sequence-numbered UDP to the
VM (the guest's tcb-udp writes what arrives to a file, read back after), the
VM sends sequence-numbered UDP to the server (tcb-udp again; the server
records arrival times), and the server pings the VM. Each migration
reports what each stream lost and its longest gap.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Iterator, Sequence

from tcbypass import netns

from .cluster import EmulatedNode, join
from .guest import Guest
from .sandbox import NETNS_DIR, VmNic
from .streams import PingFlow

NAMESPACE = "mig"
VMI = "vm1"
SERVER_IP, VM_IP = "10.16.0.2", "10.16.0.5"
VM_MAC = "52:54:00:10:16:05"
RATE = 50  # datagrams a second each way (the guest's shell sends somewhat fewer under TCG)


@dataclass
class Cluster:
    """Two nodes joined, a server pod on the first, agents where asked for."""

    a: EmulatedNode
    b: EmulatedNode
    server: str  # the server pod's namespace (on a)

    def other(self, node: EmulatedNode) -> EmulatedNode:
        return self.b if node is self.a else self.a


@contextlib.contextmanager
def cluster(agents: bool = True, datapath: str = "") -> Iterator[Cluster]:
    with EmulatedNode.up("node-a", datapath) as a, EmulatedNode.up("node-b", datapath) as b:
        join(a, b)
        server = a.sb.add_server_pod("web", SERVER_IP, namespace=NAMESPACE)
        if agents:
            a.start_agent()
            b.start_agent()
        yield Cluster(a, b, server)


@dataclass
class Vm:
    """The VM: the node it runs on, its pod's NICs there, its QEMU."""

    node: EmulatedNode
    nics: list[VmNic]
    guest: Guest

    @property
    def iface(self) -> str:
        return self.nics[0].iface_id


def plug_pod(node: EmulatedNode, vmi: str = VMI, queues: int = 1) -> list[VmNic]:
    """The virt-launcher pod of the VM on `node` (Kube-OVN's port, KubeVirt's bridge binding;
    `queues` per tap)."""
    return node.sb.add_vm(vmi, [VM_IP], namespace=NAMESPACE, vm_link="tap", macs=[VM_MAC], queues=queues)


def plug_target(node: EmulatedNode, vm: "Vm", sock: str) -> tuple[list[VmNic], Guest]:
    """The migration's target on `node`: the pod, then QEMU waiting with -incoming on `sock`."""
    nics = plug_pod(node, vm.nics[0].vmi)
    target = guest_on(node, nics, incoming=f"unix:{sock}")
    target.start()
    with target.qmp() as q:
        wait_for(lambda: q.status() == "inmigrate", 60, 0.05)
    return nics, target


def guest_on(node: EmulatedNode, nics: list[VmNic], incoming: str = "", **options) -> Guest:
    return Guest(node.sb.netns_path(nics[0].pod_ns), [(nic.tap, nic.mac) for nic in nics],
                 static={"eth0": f"{VM_IP}/24"}, memory=128, incoming=incoming, **options)


def start_vm(node: EmulatedNode, queues: int = 1, **options) -> Vm:
    """The VM's pod and its guest, booted (`queues` > 1: multi-queue NICs, one vCPU per queue)."""
    nics = plug_pod(node, queues=queues)
    if queues > 1:
        options = {"queues": queues, "cpus": queues, **options}
    guest = guest_on(node, nics, **options)
    guest.start()
    guest.wait_ready(180)
    return Vm(node, nics, guest)


def wait_for(predicate: Callable[[], bool], timeout: float = 30.0, poll: float = 0.01) -> float | None:
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        if predicate():
            return time.monotonic() - start
        time.sleep(poll)
    return None


# --- traffic ---------------------------------------------------------------------------------

class ToVm:
    """Sequence-numbered UDP from the server to the VM, sent from a socket in the
    server's namespace; in the guest, tcb-udp (guest_tools/) notes when each arrives.
    `receiver=False`: its receiver is started by start_flows(), with others."""

    def __init__(self, server_ns: str, guest: Guest, port: int, rate: float = RATE, receiver: bool = True):
        self.guest, self.port, self.period = guest, port, 1.0 / rate
        self.sent = 0
        self._stop = threading.Event()
        if receiver:
            guest.run(self.guest_start())
        self.sock = netns.run_in(f"{NETNS_DIR}/{server_ns}", lambda: socket.socket(socket.AF_INET, socket.SOCK_DGRAM))
        self.thread = threading.Thread(target=self._send, daemon=True)

    def guest_start(self) -> str:
        return _in_own_session(f"rx{self.port}", f"tcb-udp recv {self.port} > /tmp/rx{self.port} 2>/dev/null")

    def guest_stop(self) -> str:
        return f"kill -TERM -$(cat /tmp/rx{self.port}.sid) 2>/dev/null; echo '{FLOW_MARK} {self.port}'; cat /tmp/rx{self.port}"

    def start(self) -> None:
        self.thread.start()

    def _send(self) -> None:
        due = time.monotonic()
        while not self._stop.is_set():
            with contextlib.suppress(OSError):
                self.sock.sendto(f"{self.sent}\n".encode(), (VM_IP, self.port))
            self.sent += 1
            due += self.period
            self._stop.wait(max(0.0, due - time.monotonic()))

    def halt(self) -> None:
        """Stop sending."""
        self._stop.set()
        self.thread.join()
        self.sock.close()

    def stop(self, guest: Guest) -> dict:
        """Stop; `guest` is where the VM runs now (the file moved with it)."""
        self.halt()
        time.sleep(0.5)
        _, out = guest.run(self.guest_stop(), timeout=60)
        return self.figures(out)

    def figures(self, received: str) -> dict:
        """Lost datagrams, from what the guest's receiver wrote."""
        got = {int(line.split()[0]) for line in received.splitlines() if line.split() and line.split()[0].isdigit()}
        lost = sorted(set(range(self.sent)) - got)
        # The guest's clock stands still while it is paused for the switch-over: the
        # gap is measured on the sender's clock, from the longest run of lost datagrams.
        return {"sent": self.sent, "lost": len(lost),
                "longest_gap_s": round((_longest_run(lost) + 1) * self.period, 3) if lost else self.period}


class FromVm:
    """Sequence-numbered UDP from the VM (tcb-udp in the guest) to a socket in the
    server's namespace, which notes when each arrives. `sender=False`: its sender
    is started by start_flows(), with others."""

    def __init__(self, server_ns: str, guest: Guest, port: int, rate: float = RATE, sender: bool = True):
        self.port, self.rate, self.arrivals = port, rate, {}
        self._stop = threading.Event()
        self.sock = netns.run_in(f"{NETNS_DIR}/{server_ns}", lambda: socket.socket(socket.AF_INET, socket.SOCK_DGRAM))
        self.sock.bind((SERVER_IP, port))
        self.sock.settimeout(0.2)
        self.thread = threading.Thread(target=self._receive, daemon=True)
        self.thread.start()
        if sender:
            guest.run(self.guest_start())

    def guest_start(self) -> str:
        return _in_own_session(f"tx{self.port}", f"tcb-udp send {SERVER_IP} {self.port} {self.rate} >/dev/null 2>&1")

    def guest_stop(self) -> str:
        return f"kill -TERM -$(cat /tmp/tx{self.port}.sid) 2>/dev/null"

    def _receive(self) -> None:
        while not self._stop.is_set():
            try:
                data = self.sock.recv(2048)
            except socket.timeout:
                continue
            if data.strip().isdigit():
                self.arrivals.setdefault(int(data), time.monotonic())

    def stop(self, guest: Guest) -> dict:
        guest.run(f"{self.guest_stop()}; true")
        return self.finish()

    def finish(self) -> dict:
        """After the guest's sender stopped: what arrived."""
        time.sleep(0.3)
        self._stop.set()
        self.thread.join()
        self.sock.close()
        return figures(max(self.arrivals, default=-1) + 1, self.arrivals)


FLOW_MARK = "TCB-FLOW"


def _in_own_session(name: str, cmd: str) -> str:
    """A guest command line that runs `cmd` in the background in a session of its
    own, whose id (/tmp/NAME.sid) stops it and all it started."""
    return f"setsid sh -c 'echo $$ > /tmp/{name}.sid; exec {cmd}' </dev/null >/dev/null 2>&1 &"


def start_flows(server_ns: str, guest: Guest, to_ports: Sequence[int], from_ports: Sequence[int],
                rate: float = RATE) -> tuple[list[ToVm], list[FromVm]]:
    """Flows both ways whose guest ends start in one guest command (each guest
    command is a round trip over the serial console, seconds under TCG); the
    flows to the VM still have to be start()ed."""
    to_vm = [ToVm(server_ns, guest, port, rate, receiver=False) for port in to_ports]
    from_vm = [FromVm(server_ns, guest, port, rate, sender=False) for port in from_ports]
    # Back once every receiver has bound its port (/proc/net/udp shows it in hex):
    # what is sent before would be lost for reasons of our own.
    listening = "\n".join(f"until grep -q ':{port:04X} ' /proc/net/udp; do sleep 0.05; done" for port in to_ports)
    guest.run("\n".join([*(f.guest_start() for f in [*to_vm, *from_vm]), listening]))
    return to_vm, from_vm


def stop_flows(guest: Guest, to_vm: Sequence[ToVm], from_vm: Sequence[FromVm]) -> dict[str, dict]:
    """Stop flows started by start_flows() in one guest command; figures per flow
    ("to PORT", "from PORT")."""
    for flow in to_vm:
        flow.halt()
    time.sleep(0.5)
    _, out = guest.run("\n".join([*(f.guest_stop() for f in from_vm), *(f.guest_stop() for f in to_vm), "true"]),
                       timeout=60)
    received = {port: "" for port in (f.port for f in to_vm)}
    for chunk in out.split(FLOW_MARK)[1:]:
        port, _, rest = chunk.strip().partition("\n")
        received[int(port)] = rest
    return ({f"to {f.port}": f.figures(received[f.port]) for f in to_vm}
            | {f"from {f.port}": f.finish() for f in from_vm})


def _longest_run(seqs: list[int]) -> int:
    best = run = 0
    for i, seq in enumerate(seqs):
        run = run + 1 if i and seq == seqs[i - 1] + 1 else 1
        best = max(best, run)
    return best


def figures(sent: int, arrivals: dict[int, float]) -> dict:
    """Lost datagrams (of the first `sent`) and the longest time between two that arrived."""
    times = sorted(arrivals.values())
    gap = max((b - a for a, b in zip(times, times[1:])), default=0.0)
    return {"sent": sent, "lost": sent - len([s for s in arrivals if s < sent]), "longest_gap_s": round(gap, 3)}


def ping_figures(result) -> dict:
    replied = sorted(result.replied_at.values())
    gap = max((b - a for a, b in zip(replied, replied[1:])), default=0.0)
    return {"sent": result.transmitted, "lost": result.lost, "longest_gap_s": round(gap, 3)}


# --- one migration ---------------------------------------------------------------------------

@dataclass
class MigrationResult:
    direction: str  # "a->b"
    agents: bool
    total_s: float  # QMP migrate to completed
    downtime_ms: int  # QEMU's own figure
    target_attached_before_resume: bool | None  # None without agents
    target_attached_s: float | None  # from the target pod being plugged to its agent attaching it (agents)
    to_vm: dict = field(default_factory=dict)
    from_vm: dict = field(default_factory=dict)
    ping: dict = field(default_factory=dict)
    target_counters_moved: bool | None = None  # the target's fast path carried traffic after the switch-over
    source_detached: bool | None = None  # the source's attachment went with the source pod


class _AttachWatch:
    """When a node's attachment of `iface` is first seen complete (time.monotonic()),
    polled every 10 ms from a thread while the migration runs."""

    def __init__(self, node: EmulatedNode, iface: str, timeout: float = 30.0):
        self.seen: float | None = None
        self.thread = threading.Thread(target=self._poll, args=(node, iface, timeout), daemon=True)
        self.thread.start()

    def _poll(self, node: EmulatedNode, iface: str, timeout: float) -> None:
        if wait_for(lambda: (r := node.record(iface)) is not None and r.complete, timeout) is not None:
            self.seen = time.monotonic()

    def wait(self) -> float | None:
        self.thread.join()
        return self.seen


def migrate(c: Cluster, vm: Vm, port: int, settle: float = 2.0) -> tuple[Vm, MigrationResult]:
    """Move `vm` to the other node under traffic; the VM as it runs there, and what was seen."""
    src, dst = vm.node, c.other(vm.node)
    agents = src.agent is not None
    to_vm = ToVm(c.server, vm.guest, port)
    from_vm = FromVm(c.server, vm.guest, port + 1)
    pinger = PingFlow(c.server, VM_IP, 0.05, limit=600)
    to_vm.start()
    pinger.start()
    time.sleep(settle)

    plugged = time.monotonic()
    sock = f"{dst.root}/migrate-{port}.sock"
    watch = _AttachWatch(dst, vm.iface) if agents else None
    nics, target = plug_target(dst, vm, sock)
    # As soon as the target's QEMU listens, as KubeVirt does: nothing waits for the
    # target's agent, whose attach races the migration (and must win it).
    started = time.monotonic()
    with vm.guest.qmp() as q:
        q.execute("migrate", uri=f"unix:{sock}")
        info = q.wait_migration()
    resumed = time.monotonic()
    attached = watch.wait() if watch else None
    attached_s = None if attached is None else attached - plugged
    if info.get("status") != "completed":
        raise RuntimeError(f"the migration ended {info.get('status')}: {info}")
    target.arrived_from(vm.guest)
    moved = Vm(dst, nics, target)
    before = _redirected(dst, moved.iface) if agents else None
    time.sleep(settle)
    to_vm_result, from_vm_result = to_vm.stop(target), from_vm.stop(target)
    pinger.finish()
    ping_result = ping_figures(pinger.result())
    after = _redirected(dst, moved.iface) if agents else None

    vm.guest.close()  # the source pod goes: its QEMU first, then the pod
    src.sb.delete_pod(vm.nics)
    detached = wait_for(lambda: src.record(vm.iface) is None, 10) is not None if agents else None
    result = MigrationResult(
        direction=f"{src.name[-1]}->{dst.name[-1]}", agents=agents, total_s=round(resumed - started, 3),
        downtime_ms=int(info.get("downtime", -1)),
        target_attached_before_resume=None if not agents else attached is not None and attached < resumed,
        target_attached_s=None if attached_s is None else round(attached_s, 3),
        to_vm=to_vm_result, from_vm=from_vm_result, ping=ping_result,
        target_counters_moved=None if not agents else all(a > b for a, b in zip(after, before)),
        source_detached=detached)
    return moved, result


def _redirected(node: EmulatedNode, iface: str) -> tuple[int, int]:
    from tcbypass.maps import AttachmentMaps

    with AttachmentMaps(node.pin_dir(iface), readonly=True) as maps:
        c = maps.counters()
    return c.redirect_packets["from_vm"], c.redirect_packets["to_vm"]


# --- the downtime table ------------------------------------------------------------------------

@dataclass(frozen=True)
class DowntimePlan:
    runs: int = 5  # migrations each way, with the agents and without tcbypass
    settle: float = 2.0


def downtime(plan: DowntimePlan, progress: Callable[[str], None] = lambda _t: None) -> dict:
    """`runs` migrations each way with the agents running, and as many with no tcbypass at all."""
    results = []
    for agents in (True, False):
        with cluster(agents=agents) as c:
            progress(f"{'with' if agents else 'without'} tcbypass: booting the VM")
            vm = start_vm(c.a)
            port = 30000
            try:
                for i in range(2 * plan.runs):
                    progress(f"{'with' if agents else 'without'} tcbypass: migration {i + 1}/{2 * plan.runs}")
                    vm, result = migrate(c, vm, port, plan.settle)
                    results.append(asdict(result))
                    port += 2
            finally:
                vm.guest.close()
    return {"plan": asdict(plan), "runs": results, "summary": summarize(results)}


def summarize(runs: list[dict]) -> list[dict]:
    rows = []
    for agents in (True, False):
        for direction in ("a->b", "b->a"):
            mine = [r for r in runs if r["agents"] == agents and r["direction"] == direction]
            if not mine:
                continue
            rows.append({
                "tcbypass": agents, "direction": direction, "runs": len(mine),
                "downtime_ms": [r["downtime_ms"] for r in mine],
                "lost_to_vm": [r["to_vm"]["lost"] for r in mine], "lost_from_vm": [r["from_vm"]["lost"] for r in mine],
                "lost_pings": [r["ping"]["lost"] for r in mine],
                "gap_to_vm_s": [r["to_vm"]["longest_gap_s"] for r in mine],
                "gap_from_vm_s": [r["from_vm"]["longest_gap_s"] for r in mine],
                "gap_ping_s": [r["ping"]["longest_gap_s"] for r in mine]})
    return rows


def render(report: dict, console) -> None:
    from rich.table import Table

    t = Table(title="live migration under traffic: lost and longest gap per run", title_justify="left")
    for col in ("tcbypass", "direction", "QEMU downtime ms", "lost to VM", "lost from VM", "lost pings",
                "gap to VM s", "gap from VM s", "gap ping s"):
        t.add_column(col)
    fmt = lambda values: " ".join("-" if v is None else str(v) for v in values)  # noqa: E731
    for row in report["summary"]:
        t.add_row("agents" if row["tcbypass"] else "none", row["direction"], fmt(row["downtime_ms"]),
                  fmt(row["lost_to_vm"]), fmt(row["lost_from_vm"]), fmt(row["lost_pings"]), fmt(row["gap_to_vm_s"]),
                  fmt(row["gap_from_vm_s"]), fmt(row["gap_ping_s"]))
    console.print(t)
    checks = [r for r in report["runs"] if r["agents"]]
    console.print(f"with the agents: target attached before the VM resumed in "
                  f"{sum(bool(r['target_attached_before_resume']) for r in checks)}/{len(checks)} runs; "
                  f"target's fast path carrying traffic after the switch-over in "
                  f"{sum(bool(r['target_counters_moved']) for r in checks)}/{len(checks)}; source detached in "
                  f"{sum(bool(r['source_detached']) for r in checks)}/{len(checks)}", highlight=False)
