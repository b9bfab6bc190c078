//! ACPI, read in ring 3: the MADT gives the CPUs, the FADT the power-off path, the DSDT the
//! virtio-mmio devices and `_S5`.

use crate::phys::{self, u32_at, u64_at, u8_at, LOW_MAP_END};
use crate::power::{Gas, PowerInfo};
use crate::MAX_CPUS;

pub const MAX_VIRTIO: usize = 32;

pub struct Acpi {
    /// APIC ids of the enabled CPUs, in MADT order (the BSP among them).
    pub apic_ids: [u32; MAX_CPUS],
    pub ncpus: usize,
    /// MMIO base of each `LNRO0005` device, in DSDT order.
    pub virtio: [u64; MAX_VIRTIO],
    pub nvirtio: usize,
    pub power: PowerInfo,
}

/// Borrows a whole ACPI table given its address, checking that it lies in the low map.
fn table(addr: u64) -> Option<&'static [u8]> {
    if addr == 0 || addr + 36 > LOW_MAP_END {
        return None;
    }
    // SAFETY: 36 bytes of a table header in low memory; firmware tables are not written at run time.
    let len = u32_at(unsafe { phys::bytes(addr, 36) }, 4)? as u64;
    if !(36..=(1 << 20)).contains(&len) || addr + len > LOW_MAP_END {
        return None;
    }
    // SAFETY: the whole table, as its header says, checked to lie in the low map.
    Some(unsafe { phys::bytes(addr, len as usize) })
}

fn checksum_ok(b: &[u8]) -> bool {
    b.iter().fold(0u8, |s, &c| s.wrapping_add(c)) == 0
}

fn find_rsdp(hint: u64) -> Option<&'static [u8]> {
    let valid = |addr: u64| {
        // SAFETY: 20 bytes in low memory (the hint is the loader's, the scan is the BIOS area).
        let b = unsafe { phys::bytes(addr, 20) };
        (b.get(..8) == Some(b"RSD PTR ") && checksum_ok(b)).then(|| {
            // SAFETY: revision >= 2 RSDPs are 36 bytes; same memory.
            unsafe { phys::bytes(addr, if b[15] >= 2 { 36 } else { 20 }) }
        })
    };
    if hint != 0 && hint + 36 <= LOW_MAP_END {
        return valid(hint);
    }
    (0xE0000u64..0x100000).step_by(16).find_map(valid)
}

pub fn parse(rsdp_hint: u64) -> Result<Acpi, &'static str> {
    let rsdp = find_rsdp(rsdp_hint).ok_or("reason=no-rsdp")?;
    let xsdt = if rsdp.len() >= 36 { u64_at(rsdp, 24).unwrap_or(0) } else { 0 };
    let (root, entry_size) = match table(xsdt) {
        Some(t) if xsdt != 0 => (t, 8),
        _ => (table(u32_at(rsdp, 16).unwrap_or(0) as u64).ok_or("reason=no-rsdt")?, 4),
    };

    let mut acpi =
        Acpi { apic_ids: [0; MAX_CPUS], ncpus: 0, virtio: [0; MAX_VIRTIO], nvirtio: 0, power: PowerInfo::default() };
    let mut madt_seen = false;
    let mut dsdt = None;
    for entry in root[36..].chunks_exact(entry_size) {
        let addr = if entry_size == 8 { u64_at(entry, 0) } else { u32_at(entry, 0).map(u64::from) };
        let Some(t) = addr.and_then(table) else { continue };
        match &t[..4] {
            b"APIC" => {
                madt_seen = true;
                parse_madt(t, &mut acpi)?;
            }
            b"FACP" => dsdt = parse_fadt(t, &mut acpi.power),
            _ => {}
        }
    }
    if !madt_seen {
        return Err("reason=no-madt");
    }
    if let Some(d) = dsdt.and_then(table) {
        let aml = &d[36..];
        acpi.power.slp_typ = find_s5(aml).unwrap_or(5);
        find_virtio(aml, &mut acpi);
    }
    Ok(acpi)
}

fn parse_madt(t: &[u8], acpi: &mut Acpi) -> Result<(), &'static str> {
    let mut off = 44;
    while off + 2 <= t.len() {
        let (typ, len) = (t[off], t[off + 1] as usize);
        if len < 2 || off + len > t.len() {
            break;
        }
        let e = &t[off..off + len];
        let cpu = match typ {
            // Processor Local APIC: id at 3, flags at 4 (bit 0 enabled).
            0 => (u32_at(e, 4).unwrap_or(0) & 1 != 0).then(|| u8_at(e, 3).unwrap_or(0) as u32),
            // Processor Local x2APIC: id at 4, flags at 8.
            9 => (u32_at(e, 8).unwrap_or(0) & 1 != 0).then(|| u32_at(e, 4).unwrap_or(0)),
            _ => None,
        };
        if let Some(id) = cpu {
            if acpi.ncpus == MAX_CPUS {
                return Err("reason=too-many-cpus");
            }
            acpi.apic_ids[acpi.ncpus] = id;
            acpi.ncpus += 1;
        }
        off += len;
    }
    Ok(())
}

/// Fills the power-off registers; returns the DSDT address.
fn parse_fadt(t: &[u8], p: &mut PowerInfo) -> Option<u64> {
    let flags = u32_at(t, 112).unwrap_or(0);
    let gas = |off: usize| Gas::parse(t.get(off..off + 12)?);
    if flags & (1 << 20) != 0 {
        p.sleep_ctl = gas(244);
    }
    p.pm1a_cnt = gas(172).or_else(|| {
        let port = u32_at(t, 64).unwrap_or(0);
        (port != 0).then_some(Gas { space: Gas::IO, width: 2, addr: port as u64 })
    });
    if flags & (1 << 10) != 0 {
        p.reset = gas(116).map(|g| (g, u8_at(t, 128).unwrap_or(0)));
    }
    u64_at(t, 140).filter(|&a| a != 0).or_else(|| u32_at(t, 40).map(u64::from))
}

/// AML PkgLength at `i`: (length, bytes it takes).
fn pkg_length(b: &[u8], i: usize) -> Option<(usize, usize)> {
    let lead = *b.get(i)?;
    let extra = (lead >> 6) as usize;
    if extra == 0 {
        return Some(((lead & 0x3F) as usize, 1));
    }
    let mut len = (lead & 0x0F) as usize;
    for k in 0..extra {
        len |= (*b.get(i + 1 + k)? as usize) << (4 + 8 * k);
    }
    Some((len, 1 + extra))
}

/// `Name(_S5_, Package() { SLP_TYPa, ... })`: SLP_TYPa.
fn find_s5(aml: &[u8]) -> Option<u8> {
    let at = aml.windows(4).position(|w| w == b"_S5_")?;
    let mut i = at + 4;
    if *aml.get(i)? != 0x12 {
        return None; // not a PackageOp
    }
    i += 1;
    i += pkg_length(aml, i)?.1;
    i += 1; // NumElements
    match *aml.get(i)? {
        0x0A => aml.get(i + 1).copied(), // BytePrefix
        0x00 => Some(0),                 // ZeroOp
        0x01 => Some(1),                 // OneOp
        v => Some(v),
    }
}

/// Every `Device` whose `_HID` is "LNRO0005": its `Memory32Fixed` base from `_CRS`.
///
/// No AML interpreter: find the `Name(_HID, "LNRO0005")` bytes, take the innermost `DeviceOp`
/// package around them and look for a Memory32Fixed descriptor (0x86, length 9) inside it.
fn find_virtio(aml: &[u8], acpi: &mut Acpi) {
    const HID: &[u8] = b"_HID\x0DLNRO0005\x00";
    let mut from = 0;
    while let Some(pos) = aml[from..].windows(HID.len()).position(|w| w == HID) {
        let hid = from + pos;
        from = hid + HID.len();
        // Innermost Device (0x5B 0x82 PkgLength) that contains the _HID.
        let mut best: Option<(usize, usize)> = None;
        for d in 0..hid {
            if aml[d] != 0x5B || aml[d + 1] != 0x82 {
                continue;
            }
            let Some((len, _)) = pkg_length(aml, d + 2) else { continue };
            let end = d + 2 + len;
            if end > hid && end <= aml.len() && best.is_none_or(|(s, _)| d > s) {
                best = Some((d, end));
            }
        }
        let Some((start, end)) = best else { continue };
        let dev = &aml[start..end];
        let base = dev.windows(12).find(|w| w[0] == 0x86 && w[1] == 0x09 && w[2] == 0x00).and_then(|w| u32_at(w, 4));
        if let Some(base) = base {
            if acpi.nvirtio < MAX_VIRTIO {
                acpi.virtio[acpi.nvirtio] = base as u64;
                acpi.nvirtio += 1;
            }
        }
    }
}
