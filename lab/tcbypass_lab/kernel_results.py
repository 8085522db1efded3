"""What a kernel-matrix run found, and the table it is reported in (see kernels.py).

The guest leaves in the run's share one JUnit XML per test group, what
`tcbypass doctor --json` printed (`doctor.json`) and `facts.json`; its console
carries one end marker per group with the exit code and milliseconds.
`collect` turns those into a `KernelResult`, which round-trips through JSON
(`results.json`), and `markdown_table` / `failures` render results for people.

The product probes the kernel's features and never reads its version. The
lab does read it, once, to check the probes: `expected_features` says what a
kernel of that release has (from the release that brought each feature), and
a result whose doctor found something else, or chose another path, fails.
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

# The release that brought each feature `tcbypass doctor --json` reports
# (tcbypass/features.py probes them): tcx links (6.6), bpf_redirect_peer()
# (5.10), devmap lookups from programs (5.1), BPF_ENABLE_STATS (5.8), BPF memory charged
# to the memory cgroup instead of RLIMIT_MEMLOCK (5.11).
# kernel_types_peer is not here: Linux 6.15 brought it, but stable kernels
# took it too (Debian 12's 6.1.0-57 has it, Debian 11's 5.10.0-46 not), so
# only the probe can tell.
FEATURE_SINCE = {"tcx": (6, 6), "redirect_peer": (5, 10), "devmap_lookup": (5, 1), "run_time_stats": (5, 8),
                 "memcg_accounting": (5, 11)}


def expected_features(kernel: str) -> dict[str, bool]:
    """What a kernel of this release ("6.1.0-57-amd64") offers, by feature; {} for an unknown release."""
    m = re.match(r"(\d+)\.(\d+)", kernel)
    return {name: (int(m[1]), int(m[2])) >= since for name, since in FEATURE_SINCE.items()} if m else {}


def expected_path(features: dict[str, bool]) -> dict[str, str]:
    """The path attach must take with these features (doctor's "path")."""
    return {"hook": "tcx" if features.get("tcx") else "clsact",
            "from_vm": "peer" if features.get("redirect_peer") else "redirect"}


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
    doctor: dict | None = None  # what tcbypass doctor --json printed
    doctor_error: str = ""  # its stderr's last lines when it printed no JSON
    doctor_rc: int | None = None
    doctor_seconds: float = 0.0
    facts: dict = field(default_factory=dict)
    image: dict = field(default_factory=dict)  # the image manifest
    groups: tuple[GroupResult, ...] = ()
    error: str = ""

    @property
    def features(self) -> dict:
        return (self.doctor or {}).get("features") or {}

    @property
    def path(self) -> dict:
        return (self.doctor or {}).get("path") or {}

    @property
    def doctor_problems(self) -> list[str]:
        """Where doctor failed, or disagrees with what a kernel of this release offers."""
        if self.doctor is None:
            return [f"doctor printed no JSON: {self.doctor_error or 'nothing'}"]
        problems = [f"doctor: {c.get('name')}: {c.get('detail')}" for c in self.doctor.get("checks", [])
                    if not c.get("ok") and c.get("required", True)]
        want = expected_features(self.kernel)
        problems += [f"doctor found {name} {'missing' if want[name] else 'present'}; Linux "
                     f"{'.'.join(map(str, FEATURE_SINCE[name]))}+ has it" for name in want
                     if self.features.get(name) != want[name]]
        if want and self.path != expected_path(want):
            problems.append(f"doctor chose {self.path or 'no path'}, not {expected_path(want)}")
        return problems

    @property
    def ok(self) -> bool:
        return (not self.error and not self.doctor_problems and bool(self.groups)
                and all(g.ok for g in self.groups))

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


def read_doctor(out: Path) -> tuple[dict | None, str]:
    """doctor --json's document, or None and the end of what it said instead."""
    with contextlib.suppress(OSError, ValueError):
        data = json.loads((out / "doctor.json").read_text())
        if isinstance(data, dict):
            return data, ""
    return None, _tail(out / "doctor.err") or _tail(out / "doctor.json")


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
    doctor, doctor_error = read_doctor(out)
    return KernelResult(target, kernel=facts.get("uname", ""), doctor=doctor, doctor_error=doctor_error,
                        doctor_rc=doctor_rc, doctor_seconds=doctor_seconds, facts=facts, groups=tuple(results),
                        **fields)


def _tail(path: Path, n: int = 5) -> str:
    with contextlib.suppress(OSError):
        return " | ".join(path.read_text(errors="replace").strip().splitlines()[-n:])
    return ""


# --- the report ----------------------------------------------------------------------

def path_text(r: KernelResult) -> str:
    """The path doctor reports: "clsact, peer"."""
    return ", ".join(r.path[k] for k in ("hook", "from_vm") if r.path.get(k)) or "none reported"


def features_text(r: KernelResult) -> str:
    """The features doctor found: "redirect_peer, devmap_lookup, run_time_stats; no tcx"."""
    found = [name for name, has in r.features.items() if has]
    missing = [name for name, has in r.features.items() if not has]
    return "; ".join(filter(None, [", ".join(found), "no " + ", ".join(missing) if missing else ""])) or "?"


def tests_text(g: GroupResult) -> str:
    """ "explicit: 15 passed, 14 skipped (no tcx)": skips named by their reason's head."""
    reasons: dict[str, int] = {}
    for c in g.cases:
        if c.outcome == "skipped":
            head = c.message.split(":", 1)[0].strip() or "no reason"
            reasons[head] = reasons.get(head, 0) + 1
    parts = [f"{g.count(o)} {o}" for o in ("passed", "failed", "error", "skipped") if g.count(o)]
    why = ", ".join(k if len(reasons) == 1 else f"{k}: {n}" for k, n in reasons.items())
    return f"{g.name}: {', '.join(parts) or 'none'}" + (f" ({why})" if why else "")


def markdown_table(results: Sequence[KernelResult]) -> str:
    rows = ["| kernel | path (hook, from the VM) | features | tests run | result | time |",
            "|---|---|---|---|---|---|"]
    for r in results:
        kernel = f"{r.target} ({r.kernel})" if r.kernel else r.target
        groups = "; ".join(tests_text(g) for g in r.groups) or "none"
        result = "pass" if r.ok else "FAIL: " + "; ".join(
            [r.error] if r.error else [*r.doctor_problems, *(f"{g.name} {g.summary}" for g in r.groups if not g.ok)])
        timing = ", ".join([f"image build {r.build_seconds:.0f} s" if r.build_seconds else "image cached",
                            f"boot {r.boot_seconds:.0f} s", f"doctor {r.doctor_seconds:.0f} s",
                            *(f"{g.name} {g.seconds:.0f} s" for g in r.groups)])
        rows.append(f"| {kernel} | {path_text(r)} | {features_text(r)} | {groups} | {result} | "
                    f"{r.run_seconds:.0f} s under {r.accel or '?'}: {timing} |")
    return "\n".join(rows) + "\n"


def failures(results: Sequence[KernelResult]) -> list[str]:
    out = []
    for r in results:
        if r.error:
            out.append(f"{r.target}: {r.error}")
        else:
            out += [f"{r.target}: {p}" for p in r.doctor_problems]
        for g in r.groups:
            if g.rc is None or (g.rc != 0 and not g.cases):
                out.append(f"{r.target} {g.name}: {g.summary} {g.note}".rstrip())
            for c in g.cases:
                if c.outcome in ("failed", "error"):
                    out.append(f"{r.target} {c.nodeid}: {c.outcome}: {c.message}")
    return out


