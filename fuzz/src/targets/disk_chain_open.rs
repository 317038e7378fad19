//! `disk::Chain::open` on crafted files, then reads (and, opened writable, writes and a flush)
//! through the chain. The files start from two real layers made once per thread (a base with
//! data and a child over it with data of its own); an input changes header fields (the header
//! is re-encoded, so its checksum holds and the change reaches past it), pokes bytes anywhere
//! (tables, data), truncates or extends either file.
//!
//! Checked: nothing panics or aborts, whatever the files say; a chain that opens serves reads
//! of its whole virtual size without error or with a clean one.

use std::cell::RefCell;
use std::path::{Path, PathBuf};

use arbitrary::{Arbitrary, Unstructured};
use disk::format::{Header, HEADER_SIZE};
use disk::{Chain, OpenOptions};

/// The virtual size of the templates.
const SIZE: u64 = 256 << 10;

struct Templates {
    dir: tempfile::TempDir,
    base: Vec<u8>,
    top: Vec<u8>,
}

thread_local! {
    static TEMPLATES: RefCell<Option<Templates>> = const { RefCell::new(None) };
}

fn fill(chain: &mut Chain, seed: u8, at: &[u64]) -> disk::Result<()> {
    for (i, &off) in at.iter().enumerate() {
        let data: Vec<u8> = (0..8192u32)
            .map(|j| (j as u8).wrapping_mul(seed).wrapping_add(i as u8))
            .collect();
        chain.write_at(off, &data)?;
    }
    chain.flush()
}

fn make_templates() -> Option<Templates> {
    // tmpfs when there is one: every input rewrites the files.
    let dir = tempfile::Builder::new()
        .prefix("strata-fuzz-disk")
        .tempdir_in("/dev/shm")
        .or_else(|_| tempfile::tempdir())
        .ok()?;
    let base = dir.path().join("base.strata");
    let top = dir.path().join("top.strata");
    let opts = disk::CreateOptions {
        cluster_bits: Some(13),
    };
    disk::create_empty(&base, SIZE, opts).ok()?;
    fill(
        &mut Chain::open(&base, OpenOptions::default()).ok()?,
        3,
        &[0, 40960, 200_000],
    )
    .ok()?;
    disk::create_layer(&base, &top).ok()?;
    fill(
        &mut Chain::open(&top, OpenOptions::default()).ok()?,
        7,
        &[4096, 100_000],
    )
    .ok()?;
    Some(Templates {
        base: std::fs::read(&base).ok()?,
        top: std::fs::read(&top).ok()?,
        dir,
    })
}

#[derive(Arbitrary, Debug)]
enum Field {
    Flags(u32),
    ClusterBits(u8),
    VirtualSize(u64),
    VirtualSizeSmall(u32),
    DataOffset(u64),
    Generation(u64),
    AllocEnd(u64),
    AllocEndSmall(u16),
    LayerId(u8),
}

#[derive(Arbitrary, Debug)]
enum Edit {
    Field(Field),
    Poke { at: u32, value: u8 },
    Poke64 { at: u32, value: u64 },
    Truncate(u32),
    Extend(u16),
}

#[derive(Arbitrary, Debug)]
struct Input {
    /// Edits of the child (`top.strata`), then of the base.
    top: Vec<Edit>,
    base: Vec<Edit>,
    writable: bool,
    writes: Vec<(u32, u16, u8)>,
}

fn edit_file(bytes: &mut Vec<u8>, edits: &[Edit]) {
    for e in edits.iter().take(16) {
        match e {
            Edit::Field(f) => {
                let Ok(mut h) = Header::parse(bytes) else {
                    continue;
                };
                match *f {
                    Field::Flags(v) => h.flags = v,
                    // Any the encoder can lay out (it divides by the L2 entries per cluster);
                    // the parser takes 13..=21.
                    Field::ClusterBits(v) => h.cluster_bits = 4 + u32::from(v) % 59,
                    Field::VirtualSize(v) => h.virtual_size = v,
                    Field::VirtualSizeSmall(v) => h.virtual_size = u64::from(v) * 512,
                    Field::DataOffset(v) => h.data_offset = v,
                    Field::Generation(v) => h.generation = v,
                    Field::AllocEnd(v) => h.alloc_end = v,
                    Field::AllocEndSmall(v) => h.alloc_end = u64::from(v),
                    Field::LayerId(v) => h.layer_id[usize::from(v) % 16] ^= 1,
                }
                bytes[..HEADER_SIZE].copy_from_slice(&h.encode());
            }
            Edit::Poke { at, value } => {
                if !bytes.is_empty() {
                    let i = *at as usize % bytes.len();
                    bytes[i] = *value;
                }
            }
            Edit::Poke64 { at, value } => {
                if bytes.len() >= 8 {
                    let i = (*at as usize % (bytes.len() / 8)) * 8;
                    bytes[i..i + 8].copy_from_slice(&value.to_le_bytes());
                }
            }
            Edit::Truncate(n) => {
                let n = *n as usize % (bytes.len() + 1);
                bytes.truncate(n);
            }
            Edit::Extend(n) => bytes.resize(bytes.len() + usize::from(*n), 0),
        }
    }
}

/// Runs one input.
pub fn run(data: &[u8]) {
    let Ok(input) = Input::arbitrary_take_rest(Unstructured::new(data)) else {
        return;
    };
    TEMPLATES.with(|t| {
        let mut t = t.borrow_mut();
        if t.is_none() {
            *t = make_templates();
        }
        if let Some(t) = t.as_ref() {
            one(t, &input);
        }
    });
}

fn one(t: &Templates, input: &Input) {
    let mut base = t.base.clone();
    let mut top = t.top.clone();
    edit_file(&mut top, &input.top);
    edit_file(&mut base, &input.base);
    let dir: &Path = t.dir.path();
    let top_path: PathBuf = dir.join("top.strata");
    if std::fs::write(dir.join("base.strata"), &base).is_err()
        || std::fs::write(&top_path, &top).is_err()
    {
        return;
    }
    let opts = OpenOptions {
        read_only: !input.writable,
        format: None,
    };
    let Ok(mut chain) = Chain::open(&top_path, opts) else {
        return;
    };
    let size = chain.virtual_size();
    let mut buf = vec![0u8; 32 << 10];
    let mut off = 0u64;
    // Every byte of a small disk; a sample of a large one.
    for _ in 0..64 {
        if off >= size {
            break;
        }
        let n = (size - off).min(buf.len() as u64) as usize;
        if chain.read_at(off, &mut buf[..n]).is_err() {
            break;
        }
        off = off.saturating_add((size / 64).max(buf.len() as u64));
    }
    if input.writable {
        for &(at, len, v) in input.writes.iter().take(8) {
            let at = u64::from(at) % size.max(1);
            let len = usize::from(len).min((size - at.min(size)) as usize);
            if chain.write_at(at, &vec![v; len]).is_err() {
                break;
            }
        }
        let _ = chain.flush();
    }
}
