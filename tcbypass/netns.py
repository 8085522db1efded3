"""Network namespaces: name or path -> a checked reference, and running a
function inside one.

Only the calling *thread* enters the namespace (setns on a fresh thread), so
the process keeps its own namespace and its bpffs view: `ip netns exec`
remounts /sys and would hide our pins.
"""

from __future__ import annotations

import ctypes
import os
import threading
from dataclasses import dataclass
from typing import Callable, TypeVar

from .errors import NetnsError

CLONE_NEWNET = 0x40000000
NETNS_RUN_DIR = "/var/run/netns"

T = TypeVar("T")


@dataclass(frozen=True)
class NetnsRef:
    """A network namespace file and the identity of the namespace behind it."""

    path: str
    dev: int
    ino: int

    @property
    def identity(self) -> str:
        return f"{self.dev}:{self.ino}"


def path_of(spec: str) -> str:
    """A name under /var/run/netns, or a path such as /proc/PID/ns/net."""
    if not spec:
        raise NetnsError("no network namespace given", hint="pass a name from 'ip netns list' or a path")
    return spec if "/" in spec else os.path.join(NETNS_RUN_DIR, spec)


def identity_of(path: str) -> str | None:
    """'dev:ino' of the namespace at `path`, or None when it is gone."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return f"{st.st_dev}:{st.st_ino}"


def forbidden(path: str) -> bool:
    """Is the namespace at `path` there but closed to us (another process's
    /proc/PID/ns/net without CAP_SYS_PTRACE)? Such a pod is not gone."""
    try:
        os.stat(path)
    except PermissionError:
        return True
    except OSError:
        return False
    return False


def resolve(spec: str) -> NetnsRef:
    """Check that `spec` names a network namespace we can enter."""
    path = path_of(spec)
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise NetnsError(f"network namespace {path} does not exist",
                         hint="is the pod running? check 'ip netns list' or the pod's /proc/PID/ns/net") from None
    except PermissionError as exc:
        raise NetnsError(f"cannot read network namespace {path} ({exc.strerror})", hint="run as root") from None
    except OSError as exc:
        raise NetnsError(f"{path} is not a network namespace ({exc.strerror})",
                         hint="pass a name from 'ip netns list' or a path such as /proc/PID/ns/net") from None
    ref = NetnsRef(path, st.st_dev, st.st_ino)
    run_in(ref.path, lambda: None)  # proves it is a netns and that setns works
    return ref


def libc() -> ctypes.CDLL:
    """The C library, for setns(2) and unshare(2); errno kept for ctypes.get_errno()."""
    return ctypes.CDLL(None, use_errno=True)


def run_in(path: str, fn: Callable[[], T]) -> T:
    """Run `fn` on a new thread that has entered the namespace at `path`."""
    result: list = []
    failure: list = []

    def body() -> None:
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as exc:
            failure.append(NetnsError(f"cannot open network namespace {path} ({exc.strerror})",
                                      hint="is the pod still running?"))
            return
        try:
            if libc().setns(fd, CLONE_NEWNET) != 0:
                err = ctypes.get_errno()
                failure.append(NetnsError(f"{path} is not a network namespace we can enter ({os.strerror(err)})",
                                          hint="pass /var/run/netns/NAME or /proc/PID/ns/net, as root"))
                return
        finally:
            os.close(fd)
        try:
            result.append(fn())
        except BaseException as exc:  # handed to the caller's thread
            failure.append(exc)

    thread = threading.Thread(target=body, name=f"netns:{path}", daemon=True)
    thread.start()
    thread.join()
    if failure:
        raise failure[0]
    return result[0]


def live_identities() -> set[str]:
    """dev:ino of every network namespace this node can see: named ones and those of processes."""
    found = set()
    candidates = [os.path.join(NETNS_RUN_DIR, n) for n in listdir(NETNS_RUN_DIR)]
    candidates += [f"/proc/{pid}/ns/net" for pid in listdir("/proc") if pid.isdigit()]
    for path in candidates:
        identity = identity_of(path)
        if identity:
            found.add(identity)
    return found


def listdir(path: str) -> list[str]:
    """The entries of a directory; none when it cannot be read."""
    try:
        return os.listdir(path)
    except OSError:
        return []
