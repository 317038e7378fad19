//! Whole-chain operations: info, map, check (and repair), convert, changed-cluster maps.

use std::collections::HashSet;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};

use serde::Serialize;

use crate::chain::{create_empty, Chain, CreateOptions, OpenOptions, Source};
use crate::error::{error_chain, DiskError, Result};
use crate::file::unique_tmp_path;
use crate::format::{self, Entry, ParentRef};
use crate::layer::{self, read_full, sub_bits, Format, Layer};
use crate::merge::MergeDirection;
use crate::parent::ParentPolicy;

const RO: OpenOptions = OpenOptions {
    read_only: true,
    format: None,
};

/// One file of a chain, as `info` shows it.
#[derive(Debug, Clone, Serialize)]
pub struct LayerInfo {
    /// The file.
    pub path: PathBuf,
    /// Raw or Strata.
    pub format: Format,
    /// Bytes the file occupies on disk (allocated blocks).
    pub disk_usage: u64,
    /// Apparent file length.
    pub file_size: u64,
    /// Layer id (hex), for a Strata layer.
    pub layer_id: Option<String>,
    /// Parent path as recorded.
    pub parent: Option<String>,
    /// Clusters holding data (in at least one sub-cluster) in this layer.
    pub data_clusters: u64,
    /// Clusters with sub-clusters marked zero and none holding data in this layer.
    pub zero_clusters: u64,
    /// Bytes of sub-clusters holding data in this layer.
    pub data_bytes: u64,
    /// Bytes of sub-clusters marked zero in this layer.
    pub zero_bytes: u64,
    /// L2 tables in this layer.
    pub l2_tables: u64,
    /// A merge out of this layer was interrupted.
    pub folding: bool,
}

/// A chain, bottom first.
#[derive(Debug, Clone, Serialize)]
pub struct ChainInfo {
    /// Guest-visible size.
    pub virtual_size: u64,
    /// Cluster size of the layers.
    pub cluster_size: u64,
    /// Sub-cluster size (the copy-on-write unit).
    pub subcluster_size: u64,
    /// Files, base first, top last.
    pub layers: Vec<LayerInfo>,
}

/// Describes the chain whose top is `path`.
pub fn info(path: &Path) -> Result<ChainInfo> {
    info_with(path, &ParentPolicy::default())
}

/// [`info`], with parents also allowed where `parents` says.
pub fn info_with(path: &Path, parents: &ParentPolicy) -> Result<ChainInfo> {
    Chain::open_with(path, RO, parents)?.info()
}

impl Chain {
    /// Describes this chain.
    pub fn info(&self) -> Result<ChainInfo> {
        let mut layers = Vec::new();
        for (i, l) in self.layers.iter().enumerate() {
            let md = l.file.metadata().map_err(DiskError::io(&l.path, "stat"))?;
            let (mut data, mut zero, mut dbytes, mut zbytes) = (0, 0, 0, 0);
            let ss = self.subcluster_size();
            self.layers[i].for_each_entry(&mut |_, e| {
                if e.alloc != 0 {
                    data += 1;
                } else if e.zero != 0 {
                    zero += 1;
                }
                dbytes += u64::from(e.alloc.count_ones()) * ss;
                zbytes += u64::from(e.zero.count_ones()) * ss;
                Ok(())
            })?;
            layers.push(LayerInfo {
                path: l.path.clone(),
                format: l.format(),
                disk_usage: md.blocks() * 512,
                file_size: md.len(),
                layer_id: l.header.as_ref().map(|h| format::id_hex(&h.layer_id)),
                parent: l
                    .header
                    .as_ref()
                    .and_then(|h| h.parent.path().map(str::to_string)),
                data_clusters: data,
                zero_clusters: zero,
                data_bytes: dbytes,
                zero_bytes: zbytes,
                l2_tables: l.l1.len() as u64,
                folding: l
                    .header
                    .as_ref()
                    .is_some_and(|h| h.flags & format::FLAG_FOLDING != 0),
            });
        }
        Ok(ChainInfo {
            virtual_size: self.virtual_size(),
            cluster_size: self.cluster_size(),
            subcluster_size: self.subcluster_size(),
            layers,
        })
    }

    /// Runs with the same source: which layer holds each part of the disk, at sub-cluster
    /// granularity. Costs one step per region (L1 entry) no layer has a table for, and one per
    /// sub-cluster of the regions some layer has a table for.
    pub fn map(&self) -> Result<Vec<MapRange>> {
        let (cs, ss) = (self.cluster_size(), self.subcluster_size());
        let size = self.virtual_size();
        let per = self
            .layers
            .iter()
            .find_map(|l| l.header.as_ref().map(|h| h.l2_entries()))
            .unwrap_or(1 << 12);
        let region = per * cs;
        let mut held = std::collections::BTreeSet::new();
        for l in &self.layers {
            held.extend(l.l1.keys().copied());
        }
        // Below every table: the raw base if the bottom is raw, else nothing.
        let floor = match self.layers.first() {
            Some(l) if l.header.is_none() => (Some(0), MapKind::Data),
            _ => (None, MapKind::Unallocated),
        };
        let mut out: Vec<MapRange> = Vec::new();
        let mut push =
            |offset: u64, length: u64, layer: Option<usize>, kind: MapKind| match out.last_mut() {
                Some(r) if r.layer == layer && r.kind == kind && r.offset + r.length == offset => {
                    r.length += length
                }
                _ => out.push(MapRange {
                    offset,
                    length,
                    layer,
                    file: layer
                        .and_then(|l| self.layer_path(l))
                        .map(Path::to_path_buf),
                    kind,
                }),
            };
        let regions = size.div_ceil(region);
        for r in 0..regions {
            let start = r * region;
            let end = (start + region).min(size);
            if !held.contains(&r) {
                push(start, end - start, floor.0, floor.1);
                continue;
            }
            let mut c = start / cs;
            while c * cs < end {
                let srcs = self.sources(c)?;
                for (s, src) in srcs.iter().enumerate() {
                    let off = c * cs + s as u64 * ss;
                    if off >= end {
                        break;
                    }
                    let (layer, kind) = match *src {
                        Source::None => (None, MapKind::Unallocated),
                        Source::Zero(l) => (Some(l), MapKind::Zero),
                        Source::Data(l, _) | Source::Raw(l) => (Some(l), MapKind::Data),
                    };
                    push(off, ss.min(end - off), layer, kind);
                }
                c += 1;
            }
        }
        Ok(out)
    }

    /// The sub-clusters that differ between layer `older` and layer `newer` of this chain
    /// (both indices, `older < newer`): every sub-cluster some layer above `older` up to
    /// `newer` holds (data or zero), as coalesced byte ranges.
    pub fn changed_clusters(&self, older: usize, newer: usize) -> Result<ChangeMap> {
        if older >= newer || newer >= self.depth() {
            return Err(DiskError::Invalid(format!(
                "changed clusters need an older layer below a newer one (got {older} and {newer})"
            )));
        }
        let ss = self.subcluster_size();
        let size = self.virtual_size();
        let mut ranges: Vec<(u64, u64)> = Vec::new();
        if self.layers[older + 1..=newer]
            .iter()
            .any(|l| l.header.is_none())
        {
            ranges.push((0, size));
        } else {
            // One 16-bit mask per cluster any of those layers holds (not one word per
            // sub-cluster): memory stays a fraction of the tables read.
            let mut masks: std::collections::BTreeMap<u64, u16> = Default::default();
            for li in older + 1..=newer {
                self.layers[li].for_each_entry(&mut |c, e| {
                    *masks.entry(c).or_default() |= e.alloc | e.zero;
                    Ok(())
                })?;
            }
            for sub in masks
                .into_iter()
                .flat_map(|(c, m)| sub_bits(m).map(move |s| c * 16 + s))
            {
                let off = sub * ss;
                if off >= size {
                    continue;
                }
                let len = ss.min(size - off);
                match ranges.last_mut() {
                    Some((o, l)) if *o + *l == off => *l += len,
                    _ => ranges.push((off, len)),
                }
            }
        }
        Ok(ChangeMap {
            cluster_size: ss,
            virtual_size: size,
            changed_bytes: ranges.iter().map(|r| r.1).sum(),
            ranges: ranges
                .into_iter()
                .map(|(offset, length)| ChangedRange { offset, length })
                .collect(),
        })
    }
}

/// What a range of the disk reads from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum MapKind {
    /// Data held by the layer.
    Data,
    /// Marked zero by the layer.
    Zero,
    /// No layer holds it: zeroes.
    Unallocated,
}

/// A run of the disk read from one layer.
#[derive(Debug, Clone, Serialize)]
pub struct MapRange {
    /// Byte offset.
    pub offset: u64,
    /// Bytes.
    pub length: u64,
    /// Layer index (0 = base), if any.
    pub layer: Option<usize>,
    /// That layer's file.
    pub file: Option<PathBuf>,
    /// What it reads as.
    pub kind: MapKind,
}

/// Maps the chain whose top is `path`.
pub fn map(path: &Path) -> Result<Vec<MapRange>> {
    map_with(path, &ParentPolicy::default())
}

/// [`map`], with parents also allowed where `parents` says.
pub fn map_with(path: &Path, parents: &ParentPolicy) -> Result<Vec<MapRange>> {
    Chain::open_with(path, RO, parents)?.map()
}

/// One changed range.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct ChangedRange {
    /// Byte offset.
    pub offset: u64,
    /// Bytes.
    pub length: u64,
}

/// The changed-block map between two layers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ChangeMap {
    /// Granularity: the sub-cluster size.
    pub cluster_size: u64,
    /// Disk size.
    pub virtual_size: u64,
    /// Sum of the range lengths.
    pub changed_bytes: u64,
    /// Changed byte ranges, in order, coalesced.
    pub ranges: Vec<ChangedRange>,
}

/// The clusters changed from layer `older` to layer `newer`, where `older` is in `newer`'s
/// chain (opened read-only).
pub fn changed_clusters(older: &Path, newer: &Path) -> Result<ChangeMap> {
    changed_clusters_with(older, newer, &ParentPolicy::default())
}

/// [`changed_clusters`], with parents also allowed where `parents` says.
pub fn changed_clusters_with(
    older: &Path,
    newer: &Path,
    parents: &ParentPolicy,
) -> Result<ChangeMap> {
    let chain = Chain::open_with(newer, RO, parents)?;
    let o = chain
        .layer_index(older)
        .ok_or_else(|| DiskError::BadChain {
            path: newer.to_path_buf(),
            reason: format!("{} is not in this chain", older.display()),
        })?;
    chain.changed_clusters(o, chain.depth() - 1)
}

/// What `check` found in one file.
#[derive(Debug, Clone, Default, Serialize)]
pub struct FileCheck {
    /// The file.
    pub path: PathBuf,
    /// Corruption (each makes the check fail).
    pub errors: Vec<String>,
    /// Things worth knowing that are not corruption.
    pub warnings: Vec<String>,
    /// Data clusters referenced.
    pub data_clusters: u64,
    /// Clusters in the file no entry references (space that can be reclaimed).
    pub leaked_clusters: u64,
    /// Leaked clusters given back by `--repair`.
    pub repaired_clusters: u64,
}

/// What `check` found in a chain.
#[derive(Debug, Clone, Default, Serialize)]
pub struct CheckReport {
    /// Files from the top down.
    pub files: Vec<FileCheck>,
}

impl CheckReport {
    /// No corruption anywhere (leaks are not corruption).
    pub fn is_clean(&self) -> bool {
        self.files.iter().all(|f| f.errors.is_empty())
    }
}

/// Checks the chain whose top is `path`: every header, every table entry, every parent link,
/// and the clusters no entry references. With `repair`, the top file's leaked clusters are
/// given back (trailing ones truncated, others hole-punched); corruption is never "repaired"
/// by dropping data. A parent outside its child's directory is not followed (a warning says
/// so; [`check_with`] follows it where allowed).
pub fn check(path: &Path, repair: bool) -> Result<CheckReport> {
    check_with(path, repair, &ParentPolicy::default())
}

/// [`check`], with parents also followed where `parents` allows.
pub fn check_with(path: &Path, repair: bool, parents: &ParentPolicy) -> Result<CheckReport> {
    let mut report = CheckReport::default();
    let mut next: Option<(String, Format)> = None;
    let mut child: Option<Layer> = None;
    for depth in 0..crate::chain::MAX_DEPTH {
        let writable = repair && depth == 0;
        let opened = match (&child, &next) {
            (Some(ch), Some((recorded, f))) => Layer::open_parent(&ch.path, recorded, *f, parents)
                .map_err(|e| match e {
                    DiskError::Io { source, path, .. } => DiskError::ParentMissing {
                        path: ch.path.clone(),
                        parent: path,
                        source,
                    },
                    e => e,
                }),
            _ => Layer::open(path, writable, None),
        };
        let shown = match (&child, &next) {
            (Some(ch), Some((recorded, _))) => crate::parent::resolve_parent(&ch.path, recorded),
            _ => path.to_path_buf(),
        };
        let mut fc = FileCheck {
            path: shown,
            ..FileCheck::default()
        };
        let l = match opened {
            Ok(l) => l,
            Err(e @ DiskError::ParentOutside { .. }) => {
                // Not corruption: a file this check was not allowed to open.
                fc.warnings
                    .push(format!("{}; not followed, so not checked", error_chain(&e)));
                report.files.push(fc);
                return Ok(report);
            }
            Err(e) => {
                fc.errors.push(error_chain(&e));
                report.files.push(fc);
                return Ok(report);
            }
        };
        if let Some(ch) = &child {
            if let Err(e) = layer::verify_parent(ch, &l) {
                fc.errors.push(error_chain(&e));
            }
        }
        let Some(h) = l.header.clone() else {
            report.files.push(fc);
            return Ok(report);
        };
        if h.flags & format::FLAG_FOLDING != 0 {
            fc.warnings.push(
                "a merge of this layer into its parent was interrupted; run the merge again".into(),
            );
        }
        scan_table(&l, &h, &mut fc, writable)?;
        report.files.push(fc);
        next = Some(match &h.parent {
            ParentRef::None => return Ok(report),
            ParentRef::Layer { path, .. } => (path.clone(), Format::Strata),
            ParentRef::Raw { path, .. } => (path.clone(), Format::Raw),
        });
        child = Some(l);
    }
    Ok(report)
}

fn scan_table(l: &Layer, h: &format::Header, fc: &mut FileCheck, repair: bool) -> Result<()> {
    let cs = h.cluster_size();
    let per = h.l2_entries();
    let first = h.data_offset / cs;
    let len = l.file_len()?;
    let mut used = HashSet::new();
    let mut bad = 0u64;
    let mut note = |fc: &mut FileCheck, msg: String| {
        bad += 1;
        if bad <= 20 {
            fc.errors.push(format!("{}: {msg}", l.path.display()));
        }
    };
    let place = |used: &mut HashSet<u64>, hc: u64, what: String| -> Option<String> {
        if hc < first {
            Some(format!("{what} points into the metadata (cluster {hc})"))
        } else if hc >= h.alloc_end {
            Some(format!(
                "{what} is at host cluster {hc}, past the allocation mark {}",
                h.alloc_end
            ))
        } else if hc
            .checked_add(1)
            .and_then(|n| n.checked_mul(cs))
            .is_none_or(|end| end > len)
        {
            Some(format!(
                "{what}: host cluster {hc} is beyond the end of the file (truncated)"
            ))
        } else if !used.insert(hc) {
            Some(format!("{what}: host cluster {hc} is used twice"))
        } else {
            None
        }
    };
    let n1 = h.l1_entries();
    // The L1 entries that name a table, read in bounded chunks (holes skipped).
    let mut l1 = Vec::new();
    let walked = layer::for_each_l1_raw(&l.file, &l.path, n1, &mut |i, raw| {
        l1.push((i, raw));
        Ok(())
    });
    if let Err(e) = walked {
        note(fc, error_chain(&e));
    }
    let mut table = vec![0u8; cs as usize];
    for (i, raw) in l1 {
        let host = match format::l1_decode(i, raw) {
            Ok(0) => continue,
            Ok(hc) => hc,
            Err(e) => {
                note(fc, e.to_string());
                continue;
            }
        };
        if let Some(m) = place(&mut used, host, format!("L2 table {i}")) {
            note(fc, m);
            continue;
        }
        // `place` checked that the whole table is inside the file.
        let n =
            read_full(&l.file, &mut table, host * cs).map_err(DiskError::io(&l.path, "read"))?;
        if n < table.len() {
            note(fc, format!("L2 table {i} is truncated"));
            continue;
        }
        for (j, raw) in table.chunks_exact(16).enumerate() {
            let c = i * per + j as u64;
            let mut b = [0u8; 16];
            b.copy_from_slice(raw);
            match Entry::decode(c, &b) {
                Err(e) => note(fc, e.to_string()),
                Ok(e) if e.alloc != 0 => {
                    if c >= h.clusters() {
                        note(fc, format!("virtual cluster {c} is beyond the disk"));
                    } else if let Some(m) = place(&mut used, e.host, format!("virtual cluster {c}"))
                    {
                        note(fc, m);
                    } else {
                        fc.data_clusters += 1;
                    }
                }
                Ok(_) => {}
            }
        }
    }
    if bad > 20 {
        fc.errors.push(format!(
            "{}: ... {} more corrupt entries",
            l.path.display(),
            bad - 20
        ));
    }
    // Every used cluster is in first..end (`place` checked): the leaked ones are the rest,
    // counted and punched as runs between used ones (never one by one up to a huge end).
    let end = len.div_ceil(cs).max(first);
    fc.leaked_clusters = (end - first).saturating_sub(used.len() as u64);
    if repair && fc.errors.is_empty() && fc.leaked_clusters > 0 {
        let mut in_use: Vec<u64> = used.iter().copied().collect();
        in_use.sort_unstable();
        let last_used = in_use.last().map_or(first, |m| m + 1).max(first);
        let mut gap = first;
        for &c in &in_use {
            if c > gap {
                crate::sys::punch_hole(&l.file, gap * cs, (c - gap) * cs)
                    .map_err(DiskError::io(&l.path, "punch hole"))?;
            }
            gap = c + 1;
        }
        l.file
            .set_len(last_used * cs)
            .map_err(DiskError::io(&l.path, "truncate"))?;
        l.file.sync_all().map_err(DiskError::io(&l.path, "fsync"))?;
        if h.alloc_end != last_used {
            // Nothing at or above last_used is referenced: lower the allocation mark.
            let mut h2 = h.clone();
            h2.alloc_end = last_used;
            h2.generation = h2.generation.wrapping_add(1);
            l.file
                .write_all_at(&h2.encode(), 0)
                .map_err(DiskError::io(&l.path, "write header"))?;
            l.file.sync_all().map_err(DiskError::io(&l.path, "fsync"))?;
        }
        fc.repaired_clusters = fc.leaked_clusters;
    }
    Ok(())
}

/// Merges the layer at `layer` of the chain whose top is `top` (the layer itself when `None`),
/// like [`crate::merge()`], with parents also allowed where `parents` says. A merge writes only
/// files of the chain it opened, so it never writes outside the directories `parents` allows.
pub fn merge_with(
    layer: &Path,
    top: Option<&Path>,
    dir: MergeDirection,
    parents: &ParentPolicy,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<()> {
    let top = top.unwrap_or(layer);
    let mut chain = Chain::open_with(top, OpenOptions::default(), parents)?;
    let idx = chain
        .layer_index(layer)
        .ok_or_else(|| DiskError::BadChain {
            path: top.to_path_buf(),
            reason: format!("{} is not in this chain", layer.display()),
        })?;
    chain.merge(idx, dir, progress)?;
    chain.flush()
}

/// Points layer `child`, whose header names `old_parent`, at `new_parent` instead, recording
/// `new_parent`'s identity as it is now; clears `FOLDING`. For a parent that reads exactly as
/// the old one did: after `old_parent` was merged into `new_parent`, each of its children that
/// the merge's own chain did not hold is repointed so before `old_parent` is removed. Returns
/// `false`, changing nothing, when `child` names another parent (already repointed).
/// `policy` must let `child` name both parents.
pub fn repoint_after_merge(
    child: &Path,
    old_parent: &Path,
    new_parent: &Path,
    policy: &ParentPolicy,
) -> Result<bool> {
    let names_old = |h: &format::Header| {
        let Some(recorded) = h.parent.path() else {
            return false;
        };
        let named = crate::parent::resolve_parent(child, recorded);
        match (std::fs::metadata(&named), std::fs::metadata(old_parent)) {
            (Ok(x), Ok(y)) => x.dev() == y.dev() && x.ino() == y.ino(),
            _ => false,
        }
    };
    // A look at the header without a lock first: a child already repointed may be open (and
    // locked) in a running chain, and is left alone.
    let mut buf = [0u8; format::HEADER_SIZE];
    let file = crate::parent::open_regular(child, false)?;
    let n = read_full(&file, &mut buf, 0).map_err(DiskError::io(child, "read header"))?;
    drop(file);
    let peek = format::Header::parse(&buf[..n]).map_err(|source| DiskError::Format {
        path: child.to_path_buf(),
        source,
    })?;
    if !names_old(&peek) {
        return Ok(false);
    }
    let mut layer = Layer::open(child, true, Some(Format::Strata))?;
    let Some(mut h) = layer.header.clone() else {
        return Ok(false);
    };
    if !names_old(&h) {
        return Ok(false);
    }
    let parent = Layer::open(new_parent, false, None)?;
    h.parent = parent.parent_ref_for(child, Some(policy))?;
    h.flags &= !format::FLAG_FOLDING;
    layer.write_header(h)?;
    Ok(true)
}

/// Output format of [`convert`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ConvertFormat {
    /// A sparse raw image.
    Raw,
    /// A single-layer Strata image with no parent.
    Strata,
}

/// Flattens the chain whose top is `src` into a new file `out` (built under a temporary name
/// and renamed into place; an existing `out` is refused). Zero clusters stay sparse.
pub fn convert(
    src: &Path,
    out: &Path,
    fmt: ConvertFormat,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<()> {
    convert_with(src, out, fmt, &ParentPolicy::default(), progress)
}

/// [`convert`], with parents also allowed where `parents` says. The output is built under a
/// temporary name of its own (so neither a crashed nor a concurrent convert gets in the way)
/// and hard-linked into place, never over an existing file.
pub fn convert_with(
    src: &Path,
    out: &Path,
    fmt: ConvertFormat,
    parents: &ParentPolicy,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<()> {
    convert_observed(src, out, fmt, parents, progress, &mut |_, _| {})
}

/// [`convert_with`], with `observe` hearing every range of data written into a raw `out`
/// (offset, bytes), in ascending order; what it does not hear is a hole. (A Strata `out` is
/// not observed.) The export checksums its disk files this way as it writes them.
pub fn convert_observed(
    src: &Path,
    out: &Path,
    fmt: ConvertFormat,
    parents: &ParentPolicy,
    progress: &mut dyn FnMut(u64, u64),
    observe: &mut dyn FnMut(u64, &[u8]),
) -> Result<()> {
    if out.symlink_metadata().is_ok() {
        return Err(DiskError::Exists {
            path: out.to_path_buf(),
        });
    }
    let chain = Chain::open_with(src, RO, parents)?;
    let tmp = unique_tmp_path(out);
    let res = convert_into(&chain, &tmp, fmt, progress, observe).and_then(|()| {
        std::fs::hard_link(&tmp, out).map_err(|e| {
            if e.kind() == std::io::ErrorKind::AlreadyExists {
                DiskError::Exists {
                    path: out.to_path_buf(),
                }
            } else {
                DiskError::io(out, "link into place")(e)
            }
        })?;
        let _ = std::fs::remove_file(&tmp);
        crate::sys::sync_dir(out)
    });
    if res.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    res
}

/// Where convert puts a cluster (`data` empty means: make it durable).
type Sink = dyn FnMut(u64, &[u8]) -> Result<()>;

fn convert_into(
    chain: &Chain,
    tmp: &Path,
    fmt: ConvertFormat,
    progress: &mut dyn FnMut(u64, u64),
    observe: &mut dyn FnMut(u64, &[u8]),
) -> Result<()> {
    let cs = chain.cluster_size();
    let size = chain.virtual_size();
    let mut buf = vec![0u8; 1 << 20];
    let mut sink: Box<Sink> = match fmt {
        ConvertFormat::Raw => {
            let f = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(tmp)
                .map_err(DiskError::io(tmp, "create"))?;
            f.set_len(size).map_err(DiskError::io(tmp, "set length"))?;
            let p = tmp.to_path_buf();
            Box::new(move |off, data: &[u8]| {
                if data.is_empty() {
                    return f.sync_all().map_err(DiskError::io(&p, "fsync"));
                }
                f.write_all_at(data, off)
                    .map_err(DiskError::io(&p, "write"))
            })
        }
        ConvertFormat::Strata => {
            create_empty(
                tmp,
                size,
                CreateOptions {
                    cluster_bits: Some(cs.trailing_zeros()),
                },
            )?;
            let mut out = Chain::open(
                tmp,
                OpenOptions {
                    read_only: false,
                    format: Some(Format::Strata),
                },
            )?;
            Box::new(move |off, data: &[u8]| {
                if data.is_empty() {
                    out.flush()
                } else {
                    out.write_at(off, data)
                }
            })
        }
    };
    let ranges = chain.map()?;
    let held: u64 = ranges
        .iter()
        .filter(|r| r.kind == MapKind::Data)
        .map(|r| r.length)
        .sum();
    let mut done = 0u64;
    for r in ranges.iter().filter(|r| r.kind == MapKind::Data) {
        let mut off = r.offset;
        while off < r.offset + r.length {
            let len = (r.offset + r.length - off).min(buf.len() as u64) as usize;
            chain.read_at(off, &mut buf[..len])?;
            if buf[..len].iter().any(|&b| b != 0) {
                sink(off, &buf[..len])?;
                if fmt == ConvertFormat::Raw {
                    observe(off, &buf[..len]);
                }
            }
            off += len as u64;
            done += len as u64;
            progress(done, held);
        }
    }
    progress(held, held);
    sink(0, &[])
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::chain::create_layer;

    fn read_all(top: &Path) -> Vec<u8> {
        let c = Chain::open(top, OpenOptions::default()).unwrap();
        let mut b = vec![0u8; c.virtual_size() as usize];
        c.read_at(0, &mut b).unwrap();
        b
    }

    #[test]
    fn a_merged_parent_s_other_children_are_repointed_past_it_and_read_the_same() {
        let d = tempfile::tempdir().unwrap();
        let base = d.path().join("base.raw");
        std::fs::write(&base, vec![1u8; 1 << 20]).unwrap();
        // base <- mid <- {top, other}: two children of mid.
        let (mid, top, other) = (
            d.path().join("mid.strata"),
            d.path().join("top.strata"),
            d.path().join("other.strata"),
        );
        create_layer(&base, &mid).unwrap();
        let mut c = Chain::open(&mid, OpenOptions::default()).unwrap();
        c.write_at(4096, &[2u8; 70_000]).unwrap();
        drop(c);
        create_layer(&mid, &top).unwrap();
        create_layer(&mid, &other).unwrap();
        let mut c = Chain::open(&other, OpenOptions::default()).unwrap();
        c.write_at(200_000, &[3u8; 5000]).unwrap();
        drop(c);
        let (want_top, want_other) = (read_all(&top), read_all(&other));
        // mid merges into base through top's chain, which repoints top; other still names mid.
        let mut c = Chain::open(&top, OpenOptions::default()).unwrap();
        c.begin_merge_keeping_file(1, MergeDirection::IntoParent)
            .unwrap();
        while !c.merge_step(4).unwrap().finished {}
        drop(c);
        let policy = ParentPolicy::confined();
        assert!(!repoint_after_merge(&top, &mid, &base, &policy).unwrap());
        assert!(repoint_after_merge(&other, &mid, &base, &policy).unwrap());
        assert!(!repoint_after_merge(&other, &mid, &base, &policy).unwrap());
        std::fs::remove_file(&mid).unwrap();
        assert_eq!(read_all(&top), want_top);
        assert_eq!(read_all(&other), want_other);
        assert_eq!(info(&other).unwrap().layers.len(), 2);
    }

    #[test]
    fn changes_between_layers_are_the_clusters_written_since() {
        let d = tempfile::tempdir().unwrap();
        let a = d.path().join("a.strata");
        create_empty(&a, 1 << 20, CreateOptions::default()).unwrap();
        let b = d.path().join("b.strata");
        create_layer(&a, &b).unwrap();
        let mut c = Chain::open(&b, OpenOptions::default()).unwrap();
        c.write_at(65_536 + 3, &[1]).unwrap();
        c.write_at(3 * 65_536, &[1; 65_537]).unwrap();
        drop(c);
        let m = changed_clusters(&a, &b).unwrap();
        let got: Vec<(u64, u64)> = m.ranges.iter().map(|r| (r.offset, r.length)).collect();
        // Sub-cluster granularity: one 4 KiB sub-cluster, then 17 of them.
        assert_eq!(got, vec![(65_536, 4096), (3 * 65_536, 17 * 4096)]);
    }

    #[test]
    fn convert_to_strata_and_raw_reads_the_same() {
        let d = tempfile::tempdir().unwrap();
        let a = d.path().join("a.strata");
        create_empty(&a, 1 << 20, CreateOptions::default()).unwrap();
        let mut c = Chain::open(&a, OpenOptions::default()).unwrap();
        c.write_at(12_345, &[5; 100_000]).unwrap();
        drop(c);
        let (r, s) = (d.path().join("o.raw"), d.path().join("o.strata"));
        convert(&a, &r, ConvertFormat::Raw, &mut |_, _| {}).unwrap();
        convert(&a, &s, ConvertFormat::Strata, &mut |_, _| {}).unwrap();
        let raw = std::fs::read(&r).unwrap();
        let c = Chain::open(
            &s,
            OpenOptions {
                read_only: true,
                format: None,
            },
        )
        .unwrap();
        let mut b = vec![0u8; 1 << 20];
        c.read_at(0, &mut b).unwrap();
        assert_eq!(raw, b);
        assert_eq!(raw[12_345], 5);
        assert!(convert(&a, &r, ConvertFormat::Raw, &mut |_, _| {}).is_err());
    }

    #[test]
    fn check_reports_leaks_and_repair_gives_them_back() {
        let d = tempfile::tempdir().unwrap();
        let a = d.path().join("a.strata");
        create_empty(&a, 1 << 20, CreateOptions::default()).unwrap();
        let mut c = Chain::open(&a, OpenOptions::default()).unwrap();
        c.write_at(0, &[1; 4096]).unwrap();
        c.flush().unwrap();
        drop(c);
        // Simulate a crash after data was appended but before its table entry was written.
        let f = std::fs::OpenOptions::new().write(true).open(&a).unwrap();
        let len = f.metadata().unwrap().len();
        f.set_len(len + 3 * 65_536).unwrap();
        drop(f);
        let r = check(&a, false).unwrap();
        assert!(r.is_clean());
        assert_eq!(r.files[0].leaked_clusters, 3);
        let r = check(&a, true).unwrap();
        assert_eq!(r.files[0].repaired_clusters, 3);
        assert_eq!(check(&a, false).unwrap().files[0].leaked_clusters, 0);
    }
}
