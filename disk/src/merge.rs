//! Merges: fold a layer into its parent, or a parent into its only child, online.
//!
//! A merge is a job owned by the open [`Chain`]: [`Chain::begin_merge`] prepares it,
//! [`Chain::merge_step`] copies a bounded number of clusters (the device thread calls it
//! between requests, or a thread holding the chain's lock calls it in a loop), and the step
//! that empties the work list commits the merge. The guest's I/O continues between steps; a
//! write into a layer being folded puts the cluster back on the work list. The protocol and
//! why every interruption leaves a chain that reads the same is in FORMAT.md, "Merge".

use std::collections::BTreeSet;
use std::os::unix::fs::FileExt;
use std::path::Path;

use crate::chain::{Chain, OpenOptions, Source};
use crate::error::{DiskError, Result};
use crate::format::{self, Entry, ParentRef};
use crate::layer::read_full;
use crate::sys;

/// Which way a merge folds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum MergeDirection {
    /// Copy the layer's clusters into its parent, re-point its child (if any) to the parent,
    /// delete the layer.
    IntoParent,
    /// Copy the layer's clusters that its child does not override into the child, re-point
    /// the child to the layer's parent, delete the layer.
    IntoChild,
}

/// How far a merge has got.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MergeProgress {
    /// Clusters copied so far.
    pub done: u64,
    /// Clusters to copy in all (grows if the guest writes a folded cluster again).
    pub total: u64,
    /// The merge committed and the layer is gone.
    pub finished: bool,
}

/// A merge in progress inside a chain.
#[derive(Debug)]
pub(crate) struct MergeJob {
    src: usize,
    dst: usize,
    dir: MergeDirection,
    work: BTreeSet<u64>,
    done: u64,
    total: u64,
}

impl MergeJob {
    /// Called by the write path: clusters `from..to` of layer `top` were written.
    pub fn note_write(&mut self, top: usize, from: u64, to: u64) {
        if self.dir == MergeDirection::IntoParent && self.src == top {
            for c in from..to {
                if self.work.insert(c) {
                    self.total += 1;
                }
            }
        }
    }
}

impl Chain {
    /// Starts merging layer `layer` (0 = bottom) in direction `dir`. Takes the exclusive locks
    /// the merge needs (failing with "in use" if another chain shares those files) and writes
    /// the merge's intent (FORMAT.md, "Merge").
    pub fn begin_merge(&mut self, layer: usize, dir: MergeDirection) -> Result<()> {
        if self.is_read_only() {
            return Err(DiskError::ReadOnly {
                path: self.top_path().to_path_buf(),
            });
        }
        if self.merge.is_some() {
            return Err(DiskError::Invalid(
                "a merge is already running on this chain".into(),
            ));
        }
        let n = self.layers.len();
        let top = n - 1;
        if layer >= n {
            return Err(DiskError::Invalid(format!(
                "no layer {layer} in a chain of {n}"
            )));
        }
        let (src, dst) = match dir {
            MergeDirection::IntoParent if layer == 0 => {
                return Err(DiskError::BadChain {
                    path: self.layers[0].path.clone(),
                    reason: "has no parent to merge into".into(),
                })
            }
            MergeDirection::IntoParent => (layer, layer - 1),
            MergeDirection::IntoChild if layer == top => {
                return Err(DiskError::BadChain {
                    path: self.layers[top].path.clone(),
                    reason: "is the top of the chain and has no child to merge into".into(),
                })
            }
            MergeDirection::IntoChild => (layer, layer + 1),
        };
        // Locks first, so a refusal changes nothing.
        match dir {
            MergeDirection::IntoParent => {
                self.layers[src].upgrade_exclusive(true)?;
                self.layers[dst].upgrade_exclusive(true)?;
                if src < top {
                    self.layers[src + 1].upgrade_exclusive(true)?;
                }
            }
            MergeDirection::IntoChild => {
                self.layers[dst].upgrade_exclusive(true)?;
                self.layers[src].upgrade_exclusive(false)?;
            }
        }
        if dir == MergeDirection::IntoParent {
            // Intent: the source accepts its parent changing under it ...
            if let Some(mut h) = self.layers[src].header.clone() {
                h.flags |= format::FLAG_FOLDING;
                self.layers[src].write_header(h)?;
            }
            // ... and no other child of the parent will accept the parent any more.
            if let Some(mut h) = self.layers[dst].header.clone() {
                h.data_id = format::random_id();
                self.layers[dst].write_header(h)?;
            }
        }
        let work: BTreeSet<u64> = if self.layers[src].header.is_none() {
            (0..self.virtual_size().div_ceil(self.cluster_size())).collect()
        } else {
            let raw = self.layer_entries(src)?;
            raw.iter()
                .enumerate()
                .filter(|(_, &v)| v != 0)
                .map(|(i, _)| i as u64)
                .collect()
        };
        let total = work.len() as u64;
        self.merge = Some(MergeJob {
            src,
            dst,
            dir,
            work,
            done: 0,
            total,
        });
        Ok(())
    }

    /// Copies up to `max_clusters` clusters of the running merge; the step that copies the
    /// last one commits the merge. Returns the progress.
    pub fn merge_step(&mut self, max_clusters: u64) -> Result<MergeProgress> {
        let Some(job) = &mut self.merge else {
            return Err(DiskError::Invalid("no merge is running".into()));
        };
        let batch: Vec<u64> = job
            .work
            .iter()
            .copied()
            .take(max_clusters.max(1) as usize)
            .collect();
        let (src, dst, dir) = (job.src, job.dst, job.dir);
        for c in batch {
            match dir {
                MergeDirection::IntoParent => self.fold_cluster(src, dst, c)?,
                MergeDirection::IntoChild => self.push_cluster(src, dst, c)?,
            }
            if let Some(job) = &mut self.merge {
                job.work.remove(&c);
                job.done += 1;
            }
        }
        let (done, total, empty) = match &self.merge {
            Some(j) => (j.done, j.total, j.work.is_empty()),
            None => (0, 0, true),
        };
        if empty {
            self.commit_merge(src, dst, dir)?;
            self.merge = None;
        }
        Ok(MergeProgress {
            done,
            total,
            finished: empty,
        })
    }

    /// Forgets a running merge (what it copied stays; the chain reads the same).
    pub fn abort_merge(&mut self) {
        self.merge = None;
    }

    /// Runs a whole merge, reporting progress as (done, total) clusters.
    pub fn merge(
        &mut self,
        layer: usize,
        dir: MergeDirection,
        progress: &mut dyn FnMut(u64, u64),
    ) -> Result<()> {
        self.begin_merge(layer, dir)?;
        loop {
            let p = self.merge_step(256)?;
            progress(p.done, p.total);
            if p.finished {
                return Ok(());
            }
        }
    }

    /// Reads cluster `c` as layer `li` holds it (not through the chain).
    fn read_layer_cluster(&self, li: usize, c: u64, buf: &mut [u8]) -> Result<Entry> {
        let cs = self.cluster_size();
        let l = &self.layers[li];
        let (e, off) = if l.header.is_none() {
            (Entry::Data(c), c * cs)
        } else {
            let raw = match &l.alloc {
                Some(a) => a.raw.get(c as usize).copied().unwrap_or(0),
                None => {
                    let mut b = [0u8; 8];
                    l.file
                        .read_exact_at(&mut b, format::TABLE_OFFSET + c * format::ENTRY_SIZE)
                        .map_err(DiskError::io(&l.path, "read allocation table"))?;
                    u64::from_le_bytes(b)
                }
            };
            let e = Entry::decode(c, raw).map_err(|source| DiskError::Format {
                path: l.path.clone(),
                source,
            })?;
            match e {
                Entry::Data(h) => (e, h * cs),
                _ => return Ok(e),
            }
        };
        let n = read_full(&l.file, buf, off).map_err(DiskError::io(&l.path, "read"))?;
        if n < buf.len() {
            if l.header.is_some() {
                return Err(DiskError::Truncated {
                    path: l.path.clone(),
                    what: format!("data of virtual cluster {c}"),
                    need: off + buf.len() as u64,
                    len: off + n as u64,
                });
            }
            buf[n..].fill(0);
        }
        Ok(e)
    }

    /// Into-parent: make `dst` hold what `src` holds at `c`.
    fn fold_cluster(&mut self, src: usize, dst: usize, c: u64) -> Result<()> {
        let cs = self.cluster_size();
        let mut buf = vec![0u8; cs as usize];
        let e = self.read_layer_cluster(src, c, &mut buf)?;
        if self.layers[dst].header.is_none() {
            // Raw parent: write in place, clipped to the file's length.
            let l = &self.layers[dst];
            let start = c * cs;
            let end = (start + cs).min(l.raw_len);
            if start >= end {
                return Ok(());
            }
            let r = match e {
                Entry::Data(_) => l.file.write_all_at(&buf[..(end - start) as usize], start),
                Entry::Zero => sys::punch_hole(&l.file, start, end - start),
                Entry::Unallocated => Ok(()),
            };
            return r.map_err(DiskError::io(&l.path, "write"));
        }
        let dst_base = dst == 0;
        match e {
            Entry::Unallocated => {}
            Entry::Zero => {
                let z = if dst_base {
                    Entry::Unallocated
                } else {
                    Entry::Zero
                };
                self.layers[dst].set_entry(c, z);
            }
            Entry::Data(_) => {
                let h = match self.layers[dst].entry(c) {
                    Entry::Data(h) => h,
                    _ => self.layers[dst].alloc_cluster()?,
                };
                self.write_host(dst, h, &buf)?;
                self.layers[dst].set_entry(c, Entry::Data(h));
            }
        }
        Ok(())
    }

    /// Into-child: give `dst` what `src` holds at `c` unless `dst` holds `c` itself.
    fn push_cluster(&mut self, src: usize, dst: usize, c: u64) -> Result<()> {
        if self.layers[dst].entry(c) != Entry::Unallocated {
            return Ok(());
        }
        let cs = self.cluster_size();
        let mut buf = vec![0u8; cs as usize];
        let e = self.read_layer_cluster(src, c, &mut buf)?;
        let src_is_base = src == 0;
        let new = match e {
            Entry::Unallocated => return Ok(()),
            // With nothing under the source, unallocated already reads zero.
            Entry::Zero if src_is_base => return Ok(()),
            Entry::Data(_) if src_is_base && buf.iter().all(|&b| b == 0) => return Ok(()),
            Entry::Zero => Entry::Zero,
            Entry::Data(_) => {
                let h = self.layers[dst].alloc_cluster()?;
                self.write_host(dst, h, &buf)?;
                Entry::Data(h)
            }
        };
        self.layers[dst].set_entry(c, new);
        let below = match self.source(c) {
            Source::Zero(l) | Source::Data(l, _) | Source::Raw(l) => l <= src,
            Source::None => true,
        };
        if below {
            let s = match new {
                Entry::Data(h) => Source::Data(dst, h),
                _ => Source::Zero(dst),
            };
            self.set_source(c, s);
        }
        Ok(())
    }

    fn commit_merge(&mut self, src: usize, dst: usize, dir: MergeDirection) -> Result<()> {
        // 1. Everything copied is durable (data, then tables).
        self.flush()?;
        let top = self.layers.len() - 1;
        // 2. The switch: one header write.
        match dir {
            MergeDirection::IntoParent => {
                if src < top {
                    let child = src + 1;
                    let pref = self.layers[dst].as_parent_ref(&self.layers[child].path)?;
                    self.repoint(child, pref)?;
                }
            }
            MergeDirection::IntoChild => {
                let pref = if src == 0 {
                    ParentRef::None
                } else {
                    self.layers[src - 1].as_parent_ref(&self.layers[dst].path)?
                };
                self.repoint(dst, pref)?;
            }
        }
        // 3. The old layer goes (a raw base is the user's file: it is left, unreferenced).
        let gone = self.layers.remove(src);
        if gone.header.is_some() {
            std::fs::remove_file(&gone.path)
                .map_err(DiskError::io(&gone.path, "delete merged layer"))?;
            sys::sync_dir(&gone.path)?;
        }
        drop(gone);
        // 4. Files no longer written by this chain go back to shared locks.
        let top = self.layers.len() - 1;
        for (i, l) in self.layers.iter_mut().enumerate() {
            if i != top && l.writable {
                // Flushed above: its unused preallocated space can go back.
                let _ = l.trim_tail();
                let _ = sys::lock(&l.file, &l.path, false);
                l.writable = false;
                l.alloc = None;
            }
        }
        if self.layers[top].writable
            && self.layers[top].header.is_some()
            && self.layers[top].alloc.is_none()
        {
            let raw = self.layers[top].load_entries()?;
            self.layers[top].make_alloc(raw)?;
        }
        self.rebuild()
    }

    fn repoint(&mut self, li: usize, pref: ParentRef) -> Result<()> {
        let l = &mut self.layers[li];
        if let Some(mut h) = l.header.clone() {
            h.parent = pref;
            h.flags &= !format::FLAG_FOLDING;
            l.write_header(h)?;
        }
        Ok(())
    }
}

/// Merges the layer at `layer` of the chain whose top is `top` (the layer itself when `None`).
/// `IntoChild` needs `top` to know the child.
pub fn merge(
    layer: &Path,
    top: Option<&Path>,
    dir: MergeDirection,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<()> {
    let top = top.unwrap_or(layer);
    let mut chain = Chain::open(top, OpenOptions::default())?;
    let idx = chain
        .layer_index(layer)
        .ok_or_else(|| DiskError::BadChain {
            path: top.to_path_buf(),
            reason: format!("{} is not in this chain", layer.display()),
        })?;
    chain.merge(idx, dir, progress)?;
    chain.flush()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::chain::{create_empty, create_layer, CreateOptions};

    fn read_all(c: &Chain) -> Vec<u8> {
        let mut b = vec![0u8; c.virtual_size() as usize];
        c.read_at(0, &mut b).unwrap();
        b
    }

    fn three_layers(d: &Path) -> (std::path::PathBuf, Vec<u8>) {
        let base = d.join("base.img");
        let mut data: Vec<u8> = (0..512 * 1024u32).map(|i| (i % 251) as u8).collect();
        std::fs::write(&base, &data).unwrap();
        let l1 = d.join("l1.strata");
        create_layer(&base, &l1).unwrap();
        let mut c = Chain::open(&l1, OpenOptions::default()).unwrap();
        c.write_at(10, &[1; 70_000]).unwrap();
        c.discard(256 * 1024, 64 * 1024).unwrap();
        drop(c);
        data[10..70_010].fill(1);
        data[256 * 1024..320 * 1024].fill(0);
        let l2 = d.join("l2.strata");
        create_layer(&l1, &l2).unwrap();
        let mut c = Chain::open(&l2, OpenOptions::default()).unwrap();
        c.write_at(60_000, &[2; 100_000]).unwrap();
        drop(c);
        data[60_000..160_000].fill(2);
        (l2, data)
    }

    #[test]
    fn online_merge_both_directions_keeps_data_while_writing() {
        let d = tempfile::tempdir().unwrap();
        let (top, mut data) = three_layers(d.path());
        let l3 = d.path().join("l3.strata");
        create_layer(&top, &l3).unwrap();
        let mut c = Chain::open(&l3, OpenOptions::default()).unwrap();
        // Fold l1 into its child l2 while the guest writes l3.
        c.begin_merge(1, MergeDirection::IntoChild).unwrap();
        c.merge_step(1).unwrap();
        c.write_at(5, &[3; 10]).unwrap();
        data[5..15].fill(3);
        while !c.merge_step(1).unwrap().finished {}
        assert_eq!(c.depth(), 3);
        assert_eq!(read_all(&c), data);
        // Fold the top l3 into l2 with a write in the middle.
        c.begin_merge(2, MergeDirection::IntoParent).unwrap();
        c.write_at(400_000, &[4; 3]).unwrap();
        data[400_000..400_003].fill(4);
        while !c.merge_step(1).unwrap().finished {}
        assert_eq!(c.depth(), 2);
        assert!(!l3.exists());
        assert_eq!(read_all(&c), data);
        drop(c);
        let c = Chain::open(d.path().join("l2.strata"), OpenOptions::default()).unwrap();
        assert_eq!(read_all(&c), data);
    }

    #[test]
    fn fold_into_raw_base_writes_the_base() {
        let d = tempfile::tempdir().unwrap();
        let (top, data) = three_layers(d.path());
        merge(
            &d.path().join("l1.strata"),
            Some(&top),
            MergeDirection::IntoParent,
            &mut |_, _| {},
        )
        .unwrap();
        let c = Chain::open(&top, OpenOptions::default()).unwrap();
        assert_eq!(c.depth(), 2);
        assert_eq!(read_all(&c), data);
        drop(c);
        merge(&top, None, MergeDirection::IntoParent, &mut |_, _| {}).unwrap();
        assert_eq!(std::fs::read(d.path().join("base.img")).unwrap(), data);
    }

    #[test]
    fn merge_into_parent_with_another_child_makes_the_sibling_refuse() {
        let d = tempfile::tempdir().unwrap();
        let b = d.path().join("b.strata");
        create_empty(&b, 1 << 20, CreateOptions::default()).unwrap();
        let (x, y) = (d.path().join("x.strata"), d.path().join("y.strata"));
        create_layer(&b, &x).unwrap();
        create_layer(&b, &y).unwrap();
        Chain::open(&x, OpenOptions::default())
            .unwrap()
            .write_at(0, &[9; 10])
            .unwrap();
        merge(&x, None, MergeDirection::IntoParent, &mut |_, _| {}).unwrap();
        let e = Chain::open(&y, OpenOptions::default())
            .unwrap_err()
            .to_string();
        assert!(e.contains("y.strata") && e.contains("modified"), "{e}");
    }
}
