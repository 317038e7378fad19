//! Loads a kernel into guest memory: an ELF `vmlinux` (or the embedded test guest, also an ELF)
//! entered at its ELF entry point, or a bzImage entered at its 64-bit entry.

use std::fs::File;
use std::io::{Cursor, Read, Seek};
use std::path::{Path, PathBuf};

use linux_loader::cmdline::Cmdline;
use linux_loader::loader::bootparam::setup_header;
use linux_loader::loader::{self, bzimage::BzImage, elf::Elf, KernelLoader};
use vm_memory::{Address, Bytes, GuestAddress, ReadVolatile};

use crate::arch::layout::{CMDLINE_MAX_SIZE, CMDLINE_START, HIMEM_START};
use crate::config::Kernel;
use crate::memory::GuestMemory;

/// The 64-bit entry of a bzImage's protected-mode kernel, from its load address
/// (Documentation/arch/x86/boot.rst, "64-bit boot protocol").
const BZIMAGE_64BIT_ENTRY_OFFSET: u64 = 0x200;

/// Errors while loading a kernel.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// The kernel file cannot be opened.
    #[error("cannot open kernel {path}")]
    Open {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The file is neither an ELF nor a bzImage.
    #[error("{path} is not a bootable kernel (neither an x86_64 ELF vmlinux nor a bzImage)")]
    NotAKernel {
        /// The file.
        path: PathBuf,
    },
    /// The file looks like a kernel but cannot be loaded.
    #[error("cannot load kernel {path}: {source}")]
    Load {
        /// The file.
        path: PathBuf,
        /// Why.
        source: loader::Error,
    },
    /// The initrd does not fit in guest RAM.
    #[error("initrd {path} ({size} bytes) does not fit in guest memory above the kernel")]
    InitrdTooLarge {
        /// The file.
        path: PathBuf,
        /// Its size.
        size: u64,
    },
    /// The initrd cannot be read.
    #[error("cannot read initrd {path}: {reason}")]
    InitrdRead {
        /// The file.
        path: PathBuf,
        /// Why.
        reason: String,
    },
    /// The command line cannot be written.
    #[error("cannot write the kernel command line: {0}")]
    Cmdline(String),
}

/// Where a loaded kernel starts.
pub struct LoadedKernel {
    /// The address the boot vCPU starts at.
    pub entry: GuestAddress,
    /// The bzImage setup header, to seed the zero page with.
    pub setup_header: Option<setup_header>,
    /// Where the kernel image ends in guest memory.
    pub end: u64,
}

fn load_image<F: Read + ReadVolatile + Seek>(
    memory: &GuestMemory,
    image: &mut F,
    path: &Path,
) -> Result<LoadedKernel, LoadError> {
    let load_err = |source| LoadError::Load {
        path: path.to_path_buf(),
        source,
    };
    match Elf::load(memory, None, image, Some(GuestAddress(HIMEM_START))) {
        Ok(r) => {
            return Ok(LoadedKernel {
                entry: r.kernel_load,
                setup_header: None,
                end: r.kernel_end,
            })
        }
        Err(loader::Error::Elf(
            loader::elf::Error::InvalidElfMagicNumber | loader::elf::Error::ReadElfHeader,
        )) => {}
        Err(e) => return Err(load_err(e)),
    }
    match BzImage::load(memory, None, image, Some(GuestAddress(HIMEM_START))) {
        Ok(r) => Ok(LoadedKernel {
            entry: r
                .kernel_load
                .checked_add(BZIMAGE_64BIT_ENTRY_OFFSET)
                .ok_or_else(|| LoadError::NotAKernel {
                    path: path.to_path_buf(),
                })?,
            setup_header: r.setup_header,
            end: r.kernel_end,
        }),
        Err(loader::Error::Bzimage(
            loader::bzimage::Error::InvalidBzImage
            | loader::bzimage::Error::ReadBzImageHeader
            | loader::bzimage::Error::SeekBzImageHeader,
        )) => Err(LoadError::NotAKernel {
            path: path.to_path_buf(),
        }),
        Err(e) => Err(load_err(e)),
    }
}

/// Loads `kernel` into `memory`.
pub fn load_kernel(memory: &GuestMemory, kernel: &Kernel) -> Result<LoadedKernel, LoadError> {
    match kernel {
        Kernel::TestGuest => load_image(
            memory,
            &mut Cursor::new(resources::TEST_GUEST),
            Path::new("<embedded test guest>"),
        ),
        Kernel::File(path) => {
            let mut file = File::open(path).map_err(|source| LoadError::Open {
                path: path.clone(),
                source,
            })?;
            load_image(memory, &mut file, path)
        }
    }
}

/// Where an initrd was placed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LoadedInitrd {
    /// Its guest physical address.
    pub addr: GuestAddress,
    /// Its size in bytes.
    pub size: u64,
}

/// Loads the initrd at `path` as high as possible in RAM below the MMIO hole (and below
/// `max_addr`, the kernel's `initrd_addr_max`), page-aligned, above the kernel's end.
pub fn load_initrd(
    memory: &GuestMemory,
    path: &Path,
    ram_below_hole: u64,
    kernel_end: u64,
    max_addr: u64,
) -> Result<LoadedInitrd, LoadError> {
    let open_err = |source| LoadError::Open {
        path: path.to_path_buf(),
        source,
    };
    let mut file = File::open(path).map_err(open_err)?;
    let size = file.metadata().map_err(open_err)?.len();
    let top = ram_below_hole.min(max_addr.saturating_add(1));
    let addr = top
        .checked_sub(size)
        .map(|a| a & !0xfff)
        .filter(|&a| a >= kernel_end.max(HIMEM_START))
        .ok_or_else(|| LoadError::InitrdTooLarge {
            path: path.to_path_buf(),
            size,
        })?;
    memory
        .read_exact_volatile_from(GuestAddress(addr), &mut file, size as usize)
        .map_err(|e| LoadError::InitrdRead {
            path: path.to_path_buf(),
            reason: e.to_string(),
        })?;
    Ok(LoadedInitrd {
        addr: GuestAddress(addr),
        size,
    })
}

/// Writes `cmdline` at [`CMDLINE_START`]; returns its size including the NUL.
pub fn load_cmdline(memory: &GuestMemory, cmdline: &str) -> Result<u32, LoadError> {
    let mut cl = Cmdline::new(CMDLINE_MAX_SIZE).map_err(|e| LoadError::Cmdline(e.to_string()))?;
    if !cmdline.is_empty() {
        cl.insert_str(cmdline)
            .map_err(|e| LoadError::Cmdline(e.to_string()))?;
    }
    loader::load_cmdline(memory, GuestAddress(CMDLINE_START), &cl)
        .map_err(|e| LoadError::Cmdline(e.to_string()))?;
    Ok(cmdline.len() as u32 + 1)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use vm_memory::Bytes;

    #[test]
    fn embedded_test_guest_loads_above_1mib() {
        let memory = crate::memory::create(64 << 20).unwrap();
        let k = load_kernel(&memory, &Kernel::TestGuest).unwrap();
        assert!(k.entry.raw_value() >= HIMEM_START);
        assert!(k.setup_header.is_none());
    }

    #[test]
    fn missing_kernel_names_the_file() {
        let memory = crate::memory::create(16 << 20).unwrap();
        let err = load_kernel(&memory, &Kernel::File("/nonexistent/vmlinux".into()))
            .err()
            .unwrap();
        assert!(matches!(err, LoadError::Open { .. }));
        assert!(err.to_string().contains("/nonexistent/vmlinux"));
    }

    #[test]
    fn non_kernel_file_is_refused_by_name() {
        let memory = crate::memory::create(16 << 20).unwrap();
        let mut f = tempfile::NamedTempFile::new().unwrap();
        f.write_all(&[0x5a; 8192]).unwrap();
        let err = load_kernel(&memory, &Kernel::File(f.path().into()))
            .err()
            .unwrap();
        assert!(matches!(err, LoadError::NotAKernel { .. }), "{err:?}");
        assert!(err.to_string().contains(&*f.path().to_string_lossy()));
    }

    #[test]
    fn initrd_goes_to_the_top_of_low_ram_page_aligned() {
        let memory = crate::memory::create(64 << 20).unwrap();
        let mut f = tempfile::NamedTempFile::new().unwrap();
        f.write_all(&[0xa5; 10_000]).unwrap();
        let r = load_initrd(&memory, f.path(), 64 << 20, 2 << 20, u64::MAX).unwrap();
        assert_eq!(r.size, 10_000);
        assert_eq!(r.addr.raw_value() % 4096, 0);
        assert!(r.addr.raw_value() + 10_000 <= 64 << 20);
        let mut back = vec![0u8; 10_000];
        memory.read_slice(&mut back, r.addr).unwrap();
        assert!(back.iter().all(|&b| b == 0xa5));
        // Too large to fit above the kernel.
        let err = load_initrd(&memory, f.path(), 64 << 20, (64 << 20) - 4096, u64::MAX);
        assert!(matches!(err, Err(LoadError::InitrdTooLarge { .. })));
    }

    #[test]
    fn cmdline_is_nul_terminated_at_its_address() {
        let memory = crate::memory::create(16 << 20).unwrap();
        let size = load_cmdline(&memory, "console=ttyS0 foo=bar").unwrap();
        let mut buf = vec![0u8; size as usize];
        memory
            .read_slice(&mut buf, GuestAddress(CMDLINE_START))
            .unwrap();
        assert_eq!(buf, b"console=ttyS0 foo=bar\0");
    }
}
