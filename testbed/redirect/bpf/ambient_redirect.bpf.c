// SPDX-License-Identifier: GPL-2.0
/* tc programs of the ebpf redirection mode (docs/architecture.md), written for this project.
 *
 * Per node, one copy of this object is loaded with its own maps:
 *   app_outbound          pod host-side veth, ingress: an enrolled pod's TCP and UDP go to
 *                         ztunnel (UDP to port 53 only when ztunnel captures DNS)
 *   app_inbound           pod host-side veth, egress: TCP and UDP for an enrolled pod go to
 *                         ztunnel (DNS answers, UDP from port 53, excepted)
 *   ztunnel_host_ingress  ztunnel host-side veth, ingress: what ztunnel sends to a pod of the
 *                         node goes straight to that pod, past app_inbound
 *   ztunnel_tproxy        eth0 inside ztunnel's namespace, ingress: hand each TCP packet to
 *                         the ztunnel socket it belongs to (bpf_sk_assign), like TPROXY does
 * Istio's fail modes: with no ztunnel attached (ztunnel map ifindex 0) the app programs
 * drop the pod's traffic (fail closed); ztunnel_tproxy lets a packet no listener matches
 * go on (TC_ACT_OK) to the ztunnel namespace's own stack. UDP is not sk-assigned there:
 * the namespace's netfilter takes a captured DNS query to ztunnel's DNS proxy (15053).
 */
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>

#include "ambient_maps.h"

#define TC_ACT_OK 0
#define TC_ACT_SHOT 2
#define ETH_P_IP 0x0800
#define ETH_HLEN 14
#define IPPROTO_TCP 6
#define IPPROTO_UDP 17
#define DNS_PORT 53

#define OUTBOUND_PORT 15001
#define INBOUND_PLAIN_PORT 15006
#define INBOUND_HBONE_PORT 15008

/* Set by ztunnel_host_ingress on packets it redirects to a pod, read by app_inbound on
 * that pod's veth egress: they come from ztunnel and must not go back to it. The tc
 * control block survives a bpf_redirect to another device's egress in the same netns. */
#define BYPASS_CB_SLOT 4
#define BYPASS_CB_VALUE 0xb1a5u

/* Makes the ztunnel namespace route a packet to the local table, so that the socket
 * chosen by bpf_sk_assign receives it whatever its destination (ip rule fwmark). */
#define TPROXY_MARK 0x400

struct flow {
	__u32 saddr;
	__u32 daddr;
	__u16 sport; /* network byte order, as on the wire */
	__u16 dport;
	__u8 protocol; /* IPPROTO_TCP or IPPROTO_UDP */
};

/* The IPv4 TCP or UDP flow of an Ethernet frame; false for anything else. */
static __always_inline bool load_flow(struct __sk_buff *skb, struct flow *flow)
{
	struct iphdr ip;
	__u16 ports[2];
	__u32 l4_offset;

	if (skb->protocol != bpf_htons(ETH_P_IP))
		return false;
	if (bpf_skb_load_bytes(skb, ETH_HLEN, &ip, sizeof(ip)) < 0)
		return false;
	if ((ip.protocol != IPPROTO_TCP && ip.protocol != IPPROTO_UDP) || ip.ihl < 5)
		return false;
	if (ip.frag_off & bpf_htons(0x1fff))
		return false; /* a later fragment carries no ports */
	l4_offset = ETH_HLEN + ip.ihl * 4;
	if (bpf_skb_load_bytes(skb, l4_offset, ports, sizeof(ports)) < 0)
		return false;
	flow->saddr = ip.saddr;
	flow->daddr = ip.daddr;
	flow->sport = ports[0];
	flow->dport = ports[1];
	flow->protocol = ip.protocol;
	return true;
}

static __always_inline bool is_udp_port(struct flow *flow, __u16 port, bool source)
{
	return flow->protocol == IPPROTO_UDP && (source ? flow->sport : flow->dport) == bpf_htons(port);
}

static __always_inline bool is_host(__u32 addr)
{
	__u32 zero = 0;
	struct host_info *host = bpf_map_lookup_elem(&host_map, &zero);

	return host && host->addr == addr;
}

/* Rewrite the destination MAC and send the frame out of `ifindex`. */
static __always_inline int redirect_to(struct __sk_buff *skb, __u32 ifindex, __u8 *mac)
{
	if (bpf_skb_store_bytes(skb, 0, mac, 6, 0) < 0)
		return TC_ACT_SHOT;
	return bpf_redirect(ifindex, 0);
}

static __always_inline struct ztunnel_info *attached_ztunnel(void)
{
	__u32 zero = 0;
	struct ztunnel_info *zt = bpf_map_lookup_elem(&ztunnel_map, &zero);

	return zt && zt->ifindex != 0 ? zt : NULL;
}

static __always_inline int redirect_to_ztunnel(struct __sk_buff *skb)
{
	struct ztunnel_info *zt = attached_ztunnel();

	if (!zt)
		return TC_ACT_SHOT; /* no ztunnel on this node: an enrolled pod's traffic must not leak */
	return redirect_to(skb, zt->ifindex, zt->mac);
}

SEC("tc")
int app_outbound(struct __sk_buff *skb)
{
	struct ztunnel_info *zt = attached_ztunnel();
	struct flow flow;

	if (!zt)
		return TC_ACT_SHOT; /* fail closed, as Istio's app_outbound: before anything else */
	if (!load_flow(skb, &flow) || is_host(flow.daddr))
		return TC_ACT_OK;
	if (!bpf_map_lookup_elem(&pod_map, &flow.saddr))
		return TC_ACT_OK; /* not enrolled */
	if (is_udp_port(&flow, DNS_PORT, false) && !(zt->flags & ZTUNNEL_CAPTURE_DNS))
		return TC_ACT_OK;
	return redirect_to(skb, zt->ifindex, zt->mac);
}

SEC("tc")
int app_inbound(struct __sk_buff *skb)
{
	struct flow flow;

	if (skb->cb[BYPASS_CB_SLOT] == BYPASS_CB_VALUE)
		return TC_ACT_OK;
	if (!load_flow(skb, &flow) || is_host(flow.saddr))
		return TC_ACT_OK;
	if (!bpf_map_lookup_elem(&pod_map, &flow.daddr))
		return TC_ACT_OK;
	if (is_udp_port(&flow, DNS_PORT, true))
		return TC_ACT_OK; /* a DNS answer for the pod */
	return redirect_to_ztunnel(skb);
}

SEC("tc")
int ztunnel_host_ingress(struct __sk_buff *skb)
{
	struct flow flow;
	struct pod_info *pod;

	if (!load_flow(skb, &flow))
		return TC_ACT_OK;
	pod = bpf_map_lookup_elem(&pod_map, &flow.daddr);
	if (!pod)
		return TC_ACT_OK; /* another node's pod, or outside the mesh: route it */
	/* HBONE between two pods of this node is ztunnel talking to itself: send it back
	 * in, where ztunnel_tproxy hands it to the 15008 listener or the connecting socket. */
	if (flow.protocol == IPPROTO_TCP && (flow.dport == bpf_htons(INBOUND_HBONE_PORT) ||
					      flow.sport == bpf_htons(INBOUND_HBONE_PORT)))
		return redirect_to_ztunnel(skb);
	skb->cb[BYPASS_CB_SLOT] = BYPASS_CB_VALUE;
	return redirect_to(skb, pod->ifindex, pod->mac);
}

/* 15008 for HBONE, 15001 for what a pod of this node sends, 15006 for the rest. */
static __always_inline __u16 listener_port(struct flow *flow)
{
	if (flow->dport == bpf_htons(INBOUND_HBONE_PORT))
		return INBOUND_HBONE_PORT;
	if (bpf_map_lookup_elem(&pod_map, &flow->saddr))
		return OUTBOUND_PORT;
	return INBOUND_PLAIN_PORT;
}

static __always_inline int assign(struct __sk_buff *skb, struct bpf_sock *sk)
{
	long err = bpf_sk_assign(skb, sk, 0);

	bpf_sk_release(sk);
	if (err)
		return TC_ACT_SHOT;
	skb->mark = TPROXY_MARK;
	return TC_ACT_OK;
}

SEC("tc")
int ztunnel_tproxy(struct __sk_buff *skb)
{
	struct bpf_sock_tuple tuple = {};
	struct bpf_sock *sk;
	struct flow flow;
	__u32 zero = 0;
	struct ztunnel_info *zt;

	if (!load_flow(skb, &flow) || flow.protocol != IPPROTO_TCP)
		return TC_ACT_OK; /* UDP is left to this namespace's stack */
	zt = bpf_map_lookup_elem(&ztunnel_map, &zero);
	if (zt && zt->addr == flow.daddr)
		return TC_ACT_OK; /* for ztunnel itself (admin, readiness, metrics) */
	tuple.ipv4.saddr = flow.saddr;
	tuple.ipv4.daddr = flow.daddr;
	tuple.ipv4.sport = flow.sport;
	tuple.ipv4.dport = flow.dport;
	sk = bpf_skc_lookup_tcp(skb, &tuple, sizeof(tuple.ipv4), BPF_F_CURRENT_NETNS, 0);
	if (sk) {
		if (sk->state != BPF_TCP_LISTEN)
			return assign(skb, sk); /* a connection ztunnel has already */
		bpf_sk_release(sk);
	}
	tuple.ipv4.dport = bpf_htons(listener_port(&flow));
	sk = bpf_skc_lookup_tcp(skb, &tuple, sizeof(tuple.ipv4), BPF_F_CURRENT_NETNS, 0);
	if (!sk)
		return TC_ACT_OK; /* no listener matches: Istio passes it to the stack */
	if (sk->state != BPF_TCP_LISTEN) {
		bpf_sk_release(sk);
		return TC_ACT_OK;
	}
	return assign(skb, sk);
}

char LICENSE[] SEC("license") = "GPL";
