/* Maps shared by the ebpf redirection programs (docs/architecture.md).
 *
 * Value layouts are mirrored byte for byte by testbed/redirect/bpfmaps.py, which fills
 * the maps through bpftool; keep the two in step. Addresses are in network byte order,
 * ifindexes in host byte order.
 */
#ifndef AMBIENT_MAPS_H
#define AMBIENT_MAPS_H

#define MAX_PODS 1024

/* One enrolled pod of this node, keyed by its IPv4 address. */
struct pod_info {
	__u32 ifindex; /* the pod's host-side veth, in the node namespace */
	__u8 mac[6];   /* the pod's eth0 */
	__u8 pad[2];
};

/* The node's ztunnel; ifindex 0 means no ztunnel is attached (the pods' traffic is
 * dropped until one is). */
struct ztunnel_info {
	__u32 ifindex; /* ztunnel's host-side veth, in the node namespace */
	__u32 addr;    /* ztunnel's own address: traffic to it is not intercepted */
	__u8 mac[6];   /* ztunnel's eth0 */
	__u8 flags;    /* ZTUNNEL_CAPTURE_DNS */
	__u8 pad;
};

/* ztunnel_info.flags: the pods' UDP DNS (port 53) goes to ztunnel too (Istio's
 * CAPTURE_DNS_FLAG); without it DNS queries keep their normal path. */
#define ZTUNNEL_CAPTURE_DNS 0x1

/* The node's own address as pods see it; traffic to or from it is never captured. */
struct host_info {
	__u32 addr;
};

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, MAX_PODS);
	__type(key, __u32);
	__type(value, struct pod_info);
} pod_map SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct ztunnel_info);
} ztunnel_map SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct host_info);
} host_map SEC(".maps");

#endif
