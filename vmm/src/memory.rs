//! Guest RAM: its layout around the 32-bit MMIO hole and its allocation.
//!
//! Every mapping of guest RAM, anonymous or from a checkpoint's memory file, is marked
//! `MADV_DONTDUMP`: a core dump of the VMM must not carry the guest's memory (its secrets,
//! and gigabytes).

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
    /// Guest RAM cannot be kept out of core dumps.
    #[error("cannot mark guest memory at {addr:#x} ({len} bytes) MADV_DONTDUMP")]
    DontDump {
        /// The guest address of the region.
        addr: u64,
        /// Its length.
        len: u64,
        /// Why.
        #[source]
        source: std::io::Error,
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
    let memory = GuestMemory::from_regions(out).map_err(|e| bad(format!("{e}")))?;
    exclude_from_core_dumps(&memory)?;
    Ok(memory)
}

/// Marks every region of `memory` `MADV_DONTDUMP`.
fn exclude_from_core_dumps(memory: &GuestMemory) -> Result<(), MemoryError> {
    use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};
    for region in memory.iter() {
        let len = region.len();
        let size = usize::try_from(len).unwrap_or(usize::MAX);
        // SAFETY: the range is exactly one live mapping that `memory` owns; MADV_DONTDUMP
        // changes only whether it goes into a core dump, not its contents or protection.
        let r = unsafe { libc::madvise(region.as_ptr().cast(), size, libc::MADV_DONTDUMP) };
        if r != 0 {
            return Err(MemoryError::DontDump {
                addr: region.start_addr().0,
                len,
                source: std::io::Error::last_os_error(),
            });
        }
    }
    Ok(())
}

/// Allocates `size` bytes of zeroed guest RAM.
pub fn create(size: u64) -> Result<GuestMemory, MemoryError> {
    let ranges: Vec<(GuestAddress, usize)> = ram_ranges(size)
        .into_iter()
        .map(|(start, len)| (start, len as usize))
        .collect();
    let memory = GuestMemory::from_ranges(&ranges).map_err(|source| MemoryError::Allocate {
        mib: size >> 20,
        source,
    })?;
    exclude_from_core_dumps(&memory)?;
    Ok(memory)
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

    /// The `VmFlags` of the mapping that starts at `addr`, from /proc/self/smaps.
    fn vm_flags(addr: usize) -> String {
        let smaps = std::fs::read_to_string("/proc/self/smaps").unwrap();
        let start = format!("{addr:x}-");
        let mut in_mapping = false;
        for line in smaps.lines() {
            if line
                .split_whitespace()
                .next()
                .is_some_and(|r| r.contains('-'))
                && !line.starts_with("VmFlags")
            {
                in_mapping = line.starts_with(&start);
            } else if in_mapping {
                if let Some(flags) = line.strip_prefix("VmFlags:") {
                    return flags.trim().to_string();
                }
            }
        }
        panic!("no mapping at {addr:#x}");
    }

    #[test]
    fn guest_ram_is_left_out_of_core_dumps() {
        let mem = create(16 << 20).unwrap();
        for region in mem.iter() {
            let flags = vm_flags(region.as_ptr() as usize);
            assert!(flags.split(' ').any(|f| f == "dd"), "VmFlags: {flags}");
        }
    }

    #[test]
    fn create_allocates_every_range() {
        let mem = create(64 << 20).unwrap();
        assert_eq!(mem.num_regions(), 1);
        assert_eq!(mem.last_addr(), GuestAddress((64 << 20) - 1));
    }
}
