//! A minimal PC for Multiboot v1 kernels, like QEMU's `-kernel` (its `microvm` machine is the
//! model): guests no one here wrote, run and migrated whatever they do.
//!
//! - [`multiboot`]: the ELF32 loader and the Multiboot information block.
//! - [`serial`], [`fw_cfg`], [`testdev`], [`pio`]: the port devices (COM1, fw_cfg, QEMU's
//!   pc-testdev, the exit port, PCI configuration answering "no device"; anything else logged
//!   once and ignored).
//! - [`bus`]: the devices on the vCPU threads ([`crate::runner::IoBus`]), and how the guest
//!   ended the machine.
//! - [`machine`]: the VM, its memory map, vCPUs and in-kernel irqchip and PIT ([`Pc`]).
//! - [`migrate`]: a PC as a migration source and target, with its full vCPU and device state.
//! - [`mod@run`]: running a kernel, migrating it on the guest's request or on a timer.

pub mod bus;
pub mod fw_cfg;
pub mod machine;
pub mod migrate;
pub mod multiboot;
pub mod pio;
pub mod run;
pub mod serial;
pub mod testdev;

pub use bus::PcExit;
pub use machine::{is_pc_stream, Console, Log, Pc, PcConfig};
pub use run::{
    run, MigrateMode, MigrationRecord, RunConfig, RunEnd, RunReport, SerialInput, Trigger,
};
