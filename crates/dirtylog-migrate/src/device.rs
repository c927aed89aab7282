//! Device state: named, versioned, opaque sections that travel at switchover, after the vCPU
//! states ([`Message::Device`](crate::wire::Message::Device) on the wire).
//!
//! The engine does not look inside a section. A source's [`DeviceState::save_devices`] lists
//! them once the guest is paused; the destination validates each (name, length, no
//! duplicates) and hands it to its target's [`DeviceState::restore_device`] before the memory
//! hashes are checked and the guest resumes. A target that does not know a section's name (or
//! version) fails the migration, and the source resumes its guest.

use crate::error::VmError;
use crate::wire::{check_device, WireError};

/// One device's saved state: a name (1 to [`MAX_DEVICE_NAME`](crate::wire::MAX_DEVICE_NAME)
/// bytes of ASCII letters, digits and `-_.:/`), a version the device defines, and up to
/// [`MAX_DEVICE_STATE`](crate::wire::MAX_DEVICE_STATE) bytes. Validated when built, so a
/// source cannot produce a section the destination would refuse.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeviceSection {
    name: String,
    version: u32,
    bytes: Vec<u8>,
}

impl DeviceSection {
    /// A section, after checking the name and the length.
    ///
    /// ```
    /// use dirtylog_migrate::DeviceSection;
    ///
    /// let uart = DeviceSection::new("serial0", 1, vec![0x60, 0x03]).unwrap();
    /// assert_eq!((uart.name(), uart.version(), uart.bytes()), ("serial0", 1, &[0x60, 0x03][..]));
    /// assert!(DeviceSection::new("no spaces", 1, Vec::new()).is_err());
    /// ```
    pub fn new(name: impl Into<String>, version: u32, bytes: Vec<u8>) -> Result<Self, WireError> {
        let name = name.into();
        check_device(name.as_bytes(), bytes.len())?;
        Ok(DeviceSection {
            name,
            version,
            bytes,
        })
    }

    /// The device's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The version of the state's format.
    pub fn version(&self) -> u32 {
        self.version
    }

    /// The state.
    pub fn bytes(&self) -> &[u8] {
        &self.bytes
    }
}

/// The devices of a VM. Both methods default to a VM with no devices: a source that sends
/// none, a target that accepts none.
pub trait DeviceState: Sync {
    /// Source: every device's state, saved while the guest is paused (called once, after
    /// the vCPU states). Names must be unique. The default sends none.
    fn save_devices(&self) -> Result<Vec<DeviceSection>, VmError> {
        Ok(Vec::new())
    }

    /// Target: load the state of device `name`, in format `version`. Called once per
    /// section, in the source's order, before the guest resumes. Fail for a name or a
    /// version this VM does not know: the migration then fails, and the source resumes.
    /// The default knows no device.
    fn restore_device(&self, name: &str, version: u32, bytes: &[u8]) -> Result<(), VmError> {
        let _ = bytes;
        Err(format!("this VM has no device named {name:?} (state version {version})").into())
    }
}
