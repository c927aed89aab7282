//! dirtylog's own Multiboot v1 test kernels, built from `kernels/*.S` by `build.rs` (GNU `gcc
//! -m32 -c` and `ld -m elf_i386`, no network) and embedded here as ELF32 images.
//!
//! Each kernel runs in 32-bit protected mode with paging off, loaded at 1 MiB, with its own GDT
//! and stack, on the minimal PC of `dirtylog run --kernel` or QEMU's `-kernel`: COM1 at 0x3f8,
//! isa-debug-exit at 0xf4 (exit status `code << 1 | 1`), fw_cfg at 0x510/0x511, the xAPIC and
//! the PIT. Their command-line options and exact output lines are in `kernels/README.md` and at
//! the top of each source file; `kernels/qemu_run.sh` runs one under QEMU.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

/// One of the project's test kernels.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Kernel {
    /// The kernel's name (its API name and the stem of its file, `NAME.elf`).
    pub name: &'static str,
    /// What it does, in one line.
    pub description: &'static str,
    /// The Multiboot v1 ELF32 image.
    pub elf: &'static [u8],
}

/// Guest-physical address where `memtest` and `spin` place their working sets (`mb=N` MiB from
/// here); a VMM keeps the Multiboot info, command line and module below it.
pub const WORKING_SET_BASE: u64 = 0x40_0000;

/// Guest-physical page that `smp` overwrites with its AP trampoline (SIPI vector 0x07), after
/// it has read the Multiboot info.
pub const AP_TRAMPOLINE: u64 = 0x7000;

macro_rules! kernel {
    ($name:literal, $description:literal) => {
        Kernel {
            name: $name,
            description: $description,
            elf: include_bytes!(concat!(env!("OUT_DIR"), "/", $name, ".elf")),
        }
    };
}

/// Every test kernel.
pub const ALL: &[Kernel] = &[
    kernel!(
        "info",
        "prints the Multiboot command line, memory sizes, memory map count, fw_cfg CPUs and RAM \
         and the module, then exits with exit=N"
    ),
    kernel!(
        "echo",
        "prints `echo ready`, echoes every byte received on COM1, exits 0 after a `q`"
    ),
    kernel!(
        "smp",
        "wakes every AP (fw_cfg CPU count) with INIT-SIPI-SIPI, each prints `cpu ID up`; exits 0 \
         when all are up, 1 on timeout"
    ),
    kernel!(
        "memtest",
        "kvm-unit-tests-style memory pattern checker across migrations \
         (mode=request|continuous|passes mb=N rounds=N step=N), exits 0 on PASS"
    ),
    kernel!(
        "spin",
        "prints `spin`, then increments one dword per page of mb=N MiB forever, no I/O, \
         interrupts off"
    ),
    kernel!("halt", "prints `halt`, then cli; hlt forever"),
];

/// The kernel called `name`, if there is one.
pub fn by_name(name: &str) -> Option<&'static Kernel> {
    ALL.iter().find(|k| k.name == name)
}

/// Writes every kernel to `dir/NAME.elf` (creating `dir` if needed); returns the paths written,
/// in the order of [`ALL`].
pub fn write_to(dir: &Path) -> io::Result<Vec<PathBuf>> {
    fs::create_dir_all(dir)?;
    ALL.iter()
        .map(|k| {
            let path = dir.join(format!("{}.elf", k.name));
            fs::write(&path, k.elf)?;
            Ok(path)
        })
        .collect()
}
