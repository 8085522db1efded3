"""Somebody else's tc programs, for tests that check what the neighbours of
ours on a hook see: counters, a marker, a dropper. Most are compiled by bcc;
the marker and the counter of marked frames are a few instructions loaded as
they are."""

from __future__ import annotations

import ctypes
import os
import socket
import struct

from tcbypass import bpfsys, netns
from tcbypass_lab.sandbox import NETNS_DIR

FOREIGN_PROGRAMS = b"""
#include <uapi/linux/if_ether.h>
#include <uapi/linux/in.h>
#include <uapi/linux/ip.h>
#include <uapi/linux/pkt_cls.h>
#include <uapi/linux/udp.h>

BPF_ARRAY(seen, u64, 1);

/* Count every frame, let all through. */
int count_frames(struct __sk_buff *skb)
{
    u32 zero = 0;
    u64 *n = seen.lookup(&zero);
    if (n)
        __sync_fetch_and_add(n, 1);
    return TC_ACT_UNSPEC;
}

/* Drop (and count) IPv4 UDP to port 9999, let all else through. */
int drop_port_9999(struct __sk_buff *skb)
{
    void *data = (void *)(long)skb->data, *end = (void *)(long)skb->data_end;
    struct iphdr *ip = data + ETH_HLEN;
    struct udphdr *udp = (void *)(ip + 1);
    u32 zero = 0;
    u64 *n;

    if ((void *)(udp + 1) > end || skb->protocol != bpf_htons(ETH_P_IP) || ip->ihl != 5 ||
        ip->protocol != IPPROTO_UDP || udp->dest != bpf_htons(9999))
        return TC_ACT_UNSPEC;
    n = seen.lookup(&zero);
    if (n)
        __sync_fetch_and_add(n, 1);
    return TC_ACT_SHOT;
}
"""


class Foreign:
    """Somebody else's program on a device's ingress, with a frame counter:
    as a tcx link, or as a clsact bpf filter of its own priority and protocol."""

    def __init__(self, ns: str, dev: str, function: bytes, hook: str, prio: int = 300,
                 protocol: int = 0x0003):
        from pyroute2 import IPRoute

        self.bpf, self.map_fd, self.prog_fd = None, None, None
        if function in RAW:
            self.map_fd = bpfsys.map_create(bpfsys.BPF_MAP_TYPE_ARRAY, "foreign_seen", 4, 8, 1)
            self.prog_fd = prog = bpfsys.prog_load(function.decode(), RAW[function](self.map_fd))
        else:
            from bcc import BPF

            self.bpf = BPF(text=FOREIGN_PROGRAMS)
            prog = self.bpf.load_func(function, BPF.SCHED_CLS).fd
        path = f"{NETNS_DIR}/{ns}"
        ifindex = netns.run_in(path, lambda: socket.if_nametoindex(dev))
        self.link = None
        if hook == "tcx":
            self.link = netns.run_in(path, lambda: bpfsys.tcx_link_create(prog, ifindex))
        else:
            with IPRoute(netns=path, flags=0) as ipr:
                if not any(q.get_attr("TCA_KIND") == "clsact" for q in ipr.get_qdiscs(index=ifindex)):
                    ipr.tc("add", kind="clsact", index=ifindex)
                ipr.tc("add-filter", kind="bpf", index=ifindex, parent=0xFFFFFFF2, prio=prio, handle=1,
                       protocol=protocol, fd=prog, name="foreign", direct_action=True)

    def count(self) -> int:
        if self.bpf is None:
            value = ctypes.c_uint64()
            bpfsys.map_lookup(self.map_fd, ctypes.c_uint32(0), value)
            return value.value
        return sum(v.value for v in self.bpf[b"seen"].values())

    def close(self) -> None:
        if self.link is not None:
            os.close(self.link)
        for fd in (self.prog_fd, self.map_fd):
            if fd is not None:
                os.close(fd)
        if self.bpf is not None:
            self.bpf.cleanup()


# --- programs of a few instructions, loaded without a compiler -------------------------------
# (bcc takes half a minute to compile under TCG in the kernel matrix's guests.)
MARK_OFFSET = 8  # offsetof(struct __sk_buff, mark)
BPF_FUNC_MAP_LOOKUP_ELEM = 1


def _insn(code: int, dst: int = 0, src: int = 0, off: int = 0, imm: int = 0) -> bytes:
    return struct.pack("<BBhi", code, (src << 4) | dst, off, imm)


def _count_then_continue(map_fd: int) -> bytes:
    """Add 1 to entry 0 of the map, return TC_ACT_UNSPEC (10 instructions)."""
    return (_insn(0x62, dst=10, off=-4, imm=0)  # *(u32 *)(r10 - 4) = 0
            + _insn(0x18, dst=1, src=bpfsys.BPF_PSEUDO_MAP_FD, imm=map_fd) + _insn(0)  # r1 = the map
            + _insn(0xBF, dst=2, src=10) + _insn(0x07, dst=2, imm=-4)  # r2 = r10 - 4
            + _insn(0x85, imm=BPF_FUNC_MAP_LOOKUP_ELEM)  # r0 = lookup
            + _insn(0x15, dst=0, off=2)  # if r0 == 0 goto +2
            + _insn(0xB7, dst=1, imm=1)  # r1 = 1
            + _insn(0xDB, dst=0, src=1)  # lock *(u64 *)(r0 + 0) += r1
            + _insn(0xB7, dst=0, imm=-1) + _insn(0x95))  # return TC_ACT_UNSPEC


def _mark_frames(map_fd: int) -> bytes:
    """Mark every frame 0x42 (and count it), let all through."""
    # A store from a register: kernels before 6.x refuse an immediate store (BPF_ST) into the context.
    return _insn(0xB7, dst=2, imm=0x42) + _insn(0x63, dst=1, src=2, off=MARK_OFFSET) + _count_then_continue(map_fd)


def _count_marked(map_fd: int) -> bytes:
    """Count the frames that carry mark 0x42, let all through."""
    tail = _count_then_continue(map_fd)
    return (_insn(0x61, dst=2, src=1, off=MARK_OFFSET)  # r2 = skb->mark
            + _insn(0x55, dst=2, imm=0x42, off=len(tail) // 8 - 2)  # if r2 != 0x42: to the return
            + tail)


RAW = {b"mark_frames": _mark_frames, b"count_marked": _count_marked}
