//! Guest RAM: its layout around the 32-bit MMIO hole and its allocation.

use vm_memory::{GuestAddress, GuestMemoryMmap};

use crate::arch::layout::{MMIO_HOLE_END, MMIO_HOLE_START};

/// Guest memory as the rest of the VMM sees it.
pub type GuestMemory = GuestMemoryMmap<()>;

/// Errors when allocating guest memory.
#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    /// mmap of the guest RAM failed.
    #[error("cannot allocate {mib} MiB of guest memory")]
    Allocate {
        /// The requested size.
        mib: u64,
        /// What failed.
        #[source]
        source: vm_memory::mmap::FromRangesError,
    },
}

/// The RAM ranges `(start, length)` for `size` bytes of guest memory: up to the MMIO hole,
/// then from 4 GiB.
pub fn ram_ranges(size: u64) -> Vec<(GuestAddress, u64)> {
    let low = size.min(MMIO_HOLE_START);
    let mut ranges = vec![(GuestAddress(0), low)];
    if size > low {
        ranges.push((GuestAddress(MMIO_HOLE_END), size - low));
    }
    ranges
}

/// Allocates `size` bytes of zeroed guest RAM.
pub fn create(size: u64) -> Result<GuestMemory, MemoryError> {
    let ranges: Vec<(GuestAddress, usize)> = ram_ranges(size)
        .into_iter()
        .map(|(start, len)| (start, len as usize))
        .collect();
    GuestMemory::from_ranges(&ranges).map_err(|source| MemoryError::Allocate {
        mib: size >> 20,
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::GuestMemoryBackend;

    #[test]
    fn small_memory_is_one_range_from_zero() {
        assert_eq!(ram_ranges(512 << 20), vec![(GuestAddress(0), 512 << 20)]);
    }

    #[test]
    fn large_memory_skips_the_mmio_hole() {
        let ranges = ram_ranges(4 << 30);
        assert_eq!(
            ranges,
            vec![
                (GuestAddress(0), MMIO_HOLE_START),
                (GuestAddress(MMIO_HOLE_END), (4 << 30) - MMIO_HOLE_START)
            ]
        );
    }

    #[test]
    fn create_allocates_every_range() {
        let mem = create(64 << 20).unwrap();
        assert_eq!(mem.num_regions(), 1);
        assert_eq!(mem.last_addr(), GuestAddress((64 << 20) - 1));
    }
}
