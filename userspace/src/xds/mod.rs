//! istiod's workload xDS: the generated types of its APIs ([`proto`]), the names of the
//! resource types meshpath subscribes to, the protocol as a state machine ([`session`]), the
//! transport that carries it ([`client`]), its settings ([`config`]) and the node's view of
//! the mesh it keeps up to date ([`mesh`]).

pub mod client;
pub mod config;
pub mod mesh;
pub mod session;

/// Code generated from `userspace/proto/` (clients only).
#[allow(clippy::all, clippy::pedantic, unused_qualifications, rust_2018_idioms, missing_docs)]
pub mod proto {
    pub mod envoy {
        pub mod service {
            pub mod discovery {
                pub mod v3 {
                    tonic::include_proto!("envoy.service.discovery.v3");
                }
            }
        }
    }
    pub mod istio {
        pub mod workload {
            tonic::include_proto!("istio.workload");
        }
        pub mod security {
            tonic::include_proto!("istio.security");
        }
        pub mod v1 {
            pub mod auth {
                tonic::include_proto!("istio.v1.auth");
            }
        }
    }
}

/// The type of workloads and services (`istio.workload.Address`).
pub const ADDRESS_TYPE: &str = "type.googleapis.com/istio.workload.Address";
/// The type of L4 authorization policies (`istio.security.Authorization`).
pub const AUTHORIZATION_TYPE: &str = "type.googleapis.com/istio.security.Authorization";

#[cfg(test)]
mod tests {
    use prost::Message;

    use super::proto::istio::workload::{Address, Workload, address};

    #[test]
    fn a_workload_round_trips_through_the_generated_types() {
        let w = Workload {
            uid: "cluster1//v1/Pod/ns/a".into(),
            name: "a".into(),
            namespace: "ns".into(),
            addresses: vec![vec![10, 244, 1, 10]],
            service_account: "sa".into(),
            node: "n1".into(),
            ..Default::default()
        };
        let a = Address { r#type: Some(address::Type::Workload(w.clone())) };
        let back = Address::decode(a.encode_to_vec().as_slice()).expect("decodes");
        assert_eq!(back.r#type, Some(address::Type::Workload(w)));
    }
}
