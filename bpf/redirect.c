// SPDX-License-Identifier: GPL-2.0
/*
 * tcbypass: carry a KubeVirt VM's own unicast frames past the in-pod bridge.
 *
 * Inside a virt-launcher pod the VM's tap (tap0) and the pod's veth
 * (eth0-nic) are both ports of the Linux bridge k6t-eth0. Two programs sit
 * on the ingress of those devices (a tcx link where the kernel has tcx,
 * else a clsact direct-action filter):
 *
 *   tcb_from_vm  on the tap: the VM's unicast frames go straight to the host
 *                side of the pod veth with bpf_redirect_peer(), skipping both
 *                the bridge and the veth's backlog queue, or to the NIC's
 *                egress with bpf_redirect() (see tcb_by_peer() for which);
 *   tcb_to_vm    on the NIC: unicast frames for the VM's MAC go to the tap's
 *                egress with bpf_redirect().
 *
 * Everything else is left to the bridge exactly as before, returned as
 * TC_ACT_UNSPEC ("continue": TCX_NEXT on tcx), so that programs and filters
 * behind ours on the same hook still see it: broadcast and multicast (ARP
 * requests, IPv6 ND, RARP), DHCPv4 for the in-pod DHCP server, frames for
 * the bridge itself, frames of other MACs, VLAN-tagged frames, ethertypes
 * we do not parse, anything truncated. Nothing is ever dropped here.
 *
 * Each attachment (one tap/NIC pair) runs its own instance of these
 * programs with its own maps: ifindexes repeat from one pod's network
 * namespace to the next, and an instance only ever holds its own pod's.
 *
 * The hot path reads one config entry and writes one per-CPU counter line.
 * Towards the VM it makes one map call more, the devmap lookup that keeps
 * a vanished tap from becoming a blackhole (tcb_tap below); from the VM
 * the target is the pod NIC, which only goes with the whole pod.
 *
 * Build options (-D, see tcbypass/build.py):
 *   TCB_TEST     record each redirect in tcb_test_out for BPF_PROG_TEST_RUN
 *   TCB_NO_PEER  leave out bpf_redirect_peer() (kernels before 5.10)
 */
#include <uapi/linux/bpf.h>
#include <uapi/linux/if_ether.h>
#include <uapi/linux/if_packet.h>
#include <uapi/linux/in.h>
#include <uapi/linux/ip.h>
#include <uapi/linux/pkt_cls.h>
#include <uapi/linux/udp.h>

/* Directions. */
enum tcb_dir {
	TCB_DIR_FROM_VM = 0,	/* tap ingress -> the NIC's host side */
	TCB_DIR_TO_VM = 1,	/* NIC ingress -> tap egress */
	TCB_DIR_MAX,
};

/*
 * Why a frame was left to the bridge. Mirrored by tcbypass.maps.Reason;
 * tests/unit/test_enum_sync.py keeps the two in step.
 */
enum tcb_reason {
	TCB_PASS_UNKNOWN_DEV = 0,	/* not the device this instance was attached to */
	TCB_PASS_RUNT = 1,		/* shorter than the headers we must read */
	TCB_PASS_MULTICAST = 2,	/* group destination: broadcast, ARP request, ND, RARP */
	TCB_PASS_FOREIGN_MAC = 3,	/* not the VM's MAC (spoofed source, other destination) */
	TCB_PASS_LOCAL = 4,		/* addressed to the bridge device itself */
	TCB_PASS_ETHERTYPE = 5,	/* VLAN-tagged, or not IPv4/IPv6/ARP: LLDP, unicast RARP... */
	TCB_PASS_DHCP = 6,		/* DHCPv4, for the DHCP server on the bridge */
	TCB_PASS_NO_TARGET = 7,	/* the tap is gone (the kernel emptied its slot) */
	TCB_PASS_MAX,
};

/* The one verdict that is not a pass reason: the frame takes the fast path. */
#define TCB_REDIRECT 0xff

/* tcb_config.flags */
#define TCB_F_DHCP_TO_BRIDGE	0x1	/* leave DHCPv4 to the in-pod server */
#define TCB_F_PEER		0x2	/* by peer: frames for the host side's own MAC */
#define TCB_F_PEER_ALL		0x4	/* by peer: every frame (the host side is a switch port) */
#define TCB_F_KERNEL_TYPES	0x8	/* the kernel types peer-redirected frames itself */
/* Bits 4-15: the path's MTU, in units of 4 bytes (0: none known). */
#define TCB_MTU_SHIFT		4
#define TCB_MTU_UNIT		4
#define TCB_MIN_L3L4_HLEN	28	/* IPv4 + UDP: the least header a GSO segment can carry */

/* The attachment, entry 0 of tcb_config. 28 bytes, no holes. */
struct tcb_config {
	__u8 vm_mac[ETH_ALEN];		/* the VM's MAC */
	__u8 bridge_mac[ETH_ALEN];	/* the bridge's own MAC */
	__u8 host_mac[ETH_ALEN];	/* MAC of the pod veth's host side */
	__u16 flags;			/* TCB_F_* */
	__u32 tap_ifindex;		/* where tcb_from_vm is attached */
	__u32 nic_ifindex;		/* where tcb_to_vm is attached */
};

/*
 * Value of tcb_stats, one per CPU. The fast path's four counters come
 * first, so that a redirect writes one cache line.
 */
struct tcb_counters {
	__u64 redirect_packets[TCB_DIR_MAX];
	__u64 redirect_bytes[TCB_DIR_MAX];
	__u64 pass_packets[TCB_PASS_MAX];
};

BPF_ARRAY(tcb_config, struct tcb_config, 1);
/*
 * Slot 0: the tap's ifindex. A devmap: when the tap is unregistered the
 * kernel deletes the entry, so frames for a vanished tap go back to the
 * bridge at once instead of into nothing (or into a device that later
 * takes its ifindex), until attach hooks the new tap. Measured at about
 * 25 ns per frame here (one more helper call), it is kept for this
 * guarantee; the NIC needs no such slot (tcb_classify()).
 */
BPF_TABLE("devmap", __u32, __u32, tcb_tap, 1);
BPF_PERCPU_ARRAY(tcb_stats, struct tcb_counters, 1);
#ifdef TCB_TEST
/* The last redirect: target ifindex, 1 if by peer, the packet type set
 * (TCB_TYPE_BY_KERNEL: left to the kernel). */
BPF_ARRAY(tcb_test_out, __u32, 3);
#endif
#define TCB_TYPE_BY_KERNEL	0xff

#define TCB_DHCP_SERVER_PORT	67
#define TCB_DHCP_CLIENT_PORT	68
#define TCB_IP_FRAG_OFFSET	0x1fff	/* iphdr.frag_off: the fragment offset's 13 bits */
#define TCB_ETH_GROUP_BIT	0x01	/* first octet of a MAC: set for multicast and broadcast */

/*
 * Two MAC addresses equal? One 4-byte and one 2-byte load each (the
 * Ethernet header sits 2 bytes off alignment; x86 and arm64 load that at
 * full speed, and the verifier allows it where the CPU does), no branch.
 */
static __always_inline int tcb_mac_eq(const __u8 *a, const __u8 *b)
{
	return ((*(const __u32 *)a ^ *(const __u32 *)b) |
		(*(const __u16 *)(a + 4) ^ *(const __u16 *)(b + 4))) == 0;
}

/*
 * Is this IPv4 frame DHCP (UDP port 67 or 68 at either end)?
 * Returns 1 if so, 0 if not, -1 if the headers are truncated.
 * Non-first fragments carry no UDP header and are not DHCP.
 *
 * Headers outside the linear area are copied out with bpf_skb_load_bytes(),
 * never pulled in: pulling would un-clone a TCP segment (a copy of its
 * whole head) only to read two bytes.
 */
static __always_inline int tcb_is_dhcp(struct __sk_buff *skb)
{
	void *data = (void *)(long)skb->data;
	void *data_end = (void *)(long)skb->data_end;
	struct iphdr *ip = data + ETH_HLEN;
	struct udphdr *udp, udp_copy;
	struct iphdr ip_copy;
	__u32 ihl;

	if ((void *)(ip + 1) > data_end) {
		if (bpf_skb_load_bytes(skb, ETH_HLEN, &ip_copy, sizeof(ip_copy)) < 0)
			return -1;
		ip = &ip_copy;
	}
	if (ip->protocol != IPPROTO_UDP)
		return 0;
	if (ip->frag_off & bpf_htons(TCB_IP_FRAG_OFFSET))	/* not the first fragment */
		return 0;
	ihl = ip->ihl * 4;
	if (ihl < sizeof(*ip))
		return -1;

	udp = data + ETH_HLEN + ihl;
	if ((void *)(udp + 1) > data_end) {
		if (bpf_skb_load_bytes(skb, ETH_HLEN + ihl, &udp_copy, sizeof(udp_copy)) < 0)
			return -1;
		udp = &udp_copy;
	}

	return udp->source == bpf_htons(TCB_DHCP_SERVER_PORT) ||
	       udp->source == bpf_htons(TCB_DHCP_CLIENT_PORT) ||
	       udp->dest == bpf_htons(TCB_DHCP_SERVER_PORT) ||
	       udp->dest == bpf_htons(TCB_DHCP_CLIENT_PORT);
}

/*
 * Decide one frame: TCB_REDIRECT with *target set, or the reason to leave
 * it to the bridge. Reads only.
 */
static __always_inline __u32 tcb_classify(struct __sk_buff *skb, const struct tcb_config *cfg,
					  const __u32 dir, __u32 *target)
{
	void *data = (void *)(long)skb->data;
	void *data_end = (void *)(long)skb->data_end;
	struct ethhdr *eth = data;
	__u32 dev = dir == TCB_DIR_FROM_VM ? cfg->tap_ifindex : cfg->nic_ifindex;
	__u32 *tap, slot = 0;
	int dhcp;

	if (skb->ifindex != dev)
		return TCB_PASS_UNKNOWN_DEV;
	if ((void *)(eth + 1) > data_end)
		return TCB_PASS_RUNT;
	if (eth->h_dest[0] & TCB_ETH_GROUP_BIT)
		return TCB_PASS_MULTICAST;
	/* The kernel has already taken an outer 802.1Q tag off into skb->vlan_*:
	 * tagged frames are not parsed here, so they go the bridge's way. */
	if (skb->vlan_present)
		return TCB_PASS_ETHERTYPE;

	if (dir == TCB_DIR_FROM_VM) {
		if (!tcb_mac_eq(eth->h_source, cfg->vm_mac))
			return TCB_PASS_FOREIGN_MAC;
		if (tcb_mac_eq(eth->h_dest, cfg->bridge_mac))
			return TCB_PASS_LOCAL;
	} else if (!tcb_mac_eq(eth->h_dest, cfg->vm_mac)) {
		return TCB_PASS_FOREIGN_MAC;
	}

	switch (bpf_ntohs(eth->h_proto)) {
	case ETH_P_IP:
		if (!(cfg->flags & TCB_F_DHCP_TO_BRIDGE))
			break;
		dhcp = tcb_is_dhcp(skb);
		if (dhcp < 0)
			return TCB_PASS_RUNT;
		if (dhcp)
			return TCB_PASS_DHCP;
		break;
	case ETH_P_IPV6:
	case ETH_P_ARP:
		break;
	default:
		return TCB_PASS_ETHERTYPE;
	}

	/*
	 * From the VM the target is the pod NIC, straight from the config: it
	 * goes only with the whole pod, and then the bridge could carry
	 * nothing either. Towards the VM, ask the devmap whether the tap is
	 * still there.
	 */
	if (dir == TCB_DIR_FROM_VM) {
		*target = cfg->nic_ifindex;
		return TCB_REDIRECT;
	}
	tap = tcb_tap.lookup(&slot);
	if (!tap)
		return TCB_PASS_NO_TARGET;
	*target = *tap;
	return TCB_REDIRECT;
}

/*
 * Could this frame be longer than the path's MTU? Over the bridge the veth's
 * crossing into the node drops such a frame (is_skb_forwardable(), which
 * for a GSO packet checks its segments); a peer redirect would deliver it.
 * So it takes bpf_redirect() through the pod NIC, whose crossing does
 * exactly what the bridge path does with it. The test errs that way only:
 * a GSO segment is taken to carry the least header there is, so every
 * segment the veth would refuse is caught, and a well-sized TCP or UDP
 * stream never is. Only a VM whose MTU is wrong sends such frames: the
 * others pay one compare.
 */
static __always_inline int tcb_oversized(struct __sk_buff *skb, const struct tcb_config *cfg)
{
	__u32 mtu = (cfg->flags >> TCB_MTU_SHIFT) * TCB_MTU_UNIT;

	if (!mtu)
		return 0;
	if (skb->gso_size)
		return skb->gso_size + TCB_MIN_L3L4_HLEN > mtu;
	return skb->len > mtu + ETH_HLEN;
}

/*
 * Should this frame from the VM go by bpf_redirect_peer()? Handed over by
 * peer, a frame skips the host side's receive path, where eth_type_trans()
 * would have set its packet type from its destination MAC. Older kernels
 * keep the type the tap gave it, so we set the right one here (*pkt_type);
 * since Linux 6.15 (and stable kernels that took the change, such as
 * Debian 12's 6.1.0-57) the peer redirect scrubs the frame, which makes it
 * PACKET_HOST whatever we set (TCB_F_KERNEL_TYPES, probed by doing it: then
 * setting it is a wasted call).
 * PACKET_HOST for everything is harmless where the host side is a switch
 * port (OVS's kernel datapath, a bridge: TCB_F_PEER_ALL), which takes every
 * frame whatever its type. A host side whose own stack sees the frames gets
 * by peer only those addressed to it (TCB_F_PEER); a frame for another MAC
 * must arrive there as PACKET_OTHERHOST, so it crosses the veth.
 */
static __always_inline int tcb_by_peer(struct __sk_buff *skb, const struct tcb_config *cfg, __u32 *pkt_type)
{
	void *data = (void *)(long)skb->data;
	void *data_end = (void *)(long)skb->data_end;
	struct ethhdr *eth = data;
	int for_host;

	if ((void *)(eth + 1) > data_end || tcb_oversized(skb, cfg))
		return 0;
	for_host = tcb_mac_eq(eth->h_dest, cfg->host_mac);
	if (!for_host && !(cfg->flags & TCB_F_PEER_ALL))
		return 0;
	if (cfg->flags & TCB_F_KERNEL_TYPES) {
		*pkt_type = TCB_TYPE_BY_KERNEL;
		return 1;
	}
	*pkt_type = for_host ? PACKET_HOST : PACKET_OTHERHOST;
	if (skb->pkt_type != *pkt_type)
		bpf_skb_change_type(skb, *pkt_type);
	return 1;
}

/* Count the verdict and carry it out. The only exit of both programs. */
static __always_inline int tcb_handle(struct __sk_buff *skb, const __u32 dir)
{
	__u32 zero = 0, target = 0, len = skb->len, verdict;
	__u32 peer = 0, pkt_type = 0;
	struct tcb_counters *counters;
	struct tcb_config *cfg;
	int ret = TC_ACT_UNSPEC;

	/*
	 * Entry 0 of an array map always exists: all zeroes until attach writes
	 * it, and a zero ifindex matches no device (TCB_PASS_UNKNOWN_DEV). The
	 * check is the verifier's due, never taken.
	 */
	cfg = tcb_config.lookup(&zero);
	if (!cfg)
		return TC_ACT_UNSPEC;
	verdict = tcb_classify(skb, cfg, dir, &target);
	counters = tcb_stats.lookup(&zero);

	if (verdict == TCB_REDIRECT) {
		if (counters) {
			counters->redirect_packets[dir] += 1;
			counters->redirect_bytes[dir] += len;
		}
#ifndef TCB_NO_PEER
		if (dir == TCB_DIR_FROM_VM && (cfg->flags & (TCB_F_PEER | TCB_F_PEER_ALL)))
			peer = tcb_by_peer(skb, cfg, &pkt_type);
		if (peer) {
			/*
			 * Over the bridge the frame would cross the veth into the
			 * node's namespace, and that crossing clears skb->mark
			 * (skb_scrub_packet() across namespaces); a peer redirect
			 * keeps it. A mark set in the pod must not reach the node,
			 * where OVS's kernel datapath matches on it (skb_mark).
			 */
			skb->mark = 0;
			ret = bpf_redirect_peer(target, 0);
		} else
#endif
			ret = bpf_redirect(target, 0);
#ifdef TCB_TEST
		__u32 slot = 0;
		tcb_test_out.update(&slot, &target);
		slot = 1;
		tcb_test_out.update(&slot, &peer);
		slot = 2;
		tcb_test_out.update(&slot, &pkt_type);
#endif
	} else if (counters && verdict < TCB_PASS_MAX) {
		counters->pass_packets[verdict] += 1;
	}
	return ret;
}

/*
 * On the ingress of the VM's tap: frames the VM sent. The VM's own unicast
 * frames go to the pod veth's host side (or the NIC's egress), and on to OVS.
 */
int tcb_from_vm(struct __sk_buff *skb)
{
	return tcb_handle(skb, TCB_DIR_FROM_VM);
}

/*
 * On the ingress of the pod NIC (eth0-nic): frames OVS sent into the pod.
 * Unicast frames for the VM's MAC go to the tap's egress.
 */
int tcb_to_vm(struct __sk_buff *skb)
{
	return tcb_handle(skb, TCB_DIR_TO_VM);
}
