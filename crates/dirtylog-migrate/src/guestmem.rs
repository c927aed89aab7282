//! Reading guest memory that vCPUs write concurrently.
//!
//! While the guest runs, a page can change under the reader at any time. The engine tests
//! pages for zero in place, and either hands them to the kernel straight from guest memory
//! ([`write_out`], when the destination checks pages by their hashes) or copies them into its
//! own buffers before framing them (when a CRC covers them, or a codec or TLS reads them: the
//! CRC and the bytes on the wire must agree). A torn *page* is harmless (the write that tore
//! it set the page's dirty bit after the page was re-armed, so a later round sends the page
//! again); every individual read must still be well defined even when the concurrent writer
//! is Rust code (the software VM's vCPU threads) rather than a guest behind KVM. The zero test
//! reads one aligned 64-bit word at a time with relaxed atomic loads; the copy is one
//! `rep movsb` in inline assembly on x86-64 (racy hardware loads outside Rust's memory model,
//! see [`copy_out`]), word-sized atomic loads elsewhere, which cost about 20% against
//! `memcpy` (6.8 against 8.5 GB/s on the project machine).

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};
use std::sync::atomic::{AtomicU64, Ordering};

use crate::memory::RegionMemory;

/// The words `offset..offset + len` bytes into `mem`, as atomics.
///
/// # Panics
/// If the range is not inside the region or not 8-byte aligned (callers pass page ranges of
/// validated regions).
fn words(mem: RegionMemory, offset: usize, len: usize) -> &'static [AtomicU64] {
    assert!(
        offset % 8 == 0 && len % 8 == 0 && mem.as_ptr() as usize % 8 == 0,
        "unaligned guest memory access"
    );
    assert!(
        offset.checked_add(len).is_some_and(|end| end <= mem.len()),
        "guest memory access {offset:#x}+{len:#x} past the region's {:#x} bytes",
        mem.len()
    );
    // SAFETY: the range is inside the region's mapping (checked above), which the VM keeps
    // valid for the whole migration (the `RegionMemory::new` contract),
    // and 8-byte aligned. `AtomicU64` has the size and alignment of `u64` and may alias memory
    // that other threads, or the guest through KVM, write concurrently: all our accesses
    // through it are atomic. The 'static lifetime never escapes this module's functions.
    unsafe { std::slice::from_raw_parts(mem.as_ptr().add(offset).cast::<AtomicU64>(), len / 8) }
}

/// Copy `dst.len()` bytes from `offset` of `mem` into `dst`.
///
/// On x86-64 one `rep movsb` (the kernel's `copy_from_user`, and the fastest copy on CPUs
/// with ERMS/FSRM: about 30% faster here than the word loop, which the compiler cannot
/// vectorise because the loads are atomic). It runs as inline assembly, outside Rust's
/// abstract machine: its reads are plain hardware loads, which may race with the guest's or
/// the software VM's writes and then see a mix of old and new bytes (the same guarantee as
/// byte-wise atomic loads, and what SpiderMonkey's racy memcpy of shared memory relies on);
/// no Rust code observes `dst` until the asm has finished. Elsewhere, word by word with
/// relaxed atomic loads.
pub(crate) fn copy_out(mem: RegionMemory, offset: usize, dst: &mut [u8]) {
    let src = words(mem, offset, dst.len());
    #[cfg(target_arch = "x86_64")]
    {
        // SAFETY: `src` covers exactly `dst.len()` readable bytes of the region (checked by
        // `words`), `dst` is `dst.len()` writable bytes we borrow exclusively, and the two do
        // not overlap (`dst` is a private buffer, not guest memory). `rep movsb` reads and
        // writes only those bytes, with the direction flag clear (the ABI guarantees it at
        // any asm boundary), and clobbers only rcx, rsi, rdi, declared here. The racy reads of
        // `src` are hardware loads, as explained above.
        unsafe {
            std::arch::asm!(
                "rep movsb",
                inout("rcx") dst.len() => _,
                inout("rsi") src.as_ptr().cast::<u8>() => _,
                inout("rdi") dst.as_mut_ptr() => _,
                options(nostack, preserves_flags),
            );
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    for (d, s) in dst.chunks_exact_mut(8).zip(src) {
        d.copy_from_slice(&s.load(Ordering::Relaxed).to_ne_bytes());
    }
}

/// Are the `len` bytes at `offset` of `mem` all zero? Looks at the first cache line alone
/// first (most non-zero pages differ there, and then this costs one line, not the eight of a
/// block; QEMU's `buffer_is_zero` pre-checks a few words the same way), then reads 512 bytes
/// between early exits, so a zero page costs one pass. In a blackout that moves 64 MiB of such
/// pages this took about a tenth off the time per page (BENCHMARKS.md, issue 9).
pub(crate) fn is_zero(mem: RegionMemory, offset: usize, len: usize) -> bool {
    let words = words(mem, offset, len);
    if words.iter().take(8).any(|w| w.load(Ordering::Relaxed) != 0) {
        return false;
    }
    words.chunks(64).all(|block| {
        block
            .iter()
            .fold(0, |acc, w| acc | w.load(Ordering::Relaxed))
            == 0
    })
}

/// Write `head`, the `len` bytes at `offset` of `mem`, and `tail` to the socket `fd`, all of
/// them and in that order, retrying partial and interrupted writes: pages go from guest memory
/// to the kernel without a copy in user space, though the guest may be writing them.
///
/// The kernel reads the guest's bytes with `sendmsg(2)`, outside Rust's abstract machine, as
/// [`copy_out`]'s assembly does; no Rust reference to them is made. Skipping the copy through
/// a private buffer took about a fifth off a bulk pass's CPU time over one loopback
/// connection (over two: no change measured; BENCHMARKS.md, issue 9). Hand-written rather
/// than vm-memory's `WriteVolatile`, which writes one volatile slice per call: a frame would
/// take three system calls, and with `TCP_NODELAY` three segments, where this takes one
/// `sendmsg`.
///
/// # Panics
/// If the range is not inside the region (callers pass page ranges of validated regions).
pub(crate) fn write_out(
    fd: BorrowedFd<'_>,
    head: &[u8],
    mem: RegionMemory,
    offset: usize,
    len: usize,
    tail: &[u8],
) -> io::Result<()> {
    assert!(
        offset.checked_add(len).is_some_and(|end| end <= mem.len()),
        "guest memory access {offset:#x}+{len:#x} past the region's {:#x} bytes",
        mem.len()
    );
    // Each part as (address, bytes left); the middle one is guest memory.
    let mut parts = [
        (head.as_ptr(), head.len()),
        // SAFETY: `offset <= mem.len()` (checked above), so the pointer stays inside the
        // region's mapping or one past its end.
        (unsafe { mem.as_ptr().add(offset) }.cast_const(), len),
        (tail.as_ptr(), tail.len()),
    ];
    while parts.iter().any(|&(_, n)| n > 0) {
        let iov = parts.map(|(base, n)| libc::iovec {
            iov_base: base.cast_mut().cast(),
            iov_len: n,
        });
        // SAFETY: all-zero is a valid `msghdr` (no name, no control data).
        let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
        msg.msg_iov = iov.as_ptr().cast_mut();
        msg.msg_iovlen = iov.len();
        // SAFETY: `sendmsg` only reads `msg` and the three ranges: `head` and `tail` are live
        // slices, and the middle is inside the region's mapping (checked above), which stays
        // mapped for the whole migration (the `RegionMemory::new` contract); each range
        // shrinks from its start as it is written. The kernel's reads of guest memory may
        // race with the guest's writes: that tears at worst a page that a later round sends
        // again (module docs). `fd` is a borrowed, open descriptor. `MSG_NOSIGNAL`: a closed
        // peer is an `EPIPE` error, never a `SIGPIPE` that would kill a host process that
        // did not ignore it.
        let written = unsafe { libc::sendmsg(fd.as_raw_fd(), &msg, libc::MSG_NOSIGNAL) };
        let mut written = match written {
            0 => return Err(io::ErrorKind::WriteZero.into()),
            n if n > 0 => n as usize,
            _ => {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(e);
            }
        };
        for (base, n) in &mut parts {
            let k = written.min(*n);
            // SAFETY: `k <= n`: the pointer stays inside its range or one past its end.
            *base = unsafe { base.add(k) };
            *n -= k;
            written -= k;
        }
    }
    Ok(())
}

/// Is `bytes` all zero? The same scan over a private buffer.
pub(crate) fn is_zero_bytes(bytes: &[u8]) -> bool {
    bytes.chunks(512).all(|block| {
        let (head, words, tail) = {
            // SAFETY: every bit pattern is a valid u64; `align_to` only reinterprets the
            // aligned middle of the slice.
            unsafe { block.align_to::<u64>() }
        };
        head.iter().all(|&b| b == 0)
            && words.iter().fold(0, |acc, w| acc | w) == 0
            && tail.iter().all(|&b| b == 0)
    })
}

/// The bytes of a whole region, for hashing. Only while nobody writes it: the source guest
/// paused, or the target not yet resumed and every receiving thread joined.
///
/// # Safety
/// No thread and no guest may write the region while the returned slice is alive.
pub(crate) unsafe fn frozen(mem: RegionMemory) -> &'static [u8] {
    // SAFETY: valid mapping (memory contract); no writer for the slice's lifetime (caller).
    unsafe { std::slice::from_raw_parts(mem.as_ptr(), mem.len()) }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn region(buf: &mut [u64]) -> RegionMemory {
        // SAFETY: the buffer is 8-byte aligned and outlives every use in these tests, which
        // only read it, on one thread.
        unsafe { RegionMemory::new(buf.as_mut_ptr().cast(), buf.len() * 8) }
    }

    #[test]
    fn copies_and_scans_words() {
        let mut buf = vec![0u64; 1024];
        buf[600] = 0x0102_0304_0506_0708;
        let mem = region(&mut buf);
        assert!(is_zero(mem, 0, 4096));
        assert!(!is_zero(mem, 4096, 4096));
        let mut out = vec![0xffu8; 4096];
        copy_out(mem, 4096, &mut out);
        assert_eq!(out[(600 - 512) * 8], 0x08);
        assert_eq!(out.iter().filter(|&&b| b != 0).count(), 8);
        assert!(!is_zero_bytes(&out));
        assert!(is_zero_bytes(&out[..8 * 88]));
        assert!(is_zero_bytes(&[0u8; 13]));
        // Non-zero only in the first line, or only in the last word: not zero either way.
        let mut buf = vec![0u64; 1024];
        buf[0] = 1;
        buf[1023] = 1 << 63;
        let mem = region(&mut buf);
        assert!(!is_zero(mem, 0, 4096));
        assert!(!is_zero(mem, 4096, 4096));
        assert!(is_zero(mem, 8, 4096 - 8));
        assert!(is_zero(mem, 4096, 4096 - 8));
        assert!(!is_zero_bytes(&[0, 0, 1]));
    }

    #[test]
    fn writes_head_memory_and_tail_whole() {
        use std::io::Read;
        use std::os::fd::AsFd;
        use std::os::unix::net::UnixStream;
        // 4 MiB through a Unix socket (a few hundred KiB of buffer) read slowly: `sendmsg`
        // returns partial writes, which must resume inside whichever part they stopped in.
        let mut buf: Vec<u64> = (0..(4u64 << 20) / 8).map(|i| i * 0x9e37_79b9 + 1).collect();
        let mem = region(&mut buf);
        let (offset, len) = (4096, (4 << 20) - 3 * 4096);
        let (a, mut b) = UnixStream::pair().unwrap();
        let reader = std::thread::spawn(move || {
            let mut got = Vec::new();
            let mut piece = [0u8; 3000];
            loop {
                std::thread::sleep(std::time::Duration::from_micros(50));
                match b.read(&mut piece).unwrap() {
                    0 => return got,
                    n => got.extend_from_slice(&piece[..n]),
                }
            }
        });
        write_out(a.as_fd(), b"head", mem, offset, len, b"crc!").unwrap();
        drop(a);
        let got = reader.join().unwrap();
        let mut want = b"head".to_vec();
        let mut page = vec![0u8; len];
        copy_out(mem, offset, &mut page);
        want.extend_from_slice(&page);
        want.extend_from_slice(b"crc!");
        assert_eq!(got.len(), want.len());
        assert!(got == want, "bytes differ");
        // A closed peer is an error, not a panic or a silent success.
        let (a, b) = UnixStream::pair().unwrap();
        drop(b);
        assert!(write_out(a.as_fd(), b"", mem, 0, 4096, b"").is_err());
    }

    #[test]
    #[should_panic(expected = "past the region")]
    fn write_out_refuses_out_of_bounds() {
        use std::os::fd::AsFd;
        let mut buf = vec![0u64; 512];
        let (a, _b) = std::os::unix::net::UnixStream::pair().unwrap();
        let _ = write_out(a.as_fd(), b"", region(&mut buf), 4096, 8, b"");
    }

    #[test]
    #[should_panic(expected = "past the region")]
    fn refuses_out_of_bounds() {
        let mut buf = vec![0u64; 8];
        is_zero(region(&mut buf), 64, 8);
    }
}
