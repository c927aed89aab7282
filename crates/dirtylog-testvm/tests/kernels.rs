//! The embedded test kernels are loadable Multiboot v1 ELF32 images (no VMM, no KVM needed).

use dirtylog_testvm::kernels::{self, Kernel, ALL, WORKING_SET_BASE};

const MB_HEADER_MAGIC: u32 = 0x1BAD_B002;
const PT_LOAD: u32 = 1;

fn u16_at(b: &[u8], off: usize) -> u16 {
    u16::from_le_bytes(b[off..off + 2].try_into().unwrap())
}

fn u32_at(b: &[u8], off: usize) -> u32 {
    u32::from_le_bytes(b[off..off + 4].try_into().unwrap())
}

/// `(p_offset, p_paddr, p_filesz, p_memsz)` of every `PT_LOAD` program header.
fn loads(k: &Kernel) -> Vec<(u32, u32, u32, u32)> {
    let elf = k.elf;
    let phoff = u32_at(elf, 28) as usize;
    let phentsize = u16_at(elf, 42) as usize;
    let phnum = u16_at(elf, 44) as usize;
    assert_eq!(phentsize, 32, "{}: e_phentsize", k.name);
    (0..phnum)
        .map(|i| phoff + i * phentsize)
        .filter(|&ph| u32_at(elf, ph) == PT_LOAD)
        .map(|ph| {
            (
                u32_at(elf, ph + 4),
                u32_at(elf, ph + 12),
                u32_at(elf, ph + 16),
                u32_at(elf, ph + 20),
            )
        })
        .collect()
}

#[test]
fn names_are_the_api_and_unique() {
    let names: Vec<&str> = ALL.iter().map(|k| k.name).collect();
    assert_eq!(
        names,
        ["info", "echo", "smp", "memtest", "spin", "halt"],
        "kernel names are an API"
    );
    for k in ALL {
        assert_eq!(kernels::by_name(k.name), Some(k));
        assert!(!k.description.is_empty(), "{}: description", k.name);
    }
    assert_eq!(kernels::by_name("nope"), None);
}

#[test]
fn every_kernel_is_an_elf32_i386_executable() {
    for k in ALL {
        let elf = k.elf;
        assert!(elf.len() > 52, "{}: too short", k.name);
        assert_eq!(&elf[..4], b"\x7fELF", "{}: ELF magic", k.name);
        assert_eq!(elf[4], 1, "{}: ELFCLASS32", k.name);
        assert_eq!(elf[5], 1, "{}: little endian", k.name);
        assert_eq!(u16_at(elf, 16), 2, "{}: ET_EXEC", k.name);
        assert_eq!(u16_at(elf, 18), 3, "{}: EM_386", k.name);
        let entry = u32_at(elf, 24);
        let segs = loads(k);
        assert!(!segs.is_empty(), "{}: no PT_LOAD", k.name);
        for &(off, paddr, filesz, memsz) in &segs {
            assert!(filesz <= memsz, "{}: filesz > memsz", k.name);
            assert!(
                (off as usize) + (filesz as usize) <= elf.len(),
                "{}: segment past the end of the file",
                k.name
            );
            // Loaded at 1 MiB, entirely below the working sets at 4 MiB.
            assert!(paddr >= 0x10_0000, "{}: segment below 1 MiB", k.name);
            assert!(
                u64::from(paddr) + u64::from(memsz) <= WORKING_SET_BASE,
                "{}: image reaches the working set",
                k.name
            );
        }
        assert!(
            segs.iter().any(|&(_, p, f, _)| entry >= p && entry < p + f),
            "{}: entry {entry:#x} outside the loaded code",
            k.name
        );
    }
}

#[test]
fn every_kernel_has_a_valid_multiboot_header_in_its_first_8k() {
    for k in ALL {
        let window = &k.elf[..k.elf.len().min(8192)];
        let header = (0..window.len().saturating_sub(11))
            .step_by(4)
            .find(|&off| u32_at(window, off) == MB_HEADER_MAGIC)
            .unwrap_or_else(|| panic!("{}: no Multiboot magic in the first 8 KiB", k.name));
        let flags = u32_at(window, header + 4);
        let checksum = u32_at(window, header + 8);
        assert_eq!(
            MB_HEADER_MAGIC.wrapping_add(flags).wrapping_add(checksum),
            0,
            "{}: Multiboot checksum",
            k.name
        );
        // Page-aligned modules and memory information requested; ELF layout (no a.out kludge).
        assert_eq!(flags, 0x3, "{}: Multiboot flags", k.name);
        // The header is loaded: it lies in the file range of a PT_LOAD segment.
        assert!(
            loads(k).iter().any(|&(off, _, filesz, _)| {
                header >= off as usize && header + 12 <= (off + filesz) as usize
            }),
            "{}: Multiboot header not in a loaded segment",
            k.name
        );
    }
}

#[test]
fn write_to_writes_every_image() {
    let dir = std::env::temp_dir().join(format!("dirtylog-kernels-test-{}", std::process::id()));
    let paths = kernels::write_to(&dir).expect("write kernels");
    assert_eq!(paths.len(), ALL.len());
    for (path, k) in paths.iter().zip(ALL) {
        assert_eq!(path, &dir.join(format!("{}.elf", k.name)));
        assert_eq!(std::fs::read(path).expect("read back"), k.elf);
    }
    std::fs::remove_dir_all(&dir).expect("clean up");
}
