//! The memory file: guest memory, sparse and page-aligned at the guest-physical layout, so that
//! a restore maps it copy-on-write instead of reading it.
//!
//! Each guest memory region is stored at its own file offset, aligned to 2 MiB
//! ([`REGION_ALIGN`]), regions one after another in guest-physical order; the file's length is
//! the end of the last region. The layout (guest address, size, file offset and optional
//! CRC-64 per region) is recorded in the checkpoint's manifest ([`MemoryRecord`]); the file
//! itself is raw memory with no header. Pages that are all zero are holes: the writer sets the
//! file's full length first (`ftruncate`) and then writes only runs of non-zero pages, each run
//! with one `pwrite`.
//!
//! A region's checksum is the CRC-64/XZ of, for every page of the region that is not all zero
//! in increasing order, the page's index in the region (u64, little-endian) followed by the
//! page's 4096 bytes. It depends only on the content (not on which zero pages are holes), so
//! it can be computed while writing and checked by reading only the file's data extents.
//!
//! An incremental mode (for a later issue) takes a dirty-page bitmap per region: only dirty
//! pages are looked at, the file must already hold the previous content at the same layout,
//! and dirty pages that became zero are punched out.

use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::ptr::NonNull;

use serde::{Deserialize, Serialize};

use crate::error::{Error, IoContext, Result};
use crate::state::CRC64;

/// The page size the memory file works in.
pub const PAGE_SIZE: u64 = 4096;
/// The alignment of every region's offset in the file (2 MiB, so huge pages can back a mapping).
pub const REGION_ALIGN: u64 = 2 << 20;

/// Where one guest memory region lives in the memory file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RegionRecord {
    /// Guest-physical address of the region's first byte.
    pub guest_addr: u64,
    /// Length in bytes, a multiple of [`PAGE_SIZE`].
    pub size: u64,
    /// Offset of the region in the memory file, a multiple of [`REGION_ALIGN`].
    pub file_offset: u64,
    /// The region's checksum (see the module docs), when it was computed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub crc64: Option<u64>,
}

/// The memory file of a checkpoint, as its manifest records it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MemoryRecord {
    /// The file's length in bytes: the end of the last region.
    pub size: u64,
    /// Bytes the file occupies on disk (`st_blocks * 512`) when it was written.
    pub allocated: u64,
    /// The regions, in increasing guest-physical order.
    pub regions: Vec<RegionRecord>,
}

impl MemoryRecord {
    /// The layout for regions of `(guest_addr, size)`, without checksums: each region at the
    /// next [`REGION_ALIGN`]-aligned offset. Regions must be page-aligned, non-empty, sorted and
    /// not overlap.
    pub fn layout(regions: &[(u64, u64)]) -> Result<MemoryRecord> {
        let mut out = Vec::with_capacity(regions.len());
        let mut offset = 0u64;
        for &(guest_addr, size) in regions {
            let file_offset = offset
                .checked_next_multiple_of(REGION_ALIGN)
                .ok_or_else(|| Error::BadArgument("memory regions too large".into()))?;
            out.push(RegionRecord {
                guest_addr,
                size,
                file_offset,
                crc64: None,
            });
            offset = file_offset
                .checked_add(size)
                .ok_or_else(|| Error::BadArgument("memory regions too large".into()))?;
        }
        let rec = MemoryRecord {
            size: offset,
            allocated: 0,
            regions: out,
        };
        rec.validate().map_err(Error::BadArgument)?;
        Ok(rec)
    }

    /// Checks the layout: regions page-aligned and non-empty, sorted by guest address without
    /// overlap, file offsets [`REGION_ALIGN`]-aligned, increasing, inside `size`, and `size` the
    /// end of the last region. Returns what is wrong.
    pub fn validate(&self) -> std::result::Result<(), String> {
        let mut guest_end = 0u64;
        let mut file_end = 0u64;
        for (i, r) in self.regions.iter().enumerate() {
            if r.size == 0 || r.size % PAGE_SIZE != 0 || r.guest_addr % PAGE_SIZE != 0 {
                return Err(format!(
                    "memory region {i}: address {:#x} and size {:#x} must be non-empty multiples of {PAGE_SIZE}",
                    r.guest_addr, r.size
                ));
            }
            if r.file_offset % REGION_ALIGN != 0 {
                return Err(format!(
                    "memory region {i}: file offset {:#x} is not {REGION_ALIGN}-aligned",
                    r.file_offset
                ));
            }
            if i > 0 && r.guest_addr < guest_end {
                return Err(format!(
                    "memory region {i}: overlaps or precedes region {}",
                    i - 1
                ));
            }
            if r.file_offset < file_end {
                return Err(format!(
                    "memory region {i}: file offset overlaps region {}",
                    i.saturating_sub(1)
                ));
            }
            guest_end = r
                .guest_addr
                .checked_add(r.size)
                .ok_or_else(|| format!("memory region {i}: wraps the address space"))?;
            file_end = r
                .file_offset
                .checked_add(r.size)
                .ok_or_else(|| format!("memory region {i}: wraps the file"))?;
        }
        if file_end != self.size {
            return Err(format!(
                "memory file size {} is not the end of the last region ({file_end})",
                self.size
            ));
        }
        Ok(())
    }
}

/// One guest memory region handed to the writer: its guest-physical address and the host
/// memory that backs it. The VMM builds these from its guest memory while the VM is paused.
#[derive(Debug, Clone, Copy)]
pub struct GuestRegion<'a> {
    /// Guest-physical address of `data[0]`.
    pub guest_addr: u64,
    /// The region's bytes (length a multiple of [`PAGE_SIZE`]).
    pub data: &'a [u8],
    /// Dirty pages (bit `p % 64` of word `p / 64` for page `p`, as `KVM_GET_DIRTY_LOG` returns
    /// them). Only with [`WriteOptions::incremental`]; `None` means every page.
    pub dirty: Option<&'a [u64]>,
    /// The file `data` is a private (copy-on-write) mapping of, if it is one — guest memory a
    /// restore mapped from a checkpoint's memory file. Pages this process never wrote still
    /// hold that file's content, so the writer copies the file's data extents in the kernel
    /// (`copy_file_range`) and writes only the pages the process changed, instead of reading
    /// (and faulting in) every page of the mapping.
    pub base: Option<BaseFile<'a>>,
}

/// The file behind a private file mapping ([`GuestRegion::base`]).
#[derive(Debug, Clone, Copy)]
pub struct BaseFile<'a> {
    /// The file.
    pub file: &'a File,
    /// The offset of the region's first byte in it.
    pub offset: u64,
}

/// The pages of a private file mapping this process changed (bit `p % 64` of word `p / 64`):
/// present and anonymous (a copy-on-write copy), or swapped out. A page that is not present,
/// or present and still the file's page, holds the file's content.
fn changed_pages(data: &[u8]) -> Result<Vec<u64>> {
    // Bit 63: present; bit 62: swapped; bit 61: a file page (or shared anonymous).
    pagemap_bits(data, "a file-backed region", |v| {
        (v >> 63 == 1 && (v >> 61) & 1 == 0) || (v >> 62) & 1 == 1
    })
}

/// Copies the data extents of `len` bytes of `src` from `src_off` into `dst` at `dst_off`
/// (holes stay holes: `dst` is new and sparse). In the kernel with `copy_file_range`, falling
/// back to reads and writes where it is not supported. Returns the bytes copied.
fn copy_extents(
    src: &File,
    src_off: u64,
    dst: &File,
    dst_path: &Path,
    dst_off: u64,
    len: u64,
) -> Result<u64> {
    let end = src_off + len;
    let mut pos = src_off;
    let mut copied = 0;
    while pos < end {
        let Some(data) = seek(src, dst_path, pos, libc::SEEK_DATA)? else {
            break;
        };
        if data >= end {
            break;
        }
        let hole = seek(src, dst_path, data, libc::SEEK_HOLE)?
            .unwrap_or(end)
            .min(end);
        let mut at = data;
        while at < hole {
            let n = (hole - at).min(1 << 30) as usize;
            let (Ok(mut off_in), Ok(mut off_out)) = (
                libc::loff_t::try_from(at),
                libc::loff_t::try_from(dst_off + (at - src_off)),
            ) else {
                return Err(Error::BadArgument("offset beyond 2^63".into()));
            };
            // SAFETY: copy_file_range between two descriptors we own, with pointers to local
            // offsets it updates; it touches no memory of ours besides those.
            let r = unsafe {
                libc::copy_file_range(
                    src.as_raw_fd(),
                    &mut off_in,
                    dst.as_raw_fd(),
                    &mut off_out,
                    n,
                    0,
                )
            };
            if r > 0 {
                at += r as u64;
                copied += r as u64;
                continue;
            }
            let e = std::io::Error::last_os_error();
            if r == 0
                || matches!(
                    e.raw_os_error(),
                    Some(libc::EXDEV | libc::ENOSYS | libc::EINVAL | libc::EOPNOTSUPP)
                )
            {
                // Not supported between these files: copy through a buffer.
                let mut buf = vec![0u8; n.min(8 << 20)];
                let chunk = &mut buf[..];
                src.read_exact_at(chunk, at).at(dst_path, "read base")?;
                dst.write_all_at(chunk, dst_off + (at - src_off))
                    .at(dst_path, "write")?;
                at += chunk.len() as u64;
                copied += chunk.len() as u64;
                continue;
            }
            return Err(Error::io(dst_path, "copy_file_range", e));
        }
        pos = hole.max(pos + PAGE_SIZE);
    }
    Ok(copied)
}

/// How [`write_memory`] writes.
#[derive(Debug, Clone, Copy, Default)]
pub struct WriteOptions {
    /// Compute each region's checksum while writing (costs a CRC pass over the non-zero pages).
    pub checksum: bool,
    /// fsync the file before returning.
    pub sync: bool,
    /// Update an existing memory file of the same layout instead of creating one: only dirty
    /// pages are looked at; dirty zero pages are punched out. Checksums are not computed.
    pub incremental: bool,
    /// Treat pages the host never populated as zero without reading them (which would fault
    /// in the zero page, about a microsecond each: most of the cost for a large idle guest).
    /// Asks `/proc/self/pagemap`: a page neither present nor swapped has never been written.
    /// **Only for private anonymous memory** (for a file-backed mapping, an unpopulated page
    /// holds the file's data); region slices must be page-aligned.
    pub skip_unpopulated: bool,
}

/// The pages of `data` whose `/proc/self/pagemap` entry satisfies `keep`, as a bitmap (bit
/// `p % 64` of word `p / 64`). `data` must be page-aligned; `what` names it in the error.
fn pagemap_bits(data: &[u8], what: &str, keep: impl Fn(u64) -> bool) -> Result<Vec<u64>> {
    let pagemap = Path::new("/proc/self/pagemap");
    let addr = data.as_ptr() as u64;
    if addr & (PAGE_SIZE - 1) != 0 {
        return Err(Error::BadArgument(format!("{what} must be page-aligned")));
    }
    let pages = data.len() / PAGE_SIZE as usize;
    let f = File::open(pagemap).at(pagemap, "open")?;
    let mut bits = vec![0u64; pages.div_ceil(64)];
    let mut buf = vec![0u8; 8 * 65536];
    let mut p = 0;
    while p < pages {
        let n = (pages - p).min(65536);
        let chunk = &mut buf[..n * 8];
        f.read_exact_at(chunk, (addr / PAGE_SIZE + p as u64) * 8)
            .at(pagemap, "read")?;
        for (i, e) in chunk.chunks_exact(8).enumerate() {
            let mut w = [0u8; 8];
            w.copy_from_slice(e);
            if keep(u64::from_le_bytes(w)) {
                bits[(p + i) / 64] |= 1 << ((p + i) % 64);
            }
        }
        p += n;
    }
    Ok(bits)
}

/// The pages of `data` that are present or swapped (pagemap bits 63 and 62).
fn populated_pages(data: &[u8]) -> Result<Vec<u64>> {
    pagemap_bits(data, "a region with skip_unpopulated", |v| v >> 62 != 0)
}

/// What [`write_memory`] did, besides the record.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct WriteStats {
    /// Bytes of non-zero pages written.
    pub written: u64,
    /// `pwrite` calls made.
    pub writes: u64,
    /// Pages looked at.
    pub pages_scanned: u64,
}

/// Whether `page` is all zero. Compares 16-byte words, OR-ing 64 bytes at a time so the loop
/// vectorises, and returns at the first non-zero block (guest pages that hold data usually
/// show it in the first bytes).
pub fn is_zero(page: &[u8]) -> bool {
    // SAFETY: every bit pattern is a valid u128, so viewing the aligned middle of a byte slice
    // as u128s is sound; `align_to` gives the unaligned head and tail separately.
    let (head, mid, tail) = unsafe { page.align_to::<u128>() };
    if head.iter().any(|&b| b != 0) || tail.iter().any(|&b| b != 0) {
        return false;
    }
    let mut blocks = mid.chunks_exact(4);
    for b in &mut blocks {
        if (b[0] | b[1] | b[2] | b[3]) != 0 {
            return false;
        }
    }
    blocks.remainder().iter().all(|&w| w == 0)
}

fn dirty(bitmap: Option<&[u64]>, page: usize) -> bool {
    match bitmap {
        None => true,
        Some(b) => b
            .get(page / 64)
            .is_some_and(|w| (w >> (page % 64)) & 1 == 1),
    }
}

fn punch_hole(file: &File, path: &Path, offset: u64, len: u64) -> Result<()> {
    let (Ok(off), Ok(l)) = (i64::try_from(offset), i64::try_from(len)) else {
        return Err(Error::BadArgument("hole beyond 2^63".into()));
    };
    // SAFETY: fallocate on a file descriptor we own; it only changes the file's allocation.
    let r = unsafe {
        libc::fallocate(
            file.as_raw_fd(),
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            off,
            l,
        )
    };
    if r != 0 {
        return Err(Error::io(
            path,
            "punch hole",
            std::io::Error::last_os_error(),
        ));
    }
    Ok(())
}

/// Writes guest memory `regions` to the memory file at `path` and returns its record (layout,
/// checksums if asked, size on disk) and statistics.
///
/// A new file is created (replacing any file there) with its full length set first, so pages
/// never written are holes; runs of consecutive non-zero pages are written with one `pwrite`
/// each; zero pages are never written. With [`WriteOptions::incremental`] the existing file at
/// `path` must have this layout, and only dirty pages are written or punched out.
pub fn write_memory(
    path: &Path,
    regions: &[GuestRegion<'_>],
    opts: WriteOptions,
) -> Result<(MemoryRecord, WriteStats)> {
    let spans: Vec<(u64, u64)> = regions
        .iter()
        .map(|r| (r.guest_addr, r.data.len() as u64))
        .collect();
    let mut record = MemoryRecord::layout(&spans)?;
    for (i, r) in regions.iter().enumerate() {
        let pages = r.data.len() / PAGE_SIZE as usize;
        if let Some(b) = r.dirty {
            if !opts.incremental {
                return Err(Error::BadArgument(format!(
                    "memory region {i}: a dirty bitmap needs the incremental mode"
                )));
            }
            if b.len() < pages.div_ceil(64) {
                return Err(Error::BadArgument(format!(
                    "memory region {i}: dirty bitmap of {} words for {pages} pages",
                    b.len()
                )));
            }
        }
    }
    let file = if opts.incremental {
        let f = OpenOptions::new().write(true).open(path).at(path, "open")?;
        let len = f.metadata().at(path, "stat")?.len();
        if len != record.size {
            return Err(Error::invalid(
                path,
                format!(
                    "memory file is {len} bytes, the layout needs {}",
                    record.size
                ),
            ));
        }
        f
    } else {
        let f = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(path)
            .at(path, "create")?;
        f.set_len(record.size).at(path, "set length")?;
        f
    };

    let mut stats = WriteStats::default();
    let page = PAGE_SIZE as usize;
    for (r, rec) in regions.iter().zip(record.regions.iter_mut()) {
        let pages = r.data.len() / page;
        // A file-backed region: the base file's content first, then the changed pages over
        // it (changed pages that are zero are punched out).
        let changed = match (&r.base, opts.incremental) {
            (Some(b), false) => {
                let changed = changed_pages(r.data)?;
                stats.written +=
                    copy_extents(b.file, b.offset, &file, path, rec.file_offset, rec.size)?;
                Some(changed)
            }
            _ => None,
        };
        let over_base = changed.is_some();
        let dirty_map = if over_base {
            changed.as_deref()
        } else {
            r.dirty
        };
        let mut digest = (opts.checksum && !opts.incremental && !over_base).then(|| CRC64.digest());
        let populated = if opts.skip_unpopulated && !over_base {
            Some(populated_pages(r.data)?)
        } else {
            None
        };
        // Runs of pages [start, p) to write, and (incremental) to punch.
        let mut run: Option<usize> = None;
        let mut zeros: Option<usize> = None;
        let flush_run = |start: usize, end: usize, stats: &mut WriteStats| -> Result<()> {
            let bytes = &r.data[start * page..end * page];
            file.write_all_at(bytes, rec.file_offset + (start * page) as u64)
                .at(path, "write")?;
            stats.written += bytes.len() as u64;
            stats.writes += 1;
            Ok(())
        };
        let flush_zeros = |start: usize, end: usize| -> Result<()> {
            punch_hole(
                &file,
                path,
                rec.file_offset + (start * page) as u64,
                ((end - start) * page) as u64,
            )
        };
        for p in 0..pages {
            if !dirty(dirty_map, p) {
                if let Some(s) = run.take() {
                    flush_run(s, p, &mut stats)?;
                }
                if let Some(s) = zeros.take() {
                    flush_zeros(s, p)?;
                }
                continue;
            }
            stats.pages_scanned += 1;
            let bytes = &r.data[p * page..(p + 1) * page];
            if !dirty(populated.as_deref(), p) || is_zero(bytes) {
                if let Some(s) = run.take() {
                    flush_run(s, p, &mut stats)?;
                }
                if (opts.incremental || over_base) && zeros.is_none() {
                    zeros = Some(p);
                }
            } else {
                if let Some(s) = zeros.take() {
                    flush_zeros(s, p)?;
                }
                run.get_or_insert(p);
                if let Some(d) = digest.as_mut() {
                    d.update(&(p as u64).to_le_bytes());
                    d.update(bytes);
                }
            }
        }
        if let Some(s) = run.take() {
            flush_run(s, pages, &mut stats)?;
        }
        if let Some(s) = zeros.take() {
            flush_zeros(s, pages)?;
        }
        rec.crc64 = digest.map(|d| d.finalize());
        if over_base && opts.checksum {
            rec.crc64 = Some(region_crc(&file, path, rec)?);
        }
    }
    if opts.sync {
        file.sync_all().at(path, "fsync")?;
    }
    record.allocated = file.metadata().at(path, "stat")?.blocks() * 512;
    Ok((record, stats))
}

/// An open memory file, checked against its layout.
#[derive(Debug)]
pub struct MemoryFile {
    file: File,
    path: PathBuf,
    record: MemoryRecord,
}

impl MemoryFile {
    /// Opens the memory file at `path` for `record`'s layout: the layout must be valid and the
    /// file's length must be the layout's size.
    pub fn open(path: &Path, record: &MemoryRecord) -> Result<MemoryFile> {
        record
            .validate()
            .map_err(|reason| Error::invalid(path, reason))?;
        let file = File::open(path).at(path, "open")?;
        let len = file.metadata().at(path, "stat")?.len();
        if len < record.size {
            return Err(Error::Truncated {
                path: path.into(),
                expected: record.size,
                actual: len,
            });
        }
        if len > record.size {
            return Err(Error::invalid(
                path,
                format!(
                    "memory file is {len} bytes, the layout says {}",
                    record.size
                ),
            ));
        }
        Ok(MemoryFile {
            file,
            path: path.into(),
            record: record.clone(),
        })
    }

    /// The layout.
    pub fn record(&self) -> &MemoryRecord {
        &self.record
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The file's current size on disk in bytes (`st_blocks * 512`).
    pub fn allocated(&self) -> Result<u64> {
        Ok(self.file.metadata().at(&self.path, "stat")?.blocks() * 512)
    }

    /// Maps region `index` private (copy-on-write) and read-write: reads see the file (holes
    /// read as zero), writes go to anonymous copies and never reach the file.
    pub fn map(&self, index: usize) -> Result<MmapRegion> {
        let Some(r) = self.record.regions.get(index) else {
            return Err(Error::BadArgument(format!(
                "{}: no memory region {index}",
                self.path.display()
            )));
        };
        let (Ok(len), Ok(offset)) = (
            usize::try_from(r.size),
            libc::off_t::try_from(r.file_offset),
        ) else {
            return Err(Error::invalid(
                &self.path,
                format!("memory region {index} too large to map"),
            ));
        };
        // SAFETY: a new mapping chosen by the kernel (no address hint, no MAP_FIXED), so no
        // existing memory is affected. `len` and `offset` come from a validated layout whose
        // end is the file's length (checked in `open`). MAP_PRIVATE makes it copy-on-write:
        // nobody else's writes to the file are our concern (the checkpoint is immutable), and
        // our writes never reach the file. The result is checked for MAP_FAILED below and the
        // mapping is owned by the returned `MmapRegion`, which unmaps it exactly once.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_NORESERVE,
                self.file.as_raw_fd(),
                offset,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(Error::io(
                &self.path,
                "mmap",
                std::io::Error::last_os_error(),
            ));
        }
        let Some(ptr) = NonNull::new(ptr.cast::<u8>()) else {
            return Err(Error::invalid(&self.path, "mmap returned a null mapping"));
        };
        Ok(MmapRegion {
            ptr,
            len,
            guest_addr: r.guest_addr,
        })
    }

    /// Computes every region's checksum from the file, reading only its data extents
    /// (`SEEK_DATA`/`SEEK_HOLE`), in the definition of the module docs.
    pub fn checksums(&self) -> Result<Vec<u64>> {
        self.record
            .regions
            .iter()
            .map(|r| region_crc(&self.file, &self.path, r))
            .collect()
    }

    /// Checks every recorded region checksum against the file; a mismatch names the file and
    /// the region.
    pub fn verify(&self) -> Result<()> {
        for (i, r) in self.record.regions.iter().enumerate() {
            let Some(expected) = r.crc64 else { continue };
            let actual = region_crc(&self.file, &self.path, r)?;
            if actual != expected {
                return Err(Error::ChecksumMismatch {
                    path: self.path.clone(),
                    what: Some(format!("memory region {i} (guest {:#x})", r.guest_addr)),
                    expected,
                    actual,
                });
            }
        }
        Ok(())
    }
}

fn seek(file: &File, path: &Path, pos: u64, whence: libc::c_int) -> Result<Option<u64>> {
    let Ok(p) = libc::off_t::try_from(pos) else {
        return Ok(None);
    };
    // SAFETY: lseek on a file descriptor we own; it only moves the file offset, which this
    // crate never uses on this descriptor (all reads are positional).
    let r = unsafe { libc::lseek(file.as_raw_fd(), p, whence) };
    if r < 0 {
        let e = std::io::Error::last_os_error();
        if e.raw_os_error() == Some(libc::ENXIO) {
            return Ok(None);
        }
        return Err(Error::io(path, "seek data", e));
    }
    Ok(Some(r as u64))
}

fn region_crc(file: &File, path: &Path, r: &RegionRecord) -> Result<u64> {
    const CHUNK: u64 = 8 << 20;
    let mut digest = CRC64.digest();
    let mut buf = vec![0u8; CHUNK as usize];
    let end = r.file_offset + r.size;
    let mut pos = r.file_offset;
    while pos < end {
        let Some(data) = seek(file, path, pos, libc::SEEK_DATA)? else {
            break;
        };
        if data >= end {
            break;
        }
        let data = (data - data % PAGE_SIZE).max(pos);
        let hole = seek(file, path, data, libc::SEEK_HOLE)?.unwrap_or(end);
        let stop = hole.next_multiple_of(PAGE_SIZE).min(end);
        let mut at = data;
        while at < stop {
            let n = (stop - at).min(CHUNK) as usize;
            let chunk = &mut buf[..n];
            file.read_exact_at(chunk, at).at(path, "read")?;
            for (i, page) in chunk.chunks_exact(PAGE_SIZE as usize).enumerate() {
                if !is_zero(page) {
                    let index = (at - r.file_offset) / PAGE_SIZE + i as u64;
                    digest.update(&index.to_le_bytes());
                    digest.update(page);
                }
            }
            at += n as u64;
        }
        pos = stop.max(pos + PAGE_SIZE);
    }
    Ok(digest.finalize())
}

/// A file's length, size on disk and content checksum ([`sparse_digest`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SparseDigest {
    /// Length in bytes.
    pub size: u64,
    /// Bytes on disk (`st_blocks * 512`).
    pub allocated: u64,
    /// CRC-64/XZ of, for every 4 KiB block of the file that is not all zero in order, the
    /// block's index (u64, little-endian) followed by its bytes (the last block may be
    /// shorter). It depends only on the content, not on which zero blocks are holes, and is
    /// computed reading only the file's data extents.
    pub crc64: u64,
}

/// The [`SparseDigest`] of the file at `path`.
pub fn sparse_digest(path: &Path) -> Result<SparseDigest> {
    const CHUNK: u64 = 8 << 20;
    let file = File::open(path).at(path, "open")?;
    let md = file.metadata().at(path, "stat")?;
    let end = md.len();
    let mut digest = CRC64.digest();
    let mut buf = vec![0u8; CHUNK as usize];
    let mut pos = 0;
    while pos < end {
        let Some(data) = seek(&file, path, pos, libc::SEEK_DATA)? else {
            break;
        };
        if data >= end {
            break;
        }
        let data = (data - data % PAGE_SIZE).max(pos);
        let hole = seek(&file, path, data, libc::SEEK_HOLE)?.unwrap_or(end);
        let stop = hole.next_multiple_of(PAGE_SIZE).min(end);
        let mut at = data;
        while at < stop {
            let n = (stop - at).min(CHUNK) as usize;
            let chunk = &mut buf[..n];
            file.read_exact_at(chunk, at).at(path, "read")?;
            for (i, block) in chunk.chunks(PAGE_SIZE as usize).enumerate() {
                if !is_zero(block) {
                    digest.update(&(at / PAGE_SIZE + i as u64).to_le_bytes());
                    digest.update(block);
                }
            }
            at += n as u64;
        }
        pos = stop.max(pos + PAGE_SIZE);
    }
    Ok(SparseDigest {
        size: end,
        allocated: md.blocks() * 512,
        crc64: digest.finalize(),
    })
}

/// The CRC of [`SparseDigester`] (the same as [`sparse_digest`]'s), in a `static` so a
/// digester can hold its running state.
static DIGESTER_CRC: crc::Crc<u64, crc::Table<16>> = CRC64;

/// A [`SparseDigest`] computed while a file of `size` bytes is written front to back, so the
/// file need not be read back: feed it every data range as it is written ([`Self::feed`]),
/// in ascending order; what is not fed is a hole (zeroes). Ranges fed out of order, or not
/// on whole 4 KiB blocks (but at the file's end), leave the digest to [`Self::finish`], which
/// then reads the file back ([`sparse_digest`]).
pub struct SparseDigester {
    digest: crc::Digest<'static, u64, crc::Table<16>>,
    size: u64,
    /// The first block after what was fed.
    next_block: u64,
    /// Whether everything fed was in order and on whole blocks.
    ordered: bool,
}

impl SparseDigester {
    /// A digester for a file of `size` bytes.
    pub fn new(size: u64) -> SparseDigester {
        SparseDigester {
            digest: DIGESTER_CRC.digest(),
            size,
            next_block: 0,
            ordered: true,
        }
    }

    /// `data` was written at `offset`.
    pub fn feed(&mut self, offset: u64, data: &[u8]) {
        let end = offset.saturating_add(data.len() as u64);
        let whole_blocks = offset.is_multiple_of(PAGE_SIZE)
            && (end.is_multiple_of(PAGE_SIZE) || end == self.size)
            && end <= self.size;
        if !self.ordered || !whole_blocks || offset / PAGE_SIZE < self.next_block {
            self.ordered = false;
            return;
        }
        for (i, block) in data.chunks(PAGE_SIZE as usize).enumerate() {
            if !is_zero(block) {
                self.digest
                    .update(&(offset / PAGE_SIZE + i as u64).to_le_bytes());
                self.digest.update(block);
            }
        }
        self.next_block = end.div_ceil(PAGE_SIZE);
    }

    /// The digest of the file at `path`, now written: from what was fed, or, if that was not
    /// in order, by reading the file.
    pub fn finish(self, path: &Path) -> Result<SparseDigest> {
        if !self.ordered {
            return sparse_digest(path);
        }
        let md = std::fs::metadata(path).at(path, "stat")?;
        if md.len() != self.size {
            return sparse_digest(path);
        }
        Ok(SparseDigest {
            size: self.size,
            allocated: md.blocks() * 512,
            crc64: self.digest.finalize(),
        })
    }
}

/// Copies the file at `src` to a new file `dst` (refused if it exists), keeping holes: only
/// data extents are copied, in the kernel where it can (`copy_file_range`). The copy is
/// fsynced. Returns the bytes copied.
pub fn copy_sparse(src: &Path, dst: &Path) -> Result<u64> {
    let from = File::open(src).at(src, "open")?;
    let len = from.metadata().at(src, "stat")?.len();
    let to = OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .open(dst)
        .at(dst, "create")?;
    to.set_len(len).at(dst, "set length")?;
    let copied = copy_extents(&from, 0, &to, dst, 0, len)?;
    to.sync_all().at(dst, "fsync")?;
    Ok(copied)
}

/// A region of a memory file mapped private and read-write; unmapped on drop.
///
/// The VMM wraps the pointer into its guest memory (vm-memory's `MmapRegion::build_raw`) and
/// keeps this value alive as long as the guest memory uses it.
#[derive(Debug)]
pub struct MmapRegion {
    ptr: NonNull<u8>,
    len: usize,
    guest_addr: u64,
}

// SAFETY: the mapping is plain memory owned by this value (no thread affinity); sharing the
// raw pointer across threads is as safe as sharing guest memory, which the VMM synchronises.
unsafe impl Send for MmapRegion {}
// SAFETY: `&MmapRegion` only gives out the pointer and length; see `Send`.
unsafe impl Sync for MmapRegion {}

impl MmapRegion {
    /// The first byte of the mapping.
    pub fn as_ptr(&self) -> *mut u8 {
        self.ptr.as_ptr()
    }

    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the mapping is empty (never: regions are non-empty).
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The guest-physical address the region belongs at.
    pub fn guest_addr(&self) -> u64 {
        self.guest_addr
    }
}

impl Drop for MmapRegion {
    fn drop(&mut self) {
        // SAFETY: `ptr`/`len` are exactly a mapping made by `MemoryFile::map` and owned by this
        // value; it is unmapped once, here. Users of the raw pointer must not outlive it.
        unsafe {
            libc::munmap(self.ptr.as_ptr().cast(), self.len);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_digest_fed_while_writing_is_the_one_read_back() {
        let d = tempfile::tempdir().unwrap();
        let size = 10 * PAGE_SIZE + 1536; // the last block is short
        let page = |v: u8| vec![v; PAGE_SIZE as usize];
        // (offset, data): data, a zero block inside data, a hole, the short last block.
        let mut middle = page(7);
        middle.extend(page(0));
        middle.extend(page(9));
        let writes: Vec<(u64, Vec<u8>)> = vec![
            (0, page(1)),
            (2 * PAGE_SIZE, middle),
            (9 * PAGE_SIZE, {
                let mut t = page(3);
                t.extend(vec![4u8; 1536]);
                t
            }),
        ];
        let path = d.path().join("f");
        let f = File::create(&path).unwrap();
        f.set_len(size).unwrap();
        let mut dg = SparseDigester::new(size);
        for (off, data) in &writes {
            f.write_all_at(data, *off).unwrap();
            dg.feed(*off, data);
        }
        drop(f);
        let read_back = sparse_digest(&path).unwrap();
        assert_eq!(dg.finish(&path).unwrap(), read_back);

        // Out of order, or off whole blocks: it reads the file back, with the same result.
        let mut dg = SparseDigester::new(size);
        dg.feed(2 * PAGE_SIZE, &writes[1].1);
        dg.feed(0, &writes[0].1);
        assert_eq!(dg.finish(&path).unwrap(), read_back);
        let mut dg = SparseDigester::new(size);
        dg.feed(512, &[1u8; 512]);
        assert_eq!(dg.finish(&path).unwrap(), read_back);
        // Fed wrong but in order: a different digest (what is fed is what counts).
        let mut dg = SparseDigester::new(size);
        dg.feed(0, &page(1));
        assert_ne!(dg.finish(&path).unwrap().crc64, read_back.crc64);
    }

    const MIB: usize = 1 << 20;

    fn page_fill(buf: &mut [u8], page: usize, seed: u64) {
        let v = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ page as u64 | 1;
        for w in buf[page * 4096..(page + 1) * 4096].chunks_exact_mut(8) {
            w.copy_from_slice(&v.to_le_bytes());
        }
    }

    fn blocks(path: &Path) -> u64 {
        std::fs::metadata(path).unwrap().blocks() * 512
    }

    #[test]
    fn zero_detection() {
        let mut p = vec![0u8; 4096 + 1];
        assert!(is_zero(&p[..4096]));
        assert!(is_zero(&p[1..]));
        for i in [0, 1, 15, 16, 63, 64, 2000, 4095] {
            p[i] = 1;
            assert!(!is_zero(&p[..4096]), "{i}");
            p[i] = 0;
        }
    }

    #[test]
    fn layout_aligns_regions_and_rejects_overlap() {
        let rec = MemoryRecord::layout(&[(0, 640 << 10), (1 << 20, 3 << 20)]).unwrap();
        assert_eq!(rec.regions[0].file_offset, 0);
        assert_eq!(rec.regions[1].file_offset, 2 << 20);
        assert_eq!(rec.size, 5 << 20);
        assert!(MemoryRecord::layout(&[(0, 8192), (4096, 4096)]).is_err());
        assert!(MemoryRecord::layout(&[(0, 100)]).is_err());
        assert!(MemoryRecord::layout(&[(4096, 4096), (0, 4096)]).is_err());
    }

    #[test]
    fn sparse_file_holds_only_non_zero_pages_and_maps_back() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("memory");
        let mut low = vec![0u8; 640 * 1024];
        let mut high = vec![0u8; 16 * MIB];
        // 3 separate runs in `high` and one page in `low`: 1 + 3 writes.
        page_fill(&mut low, 7, 1);
        for p in (0..10).chain(100..101).chain(4000..4096) {
            page_fill(&mut high, p, 2);
        }
        let regions = [
            GuestRegion {
                guest_addr: 0,
                data: &low,
                dirty: None,
                base: None,
            },
            GuestRegion {
                guest_addr: 1 << 20,
                data: &high,
                dirty: None,
                base: None,
            },
        ];
        let opts = WriteOptions {
            checksum: true,
            sync: true,
            ..Default::default()
        };
        let (rec, stats) = write_memory(&path, &regions, opts).unwrap();
        assert_eq!(stats.writes, 4);
        assert_eq!(stats.written, (1 + 10 + 1 + 96) * 4096);
        assert_eq!(rec.size, (2 + 16) << 20);
        assert_eq!(std::fs::metadata(&path).unwrap().len(), rec.size);
        // Only the non-zero pages are allocated (filesystems may round up to a few blocks).
        let on_disk = blocks(&path);
        assert!(on_disk >= stats.written, "{on_disk}");
        assert!(
            on_disk <= stats.written + 64 * 1024,
            "{on_disk} for {}",
            stats.written
        );
        assert_eq!(rec.allocated, on_disk);

        let mf = MemoryFile::open(&path, &rec).unwrap();
        mf.verify().unwrap();
        assert_eq!(
            mf.checksums().unwrap(),
            rec.regions
                .iter()
                .map(|r| r.crc64.unwrap())
                .collect::<Vec<_>>()
        );
        for (i, src) in [&low, &high].into_iter().enumerate() {
            let m = mf.map(i).unwrap();
            assert_eq!(m.len(), src.len());
            assert_eq!(m.guest_addr(), regions[i].guest_addr);
            // SAFETY: the mapping lives for this scope and nothing else touches it.
            let s = unsafe { std::slice::from_raw_parts_mut(m.as_ptr(), m.len()) };
            assert!(s == &src[..], "region {i} reads back");
            // Copy-on-write: writes land in the mapping only.
            s[7 * 4096] ^= 0xff;
            s[150 * 4096] = 0x55;
            assert_eq!(s[150 * 4096], 0x55);
        }
        drop(mf);
        let mf = MemoryFile::open(&path, &rec).unwrap();
        mf.verify().unwrap();
        let m = mf.map(1).unwrap();
        // SAFETY: as above.
        let s = unsafe { std::slice::from_raw_parts(m.as_ptr(), m.len()) };
        assert_eq!(s[150 * 4096], 0);
        assert_eq!(blocks(&path), on_disk);
    }

    #[test]
    fn a_file_backed_region_is_written_as_its_base_plus_the_changed_pages() {
        let dir = tempfile::tempdir().unwrap();
        let first = dir.path().join("memory-1");
        let mut mem = vec![0u8; 4 * MIB];
        for p in (0..8).chain(500..600) {
            page_fill(&mut mem, p, 3);
        }
        let opts = WriteOptions {
            checksum: true,
            sync: true,
            ..Default::default()
        };
        let one = [GuestRegion {
            guest_addr: 0,
            data: &mem,
            dirty: None,
            base: None,
        }];
        let (rec1, _) = write_memory(&first, &one, opts).unwrap();
        // Restore: map it private, then the guest changes some pages: one written over a
        // data page, one written in a hole, one data page zeroed.
        let f1 = MemoryFile::open(&first, &rec1).unwrap();
        let map = f1.map(0).unwrap();
        // SAFETY: the mapping is ours, `len` bytes long, and nothing else uses it here.
        let view = unsafe { std::slice::from_raw_parts_mut(map.as_ptr(), map.len()) };
        page_fill(view, 3, 9);
        page_fill(view, 300, 9);
        view[550 * 4096..551 * 4096].fill(0);
        let mut expect = mem.clone();
        page_fill(&mut expect, 3, 9);
        page_fill(&mut expect, 300, 9);
        expect[550 * 4096..551 * 4096].fill(0);
        assert_eq!(&view[..], &expect[..]);

        let base_file = File::open(&first).unwrap();
        let second = dir.path().join("memory-2");
        let two = [GuestRegion {
            guest_addr: 0,
            data: view,
            dirty: None,
            base: Some(BaseFile {
                file: &base_file,
                offset: rec1.regions[0].file_offset,
            }),
        }];
        let (rec2, stats) = write_memory(&second, &two, opts).unwrap();
        // Only the changed pages were written from memory: 2 non-zero ones, one write each.
        assert_eq!(stats.writes, 2);
        let got = std::fs::read(&second).unwrap();
        assert_eq!(&got[..expect.len()], &expect[..]);
        // Holes stay holes: 8 + 100 + 1 - 1 data pages, not 4 MiB.
        assert!(blocks(&second) < 2 * MIB as u64, "{}", blocks(&second));
        let f2 = MemoryFile::open(&second, &rec2).unwrap();
        f2.verify().unwrap();
        // The checksum is the content's: the same as writing `expect` from anonymous memory.
        let (rec3, _) = write_memory(
            &dir.path().join("memory-3"),
            &[GuestRegion {
                guest_addr: 0,
                data: &expect,
                dirty: None,
                base: None,
            }],
            opts,
        )
        .unwrap();
        assert_eq!(rec2.regions[0].crc64, rec3.regions[0].crc64);
    }

    #[test]
    fn corruption_and_size_mismatch_name_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("memory");
        let mut data = vec![0u8; 4 * MIB];
        page_fill(&mut data, 3, 9);
        let regions = [GuestRegion {
            guest_addr: 0,
            data: &data,
            dirty: None,
            base: None,
        }];
        let opts = WriteOptions {
            checksum: true,
            ..Default::default()
        };
        let (rec, _) = write_memory(&path, &regions, opts).unwrap();
        let f = OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .unwrap();
        // A byte flipped in a data page, then one written into a hole: both detected.
        for at in [3 * 4096 + 100, 1000 * 4096] {
            let mut b = [0u8];
            f.read_exact_at(&mut b, at).unwrap();
            f.write_all_at(&[b[0] ^ 4], at).unwrap();
            let err = MemoryFile::open(&path, &rec).unwrap().verify().unwrap_err();
            assert!(matches!(err, Error::ChecksumMismatch { .. }), "{err}");
            assert!(err.to_string().contains(&*path.to_string_lossy()), "{err}");
            f.write_all_at(&b, at).unwrap();
        }
        MemoryFile::open(&path, &rec).unwrap().verify().unwrap();
        f.set_len(rec.size - 4096).unwrap();
        let err = MemoryFile::open(&path, &rec).unwrap_err();
        assert!(matches!(err, Error::Truncated { .. }), "{err}");
        assert!(err.to_string().contains("memory"));
    }

    #[test]
    fn unpopulated_anonymous_pages_are_skipped_unread() {
        let len = 8 * MIB;
        // SAFETY: a fresh private anonymous mapping chosen by the kernel; checked below.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        assert_ne!(ptr, libc::MAP_FAILED);
        // SAFETY: the mapping is `len` bytes and only this test uses it.
        let mem = unsafe { std::slice::from_raw_parts_mut(ptr.cast::<u8>(), len) };
        // Keep the kernel from backing it with huge pages, so "touched" is per 4 KiB page.
        // SAFETY: advice on the mapping made above.
        unsafe { libc::madvise(ptr, len, libc::MADV_NOHUGEPAGE) };
        page_fill(mem, 3, 1);
        page_fill(mem, 1000, 1);
        mem[2000 * 4096] = 0; // touched, but zero
        let dir = tempfile::tempdir().unwrap();
        let regions = [GuestRegion {
            guest_addr: 0,
            data: mem,
            dirty: None,
            base: None,
        }];
        let all = WriteOptions {
            checksum: true,
            ..Default::default()
        };
        let skip = WriteOptions {
            skip_unpopulated: true,
            ..all
        };
        let (r1, s1) = write_memory(&dir.path().join("a"), &regions, all).unwrap();
        let (r2, s2) = write_memory(&dir.path().join("b"), &regions, skip).unwrap();
        assert_eq!(r1.regions, r2.regions);
        assert_eq!((s1.written, s1.writes), (s2.written, s2.writes));
        assert_eq!(
            std::fs::read(dir.path().join("a")).unwrap(),
            std::fs::read(dir.path().join("b")).unwrap()
        );
        assert!(s2.written == 2 * 4096);
        // SAFETY: unmapping the mapping made above; `mem` is not used after this.
        unsafe { libc::munmap(ptr, len) };
    }

    #[test]
    fn incremental_writes_only_dirty_pages_and_punches_zeroed_ones() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("memory");
        let mut data = vec![0u8; 2 * MIB];
        for p in 0..64 {
            page_fill(&mut data, p, 1);
        }
        let full = WriteOptions {
            checksum: true,
            ..Default::default()
        };
        write_memory(
            &path,
            &[GuestRegion {
                guest_addr: 0,
                data: &data,
                dirty: None,
                base: None,
            }],
            full,
        )
        .unwrap();
        // The guest zeroes pages 0..32, rewrites 40 and dirties 100; page 50 changes but is
        // (wrongly) not marked dirty, so it must not be written.
        data[..32 * 4096].fill(0);
        page_fill(&mut data, 40, 2);
        page_fill(&mut data, 100, 2);
        page_fill(&mut data, 50, 3);
        let mut bitmap = vec![0u64; 8];
        bitmap[0] = u32::MAX as u64 | 1 << 40;
        bitmap[1] = 1 << (100 - 64);
        let inc = WriteOptions {
            incremental: true,
            ..Default::default()
        };
        let region = GuestRegion {
            guest_addr: 0,
            data: &data,
            dirty: Some(&bitmap),
            base: None,
        };
        let (rec, stats) = write_memory(&path, &[region], inc).unwrap();
        assert_eq!(stats.pages_scanned, 34);
        assert_eq!(stats.writes, 2);
        let file = std::fs::read(&path).unwrap();
        assert!(file[..32 * 4096].iter().all(|&b| b == 0));
        assert_eq!(file[40 * 4096..41 * 4096], data[40 * 4096..41 * 4096]);
        assert_eq!(file[100 * 4096..101 * 4096], data[100 * 4096..101 * 4096]);
        assert_ne!(file[50 * 4096..51 * 4096], data[50 * 4096..51 * 4096]);
        assert!(blocks(&path) <= (64 - 32 + 1) * 4096 + 64 * 1024);
        assert_eq!(rec.regions[0].crc64, None);
        // A bitmap without the incremental mode, or too short, is refused.
        let region = GuestRegion {
            guest_addr: 0,
            data: &data,
            dirty: Some(&bitmap[..1]),
            base: None,
        };
        assert!(write_memory(&path, &[region], inc).is_err());
        assert!(write_memory(&path, &[region], WriteOptions::default()).is_err());
    }
}
