//! A Multiboot v1 loader, as QEMU's `-kernel` does it for a Multiboot image
//! (`hw/i386/multiboot.c`), computed without touching guest memory: [`load`] returns the
//! bytes to write and ranges to zero, the entry point and the info block's address.
//!
//! # What it does
//!
//! - Finds the Multiboot header (magic `0x1BADB002`, 4-byte aligned, wholly within the
//!   file's first 8192 bytes, with `magic + flags + checksum == 0`).
//! - Loads an ELF32 little-endian executable (`EM_386`; `EM_X86_64` is accepted when the
//!   file is `ELFCLASS32`): every `PT_LOAD` segment's file bytes go to its physical address
//!   (`p_paddr`), the rest of its memory size is zeroed (bss). As QEMU does, an entry point
//!   inside an executable segment linked at a virtual address other than its physical one is
//!   translated to the physical address.
//! - Or, when header flag bit 16 is set (the "a.out kludge"), loads the file by the header's
//!   address fields (`header_addr`, `load_addr`, `load_end_addr`, `bss_end_addr`,
//!   `entry_addr`), as QEMU does even for ELF files.
//! - Refuses images that would land in page 0, in the legacy hole `[0x9fc00, 0x100000)`
//!   (EBDA, VGA, option ROMs and BIOS), beyond RAM below 4 GiB, or on themselves.
//! - Places the one optional module page-aligned after the highest loaded byte, then, from
//!   the next page, the Multiboot information block, the memory map, the module list and the
//!   strings (kernel command line, module command line, boot loader name `"dirtylog"`).
//!   All of it must fit below the end of RAM under 4 GiB.
//!
//! The info block's flags are MEM | CMDLINE | MODS (when a module is given) | MMAP |
//! BOOT_LOADER_NAME; `mem_lower` is 639 KiB, `mem_upper` the RAM from 1 MiB to the end of
//! RAM below 4 GiB in KiB, and the memory map is: `[0, 0x9fc00)` available,
//! `[0x9fc00, 0xa0000)` and `[0xf0000, 0x100000)` reserved, `[0x100000, below_4g)` available,
//! and `[4 GiB, 4 GiB + ram - below_4g)` available when RAM extends above the hole.
//!
//! # What it does not do
//!
//! No video mode (header flag bit 2 is accepted and ignored, as QEMU does, with a
//! warning), no boot device, no ELF section headers or a.out symbols in the info block, no
//! APM or drive tables, and only one module. Header flag bits 3-15 ("required" features
//! this loader does not know) are ignored with a warning, as QEMU ignores them. Entering the
//! kernel (32-bit protected mode, paging off, flat segments, `EAX` = [`BOOTLOADER_MAGIC`],
//! `EBX` = [`BootImage::info_addr`]) is the machine's job.

/// The magic a Multiboot header starts with.
pub const HEADER_MAGIC: u32 = 0x1BAD_B002;
/// The value the loader leaves in `EAX` for the kernel.
pub const BOOTLOADER_MAGIC: u32 = 0x2BAD_B002;
/// The header must lie wholly within this many bytes from the start of the file.
pub const HEADER_SEARCH_LIMIT: usize = 8192;

/// Header flag: align modules on 4 KiB pages (always done).
pub const HEADER_PAGE_ALIGN: u32 = 1 << 0;
/// Header flag: memory information required (always given).
pub const HEADER_MEMORY_INFO: u32 = 1 << 1;
/// Header flag: video mode information required (not given).
pub const HEADER_VIDEO_MODE: u32 = 1 << 2;
/// Header flag: the address fields are valid and used instead of the ELF headers.
pub const HEADER_AOUT_KLUDGE: u32 = 1 << 16;

/// Info flag: `mem_lower` and `mem_upper` are valid.
pub const INFO_MEMORY: u32 = 1 << 0;
/// Info flag: `cmdline` is valid.
pub const INFO_CMDLINE: u32 = 1 << 2;
/// Info flag: `mods_count` and `mods_addr` are valid.
pub const INFO_MODS: u32 = 1 << 3;
/// Info flag: `mmap_length` and `mmap_addr` are valid.
pub const INFO_MEM_MAP: u32 = 1 << 6;
/// Info flag: `boot_loader_name` is valid.
pub const INFO_BOOT_LOADER_NAME: u32 = 1 << 9;

/// Size of the Multiboot information block.
pub const INFO_SIZE: u64 = 88;
/// Size of one memory map entry, including its leading `size` field (which holds 20).
pub const MMAP_ENTRY_SIZE: u64 = 24;
/// Size of one module list entry.
pub const MODULE_ENTRY_SIZE: u64 = 16;
/// Memory map type of usable RAM.
pub const MMAP_AVAILABLE: u32 = 1;
/// Memory map type of reserved memory.
pub const MMAP_RESERVED: u32 = 2;
/// The boot loader name given to the kernel.
pub const BOOT_LOADER_NAME: &str = "dirtylog";

/// `mem_lower` in KiB: conventional memory below the EBDA.
pub const MEM_LOWER_KIB: u32 = 639;
/// Start of the EBDA; the legacy hole below 1 MiB starts here.
pub const EBDA_START: u64 = 0x9fc00;
/// End of the legacy hole (start of "upper" memory).
pub const HIGH_MEMORY: u64 = 0x10_0000;
/// Start of the BIOS area, reserved in the memory map.
pub const BIOS_START: u64 = 0xf0000;
/// Start of RAM above the 4 GiB boundary.
pub const FOUR_GIB: u64 = 1 << 32;
/// Most RAM below the 4 GiB boundary (the PCI hole starts there).
pub const THREE_GIB: u64 = 3 << 30;

const PAGE_SIZE: u64 = 4096;
/// Lowest address a loaded byte may have (page 0 is never loaded).
const LOWEST_LOAD: u64 = 0x1000;

const EM_386: u16 = 3;
const EM_X86_64: u16 = 62;
const ET_EXEC: u16 = 2;
const PT_LOAD: u32 = 1;
const PF_X: u32 = 1;
const ELF32_EHDR_SIZE: usize = 52;
const ELF32_PHDR_SIZE: usize = 32;

/// How the loader places the image; built by the machine.
#[derive(Debug, Clone, Copy)]
pub struct LoadOptions<'a> {
    /// RAM size in bytes: `[0, below_4g_bytes)` and, if more, from 4 GiB on.
    pub ram_bytes: u64,
    /// RAM below the 4 GiB hole: `min(ram, 3 GiB)`.
    pub below_4g_bytes: u64,
    /// The kernel's command line: its path, a space, then `--append` (built by the caller).
    pub cmdline: &'a str,
    /// The module (initrd) bytes and its command line.
    pub module: Option<(&'a [u8], &'a str)>,
}

/// What to put in guest memory and where to start, from [`load`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BootImage {
    /// Entry point (physical address), for `EIP`.
    pub entry: u32,
    /// Address of the Multiboot information block, for `EBX`.
    pub info_addr: u32,
    /// Bytes to copy into guest memory: `(guest physical address, bytes)`; never empty,
    /// never overlapping each other or `zeroes`.
    pub writes: Vec<(u64, Vec<u8>)>,
    /// Ranges to zero: `(guest physical address, length)` (the segments' bss).
    pub zeroes: Vec<(u64, u64)>,
    /// End (exclusive) of the kernel's loaded bytes, bss included.
    pub kernel_end: u64,
    /// End (exclusive) of everything placed: kernel, module and the info area.
    pub image_end: u64,
    /// The module's `[start, end)` addresses, when one was given.
    pub module_range: Option<(u64, u64)>,
    /// What the loader ignored in the header (video mode request, unknown required flags).
    pub warnings: Vec<String>,
}

/// Why [`load`] refused an image.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MultibootError {
    /// The load options are inconsistent.
    #[error("invalid load options: {0}")]
    InvalidOptions(&'static str),
    /// No valid Multiboot header in the first 8192 bytes.
    #[error("no Multiboot header (magic 0x1BADB002 with a valid checksum, 4-byte aligned, within the first 8192 bytes)")]
    NoHeader,
    /// The image is not an ELF file and has no a.out kludge addresses.
    #[error("not an ELF file (and the Multiboot header has no address fields, flag bit 16)")]
    NotElf,
    /// An ELF file of a kind this loader does not load.
    #[error("unsupported ELF file: {0}")]
    UnsupportedElf(String),
    /// An ELF header field or table is malformed.
    #[error("malformed ELF file: {0}")]
    BadElf(String),
    /// The a.out kludge address fields are inconsistent with each other or the file.
    #[error("invalid Multiboot header addresses: {0}")]
    BadAddresses(&'static str),
    /// Nothing to load.
    #[error("the image has no loadable bytes")]
    NoLoadableSegment,
    /// A segment (or the a.out image) would land where the loader does not put anything.
    #[error("segment [{start:#x}, {end:#x}) {reason}")]
    BadPlacement {
        /// First address.
        start: u64,
        /// End address (exclusive).
        end: u64,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// Two segments overlap.
    #[error("segments [{a_start:#x}, {a_end:#x}) and [{b_start:#x}, {b_end:#x}) overlap")]
    Overlap {
        /// First segment's start.
        a_start: u64,
        /// First segment's end.
        a_end: u64,
        /// Second segment's start.
        b_start: u64,
        /// Second segment's end.
        b_end: u64,
    },
    /// The entry point is not in a loaded range.
    #[error("entry point {0:#x} is not inside the loaded image")]
    EntryOutsideImage(u64),
    /// A command line contains a NUL byte.
    #[error("the {0} command line contains a NUL byte")]
    NulInCmdline(&'static str),
    /// The module and info area do not fit below the end of RAM under 4 GiB.
    #[error(
        "no room for the {what}: it would end at {end:#x}, above RAM below 4 GiB ({limit:#x})"
    )]
    NoRoom {
        /// What did not fit.
        what: &'static str,
        /// Where it would end.
        end: u64,
        /// The limit.
        limit: u64,
    },
}

type Result<T> = std::result::Result<T, MultibootError>;

fn u16_at(b: &[u8], off: usize) -> Option<u16> {
    let s = b.get(off..off.checked_add(2)?)?;
    Some(u16::from_le_bytes([s[0], s[1]]))
}

fn u32_at(b: &[u8], off: usize) -> Option<u32> {
    let s = b.get(off..off.checked_add(4)?)?;
    Some(u32::from_le_bytes([s[0], s[1], s[2], s[3]]))
}

fn page_align(x: u64) -> Option<u64> {
    Some(x.checked_add(PAGE_SIZE - 1)? & !(PAGE_SIZE - 1))
}

/// A found Multiboot header.
#[derive(Debug, Clone, Copy)]
struct Header {
    offset: usize,
    flags: u32,
}

fn find_header(image: &[u8]) -> Option<Header> {
    let limit = image.len().min(HEADER_SEARCH_LIMIT);
    (0..limit)
        .step_by(4)
        .take_while(|&off| off + 12 <= limit)
        .find_map(|off| {
            let magic = u32_at(image, off)?;
            let flags = u32_at(image, off + 4)?;
            let checksum = u32_at(image, off + 8)?;
            (magic == HEADER_MAGIC && magic.wrapping_add(flags).wrapping_add(checksum) == 0)
                .then_some(Header { offset: off, flags })
        })
}

/// One range of the kernel to load: file bytes then zeroes.
#[derive(Debug, Clone, Copy)]
struct Segment<'a> {
    start: u64,
    data: &'a [u8],
    mem_size: u64,
}

impl Segment<'_> {
    fn end(&self) -> u64 {
        // Checked when the segment was made.
        self.start.saturating_add(self.mem_size)
    }
}

fn check_placement(start: u64, end: u64, below_4g: u64) -> Result<()> {
    let bad = |reason| Err(MultibootError::BadPlacement { start, end, reason });
    if start < LOWEST_LOAD {
        return bad("would be loaded in page 0");
    }
    if start < HIGH_MEMORY && end > EBDA_START {
        return bad("overlaps the legacy hole [0x9fc00, 0x100000)");
    }
    if end > below_4g {
        return bad("lies beyond RAM below 4 GiB");
    }
    Ok(())
}

fn elf_segments(image: &[u8]) -> Result<(Vec<Segment<'_>>, u64)> {
    let bad = |s: &str| MultibootError::BadElf(s.to_owned());
    if image.get(..4) != Some(b"\x7fELF".as_slice()) {
        return Err(MultibootError::NotElf);
    }
    if image.len() < ELF32_EHDR_SIZE {
        return Err(bad("file shorter than the ELF32 header"));
    }
    let (class, data) = (image[4], image[5]);
    if class != 1 {
        return Err(MultibootError::UnsupportedElf(format!(
            "ELF class {class} (only ELFCLASS32; objcopy -O elf32-i386 a 64-bit kernel)"
        )));
    }
    if data != 1 {
        return Err(MultibootError::UnsupportedElf(format!(
            "data encoding {data} (only little-endian)"
        )));
    }
    let e_type = u16_at(image, 16).ok_or_else(|| bad("header"))?;
    let machine = u16_at(image, 18).ok_or_else(|| bad("header"))?;
    if e_type != ET_EXEC {
        return Err(MultibootError::UnsupportedElf(format!(
            "type {e_type} (only ET_EXEC)"
        )));
    }
    if machine != EM_386 && machine != EM_X86_64 {
        return Err(MultibootError::UnsupportedElf(format!(
            "machine {machine} (only EM_386)"
        )));
    }
    let entry = u32_at(image, 24).ok_or_else(|| bad("header"))?;
    let phoff = u32_at(image, 28).ok_or_else(|| bad("header"))?;
    let phentsize = u16_at(image, 42).ok_or_else(|| bad("header"))?;
    let phnum = u16_at(image, 44).ok_or_else(|| bad("header"))?;
    if phnum == 0xffff {
        return Err(MultibootError::UnsupportedElf(
            "more than 65534 program headers (PN_XNUM)".into(),
        ));
    }
    let phentsize = usize::from(phentsize);
    if phnum > 0 && phentsize < ELF32_PHDR_SIZE {
        return Err(bad("program header entries smaller than 32 bytes"));
    }
    let phoff = usize::try_from(phoff).map_err(|_| bad("program header offset"))?;
    if phentsize
        .checked_mul(usize::from(phnum))
        .and_then(|n| n.checked_add(phoff))
        .is_none_or(|end| end > image.len())
    {
        return Err(bad("program header table beyond the end of the file"));
    }

    let mut segments = Vec::new();
    let mut entry_phys = u64::from(entry);
    for i in 0..usize::from(phnum) {
        // In the file: checked above.
        let ph = phoff + i * phentsize;
        let field = |k: usize| u32_at(image, ph + 4 * k).ok_or_else(|| bad("program header"));
        let (p_type, p_offset, p_vaddr, p_paddr) = (field(0)?, field(1)?, field(2)?, field(3)?);
        let (p_filesz, p_memsz, p_flags) = (field(4)?, field(5)?, field(6)?);
        if p_type != PT_LOAD || p_memsz == 0 {
            continue;
        }
        if p_filesz > p_memsz {
            return Err(MultibootError::BadElf(format!(
                "segment {i}: file size {p_filesz:#x} above memory size {p_memsz:#x}"
            )));
        }
        let off = usize::try_from(p_offset).map_err(|_| bad("segment offset"))?;
        let data = off
            .checked_add(usize::try_from(p_filesz).map_err(|_| bad("segment size"))?)
            .and_then(|end| image.get(off..end))
            .ok_or_else(|| {
                MultibootError::BadElf(format!(
                    "segment {i}: file bytes beyond the end of the file"
                ))
            })?;
        let start = u64::from(p_paddr);
        // Both u32: no overflow in u64.
        let mem_size = u64::from(p_memsz);
        segments.push(Segment {
            start,
            data,
            mem_size,
        });
        // QEMU's rule: the ELF entry is virtual; translate it when it falls in the file
        // bytes of an executable segment whose physical address differs.
        let (vaddr, e) = (u64::from(p_vaddr), u64::from(entry));
        if p_flags & PF_X != 0
            && p_vaddr != p_paddr
            && e >= vaddr
            && e < vaddr + u64::from(p_filesz)
        {
            entry_phys = e - vaddr + start;
        }
    }
    Ok((segments, entry_phys))
}

fn aout_segment(image: &[u8], header: Header) -> Result<(Segment<'_>, u64)> {
    let field = |k: usize| {
        u32_at(image, header.offset + 12 + 4 * k).ok_or(MultibootError::BadAddresses(
            "the header's address fields are beyond the end of the file",
        ))
    };
    if header.offset + 32 > HEADER_SEARCH_LIMIT {
        return Err(MultibootError::BadAddresses(
            "the header's address fields are beyond the first 8192 bytes",
        ));
    }
    let (header_addr, load_addr, load_end_addr, bss_end_addr, entry_addr) =
        (field(0)?, field(1)?, field(2)?, field(3)?, field(4)?);
    let into_header = header_addr
        .checked_sub(load_addr)
        .ok_or(MultibootError::BadAddresses("header_addr below load_addr"))?;
    let text_offset = usize::try_from(into_header)
        .ok()
        .and_then(|d| header.offset.checked_sub(d))
        .ok_or(MultibootError::BadAddresses(
            "header_addr - load_addr is beyond the header's file offset",
        ))?;
    let load_size = if load_end_addr != 0 {
        let size = load_end_addr
            .checked_sub(load_addr)
            .ok_or(MultibootError::BadAddresses(
                "load_end_addr below load_addr",
            ))?;
        usize::try_from(size).map_err(|_| MultibootError::BadAddresses("load size"))?
    } else {
        image.len() - text_offset
    };
    let data = text_offset
        .checked_add(load_size)
        .and_then(|end| image.get(text_offset..end))
        .ok_or(MultibootError::BadAddresses(
            "load_end_addr - load_addr goes beyond the end of the file",
        ))?;
    let start = u64::from(load_addr);
    let loaded_end = start + u64::try_from(load_size).unwrap_or(u64::MAX);
    let end = if bss_end_addr != 0 {
        let bss_end = u64::from(bss_end_addr);
        if bss_end < loaded_end {
            return Err(MultibootError::BadAddresses(
                "bss_end_addr below the end of the loaded bytes",
            ));
        }
        bss_end
    } else {
        loaded_end
    };
    Ok((
        Segment {
            start,
            data,
            mem_size: end - start,
        },
        u64::from(entry_addr),
    ))
}

/// A little-endian byte buffer for the info area, addressed by guest physical address.
struct Area {
    base: u64,
    bytes: Vec<u8>,
}

impl Area {
    fn put(&mut self, gpa: u64, data: &[u8]) {
        // Every caller's range was reserved when the area was laid out.
        let Some(off) = gpa
            .checked_sub(self.base)
            .and_then(|o| usize::try_from(o).ok())
        else {
            return;
        };
        if let Some(dst) = off
            .checked_add(data.len())
            .and_then(|end| self.bytes.get_mut(off..end))
        {
            dst.copy_from_slice(data);
        }
    }

    fn put32(&mut self, gpa: u64, v: u32) {
        self.put(gpa, &v.to_le_bytes());
    }
}

fn to_u32(x: u64) -> u32 {
    // Callers only pass addresses checked to be below 4 GiB.
    u32::try_from(x).unwrap_or(u32::MAX)
}

/// The memory map for `opts`, as `(base, length, type)`.
fn memory_map(opts: &LoadOptions) -> Vec<(u64, u64, u32)> {
    let mut map = vec![
        (0, EBDA_START, MMAP_AVAILABLE),
        (EBDA_START, 0xa0000 - EBDA_START, MMAP_RESERVED),
        (BIOS_START, HIGH_MEMORY - BIOS_START, MMAP_RESERVED),
    ];
    if opts.below_4g_bytes > HIGH_MEMORY {
        map.push((
            HIGH_MEMORY,
            opts.below_4g_bytes - HIGH_MEMORY,
            MMAP_AVAILABLE,
        ));
    }
    if opts.ram_bytes > opts.below_4g_bytes {
        map.push((
            FOUR_GIB,
            opts.ram_bytes - opts.below_4g_bytes,
            MMAP_AVAILABLE,
        ));
    }
    map
}

/// Lay out a Multiboot v1 `image` in guest memory; see the [module documentation](self).
/// Never panics, whatever the image.
pub fn load(image: &[u8], opts: &LoadOptions) -> Result<BootImage> {
    let below_4g = opts.below_4g_bytes;
    if below_4g > opts.ram_bytes {
        return Err(MultibootError::InvalidOptions(
            "RAM below 4 GiB larger than RAM",
        ));
    }
    if below_4g > THREE_GIB {
        return Err(MultibootError::InvalidOptions(
            "RAM below 4 GiB must end at or below 3 GiB",
        ));
    }
    if below_4g < 2 * HIGH_MEMORY {
        return Err(MultibootError::InvalidOptions(
            "at least 2 MiB of RAM is needed",
        ));
    }
    if opts.ram_bytes > below_4g && below_4g != THREE_GIB {
        return Err(MultibootError::InvalidOptions(
            "RAM above 4 GiB needs the RAM below 4 GiB to be 3 GiB",
        ));
    }
    if opts.cmdline.contains('\0') {
        return Err(MultibootError::NulInCmdline("kernel"));
    }
    if let Some((_, c)) = opts.module {
        if c.contains('\0') {
            return Err(MultibootError::NulInCmdline("module"));
        }
    }

    let header = find_header(image).ok_or(MultibootError::NoHeader)?;
    let mut warnings = Vec::new();
    if header.flags & HEADER_VIDEO_MODE != 0 {
        warnings.push("the kernel asks for a video mode (header flag bit 2); none is set".into());
    }
    let unknown = header.flags & 0xfff8;
    if unknown != 0 {
        warnings.push(format!(
            "the kernel requires features this loader does not know (header flags {unknown:#x}); ignored"
        ));
    }

    let (mut segments, entry) = if header.flags & HEADER_AOUT_KLUDGE != 0 {
        let (seg, entry) = aout_segment(image, header)?;
        (vec![seg], entry)
    } else {
        elf_segments(image)?
    };
    if segments.is_empty() {
        return Err(MultibootError::NoLoadableSegment);
    }
    for s in &segments {
        let end = s
            .start
            .checked_add(s.mem_size)
            .ok_or(MultibootError::BadPlacement {
                start: s.start,
                end: u64::MAX,
                reason: "wraps around",
            })?;
        check_placement(s.start, end, below_4g)?;
    }
    segments.sort_by_key(|s| s.start);
    for w in segments.windows(2) {
        if w[1].start < w[0].end() {
            return Err(MultibootError::Overlap {
                a_start: w[0].start,
                a_end: w[0].end(),
                b_start: w[1].start,
                b_end: w[1].end(),
            });
        }
    }
    if !segments.iter().any(|s| entry >= s.start && entry < s.end()) {
        return Err(MultibootError::EntryOutsideImage(entry));
    }
    let kernel_end = segments.iter().map(Segment::end).max().unwrap_or(0);

    let mut writes = Vec::new();
    let mut zeroes = Vec::new();
    for s in &segments {
        let file_len = u64::try_from(s.data.len()).unwrap_or(u64::MAX);
        if !s.data.is_empty() {
            writes.push((s.start, s.data.to_vec()));
        }
        if s.mem_size > file_len {
            zeroes.push((s.start + file_len, s.mem_size - file_len));
        }
    }

    let no_room = |what, end| MultibootError::NoRoom {
        what,
        end,
        limit: below_4g,
    };
    // kernel_end <= below_4g < 4 GiB, so the arithmetic below cannot overflow u64 except
    // through the module's length, which is checked.
    let mut cursor = page_align(kernel_end).ok_or(no_room("module", u64::MAX))?;
    let module_range = match opts.module {
        Some((bytes, _)) => {
            let len = u64::try_from(bytes.len()).unwrap_or(u64::MAX);
            let end = cursor.checked_add(len).ok_or(no_room("module", u64::MAX))?;
            if end > below_4g {
                return Err(no_room("module", end));
            }
            if !bytes.is_empty() {
                writes.push((cursor, bytes.to_vec()));
            }
            let range = (cursor, end);
            cursor = page_align(end).ok_or(no_room("module", u64::MAX))?;
            Some(range)
        }
        None => None,
    };

    // The info area: info block, memory map, module list, strings.
    let map = memory_map(opts);
    let info_addr = cursor;
    let mmap_addr = info_addr + INFO_SIZE;
    let map_len = MMAP_ENTRY_SIZE * u64::try_from(map.len()).unwrap_or(u64::MAX);
    let mods_addr = mmap_addr + map_len;
    let mods_len = if module_range.is_some() {
        MODULE_ENTRY_SIZE
    } else {
        0
    };
    let cmdline_addr = mods_addr + mods_len;
    let cmdline_len = u64::try_from(opts.cmdline.len())
        .ok()
        .and_then(|l| l.checked_add(1))
        .ok_or(no_room("command line", u64::MAX))?;
    let mod_cmdline_addr = cmdline_addr
        .checked_add(cmdline_len)
        .ok_or(no_room("command line", u64::MAX))?;
    let mod_cmdline_len = match opts.module {
        Some((_, c)) => u64::try_from(c.len())
            .ok()
            .and_then(|l| l.checked_add(1))
            .ok_or(no_room("module command line", u64::MAX))?,
        None => 0,
    };
    let name_addr = mod_cmdline_addr
        .checked_add(mod_cmdline_len)
        .ok_or(no_room("module command line", u64::MAX))?;
    let area_end = name_addr
        .checked_add(u64::try_from(BOOT_LOADER_NAME.len()).unwrap_or(u64::MAX) + 1)
        .ok_or(no_room("Multiboot information", u64::MAX))?;
    if area_end > below_4g {
        return Err(no_room("Multiboot information", area_end));
    }
    let area_len = usize::try_from(area_end - info_addr)
        .map_err(|_| no_room("Multiboot information", area_end))?;
    let mut area = Area {
        base: info_addr,
        bytes: vec![0; area_len],
    };

    let mut flags = INFO_MEMORY | INFO_CMDLINE | INFO_MEM_MAP | INFO_BOOT_LOADER_NAME;
    let mem_upper_kib = (below_4g - HIGH_MEMORY) / 1024;
    area.put32(info_addr + 4, MEM_LOWER_KIB);
    area.put32(info_addr + 8, to_u32(mem_upper_kib));
    area.put32(info_addr + 16, to_u32(cmdline_addr));
    if let Some((start, end)) = module_range {
        flags |= INFO_MODS;
        area.put32(info_addr + 20, 1);
        area.put32(info_addr + 24, to_u32(mods_addr));
        area.put32(mods_addr, to_u32(start));
        area.put32(mods_addr + 4, to_u32(end));
        area.put32(mods_addr + 8, to_u32(mod_cmdline_addr));
    }
    area.put32(info_addr + 44, to_u32(map_len));
    area.put32(info_addr + 48, to_u32(mmap_addr));
    area.put32(info_addr + 64, to_u32(name_addr));
    area.put32(info_addr, flags);
    let mut e = mmap_addr;
    for (base, len, ty) in map {
        area.put32(e, 20);
        area.put(e + 4, &base.to_le_bytes());
        area.put(e + 12, &len.to_le_bytes());
        area.put32(e + 20, ty);
        e += MMAP_ENTRY_SIZE;
    }
    // Strings: their NULs are the area's zero fill.
    area.put(cmdline_addr, opts.cmdline.as_bytes());
    if let Some((_, c)) = opts.module {
        area.put(mod_cmdline_addr, c.as_bytes());
    }
    area.put(name_addr, BOOT_LOADER_NAME.as_bytes());
    writes.push((info_addr, area.bytes));

    Ok(BootImage {
        entry: to_u32(entry),
        info_addr: to_u32(info_addr),
        writes,
        zeroes,
        kernel_end,
        image_end: area_end,
        module_range,
        warnings,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One segment for the ELF builder.
    struct Seg {
        paddr: u32,
        vaddr: u32,
        data: Vec<u8>,
        memsz: u32,
        flags: u32,
    }

    fn seg(paddr: u32, data: Vec<u8>, memsz: u32) -> Seg {
        Seg {
            paddr,
            vaddr: paddr,
            data,
            memsz,
            flags: 5,
        }
    }

    fn mb_header(flags: u32) -> Vec<u8> {
        let mut h = Vec::new();
        h.extend_from_slice(&HEADER_MAGIC.to_le_bytes());
        h.extend_from_slice(&flags.to_le_bytes());
        h.extend_from_slice(&(0u32.wrapping_sub(HEADER_MAGIC).wrapping_sub(flags)).to_le_bytes());
        h
    }

    /// An ELF32 i386 executable: header, program headers, then each segment's bytes (the
    /// first segment's data starts at file offset 4096).
    fn elf(entry: u32, segs: &[Seg]) -> Vec<u8> {
        let phnum = u16::try_from(segs.len()).unwrap();
        let mut f = vec![0u8; 52];
        f[..4].copy_from_slice(b"\x7fELF");
        f[4] = 1; // ELFCLASS32
        f[5] = 1; // little-endian
        f[6] = 1;
        f[16..18].copy_from_slice(&ET_EXEC.to_le_bytes());
        f[18..20].copy_from_slice(&EM_386.to_le_bytes());
        f[20..24].copy_from_slice(&1u32.to_le_bytes());
        f[24..28].copy_from_slice(&entry.to_le_bytes());
        f[28..32].copy_from_slice(&52u32.to_le_bytes());
        f[40..42].copy_from_slice(&52u16.to_le_bytes());
        f[42..44].copy_from_slice(&32u16.to_le_bytes());
        f[44..46].copy_from_slice(&phnum.to_le_bytes());
        let mut offset = 4096u32;
        let mut body = Vec::new();
        for s in segs {
            for v in [
                PT_LOAD,
                offset,
                s.vaddr,
                s.paddr,
                u32::try_from(s.data.len()).unwrap(),
                s.memsz,
                s.flags,
                4096,
            ] {
                f.extend_from_slice(&v.to_le_bytes());
            }
            body.extend_from_slice(&s.data);
            offset += u32::try_from(s.data.len()).unwrap();
        }
        f.resize(4096, 0);
        f.extend_from_slice(&body);
        f
    }

    /// A kernel whose text (starting with the Multiboot header) is at 1 MiB, with a bss.
    fn kernel() -> Vec<u8> {
        let mut text = mb_header(HEADER_PAGE_ALIGN | HEADER_MEMORY_INFO);
        text.extend_from_slice(&[0x90; 100]);
        text.push(0xf4);
        elf(
            0x10_000c,
            &[
                seg(0x10_0000, text, 0x1000),
                seg(0x10_1000, vec![0xaa; 0x10], 0x3000),
            ],
        )
    }

    fn opts<'a>() -> LoadOptions<'a> {
        LoadOptions {
            ram_bytes: 64 << 20,
            below_4g_bytes: 64 << 20,
            cmdline: "/k/kernel.elf -f x",
            module: None,
        }
    }

    /// Guest memory built from a `BootImage`, for reading back.
    fn memory(b: &BootImage, size: usize) -> Vec<u8> {
        let mut m = vec![0x5a; size];
        for (gpa, d) in &b.writes {
            let g = usize::try_from(*gpa).unwrap();
            m[g..g + d.len()].copy_from_slice(d);
        }
        for (gpa, len) in &b.zeroes {
            let g = usize::try_from(*gpa).unwrap();
            m[g..g + usize::try_from(*len).unwrap()].fill(0);
        }
        m
    }

    fn rd32(m: &[u8], a: u64) -> u32 {
        u32_at(m, usize::try_from(a).unwrap()).unwrap()
    }

    fn rd64(m: &[u8], a: u64) -> u64 {
        u64::from(rd32(m, a)) | (u64::from(rd32(m, a + 4)) << 32)
    }

    fn cstr(m: &[u8], a: u32) -> String {
        let a = usize::try_from(a).unwrap();
        let n = m[a..].iter().position(|&b| b == 0).unwrap();
        String::from_utf8(m[a..a + n].to_vec()).unwrap()
    }

    fn mmap(m: &[u8], info: u64) -> Vec<(u64, u64, u32)> {
        let (len, addr) = (rd32(m, info + 44), rd32(m, info + 48));
        let mut v = Vec::new();
        let mut e = u64::from(addr);
        while e < u64::from(addr) + u64::from(len) {
            let size = rd32(m, e);
            assert_eq!(size, 20);
            v.push((rd64(m, e + 4), rd64(m, e + 12), rd32(m, e + 20)));
            e += u64::from(size) + 4;
        }
        v
    }

    #[test]
    fn loads_segments_and_bss() {
        let img = kernel();
        let b = load(&img, &opts()).unwrap();
        assert_eq!(b.entry, 0x10_000c);
        assert_eq!(b.kernel_end, 0x10_4000);
        assert!(b.warnings.is_empty());
        assert_eq!(
            b.zeroes,
            [(0x10_0000 + 113, 0x1000 - 113), (0x10_1010, 0x2ff0)]
        );
        let m = memory(&b, 32 << 20);
        assert_eq!(rd32(&m, 0x10_0000), HEADER_MAGIC);
        assert_eq!(m[0x10_000c], 0x90);
        assert_eq!(m[0x10_0070], 0xf4);
        assert!(m[0x10_0071..0x10_1000].iter().all(|&x| x == 0), "bss");
        assert!(m[0x10_1000..0x10_1010].iter().all(|&x| x == 0xaa));
        assert!(m[0x10_1010..0x10_4000].iter().all(|&x| x == 0), "bss");
        assert_eq!(m[0xfffff], 0x5a, "nothing written below the kernel");
        // Writes never overlap each other or the zeroed ranges.
        let mut ranges: Vec<(u64, u64)> = b
            .writes
            .iter()
            .map(|(g, d)| (*g, *g + u64::try_from(d.len()).unwrap()))
            .chain(b.zeroes.iter().map(|(g, l)| (*g, *g + *l)))
            .collect();
        ranges.sort_unstable();
        assert!(ranges.windows(2).all(|w| w[0].1 <= w[1].0));
    }

    #[test]
    fn info_block_without_module() {
        let b = load(&kernel(), &opts()).unwrap();
        assert_eq!(b.info_addr, 0x10_4000, "page after the kernel");
        assert_eq!(b.module_range, None);
        let m = memory(&b, 32 << 20);
        let info = u64::from(b.info_addr);
        assert_eq!(
            rd32(&m, info),
            INFO_MEMORY | INFO_CMDLINE | INFO_MEM_MAP | INFO_BOOT_LOADER_NAME
        );
        assert_eq!(rd32(&m, info + 4), 639);
        assert_eq!(rd32(&m, info + 8), (64 << 10) - 1024);
        assert_eq!(rd32(&m, info + 12), 0, "no boot device");
        assert_eq!(cstr(&m, rd32(&m, info + 16)), "/k/kernel.elf -f x");
        assert_eq!(rd32(&m, info + 20), 0);
        assert_eq!(rd32(&m, info + 24), 0);
        assert_eq!(cstr(&m, rd32(&m, info + 64)), "dirtylog");
        assert_eq!(
            mmap(&m, info),
            [
                (0, 0x9fc00, 1),
                (0x9fc00, 0x400, 2),
                (0xf0000, 0x10000, 2),
                (0x10_0000, (64 << 20) - 0x10_0000, 1),
            ]
        );
        assert!(b.image_end > info + INFO_SIZE);
        assert_eq!(b.writes.last().unwrap().0, info);
        assert_eq!(
            info + u64::try_from(b.writes.last().unwrap().1.len()).unwrap(),
            b.image_end
        );
    }

    #[test]
    fn info_block_with_module_and_high_ram() {
        let module: Vec<u8> = (0..5000u32).map(|i| (i % 251) as u8).collect();
        let o = LoadOptions {
            ram_bytes: 5 << 30,
            below_4g_bytes: 3 << 30,
            cmdline: "kern --append x=1",
            module: Some((&module, "initrd.img")),
        };
        let b = load(&kernel(), &o).unwrap();
        assert_eq!(b.module_range, Some((0x10_4000, 0x10_4000 + 5000)));
        assert_eq!(b.info_addr, 0x10_6000, "page after the module");
        let m = memory(&b, 0x20_0000);
        assert_eq!(&m[0x10_4000..0x10_4000 + 5000], &module[..]);
        let info = u64::from(b.info_addr);
        assert_eq!(
            rd32(&m, info),
            INFO_MEMORY | INFO_CMDLINE | INFO_MODS | INFO_MEM_MAP | INFO_BOOT_LOADER_NAME
        );
        assert_eq!(rd32(&m, info + 8), (3 << 20) - 1024);
        assert_eq!(rd32(&m, info + 20), 1);
        let mods = u64::from(rd32(&m, info + 24));
        assert_eq!(rd32(&m, mods), 0x10_4000);
        assert_eq!(rd32(&m, mods + 4), 0x10_4000 + 5000);
        assert_eq!(cstr(&m, rd32(&m, mods + 8)), "initrd.img");
        assert_eq!(rd32(&m, mods + 12), 0);
        assert_eq!(cstr(&m, rd32(&m, info + 16)), "kern --append x=1");
        assert_eq!(
            mmap(&m, info),
            [
                (0, 0x9fc00, 1),
                (0x9fc00, 0x400, 2),
                (0xf0000, 0x10000, 2),
                (0x10_0000, (3 << 30) - 0x10_0000, 1),
                (1 << 32, 2 << 30, 1),
            ]
        );
    }

    #[test]
    fn entry_translated_from_virtual_like_qemu() {
        let mut text = mb_header(0);
        text.extend_from_slice(&[0x90; 32]);
        let mut s = seg(0x20_0000, text, 0x1000);
        s.vaddr = 0xc020_0000;
        let b = load(&elf(0xc020_0010, &[s]), &opts()).unwrap();
        assert_eq!(b.entry, 0x20_0010);
    }

    #[test]
    fn machine_62_accepted_in_class_32() {
        let mut img = kernel();
        img[18..20].copy_from_slice(&EM_X86_64.to_le_bytes());
        assert!(load(&img, &opts()).is_ok());
        img[18..20].copy_from_slice(&40u16.to_le_bytes());
        assert!(matches!(
            load(&img, &opts()),
            Err(MultibootError::UnsupportedElf(_))
        ));
    }

    #[test]
    fn low_memory_segment_below_ebda_is_fine() {
        let mut text = mb_header(0);
        text.extend_from_slice(&[0x90; 16]);
        let b = load(&elf(0x8000, &[seg(0x8000, text, 0x1000)]), &opts()).unwrap();
        assert_eq!(b.info_addr, 0x9000);
    }

    #[test]
    fn aout_kludge() {
        // A flat binary loaded at 1 MiB: header at file offset 8, text from offset 0.
        let flags = HEADER_PAGE_ALIGN | HEADER_AOUT_KLUDGE;
        let mut img = vec![0xeb, 0x26, 0, 0, 0, 0, 0, 0];
        img.extend_from_slice(&mb_header(flags));
        for v in [0x10_0008u32, 0x10_0000, 0x10_0100, 0x10_2000, 0x10_0040] {
            img.extend_from_slice(&v.to_le_bytes());
        }
        img.resize(0x180, 0xcc);
        let b = load(&img, &opts()).unwrap();
        assert_eq!(b.entry, 0x10_0040);
        assert_eq!(b.kernel_end, 0x10_2000);
        assert_eq!(b.writes[0].0, 0x10_0000);
        assert_eq!(b.writes[0].1, img[..0x100]);
        assert_eq!(b.zeroes, [(0x10_0100, 0x1f00)]);
        // load_end_addr 0: to the end of the file; bss_end 0: no bss.
        let mut img2 = img.clone();
        img2[28..36].fill(0);
        let b2 = load(&img2, &opts()).unwrap();
        assert_eq!(b2.writes[0].1, img2);
        assert!(b2.zeroes.is_empty());
        assert_eq!(b2.kernel_end, 0x10_0180);
        // header_addr below load_addr.
        let mut bad = img.clone();
        bad[20..24].copy_from_slice(&0xf_0000u32.to_le_bytes());
        assert!(matches!(
            load(&bad, &opts()),
            Err(MultibootError::BadAddresses(_))
        ));
        // load_end beyond the file.
        let mut bad = img.clone();
        bad[28..32].copy_from_slice(&0x10_1000u32.to_le_bytes());
        assert!(matches!(
            load(&bad, &opts()),
            Err(MultibootError::BadAddresses(_))
        ));
        // bss_end below load_end.
        let mut bad = img;
        bad[32..36].copy_from_slice(&0x10_0080u32.to_le_bytes());
        assert!(matches!(
            load(&bad, &opts()),
            Err(MultibootError::BadAddresses(_))
        ));
    }

    #[test]
    fn header_errors() {
        assert_eq!(load(&[], &opts()), Err(MultibootError::NoHeader));
        let mut img = kernel();
        let h = 4096; // header at the start of the text
        img[h + 8] ^= 1;
        assert_eq!(
            load(&img, &opts()),
            Err(MultibootError::NoHeader),
            "checksum"
        );
        let mut img = kernel();
        img[h] = 0;
        assert_eq!(load(&img, &opts()), Err(MultibootError::NoHeader), "magic");
        // Header beyond 8192 bytes.
        let mut img = kernel();
        let hdr = img[h..h + 12].to_vec();
        img[h..h + 12].fill(0);
        img.resize(8192, 0);
        img.extend_from_slice(&hdr);
        assert_eq!(load(&img, &opts()), Err(MultibootError::NoHeader));
        // Misaligned header.
        let mut img = vec![0u8; 2];
        img.extend_from_slice(&mb_header(0));
        assert_eq!(load(&img, &opts()), Err(MultibootError::NoHeader));
        // A header but not an ELF.
        assert_eq!(load(&mb_header(0), &opts()), Err(MultibootError::NotElf));
    }

    #[test]
    fn warnings_for_ignored_header_flags() {
        let mut text = mb_header(HEADER_VIDEO_MODE | 0x20);
        text.extend_from_slice(&[0x90; 16]);
        let b = load(&elf(0x10_0000, &[seg(0x10_0000, text, 0x1000)]), &opts()).unwrap();
        assert_eq!(b.warnings.len(), 2);
    }

    #[test]
    fn elf_errors() {
        let img = kernel();
        let mut t = b"\x7fELF\x01\x01\x01\x00".to_vec();
        t.extend_from_slice(&mb_header(0));
        assert!(
            matches!(load(&t, &opts()), Err(MultibootError::BadElf(_))),
            "short header"
        );
        let mut t = img.clone();
        t[4] = 2;
        assert!(matches!(
            load(&t, &opts()),
            Err(MultibootError::UnsupportedElf(_))
        ));
        let mut t = img.clone();
        t[5] = 2;
        assert!(matches!(
            load(&t, &opts()),
            Err(MultibootError::UnsupportedElf(_))
        ));
        let mut t = img.clone();
        t[16] = 3;
        assert!(matches!(
            load(&t, &opts()),
            Err(MultibootError::UnsupportedElf(_))
        ));
        // Truncated: the second segment's bytes are cut off.
        let mut t = img.clone();
        t.truncate(img.len() - 4);
        assert!(matches!(load(&t, &opts()), Err(MultibootError::BadElf(_))));
        // Program header table beyond the file.
        let mut t = img.clone();
        t[28..32].copy_from_slice(&0xffff_fff0u32.to_le_bytes());
        assert!(matches!(load(&t, &opts()), Err(MultibootError::BadElf(_))));
        // phentsize too small.
        let mut t = img.clone();
        t[42] = 8;
        assert!(matches!(load(&t, &opts()), Err(MultibootError::BadElf(_))));
        // filesz > memsz.
        let mut t = img.clone();
        t[52 + 32 + 20..52 + 32 + 24].copy_from_slice(&4u32.to_le_bytes());
        assert!(matches!(load(&t, &opts()), Err(MultibootError::BadElf(_))));
        // No PT_LOAD.
        let mut t = img.clone();
        t[52] = 4;
        t[52 + 32] = 4;
        assert_eq!(load(&t, &opts()), Err(MultibootError::NoLoadableSegment));
        // Entry outside the image.
        let mut t = img;
        t[24..28].copy_from_slice(&0x50_0000u32.to_le_bytes());
        assert_eq!(
            load(&t, &opts()),
            Err(MultibootError::EntryOutsideImage(0x50_0000))
        );
    }

    #[test]
    fn placement_errors() {
        let text = || {
            let mut t = mb_header(0);
            t.extend_from_slice(&[0x90; 16]);
            t
        };
        let placed = |segs: &[Seg], entry| load(&elf(entry, segs), &opts());
        assert!(matches!(
            placed(&[seg(0x800, text(), 0x100)], 0x800),
            Err(MultibootError::BadPlacement { start: 0x800, .. })
        ));
        assert!(matches!(
            placed(&[seg(0x9f000, text(), 0x1000)], 0x9f000),
            Err(MultibootError::BadPlacement { .. })
        ));
        assert!(matches!(
            placed(&[seg(0xb8000, text(), 0x1000)], 0xb8000),
            Err(MultibootError::BadPlacement { .. })
        ));
        assert!(matches!(
            placed(&[seg(0xff000, text(), 0x2000)], 0xff000),
            Err(MultibootError::BadPlacement { .. })
        ));
        assert!(matches!(
            placed(&[seg(0x3ff_f000, text(), 0x2000)], 0x3ff_f000),
            Err(MultibootError::BadPlacement { .. })
        ));
        assert!(matches!(
            placed(&[seg(0xffff_f000, text(), 0x2000)], 0xffff_f000),
            Err(MultibootError::BadPlacement { .. })
        ));
        assert!(matches!(
            placed(
                &[
                    seg(0x10_0000, text(), 0x2000),
                    seg(0x10_1000, vec![1], 0x10)
                ],
                0x10_0000
            ),
            Err(MultibootError::Overlap {
                a_start: 0x10_0000,
                b_start: 0x10_1000,
                ..
            })
        ));
        // Overlap detected whatever the order in the file.
        // 4 bytes first, so the header in the second segment stays 4-byte aligned.
        assert!(matches!(
            placed(
                &[
                    seg(0x10_1000, vec![1; 4], 0x10),
                    seg(0x10_0000, text(), 0x2000)
                ],
                0x10_0000
            ),
            Err(MultibootError::Overlap { .. })
        ));
        // Touching segments are fine.
        assert!(placed(
            &[
                seg(0x10_0000, text(), 0x1000),
                seg(0x10_1000, vec![1], 0x10)
            ],
            0x10_0000
        )
        .is_ok());
    }

    #[test]
    fn no_room_for_module_or_info() {
        let big = vec![0u8; 63 << 20];
        let o = LoadOptions {
            module: Some((&big, "m")),
            ..opts()
        };
        assert!(matches!(
            load(&kernel(), &o),
            Err(MultibootError::NoRoom { what: "module", .. })
        ));
        // Kernel ends exactly at the end of RAM: no room for the info block.
        let mut text = mb_header(0);
        text.extend_from_slice(&[0x90; 16]);
        let img = elf(0x3f0_0000, &[seg(0x3f0_0000, text, 0x10_0000)]);
        assert!(matches!(
            load(&img, &opts()),
            Err(MultibootError::NoRoom {
                what: "Multiboot information",
                ..
            })
        ));
        let long = "x".repeat(64 << 20);
        let o = LoadOptions {
            cmdline: &long,
            ..opts()
        };
        assert!(matches!(
            load(&kernel(), &o),
            Err(MultibootError::NoRoom { .. })
        ));
    }

    #[test]
    fn option_and_cmdline_errors() {
        let o = LoadOptions {
            below_4g_bytes: 128 << 20,
            ..opts()
        };
        assert!(matches!(
            load(&kernel(), &o),
            Err(MultibootError::InvalidOptions(_))
        ));
        let o = LoadOptions {
            ram_bytes: 1 << 20,
            below_4g_bytes: 1 << 20,
            ..opts()
        };
        assert!(matches!(
            load(&kernel(), &o),
            Err(MultibootError::InvalidOptions(_))
        ));
        let o = LoadOptions {
            ram_bytes: 5 << 30,
            below_4g_bytes: 1 << 30,
            ..opts()
        };
        assert!(matches!(
            load(&kernel(), &o),
            Err(MultibootError::InvalidOptions(_))
        ));
        let o = LoadOptions {
            cmdline: "a\0b",
            ..opts()
        };
        assert_eq!(
            load(&kernel(), &o),
            Err(MultibootError::NulInCmdline("kernel"))
        );
        let o = LoadOptions {
            module: Some((b"m", "x\0")),
            ..opts()
        };
        assert_eq!(
            load(&kernel(), &o),
            Err(MultibootError::NulInCmdline("module"))
        );
    }

    proptest::proptest! {
        #[test]
        fn random_bytes_never_panic(bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..10000)) {
            let _ = load(&bytes, &opts());
        }

        #[test]
        fn random_bytes_with_header_never_panic(
            flags in proptest::num::u32::ANY,
            prefix in proptest::collection::vec(proptest::num::u8::ANY, 0..64),
            rest in proptest::collection::vec(proptest::num::u8::ANY, 0..512),
        ) {
            let mut img = prefix;
            img.truncate(img.len() & !3);
            img.extend_from_slice(&mb_header(flags));
            img.extend_from_slice(&rest);
            let _ = load(&img, &opts());
        }

        #[test]
        fn mutated_kernel_never_panics_and_stays_in_ram(
            edits in proptest::collection::vec((0usize..4300, proptest::num::u8::ANY), 1..8),
        ) {
            let mut img = kernel();
            for (at, v) in edits {
                if let Some(b) = img.get_mut(at) { *b = v; }
            }
            if let Ok(b) = load(&img, &opts()) {
                for (g, d) in &b.writes {
                    proptest::prop_assert!(*g >= 0x1000);
                    proptest::prop_assert!(g + u64::try_from(d.len()).unwrap() <= 64 << 20);
                }
                for (g, l) in &b.zeroes {
                    proptest::prop_assert!(*g >= 0x1000 && g + l <= 64 << 20);
                }
            }
        }
    }
}
