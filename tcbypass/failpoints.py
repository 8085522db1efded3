"""Fault injection at named points of the node tool, for the reliability tests.

$TCBYPASS_FAILPOINT holds one or more comma-separated specs:

    POINT                 die here, as `kill -9` would
    POINT=kill            the same
    POINT=sleep:SECONDS   stop here a while (opens a race window a test can hit on purpose)
    POINT=raise           raise an exception no code path expects (a stand-in for a bug)

and POINT/SUBJECT instead of POINT fires only for that subject (an
attachment name). Unset, a failpoint costs one environment lookup.
"""

from __future__ import annotations

import os
import signal
import time

ENV = "TCBYPASS_FAILPOINT"


class InjectedFault(RuntimeError):
    """What `POINT=raise` raises: deliberately not a TcbError."""


def _actions(point: str, subject: str) -> list[str]:
    found = []
    for spec in os.environ.get(ENV, "").split(","):
        where, _, action = spec.strip().partition("=")
        name, _, only = where.partition("/")
        if name == point and (not only or only == subject):
            found.append(action or "kill")
    return found


def hit(point: str, subject: str = "") -> None:
    """Act as $TCBYPASS_FAILPOINT says for `point` (and `subject`), if it names it."""
    if ENV not in os.environ:
        return
    for action in _actions(point, subject):
        kind, _, arg = action.partition(":")
        if kind == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        elif kind == "sleep":
            time.sleep(float(arg or 1))
        elif kind == "raise":
            raise InjectedFault(f"failpoint {point} ({subject or 'any'}): injected fault")
