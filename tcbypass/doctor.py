"""`tcbypass doctor`: can this node run the bypass? Each check says how to fix itself."""

from __future__ import annotations

import os
import platform
import uuid
from dataclasses import dataclass

from . import loader


@dataclass(frozen=True)
class Check:
    name: str
    ok: bool
    detail: str
    fix: str = ""


def _root() -> Check:
    ok = os.geteuid() == 0
    caps = ""
    try:
        with open("/proc/self/status") as f:
            eff = next(line.split()[1] for line in f if line.startswith("CapEff:"))
        value = int(eff, 16)
        # CAP_NET_ADMIN 12, CAP_SYS_ADMIN 21, CAP_BPF 39
        have = {name: bool(value >> bit & 1) for name, bit in (("NET_ADMIN", 12), ("SYS_ADMIN", 21), ("BPF", 39))}
        caps = ", ".join(f"CAP_{k}" for k, v in have.items() if v)
        ok = ok and have["NET_ADMIN"] and (have["BPF"] or have["SYS_ADMIN"])
    except (OSError, StopIteration, ValueError):
        pass
    return Check("root and capabilities", ok, f"euid {os.geteuid()}, {caps or 'no capabilities'}",
                 "run as root (sudo tcbypass ...), or give the agent CAP_BPF, CAP_NET_ADMIN and CAP_SYS_ADMIN")


def _bpffs() -> Check:
    if not os.path.ismount(loader.BPFFS):
        return Check("bpffs", False, f"{loader.BPFFS} is not mounted", f"mount -t bpf bpf {loader.BPFFS}")
    writable = os.access(loader.BPFFS, os.W_OK)
    return Check("bpffs", writable, f"mounted on {loader.BPFFS}" + ("" if writable else " (read-only)"),
                 f"remount it read-write: mount -o remount,rw {loader.BPFFS}")


def _headers() -> Check:
    kver = platform.release()
    build = f"/lib/modules/{kver}/build"
    if os.path.isdir(f"{build}/include"):
        target = os.path.realpath(build)
        note = "" if kver in target else f" (headers of another kernel: {os.path.basename(target)})"
        return Check("kernel headers", True, f"{build} -> {target}{note}")
    return Check("kernel headers", False, f"{build} is missing",
                 "run scripts/setup.sh (installs linux-headers and links the nearest ones if this kernel has none)")


def _bcc() -> Check:
    try:
        import bcc  # noqa: F401
    except ImportError:
        return Check("bcc", False, "python module bcc not importable",
                     "apt-get install python3-bpfcc; use a venv made with --system-site-packages")
    return Check("bcc", True, f"bcc {getattr(bcc, '__version__', '?')} at {os.path.dirname(bcc.__file__)}")


def _compile() -> Check:
    """Compile, load and pin a scratch instance, then remove it."""
    if os.geteuid() != 0:
        return Check("compile and load", False, "skipped: needs root", "run tcbypass doctor as root")
    scratch = f"{loader.PIN_ROOT}/doctor-{uuid.uuid4().hex[:8]}"
    try:
        loader.compile_and_pin(scratch)
    except Exception as exc:  # any failure is the finding
        return Check("compile and load", False, str(exc), "fix the checks above first; then run with --debug")
    finally:
        loader.remove_pins(scratch)
    return Check("compile and load", True, "redirect.c compiles and loads as SCHED_CLS")


def _clsact() -> Check:
    """Add and remove clsact on a scratch device in a scratch namespace."""
    if os.geteuid() != 0:
        return Check("clsact", False, "skipped: needs root", "run tcbypass doctor as root")
    from pyroute2 import IPRoute, netns as pnetns

    name = f"tcbdoc-{uuid.uuid4().hex[:8]}"
    try:
        pnetns.create(name)
        with IPRoute(netns=name, flags=0) as ipr:
            ipr.link("add", ifname="tcbd0", kind="veth", peer="tcbd1")
            idx = ipr.link_lookup(ifname="tcbd0")[0]
            ipr.tc("add", kind="clsact", index=idx)
            ipr.tc("del", kind="clsact", index=idx)
    except Exception as exc:
        return Check("clsact", False, f"cannot add clsact ({exc})", "the kernel needs CONFIG_NET_SCH_INGRESS "
                     "and CONFIG_NET_CLS_BPF")
    finally:
        try:
            pnetns.remove(name)
        except OSError:
            pass
    return Check("clsact", True, "clsact qdisc and bpf filters available")


def run_checks() -> list[Check]:
    checks = [_root(), _bpffs(), _headers(), _bcc()]
    if all(c.ok for c in checks):
        checks += [_clsact(), _compile()]
    return checks
