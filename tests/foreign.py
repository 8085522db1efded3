"""Somebody else's tc programs, for tests that check what the neighbours of
ours on a hook see: counters, a marker, a dropper."""

from __future__ import annotations

import os
import socket

from tcbypass import bpfsys, netns
from tcbypass.lab.sandbox import NETNS_DIR

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

/* Mark every frame 0x42 (count them), let all through. */
int mark_frames(struct __sk_buff *skb)
{
    u32 zero = 0;
    u64 *n = seen.lookup(&zero);
    if (n)
        __sync_fetch_and_add(n, 1);
    skb->mark = 0x42;
    return TC_ACT_UNSPEC;
}

/* Count the frames that carry mark 0x42, let all through. */
int count_marked(struct __sk_buff *skb)
{
    u32 zero = 0;
    u64 *n;

    if (skb->mark != 0x42)
        return TC_ACT_UNSPEC;
    n = seen.lookup(&zero);
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
        from bcc import BPF
        from pyroute2 import IPRoute

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
        return sum(v.value for v in self.bpf[b"seen"].values())

    def close(self) -> None:
        if self.link is not None:
            os.close(self.link)
        self.bpf.cleanup()


