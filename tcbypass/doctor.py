"""`tcbypass doctor`: can this node run the bypass, and which path will it take?

Each check says how to fix itself. The kernel's features are probed, not
read off its version (features.py), and the path attach will choose is
reported with them, so that `doctor` on two kernels shows why they differ.
"""

from __future__ import annotations

import contextlib
import os
import platform
import uuid
from dataclasses import asdict, dataclass

from . import bpfsys, build, features, loader


@dataclass(frozen=True)
class Check:
    name: str
    ok: bool
    detail: str
    fix: str = ""
    required: bool = True  # a failed optional check is reported but is not a failure


@dataclass(frozen=True)
class Report:
    checks: tuple[Check, ...]
    features: features.Features | None
    hook: str  # what attach would choose here ("" when it cannot attach)
    from_vm: str

    @property
    def ok(self) -> bool:
        return all(c.ok or not c.required for c in self.checks)

    def to_json(self) -> dict:
        return {"ok": self.ok, "kernel": platform.release(),
                "features": self.features.to_json() if self.features else None,
                "path": {"hook": self.hook, "from_vm": self.from_vm},
                "checks": [asdict(c) for c in self.checks]}


def _root() -> Check:
    ok = os.geteuid() == 0
    caps, missing = "", ""
    try:
        with open("/proc/self/status") as f:
            eff = next(line.split()[1] for line in f if line.startswith("CapEff:"))
        value = int(eff, 16)
        # CAP_NET_ADMIN 12, CAP_SYS_ADMIN 21, CAP_BPF 39
        have = {name: bool(value >> bit & 1) for name, bit in (("NET_ADMIN", 12), ("SYS_ADMIN", 21), ("BPF", 39))}
        caps = ", ".join(f"CAP_{k}" for k, v in have.items() if v)
        # setns() into a pod's namespace needs CAP_SYS_ADMIN, which also stands in for CAP_BPF
        # (and is what container runtimes' seccomp profiles ask before they allow bpf(2)).
        missing = ", ".join(f"CAP_{k}" for k in ("NET_ADMIN", "SYS_ADMIN") if not have[k])
        ok = ok and not missing
    except (OSError, StopIteration, ValueError):
        pass
    return Check("root and capabilities", ok,
                 f"euid {os.geteuid()}, {caps or 'no capabilities'}" + (f"; missing {missing}" if missing else ""),
                 "run as root (sudo tcbypass ...), or give the agent CAP_NET_ADMIN and CAP_SYS_ADMIN")


def _bpffs() -> Check:
    if missing := loader.bpffs_missing():
        return Check("bpffs", False, missing, f"mount -t bpf bpf {loader.BPFFS}")
    writable = os.access(loader.BPFFS, os.W_OK)
    return Check("bpffs", writable, f"mounted on {loader.BPFFS}" + ("" if writable else " (read-only)"),
                 f"remount it read-write: mount -o remount,rw {loader.BPFFS}")


def _run_dir() -> Check:
    """Locks and clsact ownership markers: shared by every tcbypass on the node."""
    from .attachments import LOCK_DIR

    try:
        os.makedirs(LOCK_DIR, exist_ok=True)
        problem = "" if os.access(LOCK_DIR, os.W_OK) else "is read-only"
    except OSError as exc:
        problem = f"cannot be created ({exc.strerror})"
    return Check("run directory", not problem, f"{LOCK_DIR} " + (problem or "is writable"),
                 f"make {os.path.dirname(LOCK_DIR)} writable; a container must mount the node's own there "
                 "(node hooks and the CLI lock the same files)")


def _features(found: features.Features) -> list[Check]:
    yes = {True: "yes", False: "no"}
    return [
        Check("tcx links", found.tcx, f"{yes[found.tcx]}" + ("" if found.tcx else ": clsact filters instead "
              "(a qdisc graft on first attach can drop a frame in flight)"), "Linux 6.6 or newer has tcx",
              required=False),
        Check("bpf_redirect_peer", found.redirect_peer,
              f"{yes[found.redirect_peer]}" + (("; the kernel types the frames it hands over itself, so the "
                                                "program need not" if found.kernel_types_peer else
                                                "; the program sets the packet type of the frames it hands over")
                                               if found.redirect_peer else
                                               ": frames from the VM go through the pod NIC's queue"),
              "Linux 5.10 or newer has it", required=False),
        Check("devmap lookup from tc", found.devmap_lookup,
              yes[found.devmap_lookup] + (" (a deleted tap falls back to the bridge at once)"
                                          if found.devmap_lookup else ""),
              "this kernel is too old for the fast path (it needs devmap lookups from tc programs)"),
    ]


MEMLOCK_ENOUGH = 64 << 20  # room for a node full of attachments (about 14 KiB each) and the compiler's


def _locked_memory() -> Check:
    """Kernels before 5.11 charge BPF objects to RLIMIT_MEMLOCK (64 KiB by default before 5.16)."""
    import resource

    found = features.allow_locked_memory()
    if not found.charged:
        return Check("locked memory", True, "not charged: BPF memory goes to the memory cgroup (Linux 5.11+)")
    shown = "unlimited" if found.unlimited else f"{found.now // 1024} KiB"
    before = "unlimited" if found.before == resource.RLIM_INFINITY else f"{found.before // 1024} KiB"
    ok = found.unlimited or found.now >= MEMLOCK_ENOUGH
    return Check("locked memory", ok,
                 f"this kernel charges BPF objects to RLIMIT_MEMLOCK; limit {before}, raised to {shown}"
                 + (f" ({found.error})" if found.error else ""),
                 "give tcbypass CAP_SYS_RESOURCE, or raise the hard limit it inherits: "
                 "ulimit -l unlimited, LimitMEMLOCK=infinity in a systemd unit, or the container runtime's "
                 "memlock ulimit")


def _program(which: build.Build) -> Check:
    """A prepared build in the cache, or the means to compile one."""
    cached = build.cached(which)
    if cached is not None:
        return Check("program build", True, f"prepared: {build.cache_path(which)} (bcc {cached.bcc_version}); "
                     "attach needs no compiler")
    version = build.bcc_version()
    headers = f"/lib/modules/{platform.release()}/build"
    if version and os.path.isdir(f"{headers}/include"):
        target = os.path.realpath(headers)
        note = "" if platform.release() in target else f" (headers of another kernel: {os.path.basename(target)})"
        return Check("program build", True, f"not prepared yet; bcc {version} and headers {target}{note} will "
                     "compile it on the first attach", "")
    missing = "bcc (python3-bpfcc)" if not version else f"kernel headers ({headers})"
    return Check("program build", False, f"no prepared build in {build.cache_dir()}, and no {missing} to compile one",
                 "run 'tcbypass prepare' where bcc and headers are installed and ship the cache directory "
                 "(see docs/deploy.md), or run scripts/setup.sh here")


def _load(which: build.Build) -> Check:
    """Build (or take from the cache), load and pin a scratch instance, then remove it."""
    scratch = f"{loader.PIN_ROOT}/doctor-{uuid.uuid4().hex[:8]}"
    try:
        loader.load_and_pin(scratch, which)
    except Exception as exc:  # any failure is the finding
        return Check("verifier", False, str(exc), "fix the checks above first; then run with --debug")
    finally:
        with contextlib.suppress(Exception):
            loader.remove_pins(scratch)
    return Check("verifier", True, "the kernel accepts both programs")


def _hook(hook: str) -> Check:
    """Hook a do-nothing program onto a scratch device in a scratch namespace."""
    from pyroute2 import IPRoute, netns as pnetns

    from . import netns

    name = f"tcbdoc-{uuid.uuid4().hex[:8]}"
    try:
        pnetns.create(name)
    except Exception as exc:  # as below: any failure is the finding
        with contextlib.suppress(OSError):
            pnetns.remove(name)
        return Check(f"{hook} hook", False, f"cannot make a scratch network namespace in {netns.NETNS_RUN_DIR} "
                     f"({exc})", f"{netns.NETNS_RUN_DIR} must be writable; a container must mount the node's own "
                     "there, where the pods' namespaces are")
    try:
        with IPRoute(netns=name, flags=0) as ipr:
            ipr.link("add", ifname="tcbd0", kind="veth", peer="tcbd1")
            idx = ipr.link_lookup(ifname="tcbd0")[0]
            if hook == features.HOOK_TCX:
                prog = bpfsys.prog_load("tcb_doctor", features._EXIT_UNSPEC)
                try:
                    link = netns.run_in(f"/var/run/netns/{name}", lambda: bpfsys.tcx_link_create(prog, idx))
                    os.close(link)
                finally:
                    os.close(prog)
            else:
                ipr.tc("add", kind="clsact", index=idx)
                ipr.tc("del", kind="clsact", index=idx)
    except Exception as exc:
        fix = ("the kernel needs CONFIG_NET_XGRESS (tcx)" if hook == features.HOOK_TCX else
               "the kernel needs CONFIG_NET_SCH_INGRESS and CONFIG_NET_CLS_BPF")
        return Check(f"{hook} hook", False, f"cannot hook a program ({exc})", fix)
    finally:
        with contextlib.suppress(OSError):
            pnetns.remove(name)
    return Check(f"{hook} hook", True, "a program hooks onto a device's ingress")


def run() -> Report:
    checks = [_root(), _bpffs(), _run_dir()]
    if not all(c.ok for c in checks):
        return Report(tuple(checks), None, "", "")
    found = features.probe()
    which = build.Build(no_peer=not found.redirect_peer)
    checks += _features(found)
    checks.append(_locked_memory())
    checks.append(_program(which))
    if all(c.ok or not c.required for c in checks):
        checks += [_hook(found.best_hook), _load(which)]
    ok = all(c.ok or not c.required for c in checks)
    from_vm = features.MODE_PEER if found.redirect_peer else features.MODE_REDIRECT
    return Report(tuple(checks), found, found.best_hook if ok else "", from_vm if ok else "")
