"""The kernel matrix: run the project's kernel-facing tests on the kernels users run.

For each kernel target (a Debian release whose kernel the package mirror
serves), `run_matrix` takes the cached guest image (kernel_image.py builds
it on first use), boots it with qemu (KVM where it works, TCG otherwise) on
a copy-on-write overlay, hands it this checkout and a job over a 9p share,
and collects what the job left there: `tcbypass doctor --json` (the
features the product found and the path it takes), one JUnit XML per test
group, and a few facts about the guest. The console only carries progress
markers.

    host                                         guest (Debian kernel, full userland)
    run dir/ src.tar job.sh  --9p "tcbshare"-->  /mnt/tcb: unpack, doctor, pytest per group
    run dir/out/*.xml *.log doctor.*  <--------  junit, logs, facts.json
    console: TCB-MATRIX-BOOTED / group-start / group-end / TCB-MATRIX-EXIT

kernel_results.py reads what a run left and renders the report.

What runs is decided in one place, `SELECTIONS`: named lists of test groups.
"full" is the matrix; "ci" is the subset CI runs on 6.1 (tests/kernels).

Tests parametrized over the hooks (tcx, clsact) run both everywhere. A
kernel older than 6.6 has no tcx: the job tells the tests so
(TCBYPASS_KERNEL_LACKS=tcx, from the kernel's release, not from the
product's probe), and only then do the tcx cases skip, each saying why;
anywhere else a missing tcx fails them (tests/conftest.py: require_hook).
Whether the product's probe agrees with the release is checked on doctor's
report (kernel_results.py).

Run it with scripts/kernel-matrix.sh, or `tcbypass-lab kernels --help`.
"""

from __future__ import annotations

import contextlib
import json
import logging
import shlex
import shutil
import subprocess
import tarfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from tcbypass.errors import TcbError
from .accel import pick_accel
from .console import SerialConsole
from .procs import Child
from .qemu import QEMU
from .kernel_image import (BOOTED_MARKER, DEFAULT_CACHE_DIR, EXIT_MARKER, GUEST_INIT, GUEST_PACKAGES, GUEST_VENV,
                           SHARE_MOUNT, SHARE_TAG, Image, ImageRecipe, KernelTarget, ensure_image,
                           requirements_from_pyproject)
from .ovs import ENV_DATAPATH, SYSTEM
from .kernel_results import GROUP_MARKER, KernelResult, collect, expected_features, markdown_table

log = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[2]
DEFAULT_MIRROR = "http://deb.debian.org/debian"
DEFAULT_SECURITY_MIRROR = "http://deb.debian.org/debian-security"


def targets(mirror: str = DEFAULT_MIRROR, security: str = DEFAULT_SECURITY_MIRROR) -> dict[str, KernelTarget]:
    """The kernels Debian's mirror offers, by name. Each release with its
    security updates, as a node that installs updates runs it."""
    def release(suite: str, *extra: str) -> tuple[str, ...]:
        return (f"deb {mirror} {suite} main", *(f"deb {mirror} {s} main" for s in extra),
                f"deb {security} {suite}-security main")

    # Debian 11's current kernel (its security suite), as the bullseye image has it.
    bullseye_kernel = ("linux-image-amd64/bullseye-security", "linux-headers-amd64/bullseye-security")
    found = [
        KernelTarget("6.1", "bookworm", release("bookworm"), "3.11", note="Debian 12"),
        # The kernel under test is what matters; openEuler 22.03 and Kylin V10 SP3 run a
        # 5.10 kernel with a newer userland than Debian 11's (bcc 0.18, libbpf 0.3).
        KernelTarget("5.10", "bookworm", (*release("bookworm"), *release("bullseye")), "3.11",
                     kernel_packages=bullseye_kernel,
                     note="Debian 11's kernel under Debian 12's userland (bcc 0.26, libbpf 1.1)"),
        KernelTarget("5.10-bullseye", "bullseye", release("bullseye"), "3.9",
                     note="Debian 11 as a whole: its kernel, bcc 0.18, libbpf 0.3, Python 3.9"),
        KernelTarget("6.12", "bookworm", release("bookworm", "bookworm-backports"), "3.11",
                     kernel_packages=("linux-image-amd64/bookworm-backports",
                                      "linux-headers-amd64/bookworm-backports"),
                     note="Debian 12 with the backports kernel (tcx, like this machine's 6.18)"),
    ]
    return {t.name: t for t in found}


# The matrix by default: Debian 12's kernel and the oldest one the mirror
# serves, that one both under a current userland and as Debian 11 ships it.
DEFAULT_KERNELS = ("6.1", "5.10", "5.10-bullseye")


@dataclass(frozen=True)
class TestGroup:
    """pytest arguments run as one unit in the guest, with a time limit (TCG)."""

    name: str
    args: tuple[str, ...]
    limit: int  # seconds
    what: str


NO_LOSS = tuple("tests/reliability/test_no_loss.py::"
                f"test_attach_reattach_upgrade_and_detach_under_traffic_lose_nothing[veth-{hook}]"
                for hook in ("tcx", "clsact"))
DATAPATH = TestGroup("datapath", ("tests/datapath",), 1200, "BPF_PROG_TEST_RUN: verdicts, counters, devmap fallback")

# OVS's kernel datapath (the guests load openvswitch.ko; $TCBYPASS_DATAPATH=system
# makes a missing module a failure): what Kube-OVN nodes really run.
_AGENT = tuple(f"tests/integration/test_agent.py::{name}" for name in (
    "test_new_vm_port_is_attached", "test_tap_recreation_is_refreshed", "test_deleted_pod_is_cleaned_up"))
_OVS_NO_LOSS = tuple("tests/reliability/test_no_loss.py::"
                     f"test_attach_reattach_upgrade_and_detach_under_traffic_lose_nothing[ovs-{hook}]"
                     for hook in ("tcx", "clsact"))
# Open vSwitch restarted, and its database gone a while, under the agent: what the kernel
# datapath keeps forwarding that the userspace one does not.
_OVS_RESTARTS = tuple(f"tests/reliability/test_agent_lifecycle.py::{name}" for name in (
    "test_an_ovs_vswitchd_restart_keeps_every_attachment_and_loses_only_while_the_switch_is_down",
    "test_ovsdb_gone_for_a_while_the_fast_path_runs_and_the_agent_catches_up"))
KERNEL_DATAPATH = TestGroup(
    "kernel-datapath", ("tests/switch", "tests/integration/test_vmi.py", *_AGENT, *_OVS_NO_LOSS, *_OVS_RESTARTS),
    4800,
    "OVS kernel datapath: discovery, attach, status (--all), detach; the agent; no loss; IPv4 and IPv6; "
    "peer mode against the real receiver; OVN policy kept; both pod NIC types; MTUs 1400 and 9000; the bench's "
    "paths; ovs-vswitchd restarted and OVSDB gone under the agent")
_V, _I = "[veth-pair]", "[internal-port]"
KERNEL_DATAPATH_CI = TestGroup(
    "kernel-datapath", (f"tests/switch/test_attach.py::test_attach_status_and_detach_leave_the_pod_exactly_as_it_was{_V}",
                        f"tests/switch/test_ovn_policy.py::test_an_acl_dropping_one_udp_port_drops_it_on_the_fast_path_too{_V}",
                        "tests/switch/test_mtu.py::test_tcp_and_udp_arrive_intact_both_ways[1400-veth-pair]",
                        "tests/switch/test_mtu.py::test_frames_longer_than_the_path_meet_the_bridges_fate[1400-veth-pair]",
                        f"tests/switch/test_receiver.py::test_a_mark_set_in_the_pod_reaches_the_switch_as_over_the_bridge{_V}",
                        _AGENT[0], _OVS_NO_LOSS[1]), 1500,
    "OVS kernel datapath, a subset of each area: discovery, attach, status --all and detach exact, an ACL kept, "
    "TSO segments and UDP (IPv4, IPv6) intact at MTU 1400, oversized frames as over the bridge, no mark leaked, "
    "the agent attaching, no loss (about 5 minutes under TCG)")


# The one place that says what runs in a guest. Explicit attach and no-loss
# run with each hook (tcx, clsact); on a kernel without tcx the tcx cases
# skip, declared (see above). "ci" is what tests/kernels runs in every CI
# run, on 6.1: about 4 minutes under TCG with a cached image (plus 1.5 to
# build it on a fresh machine), against 13 to 30 for the whole matrix on
# one kernel (docs/kernels.md).
SELECTIONS: dict[str, tuple[TestGroup, ...]] = {
    "full": (
        DATAPATH,
        TestGroup("explicit", ("tests/integration/test_explicit.py",), 2400,
                  "explicit attach/detach with real traffic between namespaces, tcx and clsact"),
        TestGroup("no-loss", NO_LOSS, 2400,
                  "attach, in-place replace, upgrade and detach under two UDP streams and a ping"),
        KERNEL_DATAPATH,
    ),
    "kernel-datapath": (KERNEL_DATAPATH,),
    "no-loss": (
        TestGroup("no-loss", NO_LOSS, 2400,
                  "attach, in-place replace, upgrade and detach under two UDP streams and a ping"),
    ),
    "ci": (
        DATAPATH,
        TestGroup("explicit", ("tests/integration/test_explicit.py::"
                               "test_attach_with_tcx_is_refused_where_the_kernel_has_none",),
                  900, "tcx refused in one line where the kernel has none, the bridge keeping the traffic "
                       "(attach with real traffic runs in the kernel-datapath group)"),
        KERNEL_DATAPATH_CI,
    ),
}

# Under TCG the guest's CPU is 10-50 times slower than this machine's: timed
# traffic tests stretch their rates and time spans by this factor (see
# tests/reliability/test_no_loss.py).
TCG_TRAFFIC_SLOWDOWN = 20

DOCTOR_LIMIT = 300
BOOT_LIMIT = 300
RUN_SLACK = 120


class MatrixError(TcbError):
    """qemu, the guest or the job failed in a way that left no result."""


# --- what the guest runs -------------------------------------------------------

def job_script(groups: Sequence[TestGroup], env: dict[str, str] | None = None) -> str:
    """The shell script the guest's init runs from the share; `env` is
    exported to every test."""
    exports = " ".join(f"{k}={shlex.quote(v)}" for k, v in sorted((env or {}).items()))
    lines = [
        "#!/bin/sh",
        "# Written by lab/tcbypass_lab/kernels.py for one kernel-matrix run.",
        # Readable by every user (a test runs the CLI as nobody), as a checkout on a host is.
        f"share={SHARE_MOUNT}; out=$share/out; src=/srv/tcbypass",
        'mkdir -p "$out" "$src" && tar -xf "$share/src.tar" -C "$src" && chmod -R a+rX "$src" && cd "$src" || exit 120',
        # Modules a node has loaded by the time pods run (no udev here to load them on demand).
        "modprobe -a tun openvswitch 2>/dev/null",
        f"export PYTHONPATH=$src:$src/lab PYTHONDONTWRITEBYTECODE=1 PATH={GUEST_VENV}/bin:$PATH",
        *([f"export {exports}"] if exports else []),
        f"py={GUEST_VENV}/bin/python",
        f'mark() {{ echo "{GROUP_MARKER} $*"; }}',
        "now_ms() { echo $(( $(date +%s%N) / 1000000 )); }",
        '"$py" - >"$out/facts.json" 2>"$out/facts.err" <<\'EOF\'',
        FACTS_PY.rstrip("\n"),
        "EOF",
        "mark doctor-start",
        "t0=$(now_ms)",
        f'timeout -k 10 {DOCTOR_LIMIT} tcbypass doctor --json >"$out/doctor.json" 2>"$out/doctor.err"',
        'mark "doctor-end $? $(( $(now_ms) - t0 ))"',
    ]
    for g in groups:
        args = " ".join(shlex.quote(a) for a in g.args)
        lines += [
            f"mark group-start {g.name}",
            "t0=$(now_ms)",
            f'timeout -k 15 {g.limit} "$py" -m pytest -q -p no:cacheprovider -o junit_family=xunit1 '
            f'--junitxml="$out/{g.name}.xml" {args} >"$out/{g.name}.log" 2>&1',
            "rc=$?",
            f'mark "group-end {g.name} $rc $(( $(now_ms) - t0 ))"',
        ]
    lines += ["sync", "exit 0", ""]
    return "\n".join(lines)


FACTS_PY = """\
import json, os, platform, sys
facts = {"uname": platform.release(), "python": platform.python_version(), "cpus": os.cpu_count()}
try:
    import bcc
    facts["bcc"] = getattr(bcc, "__version__", "?")
except Exception as exc:
    facts["bcc"] = f"not importable: {exc}"
for name in ("pyroute2", "pytest", "scapy", "hypothesis"):
    try:
        from importlib.metadata import version
        facts[name] = version(name)
    except Exception:
        facts[name] = None
facts["headers"] = os.path.realpath(f"/lib/modules/{platform.release()}/build")
print(json.dumps(facts))
"""


def checkout_files(repo: Path) -> list[str]:
    """The checkout as git sees it: tracked files and untracked ones not ignored."""
    proc = subprocess.run(["git", "-C", str(repo), "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                          capture_output=True, timeout=60)
    if proc.returncode != 0:
        raise MatrixError(f"{repo} is not a git checkout", hint=proc.stderr.decode().strip())
    return sorted({f for f in proc.stdout.decode().split("\0") if f and (repo / f).is_file()})


def pack_checkout(repo: Path, dest: Path) -> int:
    """Write the checkout to the tarball `dest`; number of files."""
    files = checkout_files(repo)
    with tarfile.open(dest, "w") as tar:
        for f in files:
            tar.add(repo / f, arcname=f, recursive=False)
    return len(files)


def guest_env(kernel: str, accel: str) -> dict[str, str]:
    """What the tests in the guest are told: the features its kernel's release
    lacks, how much slower than this machine its CPU is, and that every OVS
    there runs the kernel datapath (Debian's kernels ship openvswitch.ko: a
    guest that cannot load it fails those tests rather than falling back)."""
    lacks = [name for name, has in expected_features(kernel).items() if not has]
    env = {"TCBYPASS_KERNEL_LACKS": ",".join(lacks)} if lacks else {}
    env[ENV_DATAPATH] = SYSTEM
    if accel == "tcg":
        env["TCBYPASS_TRAFFIC_SLOWDOWN"] = str(TCG_TRAFFIC_SLOWDOWN)
    return env


# --- qemu ------------------------------------------------------------------------

def kernel_cmdline() -> str:
    return (f"root=/dev/vda rw rootfstype=ext4 init={GUEST_INIT} console=ttyS0 panic=-1 "
            "fsck.mode=skip quiet loglevel=3")


def qemu_argv(image: Image, share: Path, accel: str, memory: int = 2048, cpus: int = 2) -> list[str]:
    """The guest: the image's kernel and initramfs, its root on virtio-blk behind
    a throwaway overlay (snapshot=on: the cached file is only read), the run
    directory as a 9p share, the first serial port on stdio."""
    accel_args = ["-accel", "kvm", "-cpu", "host"] if accel == "kvm" else ["-accel", "tcg,thread=multi",
                                                                            "-cpu", "max"]
    return [QEMU, "-name", "tcbypass-kernel-matrix", *accel_args, "-m", str(memory), "-smp", str(cpus),
            "-nodefaults", "-no-user-config", "-display", "none", "-serial", "stdio", "-no-reboot",
            "-kernel", str(image.vmlinuz), "-initrd", str(image.initrd), "-append", kernel_cmdline(),
            "-drive", f"file={image.rootfs},format=raw,if=virtio,snapshot=on,cache=unsafe",
            "-virtfs", f"local,path={share},mount_tag={SHARE_TAG},security_model=none,id={SHARE_TAG}"]


def choose_accel(requested: str, image: Image) -> str:
    """"kvm" or "tcg" for this image (accel.py: the lab's one probe)."""
    return pick_accel(requested, str(image.vmlinuz))


# --- one kernel ------------------------------------------------------------------------

def recipe_for(target: KernelTarget, repo: Path = REPO) -> ImageRecipe:
    reqs = requirements_from_pyproject((repo / "pyproject.toml").read_text())
    return ImageRecipe(target, GUEST_PACKAGES, reqs)


def run_kernel(target: KernelTarget, groups: Sequence[TestGroup], run_dir: Path, *,
               cache_dir: str = DEFAULT_CACHE_DIR, accel: str = "auto", rebuild: bool = False,
               repo: Path = REPO) -> KernelResult:
    """Build or reuse the image of `target`, boot it, run `groups`, collect."""
    run_dir.mkdir(parents=True, exist_ok=True)
    try:
        image, build_seconds = ensure_image(recipe_for(target, repo), cache_dir, rebuild=rebuild)
    except TcbError as exc:
        return KernelResult(target.name, error=f"image: {exc}")
    share = run_dir / "share"
    shutil.rmtree(share, ignore_errors=True)
    (share / "out").mkdir(parents=True)
    pack_checkout(repo, share / "src.tar")
    chosen = choose_accel(accel, image)
    env = guest_env(image.kernel_version, chosen)
    (share / "job.sh").write_text(job_script(groups, env))
    argv = qemu_argv(image, share, chosen)
    limit = BOOT_LIMIT + DOCTOR_LIMIT + sum(g.limit for g in groups) + RUN_SLACK
    log.info("booting %s (%s, %s), limit %d s", target.name, image.kernel_version, chosen, limit)
    fields = dict(accel=chosen, build_seconds=build_seconds, image=image.manifest)
    started = time.monotonic()
    child = Child(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    console = SerialConsole(child.proc.stdout, str(run_dir / "console.log"))
    lines: list[str] = []
    error = ""
    boot_seconds = 0.0
    try:
        booted = console.wait_for(lambda l: BOOTED_MARKER in l or EXIT_MARKER in l, BOOT_LIMIT, collect=lines)
        boot_seconds = round(time.monotonic() - started, 1)
        if booted is None:
            error = f"the guest did not come up within {BOOT_LIMIT} s: {console.last(8)}"
        elif BOOTED_MARKER not in booted:
            error = f"the guest's init failed before the job ({booted.strip()}): {console.last(8)}"
        else:
            left = limit - (time.monotonic() - started)
            done = console.wait_for(lambda l: EXIT_MARKER in l, left, collect=lines)
            if done is None:
                error = (f"the guest did not finish within {limit} s" if not console.eof
                         else f"the guest stopped without finishing: {console.last(8)}")
        # Give the power-off a moment, then make sure qemu is gone.
        with contextlib.suppress(subprocess.TimeoutExpired):
            child.proc.wait(timeout=20)
    finally:
        child.kill(grace=2)
        console.close()
    fields.update(boot_seconds=boot_seconds, run_seconds=round(time.monotonic() - started, 1), error=error)
    result = collect(target.name, share / "out", lines, [g.name for g in groups], **fields)
    # Keep what the job wrote next to the console log; the checkout copy goes.
    with contextlib.suppress(OSError):
        (share / "src.tar").unlink()
    (run_dir / "result.json").write_text(json.dumps(result.to_json(), indent=2) + "\n")
    return result


def run_matrix(names: Sequence[str], selection: str, out_dir: Path, **kwargs) -> list[KernelResult]:
    known = targets()
    unknown = [n for n in names if n not in known]
    if unknown:
        raise MatrixError(f"unknown kernel {', '.join(unknown)}", hint=f"choose from {', '.join(known)}")
    if selection not in SELECTIONS:
        raise MatrixError(f"unknown selection {selection!r}", hint=f"choose from {', '.join(SELECTIONS)}")
    results = []
    for name in names:
        results.append(run_kernel(known[name], SELECTIONS[selection], out_dir / name, **kwargs))
    (out_dir / "results.json").write_text(json.dumps([r.to_json() for r in results], indent=2) + "\n")
    (out_dir / "results.md").write_text(markdown_table(results))
    return results


def listing() -> list[str]:
    """The targets and the test groups of every selection, a line each."""
    lines = [f"{t.name:6} {t.suite:10} {' '.join(t.kernel_packages)}  {t.note}" for t in targets().values()]
    lines += [f"{name:5} {g.name:10} {g.limit:5d} s  {' '.join(g.args)}"
              for name, groups in SELECTIONS.items() for g in groups]
    return lines


def load_results(paths: Sequence[Path]) -> list[KernelResult]:
    """Earlier runs, from their result.json or results.json."""
    return [KernelResult.from_json(item) for path in paths for item in _as_list(json.loads(path.read_text()))]


def adhoc_selection(pytest_args: str) -> str:
    """A selection of one group running these pytest arguments (development)."""
    SELECTIONS["adhoc"] = (TestGroup("adhoc", tuple(shlex.split(pytest_args)), 3600,
                                     "tests named on the command line"),)
    return "adhoc"


def default_out(cache_dir: str) -> Path:
    return Path(cache_dir) / "results" / time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())


def _as_list(data) -> list:
    return data if isinstance(data, list) else [data]

