"""The DaemonSet's contract, run for real.

The image scripts/build-image.sh builds is started by podman with exactly the
host namespaces, capabilities, mounts and security options that
deploy/daemonset.yaml declares (read from the YAML by lab/tcbypass_lab/container.py,
which refuses any field it cannot map), on the sandbox's emulated node:

- the node's network namespace is the sandbox node's: hostNetwork joins it,
  because that is where the private OVS keeps its ports (the machine's own
  namespace has none of them);
- the node's bpffs is this run's ($TCBYPASS_BPFFS, else /sys/fs/bpf) and OVS's
  run directory is the sandbox's; every other hostPath is the machine's own,
  and hostPID is the machine's PID namespace.

Then every privilege the pod asks for is taken away in turn, and the test
checks the precise error that follows: the DaemonSet asks for nothing it
does not need.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass

import pytest

from tcbypass import attachments
from tcbypass_lab.container import metrics, status_json
from tcbypass_lab.sandbox import ping
from tcbypass.model import pin_id
from tests.conftest import status_json as host_status_json

from .conftest import SERVER_IP, build_image, detach_ours

pytestmark = pytest.mark.root

BOUND = 20.0  # seconds: only a stuck agent or container takes this long
DOCTOR_CHECKS = ("root and capabilities", "bpffs", "run directory", "tcx links", "bpf_redirect_peer",
                 "devmap lookup from tc", "locked memory", "program build", "tcx hook", "verifier")


def wait_for(predicate, what: str, bound: float = BOUND) -> float:
    started = time.monotonic()
    while time.monotonic() - started < bound:
        if predicate():
            return time.monotonic() - started
        time.sleep(0.05)
    pytest.fail(f"not within {bound} s: {what}")


def report(capsys, text: str) -> None:
    with capsys.disabled():
        print(f"\n    [image] {text}")


def add_vm(sb, label: str, ip: str, netns_by_pid: bool = False):
    [nic] = sb.add_vm(f"{label}{sb.tag}", [ip], namespace="prod", netns_by_pid=netns_by_pid)
    return nic


def host_rows(sb) -> dict[str, dict]:
    """`tcbypass status --json` run on the host, rows of this sandbox's VMIs only."""
    return {r["name"]: r for r in host_status_json() if r["vmi"].endswith(sb.tag)}


def states(sb) -> dict[str, str]:
    return {name: row["state"] for name, row in host_rows(sb).items()}


def record_of(nic) -> attachments.Record:
    return attachments.read_record(attachments.pin_dir_of(nic.iface_id))


def redirected(rows: dict, nic, direction: str) -> int:
    return rows[nic.iface_id]["counters"]["redirected_packets"][direction]


def without_multicast_counts(row: dict) -> dict:
    """A status row minus the counts of frames passed to the bridge: IPv6 router
    solicitations and MLD reports of the emulated VMs keep adding to those."""
    return {**row, "counters": {k: v for k, v in row["counters"].items() if k != "passed_packets"}}


# --- the pod as declared ---------------------------------------------------------------
def test_the_daemonset_pod_runs_the_agent_on_the_node(node, agent_pod, agent_image, podman, capsys):
    sb = node.sb
    assert agent_image.name == agent_pod.image, "the DaemonSet runs the image scripts/build-image.sh builds"
    agent = podman.start(agent_pod, f"tcb-agent-{sb.tag}", node.netns, node.host_paths)
    took = wait_for(lambda: metrics(node.netns, agent_pod.metrics_port, agent_pod.liveness_path) is not None,
                    "the liveness probe's endpoint answers in the node's network namespace")
    report(capsys, f"agent container up, /metrics answering after {took:.2f} s")

    doctor = podman.exec(agent, "tcbypass", "doctor")
    assert doctor.returncode == 0, doctor.stdout + doctor.stderr
    for check in DOCTOR_CHECKS:
        assert f"ok   {check}" in doctor.stdout, doctor.stdout
    assert "prepared: /var/lib/tcbypass/objects/" in doctor.stdout, "the image carries the program compiled"
    assert "path: tcx, from the VM by bpf_redirect_peer" in doctor.stdout

    # Two VM pods start after the agent: one whose namespace is a file under /var/run/netns
    # (containerd, CRI-O), one that Kube-OVN names by a process's /proc/PID/ns/net.
    vma = add_vm(sb, "vma", "10.16.0.5")
    vmb = add_vm(sb, "vmb", "10.16.0.6", netns_by_pid=True)
    took = wait_for(lambda: states(sb) == {vma.iface_id: "active", vmb.iface_id: "active"},
                    "the agent in the container attaches both VM pods")
    report(capsys, f"both VM pods attached by the agent {took * 1000:.0f} ms after the second was wired")
    rows = host_rows(sb)
    assert {r["managed_by"] for r in rows.values()} == {"agent"}
    assert rows[vma.iface_id]["netns"].startswith("/var/run/netns/")
    assert rows[vmb.iface_id]["netns"].startswith("/proc/")

    # With the in-pod bridges unable to forward unicast, only the programs carry the pings.
    for nic in (vma, vmb):
        sb.block_bridge_unicast(nic)
    before = host_rows(sb)
    for nic in (vma, vmb):
        assert ping(nic.vm_ns, SERVER_IP, count=5) == (5, 5), nic.iface_id
    after = host_rows(sb)
    for nic in (vma, vmb):
        for direction in ("from_vm", "to_vm"):
            assert redirected(after, nic, direction) - redirected(before, nic, direction) >= 5, (nic, direction)

    # What the host sees is what the pod sees.
    inside = podman.exec(agent, "tcbypass", "status", "--json")
    assert inside.returncode in (0, 3), inside.stderr  # 3: another test's pins on this bpffs may not be active
    inside_rows = {k: v for k, v in status_json(inside.stdout).items() if k in after}
    assert {k: without_multicast_counts(v) for k, v in inside_rows.items()} == \
        {k: without_multicast_counts(v) for k, v in host_rows(sb).items()}
    # The pod's locks are the node's (node hooks and the CLI serialise on the same files).
    assert os.path.exists(f"/run/tcbypass/locks/{pin_id(vma.iface_id)}.lock")
    scraped = metrics(node.netns, agent_pod.metrics_port, agent_pod.liveness_path)
    assert f'iface_id="{vma.iface_id}"' in scraped and f'iface_id="{vmb.iface_id}"' in scraped

    # SIGTERM, as the kubelet sends it: the agent exits by itself well within the grace
    # period, and the datapath keeps carrying the traffic.
    attached_at = {nic.iface_id: record_of(nic).attached_at for nic in (vma, vmb)}
    code, took = podman.stop(agent, agent_pod.grace_seconds)
    report(capsys, f"SIGTERM: the agent exited {code} after {took:.2f} s")
    assert code == 0 and took < 5, "the agent exits on SIGTERM at once, not at the end of the grace period"
    for nic in (vma, vmb):
        assert ping(nic.vm_ns, SERVER_IP, count=3) == (3, 3), f"{nic.iface_id}: the fast path outlives the agent"
    stopped = host_rows(sb)
    assert {r["state"] for r in stopped.values()} == {"active"}
    assert all(redirected(stopped, nic, "to_vm") >= redirected(after, nic, "to_vm") + 3 for nic in (vma, vmb))

    # While no agent runs, VM a restarts (a new tap): its attachment goes stale.
    old_tap = record_of(vma).tap_ifindex
    sb.restart_vm(vma)
    wait_for(lambda: states(sb)[vma.iface_id] == "stale", "the restarted VM's attachment is stale")

    # A new pod picks the attachments up: it refreshes the stale one and leaves the other as it is.
    agent2 = podman.start(agent_pod, f"tcb-agent2-{sb.tag}", node.netns, node.host_paths)
    took = wait_for(lambda: states(sb)[vma.iface_id] == "active" and record_of(vma).tap_ifindex != old_tap,
                    "the new agent refreshes the attachment of the restarted VM")
    report(capsys, f"a new agent container refreshed the stale attachment after {took:.2f} s")
    assert record_of(vmb).attached_at == attached_at[vmb.iface_id], "the untouched attachment is left as it is"
    assert f"refreshed {vma.iface_id}" in podman.logs(agent2)
    sb.block_bridge_unicast(vma)
    assert ping(vma.vm_ns, SERVER_IP, count=3) == (3, 3)
    assert redirected(host_rows(sb), vma, "from_vm") >= 3
    assert podman.stop(agent2, agent_pod.grace_seconds)[0] == 0


def test_the_image_holds_the_prepared_program_and_no_compiler_nor_lab(agent_image, podman, capsys):
    code = ("import glob, importlib.util, shutil\n"
            "print('bcc', importlib.util.find_spec('bcc') is not None)\n"
            "print('clang', shutil.which('clang') or shutil.which('llc') or '')\n"
            "print('headers', len(glob.glob('/usr/src/linux-headers-*') + glob.glob('/lib/modules/*/build')))\n"
            "print('pip', importlib.util.find_spec('pip') is not None)\n"
            "print('objects', len(glob.glob('/var/lib/tcbypass/objects/redirect-*.json')))\n"
            "import tcbypass, os\n"
            "print('lab', importlib.util.find_spec('tcbypass_lab') is not None or "
            "os.path.exists(os.path.join(os.path.dirname(tcbypass.__file__), 'lab')))\n")
    proc = podman("run", "--rm", "--network", "none", "--read-only", "--entrypoint", "python3", agent_image.name,
                  "-c", code)
    found = dict(line.split(" ", 1) if " " in line else (line, "") for line in proc.stdout.splitlines())
    assert found == {"bcc": "False", "clang": "", "headers": "0", "pip": "False", "objects": "2", "lab": "False"}, \
        proc.stdout
    size = int(podman("image", "inspect", "--format", "{{.Size}}", agent_image.name).stdout.strip())
    report(capsys, f"{agent_image.name}: {size / 2**20:.0f} MiB unpacked")
    assert size < 120 * 2**20, "the image has grown: what does a prepared node need that it did not before?"


def test_a_rebuild_from_the_same_inputs_gives_the_same_digests(agent_image, capsys):
    again = build_image()
    report(capsys, f"rebuilt in {again.seconds:.1f} s (layer 1 from the cache): manifest {again.manifest}")
    assert (again.manifest, again.image_id) == (agent_image.manifest, agent_image.image_id)


# --- one privilege less ---------------------------------------------------------------------
@dataclass(frozen=True)
class Case:
    probe: str  # doctor | attach (VM a, named netns) | attach-by-pid (VM b) | attach-late | doctor-late-bpffs
    expect: tuple[str, ...]  # in what the probe prints; {a}, {b}, {port} are filled in
    why: str


CASES = {
    "cap:NET_ADMIN": Case("doctor", ("FAIL root and capabilities: euid 0, CAP_SYS_ADMIN; missing CAP_NET_ADMIN",),
                          "netlink and tc"),
    "cap:SYS_ADMIN": Case("doctor", ("FAIL root and capabilities: euid 0, CAP_NET_ADMIN; missing CAP_SYS_ADMIN",),
                          "setns() into the pods' namespaces; bpf(2)"),
    "cap:SYS_PTRACE": Case("attach-by-pid", ("error: cannot open the pod network namespace of {b} (/proc/",
                                             "): Permission denied; opening another process's /proc/PID/ns/net "
                                             "needs CAP_SYS_PTRACE"),
                           "another process's /proc/PID/ns/net"),
    "hostPID": Case("attach-by-pid", ("error: the pod network namespace of {b} (/proc/", ") is gone"),
                    "/proc/PID/ns/net names a PID of the node"),
    "hostNetwork": Case("attach", ("error: VMI prod/{a} has no bypassable NIC", "port {port} is in OVSDB but not "
                                   "on this node's network"),
                        "OVS's ports are in the node's network namespace"),
    "mount:bpffs": Case("doctor", ("FAIL bpffs: bpffs is not mounted on /sys/fs/bpf",), "the pins live there"),
    "mount:ovs-run": Case("attach", ("error: no OVSDB socket at unix:/run/openvswitch/db.sock (file not found)",),
                          "Kube-OVN's port rows"),
    "mount:netns": Case("doctor", ("FAIL tcx hook: cannot make a scratch network namespace in /var/run/netns "
                                   "([Errno 30] Read-only file system)",),
                        "the pods' namespace files"),
    "mount:tcbypass-run": Case("doctor", ("FAIL run directory: /run/tcbypass/locks cannot be created "
                                          "(Read-only file system)",),
                               "locks shared with node hooks"),
    # Without propagation the pod sees the namespace's file but not the namespace mounted on it.
    "propagation:netns": Case("attach-late", ("error: cannot open network namespace /var/run/netns/{late_pod} "
                                              "(Permission denied); is the pod still running?",),
                              "namespaces of pods started after the agent"),
    "propagation:bpffs": Case("doctor-late-bpffs", ("FAIL bpffs: bpffs is not mounted on /sys/fs/bpf (ext4 is)",),
                              "a bpffs the node mounts after the agent started"),
}


def test_every_privilege_the_daemonset_asks_for_is_taken_away_below(agent_pod):
    assert sorted(agent_pod.privileges()) == sorted(CASES)
    assert not agent_pod.privileged and agent_pod.cap_drop == ("ALL",)


@pytest.fixture(scope="module")
def vms(shared_node):
    sb = shared_node.sb
    a = add_vm(sb, "pa", "10.16.0.5")
    b = add_vm(sb, "pb", "10.16.0.6", netns_by_pid=True)
    return a, b


@contextlib.contextmanager
def late_bpffs():
    """A directory on a shared mount (as / is on a systemd node) where bpffs is mounted only later."""
    path = tempfile.mkdtemp(prefix="tcb-late-bpffs-")
    subprocess.run(["mount", "--bind", "--make-rshared", path, path], check=True)
    try:
        yield path
    finally:
        for _ in range(5):  # the bpffs on top of the bind mount, then the bind mount itself
            if subprocess.run(["mountpoint", "-q", path]).returncode != 0:
                shutil.rmtree(path)  # what an agent wrote before the bpffs came
                break
            subprocess.run(["umount", "--lazy", path], check=False)


def _probe(case: Case, pod, node, vms, podman, name: str) -> tuple[str, dict]:
    """Start the pod, run the case's probe in it; what it printed and the names to fill in."""
    sb = node.sb
    a, b = vms
    fill = {"a": a.iface_id.split(".")[0], "b": b.iface_id.split(".")[0], "port": a.host_port}
    with contextlib.ExitStack() as stack:
        paths = dict(node.host_paths)
        if case.probe == "doctor-late-bpffs":
            paths["/sys/fs/bpf"] = stack.enter_context(late_bpffs())
        podman.start(pod, name, node.netns, paths)
        stack.callback(podman.remove, name)
        wait_for(lambda: podman.running(name), f"container {name} running", bound=10)
        if case.probe == "doctor-late-bpffs":
            subprocess.run(["mount", "-t", "bpf", "bpf", paths["/sys/fs/bpf"]], check=True)
            proc = podman.exec(name, "tcbypass", "doctor")
        elif case.probe == "doctor":
            proc = podman.exec(name, "tcbypass", "doctor")
        else:
            vmi = fill["b"] if case.probe == "attach-by-pid" else fill["a"]
            if case.probe == "attach-late":
                late = add_vm(sb, "pc", "10.16.0.7")
                vmi, fill["late_pod"] = late.iface_id.split(".")[0], late.pod_ns
            proc = podman.exec(name, "tcbypass", "attach", vmi, "-n", "prod")
        return proc.stdout + proc.stderr, fill


@pytest.mark.parametrize("privilege", sorted(CASES))
def test_without_one_privilege_the_pod_fails_with_a_precise_error(privilege, shared_node, vms, agent_pod,
                                                                   agent_image, podman, capsys):
    case = CASES[privilege]
    sb = shared_node.sb
    try:
        if case.probe == "doctor-late-bpffs":  # the same scenario with the privilege: green
            out, _ = _probe(case, agent_pod, shared_node, vms, podman, f"tcb-full-{sb.tag}")
            assert "ok   bpffs: mounted on /sys/fs/bpf" in out, out
        out, fill = _probe(case, agent_pod.without(privilege), shared_node, vms, podman, f"tcb-less-{sb.tag}")
    finally:
        detach_ours(sb)
    expected = [e.format(**fill) for e in case.expect]
    line = next((line.strip() for line in out.splitlines() if expected[0] in line), "")
    report(capsys, f"without {privilege} ({case.why}): {line or out.strip()[:300]}")
    for text in expected:
        assert text in out, out
