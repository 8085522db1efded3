"""Typed errors of the core. The CLI prints `str(err)` as one line and exits
with `err.exit_code`; `hint` says what to do next."""

from __future__ import annotations

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_DEGRADED = 3


class TcbError(Exception):
    exit_code = EXIT_FAILURE

    def __init__(self, message: str, hint: str = ""):
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return f"{self.message}; {self.hint}" if self.hint else self.message


class InputError(TcbError):
    """A value given on the command line is malformed."""

    exit_code = EXIT_USAGE


class NotRootError(TcbError):
    pass


class BpfError(TcbError):
    """bpffs, bcc, the compiler or the kernel refused something."""


class NetnsError(TcbError):
    """The pod's network namespace is missing or unreadable."""


class DeviceError(TcbError):
    """A device named for an attachment is missing or of the wrong kind."""


class TcError(TcbError):
    """Netlink refused a qdisc or filter change."""


class OvsdbError(TcbError):
    """The OVSDB server is missing, refusing, slow or answering garbage."""


class UnknownVmiError(TcbError):
    pass


class NotBypassableError(TcbError):
    """The VMI's interfaces are not wired in a way the bypass can serve."""


class BusyError(TcbError):
    """Another tcbypass process holds the attachment."""
