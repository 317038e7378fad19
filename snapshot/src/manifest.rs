//! The checkpoint manifest (`manifest.json`): what a checkpoint is and which files make it up.
//!
//! Loading checks the format version before anything else (a future version is refused by
//! version, not by a confusing field error), then decodes strictly (unknown fields refused) and
//! validates: ids are plain names, layer paths are relative to the store with no `..`, the
//! files a checkpoint's type needs are there, the memory layout is sound.

use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use crate::error::{Error, IoContext, Result};
use crate::fsutil;
use crate::memory::MemoryRecord;
use crate::state::FileDigest;

/// The manifest format version this build writes and reads.
pub const MANIFEST_VERSION: u32 = 1;
/// The manifest's file name in a checkpoint folder.
pub const MANIFEST_FILE: &str = "manifest.json";
/// The state file's name in a checkpoint folder.
pub const STATE_FILE: &str = "state";
/// The memory file's name in a checkpoint folder.
pub const MEMORY_FILE: &str = "memory";
/// Manifests larger than this are refused before reading (they are a few KiB).
pub const MANIFEST_CAP: u64 = 4 << 20;

/// The type of checkpoint that was taken.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum CheckpointType {
    /// VM state, memory and disks.
    Standard,
    /// Disks only, with the guest quiesced (or not: see [`Consistency`]).
    Production,
}

/// How consistent the checkpoint's content is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Consistency {
    /// The whole running VM at one instant (a standard checkpoint).
    Standard,
    /// Disks with the guest's filesystems frozen by the agent.
    ApplicationConsistent,
    /// Disks at one instant without the guest's cooperation, as after a power cut.
    CrashConsistent,
}

/// Folder names in a store that are never checkpoint ids.
pub const RESERVED_IDS: &[&str] = &["layers", "lock"];

/// A checkpoint id: 1 to 64 ASCII letters, digits, `-` or `_`, not starting with `-`, and not
/// one of [`RESERVED_IDS`].
pub fn valid_id(id: &str) -> bool {
    !id.is_empty()
        && !RESERVED_IDS.contains(&id)
        && id.len() <= 64
        && !id.starts_with('-')
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

/// A path relative to the store's location, confined to it: not empty, not absolute, every
/// component a plain name (no `.`, `..`, empty components or NUL).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct StorePath(String);

impl StorePath {
    /// `path` if it is confined to the store, else why not.
    pub fn new(path: impl Into<String>) -> std::result::Result<StorePath, String> {
        let path = path.into();
        if path.is_empty() {
            return Err("empty path".into());
        }
        if path.starts_with('/') {
            return Err(format!(
                "{path:?} is absolute; paths must be inside the store"
            ));
        }
        for c in path.split('/') {
            if c.is_empty() || c == "." || c == ".." || c.contains('\0') {
                return Err(format!(
                    "{path:?} leaves the store or is not a plain relative path"
                ));
            }
        }
        Ok(StorePath(path))
    }

    /// The path under the store at `location`.
    pub fn resolve(&self, location: &Path) -> PathBuf {
        location.join(&self.0)
    }

    /// The path as written.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for StorePath {
    type Error = String;
    fn try_from(s: String) -> std::result::Result<Self, String> {
        StorePath::new(s)
    }
}

impl From<StorePath> for String {
    fn from(p: StorePath) -> String {
        p.0
    }
}

impl std::fmt::Display for StorePath {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// One disk of a checkpoint (or of the VM's active set).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DiskRecord {
    /// The disk's position in `--disk` order.
    pub index: u32,
    /// The top layer of the disk's chain, relative to the store; `None` when the chain is the
    /// launch disk alone (the first checkpoint of a VM freezes the launch disks themselves).
    pub layer: Option<StorePath>,
    /// The store's layers beneath `layer` in the chain, nearest first (the launch disk is not
    /// one of them). Every layer a record lists is kept by the store; `layer` alone does not
    /// say which frozen layers its chain runs through (a layer frozen by a checkpoint that
    /// failed after the disks switched belongs to no checkpoint but is in the chain).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub below: Vec<StorePath>,
    /// The launch disk given to `--disk`: the bottom of the chain (outside the store).
    pub launch: PathBuf,
}

impl DiskRecord {
    /// The top of the chain: its layer in the store, or the launch disk.
    pub fn top(&self, location: &Path) -> PathBuf {
        match &self.layer {
            Some(l) => l.resolve(location),
            None => self.launch.clone(),
        }
    }

    /// Every store layer of the chain, top first.
    pub fn store_layers(&self) -> impl Iterator<Item = &StorePath> {
        self.layer.iter().chain(&self.below)
    }
}

/// Sizes of a checkpoint's parts, in bytes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Sizes {
    /// The state file's length (0 without one).
    pub state: u64,
    /// The memory file's allocated size on disk when written (0 without one).
    pub memory: u64,
    /// The checkpoint's disk layers' allocated size when taken.
    pub disk_layers: u64,
}

/// A timestamp in RFC 3339 (`2025-01-31T12:00:00.123456Z`), checked on load.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Timestamp(String);

impl Timestamp {
    /// Now, in UTC with microseconds.
    pub fn now() -> Timestamp {
        Timestamp::from_system_time(SystemTime::now())
    }

    /// `t` in UTC with microseconds (times before 1970 clamp to the epoch).
    pub fn from_system_time(t: SystemTime) -> Timestamp {
        let d = t.duration_since(UNIX_EPOCH).unwrap_or_default();
        let secs = d.as_secs();
        let (days, rem) = (secs / 86400, secs % 86400);
        let (y, m, day) = civil_from_days(days as i64);
        Timestamp(format!(
            "{y:04}-{m:02}-{day:02}T{:02}:{:02}:{:02}.{:06}Z",
            rem / 3600,
            rem / 60 % 60,
            rem % 60,
            d.subsec_micros()
        ))
    }

    /// The timestamp as written.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// Days since 1970-01-01 to (year, month, day), proleptic Gregorian (H. Hinnant's algorithm).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (yoe + era * 400 + i64::from(m <= 2), m, d)
}

/// Whether `s` is an RFC 3339 date-time (`YYYY-MM-DDTHH:MM:SS[.frac](Z|±HH:MM)`).
fn is_rfc3339(s: &str) -> bool {
    let b = s.as_bytes();
    let num = |r: std::ops::Range<usize>| -> Option<u32> {
        let part = b.get(r)?;
        if part.iter().all(u8::is_ascii_digit) {
            std::str::from_utf8(part).ok()?.parse().ok()
        } else {
            None
        }
    };
    let (Some(y), Some(mo), Some(d), Some(h), Some(mi), Some(sec)) = (
        num(0..4),
        num(5..7),
        num(8..10),
        num(11..13),
        num(14..16),
        num(17..19),
    ) else {
        return false;
    };
    if b[4] != b'-'
        || b[7] != b'-'
        || !matches!(b[10], b'T' | b't' | b' ')
        || b[13] != b':'
        || b[16] != b':'
    {
        return false;
    }
    let leap = y % 4 == 0 && (y % 100 != 0 || y % 400 == 0);
    let mdays = [
        31,
        if leap { 29 } else { 28 },
        31,
        30,
        31,
        30,
        31,
        31,
        30,
        31,
        30,
        31,
    ];
    if !(1..=12).contains(&mo)
        || d == 0
        || d > mdays[(mo - 1) as usize]
        || h > 23
        || mi > 59
        || sec > 60
    {
        return false;
    }
    let mut i = 19;
    if b.get(i) == Some(&b'.') {
        i += 1;
        let start = i;
        while b.get(i).is_some_and(u8::is_ascii_digit) {
            i += 1;
        }
        if i == start {
            return false;
        }
    }
    match &b[i..] {
        [b'Z' | b'z'] => true,
        [b'+' | b'-', ..] if b.len() == i + 6 => {
            b[i + 3] == b':'
                && num(i + 1..i + 3).is_some_and(|h| h <= 23)
                && num(i + 4..i + 6).is_some_and(|m| m <= 59)
        }
        _ => false,
    }
}

impl TryFrom<String> for Timestamp {
    type Error = String;
    fn try_from(s: String) -> std::result::Result<Self, String> {
        if is_rfc3339(&s) {
            Ok(Timestamp(s))
        } else {
            Err(format!("{s:?} is not an RFC 3339 date-time"))
        }
    }
}

impl From<Timestamp> for String {
    fn from(t: Timestamp) -> String {
        t.0
    }
}

/// A checkpoint's manifest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    /// [`MANIFEST_VERSION`].
    pub format_version: u32,
    /// The checkpoint's id: also its folder's name.
    pub id: String,
    /// The user's name for it.
    pub name: String,
    /// The checkpoint the VM was running from when this one was taken, if any.
    pub parent: Option<String>,
    /// Commit order in the store: larger than that of every checkpoint committed before.
    pub sequence: u64,
    /// The type actually taken.
    #[serde(rename = "type")]
    pub kind: CheckpointType,
    /// How consistent its content is.
    pub consistency: Consistency,
    /// When it was taken.
    pub created: Timestamp,
    /// Per disk, in `--disk` order, the top of the chain frozen by this checkpoint.
    pub disks: Vec<DiskRecord>,
    /// Per disk, the new active layer the VM switched to when this checkpoint was taken; the
    /// store adopts these if it crashed before recording them (see `FORMAT.md`).
    pub active_after: Vec<DiskRecord>,
    /// The state file (standard checkpoints).
    pub state: Option<FileDigest>,
    /// The memory file's layout and checksums (standard checkpoints).
    pub memory: Option<MemoryRecord>,
    /// Sizes for display.
    pub sizes: Sizes,
    /// How long the guest was paused while the checkpoint was taken, in microseconds (a
    /// standard checkpoint of a running VM).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub paused_us: Option<u64>,
    /// A production checkpoint: how long the guest's filesystems were frozen by the agent
    /// (from its freeze reply to its thaw being asked), in microseconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub frozen_us: Option<u64>,
    /// A production checkpoint: the guest agent's freeze reply (`frozen` mount points, and what
    /// else the agent reports).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agent_freeze: Option<serde_json::Map<String, serde_json::Value>>,
    /// Why a production checkpoint was asked for but a standard one was taken (the agent could
    /// not quiesce the guest).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fallback_reason: Option<String>,
    /// Set in an export folder's manifest: where it came from and its disk files' checksums.
    /// The `disks` of an export name its flattened files (`disk0.raw`, ...) relative to the
    /// export folder.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub export: Option<ExportRecord>,
}

/// What an export adds to its manifest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExportRecord {
    /// The checkpoint folder it was exported from.
    pub from: PathBuf,
    /// `raw` or `strata`.
    pub disk_format: String,
    /// Every disk file, in `--disk` order, with its checksum.
    pub disks: Vec<ExportedFile>,
}

/// A file of an export and its checksum ([`crate::memory::sparse_digest`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExportedFile {
    /// Its name in the export folder.
    pub file: String,
    /// Its length in bytes.
    pub size: u64,
    /// Its checksum.
    pub crc64: u64,
}

impl Manifest {
    /// Checks everything serde cannot: ids, the parts a type needs, disk order, the memory
    /// layout. Returns what is wrong.
    pub fn validate(&self) -> std::result::Result<(), String> {
        if self.format_version != MANIFEST_VERSION {
            return Err(format!(
                "unsupported format version {}",
                self.format_version
            ));
        }
        if !valid_id(&self.id) {
            return Err(format!("invalid checkpoint id {:?}", self.id));
        }
        if let Some(p) = &self.parent {
            if !valid_id(p) || *p == self.id {
                return Err(format!("invalid parent {p:?}"));
            }
        }
        match (self.kind, &self.state, &self.memory) {
            (CheckpointType::Standard, Some(_), Some(_)) => {}
            (CheckpointType::Standard, _, _) => {
                return Err("a standard checkpoint needs a state and a memory file".into())
            }
            (CheckpointType::Production, None, None) => {}
            (CheckpointType::Production, _, _) => {
                return Err("a production checkpoint has no state or memory file".into())
            }
        }
        for (what, disks) in [("disks", &self.disks), ("active_after", &self.active_after)] {
            for (i, d) in disks.iter().enumerate() {
                if d.index as usize != i {
                    return Err(format!("{what}[{i}] has index {}", d.index));
                }
                if d.launch.as_os_str().is_empty() {
                    return Err(format!("{what}[{i}] has an empty launch path"));
                }
            }
        }
        if self.active_after.len() != self.disks.len() {
            return Err(format!(
                "{} disks but {} active layers after",
                self.disks.len(),
                self.active_after.len()
            ));
        }
        if let Some(m) = &self.memory {
            m.validate()?;
        }
        Ok(())
    }

    /// Loads and validates the manifest at `path`.
    pub fn load(path: &Path) -> Result<Manifest> {
        let len = std::fs::metadata(path).at(path, "stat")?.len();
        if len > MANIFEST_CAP {
            return Err(Error::TooLarge {
                path: path.into(),
                len,
                cap: MANIFEST_CAP,
            });
        }
        let bytes = std::fs::read(path).at(path, "read")?;
        Manifest::from_json(path, &bytes)
    }

    /// Decodes and validates manifest JSON (`path` names it in errors).
    pub fn from_json(path: &Path, bytes: &[u8]) -> Result<Manifest> {
        let value: serde_json::Value =
            serde_json::from_slice(bytes).map_err(|source| Error::Decode {
                path: path.into(),
                source,
            })?;
        let version = value
            .get("format_version")
            .and_then(serde_json::Value::as_u64);
        match version {
            Some(v) if v == u64::from(MANIFEST_VERSION) => {}
            Some(v) => {
                return Err(Error::UnsupportedVersion {
                    path: path.into(),
                    found: v,
                    supported: MANIFEST_VERSION.into(),
                })
            }
            None => {
                return Err(Error::invalid(
                    path,
                    "no format_version: not a Strata manifest",
                ))
            }
        }
        let m: Manifest = serde_json::from_value(value).map_err(|source| Error::Decode {
            path: path.into(),
            source,
        })?;
        m.validate()
            .map_err(|reason| Error::invalid(path, reason))?;
        Ok(m)
    }

    /// Writes the manifest to `path` atomically (pretty JSON).
    pub fn save(&self, path: &Path) -> Result<()> {
        self.validate()
            .map_err(|reason| Error::invalid(path, reason))?;
        let bytes = serde_json::to_vec_pretty(self).map_err(|source| Error::Encode {
            path: path.into(),
            source,
        })?;
        fsutil::write_atomic(path, &bytes)
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::memory::RegionRecord;

    pub(crate) fn sample(id: &str, parent: Option<&str>) -> Manifest {
        Manifest {
            format_version: MANIFEST_VERSION,
            id: id.into(),
            name: format!("name of {id}"),
            parent: parent.map(Into::into),
            sequence: 1,
            kind: CheckpointType::Standard,
            consistency: Consistency::Standard,
            created: Timestamp::now(),
            disks: vec![DiskRecord {
                index: 0,
                layer: None,
                below: Vec::new(),
                launch: "/images/root.raw".into(),
            }],
            active_after: vec![DiskRecord {
                index: 0,
                layer: Some(StorePath::new(format!("layers/disk0-{id}.strata")).unwrap()),
                below: Vec::new(),
                launch: "/images/root.raw".into(),
            }],
            state: Some(FileDigest { size: 40, crc64: 7 }),
            memory: Some(MemoryRecord {
                size: 4096,
                allocated: 0,
                regions: vec![RegionRecord {
                    guest_addr: 0,
                    size: 4096,
                    file_offset: 0,
                    crc64: Some(1),
                }],
            }),
            sizes: Sizes::default(),
            paused_us: None,
            frozen_us: None,
            agent_freeze: None,
            fallback_reason: None,
            export: None,
        }
    }

    #[test]
    fn manifest_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(MANIFEST_FILE);
        let m = sample("c1", None);
        m.save(&path).unwrap();
        assert_eq!(Manifest::load(&path).unwrap(), m);
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(text.contains("\"type\": \"standard\""), "{text}");
        assert!(text.contains("\"consistency\": \"standard\""), "{text}");
    }

    fn load_edited(edit: impl FnOnce(&mut serde_json::Value)) -> Result<Manifest> {
        let mut v = serde_json::to_value(sample("c1", Some("c0"))).unwrap();
        edit(&mut v);
        Manifest::from_json(
            Path::new("/s/c1/manifest.json"),
            &serde_json::to_vec(&v).unwrap(),
        )
    }

    #[test]
    fn manifest_validation_on_load() {
        assert!(load_edited(|_| {}).is_ok());
        let err = load_edited(|v| v["format_version"] = 2.into()).unwrap_err();
        assert!(
            matches!(err, Error::UnsupportedVersion { found: 2, .. }),
            "{err}"
        );
        for bad in ["/etc/passwd", "../x", "layers/../../x", "a//b", "./a", ""] {
            let err = load_edited(|v| v["active_after"][0]["layer"] = bad.into()).unwrap_err();
            assert!(
                err.to_string().starts_with("/s/c1/manifest.json: "),
                "{bad}: {err}"
            );
        }
        type Edit = Box<dyn FnOnce(&mut serde_json::Value)>;
        let cases: Vec<(&str, Edit)> = vec![
            ("id", Box::new(|v| v["id"] = "../x".into())),
            ("parent", Box::new(|v| v["parent"] = "c1".into())),
            ("type", Box::new(|v| v["type"] = "weird".into())),
            ("consistency", Box::new(|v| v["consistency"] = "meh".into())),
            ("created", Box::new(|v| v["created"] = "yesterday".into())),
            (
                "created",
                Box::new(|v| v["created"] = "2025-02-30T00:00:00Z".into()),
            ),
            ("unknown field", Box::new(|v| v["extra"] = 1.into())),
            (
                "no state",
                Box::new(|v| v["state"] = serde_json::Value::Null),
            ),
            ("index", Box::new(|v| v["disks"][0]["index"] = 3.into())),
            ("memory", Box::new(|v| v["memory"]["size"] = 8192.into())),
            (
                "production with memory",
                Box::new(|v| v["type"] = "production".into()),
            ),
        ];
        for (what, edit) in cases {
            let err = load_edited(edit).unwrap_err();
            assert!(
                err.to_string().starts_with("/s/c1/manifest.json: "),
                "{what}: {err}"
            );
        }
        let err = Manifest::from_json(Path::new("m"), b"{\"hello\":1}").unwrap_err();
        assert!(err.to_string().contains("not a Strata manifest"), "{err}");
    }

    #[test]
    fn timestamps() {
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        assert_eq!(civil_from_days(19_782), (2024, 2, 29));
        let t = Timestamp::from_system_time(
            UNIX_EPOCH + std::time::Duration::from_micros(1_700_000_000_123_456),
        );
        assert_eq!(t.as_str(), "2023-11-14T22:13:20.123456Z");
        assert!(is_rfc3339(Timestamp::now().as_str()));
        for ok in [
            "2024-02-29T23:59:60Z",
            "2024-01-01t00:00:00+05:30",
            "2024-01-01 00:00:00.5-00:00",
        ] {
            assert!(is_rfc3339(ok), "{ok}");
        }
        for bad in [
            "2023-02-29T00:00:00Z",
            "2024-01-01T00:00:00",
            "2024-01-01T24:00:00Z",
            "2024-1-01T00:00:00Z",
            "2024-01-01T00:00:00.Z",
            "2024-01-01T00:00:00+0530",
        ] {
            assert!(!is_rfc3339(bad), "{bad}");
        }
    }
}
