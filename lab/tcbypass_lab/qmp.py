"""A small QMP client: QEMU's machine protocol over its unix socket.

The lab drives its guests the way KubeVirt's virt-launcher drives QEMU
through libvirt: migrate (and cancel), announce-self, stop and cont (a
paused VM), netdev_add/device_add and device_del (NIC hotplug).
"""

from __future__ import annotations

import json
import socket
import time

from .qemu import GuestError


class Qmp:
    """One QMP session; use `with`. Events that arrive are kept in `events`."""

    def __init__(self, path: str, timeout: float = 30.0):
        self.path, self.timeout = path, timeout
        self.events: list[dict] = []
        self._sock: socket.socket | None = None
        self._stream = None

    def __enter__(self) -> "Qmp":
        deadline = time.monotonic() + self.timeout
        while True:  # qemu makes its socket a moment after it starts
            try:
                sock = socket.socket(socket.AF_UNIX)
                sock.settimeout(self.timeout)
                sock.connect(self.path)
                break
            except (FileNotFoundError, ConnectionRefusedError):
                sock.close()
                if time.monotonic() > deadline:
                    raise GuestError(f"no QMP socket at {self.path}") from None
                time.sleep(0.05)
        self._sock, self._stream = sock, sock.makefile("rwb")
        self._read()  # the greeting
        self.execute("qmp_capabilities")
        return self

    def __exit__(self, *exc) -> None:
        if self._sock is not None:
            self._stream.close()
            self._sock.close()
            self._sock = None

    def _read(self) -> dict:
        line = self._stream.readline()
        if not line:
            raise GuestError(f"QMP at {self.path} closed the connection")
        return json.loads(line)

    def execute(self, command: str, **arguments) -> object:
        """Run a command; its "return" value, or GuestError with QEMU's error."""
        request = {"execute": command, **({"arguments": arguments} if arguments else {})}
        self._stream.write(json.dumps(request).encode() + b"\n")
        self._stream.flush()
        while True:
            reply = self._read()
            if "event" in reply:
                self.events.append(reply)
                continue
            if "error" in reply:
                raise GuestError(f"QMP {command} failed: {reply['error'].get('desc', reply['error'])}")
            return reply.get("return")

    def status(self) -> str:
        """running, paused, inmigrate, postmigrate, ..."""
        return self.execute("query-status")["status"]

    def migration(self) -> dict:
        return self.execute("query-migrate")

    def wait_migration(self, timeout: float = 300.0) -> dict:
        """Until the migration started here completes, fails or is cancelled; query-migrate's last answer."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            info = self.migration()
            if info.get("status") in ("completed", "failed", "cancelled"):
                return info
            time.sleep(0.05)
        raise GuestError(f"the migration did not end within {timeout:.0f} s: {self.migration()}")
