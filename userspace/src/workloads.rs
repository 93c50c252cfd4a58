//! The workload file: which workloads are enrolled, where they run and who they are.
//!
//! ```yaml
//! workloads:
//!   - name: web-0
//!     namespace: shop
//!     serviceAccount: web
//!     node: node1
//!     ips: [10.244.1.10, "fd00:244:1::10"]
//! ```
//!
//! A file is validated whole before anything is applied: a bad edit leaves the running
//! state as it was.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::path::Path;

use serde::{Deserialize, Serialize};

#[derive(Debug, thiserror::Error)]
pub enum WorkloadsError {
    #[error("reading {path}: {source}")]
    Read { path: String, source: std::io::Error },
    #[error("{path}: {source}")]
    Parse { path: String, source: serde_yaml::Error },
    #[error("{path}: workload #{index}: {reason}")]
    Invalid { path: String, index: usize, reason: String },
    #[error("{path}: IP {ip} belongs to both {first} and {second}")]
    DuplicateIp { path: String, ip: IpAddr, first: String, second: String },
    #[error(
        "{path} is empty: write `workloads: []` to enrol nothing (an empty file is what a half-done write looks like)"
    )]
    Empty { path: String },
    #[error("{path}: workload {0} is listed twice", .id)]
    DuplicateWorkload { path: String, id: String },
}

/// One enrolled workload (a pod, in Kubernetes terms).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Workload {
    pub name: String,
    pub namespace: String,
    pub service_account: String,
    pub node: String,
    pub ips: Vec<IpAddr>,
}

impl Workload {
    /// `namespace/name`, for logs.
    pub fn id(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WorkloadFile {
    #[serde(default)]
    pub workloads: Vec<Workload>,
}

impl WorkloadFile {
    pub fn load(path: &Path) -> Result<Self, WorkloadsError> {
        Self::load_with_text(path).map(|(f, _)| f)
    }

    /// Like [`Self::load`], also returning the text that was parsed.
    pub fn load_with_text(path: &Path) -> Result<(Self, String), WorkloadsError> {
        let p = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|source| WorkloadsError::Read { path: p.clone(), source })?;
        Ok((Self::parse(&text, &p)?, text))
    }

    /// Parses and validates; `origin` names the source in errors.
    pub fn parse(text: &str, origin: &str) -> Result<Self, WorkloadsError> {
        // "Nothing enrolled" must be said (`workloads: []`): an empty file is what a writer
        // caught between truncating and writing leaves, and applying it unenrols everything.
        if text.trim().is_empty() {
            return Err(WorkloadsError::Empty { path: origin.into() });
        }
        let file: WorkloadFile =
            serde_yaml::from_str(text).map_err(|source| WorkloadsError::Parse { path: origin.into(), source })?;
        file.validate(origin)?;
        Ok(file)
    }

    fn validate(&self, origin: &str) -> Result<(), WorkloadsError> {
        let invalid = |index: usize, reason: String| WorkloadsError::Invalid { path: origin.into(), index, reason };
        let mut owners: BTreeMap<IpAddr, String> = BTreeMap::new();
        let mut ids = BTreeSet::new();
        for (index, w) in self.workloads.iter().enumerate() {
            for (field, value) in [
                ("name", &w.name),
                ("namespace", &w.namespace),
                ("serviceAccount", &w.service_account),
                ("node", &w.node),
            ] {
                if value.trim().is_empty() {
                    return Err(invalid(index, format!("{field} is empty")));
                }
            }
            // Namespace and service account become a SPIFFE ID: they must be name-like.
            for (field, value) in [("namespace", &w.namespace), ("serviceAccount", &w.service_account)] {
                if !crate::identity::valid_segment(value) {
                    return Err(invalid(
                        index,
                        format!("{field} {value:?} may only hold letters, digits, '-', '.' and '_'"),
                    ));
                }
            }
            if w.ips.is_empty() {
                return Err(invalid(index, format!("{} has no ips", w.id())));
            }
            for ip in &w.ips {
                if ip.is_unspecified() || ip.is_loopback() || ip.is_multicast() || is_link_local(ip) {
                    return Err(invalid(index, format!("{} has IP {ip}, which cannot be a workload address", w.id())));
                }
                let canonical = ip.to_canonical();
                if let Some(first) = owners.insert(canonical, w.id()) {
                    return Err(WorkloadsError::DuplicateIp {
                        path: origin.into(),
                        ip: canonical,
                        first,
                        second: w.id(),
                    });
                }
            }
            if !ids.insert(w.id()) {
                return Err(WorkloadsError::DuplicateWorkload { path: origin.into(), id: w.id() });
            }
        }
        Ok(())
    }

    /// Workloads scheduled on `node`.
    pub fn on_node<'a>(&'a self, node: &'a str) -> impl Iterator<Item = &'a Workload> + 'a {
        self.workloads.iter().filter(move |w| w.node == node)
    }
}

fn is_link_local(ip: &IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => v4.is_link_local(),
        IpAddr::V6(v6) => v6.is_unicast_link_local(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
workloads:
  - name: a
    namespace: default
    serviceAccount: sa-a
    node: node1
    ips: [10.244.1.10, "fd00:244:1::10"]
  - name: c
    namespace: default
    serviceAccount: sa-c
    node: node2
    ips: [10.244.2.10]
"#;

    #[test]
    fn parses_a_valid_file() {
        let f = WorkloadFile::parse(GOOD, "good.yaml").unwrap();
        assert_eq!(f.workloads.len(), 2);
        assert_eq!(f.on_node("node1").map(|w| w.name.as_str()).collect::<Vec<_>>(), ["a"]);
        let c = f.workloads.iter().find(|w| w.ips.contains(&"10.244.2.10".parse::<IpAddr>().unwrap())).unwrap();
        assert_eq!(c.service_account, "sa-c");
        assert_eq!(f.workloads.iter().map(|w| w.ips.len()).sum::<usize>(), 3);
    }

    #[test]
    fn only_an_explicit_empty_list_enrols_nothing() {
        assert!(matches!(WorkloadFile::parse("  \n", "e"), Err(WorkloadsError::Empty { .. })));
        assert!(err("").contains("write `workloads: []`"));
        assert_eq!(WorkloadFile::parse("workloads: []", "e").unwrap(), WorkloadFile::default());
    }

    fn err(text: &str) -> String {
        WorkloadFile::parse(text, "w.yaml").unwrap_err().to_string()
    }

    #[test]
    fn rejects_bad_files_with_a_message_naming_the_problem() {
        assert!(err("workloads: [").starts_with("w.yaml: "), "{}", err("workloads: ["));
        assert!(
            err(&GOOD.replace("10.244.2.10", "10.244.1.10"))
                .contains("IP 10.244.1.10 belongs to both default/a and default/c")
        );
        assert!(err(&GOOD.replace("10.244.2.10", "10.244.2.300")).contains("w.yaml"));
        assert!(err(&GOOD.replace("sa-c", "\"\"")).contains("serviceAccount is empty"));
        assert!(err(&GOOD.replace("ips: [10.244.2.10]", "ips: []")).contains("has no ips"));
        assert!(err(&GOOD.replace("sa-c", "sa/c")).contains("serviceAccount \"sa/c\" may only hold"));
        assert!(err(&GOOD.replace("10.244.2.10", "127.0.0.1")).contains("cannot be a workload address"));
        assert!(err(&GOOD.replace("name: c", "name: a")).contains("listed twice"));
        assert!(err(&GOOD.replace("node: node2", "node: node2\n    color: blue")).contains("unknown field"));
        assert!(err("- just a list").contains("w.yaml"));
    }

    #[test]
    fn v4_mapped_v6_duplicates_its_v4_form() {
        let text = GOOD.replace("[10.244.2.10]", "[\"::ffff:10.244.1.10\"]");
        assert!(err(&text).contains("belongs to both"));
    }
}
