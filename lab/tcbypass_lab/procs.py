"""Child processes that never outlive us: qemu guests, their DHCP server, the lab's daemons."""

from __future__ import annotations

import atexit
import os
import signal
import subprocess
import threading
from typing import Sequence


class Child:
    """A process we started in its own process group, with SIGKILL as its
    parent-death signal, optionally inside a network namespace.

    The death signal is tied to the *thread* that spawned it: spawn from a
    thread that lives as long as the child should (the main thread in tests).
    The set of live children is the one piece of process-wide state here: the
    atexit hook needs it.
    """

    _live: "set[Child]" = set()
    _lock = threading.Lock()

    def __init__(self, argv: Sequence[str], netns_path: str | None = None, **popen):
        wrapped = ["setpriv", "--pdeathsig", "KILL"]
        if netns_path:
            wrapped += ["nsenter", f"--net={netns_path}", "--"]
        self.argv = list(argv)
        self.proc = subprocess.Popen([*wrapped, *argv], start_new_session=True, close_fds=True, **popen)
        with Child._lock:
            Child._live.add(self)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def kill(self, grace: float = 3.0) -> int | None:
        """SIGTERM the group, SIGKILL it after `grace` seconds, reap. Idempotent.

        The group is only signalled while its leader is unreaped, so its id
        cannot have been reused. setpriv and nsenter exec, so the leader is
        the program itself."""
        try:
            if self.proc.poll() is None:
                self._signal(signal.SIGTERM)
                try:
                    self.proc.wait(timeout=grace)
                except subprocess.TimeoutExpired:
                    self._signal(signal.SIGKILL)
                    self.proc.wait(timeout=10)
        finally:
            with Child._lock:
                Child._live.discard(self)
        return self.proc.returncode

    def _signal(self, sig: int) -> None:
        try:
            os.killpg(self.proc.pid, sig)
        except (ProcessLookupError, PermissionError):
            pass

    @staticmethod
    def kill_all() -> None:
        with Child._lock:
            children = list(Child._live)
        for child in children:
            child.kill(grace=1.0)


atexit.register(Child.kill_all)


