//! What a block device reads and writes.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;

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

/// A plain file, written in place.
pub struct RawFile {
    file: File,
    size: u64,
}

impl RawFile {
    /// Wraps `file`; its current length is the disk's capacity.
    pub fn new(file: File) -> io::Result<Self> {
        let size = file.metadata()?.len();
        Ok(Self { file, size })
    }
}

fn punch_hole(file: &File, offset: u64, len: u64) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    let (Ok(off), Ok(l)) = (i64::try_from(offset), i64::try_from(len)) else {
        return Err(io::Error::from(io::ErrorKind::InvalidInput));
    };
    // SAFETY: fallocate on a descriptor we own; the range was validated by the caller.
    let r = unsafe {
        libc::fallocate(
            file.as_raw_fd(),
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            off,
            l,
        )
    };
    if r == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

impl BlockBackend for RawFile {
    fn capacity(&self) -> u64 {
        self.size
    }

    fn read_at(&mut self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.file.read_exact_at(buf, offset)
    }

    fn write_at(&mut self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.file.write_all_at(buf, offset)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.file.sync_data()
    }

    fn discard(&mut self, offset: u64, len: u64) -> io::Result<()> {
        // Best effort: a file system without hole punching keeps the data.
        if let Err(e) = punch_hole(&self.file, offset, len) {
            log::debug!("discard not supported here: {e}");
        }
        Ok(())
    }

    fn write_zeroes(&mut self, offset: u64, len: u64) -> io::Result<()> {
        if punch_hole(&self.file, offset, len).is_ok() {
            return Ok(());
        }
        let zeroes = vec![0u8; 1 << 20];
        let mut done = 0;
        while done < len {
            let n = (len - done).min(zeroes.len() as u64) as usize;
            self.file.write_all_at(&zeroes[..n], offset + done)?;
            done += n as u64;
        }
        Ok(())
    }
}

/// A Strata disk chain (or a raw image opened through the `disk` crate, which also locks it).
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
