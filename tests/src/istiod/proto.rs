//! The fake istiod's side of istiod's APIs: code generated from `userspace/proto/` (servers).

#![allow(clippy::all, clippy::pedantic, unused_qualifications, rust_2018_idioms, missing_docs)]

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
