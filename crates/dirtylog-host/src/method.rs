//! [`HostMethod`]: how a host-memory tracker learns of writes.

use std::fmt;
use std::str::FromStr;

use serde::Serialize;

/// How writes to tracked host memory are learnt of, cheapest first.
///
/// ```
/// use dirtylog_host::HostMethod;
///
/// assert_eq!("sync".parse::<HostMethod>().unwrap(), HostMethod::Sync);
/// assert_eq!(HostMethod::Async.to_string(), "async");
/// assert!("soft-dirty".parse::<HostMethod>().is_err());
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum HostMethod {
    /// userfaultfd async write-protect (`UFFD_FEATURE_WP_ASYNC | WP_UNPOPULATED`) harvested
    /// with `PAGEMAP_SCAN`: the kernel resolves each first write itself (one minor fault) and
    /// one ioctl per region reads and re-protects the written pages atomically (Linux ≥ 6.7).
    Async,
    /// userfaultfd synchronous write-protect: each first write blocks its thread until a
    /// fault-handling thread records the page and lifts the protection (a context switch
    /// round trip per page; Linux ≥ 5.7).
    Sync,
    /// `mprotect(PROT_READ)` and a `SIGSEGV` handler that records the page and makes it
    /// writable (a signal delivery and an `mprotect` per page; works everywhere).
    Mprotect,
}

impl HostMethod {
    /// The three methods, in order of preference.
    pub const ALL: [HostMethod; 3] = [HostMethod::Async, HostMethod::Sync, HostMethod::Mprotect];

    /// The name, as on the command line.
    pub fn name(self) -> &'static str {
        match self {
            HostMethod::Async => "async",
            HostMethod::Sync => "sync",
            HostMethod::Mprotect => "mprotect",
        }
    }
}

impl fmt::Display for HostMethod {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Why a method name did not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown host method {0:?}: use async, sync or mprotect")]
pub struct ParseHostMethodError(String);

impl FromStr for HostMethod {
    type Err = ParseHostMethodError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        HostMethod::ALL
            .into_iter()
            .find(|m| m.name() == s)
            .ok_or_else(|| ParseHostMethodError(s.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        for m in HostMethod::ALL {
            assert_eq!(m.to_string().parse::<HostMethod>(), Ok(m));
        }
        assert!("".parse::<HostMethod>().is_err());
        assert!("Async".parse::<HostMethod>().is_err());
    }
}
