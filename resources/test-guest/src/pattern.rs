//! The `fill`/`check` memory pattern, shared by the guest and the host: the
//! `resources` crate includes this file as `resources::pattern` so that host
//! tests compute the same values.
//!
//! Every 4 KiB page at physical address `addr` holds 512 copies of
//! [`page_value`]`(seed, addr)`.

/// The golden-ratio increment of splitmix64.
const GOLDEN: u64 = 0x9E37_79B9_7F4A_7C15;

/// Bytes per page the pattern is defined on.
pub const PAGE_SIZE: u64 = 4096;

/// The splitmix64 output function (Steele, Lea, Flood 2014) applied to one
/// state value: `splitmix64(0)` is the first output of a generator seeded
/// with 0.
pub const fn splitmix64(z: u64) -> u64 {
    let mut z = z.wrapping_add(GOLDEN);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// The value of every qword of the page containing physical address `addr`
/// for `seed`: `splitmix64(seed ^ (addr >> 12) * 0x9E3779B97F4A7C15)` with a
/// wrapping multiply.
pub const fn page_value(seed: u64, addr: u64) -> u64 {
    splitmix64(seed ^ (addr / PAGE_SIZE).wrapping_mul(GOLDEN))
}

// ---------------------------------------------------------------------------
// Disk patterns (`blk N write`, `blk N read`, the `log` workload).

/// Bytes per disk sector.
pub const SECTOR_SIZE: usize = 512;

/// The per-sector state of the disk pattern:
/// `splitmix64(seed ^ sector * 0x9E3779B97F4A7C15)` (wrapping multiply).
pub const fn sector_state(seed: u64, sector: u64) -> u64 {
    splitmix64(seed ^ sector.wrapping_mul(GOLDEN))
}

/// Qword `word` (0..64) of sector `sector` written by `blk N write ... SEED`:
/// the `word`-th output of a splitmix64 generator seeded with
/// [`sector_state`], i.e. `splitmix64(state + word * 0x9E3779B97F4A7C15)`.
/// It is stored little-endian at byte `8 * word` of the sector.
pub const fn sector_word(seed: u64, sector: u64, word: u64) -> u64 {
    splitmix64(sector_state(seed, sector).wrapping_add(word.wrapping_mul(GOLDEN)))
}

/// Fills `buf` with the content of absolute sector `sector` for `seed` (64
/// little-endian qwords of [`sector_word`]).
pub fn sector_fill(seed: u64, sector: u64, buf: &mut [u8; SECTOR_SIZE]) {
    let mut z = sector_state(seed, sector);
    for chunk in buf.chunks_exact_mut(8) {
        // One generator step per qword: splitmix64 adds GOLDEN itself.
        let value = splitmix64(z);
        z = z.wrapping_add(GOLDEN);
        chunk.copy_from_slice(&value.to_le_bytes());
    }
}

/// FNV-1a 64-bit offset basis.
pub const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
/// FNV-1a 64-bit prime.
pub const FNV_PRIME: u64 = 0x0000_0100_0000_01b3;

/// Continues an FNV-1a 64-bit hash `hash` over `bytes` (start with
/// [`FNV_OFFSET`]).
pub fn fnv1a64_update(mut hash: u64, bytes: &[u8]) -> u64 {
    for &b in bytes {
        hash ^= b as u64;
        hash = hash.wrapping_mul(FNV_PRIME);
    }
    hash
}

/// FNV-1a 64-bit hash of `bytes` (what `blk N read` prints, as 16
/// lower-case hex digits).
pub fn fnv1a64(bytes: &[u8]) -> u64 {
    fnv1a64_update(FNV_OFFSET, bytes)
}

/// `b"STRALOG1"`, the first 8 bytes of every `log` record.
pub const LOG_MAGIC: [u8; 8] = *b"STRALOG1";

/// Builds `log` record `seq` of the run identified by `nonce` (written at
/// sector `seq`):
///
/// | bytes | content |
/// |---|---|
/// | 0..8 | [`LOG_MAGIC`] |
/// | 8..16 | `seq`, u64 LE |
/// | 16..24 | `nonce`, u64 LE (the run id, random per `log start`) |
/// | 24..504 | the same bytes of [`sector_fill`]`(nonce, seq)` |
/// | 504..512 | [`fnv1a64`] of bytes 0..504, u64 LE |
pub fn log_record(nonce: u64, seq: u64, buf: &mut [u8; SECTOR_SIZE]) {
    sector_fill(nonce, seq, buf);
    let (head, tail) = buf.split_at_mut(SECTOR_SIZE - 8);
    let (magic_seq, rest) = head.split_at_mut(16);
    let (magic, seq_bytes) = magic_seq.split_at_mut(8);
    magic.copy_from_slice(&LOG_MAGIC);
    seq_bytes.copy_from_slice(&seq.to_le_bytes());
    if let Some(n) = rest.get_mut(..8) {
        n.copy_from_slice(&nonce.to_le_bytes());
    }
    tail.copy_from_slice(&fnv1a64(head).to_le_bytes());
}

/// Decodes a `log` record: `Some((seq, nonce))` when the magic and the
/// checksum are right.
pub fn log_record_parse(buf: &[u8; SECTOR_SIZE]) -> Option<(u64, u64)> {
    let (head, tail) = buf.split_at(SECTOR_SIZE - 8);
    if head.get(..8)? != LOG_MAGIC {
        return None;
    }
    let seq = u64::from_le_bytes(head.get(8..16)?.try_into().ok()?);
    let nonce = u64::from_le_bytes(head.get(16..24)?.try_into().ok()?);
    let sum = u64::from_le_bytes(tail.try_into().ok()?);
    if fnv1a64(head) != sum {
        return None;
    }
    Some((seq, nonce))
}
