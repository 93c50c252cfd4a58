//! Datapath counters: one per-CPU `u64` slot each in [`crate::names::MAP_COUNTERS`].

/// What the datapath counts. The discriminant is the array index.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u32)]
pub enum Counter {
    /// TCP packets the TC classifier marked for local delivery to the proxy.
    Classified = 0,
    /// New connections sk_lookup assigned to a proxy listener.
    Steered = 1,
    /// New connections dropped because the listener they belong to is not registered
    /// (proxy down): the fail-closed path.
    MissingSocket = 2,
    /// Packets dropped because they carried an enrolled source IP on the wrong interface.
    SpoofDropped = 3,
    /// Packets of enrolled workloads the classifier could not parse (dropped, never bypassed).
    Malformed = 4,
    /// Captured connection attempts dropped because the capture rule or route would not
    /// have delivered them to the proxy.
    Undelivered = 5,
}

impl Counter {
    pub const COUNT: u32 = 6;
    pub const ALL: [Counter; Self::COUNT as usize] = [
        Counter::Classified,
        Counter::Steered,
        Counter::MissingSocket,
        Counter::SpoofDropped,
        Counter::Malformed,
        Counter::Undelivered,
    ];

    pub const fn index(self) -> u32 {
        self as u32
    }

    /// Stable snake_case name for logs, metrics and JSON.
    pub const fn name(self) -> &'static str {
        match self {
            Counter::Classified => "classified",
            Counter::Steered => "steered",
            Counter::MissingSocket => "missing_socket",
            Counter::SpoofDropped => "spoof_dropped",
            Counter::Malformed => "malformed",
            Counter::Undelivered => "undelivered",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn indices_are_dense_and_ordered() {
        for (i, c) in Counter::ALL.iter().enumerate() {
            assert_eq!(c.index() as usize, i, "{}", c.name());
        }
    }
}
