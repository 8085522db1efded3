// SPDX-License-Identifier: GPL-2.0
/*
 * The benchmark's reference program: the least a tc program can do to carry
 * one VM's unicast frames past the in-pod bridge. `tcbypass-lab bench` builds it
 * for the "minimal" scenarios only, to show how close the product
 * (bpf/redirect.c) comes to what a tc design can do on this kernel.
 *
 * What it is: two programs with everything known at compile time (-D):
 *
 *   TCB_VM_MAC     the VM's MAC, as a 48-bit number (0x0a1122334455)
 *   TCB_HOST_MAC   MAC of the host side of the pod veth
 *   TCB_TAP_IFINDEX, TCB_NIC_IFINDEX   the tap and the pod NIC, in the pod
 *   TCB_PLAIN_REDIRECT   from the VM, bpf_redirect() to the NIC's egress
 *                        instead of bpf_redirect_peer() into its host side
 *   TCB_PROXY_ALL        the "bpfbridge" stand-in: every frame, whatever its
 *                        addresses, by bpf_redirect() to the other device's
 *                        egress, both ways (a pod without a bridge)
 *
 *   min_from_vm  on the tap's ingress: a unicast frame with the VM's source
 *                MAC goes by bpf_redirect_peer() to the host side of the
 *                pod veth (or by bpf_redirect() to the NIC's egress);
 *   min_to_vm    on the NIC's ingress: a unicast frame for the VM's MAC goes
 *                by bpf_redirect() to the tap's egress.
 *
 * Everything else returns TC_ACT_UNSPEC and takes the bridge.
 *
 * What it is not: something to run on a node. It has no maps, so no
 * counters and no per-attachment state; it does not leave DHCP to the
 * in-pod server, does not spare frames addressed to the bridge itself or
 * VLAN-tagged ones, and has no devmap, so a deleted tap whose ifindex is
 * later reused would receive the VM's traffic. It must be rebuilt for every
 * pod. Each of those omissions saves a check or a map access per packet:
 * the difference between the two programs is what the product's safety
 * and bookkeeping cost.
 */
#include <uapi/linux/bpf.h>
#include <uapi/linux/if_ether.h>
#include <uapi/linux/if_packet.h>
#include <uapi/linux/pkt_cls.h>

#if !defined(TCB_VM_MAC) || !defined(TCB_HOST_MAC) || !defined(TCB_TAP_IFINDEX) || !defined(TCB_NIC_IFINDEX)
#error "build with -DTCB_VM_MAC, -DTCB_HOST_MAC, -DTCB_TAP_IFINDEX and -DTCB_NIC_IFINDEX"
#endif

/* The three 16-bit words of a 48-bit MAC constant, in network order. */
#define TCB_MAC_WORD(mac, i)	bpf_htons((__u16)(((mac) >> (32 - 16 * (i))) & 0xffff))

/* Does the MAC at p (2-byte aligned in the frame) equal the constant mac? */
static __always_inline int tcb_mac_is(const void *p, const __u64 mac)
{
	const __u16 *w = p;

	return w[0] == TCB_MAC_WORD(mac, 0) && w[1] == TCB_MAC_WORD(mac, 1) &&
	       w[2] == TCB_MAC_WORD(mac, 2);
}

/* On the ingress of the VM's tap: frames the VM sent. */
int min_from_vm(struct __sk_buff *skb)
{
	void *data = (void *)(long)skb->data;
	void *data_end = (void *)(long)skb->data_end;
	struct ethhdr *eth = data;

#ifdef TCB_PROXY_ALL
	return bpf_redirect(TCB_NIC_IFINDEX, 0);
#endif
	if ((void *)(eth + 1) > data_end || (eth->h_dest[0] & 0x01) ||
	    !tcb_mac_is(eth->h_source, TCB_VM_MAC))
		return TC_ACT_UNSPEC;
#ifdef TCB_PLAIN_REDIRECT
	return bpf_redirect(TCB_NIC_IFINDEX, 0);
#else
	/*
	 * The frame skips the host side's receive path, where eth_type_trans()
	 * would classify it. It still carries the type it got on the tap
	 * (PACKET_OTHERHOST: not the tap's MAC), and where the kernel keeps that,
	 * the host's stack drops a frame that is in fact addressed to it.
	 */
	if (tcb_mac_is(eth->h_dest, TCB_HOST_MAC) && skb->pkt_type != PACKET_HOST)
		bpf_skb_change_type(skb, PACKET_HOST);
	return bpf_redirect_peer(TCB_NIC_IFINDEX, 0);
#endif
}

/* On the ingress of the pod NIC (eth0-nic): frames coming in from the node. */
int min_to_vm(struct __sk_buff *skb)
{
	void *data = (void *)(long)skb->data;
	void *data_end = (void *)(long)skb->data_end;
	struct ethhdr *eth = data;

#ifdef TCB_PROXY_ALL
	return bpf_redirect(TCB_TAP_IFINDEX, 0);
#endif
	if ((void *)(eth + 1) > data_end || !tcb_mac_is(eth->h_dest, TCB_VM_MAC))
		return TC_ACT_UNSPEC;
	return bpf_redirect(TCB_TAP_IFINDEX, 0);
}
