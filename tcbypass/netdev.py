"""Devices and addresses inside a network namespace, read over rtnetlink."""

from __future__ import annotations

import ipaddress
import os
import socket
from dataclasses import dataclass

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from .errors import NetnsError

TUN_TYPES = {1: "tun", 2: "tap"}  # IFLA_TUN_TYPE: IFF_TUN, IFF_TAP


@dataclass(frozen=True)
class Link:
    index: int
    name: str
    kind: str  # IFLA_INFO_KIND: veth, tun, bridge, macvtap, ... ("" for none: a hardware driver, or lo)
    mac: str
    master: int  # ifindex of the bridge it is a port of, 0 if none
    peer: int  # IFLA_LINK: a veth's peer, a macvlan/macvtap's lower device (in the peer's namespace)
    up: bool
    peer_netnsid: int | None = None  # IFLA_LINK_NETNSID: set when the peer is in another namespace
    tun_type: str = ""  # "tap" or "tun" for kind tun
    mode: str = ""  # macvlan/macvtap mode (bridge, passthru, ...)
    phys_port_name: str = ""  # IFLA_PHYS_PORT_NAME, e.g. pf0vf2 on an SR-IOV VF representor
    phys_switch_id: str = ""  # IFLA_PHYS_SWITCH_ID (hex): the e-switch a representor belongs to
    mtu: int = 0


@dataclass(frozen=True)
class Address:
    index: int  # ifindex of the device holding it
    address: str
    prefixlen: int

    @property
    def interface(self) -> ipaddress.IPv4Interface | ipaddress.IPv6Interface:
        return ipaddress.ip_interface(f"{self.address}/{self.prefixlen}")

    def __str__(self) -> str:
        return f"{self.address}/{self.prefixlen}"


def _info_data(info, key: str):
    data = info.get_attr("IFLA_INFO_DATA") if info else None
    if not data or not hasattr(data, "get_attr"):
        return None
    return data.get_attr(key)


def _decode(msg) -> Link:
    info = msg.get_attr("IFLA_LINKINFO")
    kind = (info.get_attr("IFLA_INFO_KIND") if info else None) or ""
    switch_id = msg.get_attr("IFLA_PHYS_SWITCH_ID")
    if isinstance(switch_id, (bytes, bytearray)):
        switch_id = switch_id.hex()
    return Link(
        index=msg["index"],
        name=msg.get_attr("IFLA_IFNAME"),
        kind=kind,
        mac=(msg.get_attr("IFLA_ADDRESS") or "").lower(),
        master=msg.get_attr("IFLA_MASTER") or 0,
        peer=msg.get_attr("IFLA_LINK") or 0,
        up=bool(msg["flags"] & 1),
        peer_netnsid=msg.get_attr("IFLA_LINK_NETNSID"),
        tun_type=TUN_TYPES.get(_info_data(info, "IFLA_TUN_TYPE"), "") if kind == "tun" else "",
        mode=str(_info_data(info, f"IFLA_{kind.upper()}_MODE") or "") if kind in ("macvtap", "macvlan") else "",
        phys_port_name=msg.get_attr("IFLA_PHYS_PORT_NAME") or "",
        phys_switch_id=str(switch_id or ""),
        mtu=msg.get_attr("IFLA_MTU") or 0,
    )


def open_netns(path: str) -> IPRoute:
    """An rtnetlink socket inside the namespace at `path` (never creates one).

    The socket is made on a thread that has entered the namespace (a socket
    keeps the namespace it was made in) and handed to pyroute2 as a file
    descriptor: about 3 ms, where IPRoute(netns=...) forks a helper process
    to make it (7-17 ms, paid by every attach and every row of status)."""
    from . import netns

    def make() -> int:
        sock = socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC, socket.NETLINK_ROUTE)
        return sock.detach()

    try:
        fd = netns.run_in(path, make)
    except OSError as exc:
        raise NetnsError(f"cannot open network namespace {path} ({exc.strerror})",
                         hint="is the pod still running?") from None
    try:
        return IPRoute(fileno=fd)
    except (OSError, NetlinkError) as exc:
        os.close(fd)
        raise NetnsError(f"cannot open network namespace {path} ({exc})", hint="is the pod still running?") from None


def links_named(ipr: IPRoute, names) -> dict[str, Link]:
    """The devices of these names that exist (one lookup each, no dump)."""
    found = {}
    for name in names:
        try:
            msgs = ipr.link("get", ifname=name)
        except NetlinkError:
            continue  # not there
        if msgs:
            found[name] = _decode(msgs[0])
    return found


def list_links(ipr: IPRoute) -> dict[str, Link]:
    return {link.name: link for link in map(_decode, ipr.get_links())}


def list_addresses(ipr: IPRoute) -> tuple[Address, ...]:
    """Every IPv4 and IPv6 address in the namespace, with the device holding it."""
    out = []
    for msg in ipr.get_addr():
        local = msg.get_attr("IFA_LOCAL") or msg.get_attr("IFA_ADDRESS")  # IFA_ADDRESS is the peer on p2p links
        if local:
            out.append(Address(msg["index"], local, msg["prefixlen"]))
    return tuple(out)


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
