//! Migration statistics, serialised under the names QEMU's `query-migrate` uses, so that tools
//! reading QEMU's output can read ours.

use serde::Serialize;

/// Statistics of a whole migration. Times are in milliseconds, as in QEMU. QEMU nests the
/// memory counters in a `ram` object; here they sit beside the times.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct MigrationStats {
    /// Milliseconds since the migration started (`total-time`).
    pub total_time: u64,
    /// Milliseconds spent setting up before the first round (`setup-time`).
    pub setup_time: u64,
    /// Milliseconds the guest was stopped for the final round (`downtime`).
    pub downtime: u64,
    /// Bytes sent so far (`transferred`).
    pub transferred: u64,
    /// Bytes of dirty memory still to send (`remaining`).
    pub remaining: u64,
    /// Pages sent as zero-page markers; QEMU calls them duplicate pages (`duplicate`).
    pub duplicate: u64,
    /// Pages sent with their contents (`normal`).
    pub normal: u64,
    /// Pages dirtied per second, as last measured (`dirty-pages-rate`).
    pub dirty_pages_rate: u64,
    /// Throughput in megabits per second (`mbps`).
    pub mbps: f64,
    /// Times the dirty log was harvested (`dirty-sync-count`).
    pub dirty_sync_count: u64,
    /// Predicted downtime in milliseconds at the current throughput (`expected-downtime`).
    pub expected_downtime: u64,
}

/// What one pre-copy round did.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct RoundStats {
    /// The round, from 0 (`round`).
    pub round: u64,
    /// Pages found dirty at the start of the round (`dirty-pages`).
    pub dirty_pages: u64,
    /// Pages sent with their contents (`sent-pages`).
    pub sent_pages: u64,
    /// Pages sent as zero-page markers (`zero-pages`).
    pub zero_pages: u64,
    /// Pages of the bulk pass neither read nor sent because this process had never populated
    /// them: zeros on both sides, known from the page tables
    /// ([`MigrationMemory::unpopulated_is_zero`](crate::MigrationMemory::unpopulated_is_zero))
    /// (`unpopulated-pages`).
    pub unpopulated_pages: u64,
    /// Microseconds spent harvesting the dirty log (`harvest-time-us`).
    pub harvest_time_us: u64,
    /// Microseconds spent sending the round (`send-time-us`).
    pub send_time_us: u64,
    /// Throughput of the round in megabits per second (`mbps`).
    pub mbps: f64,
}

/// One row of the per-round table: [`RoundStats`] plus what the engine measured after the
/// round.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct RoundReport {
    /// Pages, times and bandwidth of the round.
    #[serde(flatten)]
    pub stats: RoundStats,
    /// Bytes put on the wire in the round, frame overhead included (`transferred`).
    pub transferred: u64,
    /// Pages dirtied per second, measured by the harvest that started the round; 0 for the
    /// bulk pass (`dirty-pages-rate`).
    pub dirty_pages_rate: u64,
    /// Expected downtime in milliseconds when the round started (`expected-downtime`).
    pub expected_downtime: u64,
    /// vCPU throttle during the round, percent (`cpu-throttle-percentage`).
    pub cpu_throttle_percentage: u8,
    /// Each vCPU's dirty-limit throttle at the end of the round, percent
    /// ([`Vcpus::dirty_limit_throttle`](crate::Vcpus::dirty_limit_throttle); empty without a
    /// dirty limit; `dirty-limit-throttle-percentage`).
    pub dirty_limit_throttle_percentage: Vec<u8>,
    /// Whether this is the final round, sent with the guest paused (`final`).
    #[serde(rename = "final")]
    pub is_final: bool,
}

/// Where the source's downtime went — or, as expected before switchover, would go — in
/// microseconds, phase by phase from the pause to the guest running at the destination. The
/// phases add up to the downtime.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct DowntimeBreakdown {
    /// Stopping every vCPU ([`Vcpus::pause`](crate::Vcpus::pause); `downtime-pause`).
    pub pause: u64,
    /// Saving the vCPU states and the device sections (`downtime-state`).
    pub state: u64,
    /// The last harvest of the dirty log and sending the last dirty pages
    /// (`downtime-final-round`).
    pub final_round: u64,
    /// Waiting for the source's digest of its paused memory after the final round
    /// ([`Verify::Strict`](crate::Verify::Strict) only: the digest runs beside the final round,
    /// and in the other modes after the guest resumed; `downtime-verify`).
    pub verify: u64,
    /// From the end of the final round to the guest running at the destination: the states,
    /// the digests, the destination's restore and resume, and the reply (`downtime-resume`).
    pub resume: u64,
}

impl DowntimeBreakdown {
    /// The phases' sum, in microseconds.
    pub fn total(&self) -> u64 {
        self.pause
            .saturating_add(self.state)
            .saturating_add(self.final_round)
            .saturating_add(self.verify)
            .saturating_add(self.resume)
    }
}

/// What the source reports at the end of a successful migration.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct SendReport {
    /// QEMU-named totals.
    #[serde(flatten)]
    pub stats: MigrationStats,
    /// Why pre-copy stopped.
    pub switchover: crate::convergence::SwitchoverReason,
    /// vCPU throttle at switchover, percent (`cpu-throttle-percentage`).
    pub cpu_throttle_percentage: u8,
    /// Auto-converge wanted to throttle, but the VM's [`Vcpus::throttle`](crate::Vcpus::throttle)
    /// is [`Unsupported`](crate::Unsupported): the migration went on without throttling.
    pub throttle_unsupported: bool,
    /// A dirty limit was asked for, but the VM's
    /// [`Vcpus::set_dirty_limit`](crate::Vcpus::set_dirty_limit) is
    /// [`Unsupported`](crate::Unsupported): the migration went on without it.
    pub dirty_limit_unsupported: bool,
    /// The per-vCPU dirty limit asked for, pages per second (`dirty-limit`).
    pub dirty_limit: Option<u64>,
    /// Device sections sent at switchover.
    pub devices: usize,
    /// Connections used.
    pub connections: usize,
    /// Page size of the stream.
    pub page_size: u32,
    /// Guest memory in bytes (`total`).
    pub total: u64,
    /// One row per round: the bulk pass, the pre-copy rounds and the final round.
    pub rounds: Vec<RoundReport>,
    /// Where the downtime went (`downtime-breakdown-us`).
    #[serde(rename = "downtime-breakdown-us")]
    pub downtime_breakdown: DowntimeBreakdown,
    /// The last estimate before switchover, phase by phase, each phase measured on this run
    /// (`expected-downtime-breakdown-us`; its total is `expected-downtime`).
    #[serde(rename = "expected-downtime-breakdown-us")]
    pub expected_downtime_breakdown: DowntimeBreakdown,
    /// The downtime limit, in milliseconds (`downtime-limit`).
    pub downtime_limit: u64,
    /// The measured downtime exceeded the limit (`downtime-limit-exceeded`).
    pub downtime_limit_exceeded: bool,
    /// How the memory was checked (`verify`).
    pub verify: crate::Verify,
    /// Milliseconds from the guest running at the destination to its acknowledgement of the
    /// memory check, with the source's guest still paused and kept
    /// ([`Verify::Background`](crate::Verify::Background); 0 otherwise; `verify-time`).
    pub verify_time: u64,
    /// Per-frame compression of page data ([`SendConfig::compress`](crate::SendConfig);
    /// `compression`, as QEMU's).
    pub compression: CompressionStats,
}

/// What [`SendConfig::compress`](crate::SendConfig) did, under QEMU's names for its
/// compression counters. All 0 when compression is off.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct CompressionStats {
    /// The codec and level, as `--compress` takes it (`"lz4"`, `"zstd:1"`); `null` when off
    /// (`codec`).
    pub codec: Option<crate::compress::Compression>,
    /// Pages sent compressed (`pages`).
    pub pages: u64,
    /// Pages the codec did not shrink, sent as they are (`incompressible-pages`).
    pub incompressible_pages: u64,
    /// Bytes of compressed data sent for [`pages`](Self::pages) (`compressed-size`).
    pub compressed_size: u64,
    /// Bytes of the compressed pages ÷ [`compressed_size`](Self::compressed_size), 0 if none
    /// (`compression-rate`).
    pub compression_rate: f64,
}

/// What the destination reports once the guest runs.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct ReceiveReport {
    /// Milliseconds from the first connection to the acknowledgement (`total-time`).
    pub total_time: u64,
    /// Bytes received over all connections (`transferred`).
    pub transferred: u64,
    /// Pages received with contents (`normal`).
    pub normal: u64,
    /// Pages received as zero markers (`duplicate`).
    pub duplicate: u64,
    /// Rounds received, the bulk pass and the final round included.
    pub rounds: u64,
    /// Connections used.
    pub connections: usize,
    /// Device sections received and restored.
    pub devices: usize,
    /// How the source asked for the memory to be checked (`verify`).
    pub verify: crate::Verify,
    /// Milliseconds spent checking the memory digests (`hash-check-time`).
    pub hash_check_time: u64,
    /// Milliseconds from resuming the guest to the end of the memory check (background mode;
    /// 0 otherwise; `verify-after-resume-time`).
    pub verify_after_resume_time: u64,
    /// Milliseconds from the sender's `Prepare` to the guest running (`resume-time`).
    pub resume_time: u64,
    /// Set when the guest runs here but the end of the migration could not be confirmed with
    /// the source (the link failed after `Commit`): the source then keeps its paused copy and
    /// reports the outcome as unknown; with background verification the memory was not
    /// checked (`warning`).
    pub warning: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keys(v: serde_json::Value) -> Vec<String> {
        let mut keys: Vec<String> = v.as_object().unwrap().keys().cloned().collect();
        keys.sort();
        keys
    }

    #[test]
    fn migration_stats_use_qemu_names() {
        let v = serde_json::to_value(MigrationStats::default()).unwrap();
        let mut want = [
            "total-time",
            "setup-time",
            "downtime",
            "transferred",
            "remaining",
            "duplicate",
            "normal",
            "dirty-pages-rate",
            "mbps",
            "dirty-sync-count",
            "expected-downtime",
        ];
        want.sort();
        assert_eq!(keys(v), want);
    }

    #[test]
    fn round_stats_serialise_kebab_case() {
        let round = RoundStats {
            round: 3,
            dirty_pages: 10,
            sent_pages: 7,
            zero_pages: 3,
            unpopulated_pages: 0,
            harvest_time_us: 120,
            send_time_us: 900,
            mbps: 1.5,
        };
        let v = serde_json::to_value(round).unwrap();
        assert_eq!(v["dirty-pages"], 10);
        assert_eq!(v["harvest-time-us"], 120);
        assert_eq!(v["mbps"], 1.5);
        let mut want = [
            "round",
            "dirty-pages",
            "sent-pages",
            "zero-pages",
            "unpopulated-pages",
            "harvest-time-us",
            "send-time-us",
            "mbps",
        ];
        want.sort();
        assert_eq!(keys(v), want);
    }
}
