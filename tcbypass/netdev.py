"""Devices inside a pod's network namespace, read over rtnetlink."""

from __future__ import annotations

from dataclasses import dataclass

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from .errors import NetnsError


@dataclass(frozen=True)
class Link:
    index: int
    name: str
    kind: str  # IFLA_INFO_KIND: veth, tun, bridge, ... ("" for none)
    mac: str
    master: int  # ifindex of the bridge it is a port of, 0 if none
    peer: int  # IFLA_LINK: a veth's peer ifindex (in the peer's namespace)
    up: bool
    peer_netnsid: int | None = None  # IFLA_LINK_NETNSID: set when the peer is in another namespace


def _decode(msg) -> Link:
    info = msg.get_attr("IFLA_LINKINFO")
    kind = (info.get_attr("IFLA_INFO_KIND") if info else None) or ""
    return Link(
        index=msg["index"],
        name=msg.get_attr("IFLA_IFNAME"),
        kind=kind,
        mac=(msg.get_attr("IFLA_ADDRESS") or "").lower(),
        master=msg.get_attr("IFLA_MASTER") or 0,
        peer=msg.get_attr("IFLA_LINK") or 0,
        up=bool(msg["flags"] & 1),
        peer_netnsid=msg.get_attr("IFLA_LINK_NETNSID"),
    )


def open_netns(path: str) -> IPRoute:
    """An rtnetlink socket inside the namespace at `path` (never creates one)."""
    try:
        return IPRoute(netns=path, flags=0)
    except (OSError, NetlinkError) as exc:
        raise NetnsError(f"cannot open network namespace {path} ({exc})", hint="is the pod still running?") from None


def list_links(ipr: IPRoute) -> dict[str, Link]:
    return {link.name: link for link in map(_decode, ipr.get_links())}


def host_side(ipr: IPRoute, nic: Link) -> Link | None:
    """The other end of a veth pod NIC, read from the pod's side (the kernel
    looks it up in the peer's namespace by its id): the host port. None when
    the NIC is not a veth whose peer lives in another namespace."""
    if nic.kind != "veth" or not nic.peer or nic.peer_netnsid is None or nic.peer_netnsid < 0:
        return None
    try:
        msgs = ipr.link("get", index=nic.peer, IFLA_IF_NETNSID=nic.peer_netnsid)
    except NetlinkError:
        return None
    return _decode(msgs[0]) if msgs else None
