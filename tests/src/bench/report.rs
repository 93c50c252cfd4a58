//! Turns the samples into BENCHMARKS.md: medians with min–max, ratios to direct and to
//! legacy, the scale table, the targets, and an SVG chart.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use super::{PathKind, Sample};

/// The figures, in table order: name, unit, whether higher is better, accessor.
type Getter = fn(&Sample) -> Option<f64>;
pub const METRICS: [(&str, &str, bool, Getter); 10] = [
    ("new connections/s", "conn/s", true, |s| Some(s.conn_per_s)),
    ("requests/s (persistent)", "req/s", true, |s| Some(s.req_per_s)),
    ("p50 latency", "µs", false, |s| Some(f64::from(s.p50_us))),
    ("p99 latency", "µs", false, |s| Some(f64::from(s.p99_us))),
    ("1-stream throughput", "Gbit/s", true, |s| Some(s.gbit_1)),
    ("8-stream throughput", "Gbit/s", true, |s| Some(s.gbit_8)),
    ("CPU per connection (machine)", "µs", false, |s| s.cpu_us_per_conn),
    ("proxy RSS", "MiB", false, |s| s.rss_kib.map(|k| k as f64 / 1024.0)),
    ("proxy CPU per 1000 connections", "ms", false, |s| s.proxy_cpu_ms_per_1000_conn),
    ("proxy CPU per GB", "ms", false, |s| s.proxy_cpu_ms_per_gb),
];

/// Median, min and max of one metric over the rounds.
#[derive(Clone, Copy, Debug)]
pub struct Stat {
    pub median: f64,
    pub min: f64,
    pub max: f64,
}

pub fn stat(values: &mut [f64]) -> Option<Stat> {
    if values.is_empty() {
        return None;
    }
    values.sort_by(|a, b| a.total_cmp(b));
    let n = values.len();
    let median = if n % 2 == 1 { values[n / 2] } else { (values[n / 2 - 1] + values[n / 2]) / 2.0 };
    Some(Stat { median, min: values[0], max: values[n - 1] })
}

/// (path, workloads) → one `Stat` per metric.
pub fn aggregate(samples: &[Sample]) -> BTreeMap<(PathKind, usize), Vec<Option<Stat>>> {
    let mut groups: BTreeMap<(PathKind, usize), Vec<&Sample>> = BTreeMap::new();
    for s in samples {
        groups.entry((s.path, s.workloads)).or_default().push(s);
    }
    groups
        .into_iter()
        .map(|(k, ss)| {
            let stats = METRICS
                .iter()
                .map(|(_, _, _, get)| stat(&mut ss.iter().filter_map(|s| get(s)).collect::<Vec<_>>()))
                .collect();
            (k, stats)
        })
        .collect()
}

fn fmt(v: f64) -> String {
    if v >= 1000.0 {
        format!("{v:.0}")
    } else if v >= 10.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.2}")
    }
}

/// Ratio of the medians, `a / b` (for latency, CPU and memory, < 1 means `a` does better).
fn ratio(a: Option<Stat>, b: Option<Stat>) -> Option<f64> {
    let (a, b) = (a?.median, b?.median);
    if a == 0.0 || b == 0.0 { None } else { Some(a / b) }
}

/// A target line: name, the measured ratio, the target, whether it is met.
pub struct Target {
    pub what: &'static str,
    pub measured: Option<f64>,
    pub want: &'static str,
    pub met: bool,
}

pub fn targets(agg: &BTreeMap<(PathKind, usize), Vec<Option<Stat>>>, base: usize, largest: usize) -> Vec<Target> {
    let get = |p: PathKind, w: usize, m: usize| agg.get(&(p, w)).and_then(|v| v[m]);
    let r = |a: PathKind, b: PathKind, m: usize| ratio(get(a, base, m), get(b, base, m));
    let t = |what, measured: Option<f64>, want, ok: fn(f64) -> bool| Target {
        what,
        measured,
        want,
        met: measured.is_some_and(ok),
    };
    let mesh = PathKind::Meshpath;
    // With one size there is no scale figure.
    let scale = |m: usize| if largest == base { None } else { ratio(get(mesh, largest, m), get(mesh, base, m)) };
    vec![
        t("new connections/s, meshpath / legacy", r(mesh, PathKind::Legacy, 0), ">= 1.5", |v| v >= 1.5),
        t("new connections/s, meshpath / tproxy", r(mesh, PathKind::Tproxy, 0), ">= 1.05", |v| v >= 1.05),
        t("persistent requests/s, meshpath / legacy", r(mesh, PathKind::Legacy, 1), ">= 1.7", |v| v >= 1.7),
        t("p50 latency, meshpath / legacy", r(mesh, PathKind::Legacy, 2), "<= 0.6", |v| v <= 0.6),
        t("p99 latency, meshpath / legacy", r(mesh, PathKind::Legacy, 3), "<= 0.6", |v| v <= 0.6),
        t("new connections/s at the largest size / at the smallest (meshpath)", scale(0), ">= 0.95", |v| v >= 0.95),
        t("requests/s at the largest size / at the smallest (meshpath)", scale(1), ">= 0.95", |v| v >= 0.95),
        t("persistent requests/s, meshpath / direct", r(mesh, PathKind::Direct, 1), ">= 0.7", |v| v >= 0.7),
        t(
            "1-stream throughput, meshpath-hbone / direct",
            r(PathKind::MeshpathHbone, PathKind::Direct, 4),
            ">= 0.5",
            |v| v >= 0.5,
        ),
        t(
            "new connections/s, meshpath-hbone / ztunnel-hbone",
            r(PathKind::MeshpathHbone, PathKind::ZtunnelHbone, 0),
            ">= 1.3",
            |v| v >= 1.3,
        ),
        t(
            "1-stream throughput, meshpath-hbone / ztunnel-hbone",
            r(PathKind::MeshpathHbone, PathKind::ZtunnelHbone, 4),
            ">= 1.2",
            |v| v >= 1.2,
        ),
    ]
}

/// Spread (max − min over median) under which the HBONE rows against ztunnel are trusted.
pub const PEER_SPREAD: f64 = 0.10;

/// The figures compared with ztunnel (indexes into [`METRICS`]).
const PEER_METRICS: [usize; 7] = [0, 1, 2, 3, 4, 5, 9];

/// One figure's meshpath-hbone / ztunnel-hbone ratios, one per round both ran.
pub struct PeerRatios {
    pub metric: usize,
    pub per_round: Vec<f64>,
}

impl PeerRatios {
    /// (max − min) / median of the ratios; `None` with fewer than two rounds.
    pub fn spread(&self) -> Option<f64> {
        if self.per_round.len() < 2 {
            return None;
        }
        let s = stat(&mut self.per_round.clone())?;
        (s.median > 0.0).then(|| (s.max - s.min) / s.median)
    }
}

/// The per-round ratios of meshpath-hbone to ztunnel-hbone at `workloads`.
pub fn peer_ratios(samples: &[Sample], workloads: usize) -> Vec<PeerRatios> {
    let of = |p: PathKind| -> BTreeMap<usize, &Sample> {
        samples.iter().filter(|s| s.path == p && s.workloads == workloads).map(|s| (s.round, s)).collect()
    };
    let (mesh, peer) = (of(PathKind::MeshpathHbone), of(PathKind::ZtunnelHbone));
    PEER_METRICS
        .iter()
        .map(|&metric| {
            let get = METRICS[metric].3;
            let per_round = mesh
                .iter()
                .filter_map(|(round, m)| Some((get(m)?, get(peer.get(round)?)?)))
                .filter(|(_, z)| *z > 0.0)
                .map(|(m, z)| m / z)
                .collect();
            PeerRatios { metric, per_round }
        })
        .collect()
}

/// The HBONE rows against ztunnel with their spread; empty without ztunnel samples.
pub fn peer_section(samples: &[Sample], workloads: usize) -> String {
    let rows = peer_ratios(samples, workloads);
    let rounds = rows.iter().map(|r| r.per_round.len()).max().unwrap_or(0);
    if rounds == 0 {
        return String::new();
    }
    let mut s = format!(
        "\n### meshpath-hbone / ztunnel-hbone, round by round ({rounds} rounds at {workloads} workloads)\n\n\
         Each round's ratio of the two paths measured side by side; rounds repeat (up to {MAX}) until every figure's \
         spread, (max − min) / median, is under {limit:.0} %. Latency and CPU: < 1 is better.\n\n\
         | figure | median | [min–max] | spread | under {limit:.0} % |\n|---|---|---|---|---|\n",
        MAX = super::MAX_PEER_ROUNDS,
        limit = PEER_SPREAD * 100.0,
    );
    for r in &rows {
        let Some(st) = stat(&mut r.per_round.clone()) else { continue };
        let (spread, ok) = match r.spread() {
            Some(v) => (format!("{:.0} %", v * 100.0), if v < PEER_SPREAD { "yes" } else { "**no**" }),
            None => ("–".into(), "one round only"),
        };
        let _ = writeln!(
            s,
            "| {} | {:.2} | [{:.2}–{:.2}] | {spread} | {ok} |",
            METRICS[r.metric].0, st.median, st.min, st.max
        );
    }
    s
}

/// The load average at the end of the rounds: median [min–max] over every sample.
pub fn load_summary(samples: &[Sample]) -> String {
    match stat(&mut samples.iter().filter_map(|s| s.load_1m).collect::<Vec<_>>()) {
        Some(st) => format!("{:.2} [{:.2}–{:.2}]", st.median, st.min, st.max),
        None => "not read".into(),
    }
}

/// A markdown table's header: a `path` column, then `columns`.
fn table_header(s: &mut String, columns: impl ExactSizeIterator<Item = String>) {
    let n = columns.len();
    s.push_str("| path |");
    for c in columns {
        let _ = write!(s, " {c} |");
    }
    let _ = writeln!(s, "\n|---|{}", "---|".repeat(n));
}

/// The markdown body: per-size tables of medians [min–max], ratios, targets.
pub fn markdown(samples: &[Sample], sizes: &[usize], rounds: usize) -> String {
    let agg = aggregate(samples);
    let base = sizes[0];
    let largest = *sizes.last().expect("at least one size");
    let mut s = String::new();
    for &w in sizes {
        let _ = writeln!(s, "### Figures at {w} enrolled workloads (median of {rounds} rounds, [min–max])\n");
        table_header(&mut s, METRICS.iter().map(|(name, unit, _, _)| format!("{name} ({unit})")));
        for p in PathKind::available() {
            let Some(stats) = agg.get(&(p, w)) else { continue };
            let _ = write!(s, "| {} |", p.name());
            for st in stats {
                match st {
                    Some(st) => {
                        let _ = write!(s, " {} [{}–{}] |", fmt(st.median), fmt(st.min), fmt(st.max));
                    }
                    None => {
                        let _ = write!(s, " – |");
                    }
                }
            }
            s.push('\n');
        }
        s.push('\n');
    }
    for (against, label) in [(PathKind::Direct, "direct"), (PathKind::Legacy, "legacy")] {
        let _ = writeln!(
            s,
            "### Ratios to {label} at {base} workloads (median / median; latency, CPU and memory as lower-is-better: < 1 is better)\n"
        );
        table_header(&mut s, METRICS.iter().map(|(name, _, _, _)| name.to_string()));
        for p in PathKind::available() {
            let (Some(a), Some(b)) = (agg.get(&(p, base)), agg.get(&(against, base))) else { continue };
            let _ = write!(s, "| {} |", p.name());
            for m in 0..METRICS.len() {
                let _ = write!(s, " {} |", ratio(a[m], b[m]).map(|r| format!("{r:.2}")).unwrap_or_else(|| "–".into()));
            }
            s.push('\n');
        }
        s.push('\n');
    }
    if sizes.len() > 1 {
        let _ = writeln!(s, "### Scale: figures at {largest} workloads / at {base}\n");
        let _ = writeln!(s, "| path | new connections/s | requests/s | p50 | p99 |\n|---|---|---|---|---|");
        for p in PathKind::available().into_iter().filter(|p| p.scales()) {
            let (Some(a), Some(b)) = (agg.get(&(p, largest)), agg.get(&(p, base))) else { continue };
            let cell = |m: usize| ratio(a[m], b[m]).map(|r| format!("{r:.3}")).unwrap_or_else(|| "–".into());
            let _ = writeln!(s, "| {} | {} | {} | {} | {} |", p.name(), cell(0), cell(1), cell(2), cell(3));
        }
        s.push('\n');
    }
    let _ = writeln!(s, "### Targets\n\n| target | measured | wanted | |\n|---|---|---|---|");
    for t in targets(&agg, base, largest) {
        let _ = writeln!(
            s,
            "| {} | {} | {} | {} |",
            t.what,
            t.measured.map(|v| format!("{v:.2}")).unwrap_or_else(|| "–".into()),
            t.want,
            match (t.measured, t.met) {
                (None, _) => "not measured",
                (Some(_), true) => "met",
                (Some(_), false) => "**missed**",
            }
        );
    }
    s
}

/// A grouped bar chart of the medians at the base size relative to direct, for the main
/// figures: one group per metric, one bar per path.
pub fn svg_chart(samples: &[Sample], base: usize) -> String {
    let agg = aggregate(samples);
    let metrics = [0usize, 1, 2, 4, 5];
    let paths: Vec<PathKind> = PathKind::available().into_iter().filter(|p| agg.contains_key(&(*p, base))).collect();
    let colors = ["#7f7f7f", "#d62728", "#ff7f0e", "#1f77b4", "#2ca02c", "#9467bd", "#8c564b"];
    let (w, h, left, top, bottom) = (900.0, 420.0, 60.0, 40.0, 80.0);
    let plot_h = h - top - bottom;
    let group_w = (w - left - 20.0) / metrics.len() as f64;
    let bar_w = group_w * 0.8 / paths.len().max(1) as f64;
    let ratio_of = |p: PathKind, m: usize| {
        ratio(agg.get(&(p, base)).and_then(|v| v[m]), agg.get(&(PathKind::Direct, base)).and_then(|v| v[m]))
    };
    let max =
        metrics.iter().flat_map(|&m| paths.iter().filter_map(move |&p| ratio_of(p, m))).fold(1.0f64, f64::max).max(1.2);
    let y = |v: f64| top + plot_h * (1.0 - v / max);
    let mut s = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{w}\" height=\"{h}\" font-family=\"sans-serif\" font-size=\"12\">\n\
         <rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n\
         <text x=\"{left}\" y=\"20\" font-size=\"14\">meshpath bench: median relative to direct at {base} workloads (latency: lower is better)</text>\n"
    );
    // Axis and the 1.0 line (direct).
    let _ = writeln!(s, "<line x1=\"{left}\" y1=\"{top}\" x2=\"{left}\" y2=\"{}\" stroke=\"black\"/>", top + plot_h);
    let _ = writeln!(
        s,
        "<line x1=\"{left}\" y1=\"{0}\" x2=\"{1}\" y2=\"{0}\" stroke=\"#444\" stroke-dasharray=\"4 3\"/>",
        y(1.0),
        w - 20.0
    );
    for tick in [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0].into_iter().filter(|t| *t <= max) {
        let _ = writeln!(s, "<text x=\"{}\" y=\"{}\" text-anchor=\"end\">{tick:.1}</text>", left - 6.0, y(tick) + 4.0);
    }
    for (gi, &m) in metrics.iter().enumerate() {
        let gx = left + 10.0 + gi as f64 * group_w;
        for (pi, &p) in paths.iter().enumerate() {
            let Some(r) = ratio_of(p, m) else { continue };
            let x = gx + pi as f64 * bar_w;
            let _ = writeln!(
                s,
                "<rect x=\"{x:.1}\" y=\"{:.1}\" width=\"{:.1}\" height=\"{:.1}\" fill=\"{}\"><title>{} {}: {r:.2}</title></rect>",
                y(r),
                bar_w * 0.9,
                (y(0.0) - y(r)).max(0.0),
                colors[pi % colors.len()],
                p.name(),
                METRICS[m].0
            );
        }
        let _ = writeln!(
            s,
            "<text x=\"{:.1}\" y=\"{}\" text-anchor=\"middle\">{}</text>",
            gx + group_w * 0.4,
            top + plot_h + 18.0,
            METRICS[m].0
        );
    }
    for (pi, p) in paths.iter().enumerate() {
        let x = left + pi as f64 * 135.0;
        let _ = writeln!(
            s,
            "<rect x=\"{x}\" y=\"{}\" width=\"12\" height=\"12\" fill=\"{}\"/>",
            h - 30.0,
            colors[pi % colors.len()]
        );
        let _ = writeln!(s, "<text x=\"{}\" y=\"{}\">{}</text>", x + 16.0, h - 20.0, p.name());
    }
    s.push_str("</svg>\n");
    s
}

/// `doc` with the section between `marks` (start, end) replaced by `section`, or, if it has
/// none, `section` put before the analysis marker (at the end without one).
pub fn with_section(doc: &str, marks: (&str, &str), section: &str, analysis_marker: &str) -> String {
    let (start, end) = marks;
    if let (Some(a), Some(b)) = (doc.find(start), doc.find(end))
        && a < b
    {
        return format!("{}{}{}", &doc[..a], section.trim_end(), &doc[b + end.len()..]);
    }
    match doc.find(analysis_marker) {
        Some(i) => format!("{}{}\n\n{}", &doc[..i], section.trim_end(), &doc[i..]),
        None => format!("{doc}\n{section}"),
    }
}

/// The section between `marks` of an existing document, to carry over when the rest is
/// rewritten.
pub fn section_of<'a>(doc: &'a str, marks: (&str, &str)) -> Option<&'a str> {
    let (start, end) = marks;
    let (a, b) = (doc.find(start)?, doc.find(end)?);
    (a < b).then(|| &doc[a..b + end.len()])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(path: PathKind, workloads: usize, round: usize, conn: f64) -> Sample {
        Sample {
            path,
            workloads,
            round,
            conn_per_s: conn,
            req_per_s: conn * 2.0,
            p50_us: 100,
            p99_us: 200,
            gbit_1: 1.0,
            gbit_8: 2.0,
            cpu_us_per_conn: None,
            rss_kib: Some(2048),
            proxy_cpu_ms_per_1000_conn: None,
            proxy_cpu_ms_per_gb: None,
            load_1m: Some(1.5),
        }
    }

    #[test]
    fn medians_ratios_and_targets() {
        assert_eq!(stat(&mut [3.0, 1.0, 2.0]).map(|s| (s.median, s.min, s.max)), Some((2.0, 1.0, 3.0)));
        assert_eq!(stat(&mut [4.0, 1.0, 2.0, 3.0]).map(|s| s.median), Some(2.5));
        let mut samples = Vec::new();
        for r in 0..3 {
            samples.push(sample(PathKind::Legacy, 10, r, 1000.0 + r as f64));
            samples.push(sample(PathKind::Meshpath, 10, r, 2000.0 + r as f64));
            samples.push(sample(PathKind::Direct, 10, r, 4000.0));
        }
        let md = markdown(&samples, &[10], 3);
        assert!(md.contains("| meshpath | 2001 [2000–2002] |"), "{md}");
        let agg = aggregate(&samples);
        let t = targets(&agg, 10, 10);
        assert!(t[0].met && (t[0].measured.unwrap() - 2001.0 / 1001.0).abs() < 1e-9);
        assert!(!t[3].met, "equal latencies do not meet <= 0.6");
        assert!(svg_chart(&samples, 10).starts_with("<svg"));
        assert_eq!(load_summary(&samples), "1.50 [1.50–1.50]");
        assert_eq!(peer_section(&samples, 10), "", "no ztunnel rows without ztunnel samples");
    }

    #[test]
    fn peer_rows_are_per_round_ratios_with_their_spread() {
        let mut samples = Vec::new();
        // Ratios 1.0, 1.2, 1.1 for connections: spread (1.2 - 1.0) / 1.1 = 18 %.
        for (r, conn) in [1000.0, 1200.0, 1100.0].into_iter().enumerate() {
            samples.push(sample(PathKind::MeshpathHbone, 10, r, conn));
            samples.push(sample(PathKind::ZtunnelHbone, 10, r, 1000.0));
        }
        let rows = peer_ratios(&samples, 10);
        let conn = rows.iter().find(|r| r.metric == 0).expect("connections compared");
        assert_eq!(conn.per_round, [1.0, 1.2, 1.1]);
        assert!((conn.spread().expect("three rounds") - 0.2 / 1.1).abs() < 1e-9);
        let latency = rows.iter().find(|r| r.metric == 2).expect("p50 compared");
        assert_eq!(latency.spread(), Some(0.0));
        let md = peer_section(&samples, 10);
        assert!(md.contains("| new connections/s | 1.10 | [1.00–1.20] | 18 % | **no** |"), "{md}");
        assert!(md.contains("| p50 latency | 1.00 | [1.00–1.00] | 0 % | yes |"), "{md}");
        // A round only one path ran is no ratio.
        samples.push(sample(PathKind::MeshpathHbone, 10, 3, 5000.0));
        assert_eq!(peer_ratios(&samples, 10)[0].per_round.len(), 3);
    }
}
