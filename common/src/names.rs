//! Names, ports, marks and routing numbers used by both the kernel and the user side.

/// Hash map: enrolled workload IP ([`crate::WorkloadKey`]) → [`crate::WorkloadValue`].
pub const MAP_WORKLOADS: &str = "MP_WORKLOADS";
/// Hash map: ifindex of an interface the classifier is attached to →
/// [`crate::InterfaceValue`] (workload behind it, pod-facing, no link-layer header).
pub const MAP_INTERFACES: &str = "MP_INTERFACES";
/// Ring buffer of [`crate::DropEvent`]s, rate-limited in the kernel. Not pinned: each
/// loaded object has its own, read by the daemon that loaded it.
pub const MAP_EVENTS: &str = "MP_EVENTS";
/// Per-CPU array, one slot per [`crate::DropReason`]: when it last sent an event, and the
/// drops since. Not pinned either.
pub const MAP_EVENT_STATE: &str = "MP_EVENT_STATE";
/// SOCKMAP of the proxy's listening sockets, indexed by [`crate::Listener::slot`].
pub const MAP_LISTENERS: &str = "MP_LISTENERS";
/// Per-CPU array of `u64` datapath counters, indexed by [`crate::Counter`].
pub const MAP_COUNTERS: &str = "MP_COUNTERS";
/// Every map meshpath pins, in a stable order.
pub const PINNED_MAPS: [&str; 4] = [MAP_WORKLOADS, MAP_INTERFACES, MAP_LISTENERS, MAP_COUNTERS];

/// TC classifier for pod-facing veths and uplinks (ingress).
pub const PROG_TC_INGRESS: &str = "mp_tc_ingress";
/// TC guard on the same interfaces (egress): drops TCP forwarded to an enrolled workload
/// around the proxy.
pub const PROG_TC_EGRESS: &str = "mp_tc_egress";
/// sk_lookup dispatcher into the proxy's listeners.
pub const PROG_SK_LOOKUP: &str = "mp_sk_lookup";

/// Capacity of [`MAP_WORKLOADS`]: IPs of enrolled workloads on one node.
pub const MAX_WORKLOADS: u32 = 65_536;

/// Root of meshpath's pins on bpffs; each node gets `<root>/<node>/`.
pub const BPFFS_ROOT: &str = "/sys/fs/bpf";
pub const PIN_DIR: &str = "/sys/fs/bpf/meshpath";
/// Sub-directory of a node's pin dir that holds its pinned links.
pub const PIN_LINKS_SUBDIR: &str = "links";
/// Pin name of the sk_lookup link inside [`PIN_LINKS_SUBDIR`].
pub const PIN_SK_LOOKUP_LINK: &str = "sk_lookup";
/// Prefix of TC link pins inside [`PIN_LINKS_SUBDIR`]; the interface index follows.
pub const PIN_TC_LINK_PREFIX: &str = "tc_ingress_if";
/// Prefix of the egress guard's link pins inside [`PIN_LINKS_SUBDIR`].
pub const PIN_TC_EGRESS_LINK_PREFIX: &str = "tc_egress_if";

/// Legacy (clsact/netlink) attachment of the classifier, for kernels without TCX: filter
/// priority (lower runs first; the kernel's default is 49152) and handle.
pub const TC_FILTER_PRIORITY: u16 = 1519;
pub const TC_FILTER_HANDLE: u16 = 1;
/// Node state that cannot live on bpffs (which holds only pins): `<dir>/<node>/`.
pub const STATE_DIR: &str = "/run/meshpath";
/// The serving daemon's unix socket in `<STATE_DIR>/<node>/`, where a successor announces
/// itself and receives the relays handed over.
pub const HANDOVER_SOCKET: &str = "handover.sock";

/// The serving daemon's unix socket in `<STATE_DIR>/<node>/` where the CNI plugin hands it
/// each new pod of the mesh, and waits until the pod is enrolled.
pub const CNI_SOCKET: &str = "cni.sock";
/// The pods the CNI plugin handed over, in `<STATE_DIR>/<node>/`: kept across daemon
/// restarts and takeovers, gone with the node's `/run` at a reboot, as the pods are.
pub const CNI_PODS_FILE: &str = "cni-pods.json";
/// The CNI plugin's log in `<STATE_DIR>/<node>/`, which `meshpath status` shows.
pub const CNI_LOG_FILE: &str = "cni.log";
/// The CNI plugin's binary name, and its `type` in the chained conflist.
pub const CNI_PLUGIN: &str = "meshpath-cni";

/// Captured outbound traffic of enrolled pods.
pub const PORT_OUTBOUND: u16 = 15001;
/// Inbound plaintext to enrolled pods.
pub const PORT_INBOUND_PLAIN: u16 = 15006;
/// Inbound HBONE (mTLS HTTP/2 CONNECT) to enrolled pods; also the port peers dial.
pub const PORT_HBONE: u16 = 15008;
/// Readiness endpoint (`/healthz/ready`).
pub const PORT_READINESS: u16 = 15021;
/// Prometheus metrics (`/metrics`), as ztunnel's.
pub const PORT_METRICS: u16 = 15020;

/// SO_MARK on every socket the proxy opens itself, as Istio's ztunnel does.
pub const PROXY_MARK: u32 = 0x539;
/// Bits compared with [`PROXY_MARK`] to recognise the proxy's own packets.
pub const PROXY_MARK_MASK: u32 = 0xfff;
/// Mark the TC classifier ORs into captured packets; routed by [`CAPTURE_MASK`] to
/// [`ROUTE_TABLE`]. Disjoint from [`PROXY_MARK`] (and from kube-proxy's 0x4000/0x8000),
/// so the proxy's own sockets can never match the capture rule.
pub const CAPTURE_MARK: u32 = 0x2000;
pub const CAPTURE_MASK: u32 = 0x2000;
/// Routing table holding `local default dev lo` for captured packets.
pub const ROUTE_TABLE: u32 = 1519;
/// Priority of the `fwmark CAPTURE_MARK/CAPTURE_MASK lookup ROUTE_TABLE` rule.
pub const RULE_PRIORITY: u32 = 1519;
/// Mark the TC classifier ORs into TCP it does not capture (neither end enrolled on this
/// node). Should a NAT on this node then turn such a packet toward an enrolled pod
/// (kube-proxy's DNAT of a ClusterIP, NodePort, LoadBalancer or external IP; a hostPort),
/// the rule `fwmark NAT_MARK/NAT_MASK lookup NAT_ROUTE_TABLE` delivers it to this host, and
/// sk_lookup to the proxy, instead of forwarding it around. Disjoint from the other marks.
pub const NAT_MARK: u32 = 0x1000;
pub const NAT_MASK: u32 = 0x1000;
/// Routing table holding one `local <ip> dev lo` route per enrolled IP of this node: only
/// packets a NAT turned toward those are delivered locally, the rest of the marked traffic
/// falls through to the node's own rules.
pub const NAT_ROUTE_TABLE: u32 = 1520;
/// Priority of the `fwmark NAT_MARK/NAT_MASK lookup NAT_ROUTE_TABLE` rule.
pub const NAT_RULE_PRIORITY: u32 = 1520;
// Captured packets are routed by their own rule before the NAT rule looks.
const _: () = assert!(RULE_PRIORITY < NAT_RULE_PRIORITY);

/// Enrolment label on a namespace or pod, as Istio's ambient mode reads it.
pub const DATAPLANE_MODE_LABEL: &str = "istio.io/dataplane-mode";
/// [`DATAPLANE_MODE_LABEL`] value that enrols (on a namespace or pod).
pub const DATAPLANE_MODE_AMBIENT: &str = "ambient";
/// [`DATAPLANE_MODE_LABEL`] value on a pod that opts it out of its namespace's enrolment.
pub const DATAPLANE_MODE_NONE: &str = "none";
/// Annotation of pods with an injected sidecar, which are never enrolled (Istio's rule).
pub const SIDECAR_STATUS_ANNOTATION: &str = "sidecar.istio.io/status";
/// Annotation on a captured pod (what istio-cni sets): istiod marks a workload HBONE in its
/// xDS only when the pod carries it, so peers send plaintext to a pod without it.
pub const REDIRECTION_ANNOTATION: &str = "ambient.istio.io/redirection";
/// [`REDIRECTION_ANNOTATION`]'s value on a captured pod.
pub const REDIRECTION_ENABLED: &str = "enabled";
/// The label tying an EndpointSlice to its Service.
pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn marks_are_disjoint_from_each_other_and_from_kube_proxys() {
        /// kube-proxy's masquerade and drop marks.
        const KUBE_PROXY_MARKS: u32 = 0x4000 | 0x8000;
        for (mark, mask) in [(CAPTURE_MARK, CAPTURE_MASK), (NAT_MARK, NAT_MASK)] {
            assert_eq!(mask & PROXY_MARK_MASK, 0, "{mask:#x} overlaps the proxy's mark");
            assert_eq!(mask & KUBE_PROXY_MARKS, 0, "{mask:#x} overlaps kube-proxy's marks");
            assert_eq!(mark & mask, mark);
        }
        assert_eq!(CAPTURE_MASK & NAT_MASK, 0);
        assert_ne!(ROUTE_TABLE, NAT_ROUTE_TABLE);
    }

    #[test]
    fn kernel_object_names_fit_bpf_obj_name_len() {
        // BPF_OBJ_NAME_LEN is 16 including the NUL: longer names are truncated by the kernel
        // and would no longer match what userspace looks up.
        for name in PINNED_MAPS
            .iter()
            .chain([MAP_EVENTS, MAP_EVENT_STATE, PROG_TC_INGRESS, PROG_TC_EGRESS, PROG_SK_LOOKUP].iter())
        {
            assert!(name.len() < 16, "{name} is too long for the kernel");
        }
    }
}
