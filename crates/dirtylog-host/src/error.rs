//! Errors of the host-memory tracker. Every failed system call names the operation and carries
//! the kernel's errno; refusals made before any system call have their own variants.

/// A host-memory tracker error.
#[derive(Debug, thiserror::Error)]
pub enum HostError {
    /// A system call failed.
    #[error("{op} failed: {source}")]
    Sys {
        /// The operation (`"UFFDIO_REGISTER"`, `"PAGEMAP_SCAN"`, `"mprotect"`, ...).
        op: &'static str,
        /// The kernel's error.
        #[source]
        source: std::io::Error,
    },
}

impl HostError {
    /// The errno of the last system call, for `op`.
    pub(crate) fn last_os(op: &'static str) -> Self {
        HostError::Sys {
            op,
            source: std::io::Error::last_os_error(),
        }
    }

    /// The errno, if this error came from a system call.
    pub fn errno(&self) -> Option<i32> {
        match self {
            HostError::Sys { source, .. } => source.raw_os_error(),
        }
    }
}
