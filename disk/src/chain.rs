//! An open chain: the device-facing read/write/zero/discard/flush path.
//!
//! The chain keeps one flattened map with an entry per virtual cluster saying which layer
//! holds it and where, so a lookup costs the same at any depth. Writes go to the top layer:
//! in place where the top already holds the cluster, otherwise into a newly allocated cluster
//! filled by copy-on-write from whatever the chain read there before. New table entries are
//! written to the file only by [`Chain::flush`], after the data is durable.

use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use crate::error::{DiskError, Result};
use crate::format::{self, Entry, Header, ParentRef};
use crate::layer::{self, decode_trusted, read_full, Format, Layer};
use crate::merge::MergeJob;
use crate::sys;

/// Deepest chain accepted (guards against cycles and absurd files).
pub const MAX_DEPTH: usize = 1024;

/// How to open a chain.
#[derive(Debug, Clone, Copy, Default)]
pub struct OpenOptions {
    /// Open every file read-only with shared locks.
    pub read_only: bool,
    /// Force the top file's format instead of detecting it.
    pub format: Option<Format>,
}

/// Where a virtual cluster's data comes from, packed in a `u64`: layer index in bits 63..48,
/// kind in bits 47..46, host cluster in bits 45..0.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// No layer holds it and there is no raw base under it: zeroes.
    None,
    /// Layer `0` marks it zero.
    Zero(usize),
    /// Layer `0` holds it at host cluster `1`.
    Data(usize, u64),
    /// The raw base (layer `0`) holds it at the same offset.
    Raw(usize),
}

const K_ZERO: u64 = 1;
const K_DATA: u64 = 2;
const K_RAW: u64 = 3;

fn pack(s: Source) -> u64 {
    let (l, k, h) = match s {
        Source::None => return 0,
        Source::Zero(l) => (l, K_ZERO, 0),
        Source::Data(l, h) => (l, K_DATA, h),
        Source::Raw(l) => (l, K_RAW, 0),
    };
    ((l as u64) << 48) | (k << 46) | (h & format::MAX_HOST_CLUSTER)
}

fn unpack(v: u64) -> Source {
    let l = (v >> 48) as usize;
    match (v >> 46) & 3 {
        K_ZERO => Source::Zero(l),
        K_DATA => Source::Data(l, v & format::MAX_HOST_CLUSTER),
        K_RAW => Source::Raw(l),
        _ => Source::None,
    }
}

/// An open chain of layers (index 0 is the bottom, the last is the top).
#[derive(Debug)]
pub struct Chain {
    pub(crate) layers: Vec<Layer>,
    map: Vec<u64>,
    cluster_bits: u32,
    virtual_size: u64,
    read_only: bool,
    /// Whether the top's `data_id` was renewed for this open (done before its first write).
    top_id_renewed: bool,
    pub(crate) merge: Option<MergeJob>,
}

impl Chain {
    /// Opens the chain whose top is `path` (a raw file or a layer). Writable opens lock the top
    /// exclusively and every backing file shared; read-only opens lock all shared.
    pub fn open(path: impl AsRef<Path>, opts: OpenOptions) -> Result<Chain> {
        let path = path.as_ref();
        let mut layers = vec![Layer::open(path, !opts.read_only, opts.format)?];
        let mut ids = std::collections::HashSet::new();
        loop {
            let child = layers
                .last()
                .ok_or_else(|| DiskError::Invalid("empty chain".into()))?;
            let Some(h) = &child.header else { break };
            if !ids.insert(h.layer_id) || layers.len() > MAX_DEPTH {
                return Err(DiskError::BadChain {
                    path: child.path.clone(),
                    reason: "the chain of parents loops or is deeper than 1024".into(),
                });
            }
            let (recorded, fmt) = match &h.parent {
                ParentRef::None => break,
                ParentRef::Layer { path, .. } => (path.clone(), Format::Strata),
                ParentRef::Raw { path, .. } => (path.clone(), Format::Raw),
            };
            let ppath = layer::resolve_parent(&child.path, &recorded);
            let parent = match Layer::open(&ppath, false, Some(fmt)) {
                Ok(p) => p,
                Err(DiskError::Io { source, .. }) => {
                    return Err(DiskError::ParentMissing {
                        path: child.path.clone(),
                        parent: ppath,
                        source,
                    })
                }
                Err(e) => return Err(e),
            };
            layer::verify_parent(child, &parent)?;
            layers.push(parent);
        }
        layers.reverse();
        Self::from_layers(layers, opts.read_only)
    }

    fn from_layers(mut layers: Vec<Layer>, read_only: bool) -> Result<Chain> {
        let top = layers.len() - 1;
        let virtual_size = layers[top].virtual_size().next_multiple_of(512);
        let cluster_bits = layers
            .iter()
            .find_map(|l| l.header.as_ref().map(|h| h.cluster_bits))
            .unwrap_or(format::DEFAULT_CLUSTER_BITS);
        let cs = 1u64 << cluster_bits;
        let n = virtual_size.div_ceil(cs) as usize;
        let mut map = vec![0u64; n];
        for (li, l) in layers.iter_mut().enumerate() {
            if l.header.is_none() {
                // A raw base (or a raw top, alone): every cluster reads through to it.
                map.iter_mut().for_each(|m| *m = pack(Source::Raw(li)));
                continue;
            }
            let raw = match &l.alloc {
                Some(a) => a.raw.clone(),
                None => l.load_entries()?,
            };
            for (i, &v) in raw.iter().enumerate().take(n) {
                match decode_trusted(i as u64, v) {
                    Entry::Unallocated => {}
                    Entry::Zero => map[i] = pack(Source::Zero(li)),
                    Entry::Data(h) => map[i] = pack(Source::Data(li, h)),
                }
            }
            if li == top && !read_only && l.alloc.is_none() {
                l.make_alloc(raw)?;
            }
        }
        Ok(Chain {
            layers,
            map,
            cluster_bits,
            virtual_size,
            read_only,
            top_id_renewed: false,
            merge: None,
        })
    }

    /// Rebuilds the map from the layers' tables (after a merge changed the layer list).
    pub(crate) fn rebuild(&mut self) -> Result<()> {
        let layers = std::mem::take(&mut self.layers);
        let merge = self.merge.take();
        let renewed = self.top_id_renewed;
        *self = Self::from_layers(layers, self.read_only)?;
        self.merge = merge;
        self.top_id_renewed = renewed;
        Ok(())
    }

    /// Guest-visible size in bytes.
    pub fn virtual_size(&self) -> u64 {
        self.virtual_size
    }

    /// Cluster size in bytes.
    pub fn cluster_size(&self) -> u64 {
        1 << self.cluster_bits
    }

    /// Number of files in the chain.
    pub fn depth(&self) -> usize {
        self.layers.len()
    }

    /// Path of layer `i` (0 = bottom).
    pub fn layer_path(&self, i: usize) -> Option<&Path> {
        self.layers.get(i).map(|l| l.path.as_path())
    }

    /// Index of the layer whose file is `path` (compared by device and inode).
    pub fn layer_index(&self, path: &Path) -> Option<usize> {
        use std::os::unix::fs::MetadataExt;
        let md = std::fs::metadata(path).ok()?;
        self.layers.iter().position(|l| {
            l.file
                .metadata()
                .is_ok_and(|m| m.dev() == md.dev() && m.ino() == md.ino())
        })
    }

    /// Path of the top file.
    pub fn top_path(&self) -> &Path {
        &self.layers[self.layers.len() - 1].path
    }

    /// Whether the chain was opened read-only.
    pub fn is_read_only(&self) -> bool {
        self.read_only
    }

    /// Where virtual cluster `c` comes from.
    pub fn source(&self, c: u64) -> Source {
        self.map
            .get(c as usize)
            .map_or(Source::None, |&v| unpack(v))
    }

    pub(crate) fn set_source(&mut self, c: u64, s: Source) {
        if let Some(m) = self.map.get_mut(c as usize) {
            *m = pack(s);
        }
    }

    fn check_range(&self, offset: u64, len: u64) -> Result<()> {
        match offset.checked_add(len) {
            Some(end) if end <= self.virtual_size => Ok(()),
            _ => Err(DiskError::Invalid(format!(
                "range {offset}+{len} is beyond the disk's {} bytes",
                self.virtual_size
            ))),
        }
    }

    /// Reads `buf.len()` bytes at `offset`.
    pub fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        self.check_range(offset, buf.len() as u64)?;
        let cs = self.cluster_size();
        let mut pos = 0usize;
        while pos < buf.len() {
            let off = offset + pos as u64;
            let c = off / cs;
            let within = off % cs;
            let src = self.source(c);
            // Extend the run while the next clusters continue the same source contiguously.
            let mut run = (cs - within).min((buf.len() - pos) as u64);
            let mut next = c + 1;
            while pos as u64 + run < buf.len() as u64
                && contiguous(src, self.source(next), next - c)
            {
                run += cs.min(buf.len() as u64 - pos as u64 - run);
                next += 1;
            }
            let dst = &mut buf[pos..pos + run as usize];
            self.read_source(src, c, within, dst)?;
            pos += run as usize;
        }
        Ok(())
    }

    /// Reads from one source starting inside cluster `c` at `within`.
    fn read_source(&self, src: Source, c: u64, within: u64, dst: &mut [u8]) -> Result<()> {
        let cs = self.cluster_size();
        let (li, off) = match src {
            Source::None | Source::Zero(_) => {
                dst.fill(0);
                return Ok(());
            }
            Source::Data(li, h) => (li, h * cs + within),
            Source::Raw(li) => (li, c * cs + within),
        };
        let l = &self.layers[li];
        let n = read_full(&l.file, dst, off).map_err(DiskError::io(&l.path, "read"))?;
        if n < dst.len() {
            if matches!(src, Source::Data(..)) {
                return Err(DiskError::Truncated {
                    path: l.path.clone(),
                    what: format!("data of virtual cluster {c}"),
                    need: off + dst.len() as u64,
                    len: off + n as u64,
                });
            }
            dst[n..].fill(0); // past the end of a raw base: zeroes
        }
        Ok(())
    }

    /// Reads virtual cluster `c` whole, as the chain sees it.
    pub(crate) fn read_cluster(&self, c: u64, buf: &mut [u8]) -> Result<()> {
        self.read_source(self.source(c), c, 0, buf)
    }

    fn writable_top(&mut self) -> Result<usize> {
        if self.read_only {
            return Err(DiskError::ReadOnly {
                path: self.top_path().to_path_buf(),
            });
        }
        let top = self.layers.len() - 1;
        if !self.top_id_renewed {
            // Children made of this layer from now on must not accept its older content.
            if let Some(h) = self.layers[top].header.clone() {
                let mut h2 = h;
                h2.data_id = format::random_id();
                self.layers[top].write_header(h2)?;
            }
            self.top_id_renewed = true;
        }
        Ok(top)
    }

    /// Writes `data` at `offset` into the top layer (copy-on-write of partial clusters).
    pub fn write_at(&mut self, offset: u64, data: &[u8]) -> Result<()> {
        self.check_range(offset, data.len() as u64)?;
        let top = self.writable_top()?;
        if self.layers[top].header.is_none() {
            let l = &self.layers[top];
            return l
                .file
                .write_all_at(data, offset)
                .map_err(DiskError::io(&l.path, "write"));
        }
        let cs = self.cluster_size();
        let mut pos = 0usize;
        while pos < data.len() {
            let off = offset + pos as u64;
            let c = off / cs;
            let within = off % cs;
            let n = (cs - within).min((data.len() - pos) as u64) as usize;
            if let Source::Data(li, h) = self.source(c) {
                if li == top {
                    // In place; extend over following in-place clusters that are contiguous.
                    let mut len = n;
                    let mut next = c + 1;
                    while pos + len < data.len()
                        && self.source(next) == Source::Data(top, h + (next - c))
                    {
                        len += (cs as usize).min(data.len() - pos - len);
                        next += 1;
                    }
                    let l = &mut self.layers[top];
                    l.file
                        .write_all_at(&data[pos..pos + len], h * cs + within)
                        .map_err(DiskError::io(&l.path, "write"))?;
                    l.mark_data_dirty();
                    self.note_source_write(c, next);
                    pos += len;
                    continue;
                }
            }
            if within == 0 && n as u64 == cs {
                // Whole clusters the top does not hold: allocate consecutive host clusters and
                // write the run with one pwrite (nothing to copy from below).
                let mut k = 1u64;
                while pos + ((k + 1) * cs) as usize <= data.len()
                    && !matches!(self.source(c + k), Source::Data(li, _) if li == top)
                {
                    k += 1;
                }
                let l = &mut self.layers[top];
                let (h, got) = l.alloc_run(k)?;
                let len = (got * cs) as usize;
                if let Err(e) = l.file.write_all_at(&data[pos..pos + len], h * cs) {
                    l.unalloc(h, got);
                    return Err(DiskError::io(&l.path, "write")(e));
                }
                l.mark_data_dirty();
                for i in 0..got {
                    self.layers[top].set_entry(c + i, Entry::Data(h + i));
                    self.set_source(c + i, Source::Data(top, h + i));
                }
                self.note_source_write(c, c + got);
                pos += len;
                continue;
            }
            self.cow_write(c, within as usize, &data[pos..pos + n])?;
            pos += n;
        }
        Ok(())
    }

    /// Allocates a top cluster for `c` and writes the chain's current content with `part`
    /// laid over it at `within`.
    fn cow_write(&mut self, c: u64, within: usize, part: &[u8]) -> Result<()> {
        let cs = self.cluster_size() as usize;
        let top = self.layers.len() - 1;
        let mut buf = vec![0u8; cs];
        self.read_cluster(c, &mut buf)?;
        buf[within..within + part.len()].copy_from_slice(part);
        let h = self.layers[top].alloc_cluster()?;
        if let Err(e) = self.write_host(top, h, &buf) {
            self.layers[top].unalloc(h, 1);
            return Err(e);
        }
        self.layers[top].set_entry(c, Entry::Data(h));
        self.set_source(c, Source::Data(top, h));
        self.note_source_write(c, c + 1);
        Ok(())
    }

    pub(crate) fn write_host(&mut self, li: usize, h: u64, buf: &[u8]) -> Result<()> {
        let cs = self.cluster_size();
        let l = &mut self.layers[li];
        l.file
            .write_all_at(buf, h * cs)
            .map_err(DiskError::io(&l.path, "write"))?;
        l.mark_data_dirty();
        Ok(())
    }

    /// Tells a running merge that clusters `from..to` of the top changed.
    fn note_source_write(&mut self, from: u64, to: u64) {
        let top = self.layers.len() - 1;
        if let Some(job) = &mut self.merge {
            job.note_write(top, from, to);
        }
    }

    /// Makes `offset..offset+len` read as zeroes (without falling through to the parent).
    pub fn write_zeroes(&mut self, offset: u64, len: u64) -> Result<()> {
        self.zero_range(offset, len)
    }

    /// Discards `offset..offset+len`: the range reads as zeroes afterwards and whole clusters
    /// give their space back (after the next flush).
    pub fn discard(&mut self, offset: u64, len: u64) -> Result<()> {
        self.zero_range(offset, len)
    }

    fn zero_range(&mut self, offset: u64, len: u64) -> Result<()> {
        self.check_range(offset, len)?;
        let top = self.writable_top()?;
        if self.layers[top].header.is_none() {
            let l = &self.layers[top];
            return sys::punch_hole(&l.file, offset, len)
                .map_err(DiskError::io(&l.path, "punch hole"));
        }
        let cs = self.cluster_size();
        let end = offset + len;
        let mut off = offset;
        while off < end {
            let c = off / cs;
            let within = off % cs;
            let n = (cs - within).min(end - off);
            if n == cs {
                // A whole cluster: an explicit zero entry, or none in a base layer (where an
                // unallocated cluster reads as zeroes anyway and the space is given back).
                let e = if top == 0 {
                    Entry::Unallocated
                } else {
                    Entry::Zero
                };
                self.layers[top].set_entry(c, e);
                let s = if e == Entry::Zero {
                    Source::Zero(top)
                } else {
                    Source::None
                };
                self.set_source(c, s);
                self.note_source_write(c, c + 1);
            } else {
                let zeros = vec![0u8; n as usize];
                self.write_at(off, &zeros)?;
            }
            off += n;
        }
        Ok(())
    }

    /// Makes every write completed so far durable (data first, then the table; fdatasync).
    pub fn flush(&mut self) -> Result<()> {
        if self.read_only {
            return Ok(());
        }
        for l in self.layers.iter_mut().filter(|l| l.writable) {
            l.flush()?;
        }
        Ok(())
    }

    /// Entries of layer `i` (from memory for a writable layer, else from its file).
    pub(crate) fn layer_entries(&self, i: usize) -> Result<Vec<u64>> {
        let l = &self.layers[i];
        match &l.alloc {
            Some(a) => Ok(a.raw.clone()),
            None => l.load_entries(),
        }
    }
}

impl Drop for Chain {
    fn drop(&mut self) {
        // A clean close makes everything durable and gives unused preallocated space back;
        // errors here have no one to go to.
        if self.flush().is_ok() && !self.read_only {
            for l in self.layers.iter_mut().filter(|l| l.writable) {
                let _ = l.trim_tail();
            }
        }
    }
}

fn contiguous(a: Source, b: Source, dist: u64) -> bool {
    match (a, b) {
        (Source::None, Source::None) => true,
        (Source::Zero(_), Source::Zero(_)) => true,
        (Source::Raw(x), Source::Raw(y)) => x == y,
        (Source::Data(x, h1), Source::Data(y, h2)) => x == y && h2 == h1 + dist,
        _ => false,
    }
}

/// Options for creating a layer or an empty disk.
#[derive(Debug, Clone, Copy, Default)]
pub struct CreateOptions {
    /// log2 of the cluster size (12..=21); default 16 (64 KiB), or the parent's.
    pub cluster_bits: Option<u32>,
}

/// Creates an empty disk of `size` bytes (a base layer with no parent).
pub fn create_empty(path: impl AsRef<Path>, size: u64, opts: CreateOptions) -> Result<()> {
    let path = path.as_ref();
    if size == 0 || size % 512 != 0 || size > format::MAX_VIRTUAL_SIZE {
        return Err(DiskError::Invalid(format!(
            "size {size} must be a non-zero multiple of 512 up to 64 TiB"
        )));
    }
    let bits = opts.cluster_bits.unwrap_or(format::DEFAULT_CLUSTER_BITS);
    if !(format::MIN_CLUSTER_BITS..=format::MAX_CLUSTER_BITS).contains(&bits) {
        return Err(DiskError::Invalid(format!(
            "cluster size 2^{bits} is outside 4 KiB..2 MiB"
        )));
    }
    write_new_layer(path, Header::new(bits, size, ParentRef::None))
}

/// Creates a new layer at `new_path` over `parent_path` (a raw image or a layer; the parent's
/// own chain must open). The new layer records the parent's identity.
pub fn create_layer(parent_path: impl AsRef<Path>, new_path: impl AsRef<Path>) -> Result<()> {
    let (parent_path, new_path) = (parent_path.as_ref(), new_path.as_ref());
    if new_path.exists() {
        return Err(DiskError::Exists {
            path: new_path.to_path_buf(),
        });
    }
    let parent = Chain::open(
        parent_path,
        OpenOptions {
            read_only: true,
            format: None,
        },
    )?;
    let top = &parent.layers[parent.layers.len() - 1];
    let size = top.virtual_size();
    if top.header.is_none() && (size == 0 || size % 512 != 0) {
        return Err(DiskError::BadChain {
            path: parent_path.to_path_buf(),
            reason: format!("raw image size {size} is not a non-zero multiple of 512"),
        });
    }
    // The new file does not exist yet: record the path relative to its future directory.
    let pref = top.as_parent_ref(new_path)?;
    let h = Header::new(parent.cluster_bits, size, pref);
    write_new_layer(new_path, h)
}

/// Writes a new layer file whole under a temporary name, syncs it and renames it into place.
fn write_new_layer(path: &Path, h: Header) -> Result<()> {
    if path.exists() {
        return Err(DiskError::Exists {
            path: path.to_path_buf(),
        });
    }
    let tmp = tmp_path(path);
    let f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&tmp)
        .map_err(DiskError::io(&tmp, "create"))?;
    let res = (|| {
        f.write_all_at(&h.encode(), 0)
            .map_err(DiskError::io(&tmp, "write header"))?;
        f.set_len(h.data_offset)
            .map_err(DiskError::io(&tmp, "set length"))?;
        f.sync_all().map_err(DiskError::io(&tmp, "fsync"))?;
        std::fs::rename(&tmp, path).map_err(DiskError::io(path, "rename into place"))?;
        sys::sync_dir(path)
    })();
    if res.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    res
}

/// `dir/.name.tmp`: where a file is built before it is renamed into place.
pub(crate) fn tmp_path(path: &Path) -> PathBuf {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    path.with_file_name(format!(".{name}.tmp"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rw() -> OpenOptions {
        OpenOptions::default()
    }

    #[test]
    fn empty_disk_reads_zeroes_and_keeps_writes_across_reopen() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("a.strata");
        create_empty(&p, 1 << 20, CreateOptions::default()).unwrap();
        let mut c = Chain::open(&p, rw()).unwrap();
        let mut buf = vec![1u8; 4096];
        c.read_at(0, &mut buf).unwrap();
        assert!(buf.iter().all(|&b| b == 0));
        c.write_at(1000, b"hello").unwrap();
        c.flush().unwrap();
        drop(c);
        let c = Chain::open(&p, rw()).unwrap();
        let mut b = [0u8; 7];
        c.read_at(999, &mut b).unwrap();
        assert_eq!(&b, b"\0hello\0");
    }

    #[test]
    fn layer_over_raw_copies_on_write_and_leaves_base_alone() {
        let d = tempfile::tempdir().unwrap();
        let base = d.path().join("base.img");
        std::fs::write(&base, vec![7u8; 256 * 1024]).unwrap();
        let top = d.path().join("top.strata");
        create_layer(&base, &top).unwrap();
        let mut c = Chain::open(&top, rw()).unwrap();
        c.write_at(70_000, &[1, 2, 3]).unwrap();
        c.write_zeroes(128 * 1024, 64 * 1024).unwrap();
        let mut b = vec![0u8; 256 * 1024];
        c.read_at(0, &mut b).unwrap();
        assert_eq!(&b[69_999..70_004], &[7, 1, 2, 3, 7]);
        assert!(b[128 * 1024..192 * 1024].iter().all(|&x| x == 0));
        assert_eq!(b[200_000], 7);
        drop(c);
        assert!(std::fs::read(&base).unwrap().iter().all(|&x| x == 7));
    }

    #[test]
    fn second_writer_is_told_the_file_is_in_use() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("a.strata");
        create_empty(&p, 1 << 20, CreateOptions::default()).unwrap();
        let _c = Chain::open(&p, rw()).unwrap();
        let e = Chain::open(&p, rw()).unwrap_err();
        let msg = e.to_string();
        assert!(msg.contains("in use") && msg.contains("a.strata"), "{msg}");
        assert!(msg.contains(&std::process::id().to_string()), "{msg}");
    }

    #[test]
    fn chain_can_move_to_a_device_thread() {
        fn assert_send<T: Send>() {}
        assert_send::<Chain>();
    }

    fn file_len(p: &Path) -> u64 {
        std::fs::metadata(p).unwrap().len()
    }

    #[test]
    fn allocation_preallocates_and_a_clean_close_trims_the_tail() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("a.strata");
        create_empty(&p, 1 << 30, CreateOptions::default()).unwrap();
        let data_offset = file_len(&p);
        let mut c = Chain::open(&p, rw()).unwrap();
        // Whole clusters (one run) and a partial one (copy-on-write).
        c.write_at(0, &vec![3u8; 1 << 20]).unwrap();
        c.write_at((5 << 20) + 100, &[4u8; 10]).unwrap();
        c.flush().unwrap();
        // The data area grew by a preallocated step, not by what was written.
        assert!(file_len(&p) >= data_offset + (64 << 20), "{}", file_len(&p));
        // Crash now: the file as it stands (page cache included) is what a reopen sees.
        let crashed = d.path().join("crashed.strata");
        std::fs::copy(&p, &crashed).unwrap();
        drop(c);
        // Clean close: trimmed after the last cluster in use, nothing leaked.
        assert_eq!(file_len(&p), data_offset + 17 * 65_536);
        let r = crate::ops::check(&p, false).unwrap();
        assert!(r.is_clean());
        assert_eq!(r.files[0].leaked_clusters, 0);

        // The crashed copy: clean (the tail is a leak, not corruption), flushed data reads
        // back, new writes reuse the tail without growing the file.
        let r = crate::ops::check(&crashed, false).unwrap();
        assert!(r.is_clean(), "{:?}", r.files[0].errors);
        assert!(r.files[0].leaked_clusters >= 1000);
        let len = file_len(&crashed);
        let mut c = Chain::open(&crashed, rw()).unwrap();
        let mut b = vec![0u8; 1 << 20];
        c.read_at(0, &mut b).unwrap();
        assert!(b.iter().all(|&x| x == 3));
        c.read_at(5 << 20, &mut b[..200]).unwrap();
        assert_eq!(&b[99..111], &[0, 4, 4, 4, 4, 4, 4, 4, 4, 4, 4, 0]);
        c.write_at(100 << 20, &vec![5u8; 2 << 20]).unwrap();
        c.flush().unwrap();
        assert_eq!(file_len(&crashed), len);
        drop(c);
        assert_eq!(file_len(&crashed), data_offset + 49 * 65_536);
        let r = crate::ops::check(&crashed, false).unwrap();
        assert!(r.is_clean());
        assert_eq!(r.files[0].leaked_clusters, 0);
        let c = Chain::open(&crashed, rw()).unwrap();
        c.read_at((100 << 20) + 65_536, &mut b[..4096]).unwrap();
        assert!(b[..4096].iter().all(|&x| x == 5));
    }

    #[test]
    fn preallocation_stops_at_the_size_the_table_can_reference() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("a.strata");
        create_empty(&p, 4 << 20, CreateOptions::default()).unwrap();
        let data_offset = file_len(&p);
        let mut c = Chain::open(&p, rw()).unwrap();
        c.write_at(0, &[1u8; 512]).unwrap();
        assert_eq!(file_len(&p), data_offset + (4 << 20));
        // Rewrites that free clusters only after a flush may need more: the file grows by
        // what the writes need.
        c.write_zeroes(0, 4 << 20).unwrap();
        c.write_at(0, &vec![2u8; 4 << 20]).unwrap();
        c.write_zeroes(0, 4 << 20).unwrap();
        c.write_at(0, &vec![3u8; 4 << 20]).unwrap();
        c.flush().unwrap();
        // 1 + 64 clusters, then 64 more while the first 64 were still pending free.
        assert_eq!(file_len(&p), data_offset + (8 << 20) + 65_536);
        let mut b = vec![0u8; 4 << 20];
        c.read_at(0, &mut b).unwrap();
        assert!(b.iter().all(|&x| x == 3));
        drop(c);
        let r = crate::ops::check(&p, false).unwrap();
        assert!(r.is_clean());
    }

    #[test]
    fn writes_outside_the_disk_are_refused() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("a.strata");
        create_empty(
            &p,
            4096,
            CreateOptions {
                cluster_bits: Some(12),
            },
        )
        .unwrap();
        let mut c = Chain::open(&p, rw()).unwrap();
        assert!(c.write_at(4000, &[0; 200]).is_err());
        assert!(c.read_at(u64::MAX, &mut [0; 2]).is_err());
    }
}
