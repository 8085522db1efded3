"""Decoding nftables rules (as nfnetlink gives them) into what recognition needs."""

from __future__ import annotations

import json

from tcbypass.nftrules import NatRule, decode_rule
from tests.unit.snapshots import DATA, load

RAW = json.loads((DATA / "nft_masquerade_rules.json").read_text())


def decoded() -> list[NatRule]:
    return [decode_rule(r["family"], r["table"], r["chain"], r["expressions"]) for r in RAW]


def test_recorded_kubevirt_rules_decode_to_interface_matches_jumps_and_translations():
    rules = decoded()
    for family in ("ip", "ip6"):
        assert NatRule(family, "nat", "prerouting", iifname="eth0", jump="KUBEVIRT_PREINBOUND") in rules
        assert NatRule(family, "nat", "postrouting", oifname="k6t-eth0", jump="KUBEVIRT_POSTINBOUND") in rules
        assert NatRule(family, "nat", "postrouting", action="masquerade") in rules
        assert NatRule(family, "nat", "KUBEVIRT_PREINBOUND", action="dnat") in rules
        assert NatRule(family, "nat", "KUBEVIRT_POSTINBOUND", action="snat") in rules
        assert NatRule(family, "nat", "output", action="dnat") in rules
    assert len(rules) == 12


def test_decoding_agrees_with_the_snapshot_read_from_the_same_pod():
    _, _, pod = load()["vm-masq"]
    assert sorted(decoded(), key=repr) == sorted(pod.nat_rules, key=repr)


def test_a_payload_compare_is_not_taken_for_an_interface_name():
    exprs = [{"expr": "payload"}, {"expr": "cmp", "op": "NFT_CMP_EQ", "data": "65746830"}, {"expr": "masq"}]
    assert decode_rule("ip", "nat", "postrouting", exprs) == NatRule("ip", "nat", "postrouting", action="masquerade")


def test_an_inequality_is_not_a_match():
    exprs = [{"expr": "meta", "key": "NFT_META_IIFNAME"}, {"expr": "cmp", "op": "NFT_CMP_NEQ", "data": "6c6f00"},
             {"expr": "immediate", "verdict": "NFT_GOTO", "chain": "x"}]
    assert decode_rule("inet", "t", "c", exprs) == NatRule("inet", "t", "c", jump="x")


def test_rule_text_for_humans():
    assert str(NatRule("ip", "nat", "prerouting", iifname="eth0", jump="KUBEVIRT_PREINBOUND")) == \
        "ip nat prerouting: iifname eth0 jump KUBEVIRT_PREINBOUND"
