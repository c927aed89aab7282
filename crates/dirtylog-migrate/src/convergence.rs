//! When to stop pre-copy: the downtime estimate, the round and time limits, and QEMU's
//! auto-converge throttle. Pure functions and small state machines, unit-tested on their own.

use std::time::Duration;

use serde::Serialize;

use crate::stats::DowntimeBreakdown;

/// What to do when pre-copy hits the round limit or the timeout without converging.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum TimeoutPolicy {
    /// Give up: resume the source guest and report an error (Cloud Hypervisor's `cancel`).
    #[default]
    Cancel,
    /// Switch over anyway and accept a longer downtime (Cloud Hypervisor's `ignore`).
    Switchover,
}

/// Expected downtime of sending `remaining_bytes` at `bandwidth` bytes per second: QEMU's
/// `expected-downtime` (dirty bytes at the last sync ÷ bandwidth). `Duration::MAX` with no
/// bandwidth measured yet.
pub fn expected_downtime(remaining_bytes: u64, bandwidth: f64) -> Duration {
    if remaining_bytes == 0 {
        return Duration::ZERO;
    }
    if bandwidth.is_nan() || bandwidth <= 0.0 {
        return Duration::MAX;
    }
    Duration::try_from_secs_f64(remaining_bytes as f64 / bandwidth).unwrap_or(Duration::MAX)
}

/// What the blackout costs besides sending the last dirty pages, each measured on this run
/// (by a probe at setup: pause, save every state, resume).
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct BlackoutCosts {
    /// Stopping every vCPU.
    pub pause: Duration,
    /// Saving the vCPU states and device sections.
    pub state: Duration,
    /// Resuming the vCPUs; the destination's restore is taken to cost what the save did.
    pub resume: Duration,
    /// Bytes per second of the source's full-memory digest (strict verification only).
    pub digest_rate: Option<f64>,
}

impl BlackoutCosts {
    /// Each cost the lower of two probes' (and the faster digest).
    pub fn fastest(&self, other: &BlackoutCosts) -> BlackoutCosts {
        BlackoutCosts {
            pause: self.pause.min(other.pause),
            state: self.state.min(other.state),
            resume: self.resume.min(other.resume),
            digest_rate: match (self.digest_rate, other.digest_rate) {
                (Some(a), Some(b)) => Some(a.max(b)),
                (a, b) => a.or(b),
            },
        }
    }
}

/// The expected downtime, phase by phase ([`DowntimeBreakdown`], microseconds): the probe's
/// pause, state and resume (plus a restore as long as the save), the last harvest's time plus
/// `remaining_bytes` at `bandwidth`, and — when `digest_bytes` must be digested in the
/// blackout — whatever of the digest the final round does not hide.
pub fn expected_breakdown(
    costs: &BlackoutCosts,
    harvest: Duration,
    remaining_bytes: u64,
    bandwidth: f64,
    digest_bytes: u64,
) -> DowntimeBreakdown {
    let us = |d: Duration| d.as_micros().min(u128::from(u64::MAX)) as u64;
    let final_round = harvest.saturating_add(expected_downtime(remaining_bytes, bandwidth));
    let verify = match costs.digest_rate {
        Some(rate) if digest_bytes > 0 => {
            expected_downtime(digest_bytes, rate).saturating_sub(final_round)
        }
        _ => Duration::ZERO,
    };
    DowntimeBreakdown {
        pause: us(costs.pause),
        state: us(costs.state),
        final_round: us(final_round),
        verify: us(verify),
        resume: us(costs.resume.saturating_add(costs.state)),
    }
}

/// Pages dirtied per second: `pages` found dirty by a harvest `elapsed` after the previous one
/// (QEMU's `dirty-pages-rate`).
pub fn dirty_rate(pages: u64, elapsed: Duration) -> u64 {
    let secs = elapsed.as_secs_f64();
    if secs <= 0.0 {
        return 0;
    }
    (pages as f64 / secs).round() as u64
}

/// Bytes per second of `bytes` sent in `elapsed`.
pub fn bandwidth(bytes: u64, elapsed: Duration) -> f64 {
    let secs = elapsed.as_secs_f64();
    if secs <= 0.0 {
        return 0.0;
    }
    bytes as f64 / secs
}

/// The decision after a harvest.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Decision {
    /// Send another round.
    Continue,
    /// Stop the guest and send the rest.
    Switchover(SwitchoverReason),
    /// Give up (the [`TimeoutPolicy::Cancel`] policy).
    Cancel(&'static str),
}

/// Why the source switched over.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum SwitchoverReason {
    /// The expected downtime fit the limit.
    Converged,
    /// The round limit was reached and the policy is to switch over.
    RoundLimit,
    /// The timeout expired and the policy is to switch over.
    Timeout,
    /// The blackout's fixed costs alone (pause, state, resume, strict verification) exceed the
    /// limit, nothing was left to gain from another round, and the policy is to switch over.
    LimitUnreachable,
}

/// The limits pre-copy runs under.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// Switch over once the expected downtime is at most this.
    pub downtime: Duration,
    /// Most rounds after the bulk pass.
    pub max_rounds: u64,
    /// Most time from the start of the migration until switchover.
    pub timeout: Option<Duration>,
    /// What to do at either limit.
    pub policy: TimeoutPolicy,
}

impl Limits {
    /// Decide after the harvest that follows round `round` (the bulk pass is round 0), with
    /// `elapsed` since the start of the migration.
    pub fn decide(&self, expected: Duration, round: u64, elapsed: Duration) -> Decision {
        if expected <= self.downtime {
            return Decision::Switchover(SwitchoverReason::Converged);
        }
        let hit = if self.timeout.is_some_and(|t| elapsed >= t) {
            Some((SwitchoverReason::Timeout, "timeout"))
        } else if round >= self.max_rounds {
            Some((SwitchoverReason::RoundLimit, "round limit"))
        } else {
            None
        };
        match (hit, self.policy) {
            (None, _) => Decision::Continue,
            (Some((reason, _)), TimeoutPolicy::Switchover) => Decision::Switchover(reason),
            (Some((_, why)), TimeoutPolicy::Cancel) => Decision::Cancel(why),
        }
    }
}

/// QEMU's auto-converge parameters (`cpu-throttle-initial`, `cpu-throttle-increment`,
/// `max-cpu-throttle`, `throttle-trigger-threshold`), with QEMU's defaults.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct AutoConverge {
    /// First throttle, percent of vCPU time: 20.
    pub initial: u8,
    /// Added at each further step: 10.
    pub increment: u8,
    /// Ceiling: 99.
    pub max: u8,
    /// Throttle when the dirty rate exceeds this percentage of the bandwidth: 50.
    pub threshold: u8,
    /// ... for this many consecutive rounds: 2.
    pub trigger_rounds: u32,
}

impl Default for AutoConverge {
    fn default() -> Self {
        AutoConverge {
            initial: 20,
            increment: 10,
            max: 99,
            threshold: 50,
            trigger_rounds: 2,
        }
    }
}

/// The auto-converge state: how many rounds in a row dirtied too fast, and the throttle now.
#[derive(Clone, Debug)]
pub struct Throttle {
    params: AutoConverge,
    high_rounds: u32,
    percent: u8,
}

impl Throttle {
    /// No throttle yet.
    pub fn new(params: AutoConverge) -> Self {
        Throttle {
            params,
            high_rounds: 0,
            percent: 0,
        }
    }

    /// The current throttle percentage.
    pub fn percent(&self) -> u8 {
        self.percent
    }

    /// Feed one round: bytes dirtied per second and bytes sent per second. Returns the new
    /// throttle percentage when it changes. Like QEMU's `migration_trigger_throttle`, after
    /// throttling the count starts over, so each step needs `trigger_rounds` more rounds.
    pub fn observe(&mut self, dirty_bytes_per_s: f64, bandwidth: f64) -> Option<u8> {
        let threshold = bandwidth * f64::from(self.params.threshold) / 100.0;
        if dirty_bytes_per_s <= threshold {
            self.high_rounds = 0;
            return None;
        }
        self.high_rounds += 1;
        if self.high_rounds < self.params.trigger_rounds {
            return None;
        }
        self.high_rounds = 0;
        let next = if self.percent == 0 {
            self.params.initial
        } else {
            self.percent.saturating_add(self.params.increment)
        }
        .min(self.params.max);
        if next == self.percent {
            return None;
        }
        self.percent = next;
        Some(next)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn expected_downtime_is_remaining_over_bandwidth() {
        assert_eq!(expected_downtime(0, 0.0), Duration::ZERO);
        assert_eq!(expected_downtime(1, 0.0), Duration::MAX);
        assert_eq!(
            expected_downtime(100 << 20, (1u64 << 30) as f64),
            Duration::from_nanos(97_656_250)
        );
        assert_eq!(expected_downtime(300_000_000, 1e9), 300 * MS);
    }

    #[test]
    fn the_expected_downtime_counts_every_blackout_phase() {
        let costs = BlackoutCosts {
            pause: 2 * MS,
            state: 5 * MS,
            resume: MS,
            digest_rate: None,
        };
        // 100 MB at 1 GB/s: 100 ms, after a 3 ms harvest.
        let b = expected_breakdown(&costs, 3 * MS, 100_000_000, 1e9, 1 << 30);
        assert_eq!(
            (b.pause, b.state, b.final_round, b.verify, b.resume),
            (2_000, 5_000, 103_000, 0, 6_000)
        );
        assert_eq!(b.total(), 116_000);
        // Strict: 1 GB digested at 5 GB/s = 200 ms, of which the final round hides 103.
        let strict = BlackoutCosts {
            digest_rate: Some(5e9),
            ..costs
        };
        let b = expected_breakdown(&strict, 3 * MS, 100_000_000, 1e9, 1_000_000_000);
        assert_eq!(b.verify, 97_000);
        assert_eq!(b.total(), 213_000);
        // Nothing left to send still pays the fixed phases.
        let b = expected_breakdown(&costs, Duration::ZERO, 0, 0.0, 0);
        assert_eq!(b.total(), 13_000);
    }

    #[test]
    fn rates() {
        assert_eq!(dirty_rate(1000, 500 * MS), 2000);
        assert_eq!(dirty_rate(1000, Duration::ZERO), 0);
        assert_eq!(bandwidth(1 << 20, Duration::from_secs(2)), 524_288.0);
        assert_eq!(bandwidth(5, Duration::ZERO), 0.0);
    }

    fn limits(policy: TimeoutPolicy) -> Limits {
        Limits {
            downtime: 300 * MS,
            max_rounds: 5,
            timeout: Some(Duration::from_secs(10)),
            policy,
        }
    }

    #[test]
    fn switches_over_when_the_downtime_fits() {
        let l = limits(TimeoutPolicy::Cancel);
        let s = Duration::from_secs(1);
        assert_eq!(
            l.decide(300 * MS, 1, s),
            Decision::Switchover(SwitchoverReason::Converged)
        );
        assert_eq!(l.decide(301 * MS, 1, s), Decision::Continue);
        // Converging wins over the limits.
        assert_eq!(
            l.decide(MS, 99, Duration::from_secs(99)),
            Decision::Switchover(SwitchoverReason::Converged)
        );
    }

    #[test]
    fn limits_apply_the_policy() {
        let big = Duration::from_secs(5);
        let cancel = limits(TimeoutPolicy::Cancel);
        assert_eq!(cancel.decide(big, 5, MS), Decision::Cancel("round limit"));
        assert_eq!(cancel.decide(big, 4, MS), Decision::Continue);
        assert_eq!(
            cancel.decide(big, 1, Duration::from_secs(10)),
            Decision::Cancel("timeout")
        );
        let switch = limits(TimeoutPolicy::Switchover);
        assert_eq!(
            switch.decide(big, 5, MS),
            Decision::Switchover(SwitchoverReason::RoundLimit)
        );
        assert_eq!(
            switch.decide(big, 1, Duration::from_secs(11)),
            Decision::Switchover(SwitchoverReason::Timeout)
        );
        let forever = Limits {
            timeout: None,
            max_rounds: u64::MAX,
            ..cancel
        };
        assert_eq!(
            forever.decide(big, 1000, Duration::from_secs(1 << 20)),
            Decision::Continue
        );
    }

    #[test]
    fn auto_converge_follows_qemu_steps() {
        let mut t = Throttle::new(AutoConverge::default());
        let bw = 1000.0;
        // At or below half the bandwidth: never.
        for _ in 0..5 {
            assert_eq!(t.observe(500.0, bw), None);
        }
        // One high round is not enough; two in a row are.
        assert_eq!(t.observe(501.0, bw), None);
        assert_eq!(t.observe(900.0, bw), Some(20));
        // Each step needs two more high rounds.
        assert_eq!(t.observe(900.0, bw), None);
        assert_eq!(t.observe(900.0, bw), Some(30));
        // A low round resets the count.
        assert_eq!(t.observe(900.0, bw), None);
        assert_eq!(t.observe(100.0, bw), None);
        assert_eq!(t.observe(900.0, bw), None);
        assert_eq!(t.observe(900.0, bw), Some(40));
        let mut steps = vec![];
        for _ in 0..40 {
            if let Some(p) = t.observe(2000.0, bw) {
                steps.push(p);
            }
        }
        assert_eq!(steps, [50, 60, 70, 80, 90, 99]);
        assert_eq!(t.percent(), 99);
    }

    #[test]
    fn auto_converge_with_no_bandwidth_measured_triggers() {
        let mut t = Throttle::new(AutoConverge {
            trigger_rounds: 1,
            ..AutoConverge::default()
        });
        assert_eq!(t.observe(1.0, 0.0), Some(20));
        assert_eq!(t.observe(0.0, 0.0), None);
    }
}
