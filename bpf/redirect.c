// SPDX-License-Identifier: GPL-2.0
/*
 * tcbypass: carry a KubeVirt VM's own unicast frames past the in-pod bridge.
 *
 * Inside a virt-launcher pod the VM's tap (tap0) and the pod's veth
 * (eth0-nic) are both ports of the Linux bridge k6t-eth0. Two programs,
 * attached with clsact/direct-action to the ingress of each device, hand
 * the VM's unicast frames straight to the other device's egress with
 * bpf_redirect(). Everything else returns TC_ACT_OK and takes the bridge
 * exactly as before: broadcast and multicast (ARP requests, IPv6 ND, RARP),
 * DHCPv4 for the in-pod DHCP server, frames for the bridge itself, frames
 * of other MACs, ethertypes we do not parse, and anything truncated.
 * Nothing is ever dropped here.
 *
 * Each attachment (one tap/NIC pair) loads its own instance of this
 * program with its own maps. Ifindexes repeat from one pod's network
 * namespace to the next; because a filter holds one instance and that
 * instance's maps only ever receive its own pod's entries, two pods can
 * never see each other's ifindexes or MACs.
 *
 * Configured at build time with -D (see tcbypass/loader.py):
 *   TCB_MAX_PORTS  entries of tcb_ports (2 live + 2 while a tap is replaced)
 *   TCB_TEST       record the redirect target for BPF_PROG_TEST_RUN checks
 *   TCB_FROM_VM_PEER  from the VM, bpf_redirect_peer() into the NIC's peer
 *                  (the host side) instead of the NIC's egress: skips one
 *                  queue. Measured by `tcbypass bench`; not the default.
 */
#include <uapi/linux/bpf.h>
#include <uapi/linux/if_ether.h>
#include <uapi/linux/if_packet.h>
#include <uapi/linux/in.h>
#include <uapi/linux/ip.h>
#include <uapi/linux/pkt_cls.h>
#include <uapi/linux/udp.h>

#ifndef TCB_MAX_PORTS
#define TCB_MAX_PORTS 4
#endif

/* Directions; also the index of the target device in tcb_egress. */
enum tcb_dir {
	TCB_DIR_FROM_VM = 0,	/* tap ingress -> NIC egress */
	TCB_DIR_TO_VM = 1,	/* NIC ingress -> tap egress */
	TCB_DIR_MAX,
};

/*
 * Why a frame was left to the bridge. Mirrored by tcbypass.maps.Reason;
 * tests/unit/test_enum_sync.py keeps the two in step.
 */
enum tcb_reason {
	TCB_PASS_UNKNOWN_DEV = 0,	/* ingress device not registered for this direction */
	TCB_PASS_RUNT = 1,		/* shorter than the headers we must read */
	TCB_PASS_MULTICAST = 2,	/* group destination: broadcast, ARP request, ND, RARP */
	TCB_PASS_FOREIGN_MAC = 3,	/* not the VM's MAC (spoofed source, other destination) */
	TCB_PASS_LOCAL = 4,		/* addressed to the bridge device itself */
	TCB_PASS_ETHERTYPE = 5,	/* VLAN-tagged, or not IPv4/IPv6/ARP: LLDP, unicast RARP... */
	TCB_PASS_DHCP = 6,		/* DHCPv4, for the DHCP server on the bridge */
	TCB_PASS_NO_TARGET = 7,	/* target device gone (the kernel emptied its slot) */
	TCB_PASS_MAX,
};

/* Not a pass reason: the frame takes the fast path. */
#define TCB_REDIRECT TCB_PASS_MAX

/* tcb_port.flags */
#define TCB_F_DHCP_TO_BRIDGE	0x1	/* leave DHCPv4 to the in-pod server */

/* Value of tcb_ports, keyed by the ingress ifindex. 20 bytes, no holes. */
struct tcb_port {
	__u8 vm_mac[ETH_ALEN];		/* the VM's MAC */
	__u8 local_mac[ETH_ALEN];	/* the bridge's own MAC */
	__u32 dir;			/* enum tcb_dir this device's ingress feeds */
	__u32 flags;			/* TCB_F_* */
};

/* Value of tcb_stats, one per CPU. */
struct tcb_counters {
	__u64 redirect_packets[TCB_DIR_MAX];
	__u64 redirect_bytes[TCB_DIR_MAX];
	__u64 pass_packets[TCB_PASS_MAX];
};

/* Ingress ifindex -> what to match there (the MAC map). */
BPF_HASH(tcb_ports, __u32, struct tcb_port, TCB_MAX_PORTS);
/*
 * enum tcb_dir -> egress ifindex (the ifindex map). A devmap: when the
 * target device is unregistered the kernel deletes the entry, so a vanished
 * tap sends traffic back to the bridge at once instead of into nothing.
 */
BPF_TABLE("devmap", __u32, __u32, tcb_egress, TCB_DIR_MAX);
BPF_PERCPU_ARRAY(tcb_stats, struct tcb_counters, 1);
#ifdef TCB_TEST
/* Last redirect target, for BPF_PROG_TEST_RUN (which never transmits). */
BPF_ARRAY(tcb_test_target, __u32, 1);
#endif

#define TCB_DHCP_SERVER_PORT	67
#define TCB_DHCP_CLIENT_PORT	68
/* Ethernet + the longest IPv4 header + UDP: all tcb_is_dhcp() reads. */
#define TCB_DHCP_PARSE_LEN	(ETH_HLEN + 60 + sizeof(struct udphdr))

static __always_inline int tcb_mac_eq(const __u8 *a, const __u8 *b)
{
	return ((a[0] ^ b[0]) | (a[1] ^ b[1]) | (a[2] ^ b[2]) |
		(a[3] ^ b[3]) | (a[4] ^ b[4]) | (a[5] ^ b[5])) == 0;
}

/*
 * Is this IPv4 frame DHCP (UDP port 67 or 68 at either end)?
 * Returns 1 if so, 0 if not, -1 if the headers are truncated.
 * Non-first fragments carry no UDP header and are not DHCP.
 */
static __always_inline int tcb_is_dhcp(struct __sk_buff *skb)
{
	void *data = (void *)(long)skb->data;
	void *data_end = (void *)(long)skb->data_end;
	struct udphdr *udp;
	struct iphdr *ip;
	__u32 ihl;

	/* Pull the headers into the linear area only when they are not there yet. */
	if (data + TCB_DHCP_PARSE_LEN > data_end && skb->len > data_end - data) {
		bpf_skb_pull_data(skb, skb->len < TCB_DHCP_PARSE_LEN ?
				       skb->len : TCB_DHCP_PARSE_LEN);
		data = (void *)(long)skb->data;
		data_end = (void *)(long)skb->data_end;
	}

	ip = data + ETH_HLEN;
	if ((void *)(ip + 1) > data_end)
		return -1;
	if (ip->protocol != IPPROTO_UDP)
		return 0;
	if (ip->frag_off & bpf_htons(0x1fff))	/* fragment offset: not the first */
		return 0;
	ihl = ip->ihl * 4;
	if (ihl < sizeof(*ip))
		return -1;
	udp = (void *)ip + ihl;
	if ((void *)(udp + 1) > data_end)
		return -1;

	return udp->source == bpf_htons(TCB_DHCP_SERVER_PORT) ||
	       udp->source == bpf_htons(TCB_DHCP_CLIENT_PORT) ||
	       udp->dest == bpf_htons(TCB_DHCP_SERVER_PORT) ||
	       udp->dest == bpf_htons(TCB_DHCP_CLIENT_PORT);
}

/*
 * Decide one frame: TCB_REDIRECT with *target set, or the reason to leave
 * it to the bridge. Reads only; never changes the frame.
 */
static __always_inline __u32 tcb_classify(struct __sk_buff *skb, __u32 dir,
					  __u32 *target)
{
	void *data = (void *)(long)skb->data;
	void *data_end = (void *)(long)skb->data_end;
	struct ethhdr *eth = data;
	struct tcb_port *port;
	__u32 ifindex = skb->ifindex;
	__u32 *egress;
	int dhcp;

	port = tcb_ports.lookup(&ifindex);
	if (!port || port->dir != dir)
		return TCB_PASS_UNKNOWN_DEV;
	if ((void *)(eth + 1) > data_end)
		return TCB_PASS_RUNT;
	if (eth->h_dest[0] & 0x01)
		return TCB_PASS_MULTICAST;
	/* The kernel has already taken an outer 802.1Q tag off into skb->vlan_*:
	 * tagged frames are not parsed here, so they go the bridge's way. */
	if (skb->vlan_present)
		return TCB_PASS_ETHERTYPE;

	if (dir == TCB_DIR_FROM_VM) {
		if (!tcb_mac_eq(eth->h_source, port->vm_mac))
			return TCB_PASS_FOREIGN_MAC;
		if (tcb_mac_eq(eth->h_dest, port->local_mac))
			return TCB_PASS_LOCAL;
	} else if (!tcb_mac_eq(eth->h_dest, port->vm_mac)) {
		return TCB_PASS_FOREIGN_MAC;
	}

	switch (bpf_ntohs(eth->h_proto)) {
	case ETH_P_IP:
		if (!(port->flags & TCB_F_DHCP_TO_BRIDGE))
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

	egress = tcb_egress.lookup(&dir);
	if (!egress)
		return TCB_PASS_NO_TARGET;
	*target = *egress;
	return TCB_REDIRECT;
}

/* Count the verdict and carry it out. The only exit of both programs. */
static __always_inline int tcb_handle(struct __sk_buff *skb, __u32 dir)
{
	struct tcb_counters *counters;
	__u32 zero = 0, target = 0, len = skb->len;
	__u32 verdict;
	int ret = TC_ACT_OK;

	verdict = tcb_classify(skb, dir, &target);
	counters = tcb_stats.lookup(&zero);

	if (verdict == TCB_REDIRECT) {
		if (counters) {
			counters->redirect_packets[dir & 1]++;
			counters->redirect_bytes[dir & 1] += len;
		}
#ifdef TCB_TEST
		tcb_test_target.update(&zero, &target);
#endif
#ifdef TCB_FROM_VM_PEER
		if (dir == TCB_DIR_FROM_VM) {
			/* The frame was classified on the tap as for another host;
			 * before 6.15 redirect_peer keeps that, and the host side
			 * would drop it if it ends up in its own stack. */
			bpf_skb_change_type(skb, PACKET_HOST);
			ret = bpf_redirect_peer(target, 0);
		} else
#endif
			ret = bpf_redirect(target, 0);
	} else if (counters && verdict < TCB_PASS_MAX) {
		counters->pass_packets[verdict]++;
	}
	return ret;
}

/*
 * Attached to the ingress of the VM's tap: frames the VM sent. The VM's own
 * unicast frames go to the pod NIC's egress, and on to OVS.
 */
int tcb_from_vm(struct __sk_buff *skb)
{
	return tcb_handle(skb, TCB_DIR_FROM_VM);
}

/*
 * Attached to the ingress of the pod NIC (eth0-nic): frames OVS sent into
 * the pod. Unicast frames for the VM's MAC go to the tap's egress.
 */
int tcb_to_vm(struct __sk_buff *skb)
{
	return tcb_handle(skb, TCB_DIR_TO_VM);
}
