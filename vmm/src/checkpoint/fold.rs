//! Deleting by merging: after a checkpoint is deleted, the disk layers no checkpoint and no
//! running disk stands on any more ("hidden" layers) are folded away, so chains get shorter and
//! the space comes back, without one byte of any remaining checkpoint's disks, or of what the
//! running guest reads, changing.
//!
//! The layers of one disk form a tree: the launch disk at the root, every checkpoint's and the
//! active chain a path from it (`DiskRecord`: launch, `below`, `layer`). A layer is *hidden*
//! when it is the top of no chain. A hidden layer with one child is folded:
//!
//! - a hidden launch disk takes its only child in (into parent): deleting every checkpoint
//!   leaves the VM's own disk files holding the current content, as Hyper-V's merge does;
//! - a hidden store layer H with child K folds whichever way copies less: H into K (K keeps
//!   what it holds and gains what it read through H), or K into H (H gains what K holds and
//!   takes K's place in the records); the allocated sizes decide.
//!
//! A hidden layer with two or more children stays, shared, until all but one of its children's
//! branches are deleted ([`hidden_layers`] names them for the listing).
//!
//! **Journal.** `fold.json` in the location names the fold before any byte is copied. The
//! disk crate's merge is crash-safe on its own (FORMAT.md, "Merge": every cluster it copies is
//! still overridden, or was read through, until the one header write that switches the
//! chain); it leaves the folded layer's file in place ([`disk::Chain::begin_merge_keeping_file`]).
//! Then every record naming that layer is rewritten ([`Store::edit_disk_records`]), then the file
//! is unlinked, then the journal goes. On start ([`recover`]) a journal whose switch is on disk
//! is finished (records rewritten, file unlinked); one whose switch is not is dropped (the
//! chains read as before; the fold runs again on the next delete). No file a record names is
//! unlinked before the records stop naming it.
//!
//! **Online.** When the running VM's chain of that disk runs through the layers, the merge runs
//! in the device's own chain, a bounded step at a time under the device's lock, so the guest's
//! requests go on between steps and a write into a layer being folded re-queues its cluster
//! (the disk crate's merge); otherwise it runs on a chain of its own.
//!
//! **In the background.** A [`FoldJob`] is advanced one step at a time by the VMM's control
//! loop whenever no call waits (`Machine::fold_step`), so the API answers during a merge and
//! reports its progress. Calls that change checkpoints or the VM's disks finish the folds
//! first; an export holds them back. An online fold whose VM stops or is replaced is undone
//! ([`recover`]) and planned again on what runs next.
//!
//! **Children past the folded layer.** A merge into the parent leaves the folded layer's
//! children naming it; the merge's own chain points its child past it, and finishing points
//! every other one (another branch's layer, or the VM's top when the fold ran on a chain of its
//! own) before the records stop naming the layer and it goes.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use disk::{Chain, MergeDirection, OpenOptions};
use serde::{Deserialize, Serialize};
use snapshot::manifest::{DiskRecord, StorePath};
use snapshot::store::Store;

use super::{allocated, chain_parents, CheckpointError};
use crate::vm::Vm;

/// The journal of a fold in progress, in the checkpoint location.
pub const FOLD_JOURNAL: &str = "fold.json";

/// Clusters a merge step copies with the disks paused (64 KiB clusters: 1 MiB, a few ms).
const STEP_CLUSTERS: u64 = 16;

/// A layer of a disk's tree.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Node {
    /// The launch disk given to `--disk` (the root).
    Launch(PathBuf),
    /// A layer in the store.
    Layer(StorePath),
}

impl Node {
    /// The file.
    pub(crate) fn path(&self, location: &Path) -> PathBuf {
        match self {
            Node::Launch(p) => p.clone(),
            Node::Layer(l) => l.resolve(location),
        }
    }
}

/// The chain of a record, bottom (the launch disk) first.
pub(crate) fn chain_of(r: &DiskRecord) -> Vec<Node> {
    let mut c = vec![Node::Launch(r.launch.clone())];
    c.extend(r.below.iter().rev().cloned().map(Node::Layer));
    c.extend(r.layer.iter().cloned().map(Node::Layer));
    c
}

/// `chain` (bottom first) back into the record's fields.
fn set_chain(r: &mut DiskRecord, chain: &[Node]) {
    let layers: Vec<StorePath> = chain
        .iter()
        .filter_map(|n| match n {
            Node::Layer(l) => Some(l.clone()),
            Node::Launch(_) => None,
        })
        .collect();
    r.layer = layers.last().cloned();
    r.below = layers.iter().rev().skip(1).cloned().collect();
}

/// One fold: layer `from` merges in direction `dir` into `into` and leaves every chain.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Fold {
    /// The disk (`--disk` position).
    pub index: u32,
    /// The layer that goes.
    pub from: Node,
    /// The layer that takes its data (its parent or its only child).
    pub into: Node,
    /// `into-parent` when `into` is `from`'s parent, `into-child` when its child.
    pub dir: MergeDirection,
}

/// Every chain the store keeps: each checkpoint's disks and the active ones. (A manifest's
/// `active_after` is what was active right after it was taken: history once the store record
/// has adopted it, as the store's own clean-up counts it.)
fn all_records(store: &Store) -> Result<Vec<DiskRecord>, CheckpointError> {
    let mut all: Vec<DiskRecord> = Vec::new();
    for m in store.list()? {
        all.extend(m.disks);
    }
    all.extend(store.active().iter().cloned());
    Ok(all)
}

/// The tree of disk `index`: each layer's children, and the tops of chains.
struct Tree {
    children: BTreeMap<Node, BTreeSet<Node>>,
    tops: BTreeSet<Node>,
    nodes: BTreeSet<Node>,
}

fn tree(records: &[DiskRecord], index: u32) -> Tree {
    let mut t = Tree {
        children: BTreeMap::new(),
        tops: BTreeSet::new(),
        nodes: BTreeSet::new(),
    };
    for r in records.iter().filter(|r| r.index == index) {
        let c = chain_of(r);
        for w in c.windows(2) {
            t.children
                .entry(w[0].clone())
                .or_default()
                .insert(w[1].clone());
        }
        t.nodes.extend(c.iter().cloned());
        if let Some(top) = c.last() {
            t.tops.insert(top.clone());
        }
    }
    t
}

/// The hidden layers of every disk that other chains still share (two or more children):
/// kept until only one of their branches is left.
pub fn hidden_layers(store: &Store) -> Result<Vec<(u32, PathBuf, usize)>, CheckpointError> {
    let records = all_records(store)?;
    let indexes: BTreeSet<u32> = records.iter().map(|r| r.index).collect();
    let mut out = Vec::new();
    for i in indexes {
        let t = tree(&records, i);
        for n in &t.nodes {
            let kids = t.children.get(n).map_or(0, BTreeSet::len);
            if !t.tops.contains(n) && kids >= 2 {
                out.push((i, n.path(store.location()), kids));
            }
        }
    }
    Ok(out)
}

/// The next fold the store's records call for, if any.
pub fn next_fold(store: &Store) -> Result<Option<Fold>, CheckpointError> {
    let records = all_records(store)?;
    let indexes: BTreeSet<u32> = records.iter().map(|r| r.index).collect();
    let location = store.location();
    for index in indexes {
        let t = tree(&records, index);
        for n in &t.nodes {
            if t.tops.contains(n) {
                continue;
            }
            let Some(kids) = t.children.get(n) else {
                continue;
            };
            let [child] = kids.iter().collect::<Vec<_>>()[..] else {
                continue;
            };
            let parent_stays = matches!(n, Node::Launch(_))
                || allocated(&n.path(location)) > allocated(&child.path(location));
            let fold = if parent_stays {
                Fold {
                    index,
                    from: child.clone(),
                    into: n.clone(),
                    dir: MergeDirection::IntoParent,
                }
            } else {
                Fold {
                    index,
                    from: n.clone(),
                    into: child.clone(),
                    dir: MergeDirection::IntoChild,
                }
            };
            return Ok(Some(fold));
        }
    }
    Ok(None)
}

/// The chain top a fold opens offline: the child of the two.
fn child_of(f: &Fold) -> &Node {
    match f.dir {
        MergeDirection::IntoParent => &f.from,
        MergeDirection::IntoChild => &f.into,
    }
}

fn write_journal(location: &Path, f: &Fold) -> Result<(), CheckpointError> {
    let path = location.join(FOLD_JOURNAL);
    let bytes = serde_json::to_vec_pretty(f).map_err(|source| snapshot::Error::Encode {
        path: path.clone(),
        source,
    })?;
    snapshot::fsutil::write_atomic(&path, &bytes)?;
    Ok(())
}

fn remove_journal(location: &Path) -> Result<(), CheckpointError> {
    let path = location.join(FOLD_JOURNAL);
    match std::fs::remove_file(&path) {
        Ok(()) => Ok(snapshot::fsutil::sync_dir(location)?),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(snapshot::Error::io(&path, "remove", e).into()),
    }
}

/// After `f.from` was merged into its parent `f.into`: every child of `from` that still names
/// it is pointed at `into` (those the merge's own chain did not hold: other branches' layers,
/// or the VM's top when the fold ran on a chain of its own), before the records stop naming
/// `from` and it goes.
fn repoint_children(store: &Store, f: &Fold) -> Result<(), CheckpointError> {
    let location = store.location();
    let (from, into) = (f.from.path(location), f.into.path(location));
    for r in all_records(store)?.iter().filter(|r| r.index == f.index) {
        let chain = chain_of(r);
        let Some(i) = chain.iter().position(|n| *n == f.from) else {
            continue;
        };
        let Some(child) = chain.get(i + 1) else {
            continue;
        };
        let path = child.path(location);
        disk::ops::repoint_after_merge(&path, &from, &into, &chain_parents(r)).map_err(
            |source| CheckpointError::Fold {
                path: path.clone(),
                source: Box::new(source),
            },
        )?;
    }
    Ok(())
}

/// Points `f.from`'s children past it (a merge into its parent), takes `f.from` out of every
/// record of its disk, then unlinks it (a store layer; a launch disk never goes) and drops
/// the journal.
fn finish(store: &mut Store, f: &Fold) -> Result<(), CheckpointError> {
    if f.dir == MergeDirection::IntoParent {
        repoint_children(store, f)?;
    }
    let location = store.location().to_path_buf();
    store.edit_disk_records(|r| {
        if r.index != f.index {
            return false;
        }
        let chain = chain_of(r);
        if !chain.contains(&f.from) {
            return false;
        }
        let kept: Vec<Node> = chain.into_iter().filter(|n| *n != f.from).collect();
        set_chain(r, &kept);
        true
    })?;
    if let Node::Layer(l) = &f.from {
        let path = l.resolve(&location);
        match std::fs::remove_file(&path) {
            Ok(()) => snapshot::fsutil::sync_dir(&snapshot::fsutil::parent_of(&path))?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(snapshot::Error::io(&path, "remove folded layer", e).into()),
        }
    }
    remove_journal(&location)
}

/// The records of disk `index` whose chains run through `from` past it (so their on-disk
/// chains show whether the merge's switch, or the repointing of `from`'s children, began).
fn records_through<'a>(
    records: &'a [DiskRecord],
    f: &'a Fold,
) -> impl Iterator<Item = &'a DiskRecord> {
    records.iter().filter(|r| r.index == f.index).filter(|r| {
        let c = chain_of(r);
        c.contains(&f.from) && c.last() != Some(&f.from)
    })
}

/// On opening the store: finishes a fold whose switch reached the disk, or drops one whose
/// switch did not (the chains read as before it). Returns what it did, for the log.
pub fn recover(store: &mut Store) -> Result<Option<String>, CheckpointError> {
    let location = store.location().to_path_buf();
    let path = location.join(FOLD_JOURNAL);
    let bytes = match std::fs::read(&path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(snapshot::Error::io(&path, "read", e).into()),
    };
    let Ok(f) = serde_json::from_slice::<Fold>(&bytes) else {
        // A journal that does not parse was never acted on (it is written atomically).
        remove_journal(&location)?;
        return Ok(Some(format!(
            "dropped the unreadable fold journal {}",
            path.display()
        )));
    };
    let from = f.from.path(&location);
    let records = all_records(store)?;
    // Unlinked: only after the records stopped naming it. Else switched once any chain
    // through it no longer runs through it on disk: the merge was complete, and finishing
    // points the rest of its children past it. When `from` is only ever a chain's top, the
    // switch is the records' rewrite itself.
    let mut switched = !from.exists();
    for r in records_through(&records, &f) {
        if switched {
            break;
        }
        let top = r.top(&location);
        let on_disk = disk::ops::info_with(&top, &chain_parents(r)).map_err(|source| {
            CheckpointError::Fold {
                path: top.clone(),
                source: Box::new(source),
            }
        })?;
        switched = !on_disk.layers.iter().any(|l| same_file(&l.path, &from));
    }
    if switched {
        finish(store, &f)?;
        Ok(Some(format!(
            "finished folding {} into {}",
            from.display(),
            f.into.path(&location).display()
        )))
    } else {
        remove_journal(&location)?;
        Ok(Some(format!(
            "undid the interrupted fold of {} (the chains read as before; it runs again on \
             the next delete)",
            from.display()
        )))
    }
}

/// Whether `a` and `b` are one file.
pub(crate) fn same_file(a: &Path, b: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    match (std::fs::metadata(a), std::fs::metadata(b)) {
        (Ok(x), Ok(y)) => x.dev() == y.dev() && x.ino() == y.ino(),
        _ => false,
    }
}

/// What a fold step did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FoldStep {
    /// Copied some more: (done, total) bytes of the merge.
    Copied(u64, u64),
    /// The fold is finished: records rewritten, file unlinked, journal gone.
    Finished,
}

/// A fold under way: its journal written and its merge begun, advanced a bounded step at a
/// time ([`FoldJob::step`]) so that the VMM's control loop can answer calls in between.
#[derive(Debug)]
pub struct FoldJob {
    f: Fold,
    from: PathBuf,
    /// `Some(generation)`: the merge runs in the device chain of that VM (its generation);
    /// `None`: in `chain`, opened for it.
    online: Option<u64>,
    chain: Option<Chain>,
    steps: u64,
}

impl FoldJob {
    /// Writes `f`'s journal and begins its merge: in the running VM's chain of that disk if it
    /// runs through the layers (`vm`: the VM and its generation), else on a chain of its own.
    pub fn begin(
        store: &mut Store,
        vm: Option<(&Vm, u64)>,
        f: Fold,
    ) -> Result<FoldJob, CheckpointError> {
        let location = store.location().to_path_buf();
        let from = f.from.path(&location);
        let records = all_records(store)?;
        let active = store.active().iter().find(|r| r.index == f.index).cloned();
        write_journal(&location, &f)?;
        super::crash_point("fold-journaled");
        // Online when the running disk's chain runs through the layers.
        let online = vm.filter(|_| {
            active
                .as_ref()
                .is_some_and(|a| chain_of(a).contains(&f.from))
        });
        if let Some((vm, generation)) = online {
            let begun = vm
                .virtio_devices()
                .with_disk_chain(f.index, |c| {
                    let i = c
                        .layer_index(&from)
                        .ok_or_else(|| disk::DiskError::BadChain {
                            path: c.top_path().to_path_buf(),
                            reason: format!(
                                "{} is not in the running disk's chain",
                                from.display()
                            ),
                        })?;
                    c.begin_merge_keeping_file(i, f.dir)
                })
                .ok_or_else(|| no_chain(&f))?;
            begun.map_err(fold_err(&from))?;
            return Ok(FoldJob {
                f,
                from,
                online: Some(generation),
                chain: None,
                steps: 0,
            });
        }
        let child = child_of(&f).path(&location);
        // A record whose chain holds both layers, for the folders its parents may be in.
        let holder = records
            .iter()
            .find(|r| r.index == f.index && chain_of(r).contains(child_of(&f)))
            .ok_or_else(|| {
                CheckpointError::Unsupported(format!(
                    "no chain of disk {} runs through {}",
                    f.index,
                    from.display()
                ))
            })?;
        let mut chain = Chain::open_with(&child, OpenOptions::default(), &chain_parents(holder))
            .map_err(fold_err(&child))?;
        let i = chain
            .layer_index(&from)
            .ok_or_else(|| disk::DiskError::BadChain {
                path: child.clone(),
                reason: format!("{} is not in its chain", from.display()),
            })
            .map_err(fold_err(&child))?;
        chain
            .begin_merge_keeping_file(i, f.dir)
            .map_err(fold_err(&from))?;
        Ok(FoldJob {
            f,
            from,
            online: None,
            chain: Some(chain),
            steps: 0,
        })
    }

    /// The fold.
    pub fn fold(&self) -> &Fold {
        &self.f
    }

    /// The generation of the VM in whose device chain the merge runs (`None`: it runs on a
    /// chain of its own).
    pub fn online_generation(&self) -> Option<u64> {
        self.online
    }

    /// Copies one bounded step; the step that copies the last cluster switches the chain and,
    /// still in the same step (online: with the disks still paused), rewrites the records,
    /// unlinks the folded file and drops the journal. `vm` is the running VM and its
    /// generation: an online fold whose VM is gone or replaced fails (the caller undoes it
    /// with [`recover`]).
    pub fn step(
        &mut self,
        store: &mut Store,
        vm: Option<(&Vm, u64)>,
    ) -> Result<FoldStep, CheckpointError> {
        let step = match self.online {
            Some(generation) => {
                let vm = vm.filter(|(_, g)| *g == generation).map(|(vm, _)| vm);
                let vm = vm.ok_or_else(|| {
                    CheckpointError::Unsupported(format!(
                        "the VM whose disk {} was folding {} is gone",
                        self.f.index,
                        self.from.display()
                    ))
                })?;
                self.online_step(store, vm)?
            }
            None => self.offline_step(store)?,
        };
        if step == FoldStep::Finished {
            super::crash_point("fold-finished");
        } else {
            self.steps += 1;
            if self.steps == 2 {
                super::crash_point("fold-copying");
            }
        }
        Ok(step)
    }

    /// A step in the device chain, with the disks paused (the request being served finishes
    /// first), so the step that switches the chain is followed by the records' rewrite before
    /// the guest's next request: when `from` is the top the guest writes, its next write
    /// lands in `into`, which the records must name first. A paused VM's disks stay paused.
    fn online_step(&mut self, store: &mut Store, vm: &Vm) -> Result<FoldStep, CheckpointError> {
        let f = &self.f;
        let devices = vm.virtio_devices();
        let cs = devices
            .with_disk_chain(f.index, |c| c.cluster_size())
            .unwrap_or(1);
        let was_paused = devices.disks_paused();
        devices
            .pause_disks()
            .map_err(|e| CheckpointError::Unsupported(format!("pausing the disks: {e}")))?;
        let step = devices.with_disk_chain(f.index, |c| c.merge_step(STEP_CLUSTERS));
        let outcome = match step {
            None => Err(no_chain(f)),
            Some(Err(e)) => {
                devices.with_disk_chain(f.index, Chain::abort_merge);
                Err(fold_err(&self.from)(e))
            }
            Some(Ok(p)) if p.finished => {
                super::crash_point("fold-switched");
                finish(store, f).map(|()| FoldStep::Finished)
            }
            Some(Ok(p)) => Ok(FoldStep::Copied(p.done * cs, p.total * cs)),
        };
        if !was_paused {
            if let Err(e) = devices.resume_disks() {
                log::error!(
                    "folding {}: the disks cannot run again: {e}",
                    self.from.display()
                );
            }
        }
        outcome
    }

    /// A step on the fold's own chain (no guest waits on it: four times the online step).
    fn offline_step(&mut self, store: &mut Store) -> Result<FoldStep, CheckpointError> {
        let Some(chain) = self.chain.as_mut() else {
            return Err(no_chain(&self.f));
        };
        let p = chain
            .merge_step(STEP_CLUSTERS * 4)
            .map_err(fold_err(&self.from))?;
        if !p.finished {
            let cs = chain.cluster_size();
            return Ok(FoldStep::Copied(p.done * cs, p.total * cs));
        }
        let top = chain.top_path().to_path_buf();
        chain.flush().map_err(fold_err(&top))?;
        // Closed before the records change, so nothing holds the folded file.
        self.chain = None;
        super::crash_point("fold-switched");
        finish(store, &self.f)?;
        Ok(FoldStep::Finished)
    }

    /// Stops the merge where it is (the chains read the same; the journal stays for
    /// [`recover`] to drop).
    pub fn abort(mut self, vm: Option<(&Vm, u64)>) {
        match self.online {
            Some(generation) => {
                if let Some((vm, _)) = vm.filter(|(_, g)| *g == generation) {
                    vm.virtio_devices()
                        .with_disk_chain(self.f.index, Chain::abort_merge);
                }
            }
            None => {
                if let Some(c) = self.chain.as_mut() {
                    c.abort_merge();
                }
            }
        }
    }
}

fn no_chain(f: &Fold) -> CheckpointError {
    CheckpointError::Unsupported(format!("disk {} has no chain", f.index))
}

fn fold_err(path: &Path) -> impl Fn(disk::DiskError) -> CheckpointError {
    let path = path.to_path_buf();
    move |source| CheckpointError::Fold {
        path: path.clone(),
        source: Box::new(source),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(index: u32, layers: &[&str]) -> DiskRecord {
        let mut r = DiskRecord {
            index,
            layer: None,
            below: Vec::new(),
            launch: PathBuf::from("/d/launch.raw"),
        };
        let mut chain = vec![Node::Launch(r.launch.clone())];
        chain.extend(
            layers
                .iter()
                .map(|l| Node::Layer(StorePath::new(format!("layers/{l}")).unwrap())),
        );
        set_chain(&mut r, &chain);
        r
    }

    #[test]
    fn records_round_trip_through_their_chain() {
        let r = rec(0, &["a", "b", "c"]);
        assert_eq!(r.layer.as_ref().unwrap().as_str(), "layers/c");
        assert_eq!(
            r.below.iter().map(StorePath::as_str).collect::<Vec<_>>(),
            ["layers/b", "layers/a"]
        );
        let mut r2 = r.clone();
        set_chain(&mut r2, &chain_of(&r));
        assert_eq!(r, r2);
        let mut launch_only = r.clone();
        set_chain(&mut launch_only, &chain_of(&r)[..1]);
        assert_eq!(launch_only.layer, None);
        assert!(launch_only.below.is_empty());
    }

    #[test]
    fn hidden_layers_with_one_child_fold_and_shared_ones_stay() {
        // Launch ─ a ─ b (checkpoint) ─ c (active)
        //            └ x (checkpoint)
        let records = vec![
            rec(0, &["a", "b"]),
            rec(0, &["a", "b", "c"]),
            rec(0, &["a", "x"]),
        ];
        let t = tree(&records, 0);
        let a = Node::Layer(StorePath::new("layers/a".to_string()).unwrap());
        assert_eq!(t.children[&a].len(), 2);
        assert!(!t.tops.contains(&a));
        // The launch disk is hidden with one child (a): it takes a in.
        let launch = Node::Launch("/d/launch.raw".into());
        assert_eq!(t.children[&launch].len(), 1);
    }
}
