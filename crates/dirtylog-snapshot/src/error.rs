//! The errors of snapshot creation, checking and restore: each names the member or file at
//! fault and says what to do.

use std::io;
use std::path::{Path, PathBuf};

use dirtylog_migrate::VmError;

/// Why a snapshot operation failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SnapshotError {
    /// A member of a chain is missing, unreadable, corrupted or does not belong to the chain.
    #[error("snapshot member {}: {why}", path.display())]
    Member {
        /// The member's directory.
        path: PathBuf,
        /// What is wrong with it, and what to do.
        why: String,
    },
    /// An I/O operation failed.
    #[error("{op} {}: {source}", path.display())]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// What was being done: `create`, `write`, `fsync`, `rename`, ...
        op: &'static str,
        /// The error.
        #[source]
        source: io::Error,
    },
    /// The file system is full (`ENOSPC`, `EDQUOT`): the new member was removed, the earlier
    /// members are intact.
    #[error(
        "no space left on the device writing {}: the new snapshot was discarded, earlier ones \
         are intact; free some space and take it again",
        path.display()
    )]
    DiskFull {
        /// The file being written.
        path: PathBuf,
    },
    /// The VM failed an operation.
    #[error("VM {op} failed: {source}")]
    Vm {
        /// The operation: `pause`, `harvest`, ...
        op: &'static str,
        /// The VM's error.
        #[source]
        source: VmError,
    },
    /// The request is not usable as given.
    #[error("{0}")]
    Usage(String),
    /// The memory written does not match the guest's (a write the tracker missed), or the
    /// restored memory does not match the chain's record.
    #[error(
        "memory hash mismatch in slot {slot} {at}: expected {expected:#018x}, found {actual:#018x}"
    )]
    HashMismatch {
        /// The region's slot.
        slot: u32,
        /// Where: `after restore`, `at the snapshot point`, ...
        at: String,
        /// What the record says.
        expected: u64,
        /// What the memory holds.
        actual: u64,
    },
    /// A part of the crate not built yet.
    #[error("{0} are not built yet")]
    NotBuilt(&'static str),
}

impl SnapshotError {
    /// An I/O error on `path`; `ENOSPC` and `EDQUOT` become [`SnapshotError::DiskFull`].
    pub fn io(op: &'static str, path: &Path, source: io::Error) -> Self {
        match source.raw_os_error() {
            Some(libc::ENOSPC) | Some(libc::EDQUOT) => SnapshotError::DiskFull {
                path: path.to_path_buf(),
            },
            _ => SnapshotError::Io {
                path: path.to_path_buf(),
                op,
                source,
            },
        }
    }

    /// A problem with the member at `path`.
    pub fn member(path: &Path, why: impl Into<String>) -> Self {
        SnapshotError::Member {
            path: path.to_path_buf(),
            why: why.into(),
        }
    }

    /// A closure mapping a VM error of operation `op`.
    pub fn vm(op: &'static str) -> impl FnOnce(VmError) -> SnapshotError {
        move |source| SnapshotError::Vm { op, source }
    }

    /// Is this a full disk?
    pub fn is_disk_full(&self) -> bool {
        matches!(self, SnapshotError::DiskFull { .. })
    }
}
