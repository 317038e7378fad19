//! Whole-chain operations: info, map, check (and repair), convert, changed-cluster maps.

use std::collections::HashSet;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};

use serde::Serialize;

use crate::chain::{create_empty, tmp_path, Chain, CreateOptions, OpenOptions, Source};
use crate::error::{error_chain, DiskError, Result};
use crate::format::{self, Entry, ParentRef, ENTRY_SIZE, TABLE_OFFSET};
use crate::layer::{self, decode_trusted, read_full, Format, Layer};

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
    /// Clusters holding data in this layer.
    pub data_clusters: u64,
    /// Clusters marked zero in this layer.
    pub zero_clusters: u64,
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
    /// Files, base first, top last.
    pub layers: Vec<LayerInfo>,
}

/// Describes the chain whose top is `path`.
pub fn info(path: &Path) -> Result<ChainInfo> {
    let chain = Chain::open(
        path,
        OpenOptions {
            read_only: true,
            format: None,
        },
    )?;
    chain.info()
}

impl Chain {
    /// Describes this chain.
    pub fn info(&self) -> Result<ChainInfo> {
        let mut layers = Vec::new();
        for (i, l) in self.layers.iter().enumerate() {
            let md = l.file.metadata().map_err(DiskError::io(&l.path, "stat"))?;
            let (mut data, mut zero) = (0, 0);
            for (c, &v) in self.layer_entries(i)?.iter().enumerate() {
                match decode_trusted(c as u64, v) {
                    Entry::Data(_) => data += 1,
                    Entry::Zero => zero += 1,
                    Entry::Unallocated => {}
                }
            }
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
                folding: l
                    .header
                    .as_ref()
                    .is_some_and(|h| h.flags & format::FLAG_FOLDING != 0),
            });
        }
        Ok(ChainInfo {
            virtual_size: self.virtual_size(),
            cluster_size: self.cluster_size(),
            layers,
        })
    }

    /// Runs of clusters with the same source: which layer holds each part of the disk.
    pub fn map(&self) -> Vec<MapRange> {
        let cs = self.cluster_size();
        let n = self.virtual_size().div_ceil(cs);
        let mut out: Vec<MapRange> = Vec::new();
        for c in 0..n {
            let (layer, kind) = match self.source(c) {
                Source::None => (None, MapKind::Unallocated),
                Source::Zero(l) => (Some(l), MapKind::Zero),
                Source::Data(l, _) | Source::Raw(l) => (Some(l), MapKind::Data),
            };
            let len = cs.min(self.virtual_size() - c * cs);
            match out.last_mut() {
                Some(r) if r.layer == layer && r.kind == kind => r.length += len,
                _ => out.push(MapRange {
                    offset: c * cs,
                    length: len,
                    layer,
                    file: layer
                        .and_then(|l| self.layer_path(l))
                        .map(Path::to_path_buf),
                    kind,
                }),
            }
        }
        out
    }

    /// The clusters that differ between layer `older` and layer `newer` of this chain (both
    /// indices, `older < newer`): every cluster some layer above `older` up to `newer` holds.
    pub fn changed_clusters(&self, older: usize, newer: usize) -> Result<ChangeMap> {
        if older >= newer || newer >= self.depth() {
            return Err(DiskError::Invalid(format!(
                "changed clusters need an older layer below a newer one (got {older} and {newer})"
            )));
        }
        let cs = self.cluster_size();
        let n = self.virtual_size().div_ceil(cs) as usize;
        let mut changed = vec![false; n];
        for li in older + 1..=newer {
            for (c, &v) in self.layer_entries(li)?.iter().enumerate().take(n) {
                if v != 0 {
                    changed[c] = true;
                }
            }
            if self.layers[li].header.is_none() {
                changed.iter_mut().for_each(|x| *x = true);
            }
        }
        let mut ranges: Vec<(u64, u64)> = Vec::new();
        for (c, &ch) in changed.iter().enumerate() {
            if !ch {
                continue;
            }
            let off = c as u64 * cs;
            let len = cs.min(self.virtual_size() - off);
            match ranges.last_mut() {
                Some((o, l)) if *o + *l == off => *l += len,
                _ => ranges.push((off, len)),
            }
        }
        Ok(ChangeMap {
            cluster_size: cs,
            virtual_size: self.virtual_size(),
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
    Ok(Chain::open(
        path,
        OpenOptions {
            read_only: true,
            format: None,
        },
    )?
    .map())
}

/// One changed range.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct ChangedRange {
    /// Byte offset.
    pub offset: u64,
    /// Bytes.
    pub length: u64,
}

/// The changed-cluster map between two layers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ChangeMap {
    /// Granularity.
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
    let chain = Chain::open(
        newer,
        OpenOptions {
            read_only: true,
            format: None,
        },
    )?;
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
/// by dropping data.
pub fn check(path: &Path, repair: bool) -> Result<CheckReport> {
    let mut report = CheckReport::default();
    let mut cur = path.to_path_buf();
    let mut fmt = None;
    let mut child: Option<Layer> = None;
    for depth in 0..crate::chain::MAX_DEPTH {
        let mut fc = FileCheck {
            path: cur.clone(),
            ..FileCheck::default()
        };
        let writable = repair && depth == 0;
        let l = match Layer::open(&cur, writable, fmt) {
            Ok(l) => l,
            Err(e) => {
                if let (Some(ch), DiskError::Io { source, .. }) = (&child, &e) {
                    let e = DiskError::ParentMissing {
                        path: ch.path.clone(),
                        parent: cur.clone(),
                        source: std::io::Error::new(source.kind(), source.to_string()),
                    };
                    fc.errors.push(error_chain(&e));
                } else {
                    fc.errors.push(error_chain(&e));
                }
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
        let (recorded, f) = match &h.parent {
            ParentRef::None => return Ok(report),
            ParentRef::Layer { path, .. } => (path.clone(), Format::Strata),
            ParentRef::Raw { path, .. } => (path.clone(), Format::Raw),
        };
        cur = layer::resolve_parent(&l.path, &recorded);
        fmt = Some(f);
        child = Some(l);
    }
    Ok(report)
}

fn scan_table(l: &Layer, h: &format::Header, fc: &mut FileCheck, repair: bool) -> Result<()> {
    let cs = h.cluster_size();
    let first = h.data_offset / cs;
    let len = l.file_len()?;
    let mut bytes = vec![0u8; h.table_bytes() as usize];
    let n = read_full(&l.file, &mut bytes, TABLE_OFFSET).map_err(DiskError::io(&l.path, "read"))?;
    if n < bytes.len() {
        fc.errors.push(format!(
            "{}: allocation table is truncated",
            l.path.display()
        ));
    }
    let mut used = HashSet::new();
    let mut bad = 0u64;
    let mut note = |fc: &mut FileCheck, msg: String| {
        bad += 1;
        if bad <= 20 {
            fc.errors.push(format!("{}: {msg}", l.path.display()));
        }
    };
    for (i, c) in bytes[..n - n % 8]
        .chunks_exact(ENTRY_SIZE as usize)
        .enumerate()
    {
        let mut a = [0u8; 8];
        a.copy_from_slice(c);
        match Entry::decode(i as u64, u64::from_le_bytes(a)) {
            Err(e) => note(fc, e.to_string()),
            Ok(Entry::Data(hc)) => {
                if hc < first {
                    note(
                        fc,
                        format!("entry {i} points into the metadata (cluster {hc})"),
                    );
                } else if (hc + 1) * cs > len {
                    note(fc, format!("entry {i}: data cluster {hc} is beyond the end of the file (truncated)"));
                } else if !used.insert(hc) {
                    note(fc, format!("entry {i}: host cluster {hc} is used twice"));
                } else {
                    fc.data_clusters += 1;
                }
            }
            Ok(_) => {}
        }
    }
    if bad > 20 {
        fc.errors.push(format!(
            "{}: ... {} more corrupt entries",
            l.path.display(),
            bad - 20
        ));
    }
    let end = len.div_ceil(cs);
    let leaked: Vec<u64> = (first..end).filter(|c| !used.contains(c)).collect();
    fc.leaked_clusters = leaked.len() as u64;
    if repair && fc.errors.is_empty() && !leaked.is_empty() {
        let last_used = used
            .iter()
            .copied()
            .max()
            .map_or(first, |m| m + 1)
            .max(first);
        for &c in leaked.iter().filter(|&&c| c < last_used) {
            crate::sys::punch_hole(&l.file, c * cs, cs)
                .map_err(DiskError::io(&l.path, "punch hole"))?;
        }
        l.file
            .set_len(last_used * cs)
            .map_err(DiskError::io(&l.path, "truncate"))?;
        l.file.sync_all().map_err(DiskError::io(&l.path, "fsync"))?;
        fc.repaired_clusters = fc.leaked_clusters;
    }
    Ok(())
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
    if out.exists() {
        return Err(DiskError::Exists {
            path: out.to_path_buf(),
        });
    }
    let chain = Chain::open(
        src,
        OpenOptions {
            read_only: true,
            format: None,
        },
    )?;
    let tmp = tmp_path(out);
    let _ = std::fs::remove_file(&tmp);
    let res = convert_into(&chain, &tmp, fmt, progress).and_then(|()| {
        std::fs::rename(&tmp, out).map_err(DiskError::io(out, "rename into place"))?;
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
) -> Result<()> {
    let cs = chain.cluster_size();
    let size = chain.virtual_size();
    let n = size.div_ceil(cs);
    let mut buf = vec![0u8; cs as usize];
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
    for c in 0..n {
        if matches!(chain.source(c), Source::Data(..) | Source::Raw(_)) {
            let len = cs.min(size - c * cs) as usize;
            chain.read_cluster(c, &mut buf[..len])?;
            if buf[..len].iter().any(|&b| b != 0) {
                sink(c * cs, &buf[..len])?;
            }
        }
        if c % 64 == 0 || c + 1 == n {
            progress(c + 1, n);
        }
    }
    sink(0, &[])
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::chain::create_layer;

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
        assert_eq!(got, vec![(65_536, 65_536), (3 * 65_536, 2 * 65_536)]);
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
