//! What a good boot of an image measures, computed from the image's boot files at build time: the
//! `reference-measurements.json` the fleet attests devices running that image against.
//!
//! PCR 4 is the one the image alone decides. UEFI firmware extends it, in order, with the "Calling EFI
//! Application from Boot Option" action, the separator between pre-boot and boot, and the Authenticode
//! SHA-256 of each PE image it loads: systemd-boot (`BOOTX64.EFI`), then the kernel systemd-boot starts. The
//! other firmware PCRs (0–3, 5–7) depend on the board, its firmware and its settings, so they are pinned per
//! device at its first attestation instead (see `attestation`).

use ring::digest::{Context, SHA256};
use std::path::{Path, PathBuf};

/// The EV_EFI_ACTION event data firmware measures into PCR 4 before the first boot option starts.
const CALLING_EFI_APPLICATION: &[u8] = b"Calling EFI Application from Boot Option";
/// An EV_SEPARATOR's data: four zero bytes.
const SEPARATOR: [u8; 4] = [0; 4];

#[derive(Debug, thiserror::Error)]
pub enum MeasureError {
    #[error("cannot read boot file {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("boot file {path} is not a PE image firmware can load: {reason}")]
    NotPe { path: PathBuf, reason: String },
    #[error("cannot write {path}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

fn u16_at(b: &[u8], at: usize) -> Result<u16, String> {
    b.get(at..at + 2)
        .map(|s| u16::from_le_bytes([s[0], s[1]]))
        .ok_or_else(|| {
            format!(
                "it ends at byte {}, inside its headers (offset {at})",
                b.len()
            )
        })
}

fn u32_at(b: &[u8], at: usize) -> Result<u32, String> {
    b.get(at..at + 4)
        .map(|s| u32::from_le_bytes([s[0], s[1], s[2], s[3]]))
        .ok_or_else(|| {
            format!(
                "it ends at byte {}, inside its headers (offset {at})",
                b.len()
            )
        })
}

fn range<'a>(b: &'a [u8], start: usize, end: usize, what: &str) -> Result<&'a [u8], String> {
    b.get(start..end).ok_or_else(|| {
        format!(
            "its {what} ({start}..{end}) runs past its end ({} bytes)",
            b.len()
        )
    })
}

/// The Authenticode SHA-256 of a PE image, as firmware measures it: the whole file in section order, less
/// the checksum, the certificate table's directory entry and the certificate table (the signature) itself.
pub fn authenticode_sha256(pe: &[u8]) -> Result<[u8; 32], String> {
    if pe.get(..2) != Some(b"MZ") {
        return Err("it does not start with MZ".into());
    }
    let nt = u32_at(pe, 0x3c)? as usize;
    if pe.get(nt..nt + 4) != Some(b"PE\0\0") {
        return Err(format!("there is no PE signature at offset {nt}"));
    }
    let coff = nt + 4;
    let sections = usize::from(u16_at(pe, coff + 2)?);
    let opt_size = usize::from(u16_at(pe, coff + 16)?);
    let opt = coff + 20;
    // The optional header's layout differs between PE32 and PE32+ after the base of code.
    let (rva_count_at, dirs_at) = match u16_at(pe, opt)? {
        0x10b => (opt + 92, opt + 96),
        0x20b => (opt + 108, opt + 112),
        m => {
            return Err(format!(
                "its optional header magic is {m:#x}, not PE32 or PE32+"
            ))
        }
    };
    let checksum_at = opt + 64;
    let headers_end = u32_at(pe, opt + 60)? as usize;
    let rva_count = u32_at(pe, rva_count_at)?;
    let cert_dir_at = dirs_at + 4 * 8;
    let (cert_at, cert_size) = if rva_count > 4 {
        (
            u32_at(pe, cert_dir_at)? as usize,
            u32_at(pe, cert_dir_at + 4)? as usize,
        )
    } else {
        (0, 0)
    };

    let mut h = Context::new(&SHA256);
    h.update(range(pe, 0, checksum_at, "headers")?);
    if rva_count > 4 {
        h.update(range(pe, checksum_at + 4, cert_dir_at, "headers")?);
        h.update(range(pe, cert_dir_at + 8, headers_end, "headers")?);
    } else {
        h.update(range(pe, checksum_at + 4, headers_end, "headers")?);
    }
    let table = opt + opt_size;
    let mut raw: Vec<(usize, usize)> = Vec::with_capacity(sections);
    for i in 0..sections {
        let s = table + 40 * i;
        let size = u32_at(pe, s + 16)? as usize;
        let ptr = u32_at(pe, s + 20)? as usize;
        if size > 0 {
            raw.push((ptr, size));
        }
    }
    raw.sort_unstable();
    let mut hashed = headers_end;
    for (ptr, size) in raw {
        h.update(range(pe, ptr, ptr + size, "section data")?);
        hashed += size;
    }
    // Data after the sections (other than the signature) is hashed too, as EDK2 does.
    if pe.len() > hashed + cert_size {
        h.update(range(pe, hashed, pe.len() - cert_size, "trailing data")?);
    }
    if cert_size > 0 && cert_at + cert_size > pe.len() {
        return Err(format!(
            "its certificate table ({cert_at}+{cert_size}) runs past its end ({} bytes)",
            pe.len()
        ));
    }
    let mut out = [0u8; 32];
    out.copy_from_slice(h.finish().as_ref());
    Ok(out)
}

fn sha256(data: &[u8]) -> [u8; 32] {
    let mut out = [0u8; 32];
    out.copy_from_slice(ring::digest::digest(&SHA256, data).as_ref());
    out
}

fn extend(pcr: &mut [u8; 32], digest: &[u8; 32]) {
    let mut h = Context::new(&SHA256);
    h.update(pcr);
    h.update(digest);
    pcr.copy_from_slice(h.finish().as_ref());
}

/// PCR 4 after firmware started `loader`, which started each of `images` in turn.
pub fn pcr4(loader: &[u8], images: &[&[u8]]) -> Result<[u8; 32], String> {
    let mut pcr = [0u8; 32];
    extend(&mut pcr, &sha256(CALLING_EFI_APPLICATION));
    extend(&mut pcr, &sha256(&SEPARATOR));
    extend(
        &mut pcr,
        &authenticode_sha256(loader).map_err(|e| format!("the boot loader: {e}"))?,
    );
    for image in images {
        extend(&mut pcr, &authenticode_sha256(image)?);
    }
    Ok(pcr)
}

fn read(path: &Path) -> Result<Vec<u8>, MeasureError> {
    std::fs::read(path).map_err(|source| MeasureError::Read {
        path: path.to_owned(),
        source,
    })
}

/// `reference-measurements.json` (the `--reference` format of `cairn-fleet serve`) for an image whose
/// `loader` starts `kernel`, accepted under `name`.
pub fn reference_json(name: &str, loader: &Path, kernel: &Path) -> Result<String, MeasureError> {
    let l = read(loader)?;
    let k = read(kernel)?;
    let not_pe = |path: &Path, reason: String| MeasureError::NotPe {
        path: path.to_owned(),
        reason,
    };
    authenticode_sha256(&l).map_err(|r| not_pe(loader, r))?;
    authenticode_sha256(&k).map_err(|r| not_pe(kernel, r))?;
    let pcr = pcr4(&l, &[&k]).map_err(|r| not_pe(kernel, r))?;
    let doc = serde_json::json!({
        "version": 1,
        "accepted": [{ "name": name, "sha256": { "4": cairn_proto::fleet::to_hex(&pcr) } }],
    });
    Ok(format!("{doc:#}\n"))
}

/// Writes [`reference_json`] to `out`.
pub fn write_reference(
    name: &str,
    loader: &Path,
    kernel: &Path,
    out: &Path,
) -> Result<(), MeasureError> {
    let text = reference_json(name, loader, kernel)?;
    std::fs::write(out, text).map_err(|source| MeasureError::Write {
        path: out.to_owned(),
        source,
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    /// A minimal PE32+ image: headers (0x200), one section of 0x200 bytes, optionally a signature after it.
    fn pe(section_byte: u8, signature: &[u8]) -> Vec<u8> {
        let mut b = vec![0u8; 0x400];
        b[..2].copy_from_slice(b"MZ");
        b[0x3c..0x40].copy_from_slice(&0x80u32.to_le_bytes());
        b[0x80..0x84].copy_from_slice(b"PE\0\0");
        let coff = 0x84;
        b[coff + 2..coff + 4].copy_from_slice(&1u16.to_le_bytes());
        b[coff + 16..coff + 18].copy_from_slice(&240u16.to_le_bytes());
        let opt = coff + 20;
        b[opt..opt + 2].copy_from_slice(&0x20bu16.to_le_bytes());
        b[opt + 60..opt + 64].copy_from_slice(&0x200u32.to_le_bytes());
        b[opt + 108..opt + 112].copy_from_slice(&16u32.to_le_bytes());
        let s = opt + 240;
        b[s + 16..s + 20].copy_from_slice(&0x200u32.to_le_bytes());
        b[s + 20..s + 24].copy_from_slice(&0x200u32.to_le_bytes());
        b[0x200..0x400].fill(section_byte);
        if !signature.is_empty() {
            let cert = opt + 112 + 32;
            b[cert..cert + 4].copy_from_slice(&0x400u32.to_le_bytes());
            b[cert + 4..cert + 8].copy_from_slice(&(signature.len() as u32).to_le_bytes());
            b.extend_from_slice(signature);
        }
        b
    }

    #[test]
    fn the_hash_ignores_checksum_and_signature_and_sees_the_code() {
        let plain = pe(0x90, b"");
        let base = authenticode_sha256(&plain).unwrap();
        // Computed by hand from the rule: headers less checksum and certificate entry, then the section.
        let opt = 0x84 + 20;
        let mut h = Context::new(&SHA256);
        h.update(&plain[..opt + 64]);
        h.update(&plain[opt + 68..opt + 144]);
        h.update(&plain[opt + 152..0x200]);
        h.update(&plain[0x200..0x400]);
        assert_eq!(base.as_slice(), h.finish().as_ref());

        let mut checksummed = plain.clone();
        checksummed[opt + 64] = 0x5a;
        assert_eq!(authenticode_sha256(&checksummed).unwrap(), base);
        // Signing adds a table and its directory entry, which the hash leaves out: same hash.
        assert_eq!(
            authenticode_sha256(&pe(0x90, &[7u8; 64])).unwrap(),
            base,
            "a signature does not change the hash"
        );
        assert_ne!(
            authenticode_sha256(&pe(0x91, b"")).unwrap(),
            base,
            "a changed byte of code does"
        );
        // Data appended after the sections (not a signature) is hashed.
        let mut appended = plain.clone();
        appended.extend_from_slice(b"extra");
        assert_ne!(authenticode_sha256(&appended).unwrap(), base);
    }

    #[test]
    fn pcr4_chains_action_separator_loader_and_kernel() {
        let (l, k) = (pe(1, b""), pe(2, b""));
        let mut want = [0u8; 32];
        for d in [
            sha256(b"Calling EFI Application from Boot Option"),
            sha256(&[0, 0, 0, 0]),
            authenticode_sha256(&l).unwrap(),
            authenticode_sha256(&k).unwrap(),
        ] {
            let mut h = Context::new(&SHA256);
            h.update(&want);
            h.update(&d);
            want.copy_from_slice(h.finish().as_ref());
        }
        assert_eq!(pcr4(&l, &[&k]).unwrap(), want);
        assert_ne!(pcr4(&k, &[&l]).unwrap(), want, "order matters");
    }

    #[test]
    fn files_that_are_not_pe_images_are_named() {
        for (bytes, needle) in [
            (b"ELF".to_vec(), "does not start with MZ"),
            (pe(1, b"")[..0x150].to_vec(), "runs past its end"),
            (
                {
                    let mut b = pe(1, b"");
                    b[0x80] = b'X';
                    b
                },
                "no PE signature",
            ),
        ] {
            let err = authenticode_sha256(&bytes).unwrap_err();
            assert!(err.contains(needle), "{err}");
        }
        let dir = tempfile::tempdir().unwrap();
        let (l, k) = (dir.path().join("loader.efi"), dir.path().join("vmlinuz"));
        std::fs::write(&l, pe(1, b"")).unwrap();
        std::fs::write(&k, b"not a kernel").unwrap();
        let err = reference_json("cairn 1.0.0", &l, &k)
            .unwrap_err()
            .to_string();
        assert!(err.contains("vmlinuz") && err.contains("MZ"), "{err}");
        std::fs::write(&k, pe(2, b"")).unwrap();
        let text = reference_json("cairn 1.0.0", &l, &k).unwrap();
        let r = crate::reference::Reference::parse(text.as_bytes()).unwrap();
        assert_eq!(r.accepted[0].name, "cairn 1.0.0");
        assert_eq!(
            r.accepted[0].sha256.get(&4),
            Some(&pcr4(&pe(1, b""), &[&pe(2, b"")]).unwrap())
        );
    }
}
