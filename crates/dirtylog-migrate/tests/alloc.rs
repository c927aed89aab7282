//! Allocation counts: steady-state encoding and decoding allocate nothing, and an absurd frame
//! length is refused without allocating. A counting global allocator sees every allocation
//! of the calling thread.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;

use dirtylog_migrate::wire::{
    Decoder, Encoder, Message, PageRange, Region, StreamHeader, WireError, MAX_VCPU_BLOB,
};

thread_local! {
    static ALLOCATIONS: Cell<u64> = const { Cell::new(0) };
}

struct Counting;

// SAFETY: every call is forwarded unchanged to the system allocator; the counter is a
// const-initialised thread-local without a destructor, so touching it never allocates.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let _ = ALLOCATIONS.try_with(|c| c.set(c.get() + 1));
        // SAFETY: the caller upholds `GlobalAlloc::alloc`'s contract, which we pass on.
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: `ptr` came from `System` through `alloc` or `realloc` with this layout.
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let _ = ALLOCATIONS.try_with(|c| c.set(c.get() + 1));
        // SAFETY: as for `dealloc`, and the caller upholds `realloc`'s contract.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

fn allocations_in<T>(f: impl FnOnce() -> T) -> (T, u64) {
    let before = ALLOCATIONS.with(Cell::get);
    let out = f();
    (out, ALLOCATIONS.with(Cell::get) - before)
}

const PAGE: usize = 4096;

fn header() -> StreamHeader {
    StreamHeader::new(
        4096,
        4,
        vec![Region {
            slot: 1,
            gpa: 0,
            size: 256 * PAGE as u64,
        }],
    )
    .unwrap()
}

#[test]
fn steady_state_encoding_and_decoding_allocate_nothing() {
    let guest: Vec<u8> = (0..256 * PAGE).map(|i| (i / 7) as u8).collect();
    let blob = vec![0x5a; MAX_VCPU_BLOB];
    let send = |enc: &mut Encoder<_>, round: u64| -> Result<(), WireError> {
        let first = round * 3 % 250;
        let range = PageRange {
            slot: 1,
            first_page: first,
            npages: 4,
        };
        let data = &guest[first as usize * PAGE..(first as usize + 4) * PAGE];
        enc.send(Message::Pages { range, data })?;
        enc.send(Message::ZeroPages(PageRange {
            slot: 1,
            first_page: 255,
            npages: 1,
        }))?;
        enc.send(Message::VcpuState {
            vcpu_id: 3,
            blob: &blob[..(round as usize * 997) % 4096],
        })?;
        enc.send(Message::Error {
            code: 1,
            message: "still going",
        })?;
        enc.send(Message::RoundEnd {
            round,
            dirty_pages: 5,
        })
    };

    let mut enc = Encoder::new(Vec::with_capacity(8 << 20), header()).unwrap();
    enc.send(Message::VcpuState {
        vcpu_id: 0,
        blob: &blob,
    })
    .unwrap(); // warm-up: largest data
    let (sent, allocations) =
        allocations_in(|| (0..100).try_for_each(|round| send(&mut enc, round)));
    sent.unwrap();
    assert_eq!(allocations, 0, "encoding allocated");
    let stream = enc.into_inner();

    let mut dec = Decoder::new(stream.as_slice()).unwrap();
    let mut memory = vec![vec![0u8; 256 * PAGE]];
    dec.next(&mut memory).unwrap(); // warm-up: grows the decoder's buffer once
    let (frames, allocations) = allocations_in(|| {
        let mut frames = 0;
        while dec.next(&mut memory)?.is_some() {
            frames += 1;
        }
        Ok::<_, WireError>(frames)
    });
    assert_eq!(frames.unwrap(), 500);
    assert_eq!(allocations, 0, "decoding allocated");
    assert_eq!(memory[0][..250 * PAGE], guest[..250 * PAGE]);
}

#[test]
fn absurd_length_is_refused_without_allocating() {
    let mut stream = Encoder::new(Vec::new(), header()).unwrap().into_inner();
    stream.extend_from_slice(&[2, 0, 0xff, 0xff, 0xff, 0xff]);
    let mut dec = Decoder::new(stream.as_slice()).unwrap();
    let mut memory = vec![vec![0u8; 256 * PAGE]];
    let (result, allocations) = allocations_in(|| dec.next(&mut memory).map(|m| m.is_some()));
    assert!(matches!(
        result,
        Err(WireError::Length {
            len: 0xffff_ffff,
            ..
        })
    ));
    assert_eq!(allocations, 0);
}
