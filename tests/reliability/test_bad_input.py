"""Every bad input answered: one line on stderr that names the problem and
the fix, a documented non-zero exit code, and nothing half-applied (pins,
qdiscs and filters exactly as before).

Already proven elsewhere and only referenced in docs/reliability.md:
unknown VMI, OVSDB socket missing or refusing, pod netns gone, not root for
`attach VMI` (tests/integration/test_vmi.py); malformed MAC, nonexistent
netns, bad names (tests/integration/test_explicit.py); OVSDB garbage and
timeouts in the client itself (tests/unit/test_ovsdb.py).
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import threading
import time

import pytest

from tcbypass import attachments, bpfsys, health, loader
from tcbypass.model import AttachSpec
from tcbypass_lab.sandbox import ping, sh, wait_for_ping
from tests.conftest import run_cli, tc_state

from .conftest import (assert_one_attachment_or_none, assert_one_line_error, explicit_args, mounted_bpffs,
                       our_hooks, pin_entries, report, status_rows)

pytestmark = pytest.mark.root

SERVER_IP, VM_IP = "10.16.0.2", "10.16.0.5"


@pytest.fixture
def pod(bare_pod):
    return bare_pod


def snapshot(nic) -> tuple:
    """What a failed command must leave exactly as it was."""
    return pin_entries(), tc_state(nic.pod_ns, nic.tap), tc_state(nic.pod_ns, nic.nic)


def with_arg(args: tuple, flag: str, value: str) -> list[str]:
    out = list(args)
    out[out.index(flag) + 1] = value
    return out


# --- the pod's network namespace -------------------------------------------------------------
@pytest.mark.parametrize("kind", ["regular file", "directory", "uts namespace", "path through a file"])
def test_netns_path_that_is_not_a_network_namespace(pod, tmp_path, kind):
    sb, nic = pod
    regular = tmp_path / "not-a-netns"
    regular.write_text("")
    path = {"regular file": str(regular), "directory": str(tmp_path), "uts namespace": "/proc/self/ns/uts",
            "path through a file": f"{regular}/net"}[kind]
    before = snapshot(nic)
    proc = run_cli(*with_arg(explicit_args(sb, nic, f"n-{sb.tag}"), "--netns", path))
    if kind == "path through a file":
        assert_one_line_error(proc, 1, f"{path} is not a network namespace (Not a directory)",
                              "pass a name from 'ip netns list' or a path such as /proc/PID/ns/net")
    else:
        assert_one_line_error(proc, 1, f"{path} is not a network namespace we can enter",
                              "pass /var/run/netns/NAME or /proc/PID/ns/net")
    assert snapshot(nic) == before


# --- OVSDB that answers badly --------------------------------------------------------------------
@contextlib.contextmanager
def fake_ovsdb(tmp_path, answer: bytes | None):
    """A unix socket that answers every request with `answer`, or holds the
    connection open without a word (`answer` None) until the test ends."""
    path = str(tmp_path / "db.sock")
    server = socket.socket(socket.AF_UNIX)
    server.bind(path)
    server.listen(4)
    server.settimeout(0.2)
    done = threading.Event()

    def serve():
        while not done.is_set():
            try:
                conn, _ = server.accept()
            except OSError:
                continue
            with conn:
                conn.settimeout(0.2)
                with contextlib.suppress(OSError):
                    conn.recv(65536)
                    if answer is not None:
                        conn.sendall(answer)
                        continue
                done.wait(20)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield f"unix:{path}"
    finally:
        done.set()
        thread.join(5)
        server.close()


@pytest.mark.parametrize("answer, message", [
    (b"HTTP/1.1 400 Bad Request\r\n\r\n", "answered garbage, not JSON-RPC"),
    (b'{"id": 1, "result": {"rows": 3}, "error": null}', "unexpected reply shape"),
    (b'{"id": 1, "result": null, "error": "not leader"}', "OVSDB refused the query (not leader)"),
    (b"", "closed the connection"),
    (None, "did not answer within 5 s"),
], ids=["garbage", "wrong-shape", "error-reply", "hangs-up", "silent"])
def test_ovsdb_answering_badly_is_one_line(tmp_path, answer, message):
    before = pin_entries()
    with fake_ovsdb(tmp_path, answer) as url:
        proc = run_cli("attach", "vm1", "-n", "prod", "--ovsdb", url, timeout=30)
    assert_one_line_error(proc, 1, message, url, "--ovsdb")
    assert pin_entries() == before


# --- privileges ------------------------------------------------------------------------------------
@pytest.mark.parametrize("args", [("status",), ("detach", "vm1"), ("gc",),
                                  ("attach", "--netns", "x", "--tap", "t", "--nic", "n", "--mac", "0a:00:00:00:00:01")],
                         ids=["status", "detach", "gc", "attach-explicit"])
def test_not_root_is_refused_before_anything_is_touched(args):
    before = pin_entries()
    proc = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
                           sys.executable, "-m", "tcbypass", *args],
                          capture_output=True, text=True, timeout=60, env=dict(os.environ))
    assert_one_line_error(proc, 1, f"tcbypass {args[0]} needs root", f"run: sudo tcbypass {args[0]}")
    assert pin_entries() == before


# --- bpffs ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("command", ["attach", "status", "detach", "gc"])
def test_bpffs_not_mounted(pod, tmp_path, command):
    """Every command says so (status, detach and gc used to answer 'no attachments',
    'not attached' and 'nothing to remove' with exit 0: M3)."""
    sb, nic = pod
    where = tmp_path / "no-bpffs"
    where.mkdir()
    before = snapshot(nic)
    args = {"attach": explicit_args(sb, nic, f"m-{sb.tag}"), "status": ("status",),
            "detach": ("detach", f"m-{sb.tag}"), "gc": ("gc",)}[command]
    proc = run_cli(*args, env={"TCBYPASS_BPFFS": str(where)})
    assert_one_line_error(proc, 1, f"bpffs is not mounted on {where}", f"mount -t bpf bpf {where}")
    assert snapshot(nic) == before and os.listdir(where) == []


def test_bpffs_read_only_before_the_first_attach(pod):
    sb, nic = pod
    before = snapshot(nic)
    with mounted_bpffs(read_only=True) as where:
        listing = sorted(os.listdir(where))  # a fresh bpffs may hold the kernel's maps.debug / progs.debug
        proc = run_cli(*explicit_args(sb, nic, f"r-{sb.tag}"), env={"TCBYPASS_BPFFS": where})
        assert_one_line_error(proc, 1, f"cannot create {where}/tcbypass/{loader.PIN_VERSION} (Read-only file system)",
                              f"mount -o remount,rw {where}")
        assert sorted(os.listdir(where)) == listing
    assert snapshot(nic) == before


@contextlib.contextmanager
def attached_then_read_only(sb, nic, name):
    """An attachment pinned on a bpffs of its own, which then turns read-only."""
    with mounted_bpffs() as where:
        env = {"TCBYPASS_BPFFS": where}
        try:
            assert run_cli(*explicit_args(sb, nic, name), env=env).returncode == 0
            sh("mount", "-o", "remount,ro", where)
            yield where, env
        finally:
            sh("mount", "-o", "remount,rw", where, check=False)
            run_cli("detach", name, env=env)


def test_bpffs_read_only_under_an_attachment_changes_nothing(pod, capsys):
    """attach, detach and gc refuse with the fix; status still reads the attachment
    (pins opened read-only) and tells the truth: the fast path runs on."""
    sb, nic = pod
    name = f"ro-{sb.tag}"
    with attached_then_read_only(sb, nic, name) as (where, env):
        pins_before = sorted(os.listdir(f"{where}/tcbypass/{loader.PIN_VERSION}/{name}"))
        filters = (our_hooks(nic.pod_ns, nic.tap), our_hooks(nic.pod_ns, nic.nic))
        lines = {}
        for args in (explicit_args(sb, nic, name), ("detach", name), ("gc",)):
            proc = run_cli(*args, env=env)
            lines[args[0]] = assert_one_line_error(proc, 1, "is not writable (bpffs read-only?)",
                                                   f"mount -o remount,rw {where}")
        proc = run_cli("status", "--json", env=env)
        assert proc.returncode == 0 and [r["state"] for r in json.loads(proc.stdout)] == ["active"], proc.stdout
        assert sorted(os.listdir(f"{where}/tcbypass/{loader.PIN_VERSION}/{name}")) == pins_before
        assert (our_hooks(nic.pod_ns, nic.tap), our_hooks(nic.pod_ns, nic.nic)) == filters
        assert all(filters), "the fast path keeps running"
    report(capsys, "bpffs read-only under an attachment: status active; "
           + " | ".join(f"{k}: {v}" for k, v in lines.items()))


# --- the compiler ----------------------------------------------------------------------------------------
@pytest.fixture
def no_kernel_headers(tmp_path) -> dict:
    """bcc looks for kernel headers in $BCC_KERNEL_SOURCE first: an empty directory
    has none. And an empty program cache: no prepared build to fall back on."""
    empty = tmp_path / "no-headers"
    empty.mkdir()
    return {"BCC_KERNEL_SOURCE": str(empty), "TCBYPASS_CACHE_DIR": str(tmp_path / "empty-cache")}


def test_kernel_headers_missing_is_one_line_and_changes_nothing(pod, no_kernel_headers, capsys):
    sb, nic = pod
    before = snapshot(nic)
    proc = run_cli(*explicit_args(sb, nic, f"h-{sb.tag}"), env=no_kernel_headers)
    line = assert_one_line_error(proc, 1, "bcc could not compile redirect.c", "Unable to find kernel headers",
                                 "run 'tcbypass doctor'", "tcbypass prepare")
    assert snapshot(nic) == before
    report(capsys, f"kernel headers missing: exit {proc.returncode}: {line}")


# --- pins from another version, or junk, in our directory -------------------------------------------------
def pin_junk(name: str, maps: dict[str, int]) -> str:
    """A directory under PIN_ROOT holding plain array maps (name -> value size): not our layout."""
    loader.bpffs_ready()
    where = f"{loader.PIN_ROOT}/{name}"
    os.mkdir(where)
    for pin, value_size in maps.items():
        fd = bpfsys.map_create(bpfsys.BPF_MAP_TYPE_ARRAY, pin[:15], 4, value_size, 1)
        try:
            bpfsys.obj_pin(fd, f"{where}/{pin}")
        finally:
            os.close(fd)
    return where


UNRELATED = {"counters": 8, "tcb_ports": 16, "config": 64}  # another tool's, or an older layout of ours


def test_foreign_pins_are_orphaned_with_a_hint_and_attach_clears_them(pod, capsys):
    sb, nic = pod
    name = f"fp-{sb.tag}"
    pin_junk(name, UNRELATED)
    proc = run_cli("status")
    assert proc.returncode == 3 and proc.stderr == ""
    [row] = status_rows(sb.tag)
    assert (row["name"], row["state"]) == (name, "orphaned")
    assert row["problems"] == ["unreadable pins (an interrupted attach or a foreign version); "
                               "'tcbypass gc' removes them"]
    proc = run_cli(*explicit_args(sb, nic, name))
    assert proc.returncode == 0 and "attached" in proc.stdout, proc.stderr
    assert assert_one_attachment_or_none(name, nic) == "active"
    report(capsys, f"foreign pins: status {row['state']}: {row['problems'][0]}; attach with the same name: "
                   f"{proc.stdout.strip()}")


def test_gc_removes_foreign_pins_and_leaves_live_attachments(pod):
    sb, nic = pod
    live = f"live-{sb.tag}"
    assert run_cli(*explicit_args(sb, nic, live)).returncode == 0
    pin_junk(f"junk-{sb.tag}", UNRELATED)
    proc = run_cli("gc")
    assert proc.returncode == 0 and proc.stderr == "" and f"junk-{sb.tag}" in proc.stdout, proc.stdout
    assert pin_entries() == {live}
    assert assert_one_attachment_or_none(live, nic) == "active"


def test_foreign_pins_with_our_map_names_but_larger_values_are_refused_not_read(pod):
    """Our map names, another layout (a 64 KiB tcb_meta): reading it into our
    4 KiB buffer would overflow the heap (it did: status aborted, B1). Each map's
    type and sizes are checked before use; the pins count as foreign."""
    sb, nic = pod
    junk = pin_junk(f"big-{sb.tag}", {"tcb_ports": 64, "tcb_tap": 4, "tcb_stats": 8, "tcb_meta": 1 << 16})
    try:
        proc = run_cli("status", "--json")  # a child process: were it to abort, only it would
        gc = run_cli("gc")
    finally:
        loader.remove_pins(junk)  # before any teardown reads it in this process
    assert proc.returncode == 3, (proc.returncode, proc.stderr[-300:])
    assert [r["state"] for r in json.loads(proc.stdout) if sb.tag in r["name"]] == ["orphaned"]
    assert gc.returncode == 0 and f"big-{sb.tag}" in gc.stdout, (gc.stdout, gc.stderr)


# --- interrupted attach (kill -9 half way) -------------------------------------------------------------------
@pytest.mark.parametrize("failpoint", ["maps-filled", "tap-hooked"])
def test_interrupted_attach_is_stale_and_the_next_attach_completes_it(pod, failpoint, capsys):
    sb, nic = pod
    name = f"k-{sb.tag}"
    assert wait_for_ping(nic.vm_ns, SERVER_IP)
    proc = run_cli(*explicit_args(sb, nic, name), env={"TCBYPASS_FAILPOINT": failpoint})
    assert proc.returncode == -9, "the failpoint kills the CLI as kill -9 would"
    status = run_cli("status")
    [row] = status_rows(sb.tag)
    assert status.returncode == 3 and row["state"] == "stale" and "attach did not finish" in row["problems"], row
    assert ping(nic.vm_ns, SERVER_IP, count=3, interval=0.05) == (3, 3), "traffic flows while half attached"

    proc = run_cli(*explicit_args(sb, nic, name))
    assert proc.returncode == 0 and "refreshed" in proc.stdout, proc.stdout + proc.stderr
    assert assert_one_attachment_or_none(name, nic) == "active"
    assert pin_entries() == {name}
    sb.block_bridge_unicast(nic)
    assert ping(nic.vm_ns, SERVER_IP, count=3, interval=0.05) == (3, 3), "and now the fast path carries it"
    report(capsys, f"killed at {failpoint}: status stale ({'; '.join(row['problems'])}); next attach: "
                   f"{proc.stdout.strip()}")


@pytest.mark.parametrize("failpoint", ["maps-filled", "tap-hooked"])
def test_gc_after_an_interrupted_attach_restores_the_bridge_path(pod, failpoint):
    """An incomplete record whose lock is free belongs to an attach that died:
    gc finishes its cleanup (it used to leave it, one filter hooked: G1)."""
    sb, nic = pod
    name = f"kg-{sb.tag}"
    assert run_cli(*explicit_args(sb, nic, name), env={"TCBYPASS_FAILPOINT": failpoint}).returncode == -9
    proc = run_cli("gc")
    assert proc.returncode == 0 and name in proc.stdout, proc.stdout + proc.stderr
    assert assert_one_attachment_or_none(name, nic) == "none"
    assert pin_entries() == set()
    assert ping(nic.vm_ns, SERVER_IP, count=3, interval=0.05) == (3, 3), "the bridge carries the VM again"


def replace_killed_at(spec: AttachSpec, failpoint: str) -> int:
    """Re-attach with another build (an upgrade: new instance, staging, filter swap), killed half way."""
    code = ("from tcbypass import attachments; from tcbypass.model import AttachSpec; "
            f"attachments.attach(AttachSpec(**{spec.__dict__!r}), test_build=True)")
    return subprocess.run([sys.executable, "-c", code], env={**os.environ, "TCBYPASS_FAILPOINT": failpoint},
                          capture_output=True, timeout=60).returncode


def test_upgrade_killed_before_the_swap_keeps_the_old_instance_and_gc_clears_staging(pod):
    sb, nic = pod
    spec = AttachSpec(name=f"u-{sb.tag}", netns=sb.netns_path(nic.pod_ns), tap=nic.tap, nic=nic.nic, mac=nic.mac)
    attachments.attach(spec)
    assert replace_killed_at(spec, "maps-filled") == -9
    assert pin_entries() == {spec.name, spec.name + attachments.STAGING}
    assert health.status_of(spec.name).state == "active", "the old instance still carries the traffic"
    proc = run_cli("gc")
    assert proc.returncode == 0 and f"{spec.name}@staging" in proc.stdout
    assert assert_one_attachment_or_none(spec.name, nic) == "active"


def test_upgrade_killed_between_the_swaps_is_detected_and_repaired(pod, capsys):
    """The tap already runs the new instance (staging), the NIC the old one.
    Status must say so (it used to say active, and attach 'unchanged': B2);
    gc removes the staging pins, attach puts the pinned programs back."""
    sb, nic = pod
    spec = AttachSpec(name=f"v-{sb.tag}", netns=sb.netns_path(nic.pod_ns), tap=nic.tap, nic=nic.nic, mac=nic.mac)
    attachments.attach(spec)
    assert replace_killed_at(spec, "tap-hooked") == -9
    [row] = status_rows(sb.tag)
    assert row["state"] == "stale" and f"our program is not on {nic.tap}'s tcx hook" in row["problems"], row
    gc = run_cli("gc")
    assert gc.returncode == 0 and f"{spec.name}@staging" in gc.stdout, gc.stdout + gc.stderr
    proc = run_cli(*explicit_args(sb, nic, spec.name))
    assert proc.returncode == 0 and "refreshed" in proc.stdout, proc.stdout + proc.stderr
    assert assert_one_attachment_or_none(spec.name, nic) == "active"
    report(capsys, f"upgrade killed between the swaps: status {row['state']} ({'; '.join(row['problems'])}); "
                   f"gc: {gc.stdout.strip()}; attach: {proc.stdout.strip()}")


# --- a pod namespace we may not read ----------------------------------------------------------------------
NO_PTRACE = ["setpriv", "--inh-caps=-sys_ptrace", "--bounding-set=-sys_ptrace", "--"]


def test_a_pod_namespace_closed_to_us_is_never_taken_for_gone(pod, capsys):
    """A pod named by /proc/PID/ns/net of another user's process: without
    CAP_SYS_PTRACE the kernel refuses to show that namespace. status must not
    call the attachment orphaned (gc would then tear down a live VM's fast
    path); it is stale, and says which privilege is missing."""
    sb, nic = pod
    holder = sb.spawn(nic.pod_ns, "setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
                      "--pdeathsig", "KILL", "sleep", "900")
    path = f"/proc/{holder.pid}/ns/net"
    for _ in range(200):  # until nsenter has entered the namespace and dropped to nobody
        if os.path.exists(path) and os.stat(path).st_ino == os.stat(sb.netns_path(nic.pod_ns)).st_ino:
            break
        time.sleep(0.01)
    name = f"np-{sb.tag}"
    args = list(explicit_args(sb, nic, name))
    args[args.index("--netns") + 1] = path
    assert run_cli(*args).returncode == 0

    def without_ptrace(*cli: str) -> subprocess.CompletedProcess:
        return subprocess.run(NO_PTRACE + [sys.executable, "-m", "tcbypass", *cli], capture_output=True, text=True,
                              timeout=60)

    status = without_ptrace("status", "--json")
    [row] = [r for r in json.loads(status.stdout) if r["name"] == name]
    assert status.returncode == 3 and row["state"] == "stale", row
    assert "permission denied" in row["problems"][0] and "CAP_SYS_PTRACE" in row["problems"][0]
    gc = without_ptrace("gc")
    assert gc.returncode == 0 and name not in gc.stdout, gc.stdout + gc.stderr
    assert assert_one_attachment_or_none(name, nic) == "active", "the fast path is still there"
    report(capsys, f"pod namespace closed to us: status {row['state']}: {row['problems'][0]}; gc: {gc.stdout.strip()}")
