//! One file of a chain: a raw image or a Strata layer, opened and locked, with its header, its
//! L1 table (sparse, in memory), and (when it is being written) the allocator and the L2 tables
//! changed since the last flush, which [`Layer::flush`] makes durable in the order FORMAT.md
//! prescribes. Clean L2 tables live in the chain's bounded cache, not here.

use std::collections::{BTreeMap, BTreeSet};
use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};

use crate::error::{DiskError, Result};
use crate::file::DiskFile;
use crate::format::{
    self, l1_decode, l1_encode, Entry, Header, ParentRef, HEADER_SIZE, L1_ENTRY_SIZE, L1_OFFSET,
    L2_ENTRY_SIZE, MAGIC,
};
use crate::parent::{self, ParentPolicy};
use crate::sys;

/// The unit in which changed parts of an existing L2 table are written.
const TABLE_PAGE: u64 = 4096;

/// What kind of file a layer is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Format {
    /// A plain image: byte N of the file is byte N of the disk.
    Raw,
    /// A Strata layer.
    Strata,
}

/// Smallest step by which the file grows when the allocator runs out of space.
const GROW_MIN: u64 = 64 << 20;
/// Largest step (growth is otherwise 1/8 of the file, so large files grow in proportion).
const GROW_MAX: u64 = 1 << 30;

/// An L2 table changed since the last flush (pinned in memory until then).
#[derive(Debug)]
pub(crate) struct DirtyTable {
    pub entries: Vec<Entry>,
    /// Pages (of [`TABLE_PAGE`] bytes) holding changed entries.
    pages: BTreeSet<u64>,
    /// A table created since the last flush: written whole, then referenced from L1.
    new: bool,
}

/// Writable state of a Strata layer: changed tables and the allocator.
///
/// Host clusters `first..next` are referenced, in `free`, pending free, or lost holes left by
/// earlier opens (FORMAT.md, "Free space"); `next..end` is the unused tail of the file: free,
/// handed out in order once `free` is empty. When the tail runs out, the file grows by a large
/// step (a hole).
#[derive(Debug)]
pub(crate) struct Alloc {
    /// L2 tables changed since the last flush, by L1 index.
    pub dirty: BTreeMap<u64, DirtyTable>,
    /// Host clusters that no entry (on disk or in memory) references, freed by this open.
    free: BTreeSet<u64>,
    /// Host clusters unreferenced in memory but maybe still referenced on disk.
    pending_free: Vec<u64>,
    /// Sub-clusters (virtual cluster, host cluster, sub-cluster) no longer referenced: punched
    /// after the next flush unless referenced again by then.
    pending_punch: Vec<(u64, u64, u64)>,
    /// First host cluster of the unused tail.
    pub next: u64,
    /// First host cluster past the end of the file.
    end: u64,
    /// First host cluster of the data area.
    first: u64,
    /// Whether this open handed out or grew tail space (so closing trims what is left).
    used_tail: bool,
    /// Data written since the last flush.
    data_dirty: bool,
}

/// An open file of a chain.
#[derive(Debug)]
pub(crate) struct Layer {
    /// Path as resolved (relative paths are relative to the process's cwd).
    pub path: PathBuf,
    pub file: DiskFile,
    /// `None` for a raw file.
    pub header: Option<Header>,
    /// Size in bytes of a raw file (its virtual size is this rounded up to 512).
    pub raw_len: u64,
    pub writable: bool,
    /// The L1 table's non-empty entries: L1 index → host cluster of the L2 table.
    pub l1: BTreeMap<u64, u64>,
    pub alloc: Option<Alloc>,
    /// Bytes this process wrote to the file (data, tables, header): for write amplification.
    pub bytes_written: u64,
    /// The first `fdatasync` failure: once set, every write and flush fails until the file is
    /// opened again (after a failed sync the kernel may have dropped the dirty pages, and a
    /// retried sync would succeed without them).
    pub poisoned: Option<String>,
}

/// Reads the first bytes of a file and tells whether it starts with the Strata magic.
fn has_magic(file: &File) -> bool {
    let mut m = [0u8; 8];
    file.read_exact_at(&mut m, 0).is_ok() && m == MAGIC
}

/// Returns whether the file at `path` is a Strata layer (by magic, or by a `.strata` name).
pub(crate) fn expect_strata(path: &Path, file: &File) -> bool {
    has_magic(file) || path.extension().is_some_and(|e| e == "strata")
}

fn bits(m: u16) -> impl Iterator<Item = u64> {
    (0..16u64).filter(move |s| m & (1 << s) != 0)
}

impl Layer {
    /// Opens and locks a file (exclusive when writable, shared otherwise). `format` forces the
    /// kind; `None` detects it (magic or a `.strata` name means Strata). Reads the header and
    /// the L1 table only: the cost does not depend on the virtual size beyond 8 bytes per L1
    /// entry read (one per 256 MiB with 64 KiB clusters), nor on the data held.
    /// The file must be a regular file (a FIFO or device is refused, and never blocks the open).
    pub fn open(path: &Path, writable: bool, format: Option<Format>) -> Result<Layer> {
        let file = parent::open_regular(path, writable)?;
        sys::lock(&file, path, writable)?;
        Self::from_file(path, file, writable, format)
    }

    /// Opens, read-only and with a shared lock, the parent `recorded` in the header of the
    /// layer at `child`, if `policy` lets it name that file (see [`crate::parent`]).
    pub fn open_parent(
        child: &Path,
        recorded: &str,
        format: Format,
        policy: &ParentPolicy,
    ) -> Result<Layer> {
        let (path, file) = parent::open_parent(child, recorded, policy)?;
        sys::lock(&file, &path, false)?;
        Self::from_file(&path, file, false, Some(format))
    }

    fn from_file(path: &Path, file: File, writable: bool, format: Option<Format>) -> Result<Layer> {
        let len = file.metadata().map_err(DiskError::io(path, "stat"))?.len();
        let strata = match format {
            Some(f) => f == Format::Strata,
            None => expect_strata(path, &file),
        };
        let mut layer = Layer {
            path: path.to_path_buf(),
            file: DiskFile::from(file),
            header: None,
            raw_len: len,
            writable,
            l1: BTreeMap::new(),
            alloc: None,
            bytes_written: 0,
            poisoned: None,
        };
        if !strata {
            return Ok(layer);
        }
        let mut buf = vec![0u8; HEADER_SIZE];
        let n = read_full(&layer.file, &mut buf, 0).map_err(DiskError::io(path, "read header"))?;
        let header = Header::parse(&buf[..n]).map_err(|source| DiskError::Format {
            path: path.to_path_buf(),
            source,
        })?;
        let need = header.data_offset;
        if len < need {
            return Err(DiskError::Truncated {
                path: path.to_path_buf(),
                what: "the L1 table".into(),
                need,
                len,
            });
        }
        layer.l1 = layer.read_l1(&header, len)?;
        layer.header = Some(header);
        if writable {
            layer.make_alloc()?;
        }
        Ok(layer)
    }

    /// Reads and validates the L1 table: check bits, tables inside the data area, below the
    /// allocation mark and inside the file. Memory: the entries that name a table (the L1 is
    /// read in bounded chunks, and holes of a sparse file are skipped, not read), and at most
    /// one table per cluster the file has.
    fn read_l1(&self, h: &Header, len: u64) -> Result<BTreeMap<u64, u64>> {
        let cs = h.cluster_size();
        let first = h.data_offset / cs;
        let mut l1 = BTreeMap::new();
        for_each_l1_raw(&self.file, &self.path, h.l1_entries(), &mut |i, v| {
            let host = l1_decode(i, v).map_err(|source| DiskError::Format {
                path: self.path.clone(),
                source,
            })?;
            self.check_host(h, first, len, host, || format!("L2 table {i}"))?;
            l1.insert(i, host);
            Ok(())
        })?;
        if l1.len() as u64 > len / cs {
            return Err(DiskError::CorruptTable {
                path: self.path.clone(),
                reason: format!(
                    "the L1 table names {} L2 tables, more than the file's {} clusters",
                    l1.len(),
                    len / cs
                ),
            });
        }
        Ok(l1)
    }

    fn check_host(
        &self,
        h: &Header,
        first: u64,
        len: u64,
        host: u64,
        what: impl Fn() -> String,
    ) -> Result<()> {
        let cs = h.cluster_size();
        if host < first || host >= h.alloc_end {
            return Err(DiskError::CorruptTable {
                path: self.path.clone(),
                reason: format!(
                    "{} is at host cluster {host}, outside the data area {first}..{}",
                    what(),
                    h.alloc_end
                ),
            });
        }
        // host < alloc_end <= max_alloc_end: no overflow, but say so in the arithmetic too.
        let need = host
            .checked_add(1)
            .and_then(|n| n.checked_mul(cs))
            .unwrap_or(u64::MAX);
        if need > len {
            return Err(DiskError::Truncated {
                path: self.path.clone(),
                what: format!("{} at host cluster {host}", what()),
                need,
                len,
            });
        }
        Ok(())
    }

    /// Reads and validates L2 table `l1i` (at host cluster `host`): every entry's check bits,
    /// data clusters inside the data area, below the allocation mark and inside the file.
    pub fn load_l2(&self, l1i: u64, host: u64) -> Result<Vec<Entry>> {
        let Some(h) = &self.header else {
            return Ok(Vec::new());
        };
        let cs = h.cluster_size();
        let per = h.l2_entries();
        let mut bytes = vec![0u8; cs as usize];
        let n = read_full(&self.file, &mut bytes, host * cs)
            .map_err(DiskError::io(&self.path, "read L2 table"))?;
        if n < bytes.len() {
            return Err(DiskError::Truncated {
                path: self.path.clone(),
                what: format!("L2 table {l1i}"),
                need: (host + 1) * cs,
                len: host * cs + n as u64,
            });
        }
        let entries = format::parse_l2(l1i * per, &bytes).map_err(|source| DiskError::Format {
            path: self.path.clone(),
            source,
        })?;
        let len = self.file_len()?;
        let first = h.data_offset / cs;
        for (i, e) in entries.iter().enumerate() {
            if e.alloc != 0 {
                let c = l1i * per + i as u64;
                self.check_host(h, first, len, e.host, || {
                    format!("data of virtual cluster {c}")
                })?;
            }
        }
        Ok(entries)
    }

    /// Calls `f(cluster, entry)` for every non-empty entry of this layer, in order: from the
    /// changed tables in memory, else from the file (cost proportional to the tables held).
    pub fn for_each_entry(&self, f: &mut dyn FnMut(u64, Entry) -> Result<()>) -> Result<()> {
        let Some(h) = &self.header else {
            return Ok(());
        };
        let per = h.l2_entries();
        for (&l1i, &host) in &self.l1 {
            let dirty = self.alloc.as_ref().and_then(|a| a.dirty.get(&l1i));
            let loaded;
            let t = match dirty {
                Some(d) => &d.entries,
                None => {
                    loaded = self.load_l2(l1i, host)?;
                    &loaded
                }
            };
            for (i, e) in t.iter().enumerate() {
                if !e.is_empty() {
                    f(l1i * per + i as u64, *e)?;
                }
            }
        }
        Ok(())
    }

    /// Current file length.
    pub fn file_len(&self) -> Result<u64> {
        Ok(self
            .file
            .metadata()
            .map_err(DiskError::io(&self.path, "stat"))?
            .len())
    }

    /// The mtime of the file (seconds, nanoseconds).
    pub fn mtime(&self) -> Result<(i64, u32)> {
        let md = self
            .file
            .metadata()
            .map_err(DiskError::io(&self.path, "stat"))?;
        Ok((md.mtime(), md.mtime_nsec() as u32))
    }

    /// The file's kind.
    pub fn format(&self) -> Format {
        if self.header.is_some() {
            Format::Strata
        } else {
            Format::Raw
        }
    }

    /// Virtual size: the header's, or a raw file's length.
    pub fn virtual_size(&self) -> u64 {
        self.header
            .as_ref()
            .map_or(self.raw_len, |h| h.virtual_size)
    }

    /// Prepares a writable Strata layer for allocation: no scan, the allocation mark in the
    /// header says where the free tail starts.
    pub fn make_alloc(&mut self) -> Result<()> {
        let Some(h) = &self.header else {
            return Ok(());
        };
        let cs = h.cluster_size();
        let first = h.data_offset / cs;
        let next = h.alloc_end.max(first);
        // The tail a huge sparse file seems to have ends where host numbers would stop
        // fitting an entry (46 bits) or an off_t.
        let limit = (format::MAX_HOST_CLUSTER + 1).min(format::max_alloc_end(h.cluster_bits));
        let end = self.file_len()?.div_ceil(cs).max(next).min(limit);
        self.alloc = Some(Alloc {
            dirty: BTreeMap::new(),
            free: BTreeSet::new(),
            pending_free: Vec::new(),
            pending_punch: Vec::new(),
            next,
            end,
            first,
            used_tail: false,
            data_dirty: false,
        });
        Ok(())
    }

    /// Reopens this file read-write with an exclusive lock (for a merge that writes it). The
    /// path must still lead to the same file (device and inode) this chain opened and checked.
    pub fn upgrade_exclusive(&mut self, need_write: bool) -> Result<()> {
        if self.writable {
            return Ok(());
        }
        let file = parent::open_regular(&self.path, need_write)?;
        let (a, b) = (
            file.metadata().map_err(DiskError::io(&self.path, "stat"))?,
            self.file
                .metadata()
                .map_err(DiskError::io(&self.path, "stat"))?,
        );
        if (a.dev(), a.ino()) != (b.dev(), b.ino()) {
            return Err(DiskError::BadChain {
                path: self.path.clone(),
                reason: "was replaced by another file while the chain was open".into(),
            });
        }
        // Our own shared lock would conflict with the exclusive one on a new descriptor.
        sys::unlock(&self.file);
        if let Err(e) = sys::lock(&file, &self.path, true) {
            let _ = sys::lock(&self.file, &self.path, false);
            return Err(e);
        }
        let faults = self.file.faults();
        self.file = DiskFile::from(file);
        self.file.set_faults(faults);
        self.writable = need_write;
        if need_write && self.header.is_some() && self.alloc.is_none() {
            self.make_alloc()?;
        }
        Ok(())
    }

    /// Number of L2 tables pinned in memory by changes not yet flushed.
    pub fn dirty_tables(&self) -> usize {
        self.alloc.as_ref().map_or(0, |a| a.dirty.len())
    }

    /// Whether L2 table `l1i` is held changed in memory.
    pub fn dirty_entry(&self, c: u64) -> Option<Entry> {
        let h = self.header.as_ref()?;
        let per = h.l2_entries();
        let t = self.alloc.as_ref()?.dirty.get(&(c / per))?;
        t.entries.get((c % per) as usize).copied()
    }

    /// Pins L2 table `l1i` for change: `clean` is its current content (from the chain's cache
    /// or the file), or `None` when the layer has no such table yet (a new one is allocated).
    pub fn pin_table(&mut self, l1i: u64, clean: Option<Vec<Entry>>) -> Result<()> {
        let per = self.header.as_ref().map_or(0, |h| h.l2_entries());
        if self
            .alloc
            .as_ref()
            .is_some_and(|a| a.dirty.contains_key(&l1i))
        {
            return Ok(());
        }
        let (entries, new) = match clean {
            Some(t) => (t, false),
            None => {
                let host = self.alloc_cluster()?;
                self.l1.insert(l1i, host);
                (vec![Entry::EMPTY; per as usize], true)
            }
        };
        let Some(a) = &mut self.alloc else {
            return Err(DiskError::ReadOnly {
                path: self.path.clone(),
            });
        };
        a.dirty.insert(
            l1i,
            DirtyTable {
                entries,
                pages: BTreeSet::new(),
                new,
            },
        );
        Ok(())
    }

    /// Records a new entry for virtual cluster `c` (its table must be pinned); written to the
    /// file at the next flush. A data cluster or sub-clusters it stops referencing become free
    /// after that flush.
    pub fn set_entry(&mut self, c: u64, e: Entry) {
        let Some(h) = &self.header else { return };
        let per = h.l2_entries();
        let Some(a) = &mut self.alloc else { return };
        let Some(t) = a.dirty.get_mut(&(c / per)) else {
            return;
        };
        let i = (c % per) as usize;
        let Some(slot) = t.entries.get_mut(i) else {
            return;
        };
        let old = *slot;
        if old.host != 0 && old.host != e.host {
            a.pending_free.push(old.host);
        } else if old.host != 0 {
            for s in bits(old.alloc & !e.alloc) {
                a.pending_punch.push((c, old.host, s));
            }
        }
        *slot = e;
        t.pages.insert(i as u64 * L2_ENTRY_SIZE / TABLE_PAGE);
    }

    /// Picks a free host cluster (the lowest freed one, or the next of the unused tail).
    pub fn alloc_cluster(&mut self) -> Result<u64> {
        Ok(self.alloc_run(1)?.0)
    }

    /// Picks a run of 1 to `want` consecutive free host clusters: from the lowest free one
    /// (with the free ones right after it), else from the unused tail at the end of the file,
    /// growing the file first when the tail is used up. Returns the first and the count.
    pub fn alloc_run(&mut self, want: u64) -> Result<(u64, u64)> {
        let want = want.max(1);
        let Some(a) = &mut self.alloc else {
            return Err(DiskError::ReadOnly {
                path: self.path.clone(),
            });
        };
        if let Some(c) = a.free.pop_first() {
            let mut n = 1;
            while n < want && a.free.remove(&(c + n)) {
                n += 1;
            }
            return Ok((c, n));
        }
        if a.next >= a.end {
            self.grow(want)?;
        }
        let Some(a) = &mut self.alloc else {
            return Err(DiskError::ReadOnly {
                path: self.path.clone(),
            });
        };
        let n = want.min(a.end - a.next);
        let c = a.next;
        a.next += n;
        a.used_tail = true;
        Ok((c, n))
    }

    /// Gives back clusters `c..c + n` just handed out (their write failed).
    pub fn unalloc(&mut self, c: u64, n: u64) {
        if let Some(a) = &mut self.alloc {
            a.free.extend(c..c + n);
        }
    }

    /// Extends the unused tail (called when it is empty) by at least `want` clusters: the file
    /// grows by a step of max(64 MiB, 1/8 of the file), at most 1 GiB, never past what the
    /// tables can reference. The step is a hole (`ftruncate`), not preallocated: a host cluster
    /// whose sub-clusters are only partly written then takes only the blocks written, so a
    /// layer of scattered 4 KiB writes occupies what the guest wrote, not 16 times that.
    fn grow(&mut self, want: u64) -> Result<()> {
        let Some(h) = &self.header else {
            return Ok(());
        };
        let cs = h.cluster_size();
        // Data plus one table per L1 entry: never more is referenced at once.
        let cap_clusters = h.clusters() + h.l1_entries();
        let Some(a) = &self.alloc else {
            return Ok(());
        };
        let limit = (format::MAX_HOST_CLUSTER + 1).min(format::max_alloc_end(h.cluster_bits));
        if a.end >= limit {
            return Err(DiskError::Invalid(format!(
                "{}: file is full",
                self.path.display()
            )));
        }
        let cap = a.first.saturating_add(cap_clusters).min(limit);
        let step = (a.end.saturating_mul(cs) / 8).clamp(GROW_MIN, GROW_MAX) / cs;
        // Past the cap only by what the writes need (clusters freed but not yet reusable).
        let target = if a.end < cap {
            a.end.saturating_add(step.max(want)).min(cap)
        } else {
            a.end.saturating_add(want)
        }
        .min(limit);
        // Whole clusters, so that a cluster holding only some sub-clusters is inside the file.
        if self.file_len()? < target * cs {
            self.file
                .set_len(target * cs)
                .map_err(DiskError::io(&self.path, "extend"))?;
        }
        if let Some(a) = &mut self.alloc {
            a.end = target;
            a.used_tail = true;
        }
        Ok(())
    }

    /// Gives the unused tail back to the file system by truncating the file after the last
    /// cluster handed out. Only after a successful flush (the allocation mark on disk is then
    /// `next`), and only if this open grew or used the tail.
    pub fn trim_tail(&mut self) -> Result<()> {
        let cs = self.header.as_ref().map_or(1, |h| h.cluster_size());
        let mark = self.header.as_ref().map_or(0, |h| h.alloc_end);
        let next = match &self.alloc {
            Some(a)
                if a.used_tail
                    && a.dirty.is_empty()
                    && a.pending_free.is_empty()
                    && a.next == mark =>
            {
                a.next
            }
            _ => return Ok(()),
        };
        if self.file_len()? > next * cs {
            self.file
                .set_len(next * cs)
                .map_err(DiskError::io(&self.path, "truncate"))?;
        }
        if let Some(a) = &mut self.alloc {
            a.end = next;
        }
        Ok(())
    }

    /// Fails if an earlier sync of this file failed.
    pub fn check_poisoned(&self) -> Result<()> {
        match &self.poisoned {
            Some(first) => Err(DiskError::Poisoned {
                path: self.path.clone(),
                first: first.clone(),
            }),
            None => Ok(()),
        }
    }

    /// Writes `buf` at `off` (counted in [`Layer::bytes_written`]).
    pub fn pwrite(&mut self, buf: &[u8], off: u64, what: &'static str) -> Result<()> {
        self.check_poisoned()?;
        self.file
            .write_all_at(buf, off)
            .map_err(DiskError::io(&self.path, what))?;
        self.bytes_written += buf.len() as u64;
        Ok(())
    }

    /// Writes data and notes it (so the next flush syncs it first).
    pub fn write_data(&mut self, buf: &[u8], off: u64) -> Result<()> {
        self.pwrite(buf, off, "write")?;
        if let Some(a) = &mut self.alloc {
            a.data_dirty = true;
        }
        Ok(())
    }

    /// `fdatasync`; a failure poisons the layer (see [`Layer::poisoned`]).
    fn sync(&mut self) -> Result<()> {
        self.check_poisoned()?;
        self.file.sync_data().map_err(|e| {
            self.poisoned = Some(e.to_string());
            DiskError::io(&self.path, "fdatasync")(e)
        })
    }

    /// Makes everything written so far durable (FORMAT.md, "Crash consistency"):
    /// 1. raise the allocation mark in the header if clusters were handed out, write new L2
    ///    tables whole (nothing references them yet), fdatasync (data, tables, header);
    /// 2. write the changed pages of existing L2 tables and the L1 entries of new ones,
    ///    fdatasync;
    /// 3. free what the tables stopped referencing.
    ///
    /// Returns the tables that were pinned, now clean, for the chain's cache.
    pub fn flush(&mut self) -> Result<Vec<(u64, Vec<Entry>)>> {
        if !self.writable {
            return Ok(Vec::new());
        }
        self.check_poisoned()?;
        let Some(h) = self.header.clone() else {
            // A raw file: its data is its metadata.
            self.sync()?;
            return Ok(Vec::new());
        };
        let Some(mut a) = self.alloc.take() else {
            return Ok(Vec::new());
        };
        let res = self.flush_alloc(&h, &mut a);
        self.alloc = Some(a);
        res
    }

    fn flush_alloc(&mut self, h: &Header, a: &mut Alloc) -> Result<Vec<(u64, Vec<Entry>)>> {
        let cs = h.cluster_size();
        let mark_up = a.next > h.alloc_end;
        if !a.data_dirty && a.dirty.is_empty() && !mark_up {
            return Ok(Vec::new());
        }
        let per = h.l2_entries();
        // Step 1.
        if mark_up {
            let mut h2 = h.clone();
            h2.alloc_end = a.next;
            h2.generation = h2.generation.wrapping_add(1);
            self.pwrite(&h2.encode(), 0, "write header")?;
            self.header = Some(h2);
        }
        for (&l1i, t) in &a.dirty {
            if t.new {
                let host = self.l1.get(&l1i).copied().unwrap_or(0);
                let bytes = encode_table(l1i * per, &t.entries);
                self.pwrite(&bytes, host * cs, "write L2 table")?;
            }
        }
        self.sync()?;
        // Step 2.
        if !a.dirty.is_empty() {
            let per_page = (TABLE_PAGE / L2_ENTRY_SIZE) as usize;
            for (&l1i, t) in &a.dirty {
                let host = self.l1.get(&l1i).copied().unwrap_or(0);
                if t.new {
                    let e = l1_encode(l1i, host).to_le_bytes();
                    self.pwrite(&e, L1_OFFSET + l1i * L1_ENTRY_SIZE, "write L1 table")?;
                    continue;
                }
                for &p in &t.pages {
                    let start = p as usize * per_page;
                    let end = (start + per_page).min(t.entries.len());
                    let bytes = encode_table(l1i * per + start as u64, &t.entries[start..end]);
                    self.pwrite(&bytes, host * cs + p * TABLE_PAGE, "write L2 table")?;
                }
            }
            self.sync()?;
        }
        a.data_dirty = false;
        // Step 3: the tables on disk no longer reference these: reuse them, give space back.
        for c in a.pending_free.drain(..) {
            let _ = sys::punch_hole(&self.file, c * cs, cs);
            a.free.insert(c);
        }
        let ss = h.subcluster_size();
        for (c, host, s) in std::mem::take(&mut a.pending_punch) {
            let now = a
                .dirty
                .get(&(c / per))
                .and_then(|t| t.entries.get((c % per) as usize));
            if now.is_some_and(|e| e.host == host && e.alloc & (1 << s) != 0) {
                continue;
            }
            let _ = sys::punch_hole(&self.file, host * cs + s * ss, ss);
        }
        let out = std::mem::take(&mut a.dirty)
            .into_iter()
            .map(|(k, t)| (k, t.entries))
            .collect();
        Ok(out)
    }

    /// Rewrites the header (generation + 1) and syncs it.
    pub fn write_header(&mut self, mut h: Header) -> Result<()> {
        h.generation = h.generation.wrapping_add(1);
        self.pwrite(&h.encode(), 0, "write header")?;
        self.sync()?;
        self.header = Some(h);
        Ok(())
    }

    /// The reference a child of this layer records (its path relative to the child's
    /// directory when it is in it or below, else absolute).
    pub fn as_parent_ref(&self, child_path: &Path) -> Result<ParentRef> {
        self.parent_ref_for(child_path, None)
    }

    /// [`Layer::as_parent_ref`]; with `policy`, refuses a parent outside the child's directory
    /// that the policy does not allow (so no layer is made that would not open).
    pub fn parent_ref_for(
        &self,
        child_path: &Path,
        policy: Option<&ParentPolicy>,
    ) -> Result<ParentRef> {
        let path = parent::reference(&self.path, child_path, policy)?;
        Ok(match &self.header {
            Some(h) => ParentRef::Layer {
                path,
                layer_id: h.layer_id,
                data_id: h.data_id,
            },
            None => ParentRef::Raw {
                path,
                size: self.file_len()?,
                mtime: self.mtime()?,
                fold_ino: 0,
            },
        })
    }

    /// The inode number of the file.
    pub fn ino(&self) -> Result<u64> {
        Ok(self
            .file
            .metadata()
            .map_err(DiskError::io(&self.path, "stat"))?
            .ino())
    }

    /// This layer's header as it must be when a merge of it into `parent` starts: `FOLDING`
    /// set, and for a raw parent its inode recorded (the identity checked while the merge
    /// changes the parent's content and mtime). `None` for a raw layer.
    pub fn folding_header(&self, parent: &Layer) -> Result<Option<Header>> {
        let Some(mut h) = self.header.clone() else {
            return Ok(None);
        };
        h.flags |= format::FLAG_FOLDING;
        if let ParentRef::Raw { fold_ino, .. } = &mut h.parent {
            *fold_ino = parent.ino()?;
        }
        Ok(Some(h))
    }

    /// The `data_id` a merge of this layer gives its (layer) parent: the one this layer
    /// accepts while `FOLDING` ([`format::folding_data_id`]).
    pub fn folded_parent_data_id(&self) -> Option<[u8; 16]> {
        match &self.header.as_ref()?.parent {
            ParentRef::Layer { data_id, .. } => Some(format::folding_data_id(
                data_id,
                &self.header.as_ref()?.layer_id,
            )),
            _ => None,
        }
    }
}

/// Encodes entries starting at virtual cluster `first`.
fn encode_table(first: u64, entries: &[Entry]) -> Vec<u8> {
    let mut b = Vec::with_capacity(entries.len() * L2_ENTRY_SIZE as usize);
    for (i, e) in entries.iter().enumerate() {
        b.extend_from_slice(&e.encode(first + i as u64));
    }
    b
}

/// Iterates the set bits of a sub-cluster mask.
pub(crate) fn sub_bits(m: u16) -> impl Iterator<Item = u64> {
    bits(m)
}

/// The runs of adjacent set bits of a sub-cluster mask, as `(first, past the last)`.
pub(crate) fn sub_runs(m: u16) -> impl Iterator<Item = (u64, u64)> {
    let mut rest = u32::from(m);
    std::iter::from_fn(move || {
        if rest == 0 {
            return None;
        }
        let s = rest.trailing_zeros();
        let t = s + (rest >> s).trailing_ones();
        rest &= !(((1u32 << (t - s)) - 1) << s);
        Some((u64::from(s), u64::from(t)))
    })
}

/// Reads as much as the file has, up to `buf.len()`; returns the count.
pub(crate) fn read_full(file: &File, buf: &mut [u8], offset: u64) -> io::Result<usize> {
    let mut done = 0;
    while done < buf.len() {
        match file.read_at(&mut buf[done..], offset + done as u64) {
            Ok(0) => break,
            Ok(n) => done += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(done)
}

/// Calls `f(index, raw)` for every non-zero entry of the L1 table of `n` entries, reading it in
/// chunks of at most 64 KiB and skipping the holes of a sparse file (`SEEK_DATA`), so that a
/// huge, mostly empty table costs neither memory nor reads.
pub(crate) fn for_each_l1_raw(
    file: &File,
    path: &Path,
    n: u64,
    f: &mut dyn FnMut(u64, u64) -> Result<()>,
) -> Result<()> {
    const CHUNK: u64 = 64 << 10;
    let end = L1_OFFSET + n * L1_ENTRY_SIZE;
    let mut buf = vec![0u8; CHUNK as usize];
    let mut pos = L1_OFFSET;
    while pos < end {
        // Skip a hole: the next byte of data at or after `pos`, aligned down to an entry.
        let Some(data) = next_data(file, pos) else {
            return Ok(());
        };
        if data >= end {
            return Ok(());
        }
        if data > pos {
            pos = data - (data - L1_OFFSET) % L1_ENTRY_SIZE;
        }
        let len = (end - pos).min(CHUNK) as usize;
        let got =
            read_full(file, &mut buf[..len], pos).map_err(DiskError::io(path, "read L1 table"))?;
        if got < len {
            return Err(DiskError::Truncated {
                path: path.to_path_buf(),
                what: "the L1 table".into(),
                need: end,
                len: pos + got as u64,
            });
        }
        for (k, c) in buf[..len].chunks_exact(8).enumerate() {
            let mut a = [0u8; 8];
            a.copy_from_slice(c);
            let v = u64::from_le_bytes(a);
            if v != 0 {
                f((pos - L1_OFFSET) / L1_ENTRY_SIZE + k as u64, v)?;
            }
        }
        pos += len as u64;
    }
    Ok(())
}

/// The offset of the first byte of data at or after `pos` (`lseek(SEEK_DATA)`): `None` when
/// only a hole follows; `pos` itself when the file system cannot tell.
fn next_data(file: &File, pos: u64) -> Option<u64> {
    let Ok(off) = i64::try_from(pos) else {
        return None;
    };
    // SAFETY: lseek on a descriptor we own; all I/O on it is positional, so moving its offset
    // affects nothing.
    let r = unsafe { libc::lseek(file.as_raw_fd(), off, libc::SEEK_DATA) };
    if r < 0 {
        return match io::Error::last_os_error().raw_os_error() {
            Some(libc::ENXIO) => None,
            _ => Some(pos),
        };
    }
    Some((r as u64).max(pos))
}

/// Checks that `parent` is the file `child` was created on, unchanged (FORMAT.md, "Parent
/// identity").
pub(crate) fn verify_parent(child: &Layer, parent: &Layer) -> Result<()> {
    let Some(ch) = &child.header else {
        return Ok(());
    };
    // FOLDING does not switch the check off: it widens it to the one identity the merge
    // gives the parent (FORMAT.md, "Parent identity").
    let folding = ch.flags & format::FLAG_FOLDING != 0;
    let changed = |reason: String| DiskError::ParentChanged {
        path: child.path.clone(),
        parent: parent.path.clone(),
        reason,
    };
    match (&ch.parent, &parent.header) {
        (
            ParentRef::Layer {
                layer_id, data_id, ..
            },
            Some(ph),
        ) => {
            if ph.layer_id != *layer_id {
                return Err(changed(format!(
                    "is a different layer (id {}, expected {})",
                    format::id_hex(&ph.layer_id),
                    format::id_hex(layer_id)
                )));
            }
            let merged = folding && ph.data_id == format::folding_data_id(data_id, &ch.layer_id);
            if ph.data_id != *data_id && !merged {
                return Err(changed(
                    "was modified after this layer was created on it".into(),
                ));
            }
            if ph.cluster_bits != ch.cluster_bits {
                return Err(changed("has a different cluster size".into()));
            }
        }
        (
            ParentRef::Raw {
                size,
                mtime,
                fold_ino,
                ..
            },
            None,
        ) => {
            let len = parent.file_len()?;
            if len != *size {
                return Err(changed(format!("has size {len}, expected {size}")));
            }
            if folding {
                // A merge into it was interrupted: its content and mtime changed, its inode
                // did not.
                let ino = parent.ino()?;
                if ino != *fold_ino {
                    return Err(changed(format!(
                        "is another file than the one an interrupted merge was writing \
                         (inode {ino}, expected {fold_ino})"
                    )));
                }
            } else if parent.mtime()? != *mtime {
                return Err(changed(
                    "was modified after this layer was created on it (its mtime differs)".into(),
                ));
            }
        }
        (ParentRef::Layer { .. }, None) => {
            return Err(changed(
                "is not a Strata layer, but one was expected".into(),
            ))
        }
        (ParentRef::Raw { .. }, Some(_)) => {
            return Err(changed(
                "is a Strata layer, but a raw image was expected".into(),
            ))
        }
        (ParentRef::None, _) => {}
    }
    if parent.virtual_size().next_multiple_of(512) != ch.virtual_size {
        return Err(changed(format!(
            "has virtual size {}, expected {}",
            parent.virtual_size(),
            ch.virtual_size
        )));
    }
    Ok(())
}
