"""The compiled-object format and its cache, without a compiler or root:
relocations found in raw instructions, the JSON round trip, and every way a
cache file can be unusable (each must be rebuilt, never half-loaded)."""

from __future__ import annotations

import json
import struct

import pytest

from tcbypass import build
from tcbypass.errors import BpfError


def insn(code: int, dst: int = 0, src: int = 0, off: int = 0, imm: int = 0) -> bytes:
    return struct.pack("<BBhi", code, (src << 4) | dst, off, imm)


def ld_map(fd: int, dst: int = 1) -> bytes:
    """ld_imm64 of a map by fd: two instruction slots."""
    return insn(0x18, dst=dst, src=1, imm=fd) + insn(0)


def test_relocations_record_each_map_load_and_zero_its_fd():
    code = insn(0xB7, imm=5) + ld_map(7) + insn(0x85, imm=1) + ld_map(9, dst=2) + insn(0x95)
    zeroed, relocs = build.relocations(code, {7: "tcb_config", 9: "tcb_stats"})
    assert relocs == ((1, "tcb_config"), (4, "tcb_stats"))
    assert zeroed == insn(0xB7, imm=5) + ld_map(0) + insn(0x85, imm=1) + ld_map(0, dst=2) + insn(0x95)


def test_plain_64_bit_constants_are_not_relocations():
    code = insn(0x18, dst=3, imm=42) + insn(0, imm=1) + insn(0x95)
    assert build.relocations(code, {}) == (code, ())


def test_a_map_fd_nobody_declared_is_refused():
    with pytest.raises(BpfError, match="unknown map"):
        build.relocations(ld_map(11), {7: "tcb_config"})


def test_other_pseudo_loads_are_refused():
    with pytest.raises(BpfError, match="unsupported pseudo load"):
        build.relocations(insn(0x18, dst=1, src=2, imm=7) + insn(0), {7: "tcb_config"})


def sample_object(key: str | None = None) -> build.Object:
    maps = (build.MapSpec("tcb_config", 2, 4, 28, 1), build.MapSpec("tcb_tap", 14, 4, 4, 1))
    programs = tuple(build.ProgramSpec(name, ld_map(0) + insn(0x95), ((0, "tcb_config"),))
                     for name in build.PROGRAMS)
    return build.Object(key or build.key(build.Build()), (), "0.26.0", "GPL", maps, programs)


def test_object_round_trips_through_json():
    obj = sample_object()
    assert build.Object.from_json(obj.to_json()) == obj


def test_linking_puts_each_maps_fd_into_its_loads():
    prog = sample_object().program("tcb_from_vm")
    assert prog.linked({"tcb_config": 33}) == ld_map(33) + insn(0x95)


@pytest.mark.parametrize("damage, message", [
    (lambda d: d["object"].update(license="MIT"), "checksum mismatch"),
    (lambda d: d.update(checksum="0" * 64), "checksum mismatch"),
    (lambda d: d["object"]["programs"].pop(), "checksum mismatch"),
    (lambda d: d.pop("object"), "not a tcbypass object"),
])
def test_a_damaged_object_is_refused_with_the_reason(damage, message):
    data = json.loads(sample_object().to_json())
    damage(data)
    with pytest.raises(ValueError, match=message):
        build.Object.from_json(json.dumps(data))


def test_a_sound_file_without_both_programs_is_refused():
    obj = sample_object()
    half = build.Object(obj.key, obj.cflags, obj.bcc_version, obj.license, obj.maps, obj.programs[:1])
    with pytest.raises(ValueError, match="programs missing"):
        build.Object.from_json(half.to_json())


def test_truncated_or_garbage_files_are_refused():
    text = sample_object().to_json()
    for bad in (text[: len(text) // 2], "", "\x00\x01garbage"):
        with pytest.raises(ValueError):
            build.Object.from_json(bad)


def test_key_follows_the_source_and_the_options(monkeypatch, tmp_path):
    default, test, no_peer = (build.key(b) for b in (build.Build(), build.Build(test=True), build.Build(no_peer=True)))
    assert len({default, test, no_peer}) == 3
    changed = tmp_path / "redirect.c"
    changed.write_text(build.source_path().read_text() + "\n/* one more line */\n")
    monkeypatch.setattr(build, "source_path", lambda: changed)
    assert build.key(build.Build()) != default


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv(build.ENV_CACHE_DIR, str(tmp_path))
    monkeypatch.setattr(build, "bcc_version", lambda: "0.26.0")
    return tmp_path


def test_a_stored_object_is_found_again(cache):
    obj = sample_object()
    path = build.store(obj)
    assert path == build.cache_path(build.Build()) and path.parent == cache
    assert build.cached(build.Build()) == obj
    assert [p.name for p in cache.iterdir() if p.name.startswith(".redirect-")] == [], "no temporary left"


@pytest.mark.parametrize("why, spoil", [
    ("missing", lambda p: p.unlink()),
    ("corrupt", lambda p: p.write_text(p.read_text()[:100])),
    ("another build's", lambda p: p.write_text(sample_object(key="0123456789abcdef").to_json())),
])
def test_an_unusable_entry_is_not_used(cache, why, spoil, caplog):
    path = build.store(sample_object())
    spoil(path)
    assert build.cached(build.Build()) is None
    if why != "missing":
        assert f"rebuilding {path}" in caplog.text, "one log line says why"


def test_an_entry_built_by_another_bcc_is_rebuilt_where_bcc_is_installed(cache, monkeypatch, caplog):
    build.store(sample_object())
    monkeypatch.setattr(build, "bcc_version", lambda: "0.30.0")
    assert build.cached(build.Build()) is None
    assert "built by bcc 0.26.0, this node has bcc 0.30.0" in caplog.text
    monkeypatch.setattr(build, "bcc_version", lambda: None)  # a prepared node without bcc takes it
    assert build.cached(build.Build()) is not None


def test_get_takes_a_sound_entry_without_compiling(cache, monkeypatch):
    build.store(sample_object())
    monkeypatch.setattr(build, "compile_object", lambda which: pytest.fail("must not compile"))
    assert build.get(build.Build()) == sample_object()


def test_get_compiles_and_stores_a_missing_entry(cache, monkeypatch):
    calls = []
    monkeypatch.setattr(build, "compile_object", lambda which: calls.append(which) or sample_object())
    assert build.get(build.Build()) == sample_object()
    assert build.get(build.Build()) == sample_object()
    assert calls == [build.Build()], "compiled once, then taken from the cache"
