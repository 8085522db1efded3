"""The nftables rules of a pod's network namespace, read over nfnetlink.

KubeVirt's masquerade binding joins the pod NIC and the VM's bridge with
NAT rules it writes with the `nft` tool (table `nat` in families `ip` and
`ip6`, chains KUBEVIRT_PREINBOUND and KUBEVIRT_POSTINBOUND). tcbypass reads
them back as the kernel holds them, through nfnetlink (no `nft` binary
needed on the node), and keeps of each rule only what recognition needs:
the interface names it matches, the chain it jumps to, and whether it
translates addresses.

`expressions` turns one netlink rule into plain dicts and `decode_rule`
reads those: the second is pure, and unit tests feed it rules recorded from
a real kernel.
"""

from __future__ import annotations

from dataclasses import dataclass

from pyroute2.netlink.exceptions import NetlinkError

from . import netns
from .errors import NetnsError

FAMILIES = {1: "inet", 2: "ip", 3: "arp", 5: "netdev", 7: "bridge", 10: "ip6"}  # NFPROTO_*
NFPROTO_UNSPEC = 0  # dump the rules of every family at once
_IFNAME_KEYS = {"NFT_META_IIFNAME": "iifname", "NFT_META_OIFNAME": "oifname"}
_JUMPS = ("NFT_JUMP", "NFT_GOTO")
_NAT_TYPES = {"NFT_NAT_SNAT": "snat", "NFT_NAT_DNAT": "dnat"}


@dataclass(frozen=True)
class NatRule:
    """One nftables rule, reduced to what tells a binding apart."""

    family: str  # ip, ip6, inet
    table: str
    chain: str
    iifname: str = ""  # matched input interface, if any
    oifname: str = ""  # matched output interface, if any
    jump: str = ""  # chain it jumps (or goes) to
    action: str = ""  # masquerade, snat, dnat, or "" for none

    def __str__(self) -> str:
        match = " ".join(f"{k} {v}" for k, v in (("iifname", self.iifname), ("oifname", self.oifname)) if v)
        verdict = f"jump {self.jump}" if self.jump else self.action
        return f"{self.family} {self.table} {self.chain}: {' '.join(p for p in (match, verdict) if p)}"


# --- decoding (pure) -------------------------------------------------------------

def _text(hex_data: str) -> str:
    """An interface name compared by a cmp expression: NUL-padded bytes."""
    try:
        return bytes.fromhex(hex_data).split(b"\0", 1)[0].decode()
    except (ValueError, UnicodeDecodeError):
        return ""


def decode_rule(family: str, table: str, chain: str, exprs: list[dict]) -> NatRule:
    """A rule from its expressions as `expressions` gives them.

    An interface match is a `meta` load of IIFNAME/OIFNAME followed by an
    equality `cmp`; a jump is an `immediate` verdict; `masq` and `nat`
    translate addresses.
    """
    found: dict[str, str] = {}
    loaded = ""  # the interface key the last meta expression loaded
    for expr in exprs:
        name = expr.get("expr")
        if name == "meta":
            loaded = _IFNAME_KEYS.get(expr.get("key", ""), "")
            continue
        if name == "cmp" and loaded and expr.get("op") == "NFT_CMP_EQ":
            found[loaded] = _text(expr.get("data", ""))
        elif name == "immediate" and expr.get("verdict") in _JUMPS:
            found["jump"] = expr.get("chain", "")
        elif name == "masq":
            found["action"] = "masquerade"
        elif name == "nat" and expr.get("type") in _NAT_TYPES:
            found["action"] = _NAT_TYPES[expr["type"]]
        loaded = ""
    return NatRule(family=family, table=table, chain=chain, **found)


# --- reading (netlink) -------------------------------------------------------------

def _attrs(nla) -> dict:
    """The attributes of a pyroute2 nla as a dict (empty for a missing one)."""
    if nla is None or not hasattr(nla, "get_attr"):
        return {}
    return {name: value for name, value in nla.get("attrs", [])}


def expressions(rule_msg) -> list[dict]:
    """One NFT_MSG_NEWRULE message's expressions as plain, JSON-friendly dicts."""
    out = []
    for expr in rule_msg.get_attr("NFTA_RULE_EXPRESSIONS") or []:
        name = expr.get_attr("NFTA_EXPR_NAME")
        data = _attrs(expr.get_attr("NFTA_EXPR_DATA"))
        plain: dict = {"expr": name}
        if name == "meta":
            plain["key"] = data.get("NFTA_META_KEY", "")
        elif name == "cmp":
            plain["op"] = data.get("NFTA_CMP_OP", "")
            value = _attrs(data.get("NFTA_CMP_DATA")).get("NFTA_DATA_VALUE", b"")
            plain["data"] = bytes(value).hex() if isinstance(value, (bytes, bytearray)) else ""
        elif name == "immediate":
            verdict = _attrs(_attrs(data.get("NFTA_IMMEDIATE_DATA")).get("NFTA_DATA_VERDICT"))
            if verdict:
                plain["verdict"] = verdict.get("NFTA_VERDICT_CODE", "")
                plain["chain"] = verdict.get("NFTA_VERDICT_CHAIN", "") or ""
        elif name == "nat":
            plain["type"] = data.get("NFTA_NAT_TYPE", "")
        out.append(plain)
    return out


def _read_here() -> tuple[NatRule, ...]:
    from pyroute2.nftables.main import NFTables

    with NFTables(nfgen_family=NFPROTO_UNSPEC) as nft:
        return tuple(decode_rule(FAMILIES.get(msg["nfgen_family"], str(msg["nfgen_family"])),
                                 msg.get_attr("NFTA_RULE_TABLE") or "", msg.get_attr("NFTA_RULE_CHAIN") or "",
                                 expressions(msg))
                     for msg in nft.get_rules())


def read(path: str) -> tuple[NatRule, ...]:
    """Every nftables rule in the network namespace at `path`, of every family (one dump)."""
    try:
        return netns.run_in(path, _read_here)
    except (NetlinkError, OSError) as exc:
        raise NetnsError(f"cannot read the nftables rules in {path} ({exc})",
                         hint="tcbypass needs CAP_NET_ADMIN in the pod's namespace") from None
