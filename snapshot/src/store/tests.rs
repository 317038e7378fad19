use super::*;
use crate::manifest::{CheckpointType, Consistency};
use std::os::unix::fs::FileExt;

const LAUNCH: &str = "/dev/null";

/// Makes a checkpoint the way the VMM will: begin, state and memory (standard), new active
/// layers in `layers/`, commit. `crash` stops after the commit's rename.
fn take(store: &mut Store, name: &str, standard: bool, crash: bool) -> Manifest {
    let p = store.begin(name).unwrap();
    assert!(p
        .dir()
        .file_name()
        .unwrap()
        .to_string_lossy()
        .starts_with(TMP_PREFIX));
    assert!(!store.checkpoint_dir(p.id()).exists());
    let (state, memory) = if standard {
        let state = p
            .write_state(&serde_json::json!({"vcpus": [1, 2], "name": name}))
            .unwrap();
        let mut mem = vec![0u8; 1 << 20];
        mem[4096..8192].fill(name.len() as u8 + 1);
        let regions = [GuestRegion {
            guest_addr: 0,
            data: &mem,
            dirty: None,
            base: None,
        }];
        let opts = WriteOptions {
            checksum: true,
            ..Default::default()
        };
        let (rec, _) = p.write_memory(&regions, opts).unwrap();
        (Some(state), Some(rec))
    } else {
        (None, None)
    };
    let disks: Vec<DiskRecord> = if store.active().is_empty() {
        (0..2)
            .map(|i| DiskRecord {
                index: i,
                layer: None,
                below: Vec::new(),
                launch: LAUNCH.into(),
            })
            .collect()
    } else {
        store.active().to_vec()
    };
    let active_after: Vec<DiskRecord> = (0..2)
        .map(|i| {
            let layer = store.new_layer_path(i, p.id()).unwrap();
            std::fs::write(layer.resolve(store.location()), b"layer").unwrap();
            DiskRecord {
                index: i,
                layer: Some(layer),
                below: disks[i as usize].store_layers().cloned().collect(),
                launch: LAUNCH.into(),
            }
        })
        .collect();
    let info = CommitInfo {
        kind: if standard {
            CheckpointType::Standard
        } else {
            CheckpointType::Production
        },
        consistency: if standard {
            Consistency::Standard
        } else {
            Consistency::ApplicationConsistent
        },
        disks,
        active_after,
        state,
        memory,
        disk_layers_size: 0,
        paused_us: None,
        frozen_us: None,
        agent_freeze: None,
        fallback_reason: None,
    };
    if crash {
        store.commit_folder(p, info).unwrap()
    } else {
        store.commit(p, info).unwrap()
    }
}

fn entries(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

#[test]
fn checkpoint_appears_by_renaming_its_temp_folder() {
    let dir = tempfile::tempdir().unwrap();
    let mut store = Store::open(dir.path()).unwrap();
    assert!(store.opened().is_clean());
    assert_eq!(store.current(), None);
    let m = take(&mut store, "first", true, false);
    let cdir = store.checkpoint_dir(&m.id);
    assert_eq!(entries(&cdir), ["manifest.json", "memory", "state"]);
    assert!(!entries(dir.path())
        .iter()
        .any(|e| e.starts_with(TMP_PREFIX)));
    assert_eq!(store.current(), Some(m.id.as_str()));
    assert_eq!(store.active(), &m.active_after[..]);
    assert_eq!(m.parent, None);
    assert_eq!(m.sequence, 1);
    assert_eq!(
        m.sizes.state,
        std::fs::metadata(cdir.join(STATE_FILE)).unwrap().len()
    );
    assert!(m.sizes.memory >= 4096);
    let back: serde_json::Value = state::read_state(&cdir.join(STATE_FILE)).unwrap();
    assert_eq!(back["name"], "first");
    // A production checkpoint on top: no state, no memory, parent is the first.
    let p = take(&mut store, "prod", false, false);
    assert_eq!(entries(&store.checkpoint_dir(&p.id)), ["manifest.json"]);
    assert_eq!(p.parent.as_deref(), Some(m.id.as_str()));
    assert_eq!(p.disks, m.active_after);
    drop(store);
    let store = Store::open(dir.path()).unwrap();
    assert!(store.opened().is_clean(), "{:?}", store.opened());
    assert_eq!(store.current(), Some(p.id.as_str()));
    assert_eq!(store.get(&m.id).unwrap(), m);
    assert_eq!(store.list().unwrap(), vec![m, p]);
    assert!(matches!(store.get("nope"), Err(Error::NotFound { .. })));
    assert!(matches!(store.get("../x"), Err(Error::NotFound { .. })));
    let report = store.check();
    assert!(report.is_clean(), "{:?}", report.problems);
    assert_eq!(report.checkpoints, 2);
}

#[test]
fn an_abandoned_checkpoint_leaves_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    let p = store.begin("x").unwrap();
    p.write_state_bytes(b"{}").unwrap();
    let tmp = p.dir().to_path_buf();
    p.abort().unwrap();
    assert!(!tmp.exists());
    let p = store.begin("y").unwrap();
    let tmp = p.dir().to_path_buf();
    drop(p);
    assert!(!tmp.exists());
    assert!(store.list().unwrap().is_empty());
}

#[test]
fn leftover_temp_folder_and_orphan_layers_are_cleaned_on_open() {
    let dir = tempfile::tempdir().unwrap();
    let mut store = Store::open(dir.path()).unwrap();
    let first = take(&mut store, "first", true, false);
    // A crash mid-create: the temp folder with a state file and a new layer exist, no commit.
    let p = store.begin("crashed").unwrap();
    p.write_state_bytes(b"{}").unwrap();
    let tmp = p.dir().to_path_buf();
    let orphan = store
        .new_layer_path(0, p.id())
        .unwrap()
        .resolve(store.location());
    std::fs::write(&orphan, b"layer").unwrap();
    std::mem::forget(p);
    drop(store);

    let store = Store::open(dir.path()).unwrap();
    let r = store.opened();
    assert_eq!(r.removed_temp, vec![tmp.clone()]);
    assert_eq!(r.removed_layers, vec![orphan.clone()]);
    assert_eq!(r.rolled_forward, None);
    assert!(!tmp.exists() && !orphan.exists());
    assert_eq!(store.current(), Some(first.id.as_str()));
    assert_eq!(store.list().unwrap(), vec![first.clone()]);
    // The active layers and the checkpoint's files are still there.
    for d in &first.active_after {
        assert!(d
            .layer
            .as_ref()
            .unwrap()
            .resolve(store.location())
            .is_file());
    }
    assert!(store.check().is_clean());
}

#[test]
fn crash_between_commit_and_record_rolls_forward() {
    let dir = tempfile::tempdir().unwrap();
    let mut store = Store::open(dir.path()).unwrap();
    let c1 = take(&mut store, "c1", true, false);
    let c2 = take(&mut store, "c2", true, true);
    // store.json still names c1 and its layers.
    let rec = StoreRecord::load(&dir.path().join(STORE_FILE))
        .unwrap()
        .unwrap();
    assert_eq!(rec.current.as_deref(), Some(c1.id.as_str()));
    assert_eq!(rec.active, c1.active_after);
    drop(store);

    let store = Store::open(dir.path()).unwrap();
    let r = store.opened();
    assert_eq!(r.rolled_forward.as_deref(), Some(c2.id.as_str()));
    assert!(r.removed_layers.is_empty(), "{r:?}");
    assert_eq!(store.current(), Some(c2.id.as_str()));
    assert_eq!(store.active(), &c2.active_after[..]);
    assert_eq!(c2.parent.as_deref(), Some(c1.id.as_str()));
    assert_eq!(c2.disks, c1.active_after);
    let rec = StoreRecord::load(&dir.path().join(STORE_FILE))
        .unwrap()
        .unwrap();
    assert_eq!(
        (rec.sequence, rec.current.as_deref()),
        (2, Some(c2.id.as_str()))
    );
    assert!(store.check().is_clean(), "{:?}", store.check().problems);
    drop(store);
    // Once adopted, nothing more to do.
    assert!(Store::open(dir.path()).unwrap().opened().is_clean());
}

#[test]
fn crash_before_the_first_record_rolls_forward_too() {
    let dir = tempfile::tempdir().unwrap();
    let mut store = Store::open(dir.path()).unwrap();
    let c1 = take(&mut store, "c1", false, true);
    assert!(!dir.path().join(STORE_FILE).exists());
    drop(store);
    let store = Store::open(dir.path()).unwrap();
    assert_eq!(
        store.opened().rolled_forward.as_deref(),
        Some(c1.id.as_str())
    );
    assert_eq!(store.active(), &c1.active_after[..]);
}

#[test]
fn list_as_a_tree() {
    let dir = tempfile::tempdir().unwrap();
    let mut store = Store::open(dir.path()).unwrap();
    let c1 = take(&mut store, "c1", true, false);
    let c2 = take(&mut store, "c2", false, false);
    // Apply c1 (new layers above its frozen ones), then checkpoint again: a branch.
    let layers: Vec<DiskRecord> = c1
        .disks
        .iter()
        .map(|d| {
            let l = store
                .new_layer_path(d.index, &format!("{}-apply", c1.id))
                .unwrap();
            std::fs::write(l.resolve(store.location()), b"layer").unwrap();
            DiskRecord {
                layer: Some(l),
                ..d.clone()
            }
        })
        .collect();
    store.set_current(Some(&c1.id), layers).unwrap();
    let c3 = take(&mut store, "c3", true, false);
    let c4 = take(&mut store, "c4", true, false);
    assert_eq!(c3.parent.as_deref(), Some(c1.id.as_str()));
    let tree = store.tree().unwrap();
    assert_eq!(tree.len(), 1);
    let root = &tree[0];
    assert_eq!(root.manifest.id, c1.id);
    let kids: Vec<&str> = root
        .children
        .iter()
        .map(|n| n.manifest.id.as_str())
        .collect();
    assert_eq!(kids, [c2.id.as_str(), c3.id.as_str()]);
    assert_eq!(root.children[1].children[0].manifest.id, c4.id);
    assert!(root.children[1].children[0].current);
    assert!(!root.current && !root.children[0].current);
    assert!(store.check().is_clean(), "{:?}", store.check().problems);
    assert!(store.set_current(Some("missing"), vec![]).is_err());
}

#[test]
fn check_finds_corrupted_and_missing_files() {
    let dir = tempfile::tempdir().unwrap();
    let mut store = Store::open(dir.path()).unwrap();
    let c1 = take(&mut store, "c1", true, false);
    let c2 = take(&mut store, "c2", true, false);
    assert!(store.check().is_clean());
    let d1 = store.checkpoint_dir(&c1.id);

    let flip = |path: &Path, at: u64| {
        let f = OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .unwrap();
        let mut b = [0u8];
        f.read_exact_at(&mut b, at).unwrap();
        f.write_all_at(&[b[0] ^ 1], at).unwrap();
    };
    let only_problem = |store: &Store, path: &Path| {
        let r = store.check();
        assert_eq!(r.problems.len(), 1, "{:?}", r.problems);
        assert_eq!(r.problems[0].path, path);
        assert!(
            r.problems[0].message.contains(&*path.to_string_lossy()),
            "{}",
            r.problems[0]
        );
        r.problems[0].message.clone()
    };

    let state = d1.join(STATE_FILE);
    flip(&state, 30);
    assert!(only_problem(&store, &state).contains("checksum mismatch"));
    flip(&state, 30);
    let memory = d1.join(MEMORY_FILE);
    flip(&memory, 5000);
    assert!(only_problem(&store, &memory).contains("checksum mismatch in memory region 0"));
    flip(&memory, 5000);
    assert!(store.check().is_clean());
    // A state file replaced by another valid one: its digest differs from the manifest's.
    let good = std::fs::read(&state).unwrap();
    state::write_state_bytes(&state, b"{\"other\":1}").unwrap();
    assert!(only_problem(&store, &state).contains("differ from the manifest"));
    std::fs::write(&state, &good).unwrap();
    // A missing layer, a truncated memory file, an unreadable manifest.
    let layer = c2.active_after[1]
        .layer
        .as_ref()
        .unwrap()
        .resolve(store.location());
    std::fs::rename(&layer, dir.path().join("aside")).unwrap();
    let r = store.check();
    // From store.json: c2's manifest no longer answers for its active layers once the record
    // has adopted them.
    assert_eq!(r.problems.len(), 1, "{:?}", r.problems);
    assert!(r
        .problems
        .iter()
        .all(|p| p.path == layer && p.message.contains("missing")));
    std::fs::rename(dir.path().join("aside"), &layer).unwrap();
    let len = std::fs::metadata(&memory).unwrap().len();
    OpenOptions::new()
        .write(true)
        .open(&memory)
        .unwrap()
        .set_len(len - 4096)
        .unwrap();
    assert!(only_problem(&store, &memory).contains("truncated"));
    OpenOptions::new()
        .write(true)
        .open(&memory)
        .unwrap()
        .set_len(len)
        .unwrap();
    let manifest = store.checkpoint_dir(&c2.id).join(MANIFEST_FILE);
    std::fs::write(&manifest, b"{\"format_version\": 1, \"id\": ").unwrap();
    let r = store.check();
    assert!(
        r.problems
            .iter()
            .any(|p| p.message.contains(&*manifest.to_string_lossy())),
        "{:?}",
        r.problems
    );
    assert!(store
        .list()
        .unwrap_err()
        .to_string()
        .contains(&*manifest.to_string_lossy()));
}

#[test]
fn parent_cycles_and_dangling_parents_are_reported() {
    let dir = tempfile::tempdir().unwrap();
    let mut store = Store::open(dir.path()).unwrap();
    let c1 = take(&mut store, "c1", false, false);
    let c2 = take(&mut store, "c2", false, false);
    let mut m1 = c1.clone();
    m1.parent = Some(c2.id.clone());
    m1.save(&store.checkpoint_dir(&c1.id).join(MANIFEST_FILE))
        .unwrap();
    let r = store.check();
    assert!(
        r.problems.iter().any(|p| p.message.contains("cycle")),
        "{:?}",
        r.problems
    );
    assert!(store.tree().is_err());
    m1.parent = Some("gone".into());
    m1.save(&store.checkpoint_dir(&c1.id).join(MANIFEST_FILE))
        .unwrap();
    let r = store.check();
    assert!(
        r.problems
            .iter()
            .any(|p| p.message.contains("parent gone does not exist")),
        "{:?}",
        r.problems
    );
    // A checkpoint with a dangling parent is a root of the tree.
    assert_eq!(store.tree().unwrap()[0].manifest.id, c1.id);
}

#[test]
fn one_process_at_a_time() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    let err = Store::open(dir.path()).unwrap_err();
    assert!(matches!(err, Error::Locked { .. }), "{err}");
    drop(store);
    Store::open(dir.path()).unwrap();
}

#[test]
fn a_bad_store_record_is_named() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join(STORE_FILE), b"{\"format_version\": 9}").unwrap();
    let err = Store::open(dir.path()).unwrap_err();
    assert!(
        matches!(err, Error::UnsupportedVersion { found: 9, .. }),
        "{err}"
    );
    std::fs::write(dir.path().join(STORE_FILE), b"garbage").unwrap();
    let err = Store::open(dir.path()).unwrap_err();
    assert!(err.to_string().contains("store.json"), "{err}");
}

#[test]
fn delete_anywhere_keeps_every_layer_another_chain_needs_and_reparents_children() {
    let d = tempfile::tempdir().unwrap();
    let mut store = Store::open(d.path()).unwrap();
    let a = take(&mut store, "a", true, false);
    let b = take(&mut store, "b", false, false);
    let c = take(&mut store, "c", true, false);
    let layers_before = entries(&d.path().join(LAYERS_DIR));
    assert_eq!(layers_before.len(), 6);

    // The middle one: its folder goes, its child hangs from its parent, every layer stays
    // (a's active layers are b's frozen ones, still in c's chain and the active chain).
    assert!(store.delete(&b.id).unwrap().is_empty());
    assert!(!store.checkpoint_dir(&b.id).exists());
    assert_eq!(
        store.get(&c.id).unwrap().parent.as_deref(),
        Some(a.id.as_str())
    );
    assert_eq!(entries(&d.path().join(LAYERS_DIR)), layers_before);
    assert!(store.check().is_clean(), "{:?}", store.check());

    // The current one: its parent becomes current; the VM's chain keeps every layer.
    assert_eq!(store.current(), Some(c.id.as_str()));
    assert!(store.delete(&c.id).unwrap().is_empty());
    assert_eq!(store.current(), Some(a.id.as_str()));
    assert_eq!(entries(&d.path().join(LAYERS_DIR)), layers_before);

    // The root, whose disks are the launch disks.
    store.delete(&a.id).unwrap();
    assert_eq!(store.current(), None);
    assert!(store.list().unwrap().is_empty());
    assert_eq!(entries(&d.path().join(LAYERS_DIR)), layers_before);
    assert!(store.check().is_clean(), "{:?}", store.check());
    drop(store);
    let store = Store::open(d.path()).unwrap();
    assert!(store.opened().is_clean(), "{:?}", store.opened());
    assert_eq!(store.active().len(), 2);
}

#[test]
fn deleting_a_checkpoint_nothing_runs_on_frees_its_layers_and_a_crash_mid_delete_finishes_on_open()
{
    let d = tempfile::tempdir().unwrap();
    let mut store = Store::open(d.path()).unwrap();
    let a = take(&mut store, "a", true, false);
    let b = take(&mut store, "b", true, false);
    // Apply a: new active layers above a's disks (the launch disks); b's chain is now only b's.
    let fresh: Vec<DiskRecord> = a
        .disks
        .iter()
        .map(|r| {
            let l = store.new_layer_path(r.index, "a-applied").unwrap();
            std::fs::write(l.resolve(store.location()), b"layer").unwrap();
            DiskRecord {
                layer: Some(l),
                ..r.clone()
            }
        })
        .collect();
    store.set_current(Some(&a.id), fresh).unwrap();
    store.remove_unused_layers().unwrap();
    // b froze a's active layers; deleting b frees them (nothing else runs through them).
    let gone = store.delete(&b.id).unwrap();
    assert_eq!(gone.len(), 2, "{gone:?}");
    assert!(store.check().is_clean(), "{:?}", store.check());

    // A crash right after the commit point (the rename) is finished by the next open.
    let c = take(&mut store, "c", true, false);
    // What delete does before its commit point: the parent becomes current.
    let active = store.active().to_vec();
    store.set_current(Some(&a.id), active).unwrap();
    let dir = store.checkpoint_dir(&c.id);
    let doomed = d.path().join(format!("{TMP_PREFIX}deleted-{}", c.id));
    std::fs::rename(&dir, &doomed).unwrap();
    drop(store);
    let store = Store::open(d.path()).unwrap();
    assert!(!doomed.exists());
    assert!(store.get(&c.id).is_err());
    assert!(store.check().is_clean(), "{:?}", store.check());
}

#[test]
fn a_deferred_record_is_the_store_s_at_once_reaches_the_disk_in_order_and_a_failure_takes_it_back()
{
    let d = tempfile::tempdir().unwrap();
    let loc = d.path().join("s");
    let mut store = Store::open(&loc).unwrap();
    let a = take(&mut store, "a", true, false);
    let new_active = |store: &Store, tag: &str| -> (Vec<DiskRecord>, Vec<PathBuf>) {
        let mut files = Vec::new();
        let recs = store
            .active()
            .iter()
            .map(|r| {
                let layer = store.new_layer_path(r.index, tag).unwrap();
                let path = layer.resolve(store.location());
                std::fs::write(&path, b"layer").unwrap();
                files.push(path);
                DiskRecord {
                    index: r.index,
                    layer: Some(layer),
                    below: r.store_layers().cloned().collect(),
                    launch: r.launch.clone(),
                }
            })
            .collect();
        (recs, files)
    };

    // Written on another thread; `done` hears the outcome; the store shows it at once.
    let (active, files) = new_active(&store, "x");
    let (tx, rx) = std::sync::mpsc::channel();
    store
        .set_current_deferred(Some(&a.id), active.clone(), files, move |r| {
            tx.send(r.is_ok()).unwrap();
        })
        .unwrap();
    assert_eq!(store.active(), &active[..]);
    assert!(rx.recv().unwrap());
    store.settle().unwrap();
    let on_disk = StoreRecord::load(&loc.join(STORE_FILE)).unwrap().unwrap();
    assert_eq!(on_disk.active, active);

    // A later change waits for the deferred write: the second record is the one on disk.
    let (first, files) = new_active(&store, "y");
    store
        .set_current_deferred(Some(&a.id), first, files, |_| ())
        .unwrap();
    let (second, _) = new_active(&store, "z");
    store.set_current(Some(&a.id), second.clone()).unwrap();
    let on_disk = StoreRecord::load(&loc.join(STORE_FILE)).unwrap().unwrap();
    assert_eq!(on_disk.active, second);

    // A new layer that cannot be synced (gone): the record is not written, `done` hears the
    // error, and the store takes back the record on disk.
    let (third, files) = new_active(&store, "w");
    for f in &files {
        std::fs::remove_file(f).unwrap();
    }
    let (tx, rx) = std::sync::mpsc::channel();
    let err = store.set_current_deferred(Some(&a.id), third.clone(), files, move |r| {
        tx.send(r.is_ok()).unwrap();
    });
    // The layers are checked to exist up front: refused before anything changes.
    assert!(err.is_err());
    assert!(rx.try_recv().is_err());
    assert_eq!(store.active(), &second[..]);
    let (fourth, mut files) = new_active(&store, "v");
    files.push(loc.join("layers").join("gone.strata"));
    let (tx, rx) = std::sync::mpsc::channel();
    store
        .set_current_deferred(Some(&a.id), fourth.clone(), files, move |r| {
            tx.send(r.is_ok()).unwrap();
        })
        .unwrap();
    assert!(!rx.recv().unwrap());
    let err = store.settle().unwrap_err().to_string();
    assert!(err.contains("gone.strata"), "{err}");
    assert_eq!(store.active(), &second[..]);
    let on_disk = StoreRecord::load(&loc.join(STORE_FILE)).unwrap().unwrap();
    assert_eq!(on_disk.active, second);
}
