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
    /// A checkpoint's memory file cannot become guest memory.
    #[error("memory file {path}: {reason}")]
    Checkpoint {
        /// The file.
        path: std::path::PathBuf,
        /// Why.
        reason: String,
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

/// Maps a checkpoint's memory file as guest RAM of `size` bytes: every region private and
/// copy-on-write (`MAP_PRIVATE`), so reads come from the file (holes read as zero), the
/// guest's writes go to anonymous copies and the file never changes. Costs a few `mmap`
/// calls whatever the size; pages are read when first touched. The file's layout must be
/// the one [`ram_ranges`] gives for `size`.
pub fn from_checkpoint(
    file: &snapshot::memory::MemoryFile,
    size: u64,
) -> Result<GuestMemory, MemoryError> {
    let path = file.path().to_path_buf();
    let bad = |reason: String| MemoryError::Checkpoint {
        path: path.clone(),
        reason,
    };
    let want = ram_ranges(size);
    let regions = &file.record().regions;
    let layout: Vec<(GuestAddress, u64)> = regions
        .iter()
        .map(|r| (GuestAddress(r.guest_addr), r.size))
        .collect();
    if layout != want {
        return Err(bad(format!(
            "its regions {:?} are not those of a {} MiB guest {:?}",
            layout,
            size >> 20,
            want
        )));
    }
    let mut out = Vec::with_capacity(regions.len());
    for r in regions {
        let handle = std::fs::File::open(&path).map_err(|e| bad(format!("open: {e}")))?;
        let len = usize::try_from(r.size).map_err(|_| bad("region too large".into()))?;
        let mapping = vm_memory::mmap::MmapRegionBuilder::new(len)
            .with_file_offset(vm_memory::FileOffset::new(handle, r.file_offset))
            .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE)
            .with_mmap_flags(libc::MAP_PRIVATE | libc::MAP_NORESERVE)
            .build()
            .map_err(|e| bad(format!("mmap: {e}")))?;
        let region = vm_memory::GuestRegionMmap::new(mapping, GuestAddress(r.guest_addr))
            .ok_or_else(|| bad("a region wraps the address space".into()))?;
        out.push(region);
    }
    GuestMemory::from_regions(out).map_err(|e| bad(format!("{e}")))
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
