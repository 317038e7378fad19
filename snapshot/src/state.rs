//! The state file: a versioned, checksummed container for the VM's saved state.
//!
//! Layout (all integers little-endian; `FORMAT.md` is the reference):
//!
//! | offset | size | field |
//! |---|---|---|
//! | 0 | 8 | magic `STRATAST` |
//! | 8 | 4 | format version (1) |
//! | 12 | 4 | flags, must be 0 |
//! | 16 | 8 | payload length N |
//! | 24 | N | payload: the state as JSON (UTF-8) |
//! | 24+N | 8 | CRC-64/XZ of bytes `0..24+N` |
//!
//! Loading checks, in this order: the file is at least a header long (else truncated), the
//! magic, the version and flags, the length against the cap (refused before any allocation),
//! the file's size against the length (truncated / trailing bytes), the checksum, then the
//! decoding. Each failure is a typed [`Error`] naming the file.

use std::fs::File;
use std::io::Read;
use std::os::unix::fs::FileExt;
use std::path::Path;

use crc::{Crc, Table, CRC_64_XZ};
use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::error::{Error, IoContext, Result};
use crate::fsutil;

/// The state file's magic.
pub const STATE_MAGIC: [u8; 8] = *b"STRATAST";
/// The state file format version this build writes and reads.
pub const STATE_VERSION: u32 = 1;
/// Header length: magic, version, flags, payload length.
pub const STATE_HEADER_LEN: u64 = 24;
/// Trailer length: the CRC-64.
pub const STATE_TRAILER_LEN: u64 = 8;
/// The default cap on a state payload when loading: 64 MiB. A VM's state (vCPUs, irqchip,
/// devices) is tens of KiB per vCPU; anything near this is corrupt or foreign.
pub const DEFAULT_STATE_CAP: u64 = 64 << 20;

/// The CRC-64 used across the store: CRC-64/XZ (the ECMA-182 polynomial, reflected, init and
/// xorout all ones; check value `0x995dc9bbdf1939fa`), slice-by-16.
pub(crate) const CRC64: Crc<u64, Table<16>> = Crc::<u64, Table<16>>::new(&CRC_64_XZ);

/// The bytes of a state file holding `payload`.
pub fn encode_state_bytes(payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(payload.len() + 32);
    out.extend_from_slice(&STATE_MAGIC);
    out.extend_from_slice(&STATE_VERSION.to_le_bytes());
    out.extend_from_slice(&0u32.to_le_bytes());
    out.extend_from_slice(&(payload.len() as u64).to_le_bytes());
    out.extend_from_slice(payload);
    let crc = CRC64.checksum(&out);
    out.extend_from_slice(&crc.to_le_bytes());
    out
}

/// What a state file's header says.
struct Header {
    len: u64,
}

fn parse_header(path: &Path, h: &[u8; 24], file_len: u64, cap: u64) -> Result<Header> {
    if h[..8] != STATE_MAGIC {
        return Err(Error::BadMagic {
            path: path.into(),
            found: h[..8].to_vec(),
            kind: "state file",
        });
    }
    let version = u32::from_le_bytes([h[8], h[9], h[10], h[11]]);
    if version != STATE_VERSION {
        return Err(Error::UnsupportedVersion {
            path: path.into(),
            found: version.into(),
            supported: STATE_VERSION.into(),
        });
    }
    let flags = u32::from_le_bytes([h[12], h[13], h[14], h[15]]);
    if flags != 0 {
        return Err(Error::invalid(
            path,
            format!("unknown flags {flags:#x} in the state file header"),
        ));
    }
    let mut l = [0u8; 8];
    l.copy_from_slice(&h[16..24]);
    let len = u64::from_le_bytes(l);
    if len > cap {
        return Err(Error::TooLarge {
            path: path.into(),
            len,
            cap,
        });
    }
    // Cannot overflow: len <= cap, and caps are far below u64::MAX - 32 in practice; be exact anyway.
    let expected = len.saturating_add(STATE_HEADER_LEN + STATE_TRAILER_LEN);
    if file_len < expected {
        return Err(Error::Truncated {
            path: path.into(),
            expected,
            actual: file_len,
        });
    }
    if file_len > expected {
        return Err(Error::invalid(
            path,
            format!("{} bytes after the checksum", file_len - expected),
        ));
    }
    Ok(Header { len })
}

/// Decodes the bytes of a state file (`path` only names it in errors) and returns its payload.
pub fn decode_state_bytes(path: &Path, bytes: &[u8], cap: u64) -> Result<Vec<u8>> {
    let file_len = bytes.len() as u64;
    let Some(h) = bytes.first_chunk::<24>() else {
        return Err(Error::Truncated {
            path: path.into(),
            expected: STATE_HEADER_LEN + STATE_TRAILER_LEN,
            actual: file_len,
        });
    };
    let header = parse_header(path, h, file_len, cap)?;
    let end = (STATE_HEADER_LEN + header.len) as usize;
    verify_crc(path, &bytes[..end], &bytes[end..])?;
    Ok(bytes[STATE_HEADER_LEN as usize..end].to_vec())
}

fn verify_crc(path: &Path, covered: &[u8], trailer: &[u8]) -> Result<()> {
    let mut t = [0u8; 8];
    t.copy_from_slice(trailer);
    let expected = u64::from_le_bytes(t);
    let actual = CRC64.checksum(covered);
    if expected != actual {
        return Err(Error::ChecksumMismatch {
            path: path.into(),
            what: None,
            expected,
            actual,
        });
    }
    Ok(())
}

/// Writes a state file holding `payload` at `path`, atomically (temporary sibling, fsync,
/// rename, fsync of the folder). Returns the file's size and its CRC-64 (the trailer), which
/// the manifest records.
pub fn write_state_bytes(path: &Path, payload: &[u8]) -> Result<FileDigest> {
    let bytes = encode_state_bytes(payload);
    fsutil::write_atomic(path, &bytes)?;
    Ok(FileDigest {
        size: bytes.len() as u64,
        crc64: CRC64.checksum(&bytes[..bytes.len() - 8]),
    })
}

/// Encodes `value` as JSON and writes it as a state file at `path` (see [`write_state_bytes`]).
pub fn write_state<T: Serialize>(path: &Path, value: &T) -> Result<FileDigest> {
    let payload = serde_json::to_vec(value).map_err(|source| Error::Encode {
        path: path.into(),
        source,
    })?;
    write_state_bytes(path, &payload)
}

/// Reads and verifies the state file at `path`; returns its payload and digest. A payload
/// longer than `cap` is refused from the header alone, before anything is allocated.
pub fn read_state_bytes(path: &Path, cap: u64) -> Result<(Vec<u8>, FileDigest)> {
    let mut f = File::open(path).at(path, "open")?;
    let file_len = f.metadata().at(path, "stat")?.len();
    let mut h = [0u8; 24];
    if file_len < STATE_HEADER_LEN + STATE_TRAILER_LEN {
        return Err(Error::Truncated {
            path: path.into(),
            expected: STATE_HEADER_LEN + STATE_TRAILER_LEN,
            actual: file_len,
        });
    }
    f.read_exact(&mut h).at(path, "read header")?;
    let header = parse_header(path, &h, file_len, cap)?;
    // `len <= cap`, so this allocation is bounded by the cap.
    let mut bytes = vec![0u8; (STATE_HEADER_LEN + header.len + STATE_TRAILER_LEN) as usize];
    bytes[..24].copy_from_slice(&h);
    f.read_exact_at(&mut bytes[24..], STATE_HEADER_LEN)
        .map_err(|e| match e.kind() {
            std::io::ErrorKind::UnexpectedEof => Error::Truncated {
                path: path.into(),
                expected: STATE_HEADER_LEN + header.len + STATE_TRAILER_LEN,
                actual: file_len,
            },
            _ => Error::io(path, "read", e),
        })?;
    let end = (STATE_HEADER_LEN + header.len) as usize;
    verify_crc(path, &bytes[..end], &bytes[end..])?;
    let digest = FileDigest {
        size: bytes.len() as u64,
        crc64: CRC64.checksum(&bytes[..end]),
    };
    bytes.truncate(end);
    bytes.drain(..STATE_HEADER_LEN as usize);
    Ok((bytes, digest))
}

/// Reads, verifies and decodes the state file at `path` with the default cap.
pub fn read_state<T: DeserializeOwned>(path: &Path) -> Result<T> {
    read_state_with_cap(path, DEFAULT_STATE_CAP)
}

/// Reads, verifies and decodes the state file at `path`, refusing payloads above `cap` bytes.
pub fn read_state_with_cap<T: DeserializeOwned>(path: &Path, cap: u64) -> Result<T> {
    let (payload, _) = read_state_bytes(path, cap)?;
    serde_json::from_slice(&payload).map_err(|source| Error::Decode {
        path: path.into(),
        source,
    })
}

/// A file's size and CRC-64, as the manifest records them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct FileDigest {
    /// Size in bytes.
    pub size: u64,
    /// CRC-64/XZ (for the state file: the one in its trailer).
    pub crc64: u64,
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::BTreeMap;

    #[derive(Debug, PartialEq, serde::Serialize, serde::Deserialize)]
    #[serde(tag = "kind")]
    enum Dev {
        Blk { queues: Vec<u16>, name: String },
        Vsock { cid: u64 },
    }

    fn sample() -> BTreeMap<String, Dev> {
        let mut m = BTreeMap::new();
        m.insert(
            "blk0".into(),
            Dev::Blk {
                queues: vec![256, 0],
                name: "d".into(),
            },
        );
        m.insert("vsock".into(), Dev::Vsock { cid: 3 });
        m
    }

    fn written(payload: &[u8]) -> (tempfile::TempDir, std::path::PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state");
        write_state_bytes(&path, payload).unwrap();
        (dir, path)
    }

    #[test]
    fn crc_is_crc64_xz() {
        assert_eq!(CRC64.checksum(b"123456789"), 0x995d_c9bb_df19_39fa);
    }

    #[test]
    fn state_file_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state");
        let d = write_state(&path, &sample()).unwrap();
        assert_eq!(d.size, std::fs::metadata(&path).unwrap().len());
        let back: BTreeMap<String, Dev> = read_state(&path).unwrap();
        assert_eq!(back, sample());
        let (_, d2) = read_state_bytes(&path, DEFAULT_STATE_CAP).unwrap();
        assert_eq!(d, d2);
        // No temporary sibling is left.
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
    }

    #[test]
    fn every_flipped_byte_is_detected_and_names_the_file() {
        let (_d, path) = written(br#"{"a":[1,2,3],"b":"hello"}"#);
        let good = std::fs::read(&path).unwrap();
        for i in 0..good.len() {
            let mut bad = good.clone();
            bad[i] ^= 0x10;
            std::fs::write(&path, &bad).unwrap();
            let err = read_state_bytes(&path, DEFAULT_STATE_CAP).unwrap_err();
            assert!(err.to_string().contains(&*path.to_string_lossy()), "{err}");
            match i {
                0..8 => assert!(matches!(err, Error::BadMagic { .. }), "{i}: {err}"),
                8..12 => assert!(
                    matches!(err, Error::UnsupportedVersion { .. }),
                    "{i}: {err}"
                ),
                12..16 => assert!(matches!(err, Error::Invalid { .. }), "{i}: {err}"),
                16..24 => assert!(
                    matches!(
                        err,
                        Error::Truncated { .. } | Error::TooLarge { .. } | Error::Invalid { .. }
                    ),
                    "{i}: {err}"
                ),
                _ => assert!(matches!(err, Error::ChecksumMismatch { .. }), "{i}: {err}"),
            }
        }
    }

    #[test]
    fn truncated_at_every_length() {
        let (_d, path) = written(b"[1,2,3,4,5,6,7,8]");
        let good = std::fs::read(&path).unwrap();
        for n in 0..good.len() {
            std::fs::write(&path, &good[..n]).unwrap();
            let err = read_state_bytes(&path, DEFAULT_STATE_CAP).unwrap_err();
            assert!(matches!(err, Error::Truncated { .. }), "{n}: {err}");
            assert!(err.to_string().contains("truncated"));
        }
    }

    #[test]
    fn bad_magic_future_version_and_decode_errors() {
        let (_d, path) = written(b"{}");
        let good = std::fs::read(&path).unwrap();
        let mut foreign = good.clone();
        foreign[..8].copy_from_slice(b"QFI\xfb\0\0\0\x03");
        std::fs::write(&path, &foreign).unwrap();
        assert!(matches!(
            read_state_bytes(&path, 1 << 20),
            Err(Error::BadMagic { .. })
        ));

        // A future version with a valid checksum is still refused, by version.
        let mut future = good[..good.len() - 8].to_vec();
        future[8..12].copy_from_slice(&2u32.to_le_bytes());
        let crc = CRC64.checksum(&future);
        future.extend_from_slice(&crc.to_le_bytes());
        std::fs::write(&path, &future).unwrap();
        let err = read_state_bytes(&path, 1 << 20).unwrap_err();
        assert!(
            matches!(
                err,
                Error::UnsupportedVersion {
                    found: 2,
                    supported: 1,
                    ..
                }
            ),
            "{err}"
        );

        // A valid file whose payload is not the expected type.
        write_state_bytes(&path, b"{\"x\":1}").unwrap();
        let err = read_state::<Vec<u32>>(&path).unwrap_err();
        assert!(matches!(err, Error::Decode { .. }), "{err}");
        assert!(err.to_string().contains("does not decode"));
    }

    #[test]
    fn length_over_the_cap_is_refused_before_allocating() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state");
        // A 32-byte file claiming a payload of ~2^63 bytes: allocating it would abort.
        let mut bytes = Vec::new();
        bytes.extend_from_slice(&STATE_MAGIC);
        bytes.extend_from_slice(&1u32.to_le_bytes());
        bytes.extend_from_slice(&0u32.to_le_bytes());
        bytes.extend_from_slice(&(u64::MAX / 2).to_le_bytes());
        bytes.extend_from_slice(&[0; 8]);
        std::fs::write(&path, &bytes).unwrap();
        let err = read_state_bytes(&path, DEFAULT_STATE_CAP).unwrap_err();
        assert!(matches!(err, Error::TooLarge { .. }), "{err}");
        // And an honest file over a small cap.
        write_state_bytes(&path, &[b' '; 1000]).unwrap();
        assert!(matches!(
            read_state_bytes(&path, 999),
            Err(Error::TooLarge {
                len: 1000,
                cap: 999,
                ..
            })
        ));
        assert!(read_state_bytes(&path, 1000).is_ok());
    }

    #[test]
    fn trailing_bytes_are_refused() {
        let (_d, path) = written(b"null");
        let mut bytes = std::fs::read(&path).unwrap();
        bytes.push(0);
        std::fs::write(&path, &bytes).unwrap();
        assert!(matches!(
            read_state_bytes(&path, 1 << 20),
            Err(Error::Invalid { .. })
        ));
    }

    proptest! {
        #[test]
        fn encode_decode_random_payloads(payload in proptest::collection::vec(any::<u8>(), 0..2048)) {
            let bytes = encode_state_bytes(&payload);
            let back = decode_state_bytes(Path::new("s"), &bytes, 1 << 20).unwrap();
            prop_assert_eq!(back, payload);
        }

        #[test]
        fn random_corruptions_are_detected(
            payload in proptest::collection::vec(any::<u8>(), 0..512),
            edits in proptest::collection::vec((any::<prop::sample::Index>(), 1u8..=255), 1..4),
            cut in proptest::option::of(any::<prop::sample::Index>()),
        ) {
            let good = encode_state_bytes(&payload);
            let mut bad = good.clone();
            for (at, x) in edits {
                let i = at.index(bad.len());
                bad[i] ^= x;
            }
            if let Some(c) = cut {
                bad.truncate(c.index(bad.len()));
            }
            match decode_state_bytes(Path::new("s"), &bad, 1 << 20) {
                // Only acceptable when the edits cancelled out.
                Ok(back) => prop_assert_eq!(back, payload),
                Err(e) => prop_assert!(e.to_string().starts_with("s: ")),
            }
        }
    }
}
