//! Initial register state of the boot vCPU for each entry protocol, and local APIC wiring.

use crate::vstate::memory::GuestMemory;
use kvm_bindings::{kvm_fpu, kvm_lapic_state, kvm_regs, kvm_segment, kvm_sregs};
use vm_memory::{Bytes, GuestAddress};

use super::boot::{BootEntry, KernelKind};
use super::layout::{BOOT_GDT_START, BOOT_IDT_START, BOOT_STACK_POINTER, PDE_START, PDPTE_START, PML4_START};

const CR0_PE: u64 = 1;
const CR0_ET: u64 = 1 << 4;
const CR0_PG: u64 = 1 << 31;
const CR4_PAE: u64 = 1 << 5;
const EFER_LME: u64 = 1 << 8;
const EFER_LMA: u64 = 1 << 10;

/// Boot GDT: null, 64-bit code, flat data, TSS, 32-bit code.
const GDT: [u64; 5] = [0, 0x00af_9b00_0000_ffff, 0x00cf_9300_0000_ffff, 0x0080_8b00_0000_ffff, 0x00cf_9b00_0000_ffff];
const GDT_CODE64: usize = 1;
const GDT_DATA: usize = 2;
const GDT_TSS: usize = 3;
const GDT_CODE32: usize = 4;

/// Builds the KVM view of GDT entry `index`.
fn segment(index: usize) -> kvm_segment {
    let e = GDT[index];
    let limit = ((e & 0xffff) | ((e >> 32) & 0xf_0000)) as u32;
    let g = ((e >> 55) & 1) as u8;
    kvm_segment {
        base: ((e >> 16) & 0xff_ffff) | (((e >> 56) & 0xff) << 24),
        limit: if g == 1 { (limit << 12) | 0xfff } else { limit },
        selector: (index * 8) as u16,
        type_: ((e >> 40) & 0xf) as u8,
        present: ((e >> 47) & 1) as u8,
        dpl: ((e >> 45) & 3) as u8,
        db: ((e >> 54) & 1) as u8,
        s: ((e >> 44) & 1) as u8,
        l: ((e >> 53) & 1) as u8,
        g,
        avl: ((e >> 52) & 1) as u8,
        unusable: 0,
        padding: 0,
    }
}

/// Writes the boot GDT, an empty IDT and (for the 64-bit Linux entry) identity page tables for
/// the first GiB.
pub fn write_boot_tables(mem: &GuestMemory, entry: &BootEntry) -> Result<(), vm_memory::GuestMemoryError> {
    for (i, desc) in GDT.iter().enumerate() {
        mem.write_obj(*desc, GuestAddress(BOOT_GDT_START + 8 * i as u64))?;
    }
    mem.write_obj(0u64, GuestAddress(BOOT_IDT_START))?;
    if entry.kind == KernelKind::BzImage {
        mem.write_obj(PDPTE_START | 0x3, GuestAddress(PML4_START))?;
        mem.write_obj(PDE_START | 0x3, GuestAddress(PDPTE_START))?;
        for i in 0..512u64 {
            // Present, writable, 2 MiB page.
            mem.write_obj((i << 21) | 0x83, GuestAddress(PDE_START + 8 * i))?;
        }
    }
    Ok(())
}

/// Sets the segment, control and table registers the entry protocol requires.
pub fn boot_sregs(sregs: &mut kvm_sregs, entry: &BootEntry) {
    let data = segment(GDT_DATA);
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = segment(GDT_TSS);
    sregs.gdt.base = BOOT_GDT_START;
    sregs.gdt.limit = (GDT.len() * 8 - 1) as u16;
    sregs.idt.base = BOOT_IDT_START;
    sregs.idt.limit = 7;
    match entry.kind {
        KernelKind::Pvh => {
            // 32-bit protected mode, paging off.
            sregs.cs = segment(GDT_CODE32);
            sregs.cr0 = CR0_PE | CR0_ET;
            sregs.cr4 = 0;
            sregs.efer = 0;
        }
        KernelKind::BzImage => {
            sregs.cs = segment(GDT_CODE64);
            sregs.cr3 = PML4_START;
            sregs.cr4 |= CR4_PAE;
            sregs.cr0 |= CR0_PE | CR0_PG | CR0_ET;
            sregs.efer |= EFER_LME | EFER_LMA;
        }
    }
}

/// General-purpose registers at entry.
pub fn boot_regs(entry: &BootEntry) -> kvm_regs {
    let mut regs = kvm_regs { rflags: 0x2, rip: entry.rip, ..Default::default() };
    match entry.kind {
        KernelKind::Pvh => regs.rbx = entry.boot_info,
        KernelKind::BzImage => {
            regs.rsp = BOOT_STACK_POINTER;
            regs.rbp = BOOT_STACK_POINTER;
            regs.rsi = entry.boot_info;
        }
    }
    regs
}

/// x87 and SSE state as after reset.
pub fn boot_fpu() -> kvm_fpu {
    kvm_fpu { fcw: 0x37f, mxcsr: 0x1f80, ..Default::default() }
}

const APIC_LVT0: usize = 0x350;
const APIC_LVT1: usize = 0x360;
const APIC_MODE_NMI: u32 = 0x4;
const APIC_MODE_EXTINT: u32 = 0x7;

fn lapic_reg(state: &kvm_lapic_state, offset: usize) -> u32 {
    let bytes: Vec<u8> = state.regs[offset..offset + 4].iter().map(|b| *b as u8).collect();
    u32::from_le_bytes(bytes.try_into().expect("four bytes"))
}

fn set_lapic_reg(state: &mut kvm_lapic_state, offset: usize, value: u32) {
    for (dst, src) in state.regs[offset..offset + 4].iter_mut().zip(value.to_le_bytes()) {
        *dst = src as _;
    }
}

/// Wires LINT0 to the PIC (ExtINT) and LINT1 to NMI, as PC firmware does.
pub fn set_lint(state: &mut kvm_lapic_state) {
    let with_mode = |reg: u32, mode: u32| (reg & !0x700) | (mode << 8);
    let lvt0 = lapic_reg(state, APIC_LVT0);
    set_lapic_reg(state, APIC_LVT0, with_mode(lvt0, APIC_MODE_EXTINT));
    let lvt1 = lapic_reg(state, APIC_LVT1);
    set_lapic_reg(state, APIC_LVT1, with_mode(lvt1, APIC_MODE_NMI));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn code_segments_decode() {
        let cs64 = segment(GDT_CODE64);
        assert_eq!((cs64.l, cs64.db, cs64.type_, cs64.present), (1, 0, 0xb, 1));
        let cs32 = segment(GDT_CODE32);
        assert_eq!((cs32.l, cs32.db, cs32.limit, cs32.base), (0, 1, 0xffff_ffff, 0));
        assert_eq!(segment(GDT_DATA).selector, 0x10);
    }

    #[test]
    fn lint_modes() {
        let mut state = kvm_lapic_state::default();
        set_lint(&mut state);
        assert_eq!((lapic_reg(&state, APIC_LVT0) >> 8) & 7, APIC_MODE_EXTINT);
        assert_eq!((lapic_reg(&state, APIC_LVT1) >> 8) & 7, APIC_MODE_NMI);
    }
}
