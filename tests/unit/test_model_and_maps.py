"""Pure pieces: names and pins, the stored record, MAC parsing, the C struct mirrors."""

from __future__ import annotations

import ctypes
import re
from pathlib import Path

import pytest

from tcbypass import maps
from tcbypass.errors import InputError
from tcbypass.model import Record, check_name, name_of_pin, pin_id

SOURCE = (Path(__file__).resolve().parents[2] / "bpf" / "redirect.c").read_text()


def record(**changes) -> Record:
    base = dict(name="vm1.prod", netns="/var/run/netns/p", netns_id="4:100", tap="tap0", tap_ifindex=5,
                nic="eth0-nic", nic_ifindex=3, bridge="k6t-eth0", bridge_mac="0a:bb:00:00:00:03",
                mac="0a:00:00:00:00:05", dhcp_to_bridge=True, digest="abc", vmi="vm1", namespace="prod",
                iface_id="vm1.prod", complete=True)
    base.update(changes)
    return Record(**base)


def test_pin_ids_have_no_dots_and_map_back():
    assert pin_id("vm1.prod.attachnet.prod.ovn") == "vm1+prod+attachnet+prod+ovn"
    assert name_of_pin(pin_id("vm1.prod")) == "vm1.prod"


@pytest.mark.parametrize("bad", ["", "a/b", "../x", "-lead", "x" * 201, "sp ace", "a+b"])
def test_bad_names_are_refused(bad):
    with pytest.raises(InputError):
        check_name(bad)


def test_record_round_trips_through_json_and_ignores_unknown_keys():
    r = record()
    assert Record.from_json(r.to_json() | {"from_a_newer_version": 1}) == r
    assert Record.from_json({"name": "only"}) is None


def test_same_wiring_ignores_bookkeeping_but_not_devices():
    r = record()
    assert r.same_wiring(record(attached_at=99.0, managed_by="agent"))
    assert not r.same_wiring(record(tap_ifindex=9))
    assert not r.same_wiring(record(digest="other"))


@pytest.mark.parametrize("text, raw", [("52:54:00:12:34:56", bytes.fromhex("525400123456")),
                                       ("52-54-00-AB-CD-EF", bytes.fromhex("525400abcdef"))])
def test_mac_parsing(text, raw):
    assert maps.parse_mac(text) == raw
    assert maps.format_mac(raw) == text.lower().replace("-", ":")


@pytest.mark.parametrize("bad", ["52:54:00:12:34", "zz:54:00:12:34:56", "5254.0012.3456", "ff:ff:ff:ff:ff:ff",
                                 "01:00:5e:00:00:01", "00:00:00:00:00:00", "525:4:00:12:34:56"])
def test_bad_macs_are_refused(bad):
    with pytest.raises(InputError):
        maps.parse_mac(bad)


def test_struct_sizes_match_the_c_layout():
    # struct tcb_config: three MACs, a u16 and two u32, no holes.
    assert ctypes.sizeof(maps.ConfigEntry) == 28
    # struct tcb_counters: u64 per direction twice, then one per reason.
    assert ctypes.sizeof(maps.CountersEntry) == 8 * (2 * len(maps.Direction) + len(maps.Reason))


def c_enum(name: str) -> dict[str, int]:
    body = re.search(r"enum %s \{(.*?)\};" % name, SOURCE, re.S).group(1)
    values, nxt = {}, 0
    for m in re.finditer(r"^\s*(TCB_\w+)(?:\s*=\s*(\d+))?,", body, re.M):
        nxt = int(m.group(2)) if m.group(2) else nxt
        values[m.group(1)] = nxt
        nxt += 1
    return values


def test_reason_enum_matches_c():
    c = {k.removeprefix("TCB_PASS_"): v for k, v in c_enum("tcb_reason").items() if k != "TCB_PASS_MAX"}
    assert c == {r.name: r.value for r in maps.Reason}


def test_direction_enum_matches_c():
    c = {k.removeprefix("TCB_DIR_"): v for k, v in c_enum("tcb_dir").items() if k != "TCB_DIR_MAX"}
    assert c == {d.name: d.value for d in maps.Direction}


def test_flag_matches_c():
    assert int(re.search(r"#define TCB_F_DHCP_TO_BRIDGE\s+(0x[0-9a-f]+)", SOURCE).group(1), 16) == \
        maps.F_DHCP_TO_BRIDGE


def test_counters_sum_over_cpus():
    a, b = maps.CountersEntry(), maps.CountersEntry()
    a.redirect_packets[0], b.redirect_packets[0] = 2, 3
    b.pass_packets[maps.Reason.DHCP] = 4
    total = maps.sum_counters([a, b])
    assert total.redirect_packets == {"from_vm": 5, "to_vm": 0}
    assert total.passed["dhcp"] == 4
