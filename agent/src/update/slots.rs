//! The boot loader boundary: which slot runs, where each slot's root lives, and its systemd-boot entries on
//! the ESP (boot counting: `+LEFT[-DONE]` in the name while a boot is being assessed, no suffix once blessed).

use super::UpdateError;
use cairn_proto::update::{ImageVersion, Release};
use std::path::{Path, PathBuf};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Slot {
    A,
    B,
}

impl Slot {
    pub fn other(self) -> Slot {
        match self {
            Slot::A => Slot::B,
            Slot::B => Slot::A,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Slot::A => "a",
            Slot::B => "b",
        }
    }

    pub fn parse(s: &str) -> Option<Slot> {
        match s {
            "a" => Some(Slot::A),
            "b" => Some(Slot::B),
            _ => None,
        }
    }
}

/// A boot entry's standing, read from its file name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EntryState {
    Missing,
    /// Being assessed: `left` tries remain, `done` used.
    Trying {
        left: u32,
        done: u32,
    },
    Blessed,
}

pub trait BootSlots: Send + Sync {
    /// The version and slot of this boot.
    fn running(&self) -> Result<(ImageVersion, Slot), UpdateError>;
    /// The partitions holding a slot's root filesystem and its verity tree.
    fn root_device(&self, slot: Slot) -> PathBuf;
    fn verity_device(&self, slot: Slot) -> PathBuf;
    /// The ESP directory for a slot's kernel and initrd.
    fn kernel_dir(&self, version: &ImageVersion, slot: Slot) -> PathBuf;
    /// Makes a slot unbootable before it is overwritten: its entries go, and its kernels but those of
    /// `keep` (a write being resumed).
    fn clear(&self, slot: Slot, keep: Option<&ImageVersion>) -> Result<(), UpdateError>;
    /// Writes the entry that makes `release` in `slot` the next boot, with `tries` boots to prove itself.
    fn add_entry(&self, release: &Release, slot: Slot, tries: u32) -> Result<PathBuf, UpdateError>;
    fn entry_state(&self, version: &ImageVersion, slot: Slot) -> Result<EntryState, UpdateError>;
}

/// systemd-boot on a mounted ESP, partitions by GPT label, the slot on the kernel command line.
#[derive(Debug, Clone)]
pub struct Esp {
    pub esp: PathBuf,
    /// `/dev/disk/by-partlabel`: `root-a`, `root-a-verity`, `root-b`, `root-b-verity`.
    pub partitions: PathBuf,
    pub cmdline: PathBuf,
    pub os_release: PathBuf,
}

fn io(path: &Path) -> impl Fn(std::io::Error) -> UpdateError + '_ {
    move |source| UpdateError::Io {
        path: path.to_owned(),
        source,
    }
}

/// `cairn-<version>-<slot>` and what follows it in an entry's file name, if the name is one of ours.
fn parse_entry(name: &str) -> Option<(ImageVersion, Slot, EntryState)> {
    let stem = name.strip_prefix("cairn-")?.strip_suffix(".conf")?;
    let (base, counter) = match stem.split_once('+') {
        Some((b, c)) => (b, Some(c)),
        None => (stem, None),
    };
    let (version, slot) = base.rsplit_once('-')?;
    let version = version.parse().ok()?;
    let slot = Slot::parse(slot)?;
    let state = match counter {
        None => EntryState::Blessed,
        Some(c) => {
            let (left, done) = c.split_once('-').unwrap_or((c, "0"));
            EntryState::Trying {
                left: left.parse().ok()?,
                done: done.parse().ok()?,
            }
        }
    };
    Some((version, slot, state))
}

/// The entry text, the same layout as `image/entry.sh` (a test holds the two together).
pub fn entry_text(release: &Release, slot: Slot) -> String {
    let (v, s) = (release.version, slot.name());
    format!(
        "title cairn {v} (slot {s})\nversion {v}\nsort-key cairn\nlinux /EFI/cairn/{v}-{s}/vmlinuz\n\
         initrd /EFI/cairn/{v}-{s}/initrd\noptions roothash={} systemd.verity_root_data=/dev/disk/by-partlabel/root-{s} \
         systemd.verity_root_hash=/dev/disk/by-partlabel/root-{s}-verity root=/dev/mapper/root rootfstype=erofs ro \
         console=tty1 console=ttyS0,115200 fbcon=font:TER16x32 systemd.status_unit_format=name cairn.slot={s}\n",
        release.roothash
    )
}

impl Esp {
    fn entries_dir(&self) -> PathBuf {
        self.esp.join("loader/entries")
    }

    fn entries(&self) -> Result<Vec<(String, ImageVersion, Slot, EntryState)>, UpdateError> {
        let dir = self.entries_dir();
        let mut out = Vec::new();
        for e in std::fs::read_dir(&dir).map_err(io(&dir))? {
            let e = e.map_err(io(&dir))?;
            let name = e.file_name().to_string_lossy().into_owned();
            if let Some((v, s, st)) = parse_entry(&name) {
                out.push((name, v, s, st));
            }
        }
        Ok(out)
    }
}

fn sync_dir(dir: &Path) -> Result<(), UpdateError> {
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io(dir))
}

impl BootSlots for Esp {
    fn running(&self) -> Result<(ImageVersion, Slot), UpdateError> {
        let cmdline = std::fs::read_to_string(&self.cmdline).map_err(io(&self.cmdline))?;
        let slot = cmdline
            .split_whitespace()
            .find_map(|w| w.strip_prefix("cairn.slot="))
            .and_then(Slot::parse)
            .ok_or_else(|| UpdateError::NotAnImage {
                what: format!(
                    "{} has no cairn.slot=a or cairn.slot=b",
                    self.cmdline.display()
                ),
            })?;
        let os = std::fs::read_to_string(&self.os_release).map_err(io(&self.os_release))?;
        let version = os
            .lines()
            .find_map(|l| l.strip_prefix("IMAGE_VERSION="))
            .map(|v| v.trim_matches('"'))
            .ok_or_else(|| UpdateError::NotAnImage {
                what: format!("{} has no IMAGE_VERSION", self.os_release.display()),
            })?;
        let version = version
            .parse()
            .map_err(
                |e: cairn_proto::update::VersionError| UpdateError::NotAnImage {
                    what: format!("{}: {e}", self.os_release.display()),
                },
            )?;
        Ok((version, slot))
    }

    fn root_device(&self, slot: Slot) -> PathBuf {
        self.partitions.join(format!("root-{}", slot.name()))
    }

    fn verity_device(&self, slot: Slot) -> PathBuf {
        self.partitions.join(format!("root-{}-verity", slot.name()))
    }

    fn kernel_dir(&self, version: &ImageVersion, slot: Slot) -> PathBuf {
        self.esp
            .join(format!("EFI/cairn/{version}-{}", slot.name()))
    }

    fn clear(&self, slot: Slot, keep: Option<&ImageVersion>) -> Result<(), UpdateError> {
        let dir = self.entries_dir();
        for (name, _, s, _) in self.entries()? {
            if s == slot {
                let path = dir.join(&name);
                std::fs::remove_file(&path).map_err(io(&path))?;
            }
        }
        sync_dir(&dir)?;
        let kernels = self.esp.join("EFI/cairn");
        if let Ok(list) = std::fs::read_dir(&kernels) {
            let suffix = format!("-{}", slot.name());
            let kept = keep.map(|v| format!("{v}-{}", slot.name()));
            for e in list.flatten() {
                let name = e.file_name().to_string_lossy().into_owned();
                if name.ends_with(&suffix) && Some(&name) != kept.as_ref() {
                    let path = e.path();
                    std::fs::remove_dir_all(&path).map_err(io(&path))?;
                }
            }
        }
        Ok(())
    }

    fn add_entry(&self, release: &Release, slot: Slot, tries: u32) -> Result<PathBuf, UpdateError> {
        let dir = self.entries_dir();
        let path = dir.join(format!(
            "cairn-{}-{}+{}.conf",
            release.version,
            slot.name(),
            tries.max(1)
        ));
        let tmp = dir.join(".cairn-entry.tmp");
        {
            use std::io::Write;
            let mut f = std::fs::File::create(&tmp).map_err(io(&tmp))?;
            f.write_all(entry_text(release, slot).as_bytes())
                .and_then(|_| f.sync_all())
                .map_err(io(&tmp))?;
        }
        std::fs::rename(&tmp, &path).map_err(io(&path))?;
        sync_dir(&dir)?;
        Ok(path)
    }

    fn entry_state(&self, version: &ImageVersion, slot: Slot) -> Result<EntryState, UpdateError> {
        Ok(self
            .entries()?
            .into_iter()
            .find(|(_, v, s, _)| v == version && *s == slot)
            .map(|(_, _, _, st)| st)
            .unwrap_or(EntryState::Missing))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entry_names_follow_boot_counting() {
        let v = |s: &str| s.parse::<ImageVersion>().unwrap();
        assert_eq!(
            parse_entry("cairn-1.0.0-a.conf"),
            Some((v("1.0.0"), Slot::A, EntryState::Blessed))
        );
        assert_eq!(
            parse_entry("cairn-2.0.0-b+3.conf"),
            Some((v("2.0.0"), Slot::B, EntryState::Trying { left: 3, done: 0 }))
        );
        assert_eq!(
            parse_entry("cairn-3.0.0-a+0-3.conf"),
            Some((v("3.0.0"), Slot::A, EntryState::Trying { left: 0, done: 3 }))
        );
        for other in [
            "debian.conf",
            "cairn-1.0.0-c.conf",
            "cairn-1.0-a.conf",
            "cairn-1.0.0-a+x.conf",
            "cairn-1.0.0-a.conf~",
        ] {
            assert_eq!(parse_entry(other), None, "{other}");
        }
    }

    #[test]
    fn the_entry_matches_what_the_image_build_writes() {
        let release = cairn_proto::update::Release {
            schema: cairn_proto::update::RELEASE_SCHEMA,
            version: "2.1.0".parse().unwrap(),
            roothash: "ab".repeat(32),
            kernel: "6.1.0-57-cloud-amd64".into(),
            root: empty(),
            verity: empty(),
            vmlinuz: empty(),
            initrd: empty(),
            max_wave: 9,
            allow_downgrade: false,
        };
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../image/entry.sh");
        for slot in [Slot::A, Slot::B] {
            let out = std::process::Command::new("bash")
                .arg(&script)
                .args(["2.1.0", slot.name(), &"ab".repeat(32)])
                .output()
                .unwrap();
            assert!(
                out.status.success(),
                "{}",
                String::from_utf8_lossy(&out.stderr)
            );
            assert_eq!(
                String::from_utf8(out.stdout).unwrap(),
                entry_text(&release, slot)
            );
        }
    }

    fn empty() -> cairn_proto::update::Piece {
        cairn_proto::update::Piece {
            bytes: 0,
            sha256: "0".repeat(64),
            chunks: vec![],
        }
    }
}
