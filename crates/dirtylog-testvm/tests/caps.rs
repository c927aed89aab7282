//! Capability probing on /dev/kvm (`dirtylog caps [--json]`).

mod common;

use dirtylog_testvm::{caps_report, Caps};

#[test]
fn caps_probe_and_render() {
    let _kvm = common::require_kvm();
    let c = Caps::probe().unwrap();
    eprintln!("{}", c.table());
    assert_eq!(c.api_version, 12);
    assert!(
        c.manual_protect(),
        "KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2 has been in every kernel since 5.3"
    );
    assert!(c.nr_memslots > 0 && c.address_spaces() >= 1);
    let cfg = c.vm_config();
    assert_eq!(cfg.nr_as, c.address_spaces());
    assert_eq!(cfg.max_slots as i64, c.nr_memslots);
    if let Ok((_, entries)) = c.require_ring() {
        assert!(entries.is_power_of_two() && entries <= 65536, "{entries}");
    }
    let json: serde_json::Value = serde_json::from_str(&caps_report(true).unwrap()).unwrap();
    assert_eq!(json["api_version"], 12);
    assert_eq!(
        json["manual_dirty_log_protect2"],
        c.manual_dirty_log_protect2
    );
    let table = caps_report(false).unwrap();
    assert!(
        table.contains("KVM_CAP_DIRTY_LOG_RING_ACQ_REL") && table.contains("dirty-log modes:"),
        "{table}"
    );
}
