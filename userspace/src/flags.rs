//! Parsers the command line's typed flags share (every flag is defined once, next to the
//! code it configures, and read through these).

use std::ops::RangeInclusive;
use std::time::Duration;

use clap::builder::TypedValueParser;

/// A whole number of seconds within `range`, as a [`Duration`].
pub fn secs(range: RangeInclusive<u64>) -> impl TypedValueParser<Value = Duration> {
    clap::value_parser!(u64).range(range).map(Duration::from_secs)
}

/// A whole number of milliseconds within `range`, as a [`Duration`].
pub fn millis(range: RangeInclusive<u64>) -> impl TypedValueParser<Value = Duration> {
    clap::value_parser!(u64).range(range).map(Duration::from_millis)
}

/// A count of at least one.
pub fn count() -> impl TypedValueParser<Value = usize> {
    clap::value_parser!(u64).range(1..).map(|n| usize::try_from(n).unwrap_or(usize::MAX))
}

/// This host's name: the default node name.
pub fn hostname() -> String {
    nix::unistd::gethostname().ok().and_then(|h| h.into_string().ok()).unwrap_or_else(|| "localhost".into())
}

/// A trust domain, as SPIFFE IDs take it.
pub fn trust_domain(s: &str) -> Result<String, String> {
    crate::identity::Identity::new(s, "ns", "sa")
        .to_string()
        .parse::<crate::identity::Identity>()
        .map(|_| s.to_owned())
        .map_err(|_| format!("{s:?} is not a trust domain (letters, digits, '-', '.', '_')"))
}

/// A Kubernetes namespace name (an RFC 1123 label).
pub fn dns_label(s: &str) -> Result<String, String> {
    let ok_char = |c: char| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-';
    let ok = (1..=63).contains(&s.len()) && s.chars().all(ok_char) && !s.starts_with('-') && !s.ends_with('-');
    ok.then(|| s.to_owned())
        .ok_or_else(|| format!("{s:?} is not a namespace name (1-63 lower-case letters, digits and '-')"))
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    #[derive(Parser)]
    struct Probe {
        #[arg(long, value_parser = secs(1..=300))]
        wait: Option<Duration>,
        #[arg(long, value_parser = count())]
        n: Option<usize>,
    }

    #[test]
    fn durations_and_counts_parse_within_their_ranges() {
        let p = Probe::try_parse_from(["p", "--wait", "7", "--n", "3"]).expect("parses");
        assert_eq!((p.wait, p.n), (Some(Duration::from_secs(7)), Some(3)));
        assert!(Probe::try_parse_from(["p", "--wait", "0"]).is_err());
        assert!(Probe::try_parse_from(["p", "--wait", "301"]).is_err());
        assert!(Probe::try_parse_from(["p", "--n", "0"]).is_err());
        assert!(Probe::try_parse_from(["p", "--wait", "-1"]).is_err());
    }

    #[test]
    fn namespace_names_are_dns_labels() {
        assert_eq!(dns_label("istio-system").as_deref(), Ok("istio-system"));
        for bad in ["", "Istio", "-a", "a-", "a/b", "a.b", &"a".repeat(64)] {
            assert!(dns_label(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn trust_domains_are_checked() {
        assert_eq!(trust_domain("cluster.local").as_deref(), Ok("cluster.local"));
        assert!(trust_domain("a/b").is_err());
    }
}
