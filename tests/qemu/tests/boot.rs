//! Boots of the real disk image under qemu: first boot, the encrypted data partition, the health gate and
//! boot counting. Needs the images `just test-qemu` builds; `#[ignore]`d so `just test` skips them.

use cairn_qemu_tests::{image, Failure, Machine};
use std::time::Duration;

const ESP: &str = "C12A7328-F81F-11D2-BA4B-00A0C93EC93B";
const ROOT_X86_64: &str = "4F68BCE3-E8CD-4DB1-96E7-FBCAF984B709";
const ROOT_X86_64_VERITY: &str = "2C7357ED-EBD2-46D9-AEC1-23D437EC2BF5";
const LINUX_GENERIC: &str = "0FC63DAF-8483-4772-8E79-3D69D8477DE4";
/// A TCG boot is ~30 s to the gate on two cores; the first one also makes and encrypts the data partition.
const BOOT: Duration = Duration::from_secs(300);

type Result = std::result::Result<(), Failure>;

/// Each test's machine lives in `target/qemu/<test>` and is kept after the run, so a failure can be read
/// (serial logs, the disk); the next run starts it afresh.
fn machine_dir(test: &str) -> std::result::Result<std::path::PathBuf, Failure> {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../target/qemu")
        .join(test);
    if dir.exists() {
        std::fs::remove_dir_all(&dir)?;
    }
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}

#[test]
#[ignore = "qemu tier: run with `just test-qemu`"]
fn first_boot_makes_an_encrypted_data_partition_and_blesses_the_slot() -> Result {
    let dir = machine_dir("first-boot")?;
    let mut m = Machine::new(&dir, &image("1.0.0")?)?;
    assert_eq!(
        m.boot_entries()?,
        ["cairn-1.0.0-a+3.conf"],
        "a new image has three tries"
    );
    let before = m.partitions()?;
    assert_eq!(
        before
            .iter()
            .map(|p| (p.name.as_str(), p.type_guid.as_str()))
            .collect::<Vec<_>>(),
        [
            ("esp", ESP),
            ("root-a", ROOT_X86_64),
            ("root-a-verity", ROOT_X86_64_VERITY),
            ("root-b", ROOT_X86_64),
            ("root-b-verity", ROOT_X86_64_VERITY),
        ],
        "the image's layout, with Discoverable Partitions type GUIDs"
    );

    let mut boot = m.boot()?;
    let passed = boot.wait_for("health gate passed", BOOT)?;
    let first_gate = boot.elapsed();
    boot.wait_for(
        "Finished systemd-bless-boot.service",
        Duration::from_secs(60),
    )?;
    // The status screen on the serial port (cairn-console-serial.service), in words, as a tech's laptop
    // shows it.
    boot.wait_anywhere("CAIRN BOX", Duration::from_secs(60))?;
    boot.wait_anywhere(" OK   TPM         TPM 2.0", Duration::from_secs(60))?;
    boot.wait_anywhere(
        "Update      running 1.0.0 in slot a",
        Duration::from_secs(60),
    )?;
    let console = boot.console();
    assert!(
        console.contains("on /var"),
        "the gate saw the data partition:\n{console}"
    );
    // The gate writes "FAIL <check>"; the status screen's own lines are "FAIL  <Topic>".
    assert!(
        !console
            .lines()
            .any(|l| l.contains("FAIL ") && !l.contains("FAIL  ")),
        "no gate check failed:\n{console}"
    );
    boot.power_off(Duration::from_secs(120))?;
    eprintln!("first boot: gate passed after {first_gate:?} ({passed})");

    assert_eq!(
        m.boot_entries()?,
        ["cairn-1.0.0-a.conf"],
        "the boot was blessed"
    );
    let after = m.partitions()?;
    assert_eq!(
        after.len(),
        6,
        "systemd-repart added one partition: {after:?}"
    );
    let data = &after[5];
    assert_eq!(
        (data.name.as_str(), data.type_guid.as_str()),
        ("cairn-data", LINUX_GENERIC)
    );
    let disk_sectors = std::fs::metadata(m.disk())?.len() / 512;
    let left = disk_sectors - (data.start + data.sectors);
    assert!(
        left < 2048 + 34,
        "the data partition takes the free space ({left} sectors left): {data:?}"
    );
    let header = m.read_partition(data, 16 << 20)?;
    assert_eq!(&header[..6], b"LUKS\xba\xbe", "the data partition is LUKS");
    let json_end = header[4096..].iter().position(|b| *b == 0).unwrap_or(0);
    let luks: serde_json::Value = serde_json::from_slice(&header[4096..4096 + json_end])?;
    let keyslots = luks["keyslots"].as_object().map_or(0, |k| k.len());
    let tokens: Vec<&str> = luks["tokens"]
        .as_object()
        .map(|t| t.values().filter_map(|v| v["type"].as_str()).collect())
        .unwrap_or_default();
    assert_eq!(
        (keyslots, tokens),
        (1, vec!["systemd-tpm2"]),
        "one key, sealed to the TPM, and no password: {luks}"
    );

    // Second boot: the TPM unseals the key again, the gate passes again, nothing is re-created.
    let mut boot = m.boot()?;
    boot.wait_for("health gate passed", BOOT)?;
    let second_gate = boot.elapsed();
    boot.power_off(Duration::from_secs(120))?;
    eprintln!("second boot: gate passed after {second_gate:?}");
    assert_eq!(
        m.partitions()?,
        after,
        "the second boot changed no partition"
    );
    assert_eq!(m.boot_entries()?, ["cairn-1.0.0-a.conf"]);
    Ok(())
}
