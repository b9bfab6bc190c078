//! Loading a kernel (bzImage or PVH ELF) and initrd, and writing what the kernel reads at entry:
//! the command line, and boot_params (Linux boot protocol) or hvm_start_info (PVH).

use crate::vstate::memory::GuestMemory;
use std::fs::File;
use std::io::{Read, Seek, SeekFrom};

use linux_loader::cmdline::Cmdline;
use linux_loader::loader::bootparam::{boot_params, setup_header};
use linux_loader::loader::bzimage::BzImage;
use linux_loader::loader::elf::start_info::{hvm_memmap_table_entry, hvm_modlist_entry, hvm_start_info};
use linux_loader::loader::elf::{Elf, PvhBootCapability};
use linux_loader::loader::{load_cmdline, KernelLoader};
use vm_memory::{ByteValued, Bytes, GuestAddress};

use super::layout::{
    CMDLINE_MAX_SIZE, CMDLINE_START, HIMEM_START, MMIO_HOLE_START, PVH_INFO_START, PVH_MEMMAP_START, ZERO_PAGE_START,
};
use super::memory_map::{guest_memory_map, MapEntry};

/// 64-bit kernels enter at `startup_64`, 0x200 past where the protected-mode part is loaded.
const LINUX_64BIT_ENTRY_OFFSET: u64 = 0x200;
const XLF_KERNEL_64: u16 = 1;
const BOOT_FLAG_MAGIC: u16 = 0xaa55;
const HDRS_MAGIC: u32 = 0x5372_6448;
const LOADER_TYPE_UNDEFINED: u8 = 0xff;
const PVH_START_MAGIC: u32 = 0x336e_c578;
const PVH_MODLIST_START: u64 = PVH_MEMMAP_START + 0x400;
const PAGE_SIZE: u64 = 0x1000;

#[derive(Debug, thiserror::Error)]
pub enum BootError {
    #[error("cannot read kernel: {0}")]
    ReadKernel(std::io::Error),
    #[error("kernel is neither a bzImage nor an ELF with a PVH entry note")]
    UnknownKernelFormat,
    #[error("ELF kernel has no PVH entry note (XEN_ELFNOTE_PHYS32_ENTRY); only PVH ELF kernels boot")]
    NoPvhEntry,
    #[error("bzImage has no 64-bit entry point (boot protocol 2.12+ with XLF_KERNEL_64 needed)")]
    Not64Bit,
    #[error("cannot load kernel: {0}")]
    LoadKernel(linux_loader::loader::Error),
    #[error("cannot read initrd: {0}")]
    ReadInitrd(std::io::Error),
    #[error("initrd of {size} bytes does not fit in guest memory below {limit:#x} above the kernel")]
    InitrdTooLarge { size: u64, limit: u64 },
    #[error("invalid kernel command line: {0}")]
    Cmdline(String),
    #[error("cannot write boot data to guest memory: {0}")]
    GuestMemory(#[from] vm_memory::GuestMemoryError),
}

/// Which entry protocol the loaded kernel uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KernelKind {
    /// Linux boot protocol, entered in 64-bit mode with `rsi` = boot_params.
    BzImage,
    /// PVH, entered in 32-bit protected mode with `ebx` = hvm_start_info.
    Pvh,
}

/// A kernel loaded into guest memory.
#[derive(Clone, Copy, Debug)]
pub struct LoadedKernel {
    pub kind: KernelKind,
    pub entry: GuestAddress,
    pub end: u64,
    setup_header: Option<setup_header>,
}

/// The initrd's place in guest memory.
#[derive(Clone, Copy, Debug)]
pub struct InitrdRegion {
    pub addr: GuestAddress,
    pub size: u64,
}

/// Where the boot vCPU starts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BootEntry {
    pub kind: KernelKind,
    pub rip: u64,
    /// boot_params (bzImage) or hvm_start_info (PVH).
    pub boot_info: u64,
}

/// Recognises the kernel format by its magic numbers, so a wrong file gets a clear error.
pub fn detect_kernel_kind(kernel: &mut File) -> Result<KernelKind, BootError> {
    let mut head = [0u8; 0x210];
    kernel.seek(SeekFrom::Start(0)).map_err(BootError::ReadKernel)?;
    let n = read_up_to(kernel, &mut head).map_err(BootError::ReadKernel)?;
    kernel.seek(SeekFrom::Start(0)).map_err(BootError::ReadKernel)?;
    if n >= 4 && head[..4] == *b"\x7fELF" {
        let pvh = has_pvh_note(kernel).map_err(BootError::ReadKernel)?;
        kernel.seek(SeekFrom::Start(0)).map_err(BootError::ReadKernel)?;
        return if pvh { Ok(KernelKind::Pvh) } else { Err(BootError::NoPvhEntry) };
    }
    if n >= 0x206 && head[0x202..0x206] == *b"HdrS" {
        return Ok(KernelKind::BzImage);
    }
    Err(BootError::UnknownKernelFormat)
}

const PT_NOTE: u32 = 4;
const XEN_ELFNOTE_PHYS32_ENTRY: u32 = 18;
/// Notes larger than this are not a kernel's.
const MAX_NOTES: u64 = 1 << 20;

/// Looks for the Xen PVH entry note in the ELF's PT_NOTE segments (64-bit little-endian ELF).
fn has_pvh_note(file: &mut File) -> std::io::Result<bool> {
    let mut ehdr = [0u8; 64];
    file.seek(SeekFrom::Start(0))?;
    if read_up_to(file, &mut ehdr)? < 64 || ehdr[4] != 2 || ehdr[5] != 1 {
        return Ok(false);
    }
    let u16_at = |b: &[u8], o: usize| u16::from_le_bytes([b[o], b[o + 1]]);
    let u32_at = |b: &[u8], o: usize| u32::from_le_bytes(b[o..o + 4].try_into().expect("4 bytes"));
    let u64_at = |b: &[u8], o: usize| u64::from_le_bytes(b[o..o + 8].try_into().expect("8 bytes"));
    let (phoff, phentsize, phnum) = (u64_at(&ehdr, 0x20), u16_at(&ehdr, 0x36), u16_at(&ehdr, 0x38));
    if phentsize < 56 {
        return Ok(false);
    }
    for i in 0..u64::from(phnum) {
        let mut phdr = [0u8; 56];
        file.seek(SeekFrom::Start(phoff.saturating_add(i * u64::from(phentsize))))?;
        if read_up_to(file, &mut phdr)? < 56 || u32_at(&phdr, 0) != PT_NOTE {
            continue;
        }
        let (offset, size) = (u64_at(&phdr, 8), u64_at(&phdr, 32).min(MAX_NOTES));
        let mut notes = vec![0u8; size as usize];
        file.seek(SeekFrom::Start(offset))?;
        let got = read_up_to(file, &mut notes)?;
        let notes = &notes[..got];
        let mut pos = 0usize;
        while pos + 12 <= notes.len() {
            let (namesz, descsz, kind) = (u32_at(notes, pos), u32_at(notes, pos + 4), u32_at(notes, pos + 8));
            let name_end = pos + 12 + namesz as usize;
            if name_end > notes.len() {
                break;
            }
            if kind == XEN_ELFNOTE_PHYS32_ENTRY && &notes[pos + 12..name_end] == b"Xen\0" {
                return Ok(true);
            }
            pos = name_end.div_ceil(4) * 4 + (descsz as usize).div_ceil(4) * 4;
        }
    }
    Ok(false)
}

fn read_up_to(file: &mut File, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut done = 0;
    while done < buf.len() {
        match file.read(&mut buf[done..])? {
            0 => break,
            n => done += n,
        }
    }
    Ok(done)
}

/// Loads the kernel image into guest memory.
pub fn load_kernel(mem: &GuestMemory, kernel: &mut File) -> Result<LoadedKernel, BootError> {
    let kind = detect_kernel_kind(kernel)?;
    let himem = Some(GuestAddress(HIMEM_START));
    match kind {
        KernelKind::Pvh => {
            let res = Elf::load(mem, None, kernel, himem).map_err(BootError::LoadKernel)?;
            let PvhBootCapability::PvhEntryPresent(entry) = res.pvh_boot_cap else {
                return Err(BootError::NoPvhEntry);
            };
            Ok(LoadedKernel { kind, entry, end: res.kernel_end, setup_header: None })
        }
        KernelKind::BzImage => {
            let res = BzImage::load(mem, None, kernel, himem).map_err(BootError::LoadKernel)?;
            let hdr = res.setup_header.ok_or(BootError::UnknownKernelFormat)?;
            if hdr.version < 0x020c || hdr.xloadflags & XLF_KERNEL_64 == 0 {
                return Err(BootError::Not64Bit);
            }
            Ok(LoadedKernel {
                kind,
                entry: GuestAddress(res.kernel_load.0 + LINUX_64BIT_ENTRY_OFFSET),
                end: res.kernel_end,
                setup_header: Some(hdr),
            })
        }
    }
}

/// Loads the initrd at the top of low RAM (below the MMIO hole and the kernel's limit), page aligned.
pub fn load_initrd(
    mem: &GuestMemory,
    kernel: &LoadedKernel,
    initrd: &mut File,
    mem_size: u64,
) -> Result<InitrdRegion, BootError> {
    let size = initrd.metadata().map_err(BootError::ReadInitrd)?.len();
    let mut limit = mem_size.min(MMIO_HOLE_START);
    if let Some(hdr) = kernel.setup_header {
        if hdr.initrd_addr_max != 0 {
            limit = limit.min(u64::from(hdr.initrd_addr_max) + 1);
        }
    }
    let too_large = BootError::InitrdTooLarge { size, limit };
    let start = limit.checked_sub(size).ok_or(too_large)? & !(PAGE_SIZE - 1);
    if start < kernel.end {
        return Err(BootError::InitrdTooLarge { size, limit });
    }
    initrd.seek(SeekFrom::Start(0)).map_err(BootError::ReadInitrd)?;
    mem.read_exact_volatile_from(GuestAddress(start), initrd, size as usize).map_err(BootError::GuestMemory)?;
    Ok(InitrdRegion { addr: GuestAddress(start), size })
}

/// Checks and writes the kernel command line; returns its length without the NUL.
pub fn write_cmdline(mem: &GuestMemory, text: &str) -> Result<usize, BootError> {
    let mut cmdline = Cmdline::new(CMDLINE_MAX_SIZE).map_err(|e| BootError::Cmdline(e.to_string()))?;
    if !text.is_empty() {
        cmdline.insert_str(text).map_err(|e| BootError::Cmdline(e.to_string()))?;
    }
    load_cmdline(mem, GuestAddress(CMDLINE_START), &cmdline).map_err(|e| BootError::Cmdline(e.to_string()))?;
    Ok(text.len())
}

/// Writes the structures the kernel reads at entry and returns where to start the boot vCPU.
pub fn configure_boot(
    mem: &GuestMemory,
    kernel: &LoadedKernel,
    cmdline: &str,
    initrd: Option<InitrdRegion>,
    rsdp: GuestAddress,
    mem_size: u64,
) -> Result<BootEntry, BootError> {
    let cmdline_len = write_cmdline(mem, cmdline)?;
    let map = guest_memory_map(mem_size);
    let boot_info = match kernel.kind {
        KernelKind::BzImage => {
            write_boot_params(mem, kernel, cmdline_len, initrd, rsdp, &map)?;
            ZERO_PAGE_START
        }
        KernelKind::Pvh => {
            write_pvh_start_info(mem, initrd, rsdp, &map)?;
            PVH_INFO_START
        }
    };
    Ok(BootEntry { kind: kernel.kind, rip: kernel.entry.0, boot_info })
}

fn write_boot_params(
    mem: &GuestMemory,
    kernel: &LoadedKernel,
    cmdline_len: usize,
    initrd: Option<InitrdRegion>,
    rsdp: GuestAddress,
    map: &[MapEntry],
) -> Result<(), BootError> {
    let mut params = boot_params { hdr: kernel.setup_header.unwrap_or_default(), ..Default::default() };
    params.hdr.type_of_loader = LOADER_TYPE_UNDEFINED;
    params.hdr.boot_flag = BOOT_FLAG_MAGIC;
    params.hdr.header = HDRS_MAGIC;
    params.hdr.cmd_line_ptr = CMDLINE_START as u32;
    params.hdr.cmdline_size = cmdline_len as u32;
    if let Some(initrd) = initrd {
        params.hdr.ramdisk_image = initrd.addr.0 as u32;
        params.hdr.ramdisk_size = initrd.size as u32;
    }
    params.acpi_rsdp_addr = rsdp.0;
    for (slot, entry) in params.e820_table.iter_mut().zip(map) {
        slot.addr = entry.start;
        slot.size = entry.size;
        slot.r#type = entry.kind as u32;
    }
    params.e820_entries = map.len().min(params.e820_table.len()) as u8;
    mem.write_obj(params, GuestAddress(ZERO_PAGE_START))?;
    Ok(())
}

/// `hvm_start_info` and friends, made writable to guest memory.
#[derive(Clone, Copy, Default)]
#[repr(transparent)]
struct StartInfo(hvm_start_info);
#[derive(Clone, Copy, Default)]
#[repr(transparent)]
struct MemmapEntry(hvm_memmap_table_entry);
#[derive(Clone, Copy, Default)]
#[repr(transparent)]
struct ModlistEntry(hvm_modlist_entry);
// SAFETY: repr(C) structs made only of integers, laid out without padding (56, 24 and 32 bytes),
// so every byte pattern is a valid value and every byte is initialised.
unsafe impl ByteValued for StartInfo {}
// SAFETY: as above.
unsafe impl ByteValued for MemmapEntry {}
// SAFETY: as above.
unsafe impl ByteValued for ModlistEntry {}

fn write_pvh_start_info(
    mem: &GuestMemory,
    initrd: Option<InitrdRegion>,
    rsdp: GuestAddress,
    map: &[MapEntry],
) -> Result<(), BootError> {
    let mut info = hvm_start_info {
        magic: PVH_START_MAGIC,
        version: 1,
        cmdline_paddr: CMDLINE_START,
        rsdp_paddr: rsdp.0,
        memmap_paddr: PVH_MEMMAP_START,
        memmap_entries: map.len() as u32,
        ..Default::default()
    };
    for (i, entry) in map.iter().enumerate() {
        let e = hvm_memmap_table_entry { addr: entry.start, size: entry.size, type_: entry.kind as u32, reserved: 0 };
        mem.write_obj(MemmapEntry(e), GuestAddress(PVH_MEMMAP_START + (i * 24) as u64))?;
    }
    if let Some(initrd) = initrd {
        let module = hvm_modlist_entry { paddr: initrd.addr.0, size: initrd.size, ..Default::default() };
        mem.write_obj(ModlistEntry(module), GuestAddress(PVH_MODLIST_START))?;
        info.nr_modules = 1;
        info.modlist_paddr = PVH_MODLIST_START;
    }
    mem.write_obj(StartInfo(info), GuestAddress(PVH_INFO_START))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn rejects_unknown_kernel() {
        let mut f = tempfile_with(b"this is not a kernel at all");
        assert!(matches!(detect_kernel_kind(&mut f), Err(BootError::UnknownKernelFormat)));
    }

    #[test]
    fn recognises_formats() {
        let mut elf = tempfile_with(b"\x7fELF\x02\x01\x01");
        assert!(matches!(detect_kernel_kind(&mut elf), Err(BootError::NoPvhEntry)));
        let mut me = File::open(std::env::current_exe().unwrap()).unwrap();
        assert!(matches!(detect_kernel_kind(&mut me), Err(BootError::NoPvhEntry)));
        let mut bz = vec![0u8; 0x300];
        bz[0x202..0x206].copy_from_slice(b"HdrS");
        assert_eq!(detect_kernel_kind(&mut tempfile_with(&bz)).unwrap(), KernelKind::BzImage);
    }

    #[test]
    fn pvh_start_info_describes_memory() {
        let mem = GuestMemory::from_ranges(&[(GuestAddress(0), 64 << 20)]).unwrap();
        let map = guest_memory_map(64 << 20);
        write_pvh_start_info(&mem, None, GuestAddress(0xe0000), &map).unwrap();
        let info: StartInfo = mem.read_obj(GuestAddress(PVH_INFO_START)).unwrap();
        assert_eq!(info.0.magic, PVH_START_MAGIC);
        assert_eq!(info.0.memmap_entries as usize, map.len());
        assert_eq!(info.0.rsdp_paddr, 0xe0000);
        let last: MemmapEntry = mem.read_obj(GuestAddress(PVH_MEMMAP_START + 24 * (map.len() as u64 - 1))).unwrap();
        assert_eq!(last.0.addr + last.0.size, 64 << 20);
    }

    fn tempfile_with(bytes: &[u8]) -> File {
        let mut f = tempfile::tempfile().unwrap();
        f.write_all(bytes).unwrap();
        f
    }
}
