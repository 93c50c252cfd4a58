//! `meshpath map` against the real `bpftool map` (Debian's 7.1.0 must be installed), in a
//! lab of its own (root needed): for every map meshpath pins, `dump` and `show` by pin, id
//! and name, in plain, -j and -p output, must print the same bytes and exit the same way,
//! with the workload map empty, holding one workload and holding several. Bad arguments
//! and absent maps fail as bpftool fails. `--decode` names what the maps hold.

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};
use meshpath_common::interface::IF_WORKLOAD;
use meshpath_common::names::{MAP_COUNTERS, MAP_INTERFACES, MAP_LISTENERS, MAP_WORKLOADS, PIN_DIR, PINNED_MAPS};
use meshpath_lab::{Lab, Topology};

mod support;
use support::{RELEASE, started_lab, wait_until};

/// Output modes: plain, JSON, pretty JSON.
const MODES: [&[&str]; 3] = [&[], &["-j"], &["-p"]];

#[derive(Debug, PartialEq, Eq)]
struct Run {
    stdout: String,
    stderr: String,
    code: Option<i32>,
}

fn run(cmd: &mut Command) -> Result<Run> {
    let out = cmd.output().with_context(|| format!("running {cmd:?}"))?;
    Ok(Run {
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        code: out.status.code(),
    })
}

fn bpftool_path() -> PathBuf {
    ["/usr/sbin/bpftool", "/usr/bin/bpftool", "/sbin/bpftool"]
        .iter()
        .map(PathBuf::from)
        .find(|p| p.exists())
        .unwrap_or_else(|| PathBuf::from("bpftool"))
}

/// `bpftool [mode] map ARGS` (options before the object, as bpftool documents them).
fn bpftool(mode: &[&str], args: &[&str]) -> Result<Run> {
    run(Command::new(bpftool_path()).args(mode).arg("map").args(args))
}

/// `meshpath map [mode] ARGS`.
fn meshpath(mode: &[&str], args: &[&str]) -> Result<Run> {
    run(Command::new(support::meshpath()).arg("map").args(mode).args(args))
}

/// Tries for output that other tests' labs change while this runs (the kernel's list of
/// maps, every lab's maps of one name): one identical pair out of these is required.
const CHURN: usize = 30;

/// Both tools on the same maps: stdout byte for byte and the exit status, in `tries`
/// attempts (1 for this lab's own maps, which hold still between the two runs).
fn same(mode: &[&str], args: &[&str], tries: usize) -> Result<Run> {
    let mut last = None;
    for _ in 0..tries {
        let b = bpftool(mode, args)?;
        let m = meshpath(mode, args)?;
        if b.stdout == m.stdout && b.code == m.code {
            return Ok(m);
        }
        last = Some((b, m));
        std::thread::sleep(Duration::from_millis(200));
    }
    let (b, m) = last.context("no tries")?;
    bail!(
        "meshpath map {mode:?} {args:?} differs from bpftool (exit {:?} vs {:?}):\n--- bpftool\n{}--- meshpath\n{}--- meshpath stderr\n{}",
        b.code,
        m.code,
        b.stdout,
        m.stdout,
        m.stderr
    )
}

fn map_id(path: &Path) -> Result<u32> {
    let out = bpftool(&["-j"], &["show", "pinned", path.to_str().context("path")?])?;
    let v: serde_json::Value =
        serde_json::from_str(&out.stdout).with_context(|| format!("bpftool show: {}", out.stdout))?;
    Ok(v["id"].as_u64().context("no id")? as u32)
}

/// Enrols `pods` on node 1 and waits until the workload map and the interfaces' workload
/// flags show exactly them.
fn enrol(lab: &Lab, pods: &[&str]) -> Result<()> {
    let mut all = vec!["c"];
    all.extend_from_slice(pods);
    lab.write_workloads(&all)?;
    let want: Vec<IpAddr> = pods.iter().flat_map(|p| [lab.pod(p).v4, lab.pod(p).v6]).collect();
    wait_until(&format!("node 1's maps to hold {pods:?}"), RELEASE, || {
        let map = lab.workload_map(0)?;
        Ok(map.len() == want.len()
            && want.iter().all(|ip| map.contains_key(ip))
            && lab.interface_map(0)?.values().filter(|v| v.flags & IF_WORKLOAD != 0).count() == pods.len())
    })
}

fn compare_every_pinned_map(dir: &Path) -> Result<()> {
    for name in PINNED_MAPS {
        let path = dir.join(name);
        let path = path.to_str().context("path")?;
        let id = map_id(Path::new(path))?.to_string();
        for mode in MODES {
            same(mode, &["dump", "pinned", path], 1)?;
            same(mode, &["show", "pinned", path], 1)?;
            same(mode, &["dump", "id", &id], 1)?;
            same(mode, &["show", "id", &id], 1)?;
            // Every lab of this machine has maps of these names: a moving set.
            same(mode, &["dump", "name", name], CHURN)?;
            same(mode, &["show", "name", name], CHURN)?;
        }
    }
    Ok(())
}

#[test]
fn dumps_and_shows_match_bpftool_for_every_pinned_map() -> Result<()> {
    let lab = started_lab()?;
    let dir = Path::new(PIN_DIR).join(&lab.nodes[0].name);

    for pods in [&[][..], &["a"], &["a", "e"]] {
        enrol(&lab, pods)?;
        compare_every_pinned_map(&dir).with_context(|| format!("with {pods:?} enrolled"))?;
    }

    // The many-element dumps hold what they should: typed entries, and the SOCKMAP's six
    // slots each with a socket cookie (8-byte values, no BTF: hex).
    let workloads = meshpath(&[], &["dump", "pinned", dir.join(MAP_WORKLOADS).to_str().context("path")?])?;
    ensure!(workloads.stdout.contains("\"addr\": [0,0,0,0,0,0,0,0,0,0,255,255,10,244,1,10"), "{}", workloads.stdout);
    ensure!(workloads.stdout.matches("\"ifindex\"").count() == 4, "{}", workloads.stdout);
    let listeners = meshpath(&[], &["dump", "pinned", dir.join(MAP_LISTENERS).to_str().context("path")?])?;
    let slots = listeners.stdout.lines().filter(|l| l.starts_with("key: ") && l.contains("  value: ")).count();
    ensure!(slots == 6 && listeners.stdout.ends_with("Found 6 elements\n"), "{}", listeners.stdout);
    let counters = meshpath(&["-j"], &["dump", "pinned", dir.join(MAP_COUNTERS).to_str().context("path")?])?;
    ensure!(counters.stdout.contains("\"values\":[{\"cpu\":0,"), "{}", counters.stdout);

    // A map without BTF shows no btf_id on its own. (In `map list` bpftool reuses one info
    // buffer, and Linux 6.18 leaves a BTF-less map's BTF fields as the buffer had them, so
    // there it shows the previous map's: the whole-list comparisons below cover that.)
    let sockmap_id = map_id(&dir.join(MAP_LISTENERS))?.to_string();
    let shown = same(&[], &["show", "id", &sockmap_id], 1)?;
    ensure!(!shown.stdout.contains("btf_id"), "{}", shown.stdout);

    // Other tests create and remove maps while this runs: each whole-kernel list gets
    // several tries, and one identical pair is enough.
    for mode in MODES {
        same(mode, &["list"], CHURN)?;
        same(mode, &["show"], CHURN)?;
        same(mode, &[], CHURN)?;
    }
    // And in that list the SOCKMAP carries whatever btf_id the map listed before it had.
    let list = same(&[], &["list"], CHURN)?.stdout;
    // One block per map: its header line and the tab-indented lines after it.
    let mut blocks: Vec<String> = Vec::new();
    for line in list.split_inclusive('\n') {
        match blocks.last_mut() {
            Some(last) if line.starts_with('\t') => last.push_str(line),
            _ => blocks.push(line.to_owned()),
        }
    }
    let btf_id = |block: &str| block.split_whitespace().skip_while(|w| *w != "btf_id").nth(1).map(str::to_owned);
    let at = blocks
        .iter()
        .position(|b| b.starts_with(&format!("{sockmap_id}: sockmap")))
        .context("our SOCKMAP is not listed")?;
    // (The first map listed gets the buffer fresh; kernels before 6.18 clear it each time.)
    let before = at.checked_sub(1).map_or("", |i| blocks[i].as_str());
    let carries = aya::util::KernelVersion::current().is_ok_and(|v| v >= aya::util::KernelVersion::new(6, 18, 0));
    let expected = if carries { btf_id(before) } else { None };
    ensure!(btf_id(&blocks[at]) == expected, "btf_id not as bpftool shows it:\n{before}{}", blocks[at]);

    // A pin that is not a map.
    let link = dir.join("links").join("sk_lookup");
    for mode in MODES {
        let r = same(mode, &["dump", "pinned", link.to_str().context("path")?], 1)?;
        if mode.is_empty() {
            ensure!(r.stderr == "Error: incorrect object type: link\n", "{}", r.stderr);
        }
    }
    Ok(())
}

#[test]
fn bad_arguments_and_absent_maps_fail_as_bpftool_does() -> Result<()> {
    // bpftool prints one `Error:` line (stderr) or `{"error":...}` (stdout, with -j).
    let same_line: [&[&str]; 10] = [
        &["show", "id", "4000000000"],
        &["dump", "id", "4000000000"],
        &["dump", "pinned", "/sys/fs/bpf/meshpath-no-such-map"],
        &["show", "pinned", "/sys/fs/bpf/meshpath-no-such-dir/MP_WORKLOADS"],
        // Not on bpffs: bpftool names the directory it checked.
        &["dump", "pinned", "/tmp"],
        &["dump", "id", "x"],
        &["show", "foo", "bar"],
        &["show", "foo"],
        &["show", "id", "1", "extra"],
        &["dump", "name", "A_NAME_TOO_LONG_FOR_BPF"],
    ];
    for args in same_line {
        for mode in MODES {
            let b = bpftool(mode, args)?;
            let m = same(mode, args, 1)?;
            ensure!(m.code == Some(255), "{args:?}: exit {:?}", m.code);
            ensure!(m.stderr == b.stderr, "{mode:?} {args:?}: stderr {:?}, bpftool's {:?}", m.stderr, b.stderr);
            if mode.is_empty() {
                ensure!(m.stderr.starts_with("Error: ") && m.stderr.lines().count() == 1, "{args:?}: {}", m.stderr);
            } else {
                ensure!(m.stdout.starts_with("{") && m.stdout.contains("\"error\""), "{args:?}: {}", m.stdout);
            }
        }
    }
    // Where bpftool prints nothing (no map of that name) or its whole help text (a wrong
    // number of arguments, an unknown command), stdout and exit status still match, and
    // meshpath says what is wrong in one line.
    let own_line: [&[&str]; 5] = [
        &["show", "name", "NO_SUCH_MAP"],
        &["dump", "name", "NO_SUCH_MAP"],
        &["dump"],
        &["dump", "id", "1", "extra"],
        &["frobnicate"],
    ];
    for args in own_line {
        for mode in MODES {
            let m = same(mode, args, 1)?;
            ensure!(m.code == Some(255), "{args:?}: exit {:?}", m.code);
            ensure!(
                m.stderr.starts_with("Error: ") && m.stderr.lines().count() == 1,
                "{mode:?} {args:?}: {:?}",
                m.stderr
            );
        }
    }
    // meshpath's own flags, misused.
    let m = meshpath(&[], &["show", "--decode", "id", "1"])?;
    ensure!(
        m.code == Some(255) && m.stdout.is_empty() && m.stderr == "Error: --decode applies to 'dump' only\n",
        "{m:?}"
    );
    for r in [
        meshpath(&[], &["dump", "--bogus"])?,
        meshpath(&[], &["dump", "--decode", "--netns", "no-such-ns-here", "id", "1"])?,
    ] {
        ensure!(r.code != Some(0) && r.stderr.lines().count() == 1, "{r:?}");
        ensure!(!r.stderr.contains("panicked"), "{r:?}");
    }
    Ok(())
}

#[test]
fn decode_shows_workloads_interfaces_identities_listeners_and_counters() -> Result<()> {
    let lab = started_lab()?;
    let node = &lab.nodes[0].name;
    let dir = Path::new(PIN_DIR).join(node);
    enrol(&lab, &["a", "e"])?;
    let workloads = lab.workloads_path();
    let decode = |mode: &[&str], map: &str| {
        let path = dir.join(map);
        let args =
            ["dump", "--decode", "--netns", node, "--workloads", workloads.to_str().unwrap_or_default(), "pinned"];
        let mut args: Vec<&str> = args.to_vec();
        args.push(path.to_str().unwrap_or_default());
        meshpath(mode, &args)
    };

    let w = decode(&[], MAP_WORKLOADS)?;
    ensure!(w.code == Some(0) && w.stderr.is_empty(), "{w:?}");
    for pod in ["a", "e"] {
        let p = lab.pod(pod);
        for ip in [p.v4, p.v6] {
            let line = w
                .stdout
                .lines()
                .find(|l| l.starts_with(&format!("{ip} ")))
                .with_context(|| format!("{ip} missing:\n{}", w.stdout))?;
            let identity = format!("spiffe://cluster.local/ns/lab/sa/sa-{pod}");
            ensure!(
                line.contains(&p.host_if) && line.contains(&format!("lab/pod-{pod}")) && line.contains(&identity),
                "{line}"
            );
        }
    }
    ensure!(!w.stdout.contains(&lab.pod("b").v4.to_string()), "b is not enrolled:\n{}", w.stdout);

    let ifs = decode(&[], MAP_INTERFACES)?;
    let flags_of = |name: &str| {
        ifs.stdout
            .lines()
            .find(|l| l.contains(&format!("{name} (ifindex ")))
            .map(|l| l.split_whitespace().last().unwrap_or("").to_owned())
    };
    // Behind a bridge, pods' veths are its ports.
    let port = if lab.topology == Topology::Bridge { ",bridge_port" } else { "" };
    ensure!(
        flags_of("vpa") == Some(format!("workload,pod{port}"))
            && flags_of("vpe") == Some(format!("workload,pod{port}"))
            && flags_of("vpb") == Some(format!("pod{port}"))
            // The node link: an uplink, without an Ethernet header in the l3 topology.
            && flags_of("ul0").as_deref() == Some(if lab.topology == Topology::L3 { "l3" } else { "-" }),
        "{}",
        ifs.stdout
    );

    let l = decode(&[], MAP_LISTENERS)?;
    ensure!(l.stdout.contains("6 of 6 listener slots hold the proxy's socket"), "{}", l.stdout);
    for (listener, port) in [("outbound", "15001"), ("inbound_plain", "15006"), ("hbone", "15008")] {
        ensure!(
            l.stdout.lines().filter(|x| x.contains(listener) && x.contains(port) && x.ends_with("registered")).count()
                == 2,
            "{}",
            l.stdout
        );
    }

    let c = decode(&[], MAP_COUNTERS)?;
    for name in ["classified", "steered", "missing_socket", "spoof_dropped", "malformed"] {
        ensure!(c.stdout.lines().any(|l| l.starts_with(name)), "{name} missing:\n{}", c.stdout);
    }

    // The same as JSON.
    let j = decode(&["-j"], MAP_WORKLOADS)?;
    let v: serde_json::Value = serde_json::from_str(&j.stdout).with_context(|| j.stdout.clone())?;
    let rows = v["workloads"].as_array().context("workloads")?;
    ensure!(rows.len() == 4, "{v}");
    let a = lab.pod("a").v4.to_string();
    let row = rows.iter().find(|r| r["ip"] == a.as_str()).context("a's v4")?;
    ensure!(row["interface"] == "vpa" && row["identity"] == "spiffe://cluster.local/ns/lab/sa/sa-a", "{row}");
    Ok(())
}
