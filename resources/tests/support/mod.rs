//! A minimal ELF64 little-endian reader for the image tests (no dependency
//! needed for the few fields they look at).

#![allow(dead_code)]

/// A loadable or other program header.
pub struct Segment {
    /// `p_type` (1 = PT_LOAD).
    pub kind: u32,
    /// `p_vaddr`.
    pub vaddr: u64,
    /// `p_paddr`.
    pub paddr: u64,
    /// `p_filesz`.
    pub filesz: u64,
    /// `p_memsz`.
    pub memsz: u64,
}

/// A section header with its name.
pub struct Section {
    /// Name from `.shstrtab`.
    pub name: String,
    /// `sh_type`.
    pub kind: u32,
    /// `sh_flags`.
    pub flags: u64,
    /// `sh_addr`.
    pub addr: u64,
    /// `sh_offset`.
    pub offset: u64,
    /// `sh_size`.
    pub size: u64,
    /// `sh_link`.
    pub link: u32,
}

/// The parts of an ELF file the tests use.
pub struct Elf<'a> {
    /// The whole file.
    pub bytes: &'a [u8],
    /// `e_ident[EI_CLASS]`.
    pub class: u8,
    /// `e_ident[EI_DATA]`.
    pub data: u8,
    /// `e_type`.
    pub kind: u16,
    /// `e_machine`.
    pub machine: u16,
    /// `e_entry`.
    pub entry: u64,
    /// Program headers.
    pub segments: Vec<Segment>,
    /// Section headers.
    pub sections: Vec<Section>,
}

/// `PT_LOAD`.
pub const PT_LOAD: u32 = 1;
/// `SHF_EXECINSTR`.
pub const SHF_EXECINSTR: u64 = 4;
/// `SHT_SYMTAB`.
pub const SHT_SYMTAB: u32 = 2;

fn u16_at(b: &[u8], off: u64) -> u16 {
    let off = off as usize;
    u16::from_le_bytes(b[off..off + 2].try_into().expect("2 bytes"))
}

fn u32_at(b: &[u8], off: u64) -> u32 {
    let off = off as usize;
    u32::from_le_bytes(b[off..off + 4].try_into().expect("4 bytes"))
}

fn u64_at(b: &[u8], off: u64) -> u64 {
    let off = off as usize;
    u64::from_le_bytes(b[off..off + 8].try_into().expect("8 bytes"))
}

fn c_str(b: &[u8], off: u64) -> String {
    let tail = &b[off as usize..];
    let end = tail.iter().position(|&c| c == 0).unwrap_or(tail.len());
    String::from_utf8_lossy(&tail[..end]).into_owned()
}

impl<'a> Elf<'a> {
    /// Parses `bytes`; panics with a message if it is not an ELF file.
    pub fn parse(bytes: &'a [u8]) -> Self {
        assert!(
            bytes.len() >= 64 && bytes[..4] == *b"\x7fELF",
            "not an ELF file"
        );
        let phoff = u64_at(bytes, 32);
        let shoff = u64_at(bytes, 40);
        let phentsize = u64::from(u16_at(bytes, 54));
        let phnum = u64::from(u16_at(bytes, 56));
        let shentsize = u64::from(u16_at(bytes, 58));
        let shnum = u64::from(u16_at(bytes, 60));
        let shstrndx = u64::from(u16_at(bytes, 62));

        let segments = (0..phnum)
            .map(|i| {
                let ph = phoff + i * phentsize;
                Segment {
                    kind: u32_at(bytes, ph),
                    vaddr: u64_at(bytes, ph + 16),
                    paddr: u64_at(bytes, ph + 24),
                    filesz: u64_at(bytes, ph + 32),
                    memsz: u64_at(bytes, ph + 40),
                }
            })
            .collect();

        let strtab_off = u64_at(bytes, shoff + shstrndx * shentsize + 24);
        let sections = (0..shnum)
            .map(|i| {
                let sh = shoff + i * shentsize;
                Section {
                    name: c_str(bytes, strtab_off + u64::from(u32_at(bytes, sh))),
                    kind: u32_at(bytes, sh + 4),
                    flags: u64_at(bytes, sh + 8),
                    addr: u64_at(bytes, sh + 16),
                    offset: u64_at(bytes, sh + 24),
                    size: u64_at(bytes, sh + 32),
                    link: u32_at(bytes, sh + 40),
                }
            })
            .collect();

        Elf {
            bytes,
            class: bytes[4],
            data: bytes[5],
            kind: u16_at(bytes, 16),
            machine: u16_at(bytes, 18),
            entry: u64_at(bytes, 24),
            segments,
            sections,
        }
    }

    /// The section called `name`.
    pub fn section(&self, name: &str) -> Option<&Section> {
        self.sections.iter().find(|s| s.name == name)
    }

    /// Every `.symtab` entry as (name, value).
    pub fn symbols(&self) -> Vec<(String, u64)> {
        let Some(symtab) = self.sections.iter().find(|s| s.kind == SHT_SYMTAB) else {
            return Vec::new();
        };
        let Some(strtab) = self.sections.get(symtab.link as usize) else {
            return Vec::new();
        };
        (0..symtab.size / 24)
            .map(|i| {
                let sym = symtab.offset + i * 24;
                let name = c_str(
                    self.bytes,
                    strtab.offset + u64::from(u32_at(self.bytes, sym)),
                );
                (name, u64_at(self.bytes, sym + 8))
            })
            .collect()
    }

    /// The value of the symbol `name` from `.symtab`.
    pub fn symbol(&self, name: &str) -> Option<u64> {
        self.symbols()
            .into_iter()
            .find_map(|(sym, value)| (sym == name).then_some(value))
    }
}
