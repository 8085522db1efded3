"""What a kernel-matrix run found, and the table it is reported in (see kernels.py).

The guest leaves in the run's share one JUnit XML per test group, `doctor.json`
(or `doctor.txt`) and `facts.json`; its console carries one end marker per
group with the exit code and milliseconds. `collect` turns those into a
`KernelResult`, which round-trips through JSON (`results.json`), and
`markdown_table` / `failures` render results for people.
"""

from __future__ import annotations

import contextlib
import json
import re
import xml.etree.ElementTree as ET
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

GROUP_MARKER = "TCB-MATRIX"


@dataclass(frozen=True)
class TestCase:
    nodeid: str
    outcome: str  # passed, failed, error, skipped
    seconds: float
    message: str = ""


@dataclass(frozen=True)
class GroupResult:
    name: str
    rc: int | None  # None: the group never finished (guest died or the run timed out)
    seconds: float
    cases: tuple[TestCase, ...] = ()
    note: str = ""

    @property
    def ok(self) -> bool:
        return self.rc == 0 and bool(self.cases) and not any(c.outcome in ("failed", "error") for c in self.cases)

    def count(self, outcome: str) -> int:
        return sum(1 for c in self.cases if c.outcome == outcome)

    @property
    def summary(self) -> str:
        if self.rc is None:
            return f"did not finish ({self.note or 'no result'})"
        parts = [f"{self.count(o)} {o}" for o in ("passed", "failed", "error", "skipped") if self.count(o)]
        text = ", ".join(parts) or "no test ran"
        if self.rc == 124 or self.rc == 137:
            text += f" (time limit hit, rc {self.rc})"
        return text


@dataclass(frozen=True)
class KernelResult:
    target: str
    kernel: str = ""  # uname -r in the guest
    accel: str = ""
    build_seconds: float = 0.0  # 0: cached image
    boot_seconds: float = 0.0
    run_seconds: float = 0.0  # qemu start to power-off
    doctor: dict | list | str | None = None  # JSON when the product has doctor --json, else its text
    doctor_rc: int | None = None
    doctor_seconds: float = 0.0
    facts: dict = field(default_factory=dict)
    image: dict = field(default_factory=dict)  # the image manifest
    groups: tuple[GroupResult, ...] = ()
    error: str = ""

    @property
    def ok(self) -> bool:
        return not self.error and bool(self.groups) and all(g.ok for g in self.groups)

    def to_json(self) -> dict:
        data = asdict(self)
        data["ok"] = self.ok
        for g, raw in zip(self.groups, data["groups"]):
            raw["ok"] = g.ok
        return data

    @classmethod
    def from_json(cls, data: dict) -> "KernelResult":
        data = {k: v for k, v in data.items() if k != "ok"}
        groups = tuple(GroupResult(**{**{k: v for k, v in g.items() if k != "ok"},
                                      "cases": tuple(TestCase(**c) for c in g["cases"])})
                       for g in data.pop("groups", ()))
        return cls(**data, groups=groups)


def parse_junit(text: str) -> tuple[TestCase, ...]:
    """The test cases of a pytest JUnit XML report."""
    root = ET.fromstring(text)
    cases = []
    for tc in root.iter("testcase"):
        cls, name = tc.get("classname", ""), tc.get("name", "")
        nodeid = f"{cls.replace('.', '/')}.py::{name}" if cls else name
        outcome, message = "passed", ""
        for child in tc:
            if child.tag in ("failure", "error", "skipped"):
                outcome = {"failure": "failed"}.get(child.tag, child.tag)
                message = _first_line(child.get("message") or child.text or "")
                break
        cases.append(TestCase(nodeid, outcome, round(float(tc.get("time") or 0), 2), message))
    return tuple(cases)


_EXCEPTION_RE = re.compile(r"^[A-Za-z_][\w.]*(?:Error|Exception|Exit): \S")


def _first_line(text: str, limit: int = 400) -> str:
    """The line of a failure message that says what went wrong: the first, unless
    it only announces a traceback (a CLI that crashed), then the exception that ended it."""
    lines = [l.strip() for l in text.strip().splitlines() if l.strip()]
    line = lines[0] if lines else ""
    if line.endswith("Traceback (most recent call last):"):
        raised = [l for l in lines[1:] if _EXCEPTION_RE.match(l)]
        if raised:
            line = f"{line.split(':', 1)[0]}: traceback ending in {raised[-1]}"
    return line if len(line) <= limit else line[:limit - 3] + "..."


def parse_marks(lines: Iterable[str]) -> dict[str, tuple[int, float]]:
    """{group or "doctor": (exit code, seconds)} from the console's end markers."""
    found = {}
    for line in lines:
        m = re.search(rf"{GROUP_MARKER} group-end (\S+) (\d+) (\d+)\s*$", line)
        if m:
            found[m[1]] = (int(m[2]), int(m[3]) / 1000)
            continue
        m = re.search(rf"{GROUP_MARKER} doctor-end (\d+) (\d+)\s*$", line)
        if m:
            found["doctor"] = (int(m[1]), int(m[2]) / 1000)
    return found


def read_doctor(out: Path) -> dict | list | str | None:
    """doctor --json's document, or the text of plain doctor, or None."""
    with contextlib.suppress(OSError, ValueError):
        text = (out / "doctor.json").read_text()
        if text.strip():
            return json.loads(text)
    for name in ("doctor.txt", "doctor.json", "doctor.err"):
        with contextlib.suppress(OSError):
            text = (out / name).read_text().strip()
            if text:
                return text
    return None


def collect(target: str, out: Path, console_lines: Sequence[str], groups: Sequence[str],
            **fields) -> KernelResult:
    """A KernelResult from what the job left in `out` and the console's markers."""
    marks = parse_marks(console_lines)
    results = []
    for name in groups:
        cases: tuple[TestCase, ...] = ()
        note = ""
        with contextlib.suppress(OSError):
            try:
                cases = parse_junit((out / f"{name}.xml").read_text())
            except ET.ParseError as exc:
                note = f"unreadable JUnit XML ({exc})"
        rc, seconds = marks.get(name, (None, 0.0))
        if rc is not None and not cases and not note:
            note = _tail(out / f"{name}.log")
        results.append(GroupResult(name, rc, seconds, cases, note or ("" if rc is not None else "no end marker")))
    facts = {}
    with contextlib.suppress(OSError, ValueError):
        facts = json.loads((out / "facts.json").read_text())
    doctor_rc, doctor_seconds = marks.get("doctor", (None, 0.0))
    return KernelResult(target, kernel=facts.get("uname", ""), doctor=read_doctor(out), doctor_rc=doctor_rc,
                        doctor_seconds=doctor_seconds, facts=facts, groups=tuple(results), **fields)


def _tail(path: Path, n: int = 5) -> str:
    with contextlib.suppress(OSError):
        return " | ".join(path.read_text(errors="replace").strip().splitlines()[-n:])
    return ""


# --- the report ----------------------------------------------------------------------

def hook_path(doctor) -> str:
    """The attach path the product reports choosing, when its doctor says so in
    JSON; "not reported" otherwise (the runner does not guess it)."""
    return _find_hook(doctor) or "not reported"


def _find_hook(doctor) -> str:
    if isinstance(doctor, dict):
        for key in ("hook", "hook_path", "attach_path", "path", "datapath", "mode"):
            value = doctor.get(key)
            if isinstance(value, str) and value:
                return value
        doctor = list(doctor.values())
    if isinstance(doctor, list):
        for value in doctor:
            found = _find_hook(value)
            if found:
                return found
    return ""


def markdown_table(results: Sequence[KernelResult]) -> str:
    rows = ["| kernel | hook path | tests run | result | time |", "|---|---|---|---|---|"]
    for r in results:
        kernel = f"{r.target} ({r.kernel})" if r.kernel else r.target
        groups = ", ".join(f"{g.name}: {len(g.cases)}" for g in r.groups) or "none"
        result = "pass" if r.ok else "FAIL: " + (r.error or "; ".join(
            f"{g.name} {g.summary}" for g in r.groups if not g.ok))
        timing = ", ".join([f"image build {r.build_seconds:.0f} s" if r.build_seconds else "image cached",
                            f"boot {r.boot_seconds:.0f} s", f"doctor {r.doctor_seconds:.0f} s",
                            *(f"{g.name} {g.seconds:.0f} s" for g in r.groups)])
        rows.append(f"| {kernel} | {hook_path(r.doctor)} | {groups} | {result} | "
                    f"{r.run_seconds:.0f} s under {r.accel or '?'}: {timing} |")
    return "\n".join(rows) + "\n"


def failures(results: Sequence[KernelResult]) -> list[str]:
    out = []
    for r in results:
        if r.error:
            out.append(f"{r.target}: {r.error}")
        for g in r.groups:
            if g.rc is None or (g.rc != 0 and not g.cases):
                out.append(f"{r.target} {g.name}: {g.summary} {g.note}".rstrip())
            for c in g.cases:
                if c.outcome in ("failed", "error"):
                    out.append(f"{r.target} {c.nodeid}: {c.outcome}: {c.message}")
    return out


