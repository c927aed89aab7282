//! The CI replay of the fuzz targets, on stable Rust and without libFuzzer: every file of
//! `corpus/TARGET/` (the committed seeds and the inputs of bugs found so far) through the
//! same `run` function the fuzzer calls, then a few hundred pseudo-random inputs each. A panic
//! is a finding (see each target's oracle).
//!
//! `cargo test --manifest-path fuzz/Cargo.toml --no-default-features`

use std::path::Path;

fn replay(target: &str, run: fn(&[u8])) {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("corpus")
        .join(target);
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.map(|e| e.path()))
        .collect::<Result<_, _>>()
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
    files.sort();
    assert!(!files.is_empty(), "no seed in {}", dir.display());
    for f in &files {
        let bytes = std::fs::read(f).unwrap_or_else(|e| panic!("{}: {e}", f.display()));
        eprintln!("{target}: {}", f.display());
        run(&bytes);
    }
    // Pseudo-random inputs of growing length, the same on every run.
    let mut x = 0x9e37_79b9_7f4a_7c15_u64 ^ target.len() as u64;
    let mut next = || {
        x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = x;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    };
    for i in 0..300 {
        let len = (next() % (16 + 4 * i)) as usize;
        let bytes: Vec<u8> = (0..len).map(|_| next() as u8).collect();
        run(&bytes);
    }
}

#[test]
fn wire_decoder() {
    replay("wire_decoder", dirtylog_fuzz::wire_decoder::run);
}

#[test]
fn receiver_session() {
    replay("receiver_session", dirtylog_fuzz::receiver_session::run);
}

#[test]
fn vcpu_blob() {
    replay("vcpu_blob", dirtylog_fuzz::vcpu_blob::run);
}

#[test]
fn core_clear_ring() {
    replay("core_clear_ring", dirtylog_fuzz::core_clear_ring::run);
}

/// The receiver target's oracle accepts what it must: whole valid migrations, strict and
/// background, unverified and cut after `Commit`, with compressed and zero pages, several rounds and a device.
#[test]
fn receiver_session_accepts_valid_migrations() {
    use dirtylog_fuzz::receiver_session::{run_input, Blob, HelloSpec, Input, Msg, Span};
    let span = |region, first, npages| Span {
        region,
        first,
        npages,
    };
    for (shape, verify, cut) in [
        ([2u8, 0, 0, 0], 2, false),
        ([2, 1, 5, 77], 1, false),
        ([0x83, 2, 9, 3], 0, false),
        ([0x83, 2, 9, 3], 0, true),
    ] {
        let mut msgs = vec![
            Msg::Pages {
                span: span(0, 0, 1),
                seed: 7,
            },
            Msg::Zero(span(1, 0, 1)),
            Msg::RoundEnd(None),
            Msg::Compressed {
                span: span(0, 0, 1),
                seed: 9,
                zstd: true,
                wrong_size: false,
            },
            Msg::RoundEnd(None),
        ];
        // Regions: 1 + shape[0] % 3 (3 here); vCPUs: 1 + shape[1] % 3.
        for id in 0..=shape[1] % 3 {
            msgs.push(Msg::Vcpu {
                id,
                blob: Blob::Valid(u64::from(id)),
            });
        }
        msgs.push(Msg::Device {
            known: true,
            version: 1,
            bytes: vec![1, 2, 3],
        });
        let hashes = (0..3).map(|region| Msg::MemHash { region, hash: None });
        match verify {
            // Strict: the hashes, then Prepare.
            2 => {
                msgs.extend(hashes);
                msgs.extend([Msg::Prepare(2), Msg::Commit, Msg::Done]);
            }
            // Background: the hashes after Commit.
            1 => {
                msgs.extend([Msg::Prepare(1), Msg::Commit]);
                msgs.extend(hashes);
                msgs.push(Msg::Done);
            }
            // None; and a stream cut right after Commit (the guest stays here).
            _ => {
                msgs.extend([Msg::Prepare(0), Msg::Commit]);
                if !cut {
                    msgs.push(Msg::Done);
                }
            }
        }
        let input = Input {
            shape,
            chunk: 3,
            device: true,
            hello: HelloSpec::Valid,
            msgs,
        };
        assert!(run_input(&input), "{input:?}");
    }
}

/// `Msg::Switchover` is a right switchover in every verify mode.
#[test]
fn receiver_session_switchover_shortcut() {
    use dirtylog_fuzz::receiver_session::{run_input, HelloSpec, Input, Msg, Span};
    for verify in 0..3 {
        let input = Input {
            shape: [2, 2, 1, 9],
            chunk: 200,
            device: verify == 1,
            hello: HelloSpec::Valid,
            msgs: vec![
                Msg::Pages {
                    span: Span {
                        region: 1,
                        first: 0,
                        npages: 1,
                    },
                    seed: 3,
                },
                Msg::RoundEnd(None),
                Msg::Switchover {
                    verify,
                    device: verify == 1,
                },
            ],
        };
        assert!(run_input(&input), "{input:?}");
    }
}
