//! Checkpoint orchestration: standard checkpoints taken from a running (or paused) VM, applied
//! in place, and restored in a new process (`strata restore`).
//!
//! **Create** (standard): pause vCPUs and devices ([`crate::vm::Vm::pause`]); save devices,
//! then vCPUs, then the VM's irqchip, PIT and clock ([`crate::vm::Vm::save_state`]: devices
//! first, so an interrupt a device raises while being saved is not lost); fork a writer of
//! guest memory ([`capture`]: the child sees memory at this instant); switch every writable
//! disk to a new empty layer at the same instant (all or nothing,
//! [`crate::device_manager::VirtioDevices::switch_disks`]); resume. The pause lasts the state
//! save, the fork and the disk switch; memory is written while the guest runs. Then the state
//! file is written, the memory writer is awaited, and the checkpoint is committed by the store
//! (one rename). The new active layers are recorded before the resume, so that what the guest
//! flushes to them survives a crash before the commit (invariant 1). A failure before the
//! resume leaves the VM as it was and no checkpoint. A failure after it (the memory file
//! cannot be written) leaves no checkpoint either, but the guest has written to its new
//! layers by then: they stay the active layers, the frozen ones beneath them kept as part of
//! the chains (`DiskRecord::below`).
//!
//! **Apply** (standard): everything that can be checked is checked first (the manifest, the
//! state file's checksum and fields, the memory file's layout); then the running VM is torn
//! down, new active layers are created above the checkpoint's layers (the checkpoint never
//! changes, invariant 3) and recorded, guest memory is the checkpoint's memory file mapped
//! private (copy-on-write: applying costs the same for any guest size), and a fresh KVM VM is
//! built from the saved state behind the same API socket, console and vsock socket. It gets a
//! new generation: events of the old VM still queued are dropped. The vsock device resets its
//! transport, so the guest agent reconnects by itself. A failure after the teardown leaves the
//! VM off with the reason.
//!
//! **Restore** (`strata restore --checkpoint DIR`): the VM's configuration comes from the
//! checkpoint's state file; the store is the checkpoint folder's parent; then it is an apply
//! into a VM that is off.
//!
//! **Production** (the type the VM's checkpoint config or the request names): the guest agent
//! is asked over vsock to `freeze` (hooks, sync, filesystems frozen, with a lease after which
//! it thaws by itself); then only the disks' device threads pause (each finishes its request
//! in flight), every disk switches to a new layer at one instant and the new layers are
//! recorded, the disk threads resume, and the agent is asked to `thaw` — always, also when a
//! step failed. The vCPUs never stop; the window in which the guest's writes are frozen (from
//! the freeze reply to the thaw) is recorded as `frozen_us`. No memory or vCPU state is saved.
//! When the agent cannot quiesce the guest (no vsock device, the VM paused, the agent
//! unreachable or refusing), type `production` takes a standard checkpoint and records why
//! (`fallback_reason`); `production-only` fails with nothing changed; `disabled` refuses. A
//! VM that is off takes a disk-only checkpoint whatever its type (application-consistent if
//! the guest powered off or never ran, crash-consistent after a stop or a crash).
//!
//! Applying a production checkpoint tears the VM down and leaves it off on new layers above
//! the checkpoint's disks; `start` cold-boots from them.

pub mod capture;
pub mod fold;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use api::types::CheckpointType as VmCheckpointType;
use serde::{Deserialize, Serialize};
use snapshot::manifest::{
    CheckpointType, Consistency, DiskRecord, Manifest, MEMORY_FILE, STATE_FILE,
};
use snapshot::memory::MemoryFile;
use snapshot::store::{CommitInfo, Store};

use crate::agent::AgentClient;
use crate::config::{DiskConfig, Kernel, VmConfig, VsockConfig};
use crate::runner::{Machine, VmState};
use crate::vm::{EventTx, Vm, VmSnapshotState};
use capture::{CaptureError, MemoryCapture};

/// Why a checkpoint operation failed. Each says what is left: nothing changed, or the VM off.
#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    /// No location is configured.
    #[error(
        "this VM has no checkpoint location: start it with --state-dir DIR or set a location \
         with PUT /v1/vm/checkpoint-config"
    )]
    NoLocation,
    /// The VM's checkpoint type is `disabled`.
    #[error("checkpoints are disabled for this VM (its checkpoint type is disabled)")]
    Disabled,
    /// Not possible in this state.
    #[error("cannot {action} while the VM is {state}")]
    WrongState {
        /// What was asked.
        action: &'static str,
        /// The state.
        state: &'static str,
    },
    /// What is not built yet.
    #[error("{0}")]
    Unsupported(String),
    /// Revert with no checkpoint to go back to.
    #[error("there is no checkpoint to revert to: the VM has not taken or applied one")]
    NothingToRevert,
    /// A production-only checkpoint and the agent could not quiesce the guest.
    #[error("no checkpoint was taken: the checkpoint type is production-only and {0}")]
    CannotQuiesce(String),
    /// The store (lock, manifests, state file, memory file): the error names the file.
    #[error(transparent)]
    Store(#[from] snapshot::Error),
    /// The store's record does not fit this VM.
    #[error("checkpoint store {location}: {reason}")]
    ForeignStore {
        /// The location.
        location: PathBuf,
        /// What does not fit.
        reason: String,
    },
    /// Pausing or resuming.
    #[error("cannot pause the VM for the checkpoint")]
    Pause(#[source] crate::vm::PauseError),
    /// Saving the VM's state.
    #[error("cannot save the VM's state")]
    Save(#[source] crate::vm::SaveError),
    /// Guest memory.
    #[error(transparent)]
    Capture(#[from] CaptureError),
    /// Switching the disks.
    #[error(transparent)]
    Disks(#[from] crate::device_manager::DeviceError),
    /// Creating a new active layer above a checkpoint's layer.
    #[error("cannot create the new layer {path} above {parent}")]
    Layer {
        /// The new layer.
        path: PathBuf,
        /// Its parent.
        parent: PathBuf,
        /// Why.
        #[source]
        source: Box<disk::DiskError>,
    },
    /// A merge of a deleted checkpoint's layer failed.
    #[error("cannot fold the layer {path} into its neighbour")]
    Fold {
        /// The layer (or chain) it was at.
        path: PathBuf,
        /// Why.
        #[source]
        source: Box<disk::DiskError>,
    },
    /// An export cannot be written.
    #[error("cannot export to {path}: {reason}")]
    Export {
        /// The destination.
        path: PathBuf,
        /// Why.
        reason: String,
    },
    /// The checkpoint does not fit this VM.
    #[error("checkpoint {id} cannot be applied to this VM: {reason}")]
    Incompatible {
        /// The checkpoint.
        id: String,
        /// What does not fit.
        reason: String,
    },
    /// The saved state is invalid (names the file and field).
    #[error("checkpoint {id}: state file {path}: {source}")]
    BadState {
        /// The checkpoint.
        id: String,
        /// The state file.
        path: PathBuf,
        /// What is wrong.
        #[source]
        source: snapshot::StateError,
    },
    /// The memory file cannot be mapped.
    #[error("checkpoint {id}")]
    Memory {
        /// The checkpoint.
        id: String,
        /// Why.
        #[source]
        source: crate::memory::MemoryError,
    },
    /// Building the VM from the state.
    #[error("cannot restore checkpoint {id}")]
    Restore {
        /// The checkpoint.
        id: String,
        /// Why.
        #[source]
        source: crate::vm::RestoreError,
    },
}

impl CheckpointError {
    /// The API's answer for it.
    pub fn to_api(&self) -> api::ApiError {
        let msg = crate::error_line(self);
        match self {
            Self::Store(snapshot::Error::NotFound { .. }) | Self::NothingToRevert => {
                api::ApiError::not_found(msg)
            }
            Self::CannotQuiesce(_) => api::ApiError::agent_unreachable(msg),
            Self::NoLocation
            | Self::Disabled
            | Self::WrongState { .. }
            | Self::Unsupported(_)
            | Self::ForeignStore { .. }
            | Self::Incompatible { .. }
            | Self::BadState { .. }
            | Self::Store(snapshot::Error::Locked { .. }) => api::ApiError::invalid_state(msg),
            // A checkpoint whose files are corrupt, foreign or of another version cannot be
            // used: the message names the file. Not a bug of the VMM.
            Self::Store(
                snapshot::Error::BadMagic { .. }
                | snapshot::Error::UnsupportedVersion { .. }
                | snapshot::Error::Truncated { .. }
                | snapshot::Error::ChecksumMismatch { .. }
                | snapshot::Error::TooLarge { .. }
                | snapshot::Error::Decode { .. }
                | snapshot::Error::Invalid { .. },
            )
            | Self::Memory { .. } => api::ApiError::invalid_state(msg),
            _ => api::ApiError::internal(msg),
        }
    }
}

/// The machine a standard checkpoint was taken of: what `strata restore` builds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SavedMachine {
    /// The kernel file; `None` for the embedded test guest.
    pub kernel: Option<PathBuf>,
    /// The initrd.
    pub initrd: Option<PathBuf>,
    /// The command line given (the devices' entries are added at boot).
    pub cmdline: String,
    /// vCPUs.
    pub vcpus: u8,
    /// Guest RAM in bytes.
    pub memory: u64,
    /// Whether a guest reset reboots.
    pub reboot: bool,
    /// Launch disks in `--disk` order.
    pub disks: Vec<SavedDisk>,
    /// The vsock device.
    pub vsock: Option<SavedVsock>,
    /// The VM's checkpoint type.
    pub checkpoint_type: VmCheckpointType,
}

/// A disk of [`SavedMachine`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SavedDisk {
    /// The launch disk (absolute).
    pub path: PathBuf,
    /// Read-only.
    pub read_only: bool,
    /// `l2-cache-size=`, if given.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub l2_cache_size: Option<u64>,
}

/// The vsock device of [`SavedMachine`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SavedVsock {
    /// Guest CID.
    pub cid: u32,
    /// Host socket.
    pub socket: PathBuf,
}

/// The folds a delete left ([`Machine::delete_checkpoint`]), run a step at a time by the
/// control loop ([`Machine::fold_step`]).
#[derive(Debug)]
pub struct Folding {
    /// The deleted checkpoint (the folds' progress shows as a merge of it).
    id: String,
    /// The fold under way, once one has begun.
    job: Option<fold::FoldJob>,
    /// Folds begun so far.
    folds: u32,
}

/// Folds one delete may call for at most (each takes a layer out, so they end; a guard).
const MAX_FOLDS: u32 = 4096;

/// A standard checkpoint's state file payload.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SavedVm {
    /// The machine.
    pub machine: SavedMachine,
    /// vCPUs, VM, devices.
    pub vm: VmSnapshotState,
}

fn absolute(p: &Path) -> PathBuf {
    std::path::absolute(p).unwrap_or_else(|_| p.to_path_buf())
}

/// The folder holding `p`.
fn dir_of(p: &Path) -> Option<PathBuf> {
    p.parent()
        .filter(|d| !d.as_os_str().is_empty())
        .map(Path::to_path_buf)
}

/// The parents a store chain of disk record `d` may name besides the store's own layers: the
/// files in its launch disk's folder (recorded by the store itself, never read from a layer).
fn chain_parents(d: &DiskRecord) -> disk::ParentPolicy {
    disk::ParentPolicy::with_dirs(dir_of(&absolute(&d.launch)))
}

impl SavedMachine {
    /// What `config` describes.
    pub fn of(config: &VmConfig) -> Self {
        SavedMachine {
            kernel: match &config.kernel {
                Kernel::TestGuest => None,
                Kernel::File(p) => Some(absolute(p)),
            },
            initrd: config.initrd.as_deref().map(absolute),
            cmdline: config.cmdline.clone(),
            vcpus: config.vcpus,
            memory: config.memory,
            reboot: config.reboot,
            disks: config
                .disks
                .iter()
                .map(|d| SavedDisk {
                    path: absolute(&d.path),
                    read_only: d.read_only,
                    l2_cache_size: d.l2_cache_size,
                })
                .collect(),
            vsock: config.vsock.as_ref().map(|v| SavedVsock {
                cid: v.cid,
                socket: absolute(&v.socket),
            }),
            checkpoint_type: config.checkpoint.kind,
        }
    }

    /// A configuration for this machine, with the host-side settings (console, API socket,
    /// checkpoint location) of `host`.
    pub fn to_config(&self, host: &VmConfig) -> VmConfig {
        VmConfig {
            kernel: self.kernel.clone().map_or(Kernel::TestGuest, Kernel::File),
            initrd: self.initrd.clone(),
            cmdline: self.cmdline.clone(),
            vcpus: self.vcpus,
            memory: self.memory,
            reboot: self.reboot,
            console: host.console.clone(),
            disks: self
                .disks
                .iter()
                .map(|d| DiskConfig {
                    path: d.path.clone(),
                    read_only: d.read_only,
                    l2_cache_size: d.l2_cache_size,
                })
                .collect(),
            vsock: self.vsock.as_ref().map(|v| VsockConfig {
                cid: v.cid,
                socket: v.socket.clone(),
            }),
            api_socket: host.api_socket.clone(),
            checkpoint: api::types::CheckpointConfig {
                kind: self.checkpoint_type,
                location: host.checkpoint.location.clone(),
            },
        }
    }

    /// Whether a checkpoint of this machine can be applied to a VM configured as `config`.
    /// `same_disks`: the disks must be the same files (applying in the VM that took it);
    /// otherwise (an export) only as many, with the same read-only flags.
    fn check_fits(&self, config: &VmConfig, same_disks: bool) -> Result<(), String> {
        let here = SavedMachine::of(config);
        if self.vcpus != here.vcpus {
            return Err(format!(
                "it has {} vCPUs, the VM {}",
                self.vcpus, here.vcpus
            ));
        }
        if self.memory != here.memory {
            return Err(format!(
                "it has {} MiB of memory, the VM {} MiB",
                self.memory >> 20,
                here.memory >> 20
            ));
        }
        let flags = |d: &[SavedDisk]| d.iter().map(|d| d.read_only).collect::<Vec<_>>();
        if !same_disks && flags(&self.disks) != flags(&here.disks) {
            return Err(format!(
                "its disks {:?} differ from the VM's {:?} in number or read-only flags",
                self.disks, here.disks
            ));
        }
        if same_disks && self.disks != here.disks {
            return Err(format!(
                "its disks {:?} are not the VM's {:?}",
                self.disks, here.disks
            ));
        }
        if self.vsock.is_some() != here.vsock.is_some() {
            return Err("it and the VM differ in having a vsock device".into());
        }
        Ok(())
    }
}

/// The record of disk `index` when the VM runs on its launch disk.
fn launch_record(index: usize, disk: &DiskConfig) -> DiskRecord {
    DiskRecord {
        index: index as u32,
        layer: None,
        below: Vec::new(),
        launch: absolute(&disk.path),
    }
}

/// Per disk, the chain the VM writes now: the store's active records, or the launch disks.
pub fn active_records(store: Option<&Store>, config: &VmConfig) -> Vec<DiskRecord> {
    match store {
        Some(s) if !s.active().is_empty() => s.active().to_vec(),
        _ => config
            .disks
            .iter()
            .enumerate()
            .map(|(i, d)| launch_record(i, d))
            .collect(),
    }
}

/// Checks that the store's active disks are this VM's launch disks.
pub fn check_store_fits(store: &Store, config: &VmConfig) -> Result<(), CheckpointError> {
    let active = store.active();
    if active.is_empty() {
        return Ok(());
    }
    let launch: Vec<PathBuf> = config.disks.iter().map(|d| absolute(&d.path)).collect();
    let recorded: Vec<PathBuf> = active.iter().map(|d| d.launch.clone()).collect();
    if launch != recorded {
        return Err(CheckpointError::ForeignStore {
            location: store.location().to_path_buf(),
            reason: format!(
                "it holds the checkpoints of a VM whose disks are {recorded:?}, this VM's are \
                 {launch:?}"
            ),
        });
    }
    Ok(())
}

/// Bytes a file occupies on disk (0 if it cannot be read).
fn allocated(path: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(path).map_or(0, |m| m.blocks() * 512)
}

/// How long the guest agent keeps the guest frozen if the VMM never asks it to thaw.
const FREEZE_LEASE_S: u64 = 30;
/// How long to wait for the agent's handshake.
const AGENT_TIMEOUT: Duration = Duration::from_secs(5);

/// Asks the guest agent to thaw, waiting for its thaw hooks: on `agent`'s connection, and if
/// that one is broken (a freeze reply that came too late leaves it so) or missing, on a new
/// one. A thaw the agent never confirms is logged: the agent then thaws by itself when its
/// lease runs out.
fn thaw(socket: &Path, agent: Option<AgentClient>) {
    let wait = Duration::from_secs(FREEZE_LEASE_S);
    let first = match agent {
        Some(mut a) => a.thaw_waiting(wait),
        None => Err(crate::agent::AgentError::Broken),
    };
    let Err(first) = first else { return };
    let retried =
        AgentClient::connect(socket, AGENT_TIMEOUT).and_then(|mut a| a.thaw_waiting(wait));
    if let Err(e) = retried {
        log::warn!(
            "the guest agent did not confirm the thaw ({}; then {}); it thaws by itself when \
             its {FREEZE_LEASE_S} s lease runs out",
            crate::error_line(&first),
            crate::error_line(&e)
        );
    }
}

/// The allocated size of the store layers a checkpoint freezes.
fn frozen_layers_size(store: &Store, current: &[DiskRecord]) -> u64 {
    current
        .iter()
        .filter_map(|d| d.layer.as_ref())
        .map(|l| allocated(&l.resolve(store.location())))
        .sum()
}

/// Per disk, the new layer a checkpoint `id` puts on top (`None` for a read-only disk, which
/// is never written) and the records of the chains after the switch.
fn plan_switch(
    store: &Store,
    current: &[DiskRecord],
    config: &VmConfig,
    id: &str,
) -> Result<(Vec<Option<PathBuf>>, Vec<DiskRecord>), CheckpointError> {
    let mut switch = Vec::new();
    let mut after = Vec::new();
    for (d, cfg) in current.iter().zip(&config.disks) {
        if cfg.read_only {
            switch.push(None);
            after.push(d.clone());
            continue;
        }
        let layer = store.new_layer_path(d.index, id)?;
        switch.push(Some(layer.resolve(store.location())));
        after.push(DiskRecord {
            index: d.index,
            below: d.store_layers().cloned().collect(),
            layer: Some(layer),
            launch: d.launch.clone(),
        });
    }
    Ok((switch, after))
}

/// Switches the (paused) disks of `vm` to their new layers at one instant and records them as
/// the active ones before any guest write can land on them: a write the guest sees flushed on
/// a new layer must survive a crash before the commit (invariant 1), so from then on a
/// restart continues on the new layers, whether or not the checkpoint gets committed. On a
/// failure every disk is put back.
fn switch_and_record(
    store: &mut Store,
    vm: &Vm,
    switch: &[Option<PathBuf>],
    after: &[DiskRecord],
) -> Result<(), CheckpointError> {
    vm.virtio_devices().switch_disks(switch)?;
    let current_id = store.current().map(str::to_string);
    if let Err(e) = store.set_current(current_id.as_deref(), after.to_vec()) {
        if let Err(u) = vm.virtio_devices().unswitch_disks(switch) {
            log::error!("putting the disks back after a failed checkpoint: {u}");
        }
        return Err(e.into());
    }
    Ok(())
}

/// What a create reports besides the manifest.
#[derive(Debug, Clone, Copy)]
pub struct CreateStats {
    /// How long the guest was paused.
    pub paused: Duration,
    /// Bytes of guest memory written.
    pub memory_written: u64,
}

impl Machine {
    /// The configured checkpoint location.
    fn location(&self) -> Option<PathBuf> {
        self.checkpoint_config.location.as_ref().map(PathBuf::from)
    }

    /// The store at the configured location, opened (and recovered) on first use. The
    /// location's folder must exist: `strata run --state-dir` creates it at start, a location
    /// set through the API must have been made by the user (a mistyped path then fails here
    /// instead of creating folders anywhere).
    pub fn store(&mut self) -> Result<&mut Store, CheckpointError> {
        self.settle_held()?;
        let location = self.location().ok_or(CheckpointError::NoLocation)?;
        if !location.is_dir() {
            return Err(CheckpointError::ForeignStore {
                location,
                reason: "there is no such folder; create it first (strata run --state-dir \
                         creates its folder at start)"
                    .into(),
            });
        }
        let reopen = self.store.as_ref().is_none_or(|s| s.location() != location);
        if reopen {
            self.store = None;
            let mut store = Store::open(&location)?;
            match fold::recover(&mut store) {
                Ok(Some(what)) => log::warn!("checkpoint store {}: {what}", location.display()),
                Ok(None) => {}
                Err(e) => log::error!(
                    "checkpoint store {}: an interrupted fold: {}",
                    location.display(),
                    crate::error_line(&e)
                ),
            }
            let report = store.opened();
            if !report.is_clean() {
                log::warn!(
                    "checkpoint store {}: {report:?}",
                    store.location().display()
                );
            }
            check_store_fits(&store, &self.config)?;
            self.store = Some(store);
        }
        self.store.as_mut().ok_or(CheckpointError::NoLocation)
    }

    /// Once the new active layers of an apply are recorded durably (the store's deferred
    /// write, [`Store::set_current_deferred`]), lets the VM's disks run and removes the
    /// layers of the discarded state. If recording them failed the VM cannot go on (a crash
    /// would lose what the guest writes to them): it is stopped, with the reason. Called when
    /// the write reports back ([`VmEvent::LayersRecorded`]) and before anything else touches
    /// the store.
    pub(crate) fn settle_held(&mut self) -> Result<(), CheckpointError> {
        let Some(id) = self.held.take() else {
            return Ok(());
        };
        let settled = match self.store.as_mut() {
            Some(store) => store.settle(),
            None => Ok(()),
        };
        if let Err(e) = settled {
            self.halt(&format!(
                "applying checkpoint {id} failed: its new layers could not be recorded: {}",
                crate::error_line(&e)
            ));
            return Err(e.into());
        }
        if let Some(vm) = &self.vm {
            if let Err(e) = vm.virtio_devices().resume_disks() {
                log::error!("applying checkpoint {id}: the disks cannot run: {e}");
            }
        }
        self.remove_discarded_layers(&id);
        Ok(())
    }

    /// Like [`Machine::store`] for calls that only read: `None` when the location is set but
    /// its folder does not exist yet (no checkpoint was ever taken there), so that reading
    /// creates nothing.
    pub fn existing_store(&mut self) -> Result<Option<&mut Store>, CheckpointError> {
        let location = self.location().ok_or(CheckpointError::NoLocation)?;
        let open = self
            .store
            .as_ref()
            .is_some_and(|s| s.location() == location);
        if !open && !location.exists() {
            return Ok(None);
        }
        self.store().map(Some)
    }

    /// The configuration a boot or restore uses: the disks are the active layers.
    /// The folders of the launch disks become folders the disks' chains may name parents in
    /// (`device_manager::trust_parent_dirs`): the store's first layers name the launch disks.
    pub fn boot_config(&self) -> VmConfig {
        let mut config = self.config.clone();
        let launch = config.disks.iter().map(|d| absolute(&d.path));
        crate::device_manager::trust_parent_dirs(launch.filter_map(|p| dir_of(&p)));
        if let Some(store) = &self.store {
            for (d, r) in config.disks.iter_mut().zip(store.active()) {
                crate::device_manager::trust_parent_dirs(dir_of(&r.launch));
                d.path = r.top(store.location());
            }
        }
        config
    }

    /// Takes a checkpoint as `kind` asks (or the VM's type).
    pub fn create_checkpoint(
        &mut self,
        name: Option<&str>,
        kind: Option<VmCheckpointType>,
    ) -> Result<(Manifest, CreateStats), CheckpointError> {
        // A VM whose checkpoints are disabled takes none, whatever a request asks for; a
        // request may only choose among the enabled types.
        if self.checkpoint_config.kind == VmCheckpointType::Disabled {
            return Err(CheckpointError::Disabled);
        }
        let asked = kind.unwrap_or(self.checkpoint_config.kind);
        if asked == VmCheckpointType::Disabled {
            return Err(CheckpointError::Disabled);
        }
        let name = name.map_or_else(
            || {
                format!(
                    "checkpoint {}",
                    snapshot::manifest::Timestamp::now().as_str()
                )
            },
            str::to_string,
        );
        self.finish_folding();
        self.store()?;
        if self.state() == VmState::Off {
            // Nothing runs: the disks are all there is, whatever the type.
            return self.create_disks_only(&name);
        }
        match asked {
            VmCheckpointType::Disabled | VmCheckpointType::Standard => {
                self.create_standard(&name, None)
            }
            VmCheckpointType::Production | VmCheckpointType::ProductionOnly => {
                match self.quiesce() {
                    Ok((agent, reply)) => self.create_production(&name, agent, reply),
                    Err(reason) if asked == VmCheckpointType::Production => {
                        log::warn!("production checkpoint taken as standard: {reason}");
                        self.create_standard(&name, Some(reason))
                    }
                    Err(reason) => Err(CheckpointError::CannotQuiesce(reason)),
                }
            }
        }
    }

    /// Asks the guest agent to quiesce the guest (hooks, sync, filesystems frozen). On success
    /// the guest stays frozen until [`AgentClient::thaw`] (or the agent's lease runs out);
    /// otherwise says why it cannot, in words for the checkpoint's record.
    fn quiesce(&self) -> Result<(AgentClient, serde_json::Map<String, serde_json::Value>), String> {
        if self.paused {
            return Err("the VM is paused, so the guest agent cannot quiesce it".into());
        }
        let Some(vsock) = &self.config.vsock else {
            return Err(
                "the VM has no vsock device, so there is no guest agent to quiesce it".into(),
            );
        };
        let mut agent = AgentClient::connect(&vsock.socket, AGENT_TIMEOUT).map_err(|e| {
            format!(
                "the guest agent cannot be reached: {}",
                crate::error_line(&e)
            )
        })?;
        match agent.freeze_reply(FREEZE_LEASE_S) {
            Ok(reply) => Ok((agent, reply)),
            Err(e) => {
                // A freeze that half happened, or that finished after we stopped waiting, is
                // undone now rather than left to the lease.
                thaw(&vsock.socket, Some(agent));
                Err(format!(
                    "the guest agent could not freeze the guest: {}",
                    crate::error_line(&e)
                ))
            }
        }
    }

    /// A production checkpoint of a quiesced guest: only the disks' device threads pause, while
    /// every disk switches to a new layer; then the agent thaws the guest, always.
    fn create_production(
        &mut self,
        name: &str,
        agent: AgentClient,
        reply: serde_json::Map<String, serde_json::Value>,
    ) -> Result<(Manifest, CreateStats), CheckpointError> {
        let frozen_at = Instant::now();
        let current = active_records(self.store.as_ref(), &self.config);
        let switched = (|| {
            let (Some(store), Some(vm)) = (self.store.as_mut(), self.vm.as_ref()) else {
                return Err(CheckpointError::NoLocation);
            };
            let pending = store.begin(name)?;
            let (switch, after) = plan_switch(store, &current, &self.config, pending.id())?;
            let devices = vm.virtio_devices();
            // In-flight requests complete before the switch: each disk thread parks between
            // requests.
            devices
                .pause_disks()
                .map_err(|e| CheckpointError::Pause(e.into()))?;
            let done = switch_and_record(store, vm, &switch, &after);
            let resumed = devices.resume_disks();
            done?;
            resumed.map_err(|e| CheckpointError::Pause(e.into()))?;
            Ok((pending, after))
        })();
        let socket = self
            .config
            .vsock
            .as_ref()
            .map(|v| v.socket.clone())
            .unwrap_or_default();
        thaw(&socket, Some(agent));
        let frozen = frozen_at.elapsed();
        let (pending, after) = switched?;
        let Some(store) = self.store.as_mut() else {
            return Err(CheckpointError::NoLocation);
        };
        let layers = frozen_layers_size(store, &current);
        let info = CommitInfo {
            kind: CheckpointType::Production,
            consistency: Consistency::ApplicationConsistent,
            disks: current,
            active_after: after,
            state: None,
            memory: None,
            disk_layers_size: layers,
            paused_us: None,
            frozen_us: Some(frozen.as_micros() as u64),
            agent_freeze: Some(reply),
            fallback_reason: None,
        };
        let m = store.commit(pending, info)?;
        log::info!(
            "production checkpoint {} taken: guest frozen {:.1} ms",
            m.id,
            frozen.as_secs_f64() * 1e3
        );
        Ok((
            m,
            CreateStats {
                paused: Duration::ZERO,
                memory_written: 0,
            },
        ))
    }

    /// A checkpoint of a VM that is off: its disks get new layers; nothing else exists.
    fn create_disks_only(
        &mut self,
        name: &str,
    ) -> Result<(Manifest, CreateStats), CheckpointError> {
        let current = active_records(self.store.as_ref(), &self.config);
        // Disks a guest powered off (or never ran on) are clean; a stop or a crash left them as
        // a power cut does.
        let consistency = match self.last_exit.as_deref() {
            None | Some("poweroff") => Consistency::ApplicationConsistent,
            Some(_) => Consistency::CrashConsistent,
        };
        let Some(store) = self.store.as_mut() else {
            return Err(CheckpointError::NoLocation);
        };
        let pending = store.begin(name)?;
        let (switch, after) = plan_switch(store, &current, &self.config, pending.id())?;
        let mut made = Vec::new();
        for (path, d) in switch.iter().zip(&current) {
            let Some(path) = path else { continue };
            let parent = d.top(store.location());
            if let Err(source) = disk::create_layer_with(&parent, path, &chain_parents(d)) {
                for p in &made {
                    let _ = std::fs::remove_file(p);
                }
                return Err(CheckpointError::Layer {
                    path: path.clone(),
                    parent,
                    source: Box::new(source),
                });
            }
            made.push(path.clone());
        }
        let layers = frozen_layers_size(store, &current);
        let info = CommitInfo {
            kind: CheckpointType::Production,
            consistency,
            disks: current,
            active_after: after,
            state: None,
            memory: None,
            disk_layers_size: layers,
            paused_us: None,
            frozen_us: None,
            agent_freeze: None,
            fallback_reason: None,
        };
        match store.commit(pending, info) {
            Ok(m) => Ok((
                m,
                CreateStats {
                    paused: Duration::ZERO,
                    memory_written: 0,
                },
            )),
            Err(e) => {
                for p in &made {
                    let _ = std::fs::remove_file(p);
                }
                Err(e.into())
            }
        }
    }

    fn create_standard(
        &mut self,
        name: &str,
        fallback_reason: Option<String>,
    ) -> Result<(Manifest, CreateStats), CheckpointError> {
        let current = active_records(self.store.as_ref(), &self.config);
        let machine = SavedMachine::of(&self.config);
        let (Some(store), Some(vm)) = (self.store.as_mut(), self.vm.as_ref()) else {
            return Err(CheckpointError::NoLocation);
        };
        let was_running = !self.paused;
        // The guest is paused from the first vCPU stopping to the last one running again.
        let t0 = Instant::now();
        if was_running {
            vm.pause().map_err(CheckpointError::Pause)?;
        }
        let step = (|| {
            let pending = store.begin(name)?;
            crash_point("create-begun");
            let saved = vm
                .save_state(&self.platform)
                .map_err(CheckpointError::Save)?;
            let capture = MemoryCapture::start(vm.memory(), &pending.dir().join(MEMORY_FILE))?;
            let (switch, after) = plan_switch(store, &current, &self.config, pending.id())?;
            switch_and_record(store, vm, &switch, &after)?;
            crash_point("create-switched");
            Ok::<_, CheckpointError>((pending, saved, capture, switch, after))
        })();
        let resumed = if was_running { vm.resume() } else { Ok(()) };
        let paused = t0.elapsed();
        if let Err(e) = resumed {
            log::error!("resuming the VM after a checkpoint: {e}; it stays paused");
            self.paused = true;
        }
        let (pending, saved, capture, switch, after) = step?;
        let finish = (|| {
            let digest = pending.write_state(&SavedVm { machine, vm: saved })?;
            crash_point("create-state-written");
            let captured = capture.wait()?;
            crash_point("create-memory-written");
            let layers = frozen_layers_size(store, &current);
            let info = CommitInfo {
                kind: CheckpointType::Standard,
                consistency: Consistency::Standard,
                disks: current.clone(),
                active_after: after.clone(),
                state: Some(digest),
                memory: Some(captured.record),
                disk_layers_size: layers,
                paused_us: was_running.then_some(paused.as_micros() as u64),
                frozen_us: None,
                agent_freeze: None,
                fallback_reason: fallback_reason.clone(),
            };
            let m = store.commit_folder(pending, info)?;
            crash_point("create-renamed");
            store.adopt(&m)?;
            Ok::<_, CheckpointError>((m, captured.written))
        })();
        match finish {
            Ok((m, written)) => {
                log::info!(
                    "checkpoint {} taken: paused {:.1} ms, {} MiB of memory written",
                    m.id,
                    paused.as_secs_f64() * 1e3,
                    written >> 20
                );
                Ok((
                    m,
                    CreateStats {
                        paused,
                        memory_written: written,
                    },
                ))
            }
            Err(e) => {
                if !was_running {
                    // Nothing ran since the switch: put every disk back.
                    let current_id = store.current().map(str::to_string);
                    let undone = vm
                        .virtio_devices()
                        .unswitch_disks(&switch)
                        .map_err(CheckpointError::from)
                        .and_then(|()| Ok(store.set_current(current_id.as_deref(), current)?));
                    if let Err(u) = undone {
                        log::error!("putting the disks back after a failed checkpoint: {u}");
                    }
                }
                // Otherwise the guest has written to its new layers: they stay the active
                // ones (already recorded), with the layers they froze kept beneath them.
                Err(e)
            }
        }
    }

    /// Applies checkpoint `id`: a standard one resumes the VM in its state; a production one
    /// leaves the VM off on new layers above its disks.
    pub fn apply_checkpoint(&mut self, id: &str) -> Result<(), CheckpointError> {
        let store = self.store()?;
        let m = store.get(id)?;
        let dir = store.checkpoint_dir(id);
        self.apply_manifest(&m, &dir, true)
    }

    /// Deletes checkpoint `id`, anywhere in the tree (`Store::delete`): its folder goes, and
    /// the layers no chain stands on any more are then folded away ([`fold`]) in the
    /// background, a bounded step at a time between the control loop's other work
    /// ([`Machine::fold_step`]): a hidden layer with one child merges with it (the cheaper
    /// way; a hidden launch disk takes its child in, so deleting every checkpoint leaves the
    /// VM's own disk files holding the current content), online in the running disk's chain
    /// where it runs through them. The running VM, its disks and every other checkpoint read
    /// the same throughout. A hidden layer shared by two or more branches stays until only one
    /// is left. Returns the files removed so far (the checkpoint's folder).
    ///
    /// The delete is done once the folder is gone: a fold that fails is logged, undone, and
    /// runs again on the next delete (the chains read the same either way).
    pub fn delete_checkpoint(&mut self, id: &str) -> Result<Vec<PathBuf>, CheckpointError> {
        if self.exported().as_deref() == Some(id) {
            return Err(CheckpointError::WrongState {
                action: "delete a checkpoint being exported",
                state: "exporting it",
            });
        }
        // The folds of an earlier delete first (unless an export holds them back: then they
        // and this delete's run after it).
        self.finish_folding();
        let gone = self.store()?.delete(id)?;
        // Reported from the answer on, so a client polling for the merge's end does not see
        // "none" before the first step (unless an export's progress holds the slot).
        if !self.exporting() {
            self.set_progress(Some(api::types::Progress {
                checkpoint: id.to_string(),
                operation: api::types::PROGRESS_MERGE.into(),
                done: 0,
                total: 0,
            }));
        }
        match &mut self.folding {
            Some(held_back) => held_back.id = id.to_string(),
            None => {
                self.folding = Some(Folding {
                    id: id.to_string(),
                    job: None,
                    folds: 0,
                })
            }
        }
        Ok(gone)
    }

    /// Whether folds can run now: a delete left some, and no export reads the layers they
    /// would change.
    pub fn folds_runnable(&self) -> bool {
        self.folding.is_some() && !self.exporting()
    }

    /// Whether folds wait (run or held back by an export).
    pub fn folds_pending(&self) -> bool {
        self.folding.is_some()
    }

    /// The checkpoint an export (on its worker thread) is writing out, if one runs.
    fn exported(&self) -> Option<String> {
        self.progress
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
            .filter(|p| p.operation == api::types::PROGRESS_EXPORT)
            .map(|p| p.checkpoint.clone())
    }

    /// Whether an export runs.
    fn exporting(&self) -> bool {
        self.exported().is_some()
    }

    fn set_progress(&self, p: Option<api::types::Progress>) {
        *self.progress.lock().unwrap_or_else(|e| e.into_inner()) = p;
    }

    /// Runs every fold left, now (before a call that changes the store or the VM's disks).
    /// Folds held back by an export stay for after it.
    pub fn finish_folding(&mut self) {
        while self.folds_runnable() {
            self.fold_step();
        }
    }

    /// Before a VM opens its disks ([`Machine::start`]): a fold running on a chain of its own
    /// may hold a layer the VM opens (its active top) locked, so it finishes first; an online
    /// fold whose VM is gone is undone, to be planned again once the new VM runs.
    pub fn settle_folds_for_boot(&mut self) {
        if let Some(mut folding) = self.folding.take() {
            self.undo_stale_online_fold(&mut folding);
            self.folding = Some(folding);
        }
        let on_own_chain = |m: &Machine| {
            m.folding
                .as_ref()
                .and_then(|f| f.job.as_ref())
                .is_some_and(|j| j.online_generation().is_none())
        };
        while on_own_chain(self) && self.folds_runnable() {
            self.fold_step();
        }
    }

    /// Undoes the online fold of `folding` if its VM stopped or was replaced (a reboot): it is
    /// planned again on what runs next.
    fn undo_stale_online_fold(&mut self, folding: &mut Folding) {
        let stale = |g: u64| self.vm.is_none() || g != self.generation;
        if let Some(job) = folding
            .job
            .take_if(|j| j.online_generation().is_some_and(stale))
        {
            log::info!(
                "folding {:?}: its VM stopped or was replaced; planning it again",
                job.fold()
            );
            job.abort(None);
            self.recover_fold();
        }
    }

    /// One bounded step of the folds a delete left (1 MiB with the disks paused, online; the
    /// control loop calls it whenever no call waits). Begins the next fold when none runs, and
    /// ends the folding when none is left. A fold that fails is logged and undone
    /// ([`fold::recover`]); the next delete folds again.
    pub fn fold_step(&mut self) {
        let Some(mut folding) = self.folding.take() else {
            return;
        };
        match self.try_fold_step(&mut folding) {
            Ok(true) => self.folding = Some(folding),
            Ok(false) => {
                log::info!("deleting checkpoint {}: its layers are folded", folding.id);
                self.set_progress(None);
            }
            Err(e) => {
                log::warn!(
                    "deleting checkpoint {}: folding its layers stopped: {}; the chains read the \
                     same and the fold runs again on the next delete",
                    folding.id,
                    crate::error_line(&e)
                );
                if let Some(job) = folding.job.take() {
                    job.abort(self.vm.as_ref().map(|v| (v, self.generation)));
                }
                self.recover_fold();
                self.set_progress(None);
            }
        }
    }

    /// Undoes an interrupted fold ([`fold::recover`]), logging what it did.
    fn recover_fold(&mut self) {
        let Some(store) = self.store.as_mut() else {
            return;
        };
        match fold::recover(store) {
            Ok(Some(what)) => log::warn!("checkpoint store {}: {what}", store.location().display()),
            Ok(None) => {}
            Err(e) => log::error!(
                "checkpoint store {}: an interrupted fold: {}",
                store.location().display(),
                crate::error_line(&e)
            ),
        }
    }

    /// [`Machine::fold_step`]'s work: `Ok(false)` when no fold is left.
    fn try_fold_step(&mut self, folding: &mut Folding) -> Result<bool, CheckpointError> {
        self.undo_stale_online_fold(folding);
        if folding.job.is_none() {
            let Some(f) = fold::next_fold(self.store()?)? else {
                return Ok(false);
            };
            folding.folds += 1;
            // Each fold takes a layer out, so folding ends; the bound is a guard.
            if folding.folds > MAX_FOLDS {
                return Err(CheckpointError::Unsupported(format!(
                    "more than {MAX_FOLDS} folds after one delete"
                )));
            }
            log::info!("folding {f:?}");
            let vm = self.vm.as_ref().map(|v| (v, self.generation));
            let store = self.store.as_mut().ok_or(CheckpointError::NoLocation)?;
            folding.job = Some(fold::FoldJob::begin(store, vm, f)?);
        }
        let Some(job) = folding.job.as_mut() else {
            return Ok(true);
        };
        let vm = self.vm.as_ref().map(|v| (v, self.generation));
        let store = self.store.as_mut().ok_or(CheckpointError::NoLocation)?;
        match job.step(store, vm)? {
            fold::FoldStep::Copied(done, total) => {
                self.set_progress(Some(api::types::Progress {
                    checkpoint: folding.id.clone(),
                    operation: api::types::PROGRESS_MERGE.into(),
                    done,
                    total,
                }));
                if let Some(d) = fold_step_delay() {
                    std::thread::sleep(d);
                }
            }
            fold::FoldStep::Finished => {
                folding.job = None;
                let removed = self.store()?.remove_unused_layers()?;
                if !removed.is_empty() {
                    log::info!("removed unused layers {removed:?}");
                }
            }
        }
        Ok(true)
    }

    /// Reverts: applies the checkpoint the VM runs from (the most recent one on its branch);
    /// the state since is discarded.
    pub fn revert(&mut self) -> Result<(), CheckpointError> {
        let id = self
            .store()?
            .current()
            .map(str::to_string)
            .ok_or(CheckpointError::NothingToRevert)?;
        self.apply_checkpoint(&id)
    }

    /// Applies checkpoint `id` after taking a checkpoint of the current state (of the VM's
    /// type), so nothing is discarded. The target is checked first: nothing is taken for an
    /// id that does not exist.
    pub fn apply_saving_current(&mut self, id: &str) -> Result<Manifest, CheckpointError> {
        self.store()?.get(id)?;
        let (saved, _) = self.create_checkpoint(Some(&format!("before applying {id}")), None)?;
        self.apply_checkpoint(id)?;
        Ok(saved)
    }

    /// Per disk, the byte ranges that differ between checkpoint `since` (or, without it, the
    /// launch disks) and checkpoint `id`, at sub-cluster granularity. `since` must be on `id`'s
    /// branch, below it.
    pub fn checkpoint_changes(
        &mut self,
        id: &str,
        since: Option<&str>,
    ) -> Result<Vec<disk::ops::ChangeMap>, CheckpointError> {
        self.finish_folding();
        let store = self.store()?;
        let location = store.location().to_path_buf();
        let newer = store.get(id)?;
        let older = since.map(|s| store.get(s)).transpose()?;
        let mut out = Vec::new();
        for (i, d) in newer.disks.iter().enumerate() {
            let od = match &older {
                Some(o) => Some(
                    o.disks
                        .get(i)
                        .ok_or_else(|| CheckpointError::Incompatible {
                            id: id.into(),
                            reason: format!("checkpoint {} has no disk {i}", o.id),
                        })?,
                ),
                None => None,
            };
            // The nearest layer both chains run through: the older one's top when it is on
            // the newer one's branch below it; else where the two branches part. The changes
            // are what either side holds above it.
            let mine = fold::chain_of(d);
            let shared = match od {
                Some(od) => {
                    let theirs = fold::chain_of(od);
                    let n = mine.iter().zip(&theirs).take_while(|(a, b)| a == b).count();
                    if n == 0 {
                        return Err(CheckpointError::Incompatible {
                            id: id.into(),
                            reason: format!(
                                "checkpoint {} has another launch disk {i}",
                                since.unwrap_or("-")
                            ),
                        });
                    }
                    Some((n, theirs))
                }
                None => None,
            };
            let (common, other_top) = match &shared {
                Some((n, theirs)) => (
                    mine[n - 1].path(&location),
                    theirs.last().map(|t| t.path(&location)),
                ),
                None => (d.launch.clone(), None),
            };
            let top = d.top(&location);
            let parents = chain_parents(d);
            let mut map = changes_above(&common, &top, &parents)?;
            if let Some(other) = other_top {
                let theirs = changes_above(&common, &other, &parents)?;
                map = union_changes(map, theirs);
            }
            out.push(map);
        }
        Ok(out)
    }

    /// Starts the VM from an export folder (`strata restore --checkpoint EXPORT`): the
    /// export's disk files are the bottom of the chains (never written: new layers go above
    /// them in the store), its state and memory files are used in place.
    pub fn apply_export(&mut self, dir: &Path) -> Result<(), CheckpointError> {
        let mut m = Manifest::load(&dir.join(snapshot::manifest::MANIFEST_FILE))?;
        m.disks = export_disk_records(&m, dir);
        self.apply_manifest(&m, dir, false)
    }

    /// Applies the checkpoint of manifest `m` whose files are in `dir`; `in_store`: it is one of
    /// the store's checkpoints (it becomes the current one), not an export.
    fn apply_manifest(
        &mut self,
        m: &Manifest,
        dir: &Path,
        in_store: bool,
    ) -> Result<(), CheckpointError> {
        let id = m.id.as_str();
        self.finish_folding();
        let location = self.store()?.location().to_path_buf();
        if m.disks.len() != self.config.disks.len() {
            return Err(CheckpointError::Incompatible {
                id: id.into(),
                reason: format!(
                    "it has {} disks, the VM {}",
                    m.disks.len(),
                    self.config.disks.len()
                ),
            });
        }
        let prepared = match m.kind {
            CheckpointType::Standard => Some(self.prepare_standard(m, dir, in_store)?),
            CheckpointType::Production => None,
        };
        self.halt(&format!("applying checkpoint {id}"));
        crash_point("apply-halted");
        let tag = snapshot::store::new_id();
        let mut after = Vec::with_capacity(m.disks.len());
        let mut made: Vec<PathBuf> = Vec::new();
        let read_only: Vec<bool> = self.config.disks.iter().map(|d| d.read_only).collect();
        // A standard apply makes its new layers durable and records them off its critical
        // path, holding the new VM's disks until then; a production apply leaves the VM off.
        let deferred = prepared.is_some();
        let (next_generation, events) = (self.generation + 1, self.events.clone());
        let store = self.store()?;
        for (d, ro) in m.disks.iter().zip(read_only) {
            if ro {
                after.push(d.clone());
                continue;
            }
            let layer = store.new_layer_path(d.index, &format!("{id}-{tag}"))?;
            let path = layer.resolve(&location);
            let parent = d.top(&location);
            let created = if deferred {
                disk::create_layer_unsynced(&parent, &path, &chain_parents(d))
            } else {
                disk::create_layer_with(&parent, &path, &chain_parents(d))
            };
            if let Err(source) = created {
                for p in &made {
                    let _ = std::fs::remove_file(p);
                }
                self.last_exit = Some(format!("applying checkpoint {id} failed"));
                return Err(CheckpointError::Layer {
                    path,
                    parent,
                    source: Box::new(source),
                });
            }
            made.push(path);
            after.push(DiskRecord {
                index: d.index,
                below: d.store_layers().cloned().collect(),
                layer: Some(layer),
                launch: d.launch.clone(),
            });
        }
        crash_point("apply-layers");
        let current = in_store.then_some(id);
        let recorded = if deferred {
            let done = move |r: &snapshot::Result<()>| {
                if r.is_ok() {
                    crash_point("apply-recorded");
                }
                let _ = events.send(crate::vm::VmEvent::LayersRecorded(next_generation));
            };
            store.set_current_deferred(current, after, made.clone(), done)
        } else {
            store.set_current(current, after)
        };
        if let Err(e) = recorded {
            for p in &made {
                let _ = std::fs::remove_file(p);
            }
            self.last_exit = Some(format!("applying checkpoint {id} failed: {e}"));
            return Err(e.into());
        }
        let Some((saved, mfile)) = prepared else {
            crash_point("apply-recorded");
            self.last_exit = Some(format!("applied production checkpoint {id}"));
            self.remove_discarded_layers(id);
            return Ok(());
        };
        // From here on the disks are held until the record is durable.
        self.held = Some(id.to_string());
        let result = (|| {
            let memory =
                crate::memory::from_checkpoint(&mfile, self.config.memory).map_err(|source| {
                    CheckpointError::Memory {
                        id: id.into(),
                        source,
                    }
                })?;
            self.generation += 1;
            let events = EventTx::new(&self.events, self.generation);
            let config = self.boot_config();
            let vm = Vm::restore_from(&self.platform, &config, memory, &saved.vm, &events)
                .map_err(|source| CheckpointError::Restore {
                    id: id.into(),
                    source,
                })?;
            if let Err(e) = vm.resume_holding_disks() {
                vm.shutdown();
                return Err(CheckpointError::Pause(e));
            }
            Ok(vm)
        })();
        match result {
            Ok(vm) => {
                self.vm = Some(vm);
                self.paused = false;
                self.last_exit = None;
                Ok(())
            }
            Err(e) => {
                self.last_exit = Some(format!(
                    "applying checkpoint {id} failed: {}",
                    crate::error_line(&e)
                ));
                Err(e)
            }
        }
    }

    /// After an apply: removes the layers nothing needs any more (the discarded state's).
    fn remove_discarded_layers(&mut self, id: &str) {
        let Some(store) = self.store.as_mut() else {
            return;
        };
        match store.remove_unused_layers() {
            Ok(gone) if !gone.is_empty() => {
                log::info!("applying checkpoint {id}: removed the discarded layers {gone:?}")
            }
            Ok(_) => {}
            Err(e) => log::warn!("applying checkpoint {id}: removing discarded layers: {e}"),
        }
    }

    /// Reads and checks what applying standard checkpoint `m` needs, before anything changes.
    fn prepare_standard(
        &self,
        m: &Manifest,
        dir: &Path,
        same_disks: bool,
    ) -> Result<(SavedVm, MemoryFile), CheckpointError> {
        let id = m.id.clone();
        let state_path = dir.join(STATE_FILE);
        let (bytes, digest) =
            snapshot::state::read_state_bytes(&state_path, snapshot::state::DEFAULT_STATE_CAP)?;
        if m.state.as_ref() != Some(&digest) {
            return Err(snapshot::Error::invalid(
                &state_path,
                "its size or checksum differs from the manifest's",
            )
            .into());
        }
        let saved: SavedVm =
            serde_json::from_slice(&bytes).map_err(|source| snapshot::Error::Decode {
                path: state_path.clone(),
                source,
            })?;
        saved
            .machine
            .check_fits(&self.config, same_disks)
            .map_err(|reason| CheckpointError::Incompatible {
                id: id.clone(),
                reason,
            })?;
        let caps = self
            .platform
            .restore_check_caps()
            .map_err(|e| CheckpointError::Restore {
                id: id.clone(),
                source: crate::vm::RestoreError::Build(e),
            })?;
        saved
            .vm
            .check(&self.config, &caps)
            .map_err(|source| CheckpointError::BadState {
                id: id.clone(),
                path: state_path.clone(),
                source,
            })?;
        let record = m.memory.as_ref().ok_or_else(|| {
            snapshot::Error::invalid(
                dir.join("manifest.json"),
                "a standard checkpoint without memory",
            )
        })?;
        let mfile = MemoryFile::open(&dir.join(MEMORY_FILE), record)?;
        Ok((saved, mfile))
    }
}

/// The sub-clusters layers above `base` in the chain of `top` hold (none when `top` is
/// `base`).
fn changes_above(
    base: &Path,
    top: &Path,
    parents: &disk::ParentPolicy,
) -> Result<disk::ops::ChangeMap, CheckpointError> {
    let layer_err = |source| CheckpointError::Layer {
        path: top.to_path_buf(),
        parent: base.to_path_buf(),
        source: Box::new(source),
    };
    if fold::same_file(base, top) {
        let info = disk::ops::info_with(top, parents).map_err(layer_err)?;
        return Ok(disk::ops::ChangeMap {
            cluster_size: info.subcluster_size,
            virtual_size: info.virtual_size,
            changed_bytes: 0,
            ranges: Vec::new(),
        });
    }
    disk::ops::changed_clusters_with(base, top, parents).map_err(layer_err)
}

/// The union of two change maps of one disk: ranges sorted and coalesced.
fn union_changes(a: disk::ops::ChangeMap, b: disk::ops::ChangeMap) -> disk::ops::ChangeMap {
    let mut all: Vec<(u64, u64)> = a
        .ranges
        .iter()
        .chain(&b.ranges)
        .map(|r| (r.offset, r.offset + r.length))
        .collect();
    all.sort_unstable();
    let mut merged: Vec<(u64, u64)> = Vec::new();
    for (s, e) in all {
        match merged.last_mut() {
            Some(last) if s <= last.1 => last.1 = last.1.max(e),
            _ => merged.push((s, e)),
        }
    }
    let ranges: Vec<disk::ops::ChangedRange> = merged
        .into_iter()
        .map(|(offset, end)| disk::ops::ChangedRange {
            offset,
            length: end - offset,
        })
        .collect();
    disk::ops::ChangeMap {
        cluster_size: a.cluster_size.min(b.cluster_size).max(1),
        virtual_size: a.virtual_size.max(b.virtual_size),
        changed_bytes: ranges.iter().map(|r| r.length).sum(),
        ranges,
    }
}

/// Reads a checkpoint folder for `strata restore`: its manifest and the machine it was taken
/// of.
///
/// For an export folder the machine's disks are the export's disk files.
pub fn read_checkpoint_folder(dir: &Path) -> Result<(Manifest, SavedMachine), CheckpointError> {
    let m = Manifest::load(&dir.join(snapshot::manifest::MANIFEST_FILE))?;
    if m.kind != CheckpointType::Standard {
        return Err(CheckpointError::Unsupported(format!(
            "checkpoint {} is a production checkpoint: it holds disks only; start a VM on \
             them with strata run --state-dir",
            m.id
        )));
    }
    let state_path = dir.join(STATE_FILE);
    let mut saved: SavedVm = snapshot::state::read_state(&state_path)?;
    if m.export.is_some() {
        for (d, r) in saved
            .machine
            .disks
            .iter_mut()
            .zip(export_disk_records(&m, dir))
        {
            d.path = r.launch;
        }
    }
    Ok((m, saved.machine))
}

/// The file name of disk `index` in an export folder.
pub fn export_disk_name(index: u32, format: disk::ops::ConvertFormat) -> String {
    match format {
        disk::ops::ConvertFormat::Raw => format!("disk{index}.raw"),
        disk::ops::ConvertFormat::Strata => format!("disk{index}.strata"),
    }
}

/// An export's disks as launch disks: the export's files, absolute.
fn export_disk_records(m: &Manifest, dir: &Path) -> Vec<DiskRecord> {
    m.disks
        .iter()
        .map(|d| DiskRecord {
            index: d.index,
            layer: None,
            below: Vec::new(),
            launch: absolute(&d.top(dir)),
        })
        .collect()
}

/// Whether `dir` holds an export (its manifest says so) rather than a store's checkpoint.
pub fn is_export(dir: &Path) -> bool {
    Manifest::load(&dir.join(snapshot::manifest::MANIFEST_FILE)).is_ok_and(|m| m.export.is_some())
}

/// An export to write: everything it needs, taken from the store in the control loop, so the
/// copying runs on its own thread while the VM runs (a checkpoint's files never change).
#[derive(Debug, Clone)]
pub struct ExportJob {
    manifest: Manifest,
    /// The checkpoint's folder.
    from: PathBuf,
    /// The store's location (where its layers resolve).
    location: PathBuf,
    destination: PathBuf,
    format: disk::ops::ConvertFormat,
}

/// What an export wrote.
#[derive(Debug, Clone)]
pub struct ExportReport {
    /// The folder.
    pub destination: PathBuf,
    /// The disk files, in `--disk` order.
    pub disks: Vec<PathBuf>,
    /// The state file (standard).
    pub state: Option<PathBuf>,
    /// The memory file (standard).
    pub memory: Option<PathBuf>,
    /// Bytes written (data, not holes).
    pub bytes: u64,
}

impl Machine {
    /// Prepares the export of checkpoint `id` into `destination` (which must not exist, or be
    /// an empty folder).
    pub fn prepare_export(
        &mut self,
        id: &str,
        destination: &Path,
        format: disk::ops::ConvertFormat,
    ) -> Result<ExportJob, CheckpointError> {
        self.finish_folding();
        let store = self.store()?;
        let manifest = store.get(id)?;
        let empty_dir = std::fs::read_dir(destination).is_ok_and(|mut d| d.next().is_none());
        if destination.exists() && !empty_dir {
            return Err(CheckpointError::Export {
                path: destination.to_path_buf(),
                reason: "it exists and is not an empty folder".into(),
            });
        }
        Ok(ExportJob {
            from: store.checkpoint_dir(id),
            location: store.location().to_path_buf(),
            manifest,
            destination: destination.to_path_buf(),
            format,
        })
    }
}

impl ExportJob {
    /// The checkpoint exported.
    pub fn id(&self) -> &str {
        &self.manifest.id
    }

    /// Writes the export: every disk flattened (`disk::convert`), the state and memory files
    /// of a standard checkpoint copied (the memory file stays sparse), and a manifest with
    /// the files' checksums — all into a hidden temporary folder beside the destination,
    /// fsynced, then renamed into place, so the destination appears whole or not at all.
    /// `progress(done, total)` counts bytes of virtual disk flattened.
    pub fn run(&self, progress: &mut dyn FnMut(u64, u64)) -> Result<ExportReport, CheckpointError> {
        let dest = &self.destination;
        let fail = |reason: String| CheckpointError::Export {
            path: dest.clone(),
            reason,
        };
        let parent = dest
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .ok_or_else(|| fail("it has no parent folder".into()))?;
        let name = dest
            .file_name()
            .ok_or_else(|| fail("it has no name".into()))?;
        let tmp = parent.join(format!(
            ".{}.tmp-{}",
            name.to_string_lossy(),
            snapshot::store::new_id()
        ));
        std::fs::create_dir(&tmp).map_err(|e| fail(format!("create {}: {e}", tmp.display())))?;
        let result = self.write_into(&tmp, progress);
        let result = result.and_then(|report| {
            if dest.exists() {
                std::fs::remove_dir(dest)
                    .map_err(|e| fail(format!("replace the empty folder: {e}")))?;
            }
            std::fs::rename(&tmp, dest).map_err(|e| fail(format!("rename into place: {e}")))?;
            snapshot::fsutil::sync_dir(parent)?;
            Ok(report)
        });
        if result.is_err() {
            let _ = std::fs::remove_dir_all(&tmp);
        }
        result.map(|mut r| {
            let rebase = |p: &mut PathBuf| {
                if let Some(n) = p.file_name() {
                    *p = dest.join(n);
                }
            };
            r.disks.iter_mut().for_each(rebase);
            r.state.iter_mut().for_each(rebase);
            r.memory.iter_mut().for_each(rebase);
            r.destination = dest.clone();
            r
        })
    }

    fn write_into(
        &self,
        tmp: &Path,
        progress: &mut dyn FnMut(u64, u64),
    ) -> Result<ExportReport, CheckpointError> {
        let m = &self.manifest;
        let mut bytes = 0;
        // Progress over every disk's virtual size.
        let sizes: Vec<u64> = m
            .disks
            .iter()
            .map(|d| {
                disk::ops::info_with(&d.top(&self.location), &chain_parents(d))
                    .map(|i| i.virtual_size)
                    .unwrap_or(0)
            })
            .collect();
        let total: u64 = sizes.iter().sum();
        let mut base = 0;
        let mut disks = Vec::new();
        let mut digests = Vec::new();
        let mut records = Vec::new();
        for (d, size) in m.disks.iter().zip(&sizes) {
            let src = d.top(&self.location);
            let name = export_disk_name(d.index, self.format);
            let out = tmp.join(&name);
            // A raw file is checksummed as it is written; a Strata one is read back.
            let mut digester = snapshot::memory::SparseDigester::new(*size);
            disk::ops::convert_observed(
                &src,
                &out,
                self.format,
                &chain_parents(d),
                &mut |done, _| progress(base + done, total),
                &mut |offset, data| digester.feed(offset, data),
            )
            .map_err(|source| CheckpointError::Layer {
                path: out.clone(),
                parent: src.clone(),
                source: Box::new(source),
            })?;
            base += size;
            let digest = match self.format {
                disk::ops::ConvertFormat::Raw => digester.finish(&out)?,
                disk::ops::ConvertFormat::Strata => snapshot::memory::sparse_digest(&out)?,
            };
            bytes += digest.allocated;
            digests.push(snapshot::manifest::ExportedFile {
                file: name.clone(),
                size: digest.size,
                crc64: digest.crc64,
            });
            records.push(DiskRecord {
                index: d.index,
                layer: Some(snapshot::manifest::StorePath::new(name).map_err(|e| {
                    CheckpointError::Export {
                        path: out.clone(),
                        reason: e,
                    }
                })?),
                below: Vec::new(),
                launch: d.launch.clone(),
            });
            disks.push(out);
        }
        let (mut state, mut memory) = (None, None);
        if m.state.is_some() {
            let from = self.from.join(STATE_FILE);
            let to = tmp.join(STATE_FILE);
            bytes += snapshot::memory::copy_sparse(&from, &to)?;
            state = Some(to);
        }
        if m.memory.is_some() {
            let from = self.from.join(MEMORY_FILE);
            let to = tmp.join(MEMORY_FILE);
            bytes += snapshot::memory::copy_sparse(&from, &to)?;
            memory = Some(to);
        }
        let mut out = m.clone();
        out.active_after = records.clone();
        out.disks = records;
        out.export = Some(snapshot::manifest::ExportRecord {
            from: self.from.clone(),
            disk_format: match self.format {
                disk::ops::ConvertFormat::Raw => "raw".into(),
                disk::ops::ConvertFormat::Strata => "strata".into(),
            },
            disks: digests,
        });
        out.save(&tmp.join(snapshot::manifest::MANIFEST_FILE))?;
        snapshot::fsutil::sync_dir(tmp)?;
        Ok(ExportReport {
            destination: tmp.to_path_buf(),
            disks,
            state,
            memory,
            bytes,
        })
    }
}

/// The environment variable of [`fold_step_delay`].
pub const FOLD_STEP_DELAY_ENV: &str = "STRATA_TEST_FOLD_STEP_MS";

/// A test hook: with `STRATA_TEST_FOLD_STEP_MS=N` the control loop sleeps N ms after each
/// step of a background fold, so a test can watch the API answer while a merge is under way.
pub fn fold_step_delay() -> Option<std::time::Duration> {
    static DELAY: std::sync::OnceLock<Option<std::time::Duration>> = std::sync::OnceLock::new();
    *DELAY.get_or_init(|| {
        std::env::var(FOLD_STEP_DELAY_ENV)
            .ok()
            .and_then(|v| v.parse().ok())
            .map(std::time::Duration::from_millis)
    })
}

/// The environment variable of [`crash_point`].
pub const CRASH_AT_ENV: &str = "STRATA_CRASH_AT";

/// A test hook for crash tests: when `STRATA_CRASH_AT` names `point`, the VMM kills itself
/// with SIGKILL there, so a test can stop it at an exact step of a checkpoint operation and
/// check what a restart finds. The points, in order:
/// - create: `create-begun` (temporary folder made), `create-switched` (disks on their new
///   layers, VM still paused), `create-state-written`, `create-memory-written`,
///   `create-renamed` (folder renamed into place, store record not yet updated);
/// - apply: `apply-halted` (old VM gone), `apply-layers` (new layers made, not recorded),
///   `apply-recorded` (store record names them, VM not yet built).
pub fn crash_point(point: &str) {
    static AT: std::sync::OnceLock<Option<String>> = std::sync::OnceLock::new();
    if AT
        .get_or_init(|| std::env::var(CRASH_AT_ENV).ok())
        .as_deref()
        == Some(point)
    {
        log::error!("{CRASH_AT_ENV}={point}: killing the VMM here");
        // SAFETY: sends SIGKILL to this process; no memory is involved.
        unsafe { libc::kill(libc::getpid(), libc::SIGKILL) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::ConsoleConfig;

    fn config() -> VmConfig {
        VmConfig {
            kernel: Kernel::TestGuest,
            initrd: None,
            cmdline: "console=ttyS0".into(),
            vcpus: 2,
            memory: 256 << 20,
            reboot: true,
            console: ConsoleConfig::None,
            disks: vec![
                DiskConfig {
                    path: "/images/a.raw".into(),
                    read_only: false,
                    l2_cache_size: None,
                },
                DiskConfig {
                    path: "/images/b.raw".into(),
                    read_only: true,
                    l2_cache_size: Some(1 << 20),
                },
            ],
            vsock: Some(VsockConfig {
                cid: 3,
                socket: "/run/v.sock".into(),
            }),
            api_socket: None,
            checkpoint: Default::default(),
        }
    }

    #[test]
    fn the_saved_machine_rebuilds_the_configuration_with_the_new_host_settings() {
        let saved = SavedMachine::of(&config());
        let json = serde_json::to_string(&saved).unwrap();
        let back: SavedMachine = serde_json::from_str(&json).unwrap();
        assert_eq!(back, saved);
        let mut host = config();
        host.api_socket = Some("/run/api.sock".into());
        host.checkpoint.location = Some("/state".into());
        host.console = ConsoleConfig::Stdio;
        let c = back.to_config(&host);
        assert_eq!(c.api_socket, host.api_socket);
        assert_eq!(c.checkpoint.location.as_deref(), Some("/state"));
        assert_eq!(c.console, ConsoleConfig::Stdio);
        assert_eq!(SavedMachine::of(&c), saved);
        assert!(saved.check_fits(&c, true).is_ok());
    }

    #[test]
    fn a_checkpoint_of_another_machine_does_not_fit_and_says_why() {
        let saved = SavedMachine::of(&config());
        let mut other = config();
        other.vcpus = 4;
        assert!(saved
            .check_fits(&other, true)
            .unwrap_err()
            .contains("2 vCPUs"));
        let mut other = config();
        other.memory = 512 << 20;
        assert!(saved
            .check_fits(&other, true)
            .unwrap_err()
            .contains("256 MiB"));
        let mut other = config();
        other.disks.pop();
        assert!(saved
            .check_fits(&other, true)
            .unwrap_err()
            .contains("disks"));
        let mut other = config();
        other.vsock = None;
        assert!(saved
            .check_fits(&other, true)
            .unwrap_err()
            .contains("vsock"));
    }

    #[test]
    fn a_store_of_another_vm_is_refused_naming_both_disk_lists() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = Store::open(dir.path()).unwrap();
        assert!(check_store_fits(&store, &config()).is_ok());
        let layer = store.new_layer_path(0, "x").unwrap();
        std::fs::write(layer.resolve(dir.path()), b"").unwrap();
        store
            .set_current(
                None,
                vec![DiskRecord {
                    index: 0,
                    layer: Some(layer),
                    below: Vec::new(),
                    launch: "/images/other.raw".into(),
                }],
            )
            .unwrap();
        let err = check_store_fits(&store, &config()).unwrap_err().to_string();
        assert!(err.contains("other.raw") && err.contains("a.raw"), "{err}");
    }
}
