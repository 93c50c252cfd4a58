//! The documents against the code, without root or a lab: every list in `docs/` that mirrors
//! the code (between `<!-- list: NAME -->` and `<!-- /list -->`, one table row per item, the
//! item in the row's first code span) holds exactly the code's items; every map and program
//! name the documents mention exists; every relative link points at a file (and heading).
//!
//! A failure says what to add or remove where, so whoever adds an outcome, a metric, a
//! counter, a drop reason or a flag finds the line to write.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, ensure};
use clap::CommandFactory;
use meshpath::metrics::{Metrics, PoolStats, Sources, TcpLabels};
use meshpath::record::{ConnectionRecord, DrainOutcome, Outcome};
use meshpath_common::names::{
    MAP_EVENT_STATE, MAP_EVENTS, PINNED_MAPS, PROG_SK_LOOKUP, PROG_TC_EGRESS, PROG_TC_INGRESS,
};
use meshpath_common::{Counter, DropReason};

/// The repository's root. At run time cargo names this tree's package; the path compiled in
/// is a fallback (worktrees sharing a target directory may share this binary).
fn root() -> PathBuf {
    let dir = std::env::var_os("CARGO_MANIFEST_DIR").map_or_else(|| env!("CARGO_MANIFEST_DIR").into(), PathBuf::from);
    dir.parent().expect("tests/ is in the repository").to_owned()
}

fn read(file: &str) -> Result<String> {
    let path = root().join(file);
    std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))
}

/// One checked list of a document: its rows' cells, header and separator left out.
struct DocList {
    file: &'static str,
    name: &'static str,
    rows: Vec<Vec<String>>,
}

impl DocList {
    fn load(file: &'static str, name: &'static str) -> Result<Self> {
        let text = read(file)?;
        let open = format!("<!-- list: {name} -->");
        let start = text.find(&open).with_context(|| format!("{file} has no `{open}` marker"))? + open.len();
        let len = text[start..].find("<!-- /list -->").with_context(|| format!("{file}: `{open}` is not closed"))?;
        let rows = text[start..start + len]
            .lines()
            .map(str::trim)
            .filter(|l| l.starts_with('|') && !l.starts_with("|---"))
            .skip(1)
            .map(|l| l.trim_matches('|').split('|').map(|c| c.trim().to_owned()).collect())
            .collect();
        Ok(Self { file, name, rows })
    }

    fn place(&self) -> String {
        format!("{}, list `{}` (between `<!-- list: {} -->` and `<!-- /list -->`)", self.file, self.name, self.name)
    }

    /// The first code span of each row's cell `column` ("" when it has none), by row.
    fn column(&self, column: usize) -> Vec<String> {
        self.rows.iter().map(|r| r.get(column).map(|c| code_span(c)).unwrap_or_default()).collect()
    }

    /// Compares the items (cell 0's code span) with the code's: `code` maps each item to
    /// where the code defines it; `row` is the row to add for a missing one.
    fn compare(&self, code: &BTreeMap<String, String>, row: impl Fn(&str) -> String) -> Vec<String> {
        let mut problems = Vec::new();
        let documented = self.column(0);
        let mut seen = BTreeSet::new();
        for item in &documented {
            if !seen.insert(item) {
                problems.push(format!("{}: `{item}` is listed twice: remove one row", self.place()));
            }
        }
        for (item, defined) in code {
            if !seen.contains(item) {
                problems.push(format!(
                    "{}: `{item}` ({defined}) is in the code but not documented: add the row\n    {}",
                    self.place(),
                    row(item)
                ));
            }
        }
        for item in seen.iter().filter(|i| !code.contains_key(i.as_str())) {
            problems.push(format!(
                "{}: `{item}` is documented but the code has no such item: remove its row (or add it to the code)",
                self.place()
            ));
        }
        problems
    }
}

/// The text of the first `code span` in `cell`, or "".
fn code_span(cell: &str) -> String {
    cell.split('`').nth(1).map(str::to_owned).unwrap_or_default()
}

fn report(problems: Vec<String>) -> Result<()> {
    ensure!(problems.is_empty(), "the documents disagree with the code:\n- {}", problems.join("\n- "));
    Ok(())
}

#[test]
fn outcome_codes_are_documented() -> Result<()> {
    let list = DocList::load("docs/observability.md", "outcomes")?;
    let code = Outcome::ALL.iter().map(|o| (o.code().to_owned(), format!("record::Outcome::{o:?}"))).collect();
    report(list.compare(&code, |c| format!("| `{c}` | <what it means> |")))
}

#[test]
fn drain_outcomes_are_documented() -> Result<()> {
    let list = DocList::load("docs/observability.md", "drain-outcomes")?;
    let code =
        DrainOutcome::ALL.iter().map(|o| (o.code().to_owned(), format!("record::DrainOutcome::{o:?}"))).collect();
    report(list.compare(&code, |c| format!("| `{c}` | <what it means> |")))
}

#[test]
fn readiness_conditions_are_documented() -> Result<()> {
    use meshpath::node::lifecycle::Condition;
    let list = DocList::load("docs/lifecycle.md", "readiness")?;
    let code =
        Condition::ALL.iter().map(|c| (c.code().to_owned(), format!("node::lifecycle::Condition::{c:?}"))).collect();
    report(list.compare(&code, |c| format!("| `{c}` | <met when> |")))
}

#[test]
fn datapath_counters_are_documented() -> Result<()> {
    let list = DocList::load("docs/observability.md", "counters")?;
    let code = Counter::ALL.iter().map(|c| (c.name().to_owned(), format!("meshpath_common::Counter::{c:?}"))).collect();
    report(list.compare(&code, |c| format!("| `{c}` | <what it counts> |")))
}

#[test]
fn drop_reasons_are_documented_with_their_counter() -> Result<()> {
    let list = DocList::load("docs/observability.md", "drop-reasons")?;
    let code: BTreeMap<String, String> =
        DropReason::ALL.iter().map(|r| (r.name().to_owned(), format!("meshpath_common::DropReason::{r:?}"))).collect();
    let mut problems = list.compare(&code, |r| {
        let counter = DropReason::ALL.iter().find(|d| d.name() == r).map_or("?", |d| d.counter().name());
        format!("| `{r}` | `{counter}` | <what it means> |")
    });
    for (reason, counted_in) in list.column(0).iter().zip(list.column(1)) {
        if let Some(r) = DropReason::ALL.iter().find(|r| r.name() == reason)
            && counted_in != r.counter().name()
        {
            problems.push(format!(
                "{}: `{reason}` is counted in `{}` (DropReason::counter), not `{counted_in}`: correct its second cell",
                list.place(),
                r.counter().name()
            ));
        }
    }
    report(problems)
}

/// Every figure a scrape can show, so the collector's names appear too.
struct Everything;

impl Sources for Everything {
    fn datapath_counters(&self) -> Option<Vec<(&'static str, u64)>> {
        Some(Counter::ALL.iter().map(|c| (c.name(), 0)).collect())
    }
    fn pool(&self) -> PoolStats {
        PoolStats::default()
    }
    fn connections(&self) -> (usize, usize) {
        (0, 0)
    }
    fn control_plane(&self) -> Option<meshpath::metrics::ControlPlaneStats> {
        Some(Default::default())
    }
}

/// Each metric's exposed name and type, from `# TYPE` lines: a counter's samples carry
/// `_total`.
fn metric_names(text: &str) -> BTreeMap<String, String> {
    text.lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.split_once(' '))
        .map(|(name, kind)| {
            let exposed = if kind == "counter" { format!("{name}_total") } else { name.to_owned() };
            (exposed, kind.to_owned())
        })
        .collect()
}

/// A sample in every family: a family without one is not rendered at all.
fn exercise(metrics: &Metrics) -> Result<()> {
    let record = |outcome: &str| -> Result<ConnectionRecord> {
        Ok(serde_json::from_value(serde_json::json!({
            "start_ms": 0, "duration_ms": 1, "node": "n1", "listener": "outbound",
            "src": "10.0.0.1:1000", "orig_dst": "10.0.0.2:80", "src_workload": null, "dst_workload": null,
            "src_identity": null, "dst_identity": null, "mtls": false, "upstream_src": null,
            "bytes_sent": 1, "bytes_received": 1, "outcome": outcome,
        }))?)
    };
    let ok = record("ok")?;
    let counters = metrics.open(&TcpLabels::of(&ok));
    counters.request(1);
    counters.response(1);
    counters.closed();
    metrics.finished(&record("reset")?);
    metrics.drained(DrainOutcome::Cut, 1);
    Ok(())
}

#[test]
fn metric_names_are_documented_with_their_type() -> Result<()> {
    let list = DocList::load("docs/observability.md", "metrics")?;
    let metrics = Metrics::new();
    metrics.set_sources(Everything);
    exercise(&metrics)?;
    let exposed = metric_names(&metrics.render());
    ensure!(exposed.len() > 4, "the scrape showed almost nothing: {exposed:?}");
    let code: BTreeMap<String, String> =
        exposed.iter().map(|(n, kind)| (n.clone(), format!("a {kind} of meshpath::metrics"))).collect();
    let mut problems = list.compare(&code, |n| format!("| `{n}` | {} | <what it counts> |", exposed[n]));
    for row in &list.rows {
        let (name, kind) = (code_span(&row[0]), row.get(1).map(|k| k.trim()).unwrap_or_default());
        if let Some(want) = exposed.get(&name)
            && want != kind
        {
            problems.push(format!("{}: `{name}` is a {want}, not {kind:?}: correct its second cell", list.place()));
        }
    }
    report(problems)
}

#[test]
fn node_flags_are_documented_with_their_variable_and_default() -> Result<()> {
    flags_are_documented("docs/running.md", "node-flags", &["node"])
}

#[test]
fn cni_install_flags_are_documented_with_their_variable_and_default() -> Result<()> {
    flags_are_documented("docs/cni.md", "cni-install-flags", &["cni", "install"])
}

/// Defaults computed at run time (the host name, the binary's directory) are described, not
/// quoted.
const DESCRIBED_DEFAULTS: [&str; 2] = ["--node", "--plugin"];

/// The list `name` in `file` has one row per flag of `meshpath <command>`, with its variable
/// and default.
fn flags_are_documented(file: &'static str, name: &'static str, command: &[&str]) -> Result<()> {
    let list = DocList::load(file, name)?;
    let mut cli = meshpath::cli::Cli::command();
    // Propagates the global flags (--log-format) to the subcommands.
    cli.build();
    let mut sub = &cli;
    for c in command {
        sub = sub.find_subcommand(c).with_context(|| format!("meshpath has no `{}` subcommand", command.join(" ")))?;
    }
    let command = command.join(" ");
    let mut code = BTreeMap::new();
    let mut facts = BTreeMap::new();
    for arg in sub.get_arguments().filter(|a| !matches!(a.get_id().as_str(), "help" | "version")) {
        let Some(long) = arg.get_long() else { continue };
        let flag = format!("--{long}");
        let env = arg.get_env().map(|e| e.to_string_lossy().into_owned());
        let default: Vec<String> = arg.get_default_values().iter().map(|v| v.to_string_lossy().into_owned()).collect();
        code.insert(flag.clone(), format!("meshpath::cli, `meshpath {command} {flag}`"));
        facts.insert(flag, (env, default.join(",")));
    }
    let mut problems = list.compare(&code, |f| {
        let (env, default) = &facts[f];
        let default = if default.is_empty() { "–".to_owned() } else { format!("`{default}`") };
        format!("| `{f}` | `{}` | {default} | <what it does> |", env.as_deref().unwrap_or("<none: give it one>"))
    });
    for row in &list.rows {
        let flag = code_span(&row[0]);
        let Some((env, default)) = facts.get(&flag) else { continue };
        let documented_env = code_span(row.get(1).map_or("", String::as_str));
        match env {
            None => problems
                .push(format!("meshpath::cli: `meshpath {command} {flag}` has no environment variable: give it one")),
            Some(env) if *env != documented_env => problems.push(format!(
                "{}: `{flag}` reads `{env}`, not `{documented_env}`: correct its second cell",
                list.place()
            )),
            Some(_) => {}
        }
        let cell = row.get(2).map_or("", String::as_str);
        let documented_default = code_span(cell);
        let described = documented_default.is_empty() && cell != "–" && DESCRIBED_DEFAULTS.contains(&flag.as_str());
        let agrees = if default.is_empty() { cell == "–" } else { documented_default == *default || described };
        if !agrees {
            let want = if default.is_empty() { "–".to_owned() } else { format!("`{default}`") };
            problems.push(format!("{}: `{flag}` defaults to {want}, the third cell says {cell:?}", list.place()));
        }
    }
    report(problems)
}

/// The documents a newcomer reads: README, deploy/README.md, BENCHMARKS.md and docs/.
fn documents() -> Result<Vec<PathBuf>> {
    let root = root();
    let mut files: Vec<PathBuf> =
        ["README.md", "deploy/README.md", "BENCHMARKS.md"].iter().map(|f| root.join(f)).collect();
    for entry in std::fs::read_dir(root.join("docs")).context("reading docs/")? {
        let path = entry?.path();
        if path.extension().is_some_and(|e| e == "md") {
            files.push(path);
        }
    }
    files.sort();
    Ok(files)
}

/// Words of `text` that start with `prefix` (at a word boundary) and go on with
/// `continues` characters.
fn words_with_prefix(text: &str, prefix: &str, continues: fn(char) -> bool) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for (at, _) in text.match_indices(prefix) {
        let before = text[..at].chars().next_back();
        if before.is_some_and(|c| c.is_alphanumeric() || c == '_') {
            continue;
        }
        let word: String = text[at..].chars().take_while(|c| continues(*c)).collect();
        out.insert(word.trim_end_matches('_').to_owned());
    }
    out
}

#[test]
fn every_map_and_program_the_documents_name_exists() -> Result<()> {
    let maps: BTreeSet<&str> = PINNED_MAPS.iter().copied().chain([MAP_EVENTS, MAP_EVENT_STATE]).collect();
    let programs: BTreeSet<&str> = [PROG_TC_INGRESS, PROG_TC_EGRESS, PROG_SK_LOOKUP].into();
    let mut problems = Vec::new();
    for file in documents()? {
        let text = std::fs::read_to_string(&file)?;
        let shown = file.strip_prefix(root()).unwrap_or(&file).display().to_string();
        let upper = |c: char| c.is_ascii_uppercase() || c.is_ascii_digit() || c == '_';
        for name in words_with_prefix(&text, "MP_", upper).into_iter().filter(|n| !maps.contains(n.as_str())) {
            problems.push(format!("{shown} names map {name}, which meshpath does not have (maps: {maps:?})"));
        }
        let lower = |c: char| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_';
        for name in words_with_prefix(&text, "mp_", lower).into_iter().filter(|n| !programs.contains(n.as_str())) {
            problems
                .push(format!("{shown} names program {name}, which meshpath does not have (programs: {programs:?})"));
        }
    }
    report(problems)
}

/// GitHub's anchor for a heading: lower case, spaces to dashes, punctuation dropped.
fn anchor(heading: &str) -> String {
    heading
        .trim()
        .to_lowercase()
        .chars()
        .filter_map(|c| match c {
            ' ' => Some('-'),
            c if c.is_alphanumeric() || c == '-' || c == '_' => Some(c),
            _ => None,
        })
        .collect()
}

fn anchors(text: &str) -> BTreeSet<String> {
    text.lines().filter_map(|l| l.strip_prefix('#')).map(|h| anchor(h.trim_start_matches('#'))).collect()
}

/// Relative link targets (`](target)`) of a markdown text.
fn links(text: &str) -> Vec<String> {
    text.match_indices("](")
        .filter_map(|(at, _)| text[at + 2..].split_once(')').map(|(t, _)| t.to_owned()))
        .filter(|t| !t.starts_with("http://") && !t.starts_with("https://"))
        .collect()
}

#[test]
fn every_relative_link_points_at_a_file_and_heading() -> Result<()> {
    let mut problems = Vec::new();
    let readme = read("README.md")?;
    for file in documents()? {
        let text = std::fs::read_to_string(&file)?;
        let shown = file.strip_prefix(root()).unwrap_or(&file).display().to_string();
        for link in links(&text) {
            let (path, fragment) = link.split_once('#').unwrap_or((&link, ""));
            let target =
                if path.is_empty() { file.clone() } else { file.parent().unwrap_or(Path::new(".")).join(path) };
            let Ok(target_text) = std::fs::read_to_string(&target) else {
                problems.push(format!("{shown} links to {link}, and {} does not exist", target.display()));
                continue;
            };
            if !fragment.is_empty() && !anchors(&target_text).contains(fragment) {
                problems.push(format!("{shown} links to {link}: no heading there makes the anchor #{fragment}"));
            }
        }
        let in_docs = file.parent().is_some_and(|d| d.ends_with("docs"));
        let name = file.file_name().unwrap_or_default().to_string_lossy().into_owned();
        if in_docs && !readme.contains(&format!("](docs/{name})")) {
            problems.push(format!("README.md does not link to docs/{name}: add it to its Documentation table"));
        }
    }
    report(problems)
}
