//! What the CNI plugin adds to a pod's start (`cargo xtask bench --cni`): the time of
//! `meshpath-cni` ADD, run as a runtime runs it, for new pods of the mesh (the daemon enrols
//! each before the ADD returns) and, beside them, for new pods outside the mesh (the plugin
//! alone: process start, configuration, decision, no daemon). Each pod is wired by the lab
//! (the pod network's part) just before its ADD, with the daemons already serving.

use std::fmt::Write as _;
use std::path::Path;

use serde::Serialize;

use crate::lab::{Lab, LabError, Result, Topology};

pub const SECTION_START: &str = "<!-- cni: written by `cargo xtask bench --cni` -->";
pub const SECTION_END: &str = "<!-- /cni -->";

/// Host numbers of the new pods in their node's /24: clear of the lab's own pods.
const FIRST_HOST: usize = 30;
const LAST_HOST: usize = 250;

#[derive(Clone, Debug)]
pub struct CniConfig {
    /// New pods of each kind (in the mesh on node 1, outside it on node 2).
    pub pods: usize,
}

impl Default for CniConfig {
    fn default() -> Self {
        Self { pods: 200 }
    }
}

/// ADD times, in milliseconds, in the order the pods were started.
#[derive(Clone, Debug, Serialize)]
pub struct CniReport {
    pub mesh_ms: Vec<f64>,
    pub outside_ms: Vec<f64>,
}

/// Starts `cfg.pods` pods of each kind, one after the other, timing each ADD.
pub fn run(bin: &Path, cfg: &CniConfig, progress: impl Fn(&str)) -> Result<CniReport> {
    if cfg.pods == 0 || cfg.pods > LAST_HOST - FIRST_HOST {
        return Err(LabError::Other(format!("--cni-pods must be 1 to {}", LAST_HOST - FIRST_HOST)));
    }
    let mut lab = Lab::build_with(bin, Topology::Routed)?;
    // Named once and kept for the lab's life: the lab names pods with static strings.
    let names: Vec<&'static str> = (0..cfg.pods).map(|i| &*Box::leak(format!("m{i}").into_boxed_str())).collect();
    let outside: Vec<&'static str> = (0..cfg.pods).map(|i| &*Box::leak(format!("o{i}").into_boxed_str())).collect();
    // The mesh's new pods are listed before their sandboxes exist, as the API server has a
    // pod before kubelet makes its sandbox.
    let mut yaml = lab.workloads_yaml(&lab.pods.iter().filter(|p| p.enrolled).map(|p| p.name).collect::<Vec<_>>());
    for (i, name) in names.iter().enumerate() {
        let host = FIRST_HOST + i;
        let _ = write!(
            yaml,
            "  - name: pod-{name}\n    namespace: lab\n    serviceAccount: sa-{name}\n    node: {}\n    ips: [10.244.1.{host}, \"fd00:244:1::{host}\"]\n",
            lab.nodes[0].name
        );
    }
    lab.write_workloads_text(&yaml)?;
    progress("starting both daemons");
    lab.start_daemons()?;
    let mut report = CniReport { mesh_ms: Vec::new(), outside_ms: Vec::new() };
    for (kind, node, list) in [("of the mesh", 0, &names), ("outside the mesh", 1, &outside)] {
        progress(&format!("{} new pods {kind}, one after the other", list.len()));
        for (i, name) in list.iter().enumerate() {
            lab.add_pod(name, node, node == 0, (FIRST_HOST + i) as u8)?;
            let run = lab.cni(name, "ADD")?;
            if !run.ok {
                return Err(LabError::Other(format!("ADD of {name} failed: {}", run.msg())));
            }
            let ms = run.took.as_secs_f64() * 1000.0;
            if node == 0 { report.mesh_ms.push(ms) } else { report.outside_ms.push(ms) }
        }
    }
    Ok(report)
}

/// The value below which `q` of `values` lie (nearest rank).
pub fn quantile(values: &[f64], q: f64) -> f64 {
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    let rank = ((q * v.len() as f64).ceil() as usize).clamp(1, v.len().max(1));
    v.get(rank - 1).copied().unwrap_or(0.0)
}

/// The CNI section of BENCHMARKS.md.
pub fn markdown(report: &CniReport, machine: &str, date: &str) -> String {
    let mut s = format!("{SECTION_START}\n## CNI plugin: what it adds to a pod's start ({date})\n\n");
    let _ = writeln!(
        s,
        "Written by `cargo xtask bench --cni`. The time of `meshpath-cni` ADD, run as a container runtime runs it \
         (its own process, `CNI_*` environment, configuration and `prevResult` on stdin), for new pods started one \
         after the other with both daemons serving, deciding from the workload file. For a pod of the mesh the ADD \
         returns once the daemon has attached to its new veth and has both its addresses in the map; for a pod \
         outside the mesh the plugin answers alone. Machine: {machine}.\n"
    );
    let _ = writeln!(s, "| new pods | ADD p50 | p99 | max |\n|---|---|---|---|");
    for (what, v) in [("of the mesh (waits for the daemon)", &report.mesh_ms), ("outside the mesh", &report.outside_ms)]
    {
        let max = v.iter().copied().fold(0.0, f64::max);
        let _ = writeln!(
            s,
            "| {} {what} | {:.1} ms | {:.1} ms | {max:.1} ms |",
            v.len(),
            quantile(v, 0.5),
            quantile(v, 0.99)
        );
    }
    let wait = quantile(&report.mesh_ms, 0.5) - quantile(&report.outside_ms, 0.5);
    let _ = writeln!(
        s,
        "\nThe median wait for the daemon, the difference of the medians: {wait:.1} ms. Nothing in the pod runs \
         before the ADD returns; this is added to each pod's start.\n\n{SECTION_END}"
    );
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantiles_are_nearest_rank() {
        let v: Vec<f64> = (1..=200).map(f64::from).collect();
        assert_eq!(quantile(&v, 0.5), 100.0);
        assert_eq!(quantile(&v, 0.99), 198.0);
        assert_eq!(quantile(&[3.0], 0.99), 3.0);
        assert_eq!(quantile(&[], 0.5), 0.0);
    }
}
