//! The on-disk layout of a Strata layer file: the header and the allocation-table entries.
//!
//! This module is pure: it turns bytes into checked values and back, and never touches a file,
//! so it is what the fuzz target and the random-bytes property test drive. `FORMAT.md` beside
//! `Cargo.toml` is the normative description; the constants here must match it.

use crc::{Crc, CRC_16_IBM_3740, CRC_32_ISCSI};
use thiserror::Error;

/// The eight bytes every layer file starts with.
pub const MAGIC: [u8; 8] = *b"STRATADK";
/// The only format version this build reads and writes. Any change to the layout bumps it.
pub const VERSION: u32 = 1;
/// Size of the header record in bytes (one 512-byte sector, written in one `pwrite`).
pub const HEADER_SIZE: usize = 512;
/// Where the allocation table starts: the header sector is followed by padding to 4 KiB.
pub const TABLE_OFFSET: u64 = 4096;
/// Bytes per allocation-table entry.
pub const ENTRY_SIZE: u64 = 8;
/// Longest parent path that fits in the header.
pub const MAX_PARENT_PATH: usize = 256;
/// Smallest cluster: 4 KiB.
pub const MIN_CLUSTER_BITS: u32 = 12;
/// Largest cluster: 2 MiB.
pub const MAX_CLUSTER_BITS: u32 = 21;
/// Default cluster: 64 KiB.
pub const DEFAULT_CLUSTER_BITS: u32 = 16;
/// Largest virtual size: 64 TiB (keeps tables and in-memory maps bounded).
pub const MAX_VIRTUAL_SIZE: u64 = 64 << 40;
/// Header flag: this layer is being folded into its parent (merge in progress). While set, a
/// change of the parent's `data_id` (or a raw parent's mtime) is expected and accepted.
pub const FLAG_FOLDING: u32 = 1;
/// Every flag this version knows; any other bit set means an incompatible file.
pub const KNOWN_FLAGS: u32 = FLAG_FOLDING;

const CRC32C: Crc<u32> = Crc::<u32>::new(&CRC_32_ISCSI);
const CRC16: Crc<u16> = Crc::<u16>::new(&CRC_16_IBM_3740);

/// Why a header or table entry is rejected.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum FormatError {
    /// Fewer than [`HEADER_SIZE`] bytes.
    #[error("header is truncated ({0} of {HEADER_SIZE} bytes)")]
    ShortHeader(usize),
    /// The magic is not `STRATADK`.
    #[error("not a Strata layer (bad magic)")]
    BadMagic,
    /// A version this build does not read.
    #[error("unsupported format version {0} (this build reads version {VERSION})")]
    BadVersion(u32),
    /// The header checksum does not match.
    #[error("header checksum mismatch (stored {stored:#010x}, computed {computed:#010x})")]
    HeaderChecksum {
        /// Checksum in the file.
        stored: u32,
        /// Checksum of the bytes.
        computed: u32,
    },
    /// A header field is out of range or inconsistent with another.
    #[error("invalid header field {field}: {value}")]
    BadField {
        /// Field name.
        field: &'static str,
        /// The offending value.
        value: u64,
    },
    /// The parent path is not UTF-8 or too long.
    #[error("invalid parent path in header")]
    BadParentPath,
    /// A table entry fails its check bits or has an invalid kind.
    #[error("allocation table entry {index} is corrupt ({raw:#018x})")]
    BadEntry {
        /// Virtual cluster index.
        index: u64,
        /// The raw entry.
        raw: u64,
    },
}

/// How a layer names its parent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ParentRef {
    /// A base layer: unallocated clusters read as zeroes.
    None,
    /// A Strata layer with this identity.
    Layer {
        /// Path, relative to the child's directory unless absolute.
        path: String,
        /// The parent's `layer_id`.
        layer_id: [u8; 16],
        /// The parent's `data_id` when this child was created or last re-pointed.
        data_id: [u8; 16],
    },
    /// A raw image identified by its size and modification time.
    Raw {
        /// Path, relative to the child's directory unless absolute.
        path: String,
        /// Its size in bytes.
        size: u64,
        /// Its mtime (seconds, nanoseconds).
        mtime: (i64, u32),
    },
}

impl ParentRef {
    /// The recorded path, if any.
    pub fn path(&self) -> Option<&str> {
        match self {
            ParentRef::None => None,
            ParentRef::Layer { path, .. } | ParentRef::Raw { path, .. } => Some(path),
        }
    }
}

/// A decoded, validated header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    /// Flag bits ([`FLAG_FOLDING`]).
    pub flags: u32,
    /// log2 of the cluster size.
    pub cluster_bits: u32,
    /// Guest-visible size in bytes, a multiple of 512.
    pub virtual_size: u64,
    /// Offset of the first data cluster (a multiple of the cluster size).
    pub data_offset: u64,
    /// Stable identity of this layer, random at creation.
    pub layer_id: [u8; 16],
    /// Changes whenever this layer's content changes after it may have gained children.
    pub data_id: [u8; 16],
    /// Incremented on every header rewrite.
    pub generation: u64,
    /// The parent.
    pub parent: ParentRef,
}

/// Layout values derived from a cluster size and virtual size.
pub fn layout(cluster_bits: u32, virtual_size: u64) -> (u64, u64) {
    let cluster = 1u64 << cluster_bits;
    let entries = virtual_size.div_ceil(cluster);
    let table_end = TABLE_OFFSET + entries * ENTRY_SIZE;
    (entries, table_end.div_ceil(cluster) * cluster)
}

impl Header {
    /// A header for a new layer.
    pub fn new(cluster_bits: u32, virtual_size: u64, parent: ParentRef) -> Header {
        let (_, data_offset) = layout(cluster_bits, virtual_size);
        Header {
            flags: 0,
            cluster_bits,
            virtual_size,
            data_offset,
            layer_id: random_id(),
            data_id: random_id(),
            generation: 1,
            parent,
        }
    }

    /// Cluster size in bytes.
    pub fn cluster_size(&self) -> u64 {
        1 << self.cluster_bits
    }

    /// Number of table entries (virtual clusters).
    pub fn entries(&self) -> u64 {
        layout(self.cluster_bits, self.virtual_size).0
    }

    /// Bytes of the table on disk (without padding).
    pub fn table_bytes(&self) -> u64 {
        self.entries() * ENTRY_SIZE
    }

    /// Encodes the header sector, checksum included.
    pub fn encode(&self) -> [u8; HEADER_SIZE] {
        let mut b = [0u8; HEADER_SIZE];
        b[0..8].copy_from_slice(&MAGIC);
        put32(&mut b, 8, VERSION);
        put32(&mut b, 12, HEADER_SIZE as u32);
        put32(&mut b, 16, self.flags);
        put32(&mut b, 20, self.cluster_bits);
        put64(&mut b, 24, self.virtual_size);
        put64(&mut b, 32, TABLE_OFFSET);
        put64(&mut b, 40, self.entries());
        put64(&mut b, 48, self.data_offset);
        b[56..72].copy_from_slice(&self.layer_id);
        b[72..88].copy_from_slice(&self.data_id);
        let (kind, path) = match &self.parent {
            ParentRef::None => (0, ""),
            ParentRef::Layer {
                path,
                layer_id,
                data_id,
            } => {
                b[96..112].copy_from_slice(layer_id);
                b[112..128].copy_from_slice(data_id);
                (1, path.as_str())
            }
            ParentRef::Raw { path, size, mtime } => {
                put64(&mut b, 112, mtime.0 as u64);
                put64(&mut b, 120, u64::from(mtime.1));
                put64(&mut b, 128, *size);
                (2, path.as_str())
            }
        };
        put32(&mut b, 88, kind);
        let plen = path.len().min(MAX_PARENT_PATH);
        put32(&mut b, 92, plen as u32);
        put64(&mut b, 136, self.generation);
        b[144..144 + plen].copy_from_slice(&path.as_bytes()[..plen]);
        let crc = CRC32C.checksum(&b[..508]);
        put32(&mut b, 508, crc);
        b
    }

    /// Parses and validates a header sector. Never panics on any input.
    pub fn parse(b: &[u8]) -> Result<Header, FormatError> {
        if b.len() < HEADER_SIZE {
            return Err(FormatError::ShortHeader(b.len()));
        }
        if b[0..8] != MAGIC {
            return Err(FormatError::BadMagic);
        }
        let version = get32(b, 8);
        if version != VERSION {
            return Err(FormatError::BadVersion(version));
        }
        let stored = get32(b, 508);
        let computed = CRC32C.checksum(&b[..508]);
        if stored != computed {
            return Err(FormatError::HeaderChecksum { stored, computed });
        }
        let bad = |field, value: u64| Err(FormatError::BadField { field, value });
        if get32(b, 12) as usize != HEADER_SIZE {
            return bad("header_size", u64::from(get32(b, 12)));
        }
        let flags = get32(b, 16);
        if flags & !KNOWN_FLAGS != 0 {
            return bad("flags", u64::from(flags));
        }
        let cluster_bits = get32(b, 20);
        if !(MIN_CLUSTER_BITS..=MAX_CLUSTER_BITS).contains(&cluster_bits) {
            return bad("cluster_bits", u64::from(cluster_bits));
        }
        let virtual_size = get64(b, 24);
        if virtual_size == 0 || virtual_size % 512 != 0 || virtual_size > MAX_VIRTUAL_SIZE {
            return bad("virtual_size", virtual_size);
        }
        if get64(b, 32) != TABLE_OFFSET {
            return bad("table_offset", get64(b, 32));
        }
        let (entries, data_offset) = layout(cluster_bits, virtual_size);
        if get64(b, 40) != entries {
            return bad("table_entries", get64(b, 40));
        }
        if get64(b, 48) != data_offset {
            return bad("data_offset", get64(b, 48));
        }
        let mut layer_id = [0u8; 16];
        layer_id.copy_from_slice(&b[56..72]);
        let mut data_id = [0u8; 16];
        data_id.copy_from_slice(&b[72..88]);
        let kind = get32(b, 88);
        let plen = get32(b, 92) as usize;
        if plen > MAX_PARENT_PATH {
            return bad("parent_path_len", plen as u64);
        }
        let path = std::str::from_utf8(&b[144..144 + plen])
            .map_err(|_| FormatError::BadParentPath)?
            .to_string();
        let id_at = |off: usize| {
            let mut id = [0u8; 16];
            id.copy_from_slice(&b[off..off + 16]);
            id
        };
        let parent = match kind {
            0 if plen == 0 => ParentRef::None,
            1 if plen > 0 => ParentRef::Layer {
                path,
                layer_id: id_at(96),
                data_id: id_at(112),
            },
            2 if plen > 0 => {
                let nsec = get64(b, 120);
                if nsec >= 1_000_000_000 {
                    return bad("parent_mtime_nsec", nsec);
                }
                ParentRef::Raw {
                    path,
                    size: get64(b, 128),
                    mtime: (get64(b, 112) as i64, nsec as u32),
                }
            }
            _ => return bad("parent_kind", u64::from(kind)),
        };
        Ok(Header {
            flags,
            cluster_bits,
            virtual_size,
            data_offset,
            layer_id,
            data_id,
            generation: get64(b, 136),
            parent,
        })
    }
}

/// One decoded allocation-table entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Entry {
    /// Not in this layer: read through to the parent.
    Unallocated,
    /// Reads as zeroes; does not fall through.
    Zero,
    /// Data at host cluster number `n` (file offset `n * cluster_size`).
    Data(u64),
}

const KIND_SHIFT: u32 = 62;
const KIND_ZERO: u64 = 1;
const KIND_DATA: u64 = 2;
/// Largest host cluster number an entry can hold (46 bits).
pub const MAX_HOST_CLUSTER: u64 = (1 << 46) - 1;

fn entry_check(index: u64, payload: u64) -> u16 {
    let mut buf = [0u8; 16];
    buf[..8].copy_from_slice(&index.to_le_bytes());
    buf[8..].copy_from_slice(&payload.to_le_bytes());
    CRC16.checksum(&buf)
}

impl Entry {
    /// Encodes the entry for virtual cluster `index`.
    pub fn encode(self, index: u64) -> u64 {
        let payload = match self {
            Entry::Unallocated => return 0,
            Entry::Zero => KIND_ZERO << KIND_SHIFT,
            Entry::Data(n) => (KIND_DATA << KIND_SHIFT) | ((n & MAX_HOST_CLUSTER) << 16),
        };
        payload | u64::from(entry_check(index, payload))
    }

    /// Decodes the raw entry of virtual cluster `index`, checking its check bits.
    pub fn decode(index: u64, raw: u64) -> Result<Entry, FormatError> {
        if raw == 0 {
            return Ok(Entry::Unallocated);
        }
        let payload = raw & !0xffff;
        let bad = FormatError::BadEntry { index, raw };
        if entry_check(index, payload) != (raw & 0xffff) as u16 {
            return Err(bad);
        }
        let host = (payload >> 16) & MAX_HOST_CLUSTER;
        match payload >> KIND_SHIFT {
            KIND_ZERO if host == 0 => Ok(Entry::Zero),
            KIND_DATA => Ok(Entry::Data(host)),
            _ => Err(bad),
        }
    }
}

/// Decodes a whole table image (little-endian entries). Stops at the first corrupt entry.
pub fn parse_table(bytes: &[u8]) -> Result<Vec<Entry>, FormatError> {
    bytes
        .chunks_exact(ENTRY_SIZE as usize)
        .enumerate()
        .map(|(i, c)| {
            let mut a = [0u8; 8];
            a.copy_from_slice(c);
            Entry::decode(i as u64, u64::from_le_bytes(a))
        })
        .collect()
}

/// A fresh random 128-bit id.
pub fn random_id() -> [u8; 16] {
    let mut id = [0u8; 16];
    if getrandom::fill(&mut id).is_err() {
        // Fall back to time and address entropy; ids need only be unique, not secret.
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        id = (t ^ (u128::from(std::process::id()) << 64) ^ (&id as *const _ as u128)).to_le_bytes();
    }
    id
}

/// Formats an id as 32 hex digits.
pub fn id_hex(id: &[u8; 16]) -> String {
    id.iter().map(|b| format!("{b:02x}")).collect()
}

fn put32(b: &mut [u8], off: usize, v: u32) {
    b[off..off + 4].copy_from_slice(&v.to_le_bytes());
}
fn put64(b: &mut [u8], off: usize, v: u64) {
    b[off..off + 8].copy_from_slice(&v.to_le_bytes());
}
fn get32(b: &[u8], off: usize) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[off..off + 4]);
    u32::from_le_bytes(a)
}
fn get64(b: &[u8], off: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[off..off + 8]);
    u64::from_le_bytes(a)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn sample() -> Header {
        Header::new(
            16,
            1 << 30,
            ParentRef::Layer {
                path: "base.strata".into(),
                layer_id: [7; 16],
                data_id: [9; 16],
            },
        )
    }

    #[test]
    fn header_round_trips() {
        let h = sample();
        assert_eq!(Header::parse(&h.encode()).unwrap(), h);
        let raw = Header::new(
            12,
            512,
            ParentRef::Raw {
                path: "/abs/base.img".into(),
                size: 512,
                mtime: (1_700_000_000, 5),
            },
        );
        assert_eq!(Header::parse(&raw.encode()).unwrap(), raw);
    }

    #[test]
    fn every_single_byte_flip_in_header_is_rejected() {
        let b = sample().encode();
        for i in 0..HEADER_SIZE {
            let mut c = b;
            c[i] ^= 0x5a;
            assert!(Header::parse(&c).is_err(), "flip at {i} accepted");
        }
    }

    #[test]
    fn wrong_version_is_named() {
        let mut b = sample().encode();
        b[8] = 2;
        assert_eq!(Header::parse(&b), Err(FormatError::BadVersion(2)));
    }

    #[test]
    fn entries_round_trip_and_reject_flips() {
        for (i, e) in [
            (0, Entry::Zero),
            (5, Entry::Data(1234)),
            (9, Entry::Unallocated),
        ] {
            let raw = e.encode(i);
            assert_eq!(Entry::decode(i, raw).unwrap(), e);
            if raw != 0 {
                for byte in 0..8 {
                    let flipped = raw ^ (0xffu64 << (byte * 8));
                    assert!(Entry::decode(i, flipped).is_err());
                }
                assert!(
                    Entry::decode(i + 1, raw).is_err(),
                    "entry moved to another index"
                );
            }
        }
    }

    // Seeded from STRATA_TEST_SEED (or randomly); the seed is printed, so shown on failure.
    proptest! {
        #![proptest_config(ProptestConfig {
            rng_seed: proptest::test_runner::RngSeed::Fixed(crate::test_seed::announce()),
            ..ProptestConfig::default()
        })]

        #[test]
        fn random_bytes_never_panic_the_parsers(bytes in proptest::collection::vec(any::<u8>(), 0..1200)) {
            let _ = Header::parse(&bytes);
            let _ = parse_table(&bytes);
        }

        #[test]
        fn random_header_mutations_never_panic(idx in 0usize..HEADER_SIZE, val: u8) {
            let mut b = sample().encode();
            b[idx] = val;
            let crc = CRC32C.checksum(&b[..508]);
            b[508..512].copy_from_slice(&crc.to_le_bytes());
            let _ = Header::parse(&b);
        }
    }
}
