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
}
