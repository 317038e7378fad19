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
