//! Types and names shared by meshpath's eBPF programs and its userspace.
//!
//! Everything both sides must agree on lives here exactly once: map and program names,
//! ports, marks, the layout of map keys and values, and the decisions the kernel takes
//! (so they can be unit-tested on the host).
#![no_std]
#![forbid(unsafe_code)]

pub mod counters;
pub mod event;
pub mod interface;
pub mod listener;
pub mod names;
pub mod packet;
pub mod verdict;
pub mod workload;

pub use counters::Counter;
pub use event::DropEvent;
pub use interface::InterfaceValue;
pub use listener::Listener;
pub use verdict::{DropReason, Verdict};
pub use workload::{WorkloadKey, WorkloadValue};
