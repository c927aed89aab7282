//! What the running kernel's KVM offers for dirty tracking, probed with `KVM_CHECK_EXTENSION`
//! on a scratch VM (the ring capabilities are per VM), for `dirtylog caps [--json]`.

use std::fmt::Write as _;

use kvm_ioctls::Kvm;
use serde::Serialize;

use crate::error::{Error, Result};
use crate::sys::{self, RingFlavor};
use crate::vm::{open_kvm, KvmVm};

/// The dirty-tracking capabilities of this kernel.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Caps {
    /// `KVM_GET_API_VERSION` (always 12).
    pub api_version: i32,
    /// Host page size in bytes (ring offset and minimum ring size use it).
    pub host_page_size: u64,
    /// `KVM_CAP_MANUAL_DIRTY_LOG_PROTECT` (166, obsolete: do not use).
    pub manual_dirty_log_protect_v1: i64,
    /// `KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2` (168): the bitmask of supported modes
    /// (1 = MANUAL_PROTECT_ENABLE, 2 = INITIALLY_SET).
    pub manual_dirty_log_protect2: i64,
    /// `KVM_CAP_DIRTY_LOG_RING` (192): maximum ring size in bytes, 0 if absent.
    pub dirty_log_ring_bytes: i64,
    /// `KVM_CAP_DIRTY_LOG_RING_ACQ_REL` (223): maximum ring size in bytes, 0 if absent.
    pub dirty_log_ring_acq_rel_bytes: i64,
    /// `KVM_CAP_DIRTY_LOG_RING_WITH_BITMAP` (225).
    pub dirty_log_ring_with_bitmap: i64,
    /// `KVM_CAP_NR_MEMSLOTS`: memslots per address space (`KVM_USER_MEM_SLOTS`).
    pub nr_memslots: i64,
    /// `KVM_CAP_MULTI_ADDRESS_SPACE`: number of address spaces (0 means 1).
    pub multi_address_space: i64,
    /// `KVM_CAP_NR_VCPUS`: recommended vCPU count.
    pub nr_vcpus: i64,
    /// `KVM_CAP_MAX_VCPUS`.
    pub max_vcpus: i64,
    /// `KVM_CAP_READONLY_MEM`.
    pub readonly_mem: i64,
    /// `KVM_CAP_USER_MEMORY2`.
    pub user_memory2: i64,
}

impl Caps {
    /// Probe `/dev/kvm`.
    pub fn probe() -> Result<Self> {
        Self::probe_with(open_kvm(None)?)
    }

    /// Probe through an open KVM system fd (creates and drops a scratch VM).
    pub fn probe_with(kvm: Kvm) -> Result<Self> {
        let api_version = kvm.get_api_version();
        let vm = KvmVm::with_kvm(kvm)?;
        let c = |cap| vm.check_extension(cap);
        Ok(Caps {
            api_version,
            host_page_size: sys::host_page_size(),
            manual_dirty_log_protect_v1: c(sys::KVM_CAP_MANUAL_DIRTY_LOG_PROTECT)?,
            manual_dirty_log_protect2: c(sys::KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2)?,
            dirty_log_ring_bytes: c(sys::KVM_CAP_DIRTY_LOG_RING)?,
            dirty_log_ring_acq_rel_bytes: c(sys::KVM_CAP_DIRTY_LOG_RING_ACQ_REL)?,
            dirty_log_ring_with_bitmap: c(sys::KVM_CAP_DIRTY_LOG_RING_WITH_BITMAP)?,
            nr_memslots: c(sys::KVM_CAP_NR_MEMSLOTS)?,
            multi_address_space: c(sys::KVM_CAP_MULTI_ADDRESS_SPACE)?,
            nr_vcpus: c(sys::KVM_CAP_NR_VCPUS)?,
            max_vcpus: c(sys::KVM_CAP_MAX_VCPUS)?,
            readonly_mem: c(sys::KVM_CAP_READONLY_MEM)?,
            user_memory2: c(sys::KVM_CAP_USER_MEMORY2)?,
        })
    }

    /// Is `KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE` offered?
    pub fn manual_protect(&self) -> bool {
        self.manual_dirty_log_protect2 as u64 & sys::KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE != 0
    }

    /// Is `KVM_DIRTY_LOG_INITIALLY_SET` offered?
    pub fn initially_set(&self) -> bool {
        self.manual_dirty_log_protect2 as u64 & sys::KVM_DIRTY_LOG_INITIALLY_SET != 0
    }

    /// Address spaces (`KVM_CAP_MULTI_ADDRESS_SPACE`, at least 1).
    pub fn address_spaces(&self) -> u16 {
        self.multi_address_space.clamp(1, u16::MAX as i64) as u16
    }

    /// The ring flavour to use (ACQ_REL preferred) and its maximum entries, or an error naming
    /// the missing capability.
    pub fn require_ring(&self) -> Result<(RingFlavor, u32)> {
        let entries = |b: i64| (b as u64 / dirtylog::ring::DIRTY_GFN_BYTES as u64) as u32;
        if self.dirty_log_ring_acq_rel_bytes > 0 {
            Ok((
                RingFlavor::AcqRel,
                entries(self.dirty_log_ring_acq_rel_bytes),
            ))
        } else if self.dirty_log_ring_bytes > 0 {
            Ok((RingFlavor::Plain, entries(self.dirty_log_ring_bytes)))
        } else {
            Err(Error::Unsupported {
                what: "dirty ring",
                cap: "KVM_CAP_DIRTY_LOG_RING",
                value: self.dirty_log_ring_bytes,
            })
        }
    }

    /// Check that manual protect (and `INITIALLY_SET` if asked) is offered.
    pub fn require_manual_protect(&self, initially_set: bool) -> Result<()> {
        let ok = self.manual_protect() && (!initially_set || self.initially_set());
        if ok {
            return Ok(());
        }
        Err(Error::Unsupported {
            what: if initially_set {
                "manual dirty-log protect with INITIALLY_SET"
            } else {
                "manual dirty-log protect"
            },
            cap: "KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2",
            value: self.manual_dirty_log_protect2,
        })
    }

    /// A core [`dirtylog::VmConfig`] with this kernel's limits, so the core and `/dev/kvm` can
    /// be compared input for input.
    pub fn vm_config(&self) -> dirtylog::VmConfig {
        dirtylog::VmConfig {
            page_size: self.host_page_size,
            nr_as: self.address_spaces(),
            max_slots: self.nr_memslots.clamp(0, u16::MAX as i64) as u16,
            ring_supported: self.require_ring().is_ok(),
        }
    }

    /// A human-readable table: capability, value, meaning.
    pub fn table(&self) -> String {
        let yes = |b: bool| if b { "yes" } else { "no" };
        let ring = |b: i64| {
            if b > 0 {
                format!("{} entries ({} KiB) max", b / 16, b / 1024)
            } else {
                "not supported".to_string()
            }
        };
        let rows: Vec<(&str, String, String)> = vec![
            (
                "KVM_GET_API_VERSION",
                self.api_version.to_string(),
                String::new(),
            ),
            (
                "host page size",
                self.host_page_size.to_string(),
                "bytes; ring mmap offset is 64 pages".into(),
            ),
            (
                "KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2",
                self.manual_dirty_log_protect2.to_string(),
                format!(
                    "manual protect: {}, INITIALLY_SET: {}",
                    yes(self.manual_protect()),
                    yes(self.initially_set())
                ),
            ),
            (
                "KVM_CAP_MANUAL_DIRTY_LOG_PROTECT",
                self.manual_dirty_log_protect_v1.to_string(),
                "obsolete, do not use".into(),
            ),
            (
                "KVM_CAP_DIRTY_LOG_RING",
                self.dirty_log_ring_bytes.to_string(),
                ring(self.dirty_log_ring_bytes),
            ),
            (
                "KVM_CAP_DIRTY_LOG_RING_ACQ_REL",
                self.dirty_log_ring_acq_rel_bytes.to_string(),
                ring(self.dirty_log_ring_acq_rel_bytes),
            ),
            (
                "KVM_CAP_DIRTY_LOG_RING_WITH_BITMAP",
                self.dirty_log_ring_with_bitmap.to_string(),
                yes(self.dirty_log_ring_with_bitmap > 0).into(),
            ),
            (
                "KVM_CAP_NR_MEMSLOTS",
                self.nr_memslots.to_string(),
                "memslots per address space".into(),
            ),
            (
                "KVM_CAP_MULTI_ADDRESS_SPACE",
                self.multi_address_space.to_string(),
                "address spaces".into(),
            ),
            (
                "KVM_CAP_NR_VCPUS",
                self.nr_vcpus.to_string(),
                "recommended vCPUs".into(),
            ),
            (
                "KVM_CAP_MAX_VCPUS",
                self.max_vcpus.to_string(),
                String::new(),
            ),
            (
                "KVM_CAP_READONLY_MEM",
                self.readonly_mem.to_string(),
                yes(self.readonly_mem > 0).into(),
            ),
            (
                "KVM_CAP_USER_MEMORY2",
                self.user_memory2.to_string(),
                yes(self.user_memory2 > 0).into(),
            ),
        ];
        let w0 = rows.iter().map(|r| r.0.len()).max().unwrap_or(0);
        let w1 = rows.iter().map(|r| r.1.len()).max().unwrap_or(0);
        let mut s = String::new();
        for (k, v, m) in rows {
            let _ = writeln!(s, "{k:<w0$}  {v:>w1$}  {m}");
        }
        let _ = writeln!(
            s,
            "dirty-log modes: dirty-log yes, clear-log {}, dirty-ring {}",
            yes(self.manual_protect() && self.initially_set()),
            match self.require_ring() {
                Ok((f, n)) => format!("yes ({f:?}, up to {n} entries)"),
                Err(e) => format!("no: {e}"),
            }
        );
        s
    }

    /// JSON (pretty).
    pub fn json(&self) -> String {
        serde_json::to_string_pretty(self).unwrap_or_else(|e| format!("{{\"error\": \"{e}\"}}"))
    }
}

/// `dirtylog caps [--json]`: probe `/dev/kvm` and render the result.
pub fn caps_report(json: bool) -> Result<String> {
    let c = Caps::probe()?;
    Ok(if json { c.json() } else { c.table() })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Caps {
        Caps {
            api_version: 12,
            host_page_size: 4096,
            manual_dirty_log_protect_v1: 3,
            manual_dirty_log_protect2: 3,
            dirty_log_ring_bytes: 0,
            dirty_log_ring_acq_rel_bytes: 0,
            dirty_log_ring_with_bitmap: 0,
            nr_memslots: 32764,
            multi_address_space: 2,
            nr_vcpus: 2,
            max_vcpus: 1024,
            readonly_mem: 1,
            user_memory2: 1,
        }
    }

    #[test]
    fn missing_ring_is_named() {
        let e = sample().require_ring().unwrap_err();
        assert_eq!(
            e.to_string(),
            "dirty ring not supported by this kernel (KVM_CAP_DIRTY_LOG_RING = 0)"
        );
        assert!(sample()
            .table()
            .contains("dirty-ring no: dirty ring not supported"));
    }

    #[test]
    fn ring_prefers_acq_rel() {
        let mut c = sample();
        c.dirty_log_ring_bytes = 1 << 20;
        c.dirty_log_ring_acq_rel_bytes = 1 << 20;
        assert_eq!(c.require_ring().unwrap(), (RingFlavor::AcqRel, 65536));
        c.dirty_log_ring_acq_rel_bytes = 0;
        assert_eq!(c.require_ring().unwrap(), (RingFlavor::Plain, 65536));
        let v: serde_json::Value = serde_json::from_str(&c.json()).unwrap();
        assert_eq!(v["dirty_log_ring_bytes"], 1 << 20);
    }
}
