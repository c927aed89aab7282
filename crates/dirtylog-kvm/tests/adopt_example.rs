//! Runs `examples/adopt.rs` (the code a VMM author copies) in `cargo test`: the example is
//! compiled in as a module and its `check`, which its `main` turns into the exit status, must
//! succeed for every tracker. Needs `/dev/kvm` (fails without it).

#[allow(dead_code)] // the example's `main`
#[path = "../examples/adopt.rs"]
mod adopt;

#[test]
fn the_adopt_example_harvests_exactly_the_pages_written() {
    assert!(
        std::path::Path::new("/dev/kvm").exists(),
        "this test needs /dev/kvm: load kvm_intel or kvm_amd and run as root"
    );
    assert!(
        adopt::check(&[]),
        "examples/adopt.rs failed (its output is above)"
    );
    // The check can fail: a tracker name it cannot use is an error, not a pass.
    assert!(!adopt::check(&["ring:100".to_string()]));
}
