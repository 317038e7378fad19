//! The checkpoint store over a VM's checkpoint location (`--state-dir`).
//!
//! Layout (see `FORMAT.md`):
//!
//! ```text
//! <location>/
//!   lock                  held (flock) by the process that has the store open
//!   store.json            the record: last adopted sequence, current checkpoint, active layers
//!   layers/               every disk layer the store made (active ones and frozen ones)
//!   <id>/                 one folder per checkpoint: manifest.json [, state, memory]
//!   .tmp-<id>/            a checkpoint being made; removed on open if left over
//! ```
//!
//! A checkpoint appears by one rename of its finished temporary folder (`.tmp-<id>` → `<id>`)
//! after everything in it is fsynced; the location is then fsynced (the commit). Only after
//! that is `store.json` rewritten (temp + fsync + rename) to name it current and its new
//! active layers. On open, a checkpoint whose `sequence` is above the one `store.json` records
//! is adopted (roll forward): it was committed but the record did not follow.

use std::collections::{BTreeMap, BTreeSet};
use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::{Error, IoContext, Result};
use crate::fsutil;
use crate::manifest::{
    valid_id, CheckpointType, Consistency, DiskRecord, Manifest, Sizes, StorePath, Timestamp,
    MANIFEST_FILE, MANIFEST_VERSION, MEMORY_FILE, STATE_FILE,
};
use crate::memory::{
    write_memory, GuestRegion, MemoryFile, MemoryRecord, WriteOptions, WriteStats,
};
use crate::state::{self, FileDigest, DEFAULT_STATE_CAP};

/// The store record's file name.
pub const STORE_FILE: &str = "store.json";
/// The lock file's name.
pub const LOCK_FILE: &str = "lock";
/// The folder of disk layers.
pub const LAYERS_DIR: &str = "layers";
/// Prefix of a checkpoint's temporary folder.
pub const TMP_PREFIX: &str = ".tmp-";
/// The store record's format version.
pub const STORE_VERSION: u32 = 1;

/// `store.json`: which checkpoint is current and which layers the VM writes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StoreRecord {
    /// [`STORE_VERSION`].
    pub format_version: u32,
    /// The `sequence` of the last checkpoint this record adopted (0: none yet).
    pub sequence: u64,
    /// The checkpoint the VM runs from (the parent of the next one), if any.
    pub current: Option<String>,
    /// Per disk, the layer the VM writes; empty while the VM runs on its launch disks.
    pub active: Vec<DiskRecord>,
}

impl Default for StoreRecord {
    fn default() -> Self {
        StoreRecord {
            format_version: STORE_VERSION,
            sequence: 0,
            current: None,
            active: Vec::new(),
        }
    }
}

impl StoreRecord {
    fn load(path: &Path) -> Result<Option<StoreRecord>> {
        let bytes = match std::fs::read(path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(Error::io(path, "read", e)),
        };
        let value: serde_json::Value =
            serde_json::from_slice(&bytes).map_err(|source| Error::Decode {
                path: path.into(),
                source,
            })?;
        match value
            .get("format_version")
            .and_then(serde_json::Value::as_u64)
        {
            Some(v) if v == u64::from(STORE_VERSION) => {}
            Some(v) => {
                return Err(Error::UnsupportedVersion {
                    path: path.into(),
                    found: v,
                    supported: STORE_VERSION.into(),
                })
            }
            None => {
                return Err(Error::invalid(
                    path,
                    "no format_version: not a Strata store",
                ))
            }
        }
        let r: StoreRecord = serde_json::from_value(value).map_err(|source| Error::Decode {
            path: path.into(),
            source,
        })?;
        if let Some(c) = &r.current {
            if !valid_id(c) {
                return Err(Error::invalid(
                    path,
                    format!("invalid current checkpoint {c:?}"),
                ));
            }
        }
        Ok(Some(r))
    }

    fn save(&self, path: &Path) -> Result<()> {
        let bytes = serde_json::to_vec_pretty(self).map_err(|source| Error::Encode {
            path: path.into(),
            source,
        })?;
        fsutil::write_atomic(path, &bytes)
    }
}

/// What [`Store::open`] found and repaired, for the tool to say on start.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct OpenReport {
    /// Temporary folders of checkpoints that were never committed, removed.
    pub removed_temp: Vec<PathBuf>,
    /// The checkpoint that was committed but not yet recorded, now adopted as current.
    pub rolled_forward: Option<String>,
    /// Layer files no checkpoint and no active set refers to (from an interrupted create or
    /// apply), removed.
    pub removed_layers: Vec<PathBuf>,
    /// Manifests that could not be read (the message names the file); `check` says more.
    pub unreadable: Vec<String>,
}

impl OpenReport {
    /// Whether open found nothing to repair or report.
    pub fn is_clean(&self) -> bool {
        *self == OpenReport::default()
    }
}

/// A checkpoint in the tree with its children (in commit order).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TreeNode {
    /// The checkpoint.
    pub manifest: Manifest,
    /// Whether it is the store's current checkpoint.
    pub current: bool,
    /// Checkpoints taken from it.
    pub children: Vec<TreeNode>,
}

/// What a committed checkpoint holds besides what the store fills in (id, name, parent,
/// sequence, created).
#[derive(Debug, Clone)]
pub struct CommitInfo {
    /// The type taken.
    pub kind: CheckpointType,
    /// Its consistency.
    pub consistency: Consistency,
    /// Per disk, the top of the chain this checkpoint freezes.
    pub disks: Vec<DiskRecord>,
    /// Per disk, the new active layer (already created and fsynced by the caller).
    pub active_after: Vec<DiskRecord>,
    /// The state file written with [`PendingCheckpoint::write_state_bytes`] (standard).
    pub state: Option<FileDigest>,
    /// The memory file written with [`PendingCheckpoint::write_memory`] (standard).
    pub memory: Option<MemoryRecord>,
    /// The allocated size of the frozen layers, for display.
    pub disk_layers_size: u64,
    /// How long the guest was paused, in microseconds.
    pub paused_us: Option<u64>,
    /// How long the guest's filesystems were frozen (production), in microseconds.
    pub frozen_us: Option<u64>,
    /// The agent's freeze reply (production).
    pub agent_freeze: Option<serde_json::Map<String, serde_json::Value>>,
    /// Why a standard checkpoint was taken where a production one was asked for.
    pub fallback_reason: Option<String>,
}

/// A checkpoint being made in its temporary folder. Dropped without [`Store::commit`], its
/// folder is removed.
#[derive(Debug)]
pub struct PendingCheckpoint {
    id: String,
    name: String,
    dir: PathBuf,
    done: bool,
}

impl PendingCheckpoint {
    /// The id the checkpoint will have.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The temporary folder.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Writes the state file (fsynced) into the temporary folder.
    pub fn write_state_bytes(&self, payload: &[u8]) -> Result<FileDigest> {
        state::write_state_bytes(&self.dir.join(STATE_FILE), payload)
    }

    /// Encodes `value` as JSON and writes it as the state file.
    pub fn write_state<T: Serialize>(&self, value: &T) -> Result<FileDigest> {
        state::write_state(&self.dir.join(STATE_FILE), value)
    }

    /// Writes the memory file into the temporary folder; it is always fsynced (the commit
    /// needs it durable), `opts.incremental` is refused.
    pub fn write_memory(
        &self,
        regions: &[GuestRegion<'_>],
        opts: WriteOptions,
    ) -> Result<(MemoryRecord, WriteStats)> {
        if opts.incremental {
            return Err(Error::BadArgument(
                "a new checkpoint's memory file is written in full".into(),
            ));
        }
        let opts = WriteOptions { sync: true, ..opts };
        write_memory(&self.dir.join(MEMORY_FILE), regions, opts)
    }

    /// Gives up: removes the temporary folder.
    pub fn abort(mut self) -> Result<()> {
        self.done = true;
        std::fs::remove_dir_all(&self.dir).at(&self.dir, "remove")
    }
}

impl Drop for PendingCheckpoint {
    fn drop(&mut self) {
        if !self.done {
            // Best effort: a leftover is removed on the next open anyway.
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

/// One problem [`Store::check`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// The file or folder concerned.
    pub path: PathBuf,
    /// What is wrong (a full sentence that names the file).
    pub message: String,
}

impl std::fmt::Display for Problem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

/// The result of [`Store::check`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CheckReport {
    /// Checkpoints whose manifest loaded.
    pub checkpoints: usize,
    /// Everything wrong.
    pub problems: Vec<Problem>,
}

impl CheckReport {
    /// Whether nothing is wrong.
    pub fn is_clean(&self) -> bool {
        self.problems.is_empty()
    }

    fn add(&mut self, path: impl Into<PathBuf>, message: impl Into<String>) {
        self.problems.push(Problem {
            path: path.into(),
            message: message.into(),
        });
    }

    fn add_error(&mut self, path: &Path, e: &Error) {
        self.add(path, e.to_string());
    }
}

/// An open checkpoint store. Holds the location's lock until dropped.
#[derive(Debug)]
pub struct Store {
    location: PathBuf,
    record: StoreRecord,
    report: OpenReport,
    /// A record being made durable on another thread ([`Store::set_current_deferred`]).
    pending: Option<std::thread::JoinHandle<Result<()>>>,
    _lock: File,
}

impl Drop for Store {
    /// Waits for a record being made durable (the process may be about to exit).
    fn drop(&mut self) {
        if let Err(e) = self.settle() {
            eprintln!("strata: {e}");
        }
    }
}

impl Store {
    /// Opens (creating if needed) the store at `location`: takes its lock, removes leftover
    /// temporary folders, adopts a committed checkpoint the record does not know yet, and
    /// removes layer files nothing refers to. [`Store::opened`] says what was done.
    pub fn open(location: &Path) -> Result<Store> {
        if let Err(reason) = usable_location(location) {
            return Err(Error::invalid(location, reason));
        }
        std::fs::create_dir_all(location).at(location, "create folder")?;
        let lock_path = location.join(LOCK_FILE);
        let lock = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&lock_path)
            .at(&lock_path, "open")?;
        // SAFETY: flock on a descriptor we own; it only takes an advisory lock.
        if unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
            let e = std::io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::EWOULDBLOCK) {
                return Err(Error::Locked { path: lock_path });
            }
            return Err(Error::io(&lock_path, "lock", e));
        }
        let layers = location.join(LAYERS_DIR);
        std::fs::create_dir_all(&layers).at(&layers, "create folder")?;
        let record_path = location.join(STORE_FILE);
        let record = StoreRecord::load(&record_path)?.unwrap_or_default();
        let mut store = Store {
            location: location.to_path_buf(),
            record,
            report: OpenReport::default(),
            pending: None,
            _lock: lock,
        };
        store.recover()?;
        Ok(store)
    }

    fn recover(&mut self) -> Result<()> {
        let mut report = OpenReport::default();
        // 1. Uncommitted checkpoints.
        let mut changed = false;
        for entry in std::fs::read_dir(&self.location).at(&self.location, "list")? {
            let entry = entry.at(&self.location, "list")?;
            let name = entry.file_name();
            let name = name.to_string_lossy();
            let path = entry.path();
            if name.starts_with(TMP_PREFIX) {
                if path.is_dir() {
                    std::fs::remove_dir_all(&path).at(&path, "remove")?;
                } else {
                    std::fs::remove_file(&path).at(&path, "remove")?;
                }
                report.removed_temp.push(path);
                changed = true;
            } else if name == format!("{STORE_FILE}.tmp") {
                std::fs::remove_file(&path).at(&path, "remove")?;
                changed = true;
            }
        }
        if changed {
            fsutil::sync_dir(&self.location)?;
        }
        // 2. Roll forward: the committed checkpoint with the highest sequence above the record's.
        let (manifests, unreadable) = self.scan();
        report.unreadable = unreadable;
        if let Some(m) = manifests
            .iter()
            .filter(|m| m.sequence > self.record.sequence)
            .max_by_key(|m| m.sequence)
        {
            self.record = StoreRecord {
                format_version: STORE_VERSION,
                sequence: m.sequence,
                current: Some(m.id.clone()),
                active: m.active_after.clone(),
            };
            self.record.save(&self.location.join(STORE_FILE))?;
            report.rolled_forward = Some(m.id.clone());
        }
        // 3. Orphan layers, only when every manifest could be read (one we cannot read might
        //    refer to a layer).
        if report.unreadable.is_empty() {
            report.removed_layers = self.remove_layers_not_in(&manifests)?;
        }
        self.report = report;
        Ok(())
    }

    /// Removes the layer files that no checkpoint's disks and no active chain need (the active
    /// layers a checkpoint recorded count only until the store record adopts them, which it
    /// has once they are no longer newer than the record). An apply calls it once its new
    /// active layers are recorded: the layers of the state it discarded go. Does nothing
    /// when a manifest cannot be read (it might refer to a layer). Returns what was removed.
    pub fn remove_unused_layers(&mut self) -> Result<Vec<PathBuf>> {
        self.settle()?;
        let (manifests, unreadable) = self.scan();
        if !unreadable.is_empty() {
            return Ok(Vec::new());
        }
        self.remove_layers_not_in(&manifests)
    }

    fn remove_layers_not_in(&self, manifests: &[Manifest]) -> Result<Vec<PathBuf>> {
        let mut used = BTreeSet::new();
        let pending = manifests
            .iter()
            .filter(|m| m.sequence > self.record.sequence)
            .flat_map(|m| &m.active_after);
        for d in manifests
            .iter()
            .flat_map(|m| &m.disks)
            .chain(pending)
            .chain(&self.record.active)
        {
            for l in d.store_layers() {
                used.insert(l.resolve(&self.location));
            }
        }
        let layers = self.location.join(LAYERS_DIR);
        let mut removed = Vec::new();
        for entry in std::fs::read_dir(&layers).at(&layers, "list")? {
            let path = entry.at(&layers, "list")?.path();
            if path.is_file() && !used.contains(&path) {
                std::fs::remove_file(&path).at(&path, "remove")?;
                removed.push(path);
            }
        }
        if !removed.is_empty() {
            fsutil::sync_dir(&layers)?;
        }
        Ok(removed)
    }

    /// Every checkpoint folder's manifest that loads, and the errors of those that do not.
    fn scan(&self) -> (Vec<Manifest>, Vec<String>) {
        let mut ok = Vec::new();
        let mut bad = Vec::new();
        let entries = match std::fs::read_dir(&self.location) {
            Ok(e) => e,
            Err(e) => {
                bad.push(Error::io(&self.location, "list", e).to_string());
                return (ok, bad);
            }
        };
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            let path = entry.path();
            if !valid_id(&name) || !path.is_dir() {
                continue;
            }
            let mpath = path.join(MANIFEST_FILE);
            match Manifest::load(&mpath) {
                Ok(m) if m.id == name => ok.push(m),
                Ok(m) => bad.push(format!(
                    "{}: id {:?} differs from its folder's name",
                    mpath.display(),
                    m.id
                )),
                Err(e) => bad.push(e.to_string()),
            }
        }
        ok.sort_by_key(|m| m.sequence);
        (ok, bad)
    }

    /// The location.
    pub fn location(&self) -> &Path {
        &self.location
    }

    /// What open found and repaired.
    pub fn opened(&self) -> &OpenReport {
        &self.report
    }

    /// The record: current checkpoint and active layers.
    pub fn record(&self) -> &StoreRecord {
        &self.record
    }

    /// The current checkpoint's id.
    pub fn current(&self) -> Option<&str> {
        self.record.current.as_deref()
    }

    /// The layers the VM writes (empty: its launch disks).
    pub fn active(&self) -> &[DiskRecord] {
        &self.record.active
    }

    /// The folder of checkpoint `id`.
    pub fn checkpoint_dir(&self, id: &str) -> PathBuf {
        self.location.join(id)
    }

    /// A fresh layer path for disk `index` made at checkpoint `id` (`layers/disk<N>-<id>.strata`).
    pub fn new_layer_path(&self, index: u32, id: &str) -> Result<StorePath> {
        StorePath::new(format!("{LAYERS_DIR}/disk{index}-{id}.strata")).map_err(Error::BadArgument)
    }

    /// Every checkpoint, in commit order. A manifest that does not load is an error naming it.
    pub fn list(&self) -> Result<Vec<Manifest>> {
        let (ok, bad) = self.scan();
        if let Some(first) = bad.into_iter().next() {
            return Err(Error::invalid(&self.location, first));
        }
        Ok(ok)
    }

    /// Checkpoint `id`.
    pub fn get(&self, id: &str) -> Result<Manifest> {
        if !valid_id(id) || !self.checkpoint_dir(id).is_dir() {
            return Err(Error::NotFound {
                location: self.location.clone(),
                id: id.into(),
            });
        }
        let path = self.checkpoint_dir(id).join(MANIFEST_FILE);
        let m = Manifest::load(&path)?;
        if m.id != id {
            return Err(Error::invalid(
                path,
                format!("id {:?} differs from its folder's name", m.id),
            ));
        }
        Ok(m)
    }

    /// The checkpoints as a tree (roots: no parent, or a parent that is gone).
    pub fn tree(&self) -> Result<Vec<TreeNode>> {
        let all = self.list()?;
        if let Some(id) = find_cycle(&all) {
            return Err(Error::invalid(
                &self.location,
                format!("checkpoint parent links form a cycle through {id}"),
            ));
        }
        let ids: BTreeSet<&str> = all.iter().map(|m| m.id.as_str()).collect();
        let mut children: BTreeMap<Option<String>, Vec<Manifest>> = BTreeMap::new();
        for m in &all {
            let key = m.parent.clone().filter(|p| ids.contains(p.as_str()));
            children.entry(key).or_default().push(m.clone());
        }
        fn build(
            parent: Option<String>,
            children: &mut BTreeMap<Option<String>, Vec<Manifest>>,
            current: Option<&str>,
        ) -> Vec<TreeNode> {
            let kids = children.remove(&parent).unwrap_or_default();
            kids.into_iter()
                .map(|m| {
                    let sub = build(Some(m.id.clone()), children, current);
                    TreeNode {
                        current: current == Some(m.id.as_str()),
                        manifest: m,
                        children: sub,
                    }
                })
                .collect()
        }
        Ok(build(None, &mut children, self.current()))
    }

    /// Records `current` as the current checkpoint and `active` as the layers the VM writes
    /// (as applying a checkpoint does, once its new layers exist and are fsynced), atomically.
    pub fn set_current(&mut self, current: Option<&str>, active: Vec<DiskRecord>) -> Result<()> {
        self.settle()?;
        let record = self.next_record(current, active)?;
        fsutil::sync_dir(&self.location.join(LAYERS_DIR))?;
        record.save(&self.location.join(STORE_FILE))?;
        self.record = record;
        Ok(())
    }

    /// [`Store::set_current`] off the caller's thread, for new active layers `created` that
    /// are not yet durable (`disk::create_layer_unsynced`): another thread syncs each of them,
    /// the layers folder, then writes the record, and calls `done` with the outcome. The
    /// record is this store's at once (what [`Store::active`] and the listings show); every
    /// later change of the store waits for the write first ([`Store::settle`]), so records
    /// reach the disk in order.
    ///
    /// The caller must not let anything depend on the new layers being recorded (a guest
    /// must not see a write to them complete) before `done` says so: until then a crash
    /// leaves the previous record, and the new layers are unreferenced files the next
    /// [`Store::open`] removes.
    pub fn set_current_deferred(
        &mut self,
        current: Option<&str>,
        active: Vec<DiskRecord>,
        created: Vec<PathBuf>,
        done: impl FnOnce(&Result<()>) + Send + 'static,
    ) -> Result<()> {
        self.settle()?;
        let record = self.next_record(current, active)?;
        let path = self.location.join(STORE_FILE);
        let layers = self.location.join(LAYERS_DIR);
        let to_write = record.clone();
        let job = move || {
            let result = (|| {
                for f in &created {
                    File::open(f).at(f, "open")?.sync_all().at(f, "fsync")?;
                }
                fsutil::sync_dir(&layers)?;
                to_write.save(&path)
            })();
            done(&result);
            result
        };
        let handle = std::thread::Builder::new()
            .name("store-record".into())
            .spawn(job)
            .at(
                &self.location,
                "start the thread that writes the store record",
            )?;
        self.pending = Some(handle);
        self.record = record;
        Ok(())
    }

    /// Waits for a record being made durable by [`Store::set_current_deferred`]. If writing
    /// it failed, the store takes back the record on disk and the error says why.
    pub fn settle(&mut self) -> Result<()> {
        let Some(job) = self.pending.take() else {
            return Ok(());
        };
        let path = self.location.join(STORE_FILE);
        let result = job.join().unwrap_or_else(|_| {
            Err(Error::invalid(
                &path,
                "the thread writing the store record panicked",
            ))
        });
        if result.is_err() {
            if let Ok(Some(on_disk)) = StoreRecord::load(&path) {
                self.record = on_disk;
            }
        }
        result
    }

    /// The record with `current` and `active`, checked against the store.
    fn next_record(&self, current: Option<&str>, active: Vec<DiskRecord>) -> Result<StoreRecord> {
        let path = self.location.join(STORE_FILE);
        if let Some(c) = current {
            self.get(c)?;
        }
        for d in &active {
            if let Some(l) = &d.layer {
                let p = l.resolve(&self.location);
                if !p.is_file() {
                    return Err(Error::invalid(
                        &path,
                        format!("active layer {} does not exist", p.display()),
                    ));
                }
            }
        }
        Ok(StoreRecord {
            format_version: STORE_VERSION,
            sequence: self.record.sequence,
            current: current.map(Into::into),
            active,
        })
    }

    /// Starts a checkpoint named `name`: a new id and its temporary folder.
    pub fn begin(&self, name: &str) -> Result<PendingCheckpoint> {
        for _ in 0..16 {
            let id = new_id();
            if self.checkpoint_dir(&id).exists() {
                continue;
            }
            let dir = self.location.join(format!("{TMP_PREFIX}{id}"));
            std::fs::create_dir(&dir).at(&dir, "create folder")?;
            return Ok(PendingCheckpoint {
                id,
                name: name.into(),
                dir,
                done: false,
            });
        }
        Err(Error::invalid(
            &self.location,
            "cannot find a free checkpoint id",
        ))
    }

    /// Commits `pending`: writes its manifest, renames its folder into place (the commit
    /// point), then records it as current with its new active layers. The checkpoint's parent
    /// is the current checkpoint.
    pub fn commit(&mut self, pending: PendingCheckpoint, info: CommitInfo) -> Result<Manifest> {
        let m = self.commit_folder(pending, info)?;
        self.adopt(&m)?;
        Ok(m)
    }

    /// The commit up to the rename (the store record is not updated): a crash right after it
    /// is what [`Store::open`] rolls forward.
    pub fn commit_folder(
        &mut self,
        mut pending: PendingCheckpoint,
        info: CommitInfo,
    ) -> Result<Manifest> {
        self.settle()?;
        let mpath = pending.dir.join(MANIFEST_FILE);
        for d in info.disks.iter().chain(&info.active_after) {
            if let Some(l) = &d.layer {
                let p = l.resolve(&self.location);
                if !p.is_file() {
                    return Err(Error::invalid(
                        &mpath,
                        format!("disk layer {} does not exist", p.display()),
                    ));
                }
            }
        }
        let sequence = self.record.sequence + 1;
        let m = Manifest {
            format_version: MANIFEST_VERSION,
            id: pending.id.clone(),
            name: pending.name.clone(),
            parent: self.record.current.clone(),
            sequence,
            kind: info.kind,
            consistency: info.consistency,
            created: Timestamp::now(),
            sizes: Sizes {
                state: info.state.map_or(0, |s| s.size),
                memory: info.memory.as_ref().map_or(0, |m| m.allocated),
                disk_layers: info.disk_layers_size,
            },
            paused_us: info.paused_us,
            frozen_us: info.frozen_us,
            agent_freeze: info.agent_freeze,
            fallback_reason: info.fallback_reason,
            export: None,
            disks: info.disks,
            active_after: info.active_after,
            state: info.state,
            memory: info.memory,
        };
        // The new layers' directory entries must be durable before the commit that names them.
        fsutil::sync_dir(&self.location.join(LAYERS_DIR))?;
        // Writes manifest.json (fsynced) and fsyncs the temporary folder; the state and memory
        // files were fsynced when written.
        m.save(&mpath)?;
        let dest = self.checkpoint_dir(&m.id);
        std::fs::rename(&pending.dir, &dest).at(&dest, "commit (rename)")?;
        pending.done = true;
        fsutil::sync_dir(&self.location)?;
        Ok(m)
    }

    /// Records `m` as current with its active layers (store.json, atomically): the second half
    /// of [`Store::commit`] after [`Store::commit_folder`].
    pub fn adopt(&mut self, m: &Manifest) -> Result<()> {
        self.settle()?;
        let record = StoreRecord {
            format_version: STORE_VERSION,
            sequence: m.sequence,
            current: Some(m.id.clone()),
            active: m.active_after.clone(),
        };
        record.save(&self.location.join(STORE_FILE))?;
        self.record = record;
        Ok(())
    }

    /// Deletes checkpoint `id`: its folder (manifest, state and memory files) goes, and so do
    /// its disk layers that no other record needs any more. Its children are re-parented to
    /// its parent, so the tree stays connected; if it is the current checkpoint, its parent
    /// becomes current (the VM keeps running on its active layers). No other checkpoint's
    /// content and no active chain changes: a layer still in some other record's chain
    /// (`DiskRecord::below`) stays, as a hidden layer, until nothing needs it.
    ///
    /// The commit point is the rename of the checkpoint's folder to `.tmp-deleted-<id>`: a
    /// crash before it leaves the checkpoint (children perhaps already re-parented, which
    /// changes nothing they hold), a crash after it leaves the temporary folder and unused
    /// layers that the next [`Store::open`] removes. Returns the layer files removed.
    pub fn delete(&mut self, id: &str) -> Result<Vec<PathBuf>> {
        self.settle()?;
        let m = self.get(id)?;
        let all = self.list()?;
        for mut child in all.into_iter().filter(|c| c.parent.as_deref() == Some(id)) {
            child.parent = m.parent.clone();
            child.save(&self.checkpoint_dir(&child.id).join(MANIFEST_FILE))?;
        }
        if self.record.current.as_deref() == Some(id) {
            let record = StoreRecord {
                current: m.parent.clone(),
                ..self.record.clone()
            };
            record.save(&self.location.join(STORE_FILE))?;
            self.record = record;
        }
        let dir = self.checkpoint_dir(id);
        let doomed = self.location.join(format!("{TMP_PREFIX}deleted-{id}"));
        std::fs::rename(&dir, &doomed).at(&dir, "delete (rename)")?;
        fsutil::sync_dir(&self.location)?;
        std::fs::remove_dir_all(&doomed).at(&doomed, "remove")?;
        fsutil::sync_dir(&self.location)?;
        self.remove_unused_layers()
    }

    /// Applies `edit` to every disk record of the store: each checkpoint's (`disks` and
    /// `active_after`) and the active ones; writes each manifest `edit` changed (atomically),
    /// then the store record if it changed. For a merge that took a layer out of the chains:
    /// a crash part way leaves some records naming the old layer, which still exists and reads
    /// the same until the edit is finished (the caller journals it and redoes it on start).
    pub fn edit_disk_records(&mut self, edit: impl Fn(&mut DiskRecord) -> bool) -> Result<()> {
        self.settle()?;
        for mut m in self.list()? {
            let mut changed = false;
            for d in m.disks.iter_mut().chain(m.active_after.iter_mut()) {
                changed |= edit(d);
            }
            if changed {
                m.save(&self.checkpoint_dir(&m.id).join(MANIFEST_FILE))?;
            }
        }
        let mut record = self.record.clone();
        let mut changed = false;
        for d in record.active.iter_mut() {
            changed |= edit(d);
        }
        if changed {
            record.save(&self.location.join(STORE_FILE))?;
            self.record = record;
        }
        Ok(())
    }

    /// Checks the whole store: every manifest loads; every file a checkpoint refers to exists
    /// with its recorded size and checksum (state file, memory file and its region checksums,
    /// disk layers, launch disks); parent links resolve without cycles; the record's current
    /// checkpoint and active layers exist. Reads every state and memory file.
    pub fn check(&self) -> CheckReport {
        let mut report = CheckReport::default();
        let (all, bad) = self.scan();
        for b in bad {
            report.add(&self.location, b);
        }
        report.checkpoints = all.len();
        let ids: BTreeSet<&str> = all.iter().map(|m| m.id.as_str()).collect();
        for m in &all {
            let dir = self.checkpoint_dir(&m.id);
            if let Some(d) = &m.state {
                let path = dir.join(STATE_FILE);
                match state::read_state_bytes(&path, DEFAULT_STATE_CAP.max(d.size)) {
                    Ok((_, got)) if got == *d => {}
                    Ok((_, got)) => report.add(
                        &path,
                        format!(
                            "{}: size {} and checksum {:016x} differ from the manifest's ({}, {:016x})",
                            path.display(),
                            got.size,
                            got.crc64,
                            d.size,
                            d.crc64
                        ),
                    ),
                    Err(e) => report.add_error(&path, &e),
                }
            }
            if let Some(rec) = &m.memory {
                let path = dir.join(MEMORY_FILE);
                if let Err(e) = MemoryFile::open(&path, rec).and_then(|f| f.verify()) {
                    report.add_error(&path, &e);
                }
            }
            // A checkpoint's active layers matter only until the record adopts them (they are
            // the record's own `active` then, checked below, or discarded by an apply).
            let pending = m.sequence > self.record.sequence;
            for d in m
                .disks
                .iter()
                .chain(m.active_after.iter().filter(|_| pending))
            {
                self.check_disk(&mut report, &dir.join(MANIFEST_FILE), d);
            }
            if let Some(p) = &m.parent {
                if !ids.contains(p.as_str()) {
                    report.add(
                        dir.join(MANIFEST_FILE),
                        format!(
                            "{}: parent {p} does not exist",
                            dir.join(MANIFEST_FILE).display()
                        ),
                    );
                }
            }
            let seq_twins = all.iter().filter(|o| o.sequence == m.sequence).count();
            if seq_twins > 1 {
                report.add(
                    dir.join(MANIFEST_FILE),
                    format!(
                        "{}: sequence {} is not unique",
                        dir.join(MANIFEST_FILE).display(),
                        m.sequence
                    ),
                );
            }
        }
        if let Some(id) = find_cycle(&all) {
            report.add(
                &self.location,
                format!(
                    "{}: checkpoint parent links form a cycle through {id}",
                    self.location.display()
                ),
            );
        }
        let record = self.location.join(STORE_FILE);
        if let Some(c) = &self.record.current {
            if !ids.contains(c.as_str()) {
                report.add(
                    &record,
                    format!(
                        "{}: current checkpoint {c} does not exist",
                        record.display()
                    ),
                );
            }
        }
        for d in &self.record.active {
            self.check_disk(&mut report, &record, d);
        }
        report
    }

    fn check_disk(&self, report: &mut CheckReport, from: &Path, d: &DiskRecord) {
        let paths: Vec<PathBuf> = std::iter::once(d.top(&self.location))
            .chain(d.below.iter().map(|l| l.resolve(&self.location)))
            .collect();
        for path in paths {
            if !path.exists() {
                report.add(
                    &path,
                    format!(
                        "{}: disk {} layer {} is missing",
                        from.display(),
                        d.index,
                        path.display()
                    ),
                );
            }
        }
    }
}

/// Whether a store may be opened at `location`: a folder that does not exist yet, an empty
/// folder, or a store (it has the lock file or the record). Anything else — a folder holding
/// other files, a file — is refused with the reason, so that a mistyped location never fills
/// someone's folder with `lock` and `layers/` nor takes their folders for checkpoints.
pub fn usable_location(location: &Path) -> std::result::Result<(), String> {
    match std::fs::symlink_metadata(location) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(format!("cannot read it: {e}")),
        Ok(m) if !m.is_dir() => Err("it is not a folder".into()),
        Ok(_) => {
            if location.join(LOCK_FILE).exists() || location.join(STORE_FILE).exists() {
                return Ok(());
            }
            match std::fs::read_dir(location).map(|mut e| e.next().is_none()) {
                Ok(true) => Ok(()),
                Ok(false) => Err(
                    "not a Strata checkpoint location: the folder holds other files; give an \
                     empty or a new folder"
                        .into(),
                ),
                Err(e) => Err(format!("cannot list it: {e}")),
            }
        }
    }
}

/// A checkpoint on a parent-link cycle, if any.
fn find_cycle(all: &[Manifest]) -> Option<String> {
    let parent: BTreeMap<&str, Option<&str>> = all
        .iter()
        .map(|m| (m.id.as_str(), m.parent.as_deref()))
        .collect();
    for m in all {
        let mut at = m.id.as_str();
        for _ in 0..=all.len() {
            match parent.get(at).copied().flatten() {
                Some(p) => at = p,
                None => break,
            }
            if at == m.id {
                return Some(m.id.clone());
            }
        }
    }
    None
}

/// A new checkpoint id: 16 hex digits, random.
pub fn new_id() -> String {
    let r = getrandom::u64().unwrap_or_else(|_| {
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        (t.as_nanos() as u64) ^ u64::from(std::process::id()).rotate_left(40)
    });
    format!("{r:016x}")
}

#[cfg(test)]
mod tests;

#[cfg(test)]
mod location_tests {
    use super::*;

    #[test]
    fn a_folder_holding_other_files_is_not_taken_for_a_store() {
        let d = tempfile::tempdir().unwrap();
        std::fs::write(d.path().join("notes.txt"), b"mine").unwrap();
        let err = Store::open(d.path()).unwrap_err().to_string();
        assert!(err.contains("not a Strata checkpoint location"), "{err}");
        assert!(!d.path().join(LOCK_FILE).exists() && !d.path().join(LAYERS_DIR).exists());
        // New, empty, and existing stores are fine.
        drop(Store::open(&d.path().join("new")).unwrap());
        drop(Store::open(&d.path().join("new")).unwrap());
        std::fs::create_dir(d.path().join("empty")).unwrap();
        drop(Store::open(&d.path().join("empty")).unwrap());
        let file = d.path().join("notes.txt");
        assert!(Store::open(&file)
            .unwrap_err()
            .to_string()
            .contains("not a folder"));
    }
}
