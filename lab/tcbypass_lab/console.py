"""A qemu guest's serial console, read line by line on a thread of its own."""

from __future__ import annotations

import collections
import contextlib
import os
import threading
import time
from typing import Callable


class SerialConsole:
    """Reads qemu's serial output on a thread and hands complete lines to waiters."""

    def __init__(self, stream, log_path: str | None = None, tail: int = 400):
        self._stream = stream
        self._cond = threading.Condition()
        self._lines: collections.deque[str] = collections.deque()  # not yet consumed by a waiter
        self.tail: collections.deque[str] = collections.deque(maxlen=tail)
        self.eof = False
        self._log = open(log_path, "a", encoding="utf-8") if log_path else None
        self._thread = threading.Thread(target=self._pump, name="tcb-guest-console", daemon=True)
        self._thread.start()

    def _pump(self) -> None:
        fd = self._stream.fileno()
        pending = b""
        try:
            while True:
                try:
                    chunk = os.read(fd, 65536)
                except OSError:
                    break
                if not chunk:
                    break
                pending += chunk
                *complete, pending = pending.split(b"\n")
                if complete:
                    self._feed([raw.decode("utf-8", "replace").rstrip("\r") for raw in complete])
        finally:
            if pending:
                self._feed([pending.decode("utf-8", "replace").rstrip("\r")])
            with self._cond:
                self.eof = True
                self._cond.notify_all()

    def _feed(self, lines: list[str]) -> None:
        with self._cond:
            self._lines.extend(lines)
            self.tail.extend(lines)
            if self._log:
                self._log.write("".join(f"{line}\n" for line in lines))
                self._log.flush()
            self._cond.notify_all()

    def wait_for(self, match: Callable[[str], bool], timeout: float,
                 collect: list[str] | None = None) -> str | None:
        """Consume lines until one satisfies `match`; return it, or None on
        timeout or end of output. Consumed lines that do not match go to `collect`."""
        deadline = time.monotonic() + max(timeout, 0.0)
        with self._cond:
            while True:
                while self._lines:
                    line = self._lines.popleft()
                    if match(line):
                        return line
                    if collect is not None:
                        collect.append(line)
                left = deadline - time.monotonic()
                if self.eof or left <= 0:
                    return None
                self._cond.wait(left)

    def discard(self) -> None:
        with self._cond:
            self._lines.clear()

    def close(self) -> None:
        self._thread.join(timeout=2)
        with contextlib.suppress(OSError):
            self._stream.close()
        if self._log:
            self._log.close()

    def last(self, n: int = 30) -> str:
        return "\n".join(list(self.tail)[-n:])


