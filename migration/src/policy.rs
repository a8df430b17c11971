//! Pre-copy policy: when to stop copying, when and how hard to throttle,
//! how fast to send. Pure functions over integers (no floating point: the
//! hypervisor target has no FPU context for its own code), so each decision
//! is unit-tested here and the engine only wires them up.
//!
//! - Expected downtime = remaining dirty bytes / measured bandwidth + fixed
//!   switch-over cost ([`expected_downtime_ns`]). Switch over when it fits
//!   the limit ([`fits_downtime`]).
//! - A pass "converges" when it shrinks the dirty set by at least
//!   `min_shrink_pct` percent ([`is_converging`]). Each non-converging pass
//!   raises the guest's throttle: first to `throttle_initial_pct`, then by
//!   `throttle_step_pct`, capped at `throttle_max_pct` ([`next_throttle`]).
//! - Bandwidth is an exponentially weighted moving average of per-step
//!   samples ([`ewma`]), capped by the operator's limit
//!   ([`effective_bandwidth`]); the limit itself is a token bucket over the
//!   whole transfer ([`rate_limit_wait_ns`]).

/// Nanoseconds per second.
pub const NS_PER_S: u64 = 1_000_000_000;
/// Nanoseconds per millisecond.
pub const NS_PER_MS: u64 = 1_000_000;

/// Operator-settable knobs of one migration.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Policy {
    /// Longest acceptable pause of the guest.
    pub downtime_limit_ns: u64,
    /// Fixed cost of switching over besides copying the last pages: saving
    /// and restoring vCPU/device state, the ready/go/resumed round trips.
    /// Measure it (e.g. a previous migration's `downtime_ms` minus its final
    /// transfer time) and set it; the default is a conservative guess.
    pub switch_over_cost_ns: u64,
    /// Rate limit for the stream; 0 = unlimited.
    pub max_bandwidth_bytes_per_s: u64,
    /// The migration is cancelled (the VM keeps running at the source) if it
    /// has not switched over after this long.
    pub timeout_ns: u64,
    /// Smallest shrink of the dirty set, in percent of the previous pass, for
    /// a pass to count as converging.
    pub min_shrink_pct: u8,
    /// First throttle applied after a non-converging pass.
    pub throttle_initial_pct: u8,
    /// Increment per further non-converging pass.
    pub throttle_step_pct: u8,
    /// Throttle ceiling (< 100: the guest always makes some progress).
    pub throttle_max_pct: u8,
    /// Pages read and sent per engine step (bounds the work per step).
    pub step_pages: u32,
    /// Weight of a new bandwidth sample in the average, in percent.
    pub ewma_weight_pct: u8,
    /// Verification mode (opt-in; every migration test turns it on): at
    /// switch-over, with the VM paused and the last pages sent, the source
    /// reads and hashes its whole memory, fails the migration (the VM
    /// resumes at the source) if any page differs from what it sent, and
    /// sends the digest in a verify record; the destination compares it
    /// with its own memory before it answers `ready`. A write the dirty log
    /// missed then fails the migration instead of leaving a stale page at
    /// the destination. Costs a full read of guest memory on each side
    /// during the downtime, and needs protocol version 2 at the
    /// destination ([`crate::stream`]).
    pub verify_memory: bool,
    /// The link counts as lost when it moves nothing (no byte acknowledged
    /// by the peer, none received from it) for this long while the engine
    /// has bytes in flight or waits for the peer.
    pub stall_timeout_ns: u64,
    /// No live pre-copy (quick migration, MISSION "Quick storage
    /// migration"): the VM pauses as soon as the destination accepted the
    /// stream, and one pass sends all its memory, then its state. The
    /// downtime is the whole memory's transfer; the downtime limit is not
    /// consulted.
    pub pause_at_once: bool,
}

impl Default for Policy {
    fn default() -> Self {
        Self {
            downtime_limit_ns: 300 * NS_PER_MS,
            switch_over_cost_ns: 10 * NS_PER_MS,
            max_bandwidth_bytes_per_s: 0,
            timeout_ns: 600 * NS_PER_S,
            min_shrink_pct: 10,
            throttle_initial_pct: 20,
            throttle_step_pct: 10,
            throttle_max_pct: 99,
            step_pages: 256,
            ewma_weight_pct: 25,
            verify_memory: false,
            stall_timeout_ns: 8 * NS_PER_S,
            pause_at_once: false,
        }
    }
}

/// Time to send `dirty_bytes` at `bandwidth_bytes_per_s` plus the fixed
/// switch-over cost. Unknown (zero) bandwidth means "forever", unless
/// nothing is left to send.
pub fn expected_downtime_ns(
    dirty_bytes: u64,
    bandwidth_bytes_per_s: u64,
    switch_over_cost_ns: u64,
) -> u64 {
    if dirty_bytes == 0 {
        return switch_over_cost_ns;
    }
    if bandwidth_bytes_per_s == 0 {
        return u64::MAX;
    }
    let transfer =
        u128::from(dirty_bytes) * u128::from(NS_PER_S) / u128::from(bandwidth_bytes_per_s);
    u64::try_from(transfer)
        .unwrap_or(u64::MAX)
        .saturating_add(switch_over_cost_ns)
}

/// Smallest and largest bound on stream bytes in flight beyond what the
/// destination applied ([`in_flight_cap_bytes`]).
pub const IN_FLIGHT_MIN_BYTES: u64 = 1 << 20;
/// See [`IN_FLIGHT_MIN_BYTES`].
pub const IN_FLIGHT_MAX_BYTES: u64 = 8 << 20;

/// How far the source may run ahead of what the destination applied: what
/// the measured bandwidth moves in a quarter of the downtime limit, so the
/// bytes a pause must wait for take at most that long; within
/// [`IN_FLIGHT_MIN_BYTES`] (enough to keep a link busy across a node's
/// scheduling round) and [`IN_FLIGHT_MAX_BYTES`]. Unknown bandwidth: the
/// minimum.
pub fn in_flight_cap_bytes(bandwidth_bytes_per_s: u64, downtime_limit_ns: u64) -> u64 {
    let quarter = u128::from(bandwidth_bytes_per_s) * u128::from(downtime_limit_ns)
        / u128::from(NS_PER_S)
        / 4;
    u64::try_from(quarter)
        .unwrap_or(u64::MAX)
        .clamp(IN_FLIGHT_MIN_BYTES, IN_FLIGHT_MAX_BYTES)
}

/// Whether the expected downtime is within the limit.
pub fn fits_downtime(expected_ns: u64, limit_ns: u64) -> bool {
    expected_ns <= limit_ns
}

/// Whether a pass that left `current_dirty` pages (after `previous_dirty`)
/// shrank the dirty set by at least `min_shrink_pct` percent.
pub fn is_converging(previous_dirty: u64, current_dirty: u64, min_shrink_pct: u8) -> bool {
    let keep_pct = 100u128.saturating_sub(u128::from(min_shrink_pct.min(100)));
    current_dirty == 0
        || (current_dirty < previous_dirty
            && u128::from(current_dirty) * 100 <= u128::from(previous_dirty) * keep_pct)
}

/// The throttle after one more non-converging pass.
pub fn next_throttle(current_pct: u8, policy: &Policy) -> u8 {
    let max = policy.throttle_max_pct.min(99);
    let next = if current_pct == 0 {
        policy.throttle_initial_pct
    } else {
        current_pct.saturating_add(policy.throttle_step_pct)
    };
    next.min(max)
}

/// Moving average: `weight_pct` percent of `sample`, the rest of `previous`
/// (the first sample is taken as is).
pub fn ewma(previous: Option<u64>, sample: u64, weight_pct: u8) -> u64 {
    let w = u128::from(weight_pct.min(100));
    match previous {
        None => sample,
        Some(p) => ((u128::from(p) * (100 - w) + u128::from(sample) * w) / 100) as u64,
    }
}

/// Bytes per second of `bytes` sent in `elapsed_ns`; `None` when the
/// interval is too short to measure (a zero-duration step).
pub fn bandwidth_sample(bytes: u64, elapsed_ns: u64) -> Option<u64> {
    if elapsed_ns == 0 || bytes == 0 {
        return None;
    }
    Some(
        u64::try_from(u128::from(bytes) * u128::from(NS_PER_S) / u128::from(elapsed_ns))
            .unwrap_or(u64::MAX),
    )
}

/// The bandwidth to plan with: the measured one, capped by the limit.
pub fn effective_bandwidth(measured: Option<u64>, max_bytes_per_s: u64) -> u64 {
    match (measured, max_bytes_per_s) {
        (None, 0) => 0,
        (None, max) => max,
        (Some(m), 0) => m,
        (Some(m), max) => m.min(max),
    }
}

/// How long to wait before sending more, given `bytes_sent` since the start
/// of the transfer `elapsed_ns` ago and a limit (0 = unlimited).
pub fn rate_limit_wait_ns(bytes_sent: u64, elapsed_ns: u64, max_bytes_per_s: u64) -> u64 {
    if max_bytes_per_s == 0 {
        return 0;
    }
    let due_ns = u128::from(bytes_sent) * u128::from(NS_PER_S) / u128::from(max_bytes_per_s);
    u64::try_from(due_ns.saturating_sub(u128::from(elapsed_ns))).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {

    #[test]
    fn the_in_flight_cap_is_a_quarter_of_the_limit_at_the_measured_rate() {
        // 40 MB/s, 300 ms: 3 MB.
        assert_eq!(in_flight_cap_bytes(40_000_000, 300 * NS_PER_MS), 3_000_000);
        assert_eq!(in_flight_cap_bytes(0, 300 * NS_PER_MS), IN_FLIGHT_MIN_BYTES);
        assert_eq!(
            in_flight_cap_bytes(1_000, 300 * NS_PER_MS),
            IN_FLIGHT_MIN_BYTES
        );
        assert_eq!(in_flight_cap_bytes(u64::MAX, u64::MAX), IN_FLIGHT_MAX_BYTES);
    }
    use super::*;

    #[test]
    fn downtime_is_transfer_plus_fixed_cost() {
        // 100 MiB/s, 10 MiB dirty: 100 ms, plus 5 ms.
        let mib = 1 << 20;
        assert_eq!(
            expected_downtime_ns(10 * mib, 100 * mib, 5 * NS_PER_MS),
            105 * NS_PER_MS
        );
        assert_eq!(expected_downtime_ns(0, 100, 7), 7);
        assert_eq!(expected_downtime_ns(1, 0, 0), u64::MAX);
        assert_eq!(expected_downtime_ns(0, 0, 9), 9);
        assert_eq!(expected_downtime_ns(u64::MAX, 1, 1), u64::MAX);
        assert!(fits_downtime(
            300 * NS_PER_MS,
            Policy::default().downtime_limit_ns
        ));
        assert!(!fits_downtime(
            300 * NS_PER_MS + 1,
            Policy::default().downtime_limit_ns
        ));
    }

    #[test]
    fn convergence_needs_a_real_shrink() {
        assert!(is_converging(1000, 800, 10));
        assert!(is_converging(1000, 900, 10));
        assert!(!is_converging(1000, 901, 10));
        assert!(!is_converging(1000, 1000, 10));
        assert!(!is_converging(1000, 5000, 10));
        assert!(is_converging(0, 0, 10));
        assert!(!is_converging(1, 1, 0));
        assert!(is_converging(2, 1, 0));
    }

    #[test]
    fn throttle_steps_20_then_10_up_to_99() {
        let p = Policy::default();
        let mut t = 0;
        let mut seen = alloc::vec::Vec::new();
        for _ in 0..12 {
            t = next_throttle(t, &p);
            seen.push(t);
        }
        assert_eq!(seen, [20, 30, 40, 50, 60, 70, 80, 90, 99, 99, 99, 99]);
        let weird = Policy {
            throttle_max_pct: 100,
            throttle_step_pct: 200,
            ..p
        };
        assert_eq!(next_throttle(50, &weird), 99);
    }

    #[test]
    fn bandwidth_average_and_limit() {
        assert_eq!(ewma(None, 400, 25), 400);
        assert_eq!(ewma(Some(400), 800, 25), 500);
        assert_eq!(ewma(Some(u64::MAX), u64::MAX, 25), u64::MAX);
        assert_eq!(bandwidth_sample(1000, NS_PER_S / 2), Some(2000));
        assert_eq!(bandwidth_sample(1000, 0), None);
        assert_eq!(effective_bandwidth(Some(500), 0), 500);
        assert_eq!(effective_bandwidth(Some(500), 100), 100);
        assert_eq!(effective_bandwidth(None, 100), 100);
        assert_eq!(effective_bandwidth(None, 0), 0);
        // 1000 B/s: 500 bytes are due at 0.5 s.
        assert_eq!(rate_limit_wait_ns(500, 0, 1000), NS_PER_S / 2);
        assert_eq!(rate_limit_wait_ns(500, NS_PER_S, 1000), 0);
        assert_eq!(rate_limit_wait_ns(500, 0, 0), 0);
    }
}
