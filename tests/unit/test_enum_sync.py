"""bpf/redirect.c and tcbypass/maps.py declare the shared constants twice
(once in C, once in Python); these tests keep the two in step. Pure: they
read the C source as text, no compiler and no root."""

from __future__ import annotations

import re

import pytest

from tcbypass import build
import ctypes

from tcbypass.maps import (F_DHCP_TO_BRIDGE, F_KERNEL_TYPES, F_PEER, F_PEER_ALL, MTU_MAX, MTU_SHIFT, MTU_UNIT,
                           TYPE_BY_KERNEL, ConfigEntry, CountersEntry, Direction, Reason, mtu_flags)


@pytest.fixture(scope="module")
def source() -> str:
    text = build.source_path().read_text()
    return re.sub(r"/\*.*?\*/|//[^\n]*", "", text, flags=re.S)  # comments out


def c_enum(source: str, name: str) -> dict[str, int]:
    """The members of `enum name { ... };` with their values (implicit ones counted on)."""
    match = re.search(rf"\benum\s+{name}\s*\{{(.*?)\}}\s*;", source, re.S)
    assert match, f"enum {name} not found in {build.source_path()}"
    members, value = {}, -1
    for item in match.group(1).split(","):
        item = item.strip()
        if not item:
            continue
        ident, _, expr = (part.strip() for part in item.partition("="))
        value = int(expr, 0) if expr else value + 1
        members[ident] = value
    return members


def c_define(source: str, name: str) -> int:
    match = re.search(rf"^\s*#define\s+{name}\s+(\S+)", source, re.M)
    assert match, f"#define {name} not found"
    return int(match.group(1), 0)


def test_c_reasons_match_python_reason_names_and_values(source):
    c = {k.removeprefix("TCB_PASS_"): v for k, v in c_enum(source, "tcb_reason").items() if k != "TCB_PASS_MAX"}
    assert c == {r.name: r.value for r in Reason}


def test_c_directions_match_python_direction_names_and_values(source):
    c = {k.removeprefix("TCB_DIR_"): v for k, v in c_enum(source, "tcb_dir").items() if k != "TCB_DIR_MAX"}
    assert c == {d.name: d.value for d in Direction}


def test_counter_arrays_have_one_slot_per_reason_and_direction(source):
    """TCB_PASS_MAX / TCB_DIR_MAX size struct tcb_counters; CountersEntry mirrors it."""
    assert c_enum(source, "tcb_reason")["TCB_PASS_MAX"] == len(Reason) == len(CountersEntry().pass_packets)
    assert c_enum(source, "tcb_dir")["TCB_DIR_MAX"] == len(Direction) == len(CountersEntry().redirect_packets)


def test_config_flags_match(source):
    assert c_define(source, "TCB_F_DHCP_TO_BRIDGE") == F_DHCP_TO_BRIDGE
    assert c_define(source, "TCB_F_PEER") == F_PEER
    assert c_define(source, "TCB_F_PEER_ALL") == F_PEER_ALL
    assert c_define(source, "TCB_F_KERNEL_TYPES") == F_KERNEL_TYPES
    assert c_define(source, "TCB_TYPE_BY_KERNEL") == TYPE_BY_KERNEL
    assert (c_define(source, "TCB_MTU_SHIFT"), c_define(source, "TCB_MTU_UNIT")) == (MTU_SHIFT, MTU_UNIT)
    assert all(flag < 1 << MTU_SHIFT for flag in (F_DHCP_TO_BRIDGE, F_PEER, F_PEER_ALL, F_KERNEL_TYPES)), \
        "the flags must stay below the bits that carry the MTU"


def test_the_mtu_in_the_flags_never_rounds_up():
    for mtu in (68, 1400, 1442, 1500, 9000, 16380, 65535):
        carried = (mtu_flags(mtu) >> MTU_SHIFT) * MTU_UNIT
        assert carried <= mtu and mtu - carried < MTU_UNIT or mtu > MTU_MAX
    assert mtu_flags(0) == 0 and mtu_flags(1500) >> MTU_SHIFT == 375


def c_struct_fields(source: str, name: str) -> list[tuple[str, str, int]]:
    """(type, field, array length or 0) of `struct name { ... };`, in order."""
    match = re.search(rf"\bstruct\s+{name}\s*\{{(.*?)\}}\s*;", source, re.S)
    assert match, f"struct {name} not found"
    fields = []
    for decl in filter(None, (d.strip() for d in match.group(1).split(";"))):
        found = re.fullmatch(r"(__u8|__u16|__u32|__u64)\s+(\w+)(?:\[(\w+)\])?", decl)
        assert found, f"cannot read {decl!r} in struct {name}"
        fields.append((found.group(1), found.group(2), found.group(3) or ""))
    return fields


def test_config_struct_matches_its_python_mirror_field_by_field(source):
    """Same names, order and sizes: a moved field would make the program read
    the VM's MAC where Python wrote the bridge's."""
    sizes = {"__u8": 1, "__u16": 2, "__u32": 4, "__u64": 8}
    lengths = {"ETH_ALEN": 6}
    c = [(name, sizes[t] * ((lengths[n] if n in lengths else int(n)) if n else 1))
         for t, name, n in c_struct_fields(source, "tcb_config")]
    py = [(name, ctypes.sizeof(ctype)) for name, ctype in ConfigEntry._fields_]
    assert c == py
    assert ctypes.sizeof(ConfigEntry) == 28
