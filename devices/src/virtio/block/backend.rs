//! What a block device reads and writes.

use std::io;

/// Storage behind a virtio-blk device. Offsets and lengths are in bytes; the device checks them
/// against [`BlockBackend::capacity`] before calling.
pub trait BlockBackend: Send {
    /// Size in bytes.
    fn capacity(&self) -> u64;
    /// Fills `buf` from `offset`.
    fn read_at(&mut self, buf: &mut [u8], offset: u64) -> io::Result<()>;
    /// Writes `buf` at `offset`.
    fn write_at(&mut self, buf: &[u8], offset: u64) -> io::Result<()>;
    /// Makes every completed write durable.
    fn flush(&mut self) -> io::Result<()>;
    /// The guest no longer needs `len` bytes at `offset`; they may read back as anything.
    fn discard(&mut self, offset: u64, len: u64) -> io::Result<()>;
    /// `len` bytes at `offset` must read back as zeroes.
    fn write_zeroes(&mut self, offset: u64, len: u64) -> io::Result<()>;
    /// Flushes, then puts a new empty layer at `path` on top: from now on writes land there and
    /// what was the top is frozen (a checkpoint's disk switch). Backends without layers refuse.
    fn push_layer(&mut self, path: &std::path::Path) -> io::Result<()> {
        Err(io::Error::new(
            io::ErrorKind::Unsupported,
            format!("this disk cannot take a new layer at {}", path.display()),
        ))
    }
    /// Undoes [`BlockBackend::push_layer`] while nothing was written since (a failed checkpoint
    /// puts every disk back).
    fn pop_layer(&mut self) -> io::Result<()> {
        Err(io::Error::new(
            io::ErrorKind::Unsupported,
            "this disk has no layer to take off",
        ))
    }
    /// The file the disk writes now (the top of its chain), if it has one.
    fn top_path(&self) -> Option<std::path::PathBuf> {
        None
    }
    /// The open chain, for work on its layers between requests (a checkpoint's merge).
    fn chain_mut(&mut self) -> Option<&mut disk::Chain> {
        None
    }
}

/// A disk opened by the `disk` crate: a raw image or a Strata chain, locked against other
/// writers.
pub struct ChainBackend {
    chain: disk::Chain,
}

impl ChainBackend {
    /// Wraps an open chain.
    pub fn new(chain: disk::Chain) -> Self {
        Self { chain }
    }
}

fn disk_io(e: disk::DiskError) -> io::Error {
    io::Error::other(disk::error_chain(&e))
}

impl BlockBackend for ChainBackend {
    fn capacity(&self) -> u64 {
        self.chain.virtual_size()
    }

    fn read_at(&mut self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.chain.read_at(offset, buf).map_err(disk_io)
    }

    fn write_at(&mut self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.chain.write_at(offset, buf).map_err(disk_io)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.chain.flush().map_err(disk_io)
    }

    fn discard(&mut self, offset: u64, len: u64) -> io::Result<()> {
        self.chain.discard(offset, len).map_err(disk_io)
    }

    fn write_zeroes(&mut self, offset: u64, len: u64) -> io::Result<()> {
        self.chain.write_zeroes(offset, len).map_err(disk_io)
    }

    fn push_layer(&mut self, path: &std::path::Path) -> io::Result<()> {
        self.chain.push_layer(path).map_err(disk_io)
    }

    fn pop_layer(&mut self) -> io::Result<()> {
        self.chain.pop_layer().map_err(disk_io)
    }

    fn top_path(&self) -> Option<std::path::PathBuf> {
        Some(self.chain.top_path().to_path_buf())
    }

    fn chain_mut(&mut self) -> Option<&mut disk::Chain> {
        Some(&mut self.chain)
    }
}
