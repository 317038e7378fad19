//! One file of a chain: a raw image or a Strata layer, opened and locked, with its header,
//! its allocation table, and (when it is being written) the allocator and the pending table
//! updates that [`Layer::flush`] makes durable in the order FORMAT.md prescribes.

use std::collections::{BTreeSet, HashSet};
use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};

use crate::error::{DiskError, Result};
use crate::format::{self, Entry, Header, ParentRef, ENTRY_SIZE, HEADER_SIZE, MAGIC, TABLE_OFFSET};
use crate::sys;

/// Size of one table page: the unit in which table updates are written.
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

/// Smallest step by which the data area grows when the allocator runs out of space.
const PREALLOC_MIN: u64 = 64 << 20;
/// Largest step (growth is otherwise 1/8 of the file, so large files grow in proportion).
const PREALLOC_MAX: u64 = 1 << 30;

/// Writable state of a Strata layer: its table image and its allocator.
///
/// Host clusters `first..next` are referenced or in `free`; `next..end` is the unused tail of
/// the file (space preallocated with `fallocate`, or leaked by a crash): free, handed out in
/// order once `free` is empty. When the tail runs out, the file grows by a large preallocated
/// step (FORMAT.md, "Preallocation").
#[derive(Debug)]
pub(crate) struct Alloc {
    /// Encoded entries, including updates not yet written to the file.
    pub raw: Vec<u64>,
    /// Table pages holding updates not yet written.
    dirty_pages: BTreeSet<u64>,
    /// Host clusters below `next` that no entry (on disk or in memory) references.
    free: BTreeSet<u64>,
    /// Host clusters unreferenced in memory but still referenced by the table on disk: free
    /// after the next flush.
    pending_free: Vec<u64>,
    /// First host cluster of the unused tail: no entry references it or anything after it.
    next: u64,
    /// First host cluster past the end of the file (or past the last one handed out, when
    /// growing without preallocation).
    end: u64,
    /// First host cluster of the data area.
    first: u64,
    /// Clusters the table can reference at once (the data area's size when every entry holds
    /// data): preallocation never grows the file past `first + entries`.
    entries: u64,
    /// Whether growth preallocates (cleared when the file system refuses `fallocate`).
    prealloc: bool,
    /// Whether this open handed out or preallocated tail space (so closing trims what is left).
    used_tail: bool,
    /// Data written since the last flush.
    data_dirty: bool,
}

/// An open file of a chain.
#[derive(Debug)]
pub(crate) struct Layer {
    /// Path as resolved (relative paths are relative to the process's cwd).
    pub path: PathBuf,
    pub file: File,
    /// `None` for a raw file.
    pub header: Option<Header>,
    /// Size in bytes of a raw file (its virtual size is this rounded up to 512).
    pub raw_len: u64,
    pub writable: bool,
    pub alloc: Option<Alloc>,
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

impl Layer {
    /// Opens and locks a file (exclusive when writable, shared otherwise). `format` forces the
    /// kind; `None` detects it (magic or a `.strata` name means Strata).
    pub fn open(path: &Path, writable: bool, format: Option<Format>) -> Result<Layer> {
        let file = OpenOptions::new()
            .read(true)
            .write(writable)
            .open(path)
            .map_err(DiskError::io(path, "open"))?;
        sys::lock(&file, path, writable)?;
        Self::from_file(path, file, writable, format)
    }

    fn from_file(path: &Path, file: File, writable: bool, format: Option<Format>) -> Result<Layer> {
        let len = file.metadata().map_err(DiskError::io(path, "stat"))?.len();
        let strata = match format {
            Some(f) => f == Format::Strata,
            None => expect_strata(path, &file),
        };
        if !strata {
            return Ok(Layer {
                path: path.to_path_buf(),
                file,
                header: None,
                raw_len: len,
                writable,
                alloc: None,
            });
        }
        let mut buf = vec![0u8; HEADER_SIZE];
        let n = read_full(&file, &mut buf, 0).map_err(DiskError::io(path, "read header"))?;
        let header = Header::parse(&buf[..n]).map_err(|source| DiskError::Format {
            path: path.to_path_buf(),
            source,
        })?;
        let need = header.data_offset;
        if len < need {
            return Err(DiskError::Truncated {
                path: path.to_path_buf(),
                what: "the allocation table".into(),
                need,
                len,
            });
        }
        Ok(Layer {
            path: path.to_path_buf(),
            file,
            header: Some(header),
            raw_len: len,
            writable,
            alloc: None,
        })
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

    /// Reads and validates this layer's table: every entry's check bits, host clusters inside
    /// the data area and the file, no host cluster used twice. Raw files have no table.
    pub fn load_entries(&self) -> Result<Vec<u64>> {
        let Some(h) = &self.header else {
            return Ok(Vec::new());
        };
        let mut bytes = vec![0u8; h.table_bytes() as usize];
        let n = read_full(&self.file, &mut bytes, TABLE_OFFSET)
            .map_err(DiskError::io(&self.path, "read allocation table"))?;
        if n < bytes.len() {
            return Err(DiskError::Truncated {
                path: self.path.clone(),
                what: "the allocation table".into(),
                need: TABLE_OFFSET + bytes.len() as u64,
                len: TABLE_OFFSET + n as u64,
            });
        }
        let len = self.file_len()?;
        let cs = h.cluster_size();
        let first = h.data_offset / cs;
        let mut seen = HashSet::new();
        let mut raw = Vec::with_capacity(h.entries() as usize);
        for (i, c) in bytes.chunks_exact(ENTRY_SIZE as usize).enumerate() {
            let mut a = [0u8; 8];
            a.copy_from_slice(c);
            let v = u64::from_le_bytes(a);
            let e = Entry::decode(i as u64, v).map_err(|source| DiskError::Format {
                path: self.path.clone(),
                source,
            })?;
            if let Entry::Data(hc) = e {
                if hc < first {
                    return Err(DiskError::CorruptTable {
                        path: self.path.clone(),
                        reason: format!("entry {i} points into the metadata (cluster {hc})"),
                    });
                }
                if (hc + 1) * cs > len {
                    return Err(DiskError::Truncated {
                        path: self.path.clone(),
                        what: format!("data cluster {hc} of virtual cluster {i}"),
                        need: (hc + 1) * cs,
                        len,
                    });
                }
                if !seen.insert(hc) {
                    return Err(DiskError::CorruptTable {
                        path: self.path.clone(),
                        reason: format!("host cluster {hc} is used twice (entry {i})"),
                    });
                }
            }
            raw.push(v);
        }
        Ok(raw)
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

    /// Prepares a writable Strata layer for allocation (given its validated entries).
    pub fn make_alloc(&mut self, raw: Vec<u64>) -> Result<()> {
        let Some(h) = &self.header else {
            return Ok(());
        };
        let cs = h.cluster_size();
        let first = h.data_offset / cs;
        let entries = h.entries();
        let end = self.file_len()?.div_ceil(cs).max(first);
        let mut used = HashSet::new();
        for (i, &v) in raw.iter().enumerate() {
            if let Entry::Data(hc) = decode_trusted(i as u64, v) {
                used.insert(hc);
            }
        }
        // Everything past the last referenced cluster is the unused tail.
        let next = used.iter().max().map_or(first, |&m| m + 1).max(first);
        let free = (first..next).filter(|c| !used.contains(c)).collect();
        self.alloc = Some(Alloc {
            raw,
            dirty_pages: BTreeSet::new(),
            free,
            pending_free: Vec::new(),
            next,
            end: end.max(next),
            first,
            entries,
            prealloc: true,
            used_tail: false,
            data_dirty: false,
        });
        Ok(())
    }

    /// Reopens this file read-write with an exclusive lock (for a merge that writes it).
    pub fn upgrade_exclusive(&mut self, need_write: bool) -> Result<()> {
        if self.writable {
            return Ok(());
        }
        let file = OpenOptions::new()
            .read(true)
            .write(need_write)
            .open(&self.path)
            .map_err(DiskError::io(&self.path, "open"))?;
        // Our own shared lock would conflict with the exclusive one on a new descriptor.
        sys::unlock(&self.file);
        if let Err(e) = sys::lock(&file, &self.path, true) {
            let _ = sys::lock(&self.file, &self.path, false);
            return Err(e);
        }
        self.file = file;
        self.writable = need_write;
        if need_write && self.header.is_some() && self.alloc.is_none() {
            let raw = self.load_entries()?;
            self.make_alloc(raw)?;
        }
        Ok(())
    }

    /// The decoded entry of virtual cluster `index` from the writable table image.
    pub fn entry(&self, index: u64) -> Entry {
        match &self.alloc {
            Some(a) => decode_trusted(index, a.raw.get(index as usize).copied().unwrap_or(0)),
            None => Entry::Unallocated,
        }
    }

    /// Records a new entry (written to the file at the next flush). An old data cluster it
    /// replaces becomes free after that flush.
    pub fn set_entry(&mut self, index: u64, e: Entry) {
        let Some(a) = &mut self.alloc else { return };
        let Some(slot) = a.raw.get_mut(index as usize) else {
            return;
        };
        if let Entry::Data(old) = decode_trusted(index, *slot) {
            if e != Entry::Data(old) {
                a.pending_free.push(old);
            }
        }
        *slot = e.encode(index);
        a.dirty_pages.insert(index * ENTRY_SIZE / TABLE_PAGE);
    }

    /// Picks a free host cluster (the lowest, or the next of the unused tail).
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

    /// Extends the unused tail (called when it is empty) by at least one cluster: by a
    /// preallocated step of max(64 MiB, 1/8 of the file), at most 1 GiB, and not past the
    /// size the table can reference; without preallocation (or when the file system refuses
    /// it) by `want` clusters that the data writes then append.
    fn grow(&mut self, want: u64) -> Result<()> {
        let cs = self.header.as_ref().map_or(1, |h| h.cluster_size());
        let Some(a) = &mut self.alloc else {
            return Ok(());
        };
        let limit = format::MAX_HOST_CLUSTER + 1;
        if a.end >= limit {
            return Err(DiskError::Invalid(format!(
                "{}: file is full",
                self.path.display()
            )));
        }
        let cap = (a.first + a.entries).min(limit);
        if a.prealloc && a.end < cap {
            let step = (a.end * cs / 8).clamp(PREALLOC_MIN, PREALLOC_MAX) / cs;
            let target = (a.end + step.max(want)).min(cap);
            match sys::preallocate(&self.file, a.end * cs, (target - a.end) * cs) {
                Ok(()) => {
                    a.end = target;
                    a.used_tail = true;
                    return Ok(());
                }
                Err(_) => {
                    // No space for a whole step, or no fallocate here: grow as the writes
                    // go. A failed fallocate may have grown the file part of the way.
                    a.prealloc = false;
                    let len = self
                        .file
                        .metadata()
                        .map_err(DiskError::io(&self.path, "stat"))?
                        .len();
                    a.end = a.end.max(len.div_ceil(cs));
                    if a.next < a.end {
                        return Ok(());
                    }
                }
            }
        }
        a.end = (a.end + want).min(limit);
        Ok(())
    }

    /// Gives the unused tail back to the file system by truncating the file after the last
    /// cluster in use. Only after a successful flush (the table on disk then references no
    /// cluster the one in memory does not), and only if this open preallocated or used the
    /// tail (an untouched file is left alone).
    pub fn trim_tail(&mut self) -> Result<()> {
        let cs = self.header.as_ref().map_or(1, |h| h.cluster_size());
        let next = match &self.alloc {
            Some(a) if a.used_tail && a.dirty_pages.is_empty() && a.pending_free.is_empty() => {
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

    /// Notes that data was written (so the next flush syncs it first).
    pub fn mark_data_dirty(&mut self) {
        if let Some(a) = &mut self.alloc {
            a.data_dirty = true;
        }
    }

    /// Makes everything written so far durable: fdatasync the data, then write the changed
    /// table pages, then fdatasync again (FORMAT.md, "Crash consistency").
    pub fn flush(&mut self) -> Result<()> {
        if !self.writable {
            return Ok(());
        }
        let Some(a) = &mut self.alloc else {
            // A raw file: its data is its metadata.
            return self
                .file
                .sync_data()
                .map_err(DiskError::io(&self.path, "fdatasync"));
        };
        if a.data_dirty || !a.dirty_pages.is_empty() {
            self.file
                .sync_data()
                .map_err(DiskError::io(&self.path, "fdatasync"))?;
        }
        if !a.dirty_pages.is_empty() {
            let per_page = (TABLE_PAGE / ENTRY_SIZE) as usize;
            for &p in &a.dirty_pages {
                let start = p as usize * per_page;
                let end = (start + per_page).min(a.raw.len());
                let mut bytes = Vec::with_capacity((end - start) * 8);
                for v in &a.raw[start..end] {
                    bytes.extend_from_slice(&v.to_le_bytes());
                }
                self.file
                    .write_all_at(&bytes, TABLE_OFFSET + p * TABLE_PAGE)
                    .map_err(DiskError::io(&self.path, "write allocation table"))?;
            }
            self.file
                .sync_data()
                .map_err(DiskError::io(&self.path, "fdatasync"))?;
            a.dirty_pages.clear();
        }
        a.data_dirty = false;
        // The table on disk no longer references these: reuse them, and give the space back.
        let cs = self.header.as_ref().map_or(0, |h| h.cluster_size());
        for c in a.pending_free.drain(..) {
            let _ = sys::punch_hole(&self.file, c * cs, cs);
            a.free.insert(c);
        }
        Ok(())
    }

    /// Rewrites the header (generation + 1) and syncs it.
    pub fn write_header(&mut self, mut h: Header) -> Result<()> {
        h.generation = h.generation.wrapping_add(1);
        self.file
            .write_all_at(&h.encode(), 0)
            .map_err(DiskError::io(&self.path, "write header"))?;
        self.file
            .sync_data()
            .map_err(DiskError::io(&self.path, "fdatasync"))?;
        self.header = Some(h);
        Ok(())
    }

    /// The reference a child of this layer records.
    pub fn as_parent_ref(&self, child_path: &Path) -> Result<ParentRef> {
        let path = relative_parent_path(&self.path, child_path)?;
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
            },
        })
    }
}

/// Decodes an entry that was validated when loaded (or produced by this process).
pub(crate) fn decode_trusted(index: u64, raw: u64) -> Entry {
    Entry::decode(index, raw).unwrap_or(Entry::Unallocated)
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

/// The parent path to record in a child: the bare file name when both are in one directory,
/// otherwise the parent's absolute path.
pub(crate) fn relative_parent_path(parent: &Path, child: &Path) -> Result<String> {
    let pabs = std::fs::canonicalize(parent).map_err(DiskError::io(parent, "resolve path"))?;
    let cdir = match child.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let cdir = std::fs::canonicalize(&cdir).map_err(DiskError::io(&cdir, "resolve path"))?;
    let s = if pabs.parent() == Some(cdir.as_path()) {
        pabs.file_name().map(|n| n.to_string_lossy().into_owned())
    } else {
        Some(pabs.to_string_lossy().into_owned())
    };
    let s = s.unwrap_or_default();
    if s.is_empty() || s.len() > format::MAX_PARENT_PATH {
        return Err(DiskError::BadChain {
            path: child.to_path_buf(),
            reason: format!(
                "parent path {} is longer than {} bytes",
                pabs.display(),
                format::MAX_PARENT_PATH
            ),
        });
    }
    Ok(s)
}

/// Resolves a recorded parent path against the child's directory.
pub(crate) fn resolve_parent(child: &Path, recorded: &str) -> PathBuf {
    let p = Path::new(recorded);
    if p.is_absolute() {
        return p.to_path_buf();
    }
    match child.parent() {
        Some(d) => d.join(p),
        None => p.to_path_buf(),
    }
}

/// Checks that `parent` is the file `child` was created on, unchanged (FORMAT.md, "Parent
/// identity").
pub(crate) fn verify_parent(child: &Layer, parent: &Layer) -> Result<()> {
    let Some(ch) = &child.header else {
        return Ok(());
    };
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
            if ph.data_id != *data_id && !folding {
                return Err(changed(
                    "was modified after this layer was created on it".into(),
                ));
            }
            if ph.cluster_bits != ch.cluster_bits {
                return Err(changed("has a different cluster size".into()));
            }
        }
        (ParentRef::Raw { size, mtime, .. }, None) => {
            let len = parent.file_len()?;
            if len != *size {
                return Err(changed(format!("has size {len}, expected {size}")));
            }
            if parent.mtime()? != *mtime && !folding {
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
