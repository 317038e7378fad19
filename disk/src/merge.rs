//! Merges: fold a layer into its parent, or a parent into its only child, online.
//!
//! A merge is a job owned by the open [`Chain`]: [`Chain::begin_merge`] prepares it,
//! [`Chain::merge_step`] copies a bounded number of clusters (the device thread calls it
//! between requests, or a thread holding the chain's lock calls it in a loop), and the step
//! that empties the work list commits the merge. The guest's I/O continues between steps; a
//! write into a layer being folded puts the cluster back on the work list. The protocol and
//! why every interruption leaves a chain that reads the same is in FORMAT.md, "Merge".

use std::collections::BTreeSet;
use std::path::Path;

use crate::chain::{Chain, OpenOptions};
use crate::error::{DiskError, Result};
use crate::format::{self, ParentRef};
use crate::layer::{read_full, sub_bits, sub_runs};
use crate::sys;

/// Which way a merge folds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
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
    /// Leave the merged layer's file in place at the commit (the caller unlinks it once
    /// nothing refers to it any more).
    keep_file: bool,
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
        self.begin_merge_as(layer, dir, false)
    }

    /// [`Chain::begin_merge`], except that the commit leaves the merged layer's file in place,
    /// out of the chain (no layer names it any more): for a caller whose own records still
    /// name the file, which unlinks it once they no longer do (a crash in between leaves a
    /// file that still reads as it did).
    pub fn begin_merge_keeping_file(&mut self, layer: usize, dir: MergeDirection) -> Result<()> {
        self.begin_merge_as(layer, dir, true)
    }

    fn begin_merge_as(&mut self, layer: usize, dir: MergeDirection, keep_file: bool) -> Result<()> {
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
            // Intent: the source accepts its parent changing under it (FOLDING, with the
            // parent's identity during the merge recorded) ...
            if let Some(h) = self.layers[src].folding_header(&self.layers[dst])? {
                self.layers[src].write_header(h)?;
            }
            // ... and no other child of the parent will accept the parent any more.
            if let Some(mut h) = self.layers[dst].header.clone() {
                h.data_id = self.layers[src]
                    .folded_parent_data_id()
                    .unwrap_or_else(format::random_id);
                self.layers[dst].write_header(h)?;
            }
        }
        let work: BTreeSet<u64> = if self.layers[src].header.is_none() {
            (0..self.virtual_size().div_ceil(self.cluster_size())).collect()
        } else {
            let mut w = BTreeSet::new();
            self.layers[src].for_each_entry(&mut |c, _| {
                w.insert(c);
                Ok(())
            })?;
            w
        };
        let total = work.len() as u64;
        self.merge = Some(MergeJob {
            src,
            dst,
            dir,
            work,
            done: 0,
            total,
            keep_file,
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
        let (src, dst, dir, keep_file) = (job.src, job.dst, job.dir, job.keep_file);
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
        self.bound_dirty()?;
        let (done, total, empty) = match &self.merge {
            Some(j) => (j.done, j.total, j.work.is_empty()),
            None => (0, 0, true),
        };
        if empty {
            self.commit_merge(src, dst, dir, keep_file)?;
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

    /// Reads the whole host cluster `host` of layer `li` (or, for a raw layer, the bytes of
    /// virtual cluster `c`, zeroes past its end).
    fn read_host(&self, li: usize, c: u64, host: u64, buf: &mut [u8]) -> Result<()> {
        let cs = self.cluster_size();
        let l = &self.layers[li];
        let off = if l.header.is_none() {
            c * cs
        } else {
            host * cs
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
        Ok(())
    }

    /// Writes the sub-clusters in `mask` of `buf` (a whole cluster) into host cluster `host`
    /// of layer `li`, one write per run of adjacent sub-clusters.
    fn write_subs(&mut self, li: usize, host: u64, mask: u16, buf: &[u8]) -> Result<()> {
        let (cs, ss) = (self.cluster_size(), self.subcluster_size());
        for (s, t) in sub_runs(mask) {
            let (a, b) = ((s * ss) as usize, (t * ss) as usize);
            self.layers[li].write_data(&buf[a..b], host * cs + s * ss)?;
        }
        Ok(())
    }

    /// Into-parent: make `dst` hold what `src` holds at `c`, sub-cluster by sub-cluster.
    fn fold_cluster(&mut self, src: usize, dst: usize, c: u64) -> Result<()> {
        let (cs, ss) = (self.cluster_size(), self.subcluster_size());
        let e = self.entry_of(src, c)?;
        if e.is_empty() {
            return Ok(());
        }
        let mut buf = vec![0u8; cs as usize];
        if e.alloc != 0 {
            self.read_host(src, c, e.host, &mut buf)?;
        }
        if self.layers[dst].header.is_none() {
            // Raw parent: write in place, clipped to the file's length.
            let l = &mut self.layers[dst];
            let raw_len = l.raw_len;
            // One write per run of data sub-clusters, one hole per run of zero ones.
            let clip = |s: u64, t: u64| (c * cs + s * ss, (c * cs + t * ss).min(raw_len));
            for (s, t) in sub_runs(e.alloc) {
                let (start, end) = clip(s, t);
                if start < end {
                    let a = (s * ss) as usize;
                    l.write_data(&buf[a..a + (end - start) as usize], start)?;
                }
            }
            for (s, t) in sub_runs(e.zero & !e.alloc) {
                let (start, end) = clip(s, t);
                if start < end {
                    sys::punch_hole(&l.file, start, end - start)
                        .map_err(DiskError::io(&l.path, "punch hole"))?;
                }
            }
            self.forget(c);
            return Ok(());
        }
        let d = self.entry_of(dst, c)?;
        let mut nd = d;
        if e.alloc != 0 {
            if nd.host == 0 {
                nd.host = self.layers[dst].alloc_cluster()?;
            }
            self.write_subs(dst, nd.host, e.alloc, &buf)?;
            nd.alloc |= e.alloc;
            nd.zero &= !e.alloc;
        }
        if e.zero != 0 {
            nd.alloc &= !e.zero;
            if dst == 0 {
                nd.zero &= !e.zero;
            } else {
                nd.zero |= e.zero;
            }
            if nd.alloc == 0 {
                nd.host = 0;
            }
        }
        if nd != d {
            self.put_entry(dst, c, nd, e.alloc | e.zero)?;
        }
        Ok(())
    }

    /// Into-child: give `dst` what `src` holds at `c` in the sub-clusters `dst` does not hold.
    fn push_cluster(&mut self, src: usize, dst: usize, c: u64) -> Result<()> {
        let ss = self.subcluster_size() as usize;
        let d = self.entry_of(dst, c)?;
        let want = !(d.alloc | d.zero);
        if want == 0 {
            return Ok(());
        }
        let src_is_base = src == 0;
        let mut buf = vec![0u8; self.cluster_size() as usize];
        let (mut data, zero) = if self.layers[src].header.is_none() {
            self.read_host(src, c, 0, &mut buf)?;
            (want, 0)
        } else {
            let e = self.entry_of(src, c)?;
            if want & e.alloc != 0 {
                self.read_host(src, c, e.host, &mut buf)?;
            }
            // With nothing under a base source, what it marks zero reads zero anyway.
            let z = if src_is_base { 0 } else { want & e.zero };
            (want & e.alloc, z)
        };
        if src_is_base {
            for s in sub_bits(data) {
                let a = s as usize * ss;
                if buf[a..a + ss].iter().all(|&b| b == 0) {
                    data &= !(1 << s);
                }
            }
        }
        if data == 0 && zero == 0 {
            return Ok(());
        }
        let mut nd = d;
        if data != 0 {
            if nd.host == 0 {
                nd.host = self.layers[dst].alloc_cluster()?;
            }
            self.write_subs(dst, nd.host, data, &buf)?;
            nd.alloc |= data;
        }
        nd.zero |= zero;
        self.put_entry(dst, c, nd, data | zero)?;
        self.forget(c);
        Ok(())
    }

    fn commit_merge(
        &mut self,
        src: usize,
        dst: usize,
        dir: MergeDirection,
        keep_file: bool,
    ) -> Result<()> {
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
        if gone.header.is_some() && !keep_file {
            std::fs::remove_file(&gone.path)
                .map_err(DiskError::io(&gone.path, "delete merged layer"))?;
            sys::sync_dir(&gone.path)?;
        }
        drop(gone);
        // 4. Files no longer written by this chain go back to shared locks.
        let top = self.layers.len() - 1;
        for (i, l) in self.layers.iter_mut().enumerate() {
            if i != top && l.writable {
                // Flushed above: its unused tail can go.
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
            self.layers[top].make_alloc()?;
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
    fn sub_runs_are_the_runs_of_adjacent_set_bits() {
        let runs = |m: u16| crate::layer::sub_runs(m).collect::<Vec<_>>();
        assert_eq!(runs(0), vec![]);
        assert_eq!(runs(0xffff), vec![(0, 16)]);
        assert_eq!(runs(0b1000_0000_0000_0001), vec![(0, 1), (15, 16)]);
        assert_eq!(runs(0b0111_0011_0000_1110), vec![(1, 4), (8, 10), (12, 15)]);
        for m in 0..=u16::MAX {
            let mut back = 0u16;
            for (s, t) in crate::layer::sub_runs(m) {
                for b in s..t {
                    back |= 1 << b;
                }
            }
            assert_eq!(back, m);
        }
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
