//! meshpath: an eBPF datapath and node proxy for sidecarless (ambient) service meshes.
//!
//! - [`datapath`] loads, pins and attaches the eBPF programs and owns their maps;
//! - [`routing`] installs the capture rule and local table over rtnetlink;
//! - [`proxy`] accepts steered connections and relays them, across nodes inside HBONE;
//! - [`identity`] holds workload identities and their certificates, [`tls`] the mTLS set-up;
//! - [`drain`] is how tasks and connections are told to stop;
//! - [`node`] is the per-node daemon tying them together, following a [`node::source`];
//! - [`state`] is what the node knows (workloads, services), [`record`] what it did with
//!   each connection (access log, metrics);
//! - [`workloads`] reads the workload file, [`k8s`] follows the Kubernetes API;
//! - [`cni`] is the chained CNI plugin that holds new pods until the daemon has them;
//! - [`topology`] says what each interface is; [`pod_ports`] which bridge port each pod is on;
//! - [`state_dir`] keeps the node's files in `/run/meshpath` root-only;
//! - [`metrics`], [`admin`] (15020/15021) and [`status`] show what is going on;
//! - [`bpftool`] is `meshpath map`: maps shown and dumped as `bpftool map` does, or decoded.
//!
//! The only `unsafe` is in `datapath/sys.rs` (raw BPF syscalls and aya's `Pod` markers).
#![deny(unsafe_code)]

pub mod admin;
pub mod bpftool;
pub mod cli;
pub mod cni;
pub mod datapath;
pub mod drain;
pub mod flags;
pub mod identity;
pub mod inpod;
pub mod k8s;
pub mod metrics;
pub mod netns;
pub mod node;
pub mod pod_ports;
pub mod policy;
pub mod proxy;
pub mod record;
pub mod routing;
pub mod state;
pub mod state_dir;
pub mod status;
pub mod sync;
pub mod tls;
pub mod topology;
pub mod workloads;
pub mod xds;
