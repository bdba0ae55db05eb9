//! The swtpm helper, against a real swtpm: manufactured with EK certificates, reachable through tss-esapi, one
//! TPM per state directory, and gone when stopped.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly by design

use cairn_tpm::swtpm::Swtpm;
use cairn_tpm::Tpm;

/// Running (a zombie left for a parent that never reaps it counts as stopped).
fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| {
        s.rsplit_once(") ")
            .is_some_and(|(_, rest)| !rest.starts_with('Z'))
    })
}

fn kinds(info: &cairn_tpm::TpmInfo) -> Vec<(u32, &'static str)> {
    info.ek_certificates
        .iter()
        .map(|c| (c.nv_index, c.kind))
        .collect()
}

#[test]
fn swtpm_has_ek_certificates_and_answers_tss() {
    let dir = tempfile::tempdir().unwrap();
    let sw = Swtpm::start(dir.path()).unwrap();
    let info = Tpm::new(sw.tcti()).unwrap().probe().unwrap();
    assert_eq!(info.manufacturer, "IBM");
    assert_eq!(
        kinds(&info),
        vec![(0x01c0_0002, "rsa2048"), (0x01c0_0016, "ecc-p384")]
    );
    // Opened per operation: a second probe must get the (single-client) TPM again.
    assert_eq!(Tpm::new(sw.tcti()).unwrap().probe().unwrap(), info);
}

#[test]
fn two_instances_are_separate_and_stop_cleanly() {
    let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let sa = Swtpm::start(a.path()).unwrap();
    let sb = Swtpm::start(b.path()).unwrap();
    assert_ne!(sa.tcti(), sb.tcti());
    let (pa, pb) = (sa.pid(), sb.pid());
    assert!(alive(pa) && alive(pb));
    drop(sa);
    assert!(!alive(pa), "swtpm {pa} still runs after stop");
    assert!(alive(pb));
    // The state survives a restart: same directory, same TPM (no re-manufacture).
    drop(sb);
    let again = Swtpm::start(b.path()).unwrap();
    assert_eq!(
        Tpm::new(again.tcti())
            .unwrap()
            .probe()
            .unwrap()
            .ek_certificates
            .len(),
        2
    );
    drop(again);
    // swtpm rewrites its state file on shutdown, but the manufacturing log is written once.
    let log = std::fs::read_to_string(b.path().join("swtpm_setup.log")).unwrap();
    assert_eq!(
        log.matches("Starting vTPM manufacturing").count(),
        1,
        "restart re-manufactured the TPM"
    );
}

#[test]
fn unreachable_tpm_is_an_error_naming_the_tcti() {
    let tpm = Tpm::new("swtpm:host=127.0.0.1,port=1").unwrap();
    let err = tpm.probe().unwrap_err();
    assert!(err.to_string().contains("port=1"), "{err}");
}

#[test]
fn malformed_tcti_is_refused_up_front() {
    let err = Tpm::new("swtpm:port=notanumber").unwrap_err();
    assert!(err.to_string().contains("not valid"), "{err}");
}
