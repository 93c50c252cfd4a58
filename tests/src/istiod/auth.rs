//! Who is calling: the checks istiod makes on every gRPC call of a node proxy before looking
//! at what it asks (`pkg/security/authentication.go`, `security/pkg/server/ca/authenticate/
//! kubeauth/kube_jwt.go`). Shared by the xDS and CA services of the fake.
//!
//! - the `authorization: Bearer <token>` header, whose token must be in the table given at
//!   start (istiod asks the API server's TokenReview; the lab has no such thing);
//! - the `clusterid` header, which must name the fake's cluster. istiod takes a missing one as
//!   its own cluster; the fake requires it, since ztunnel and meshpath always send it;
//!
//! Any failure is `Unauthenticated "authentication failure"`, as istiod answers (the reason
//! goes to the fake's records and log, not to the caller).

use std::collections::BTreeMap;

use tonic::Status;
use tonic::metadata::MetadataMap;

/// The istiod metadata headers a node proxy sends.
pub const AUTHORIZATION_HEADER: &str = "authorization";
pub const CLUSTER_ID_HEADER: &str = "clusterid";
/// What istiod answers to a caller it cannot authenticate.
pub const AUTHENTICATION_FAILURE: &str = "authentication failure";

/// A service account a token stands for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Account {
    pub namespace: String,
    pub service_account: String,
}

impl Account {
    pub fn new(namespace: &str, service_account: &str) -> Self {
        Self { namespace: namespace.into(), service_account: service_account.into() }
    }

    /// Its SPIFFE identity in `trust_domain`, as istiod writes a caller's identity.
    pub fn spiffe(&self, trust_domain: &str) -> String {
        meshpath::identity::Identity::new(trust_domain, &self.namespace, &self.service_account).to_string()
    }
}

/// The token table and the cluster: decides who a call comes from.
#[derive(Clone, Debug)]
pub struct Authenticator {
    cluster_id: String,
    tokens: BTreeMap<String, Account>,
}

impl Authenticator {
    pub fn new(cluster_id: &str) -> Self {
        Self { cluster_id: cluster_id.into(), tokens: BTreeMap::new() }
    }

    /// `token` authenticates as `account`.
    pub fn token(mut self, token: &str, account: Account) -> Self {
        self.tokens.insert(token.into(), account);
        self
    }

    pub fn cluster_id(&self) -> &str {
        &self.cluster_id
    }

    /// The caller's account, or why it is refused (`Err` carries the reason for the records;
    /// the caller is answered [`refusal`]).
    pub fn authenticate(&self, metadata: &MetadataMap) -> Result<Account, String> {
        let token = bearer(metadata)?;
        let cluster = metadata.get(CLUSTER_ID_HEADER).ok_or("no clusterid header")?;
        let cluster = cluster.to_str().map_err(|_| "clusterid is not ASCII")?;
        if cluster != self.cluster_id {
            return Err(format!(
                "client claims to be in cluster {cluster:?}, but we only know about {:?}",
                self.cluster_id
            ));
        }
        self.tokens.get(token).cloned().ok_or_else(|| "the token is not one of the lab's".into())
    }
}

/// istiod's answer to a call it could not authenticate.
pub fn refusal() -> Status {
    Status::unauthenticated(AUTHENTICATION_FAILURE)
}

fn bearer(metadata: &MetadataMap) -> Result<&str, String> {
    let value = metadata.get(AUTHORIZATION_HEADER).ok_or("no HTTP authorization header exists")?;
    let value = value.to_str().map_err(|_| "the authorization header is not ASCII")?;
    value.strip_prefix("Bearer ").ok_or_else(|| "no bearer token exists in HTTP authorization header".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn md(headers: &[(&'static str, &str)]) -> MetadataMap {
        let mut m = MetadataMap::new();
        for (k, v) in headers {
            m.insert(*k, v.parse().expect("ascii"));
        }
        m
    }

    #[test]
    fn each_header_is_checked() {
        let auth = Authenticator::new("Kubernetes").token("t1", Account::new("istio-system", "ztunnel"));
        let ok = md(&[("authorization", "Bearer t1"), ("clusterid", "Kubernetes")]);
        assert_eq!(auth.authenticate(&ok), Ok(Account::new("istio-system", "ztunnel")));
        let cases = [
            (md(&[("clusterid", "Kubernetes")]), "no HTTP authorization"),
            (md(&[("authorization", "Basic t1"), ("clusterid", "Kubernetes")]), "no bearer token"),
            (md(&[("authorization", "Bearer t2"), ("clusterid", "Kubernetes")]), "not one of the lab's"),
            (md(&[("authorization", "Bearer t1")]), "no clusterid"),
            (md(&[("authorization", "Bearer t1"), ("clusterid", "other")]), "claims to be in cluster \"other\""),
        ];
        for (m, why) in cases {
            let err = auth.authenticate(&m).expect_err(why);
            assert!(err.contains(why), "{err} (want {why})");
        }
    }
}
