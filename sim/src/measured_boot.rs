//! A simulated UEFI measured boot for the software TPM: what firmware would extend into PCRs 0-7 and log, so
//! tests and the demo have an event log that replays to the TPM's PCRs, and two images differ in PCR 4.
//!
//! Each stage's digest is the SHA-256 of its event data. Real firmware measures some events that way
//! (separators, EFI actions, UEFI variables) and others not (a PE image's digest is its Authenticode hash);
//! the replay does not care, it uses the digests.

use cairn_fleet::eventlog::sha256;
use cairn_proto::eventlog::{
    self, Event, EventLog, EV_EFI_ACTION, EV_EFI_BOOT_SERVICES_APPLICATION,
    EV_EFI_VARIABLE_AUTHORITY, EV_EFI_VARIABLE_BOOT, EV_EFI_VARIABLE_DRIVER_CONFIG, EV_POST_CODE,
    EV_SEPARATOR, EV_S_CRTM_VERSION, TPM_ALG_SHA256,
};
use std::process::Command;

/// One measurement: `data` is logged, SHA-256(`data`) is extended into `pcr`'s SHA-256 bank.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BootStage {
    pub pcr: u8,
    pub event_type: u32,
    pub data: Vec<u8>,
}

impl BootStage {
    pub fn digest(&self) -> [u8; 32] {
        sha256(&self.data)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum MeasuredBootError {
    #[error("boot stage {stage} measures into PCR {pcr}; a TPM has PCRs 0 to 23 only")]
    PcrOutOfRange { stage: usize, pcr: u8 },
    #[error("could not run tpm2_pcrextend: run `just deps` (Debian package tpm2-tools)")]
    Spawn(#[source] std::io::Error),
    #[error("tpm2_pcrextend on {tcti} failed ({status}), so the TPM holds only part of the boot: {stderr}")]
    Extend {
        tcti: String,
        status: std::process::ExitStatus,
        stderr: String,
    },
}

/// The locality swtpm's TPM2_Startup runs at (`swtpm-start` passes `--flags startup-clear`).
const STARTUP_LOCALITY: u8 = 0;

/// EFI_GLOBAL_VARIABLE, 8BE4DF61-93CA-11D2-AA0D-00E098032B8C, in its in-memory (mixed-endian) layout.
const EFI_GLOBAL_VARIABLE: [u8; 16] = [
    0x61, 0xdf, 0xe4, 0x8b, 0xca, 0x93, 0xd2, 0x11, 0xaa, 0x0d, 0x00, 0xe0, 0x98, 0x03, 0x2b, 0x8c,
];
/// EFI_IMAGE_SECURITY_DATABASE_GUID, D719B2CB-3D3A-4596-A3BC-DAD00E67656F.
const EFI_IMAGE_SECURITY_DATABASE: [u8; 16] = [
    0xcb, 0xb2, 0x19, 0xd7, 0x3a, 0x3d, 0x96, 0x45, 0xa3, 0xbc, 0xda, 0xd0, 0x0e, 0x67, 0x65, 0x6f,
];

fn utf16le(s: &str) -> Vec<u8> {
    s.encode_utf16().flat_map(u16::to_le_bytes).collect()
}

/// UEFI_VARIABLE_DATA: vendor GUID, name length (characters), data length, name (UTF-16LE, no NUL), data.
fn variable(guid: &[u8; 16], name: &str, value: &[u8]) -> Vec<u8> {
    let mut out = guid.to_vec();
    out.extend_from_slice(&(name.encode_utf16().count() as u64).to_le_bytes());
    out.extend_from_slice(&(value.len() as u64).to_le_bytes());
    out.extend_from_slice(&utf16le(name));
    out.extend_from_slice(value);
    out
}

/// UEFI_IMAGE_LOAD_EVENT for an image loaded from `path` on the ESP: location, length and link address in
/// memory, then a device path of one media file-path node and the end node.
fn image_load(location: u64, length: u64, path: &str) -> Vec<u8> {
    let mut file = utf16le(path);
    file.extend_from_slice(&[0, 0]);
    let mut device_path = vec![0x04, 0x04]; // MEDIA_DEVICE_PATH, MEDIA_FILEPATH_DP
    device_path.extend_from_slice(&((4 + file.len()) as u16).to_le_bytes());
    device_path.extend_from_slice(&file);
    device_path.extend_from_slice(&[0x7f, 0xff, 0x04, 0x00]); // end of the whole device path
    let mut out = Vec::new();
    for v in [location, length, 0, device_path.len() as u64] {
        out.extend_from_slice(&v.to_le_bytes());
    }
    out.extend_from_slice(&device_path);
    out
}

/// A plausible UEFI boot, in firmware order: S-CRTM version and POST code (PCR 0), Secure Boot variables
/// (PCR 7), boot variables (PCR 1), the boot attempt (PCR 4), separators on PCRs 0-7, a boot manager and the
/// cairn UKI (PCR 4, the latter's path naming `image_version`, so two images give two PCR 4 values), the `db`
/// entry that verified them (PCR 7), and ExitBootServices (PCR 5).
pub fn default_boot(image_version: &str) -> Vec<BootStage> {
    let stage = |pcr: u8, event_type: u32, data: Vec<u8>| BootStage {
        pcr,
        event_type,
        data,
    };
    let mut boot_option = 1u32.to_le_bytes().to_vec(); // LOAD_OPTION_ACTIVE
    boot_option.extend_from_slice(&4u16.to_le_bytes());
    boot_option.extend_from_slice(&utf16le("cairn\0"));
    boot_option.extend_from_slice(&[0x7f, 0xff, 0x04, 0x00]);

    let mut stages = vec![
        stage(0, EV_S_CRTM_VERSION, utf16le("cairn-sim firmware 1.0\0")),
        stage(0, EV_POST_CODE, b"POST CODE".to_vec()),
        stage(
            7,
            EV_EFI_VARIABLE_DRIVER_CONFIG,
            variable(&EFI_GLOBAL_VARIABLE, "SecureBoot", &[1]),
        ),
        stage(
            7,
            EV_EFI_VARIABLE_DRIVER_CONFIG,
            variable(&EFI_GLOBAL_VARIABLE, "PK", b"cairn-sim platform key"),
        ),
        stage(
            7,
            EV_EFI_VARIABLE_DRIVER_CONFIG,
            variable(&EFI_GLOBAL_VARIABLE, "KEK", b"cairn-sim key exchange key"),
        ),
        stage(
            7,
            EV_EFI_VARIABLE_DRIVER_CONFIG,
            variable(
                &EFI_IMAGE_SECURITY_DATABASE,
                "db",
                b"cairn-sim image signing key",
            ),
        ),
        stage(
            7,
            EV_EFI_VARIABLE_DRIVER_CONFIG,
            variable(&EFI_IMAGE_SECURITY_DATABASE, "dbx", b""),
        ),
        stage(
            1,
            EV_EFI_VARIABLE_BOOT,
            variable(&EFI_GLOBAL_VARIABLE, "BootOrder", &[0, 0]),
        ),
        stage(
            1,
            EV_EFI_VARIABLE_BOOT,
            variable(&EFI_GLOBAL_VARIABLE, "Boot0000", &boot_option),
        ),
        stage(
            4,
            EV_EFI_ACTION,
            b"Calling EFI Application from Boot Option".to_vec(),
        ),
    ];
    for pcr in 0..=7 {
        stages.push(stage(pcr, EV_SEPARATOR, vec![0; 4]));
    }
    stages.extend([
        stage(
            4,
            EV_EFI_BOOT_SERVICES_APPLICATION,
            image_load(0x7e00_0000, 0x2_0000, "\\EFI\\BOOT\\BOOTX64.EFI"),
        ),
        stage(
            7,
            EV_EFI_VARIABLE_AUTHORITY,
            variable(
                &EFI_IMAGE_SECURITY_DATABASE,
                "db",
                b"cairn-sim image signing key",
            ),
        ),
        stage(
            4,
            EV_EFI_BOOT_SERVICES_APPLICATION,
            image_load(
                0x7c00_0000,
                0x200_0000,
                &format!("\\EFI\\Linux\\cairn-{image_version}.efi"),
            ),
        ),
        stage(5, EV_EFI_ACTION, b"Exit Boot Services Invocation".to_vec()),
        stage(
            5,
            EV_EFI_ACTION,
            b"Exit Boot Services Returned with Success".to_vec(),
        ),
    ]);
    stages
}

/// The event log firmware would write for `stages`: a SHA-256-only bank, the StartupLocality event of
/// swtpm's startup, then one event per stage.
pub fn event_log(stages: &[BootStage]) -> EventLog {
    let algorithms = vec![(TPM_ALG_SHA256, 32)];
    let mut events = vec![Event::startup_locality_event(STARTUP_LOCALITY, &algorithms)];
    events.extend(stages.iter().map(|s| Event {
        pcr: u32::from(s.pcr),
        event_type: s.event_type,
        digests: vec![(TPM_ALG_SHA256, s.digest().to_vec())],
        data: s.data.clone(),
    }));
    EventLog { algorithms, events }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Extends each stage, in order, into the SHA-256 bank of the TPM at `tcti` (one `tpm2_pcrextend` for all of
/// them) and returns the encoded event log (see [`event_log`]). The TPM should be freshly started, as
/// firmware's would be: the log replays to its PCRs only if they were zero before.
pub fn boot(tcti: &str, stages: &[BootStage]) -> Result<Vec<u8>, MeasuredBootError> {
    if let Some((stage, s)) = stages.iter().enumerate().find(|(_, s)| s.pcr > 23) {
        return Err(MeasuredBootError::PcrOutOfRange { stage, pcr: s.pcr });
    }
    if !stages.is_empty() {
        let out = Command::new("tpm2_pcrextend")
            .arg("-T")
            .arg(tcti)
            .args(
                stages
                    .iter()
                    .map(|s| format!("{}:sha256={}", s.pcr, hex(&s.digest()))),
            )
            .output()
            .map_err(MeasuredBootError::Spawn)?;
        if !out.status.success() {
            return Err(MeasuredBootError::Extend {
                tcti: tcti.to_owned(),
                status: out.status,
                stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
            });
        }
    }
    Ok(eventlog::encode(&event_log(stages)))
}
