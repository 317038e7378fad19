//! An open chain: the device-facing read/write/zero/discard/flush path.
//!
//! Nothing here grows with the virtual size or the depth: each layer keeps its header and its
//! sparse L1 table; L2 tables are read on demand into one bounded cache shared by the chain;
//! and a second bounded cache maps a virtual cluster to where each of its 16 sub-clusters
//! comes from (which layer, which host cluster), filled on first use, so a read of a cached
//! cluster costs the same at any depth. Writes go to the top layer: in place where the top
//! holds the sub-cluster, otherwise into the top's host cluster for that virtual cluster
//! (allocated on first write), copying from below only the partial sub-clusters at the edges
//! of the write. New entries reach the file only in [`Chain::flush`], after the data is durable.

use std::collections::HashMap;
use std::hash::Hash;
use std::os::fd::AsRawFd;
use std::path::Path;
use std::sync::{Mutex, MutexGuard, PoisonError};

use crate::error::{DiskError, Result};
use crate::format::{self, Entry, Header, ParentRef, SUBCLUSTERS};
use crate::layer::{self, read_full, sub_bits, Format, Layer};
use crate::merge::MergeJob;
use crate::parent::ParentPolicy;
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

/// Bounds of a chain's metadata caches (see [`Chain::set_cache_limits`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CacheLimits {
    /// Bytes of clean L2 tables kept (one table is one cluster); also the amount of changed
    /// tables after which a write flushes by itself. At least one table is kept.
    pub l2_bytes: usize,
    /// Virtual clusters whose resolved sources are kept (about 150 bytes each).
    pub resolved_clusters: usize,
}

impl CacheLimits {
    /// Limits for `l2_bytes` of L2 tables, the resolved-cluster cache scaled with it as in the
    /// default (one resolved cluster per 256 bytes of tables: 16384 for 4 MiB).
    pub fn for_l2_bytes(l2_bytes: usize) -> Self {
        CacheLimits {
            l2_bytes,
            resolved_clusters: (l2_bytes / 256).max(16),
        }
    }
}

impl Default for CacheLimits {
    /// 4 MiB of L2 tables (16 GiB of disk at 64 KiB clusters) and 16384 resolved clusters
    /// (1 GiB of disk, about 2.5 MiB).
    fn default() -> Self {
        CacheLimits {
            l2_bytes: 4 << 20,
            resolved_clusters: 16384,
        }
    }
}

/// Where a sub-cluster's data comes from, packed in a `u64`: layer index in bits 63..48, kind
/// in bits 47..46, host cluster in bits 45..0.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// No layer holds it and there is no raw base under it: zeroes.
    None,
    /// Layer `0` marks it zero.
    Zero(usize),
    /// Layer `0` holds it in host cluster `1` (at the sub-cluster's offset in that cluster).
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

/// A bounded map that approximates LRU with two generations: lookups promote into the young
/// one; when the young one is full it becomes the old one and the old one is dropped. At most
/// `cap` entries (at least 2), O(1) per operation.
#[derive(Debug)]
pub(crate) struct TwoGen<K, V> {
    young: HashMap<K, V>,
    old: HashMap<K, V>,
    half: usize,
}

impl<K: Hash + Eq + Copy, V> TwoGen<K, V> {
    fn new(cap: usize) -> Self {
        TwoGen {
            young: HashMap::new(),
            old: HashMap::new(),
            half: (cap / 2).max(1),
        }
    }

    fn get_mut(&mut self, k: &K) -> Option<&mut V> {
        if !self.young.contains_key(k) {
            let v = self.old.remove(k)?;
            self.insert(*k, v);
        }
        self.young.get_mut(k)
    }

    fn insert(&mut self, k: K, v: V) {
        if self.young.len() >= self.half && !self.young.contains_key(&k) {
            self.old = std::mem::take(&mut self.young);
            self.old.remove(&k);
        }
        self.young.insert(k, v);
    }

    fn remove(&mut self, k: &K) -> Option<V> {
        self.young.remove(k).or_else(|| self.old.remove(k))
    }

    fn len(&self) -> usize {
        self.young.len() + self.old.len()
    }
}

/// The chain's two metadata caches.
#[derive(Debug)]
pub(crate) struct Caches {
    /// Clean L2 tables by (layer index, L1 index).
    l2: TwoGen<(usize, u64), Vec<Entry>>,
    /// Resolved sources of the 16 sub-clusters of a virtual cluster.
    resolved: TwoGen<u64, [u64; SUBCLUSTERS as usize]>,
}

impl Caches {
    fn new(limits: CacheLimits, cluster_size: u64) -> Caches {
        Caches {
            l2: TwoGen::new((limits.l2_bytes / cluster_size as usize).max(2)),
            resolved: TwoGen::new(limits.resolved_clusters.max(2)),
        }
    }
}

/// The entry layer `li` has for virtual cluster `c` (changed tables first, then the cache,
/// then the file).
pub(crate) fn layer_entry(
    layers: &[Layer],
    caches: &mut Caches,
    li: usize,
    c: u64,
) -> Result<Entry> {
    let Some(l) = layers.get(li) else {
        return Ok(Entry::EMPTY);
    };
    let Some(h) = &l.header else {
        return Ok(Entry::EMPTY);
    };
    if let Some(e) = l.dirty_entry(c) {
        return Ok(e);
    }
    let per = h.l2_entries();
    let l1i = c / per;
    let Some(&host) = l.l1.get(&l1i) else {
        return Ok(Entry::EMPTY);
    };
    let i = (c % per) as usize;
    if let Some(t) = caches.l2.get_mut(&(li, l1i)) {
        return Ok(t.get(i).copied().unwrap_or(Entry::EMPTY));
    }
    let t = l.load_l2(l1i, host)?;
    let e = t.get(i).copied().unwrap_or(Entry::EMPTY);
    caches.l2.insert((li, l1i), t);
    Ok(e)
}

/// Where each sub-cluster of virtual cluster `c` comes from: from the cache, else by walking
/// the layers from the top down until every sub-cluster is found.
fn resolve(layers: &[Layer], caches: &mut Caches, c: u64) -> Result<[u64; 16]> {
    if let Some(r) = caches.resolved.get_mut(&c) {
        return Ok(*r);
    }
    let mut out = [0u64; 16];
    let mut left: u16 = 0xffff;
    for li in (0..layers.len()).rev() {
        if layers[li].header.is_none() {
            for s in sub_bits(left) {
                out[s as usize] = pack(Source::Raw(li));
            }
            break;
        }
        let e = layer_entry(layers, caches, li, c)?;
        for s in sub_bits(left & e.alloc) {
            out[s as usize] = pack(Source::Data(li, e.host));
        }
        for s in sub_bits(left & e.zero) {
            out[s as usize] = pack(Source::Zero(li));
        }
        left &= !(e.alloc | e.zero);
        if left == 0 {
            break;
        }
    }
    caches.resolved.insert(c, out);
    Ok(out)
}

fn lock(m: &Mutex<Caches>) -> MutexGuard<'_, Caches> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// An open chain of layers (index 0 is the bottom, the last is the top).
#[derive(Debug)]
pub struct Chain {
    pub(crate) layers: Vec<Layer>,
    caches: Mutex<Caches>,
    limits: CacheLimits,
    cluster_bits: u32,
    virtual_size: u64,
    read_only: bool,
    /// Whether the top's `data_id` was renewed for this open (done before its first write).
    top_id_renewed: bool,
    pub(crate) merge: Option<MergeJob>,
}

/// A contiguous piece of a read: zeroes, or bytes of one file.
enum Piece {
    Zero,
    File(usize, u64),
}

impl Chain {
    /// Opens the chain whose top is `path` (a raw file or a layer). Writable opens lock the top
    /// exclusively and every backing file shared; read-only opens lock all shared. Reads each
    /// layer's header and L1 table, nothing else. Each parent must be a regular file in its
    /// child's directory or below ([`Chain::open_with`] allows more).
    pub fn open(path: impl AsRef<Path>, opts: OpenOptions) -> Result<Chain> {
        Self::open_with(path, opts, &ParentPolicy::default())
    }

    /// [`Chain::open`], with parents also allowed where `parents` says (the caller's choice,
    /// never the files').
    pub fn open_with(
        path: impl AsRef<Path>,
        opts: OpenOptions,
        parents: &ParentPolicy,
    ) -> Result<Chain> {
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
            let parent = match Layer::open_parent(&child.path, &recorded, fmt, parents) {
                Ok(p) => p,
                Err(DiskError::Io { source, path, .. }) => {
                    return Err(DiskError::ParentMissing {
                        path: child.path.clone(),
                        parent: path,
                        source,
                    })
                }
                Err(e) => return Err(e),
            };
            layer::verify_parent(child, &parent)?;
            layers.push(parent);
        }
        layers.reverse();
        Ok(Self::from_layers(
            layers,
            opts.read_only,
            CacheLimits::default(),
        ))
    }

    fn from_layers(layers: Vec<Layer>, read_only: bool, limits: CacheLimits) -> Chain {
        let top = layers.len() - 1;
        let virtual_size = layers[top].virtual_size().next_multiple_of(512);
        let cluster_bits = layers
            .iter()
            .find_map(|l| l.header.as_ref().map(|h| h.cluster_bits))
            .unwrap_or(format::DEFAULT_CLUSTER_BITS);
        Chain {
            layers,
            caches: Mutex::new(Caches::new(limits, 1 << cluster_bits)),
            limits,
            cluster_bits,
            virtual_size,
            read_only,
            top_id_renewed: false,
            merge: None,
        }
    }

    /// Sets the bounds of the metadata caches (dropping what they hold).
    pub fn set_cache_limits(&mut self, limits: CacheLimits) {
        self.limits = limits;
        *self
            .caches
            .get_mut()
            .unwrap_or_else(PoisonError::into_inner) = Caches::new(limits, self.cluster_size());
    }

    /// Entries held by the caches now: (L2 tables, resolved clusters, changed tables pinned).
    pub fn cache_usage(&self) -> (usize, usize, usize) {
        let c = lock(&self.caches);
        let dirty = self.layers.iter().map(Layer::dirty_tables).sum();
        (c.l2.len(), c.resolved.len(), dirty)
    }

    /// Bytes this chain wrote to layer `i`'s file (data and metadata) since it was opened.
    pub fn bytes_written(&self, i: usize) -> u64 {
        self.layers.get(i).map_or(0, |l| l.bytes_written)
    }

    /// Drops everything cached (after a merge changed the layer list).
    pub(crate) fn rebuild(&mut self) -> Result<()> {
        let top = self.layers.len() - 1;
        self.virtual_size = self.layers[top].virtual_size().next_multiple_of(512);
        *self
            .caches
            .get_mut()
            .unwrap_or_else(PoisonError::into_inner) =
            Caches::new(self.limits, self.cluster_size());
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

    /// Sub-cluster size in bytes (the copy-on-write unit: 1/16 of a cluster).
    pub fn subcluster_size(&self) -> u64 {
        self.cluster_size() / SUBCLUSTERS
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

    /// Where each of the 16 sub-clusters of virtual cluster `c` comes from.
    pub fn sources(&self, c: u64) -> Result<[Source; 16]> {
        let mut caches = lock(&self.caches);
        let r = resolve(&self.layers, &mut caches, c)?;
        Ok(r.map(unpack))
    }

    /// The entry layer `li` has for virtual cluster `c`.
    pub(crate) fn entry_of(&self, li: usize, c: u64) -> Result<Entry> {
        let mut caches = lock(&self.caches);
        layer_entry(&self.layers, &mut caches, li, c)
    }

    /// Forgets the resolved sources of cluster `c` (its entries changed in some layer).
    pub(crate) fn forget(&mut self, c: u64) {
        self.caches
            .get_mut()
            .unwrap_or_else(PoisonError::into_inner)
            .resolved
            .remove(&c);
    }

    /// Pins the table of layer `li` holding cluster `c` for change (creating it if needed).
    pub(crate) fn pin(&mut self, li: usize, c: u64) -> Result<()> {
        let caches = self
            .caches
            .get_mut()
            .unwrap_or_else(PoisonError::into_inner);
        let l = &mut self.layers[li];
        let Some(h) = &l.header else {
            return Ok(());
        };
        let l1i = c / h.l2_entries();
        if l.alloc.as_ref().is_some_and(|a| a.dirty.contains_key(&l1i)) {
            return Ok(());
        }
        let clean = match l.l1.get(&l1i) {
            None => None,
            Some(&host) => Some(match caches.l2.remove(&(li, l1i)) {
                Some(t) => t,
                None => l.load_l2(l1i, host)?,
            }),
        };
        l.pin_table(l1i, clean)
    }

    /// Sets layer `li`'s entry for `c` (pinning its table) and updates the resolved sources of
    /// the sub-clusters in `changed` if `c` is cached.
    pub(crate) fn put_entry(&mut self, li: usize, c: u64, e: Entry, changed: u16) -> Result<()> {
        self.pin(li, c)?;
        self.layers[li].set_entry(c, e);
        let top = self.layers.len() - 1;
        let caches = self
            .caches
            .get_mut()
            .unwrap_or_else(PoisonError::into_inner);
        if li != top {
            caches.resolved.remove(&c);
        } else if let Some(r) = caches.resolved.get_mut(&c) {
            for s in sub_bits(changed) {
                let bit = 1u16 << s;
                r[s as usize] = pack(if e.alloc & bit != 0 {
                    Source::Data(li, e.host)
                } else if e.zero & bit != 0 {
                    Source::Zero(li)
                } else if li == 0 {
                    Source::None
                } else {
                    // Falls through: resolve again.
                    caches.resolved.remove(&c);
                    break;
                });
            }
        }
        Ok(())
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
        let mut caches = lock(&self.caches);
        let (cs, ss) = (self.cluster_size(), self.subcluster_size());
        // The current run: what, where in buf, how long.
        let mut run: Option<(Piece, usize, usize)> = None;
        let mut pos = 0usize;
        while pos < buf.len() {
            let off = offset + pos as u64;
            let c = off / cs;
            let srcs = resolve(&self.layers, &mut caches, c)?;
            let mut w = off % cs;
            let cend = cs.min(w + (buf.len() - pos) as u64);
            while w < cend {
                let s = w / ss;
                let n = (((s + 1) * ss).min(cend) - w) as usize;
                let piece = match unpack(srcs[s as usize]) {
                    Source::None | Source::Zero(_) => Piece::Zero,
                    Source::Data(li, h) => Piece::File(li, h * cs + w),
                    Source::Raw(li) => Piece::File(li, c * cs + w),
                };
                let extends = match (&run, &piece) {
                    (Some((Piece::Zero, _, _)), Piece::Zero) => true,
                    (Some((Piece::File(a, fo), _, len)), Piece::File(b, o)) => {
                        a == b && fo + *len as u64 == *o
                    }
                    _ => false,
                };
                if extends {
                    if let Some(r) = &mut run {
                        r.2 += n;
                    }
                } else {
                    if let Some(r) = run.take() {
                        self.read_piece(r, buf)?;
                    }
                    run = Some((piece, pos, n));
                }
                w += n as u64;
                pos += n;
            }
        }
        if let Some(r) = run {
            self.read_piece(r, buf)?;
        }
        Ok(())
    }

    fn read_piece(&self, (piece, at, len): (Piece, usize, usize), buf: &mut [u8]) -> Result<()> {
        let dst = &mut buf[at..at + len];
        let (li, off) = match piece {
            Piece::Zero => {
                dst.fill(0);
                return Ok(());
            }
            Piece::File(li, off) => (li, off),
        };
        let l = &self.layers[li];
        let n = read_full(&l.file, dst, off).map_err(DiskError::io(&l.path, "read"))?;
        if n < dst.len() {
            if l.header.is_some() {
                return Err(DiskError::Truncated {
                    path: l.path.clone(),
                    what: format!("data at offset {off}"),
                    need: off + dst.len() as u64,
                    len: off + n as u64,
                });
            }
            dst[n..].fill(0); // past the end of a raw base: zeroes
        }
        Ok(())
    }

    /// Reads like [`Chain::read_at`], with zeroes past the end of the disk (the last
    /// sub-cluster may be partial).
    fn read_clipped(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        let n = (self.virtual_size.saturating_sub(offset) as usize).min(buf.len());
        buf[n..].fill(0);
        self.read_at(offset, &mut buf[..n])
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

    /// Prepares the top for writes now rather than at the first write: renews its `data_id`
    /// (one header write and `fdatasync`; FORMAT.md, header). A device can call it when the
    /// guest's driver starts, so the first guest write does not wait for it.
    pub fn prepare_write(&mut self) -> Result<()> {
        self.writable_top().map(|_| ())
    }

    /// Flushes by itself when the changed tables pinned in memory exceed the cache bound.
    pub(crate) fn bound_dirty(&mut self) -> Result<()> {
        let max = (self.limits.l2_bytes / self.cluster_size() as usize).max(1);
        if self.layers.iter().map(Layer::dirty_tables).sum::<usize>() > max {
            self.flush()?;
        }
        Ok(())
    }

    /// Writes `data` at `offset` into the top layer (copy-on-write of partial sub-clusters).
    pub fn write_at(&mut self, offset: u64, data: &[u8]) -> Result<()> {
        self.check_range(offset, data.len() as u64)?;
        let top = self.writable_top()?;
        if self.layers[top].header.is_none() {
            return self.layers[top].write_data(data, offset);
        }
        let cs = self.cluster_size();
        let mut pos = 0usize;
        while pos < data.len() {
            let off = offset + pos as u64;
            let c = off / cs;
            let within = off % cs;
            let n = (cs - within).min((data.len() - pos) as u64) as usize;
            let e = self.entry_of(top, c)?;
            if within == 0 && n as u64 == cs && e.host == 0 {
                // Whole clusters the top has no host cluster for: allocate consecutive host
                // clusters and write the run with one pwrite (nothing to copy from below).
                let mut k = 1u64;
                while pos + ((k + 1) * cs) as usize <= data.len()
                    && self.entry_of(top, c + k)?.host == 0
                {
                    k += 1;
                }
                let (h, got) = self.layers[top].alloc_run(k)?;
                let len = (got * cs) as usize;
                if let Err(e) = self.layers[top].write_data(&data[pos..pos + len], h * cs) {
                    self.layers[top].unalloc(h, got);
                    return Err(e);
                }
                for i in 0..got {
                    let ne = Entry {
                        host: h + i,
                        alloc: 0xffff,
                        zero: 0,
                    };
                    self.put_entry(top, c + i, ne, 0xffff)?;
                }
                self.note_source_write(c, c + got);
                pos += len;
                continue;
            }
            self.write_in_cluster(top, c, e, within, &data[pos..pos + n])?;
            self.note_source_write(c, c + 1);
            pos += n;
        }
        self.bound_dirty()
    }

    /// Writes `part` at `within` of cluster `c` into layer `li` (whose entry is `e`): into its
    /// host cluster (allocated if it has none), filling the partial sub-clusters at either end
    /// that it does not hold with the chain's current content.
    fn write_in_cluster(
        &mut self,
        li: usize,
        c: u64,
        mut e: Entry,
        within: u64,
        part: &[u8],
    ) -> Result<()> {
        let (cs, ss) = (self.cluster_size(), self.subcluster_size());
        let new_host = e.host == 0;
        if new_host {
            e.host = self.layers[li].alloc_cluster()?;
        }
        let end = within + part.len() as u64;
        let (s0, s1) = (within / ss, (end - 1) / ss);
        let head = within % ss != 0 && e.alloc & (1 << s0) == 0;
        let tail = end % ss != 0 && e.alloc & (1 << s1) == 0;
        let res = if !head && !tail {
            self.layers[li].write_data(part, e.host * cs + within)
        } else {
            let span_start = if head { s0 * ss } else { within };
            let span_end = if tail { (s1 + 1) * ss } else { end };
            let mut buf = vec![0u8; (span_end - span_start) as usize];
            let base = c * cs;
            if head {
                self.read_clipped(base + s0 * ss, &mut buf[..ss as usize])?;
            }
            if tail && !(head && s0 == s1) {
                let at = (s1 * ss - span_start) as usize;
                self.read_clipped(base + s1 * ss, &mut buf[at..at + ss as usize])?;
            }
            let at = (within - span_start) as usize;
            buf[at..at + part.len()].copy_from_slice(part);
            self.layers[li].write_data(&buf, e.host * cs + span_start)
        };
        if let Err(err) = res {
            if new_host {
                self.layers[li].unalloc(e.host, 1);
            }
            return Err(err);
        }
        let mask: u16 = (((1u32 << (s1 + 1)) - 1) & !((1u32 << s0) - 1)) as u16;
        e.alloc |= mask;
        e.zero &= !mask;
        self.put_entry(li, c, e, mask)
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

    /// Discards `offset..offset+len`: the range reads as zeroes afterwards and whole
    /// sub-clusters give their space back (after the next flush).
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
        let (cs, ss) = (self.cluster_size(), self.subcluster_size());
        let end = offset + len;
        let mut off = offset;
        while off < end {
            let c = off / cs;
            let within = off % cs;
            let n = (cs - within).min(end - off);
            // Whole sub-clusters become zero entries (unallocated in a base layer, where that
            // reads as zeroes); partial ones at the edges are written with zeroes.
            let stop = within + n;
            let a = within.next_multiple_of(ss);
            let b = stop / ss * ss;
            if a >= b {
                self.write_at(c * cs + within, &vec![0u8; n as usize])?;
            } else {
                if a > within {
                    self.write_at(c * cs + within, &vec![0u8; (a - within) as usize])?;
                }
                let mask: u16 = (((1u32 << (b / ss)) - 1) & !((1u32 << (a / ss)) - 1)) as u16;
                let old = self.entry_of(top, c)?;
                let mut e = old;
                e.alloc &= !mask;
                if top == 0 {
                    e.zero &= !mask;
                } else {
                    e.zero |= mask;
                }
                if e.alloc == 0 {
                    e.host = 0;
                }
                if e != old {
                    self.put_entry(top, c, e, mask)?;
                    self.note_source_write(c, c + 1);
                }
                if stop > b {
                    self.write_at(c * cs + b, &vec![0u8; (stop - b) as usize])?;
                }
            }
            off += n;
        }
        self.bound_dirty()
    }

    /// Puts a new empty layer at `new_path` on top of this open chain (what a checkpoint does):
    /// flushes, writes the new file recording the current top as its parent, turns the old
    /// top into a read-only backing file (shared lock) and makes the new layer the writable
    /// top. The caches stay valid (the new layer holds nothing), so the cost is a flush plus
    /// creating one small file, whatever the size or depth of the chain.
    pub fn push_layer(&mut self, new_path: impl AsRef<Path>) -> Result<()> {
        let new_path = new_path.as_ref();
        if self.read_only {
            return Err(DiskError::ReadOnly {
                path: self.top_path().to_path_buf(),
            });
        }
        if self.merge.is_some() {
            return Err(DiskError::Invalid(
                "a merge is running on this chain".into(),
            ));
        }
        self.flush()?;
        let top = self.layers.len() - 1;
        let pref = self.layers[top].as_parent_ref(new_path)?;
        let h = Header::new(self.cluster_bits, self.virtual_size, pref);
        write_new_layer(new_path, h, true)?;
        let new = Layer::open(new_path, true, Some(Format::Strata))?;
        let old = &mut self.layers[top];
        let _ = old.trim_tail();
        // flock converts the exclusive lock to a shared one on the same descriptor.
        sys::lock(&old.file, &old.path, false)?;
        old.writable = false;
        old.alloc = None;
        self.layers.push(new);
        // The new layer's data id is fresh and no layer can have been made on top of it yet,
        // so its first write need not renew it (which costs a header write and an fdatasync
        // on the guest's first write after a checkpoint).
        self.top_id_renewed = true;
        Ok(())
    }

    /// Undoes [`Chain::push_layer`] while nothing has been written to the new top since: closes
    /// the top layer, deletes its file, and makes the layer below the writable top again (its
    /// lock exclusive again). A checkpoint that switched some disks and then failed uses it to
    /// leave every disk as it was. Refused when the top was written, when the layer below was
    /// not this chain's writable top before (it was opened read-only), and on read-only chains.
    pub fn pop_layer(&mut self) -> Result<()> {
        if self.read_only {
            return Err(DiskError::ReadOnly {
                path: self.top_path().to_path_buf(),
            });
        }
        if self.merge.is_some() || self.layers.len() < 2 {
            return Err(DiskError::Invalid(format!(
                "{}: no layer pushed on this chain to take off",
                self.top_path().display()
            )));
        }
        let top = self.layers.len() - 1;
        if self.layers[top].bytes_written != 0 {
            return Err(DiskError::Invalid(format!(
                "{}: the layer was written since it was put on top; it cannot be taken off",
                self.layers[top].path.display()
            )));
        }
        let below = top - 1;
        // SAFETY: fcntl(F_GETFL) on a descriptor we own only reads its status flags.
        let flags = unsafe { libc::fcntl(self.layers[below].file.as_raw_fd(), libc::F_GETFL) };
        if flags < 0 || flags & libc::O_ACCMODE != libc::O_RDWR {
            return Err(DiskError::Invalid(format!(
                "{}: opened read-only, so it cannot become the writable top again",
                self.layers[below].path.display()
            )));
        }
        {
            let l = &mut self.layers[below];
            sys::lock(&l.file, &l.path, true)?;
            l.writable = true;
            l.make_alloc()?;
        }
        if let Some(gone) = self.layers.pop() {
            let path = gone.path.clone();
            drop(gone);
            std::fs::remove_file(&path).map_err(DiskError::io(&path, "remove"))?;
        }
        let cs = self.cluster_size();
        *self
            .caches
            .get_mut()
            .unwrap_or_else(PoisonError::into_inner) = Caches::new(self.limits, cs);
        self.top_id_renewed = false;
        Ok(())
    }

    /// Makes every write completed so far durable (data first, then the tables; fdatasync).
    pub fn flush(&mut self) -> Result<()> {
        if self.read_only {
            return Ok(());
        }
        let caches = self
            .caches
            .get_mut()
            .unwrap_or_else(PoisonError::into_inner);
        for (li, l) in self.layers.iter_mut().enumerate() {
            if !l.writable {
                continue;
            }
            for (l1i, t) in l.flush()? {
                caches.l2.insert((li, l1i), t);
            }
        }
        Ok(())
    }
}

impl Drop for Chain {
    fn drop(&mut self) {
        // A clean close makes everything durable and truncates the unused tail;
        // errors here have no one to go to.
        if self.flush().is_ok() && !self.read_only {
            for l in self.layers.iter_mut().filter(|l| l.writable) {
                let _ = l.trim_tail();
            }
        }
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
    write_new_layer(path, Header::new(bits, size, ParentRef::None), true)
}

/// Creates a new layer at `new_path` over `parent_path` (a raw image or a layer; the parent's
/// own chain must open). The new layer records the parent's identity, and its path relative
/// to the new layer's directory; a parent outside that directory is refused
/// ([`create_layer_with`] allows more).
pub fn create_layer(parent_path: impl AsRef<Path>, new_path: impl AsRef<Path>) -> Result<()> {
    create_layer_with(parent_path, new_path, &ParentPolicy::default())
}

/// [`create_layer`], with parents (the new layer's and those of the parent's chain) also
/// allowed where `parents` says.
pub fn create_layer_with(
    parent_path: impl AsRef<Path>,
    new_path: impl AsRef<Path>,
    parents: &ParentPolicy,
) -> Result<()> {
    create_layer_as(parent_path.as_ref(), new_path.as_ref(), parents, true)
}

/// [`create_layer_with`] without syncing the new file or its directory: the caller makes it
/// durable with [`crate::file::sync_created`] before recording it anywhere (the VMM does that
/// off a restore's critical path, holding the guest's disk I/O until then).
pub fn create_layer_unsynced(
    parent_path: impl AsRef<Path>,
    new_path: impl AsRef<Path>,
    parents: &ParentPolicy,
) -> Result<()> {
    create_layer_as(parent_path.as_ref(), new_path.as_ref(), parents, false)
}

fn create_layer_as(
    parent_path: &Path,
    new_path: &Path,
    parents: &ParentPolicy,
    durable: bool,
) -> Result<()> {
    if new_path.exists() {
        return Err(DiskError::Exists {
            path: new_path.to_path_buf(),
        });
    }
    let parent = Chain::open_with(
        parent_path,
        OpenOptions {
            read_only: true,
            format: None,
        },
        parents,
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
    let pref = top.parent_ref_for(new_path, Some(parents))?;
    let h = Header::new(parent.cluster_bits, size, pref);
    write_new_layer(new_path, h, durable)
}

/// Writes a new layer file whole, unnamed or under a temporary name, syncs it (if `durable`)
/// and links it into place (never over an existing file; a crash leaves nothing that blocks a
/// later create).
fn write_new_layer(path: &Path, h: Header, durable: bool) -> Result<()> {
    crate::file::create_whole(path, &h.encode(), h.data_offset, durable)
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
    fn allocation_grows_the_file_by_a_sparse_step_and_a_clean_close_trims_the_tail() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("a.strata");
        create_empty(&p, 1 << 30, CreateOptions::default()).unwrap();
        let data_offset = file_len(&p);
        let mut c = Chain::open(&p, rw()).unwrap();
        // Whole clusters (one run) and a partial one (copy-on-write).
        c.write_at(0, &vec![3u8; 1 << 20]).unwrap();
        c.write_at((5 << 20) + 100, &[4u8; 10]).unwrap();
        c.flush().unwrap();
        // The data area grew by a step, not by what was written, and the step is a hole: the
        // file occupies what was written (1 MiB, a 4 KiB block of the partial cluster, a table
        // and the header's cluster), not the step nor the partial cluster's 64 KiB.
        assert!(file_len(&p) >= data_offset + (64 << 20), "{}", file_len(&p));
        let occupied =
            std::os::unix::fs::MetadataExt::blocks(&std::fs::metadata(&p).unwrap()) * 512;
        assert!(
            occupied < data_offset + (1 << 20) + 2 * 65_536,
            "{occupied}"
        );
        // Crash now: the file as it stands (page cache included) is what a reopen sees.
        let crashed = d.path().join("crashed.strata");
        std::fs::copy(&p, &crashed).unwrap();
        drop(c);
        // Clean close: trimmed after the last cluster in use, nothing leaked.
        // 17 data clusters and one L2 table.
        assert_eq!(file_len(&p), data_offset + 18 * 65_536);
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
        assert_eq!(file_len(&crashed), data_offset + 50 * 65_536);
        let r = crate::ops::check(&crashed, false).unwrap();
        assert!(r.is_clean());
        assert_eq!(r.files[0].leaked_clusters, 0);
        let c = Chain::open(&crashed, rw()).unwrap();
        c.read_at((100 << 20) + 65_536, &mut b[..4096]).unwrap();
        assert!(b[..4096].iter().all(|&x| x == 5));
    }

    #[test]
    fn growth_stops_at_the_size_the_table_can_reference() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("a.strata");
        create_empty(&p, 4 << 20, CreateOptions::default()).unwrap();
        let data_offset = file_len(&p);
        let mut c = Chain::open(&p, rw()).unwrap();
        c.write_at(0, &[1u8; 512]).unwrap();
        // 64 data clusters and one L2 table.
        assert_eq!(file_len(&p), data_offset + (4 << 20) + 65_536);
        // Rewrites that free clusters only after a flush may need more: the file grows by
        // what the writes need.
        c.write_zeroes(0, 4 << 20).unwrap();
        c.write_at(0, &vec![2u8; 4 << 20]).unwrap();
        c.write_zeroes(0, 4 << 20).unwrap();
        c.write_at(0, &vec![3u8; 4 << 20]).unwrap();
        c.flush().unwrap();
        // A table, 1 + 64 clusters, then 64 more while the first 64 were still pending free.
        assert_eq!(file_len(&p), data_offset + (8 << 20) + 2 * 65_536);
        let mut b = vec![0u8; 4 << 20];
        c.read_at(0, &mut b).unwrap();
        assert!(b.iter().all(|&x| x == 3));
        drop(c);
        let r = crate::ops::check(&p, false).unwrap();
        assert!(r.is_clean());
    }

    #[test]
    fn pop_layer_undoes_a_push_and_the_old_top_takes_writes_again() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("a.strata");
        create_empty(&p, 1 << 30, CreateOptions::default()).unwrap();
        let mut c = Chain::open(&p, rw()).unwrap();
        c.write_at(0, &[1u8; 4096]).unwrap();
        let q = d.path().join("b.strata");
        c.push_layer(&q).unwrap();
        c.pop_layer().unwrap();
        assert!(!q.exists());
        assert_eq!(c.depth(), 1);
        c.write_at(4096, &[2u8; 4096]).unwrap();
        // The old top is locked exclusively again: nobody else can open it for writing.
        assert!(Chain::open(&p, rw()).is_err());
        drop(c);
        let c = Chain::open(&p, rw()).unwrap();
        let mut b = vec![0u8; 8192];
        c.read_at(0, &mut b).unwrap();
        assert!(b[..4096].iter().all(|&x| x == 1) && b[4096..].iter().all(|&x| x == 2));
        drop(c);
        assert!(crate::ops::check(&p, false).unwrap().is_clean());

        // A written top cannot be taken off; a chain that never pushed has nothing to pop.
        let mut c = Chain::open(&p, rw()).unwrap();
        assert!(c.pop_layer().is_err());
        c.push_layer(&q).unwrap();
        c.write_at(0, &[3u8; 512]).unwrap();
        let e = c.pop_layer().unwrap_err().to_string();
        assert!(e.contains("was written"), "{e}");
        assert!(q.exists());
    }

    #[test]
    fn push_layer_on_an_open_chain_keeps_reads_and_freezes_the_old_top() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("a.strata");
        create_empty(&p, 1 << 40, CreateOptions::default()).unwrap();
        let mut c = Chain::open(&p, rw()).unwrap();
        c.write_at(5 << 30, &[7u8; 10_000]).unwrap();
        let q = d.path().join("b.strata");
        c.push_layer(&q).unwrap();
        assert_eq!(c.depth(), 2);
        c.write_at((5 << 30) + 4096, &[8u8; 4096]).unwrap();
        let mut b = vec![0u8; 10_000];
        c.read_at(5 << 30, &mut b).unwrap();
        assert!(b[..4096].iter().all(|&x| x == 7));
        assert!(b[4096..8192].iter().all(|&x| x == 8));
        assert!(b[8192..].iter().all(|&x| x == 7));
        drop(c);
        // The old top is the new layer's unchanged parent; the new layer copied one 4 KiB
        // sub-cluster, not the 64 KiB cluster.
        let c = Chain::open(&q, rw()).unwrap();
        c.read_at(5 << 30, &mut b).unwrap();
        assert!(b[4096..8192].iter().all(|&x| x == 8) && b[0] == 7);
        let info = c.info().unwrap();
        assert_eq!(info.layers[1].data_bytes, 4096);
        drop(c);
        let r = crate::ops::check(&q, false).unwrap();
        assert!(r.is_clean(), "{r:?}");
    }

    #[test]
    fn writes_outside_the_disk_are_refused() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("a.strata");
        create_empty(
            &p,
            4096,
            CreateOptions {
                cluster_bits: Some(13),
            },
        )
        .unwrap();
        let mut c = Chain::open(&p, rw()).unwrap();
        assert!(c.write_at(4000, &[0; 200]).is_err());
        assert!(c.read_at(u64::MAX, &mut [0; 2]).is_err());
    }
}
