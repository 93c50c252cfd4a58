//! A fake istiod for the lab: the workload xDS and the CA a node proxy talks to, on one TLS
//! listener, enforcing what istiod checks. Built piece by piece (see issue 21).

pub mod ca;
pub mod proto;
