//! meshpath's lab: everything that runs meshpath without a cluster and checks what it does,
//! kept out of the `meshpath` binary that runs on every node.
//!
//! - [`lab`]: two nodes and five pods as network namespaces on one kernel, each node running
//!   the real `meshpath node` binary;
//! - [`traffic`]: sockets opened inside a pod's namespace, echo servers;
//! - [`smoke`]: the traffic matrix, checked hop by hop against the proxies' access logs;
//! - [`frontends`]: the NAT a node puts in front of its pods (kube-proxy's, a hostPort);
//! - [`capture`]: an AF_PACKET capture of the underlay and a TLS-record walker over it;
//! - [`chain`]: another CNI's TCX programs (assembled BPF), to chain with meshpath's;
//! - [`hbone_client`]: a hand-driven HBONE client, to send what a peer proxy would not;
//! - [`raw`]: raw (VLAN-tagged, forged) frames from a pod;
//! - [`hostile`]: what an unprivileged user on the node can open;
//! - [`tunlink`]: the `l3` topology's node link, a relayed tun pair;
//! - [`upgrade`]: takeovers of the nodes' daemons under load, every byte checked;
//! - [`apiserver`] and [`cluster`]: an in-process Kubernetes API server and the lab's pods,
//!   namespaces and services as API objects;
//! - [`loadgen`] and [`bench`]: the load generator and the benchmark against the iptables
//!   designs meshpath replaces.
//!
//! The lab reaches meshpath through its public surface: the binary's command line, the
//! files it reads and writes, its ports and its pins (read with the daemon's own decoders).
#![forbid(unsafe_code)]

pub mod apiserver;
pub mod bench;
pub mod capture;
pub mod chain;
pub mod cluster;
pub mod cni;
pub mod frontends;
pub mod hbone_client;
pub mod hostile;
pub mod istiod;
pub mod lab;
pub mod lab_istiod;
pub mod loadgen;
pub mod raw;
pub mod smoke;
pub mod traffic;
pub mod tunlink;
pub mod upgrade;

pub use lab::{LAB_PREFIX, Lab, LabError, Node, POD_CIDRS, Pod, Topology, http_get, meshpath_binary, readiness, sweep};
