"""Compile once: bpf/redirect.c -> a compiled object, kept on disk.

bcc (with clang and the kernel headers) is the slow part of loading a
program: hundreds of milliseconds, seconds on a busy node. But every
attachment runs the same instructions; only its maps differ. So the
program is compiled once per build and the result kept as an `Object`:
the instructions of both programs with each map reference recorded by map
name, and the shape of every map. Loading an attachment (loader.py) then
creates fresh maps and hands the instructions to the kernel: no bcc, no
headers.

The cache lives in /var/lib/tcbypass/objects (or $TCBYPASS_CACHE_DIR), one
JSON file per build, named by a key over the source, the build options and
the object format. A file records the bcc version that built it; where bcc
is installed and has another version, the entry is rebuilt. An entry that
is missing, unreadable, of another key or fails its checksum is rebuilt
with one log line saying why, and written atomically (rename), so readers
never see half a file and two builders racing end with one valid entry.

`tcbypass prepare` fills the cache ahead of time: a node image built with
it attaches without headers and without a compiler.

This is the only module that imports bcc, and only inside `compile_object`.
"""

from __future__ import annotations

import base64
import contextlib
import fcntl
import hashlib
import importlib.util
import json
import logging
import os
import re
import sys
import tempfile
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Iterator

from . import bpfsys
from .errors import BpfError
from .maps import CONFIG, PROG_FROM_VM, PROG_TO_VM, STATS, TAP, TEST_OUT

log = logging.getLogger(__name__)

FORMAT = 1  # of the cache files; bump when Object's encoding changes
ENV_CACHE_DIR = "TCBYPASS_CACHE_DIR"
DEFAULT_CACHE_DIR = "/var/lib/tcbypass/objects"
PROGRAMS = (PROG_FROM_VM, PROG_TO_VM)
LD_IMM64 = 0x18  # BPF_LD | BPF_IMM | BPF_DW: the instruction that loads a map
DEVMAP_KERNEL_FLAGS = 0x80  # BPF_F_RDONLY_PROG


@dataclass(frozen=True)
class Build:
    """Which program build: the options bpf/redirect.c is compiled with."""

    test: bool = False  # TCB_TEST: record redirects for BPF_PROG_TEST_RUN
    no_peer: bool = False  # TCB_NO_PEER: the kernel has no bpf_redirect_peer()

    def cflags(self) -> list[str]:
        flags = []
        if self.test:
            flags.append("-DTCB_TEST")
        if self.no_peer:
            flags.append("-DTCB_NO_PEER")
        return flags

    def map_names(self) -> tuple[str, ...]:
        return (CONFIG, TAP, STATS) + ((TEST_OUT,) if self.test else ())


def source_path() -> Path:
    """redirect.c as installed in the wheel, or in a source checkout."""
    packaged = resources.files("tcbypass") / "bpf" / "redirect.c"
    if packaged.is_file():
        return Path(str(packaged))
    return Path(__file__).resolve().parent.parent / "bpf" / "redirect.c"


def key(build: Build) -> str:
    """Names a build: the source, the options and the object format."""
    h = hashlib.sha256(source_path().read_bytes())
    h.update(" ".join(build.cflags()).encode())
    h.update(f"format {FORMAT}".encode())
    return h.hexdigest()[:16]


def bcc_version() -> str | None:
    """bcc's version, read from its package without importing it (importing
    bcc costs ~0.1 s and is needed only to compile); None without bcc."""
    try:
        spec = importlib.util.find_spec("bcc")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    for location in spec.submodule_search_locations:
        try:
            text = (Path(location) / "version.py").read_text()
        except OSError:
            continue
        found = re.search(r"__version__\s*=\s*['\"]([^'\"]+)", text)
        if found:
            return found.group(1)
    return None


# --- the object ------------------------------------------------------------------
@dataclass(frozen=True)
class MapSpec:
    name: str
    type: int
    key_size: int
    value_size: int
    max_entries: int
    flags: int = 0


@dataclass(frozen=True)
class ProgramSpec:
    name: str
    insns: bytes  # map references zeroed; see relocs
    relocs: tuple[tuple[int, str], ...]  # (index of the ld_imm64, map name)

    def linked(self, fds: dict[str, int]) -> bytes:
        """The instructions with every map reference pointing at `fds`."""
        code = bytearray(self.insns)
        for index, name in self.relocs:
            code[index * 8 + 4: index * 8 + 8] = fds[name].to_bytes(4, "little", signed=True)
        return bytes(code)


@dataclass(frozen=True)
class Object:
    """A compiled build of bpf/redirect.c, loadable without bcc."""

    key: str
    cflags: tuple[str, ...]
    bcc_version: str
    license: str
    maps: tuple[MapSpec, ...]
    programs: tuple[ProgramSpec, ...]

    def program(self, name: str) -> ProgramSpec:
        return next(p for p in self.programs if p.name == name)

    def _payload(self) -> dict:
        return {
            "format": FORMAT,
            "key": self.key,
            "cflags": list(self.cflags),
            "bcc_version": self.bcc_version,
            "license": self.license,
            "maps": [m.__dict__ for m in self.maps],
            "programs": [{"name": p.name, "insns": base64.b64encode(p.insns).decode(),
                          "relocs": [list(r) for r in p.relocs]} for p in self.programs],
        }

    def to_json(self) -> str:
        payload = self._payload()
        blob = json.dumps(payload, sort_keys=True)
        return json.dumps({"checksum": hashlib.sha256(blob.encode()).hexdigest(), "object": payload},
                          sort_keys=True, indent=1)

    @classmethod
    def from_json(cls, text: str) -> "Object":
        """Decode a cache file; ValueError saying what is wrong with it."""
        try:
            outer = json.loads(text)
            payload = outer["object"]
            blob = json.dumps(payload, sort_keys=True)
            if hashlib.sha256(blob.encode()).hexdigest() != outer["checksum"]:
                raise ValueError("checksum mismatch")
            if payload["format"] != FORMAT:
                raise ValueError(f"format {payload['format']}, not {FORMAT}")
            programs = tuple(ProgramSpec(p["name"], base64.b64decode(p["insns"], validate=True),
                                         tuple((int(i), str(n)) for i, n in p["relocs"]))
                             for p in payload["programs"])
            obj = cls(payload["key"], tuple(payload["cflags"]), payload["bcc_version"], payload["license"],
                      tuple(MapSpec(**m) for m in payload["maps"]), programs)
        except (KeyError, TypeError, AttributeError, json.JSONDecodeError, base64.binascii.Error) as exc:
            raise ValueError(f"not a tcbypass object ({exc.__class__.__name__}: {exc})") from None
        names = {m.name for m in obj.maps}
        for prog in obj.programs:
            if len(prog.insns) % 8 or any(n not in names or not 0 <= i < len(prog.insns) // 8
                                          for i, n in prog.relocs):
                raise ValueError(f"program {prog.name} is malformed")
        if {p.name for p in obj.programs} != set(PROGRAMS):
            raise ValueError("programs missing")
        return obj


def relocations(insns: bytes, names_by_fd: dict[int, str]) -> tuple[bytes, tuple[tuple[int, str], ...]]:
    """Find every ld_imm64 of a map fd in bcc's output; return the code with
    those fds zeroed and where each one was. Any other pseudo load is refused."""
    code = bytearray(insns)
    relocs = []
    for index in range(len(code) // 8):
        op, regs = code[index * 8], code[index * 8 + 1]
        if op != LD_IMM64:
            continue
        src = regs >> 4
        if src == 0:
            continue  # a plain 64-bit constant
        if src != bpfsys.BPF_PSEUDO_MAP_FD:
            raise BpfError(f"unsupported pseudo load (src_reg {src}) at instruction {index}",
                           hint="bpf/redirect.c may only use maps declared with bcc's macros")
        fd = int.from_bytes(code[index * 8 + 4: index * 8 + 8], "little", signed=True)
        if fd not in names_by_fd:
            raise BpfError(f"instruction {index} loads an unknown map (fd {fd})",
                           hint="declare every map in Build.map_names()")
        relocs.append((index, names_by_fd[fd]))
        code[index * 8 + 4: index * 8 + 8] = bytes(4)
    return bytes(code), tuple(relocs)


# --- compiling ---------------------------------------------------------------------
def compile_object(build: Build) -> Object:
    """Compile with bcc (needs bcc, clang and kernel headers)."""
    version = bcc_version()
    try:
        from bcc import BPF  # a system package; imported only here
    except ImportError:
        raise BpfError(f"bcc is not installed, and no prepared build of the program is cached in {cache_dir()}",
                       hint="run 'tcbypass prepare' on a machine with bcc (python3-bpfcc) and kernel headers, "
                            "or install them here (scripts/setup.sh)") from None
    with _captured_output() as output:
        try:
            bpf = BPF(src_file=str(source_path()).encode(), cflags=build.cflags())
        except Exception:
            bpf = None
    if bpf is None:
        first = _first_meaningful(output.text)
        log.debug("bcc said:\n%s", output.text)
        raise BpfError(f"bcc could not compile {source_path().name}: {first}",
                       hint="kernel headers missing? run 'tcbypass doctor' (scripts/setup.sh installs them), "
                            "or use a build prepared elsewhere ('tcbypass prepare')")
    if output.text.strip():
        log.debug("bcc said:\n%s", output.text)
    try:
        names_by_fd, maps = {}, []
        for name in build.map_names():
            fd = bpf[name.encode()].map_fd
            info = bpfsys.map_info(fd)
            names_by_fd[fd] = name
            flags = info.flags
            if info.type == bpfsys.BPF_MAP_TYPE_DEVMAP:
                flags &= ~DEVMAP_KERNEL_FLAGS  # the kernel adds it to every devmap; creating with it is refused
            maps.append(MapSpec(name, info.type, info.key_size, info.value_size, info.max_entries, flags))
        programs = []
        for name in PROGRAMS:
            code, relocs = relocations(bpf.dump_func(name.encode()), names_by_fd)
            programs.append(ProgramSpec(name, code, relocs))
        from bcc.libbcc import lib  # the module is compiled: read its license as bcc would load it
        license = (lib.bpf_module_license(bpf.module) or b"GPL").decode()
    finally:
        bpf.cleanup()
    return Object(key(build), tuple(build.cflags()), version or "unknown", license, tuple(maps), tuple(programs))


class _Captured:
    text = ""


@contextlib.contextmanager
def _captured_output() -> Iterator[_Captured]:
    """Catch what bcc and clang print on fds 1 and 2 (warnings, "Unable to find
    kernel headers"), so a failure is one line of ours and the rest goes to the log."""
    captured = _Captured()
    with tempfile.TemporaryFile(mode="w+b") as sink:
        sys.stdout.flush()
        sys.stderr.flush()
        saved = [os.dup(1), os.dup(2)]
        try:
            os.dup2(sink.fileno(), 1)
            os.dup2(sink.fileno(), 2)
            yield captured
        finally:
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            for fd in saved:
                os.close(fd)
            sink.seek(0)
            captured.text = sink.read().decode(errors="replace")


def _first_meaningful(text: str) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    for line in lines:
        if "Unable to find kernel headers" in line or "fatal error" in line or "error:" in line:
            return line
    return lines[0] if lines else "no output"


# --- the cache -------------------------------------------------------------------------
def cache_dir() -> Path:
    return Path(os.environ.get(ENV_CACHE_DIR) or DEFAULT_CACHE_DIR)


def cache_path(build: Build, directory: Path | None = None) -> Path:
    return (directory or cache_dir()) / f"redirect-{key(build)}.json"


def cached(build: Build, directory: Path | None = None) -> Object | None:
    """The cached object of `build` if it is there and sound; None (with one
    log line saying why) when it must be built."""
    path = cache_path(build, directory)
    try:
        text = path.read_text()
    except FileNotFoundError:
        return None
    except OSError as exc:
        log.warning("rebuilding %s: cannot read it (%s)", path, exc.strerror)
        return None
    try:
        obj = Object.from_json(text)
    except ValueError as exc:
        log.warning("rebuilding %s: %s", path, exc)
        return None
    if obj.key != key(build):
        log.warning("rebuilding %s: it holds build %s", path, obj.key)
        return None
    installed = bcc_version()
    if installed and obj.bcc_version != installed:
        log.warning("rebuilding %s: built by bcc %s, this node has bcc %s", path, obj.bcc_version, installed)
        return None
    return obj


def store(obj: Object, directory: Path | None = None) -> Path:
    """Write `obj` into the cache atomically; returns its path."""
    directory = directory or cache_dir()
    try:
        directory.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".redirect-", suffix=".tmp", dir=directory)
        with os.fdopen(fd, "w") as f:
            f.write(obj.to_json())
            f.flush()
            os.fsync(f.fileno())
        path = directory / f"redirect-{obj.key}.json"
        os.replace(tmp, path)
    except OSError as exc:
        raise BpfError(f"cannot write the program cache in {directory} ({exc.strerror})",
                       hint="it must be a writable directory; set $TCBYPASS_CACHE_DIR to move it") from None
    return path


@contextlib.contextmanager
def _build_lock(build: Build, directory: Path) -> Iterator[None]:
    """One compiler per build at a time; the others wait and then find its entry."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
        fd = os.open(directory / f".lock-{key(build)}", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    except OSError:
        yield  # a read-only cache: compile without caching (store() will say why)
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def get(build: Build, rebuild: bool = False, directory: Path | None = None) -> Object:
    """The compiled object of `build`: from the cache, or compiled and cached."""
    directory = directory or cache_dir()
    if not rebuild and (obj := cached(build, directory)) is not None:
        return obj
    with _build_lock(build, directory):
        if not rebuild and (obj := cached(build, directory)) is not None:
            return obj  # built by another process while we waited
        obj = compile_object(build)
        try:
            path = store(obj, directory)
            log.info("compiled build %s into %s", obj.key, path)
        except BpfError as exc:
            log.warning("%s", exc)
    return obj


def prepare(directory: Path | None = None) -> list[tuple[Build, Path]]:
    """Compile every build a node may need (with and without bpf_redirect_peer)
    into the cache, so that attach needs no compiler there."""
    done = []
    for which in (Build(), Build(no_peer=True)):
        get(which, directory=directory)
        done.append((which, cache_path(which, directory)))
    return done
