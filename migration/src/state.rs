//! Vendor-neutral VM state carried by the stream: the VM configuration, one
//! [`VcpuState`] per vCPU and one [`DeviceState`] per device.
//!
//! The vCPU records ([`VcpuState`], [`Regs`], [`Segment`], ...) live in the
//! `vmstate` crate, beneath both this crate and the hypervisor logic, and
//! are re-exported here; their conventions (packed segment attributes,
//! FS/GS base, the XSAVE image, `tsc`) are documented there. This module
//! holds their wire encoding and the configuration and device records.
//!
//! Invariant: decoding checks structure and caps only (lengths, counts,
//! booleans, enum values). Architectural consistency (CR0/CR4/EFER reserved
//! bits, segment/mode combinations) is the restoring backend's job: it
//! treats these values as guest allegations and refuses with a `VmError`.

use crate::error::StreamError;
use crate::wire::{put_u16, put_u32, put_u64, put_u8, Reader};
use alloc::vec::Vec;
pub use vmstate::{
    EventKind, FpuState, Msrs, PendingEvent, Regs, Segment, TableReg, VcpuState, MAX_XSAVE_BYTES,
};

/// Largest guest RAM the protocol accepts (1 TiB).
pub const MAX_RAM_BYTES: u64 = 1 << 40;
/// Most vCPUs in one VM.
pub const MAX_VCPUS: u32 = 256;
/// Most devices in one VM configuration.
pub const MAX_DEVICES: usize = 64;
/// Most CPUID entries in one VM configuration.
pub const MAX_CPUID_ENTRIES: usize = 512;
/// Largest opaque device state payload.
pub const MAX_DEVICE_PAYLOAD: usize = 64 * 1024;

/// One device of the VM as the configuration names it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DeviceDesc {
    /// Device kind (a registry number the device models agree on).
    pub kind: u16,
    /// Instance of that kind (0 for the first).
    pub instance: u16,
    /// Version of the device's saved-state format.
    pub version: u32,
}

/// One CPUID leaf as the guest saw it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct CpuidEntry {
    pub leaf: u32,
    pub subleaf: u32,
    pub eax: u32,
    pub ebx: u32,
    pub ecx: u32,
    pub edx: u32,
}

/// The VM's configuration: what the destination creates before memory and
/// state arrive (MISSION "Live migration" step 1).
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct VmConfig {
    /// Guest RAM in bytes, a multiple of 4096, starting at GPA 0.
    pub ram_bytes: u64,
    /// Number of vCPUs.
    pub vcpus: u32,
    /// Devices, in the order their state records will be sent.
    pub devices: Vec<DeviceDesc>,
    /// The CPUID values the guest was shown; the destination must be able to
    /// show the same (the guest may have cached feature bits).
    pub cpuid: Vec<CpuidEntry>,
}

impl VmConfig {
    /// Guest RAM in 4 KiB pages.
    pub fn ram_pages(&self) -> u64 {
        self.ram_bytes / crate::PAGE_SIZE as u64
    }

    pub(crate) fn encode(&self, out: &mut Vec<u8>) {
        put_u64(out, self.ram_bytes);
        put_u32(out, self.vcpus);
        put_u16(out, u16::try_from(self.devices.len()).unwrap_or(u16::MAX));
        put_u16(out, u16::try_from(self.cpuid.len()).unwrap_or(u16::MAX));
        for d in &self.devices {
            put_u16(out, d.kind);
            put_u16(out, d.instance);
            put_u32(out, d.version);
        }
        for c in &self.cpuid {
            for v in [c.leaf, c.subleaf, c.eax, c.ebx, c.ecx, c.edx] {
                put_u32(out, v);
            }
        }
    }

    /// Encoded payload length.
    pub(crate) fn encoded_len(&self) -> usize {
        16 + 8 * self.devices.len() + 24 * self.cpuid.len()
    }

    /// Largest valid encoded payload.
    pub(crate) const MAX_ENCODED: usize = 16 + 8 * MAX_DEVICES + 24 * MAX_CPUID_ENTRIES;

    /// Check the caps the decoder enforces (used by the encoder's callers to
    /// refuse to send what the peer would refuse).
    pub fn validate(&self) -> Result<(), StreamError> {
        let r = 0;
        let page = crate::PAGE_SIZE as u64;
        if self.ram_bytes == 0 || !self.ram_bytes.is_multiple_of(page) {
            return Err(StreamError::InvalidValue {
                record: r,
                what: "RAM size",
                value: self.ram_bytes,
            });
        }
        let caps = [
            ("RAM size in bytes", self.ram_bytes, MAX_RAM_BYTES),
            ("vCPU count", u64::from(self.vcpus), u64::from(MAX_VCPUS)),
            (
                "device count",
                self.devices.len() as u64,
                MAX_DEVICES as u64,
            ),
            (
                "CPUID entry count",
                self.cpuid.len() as u64,
                MAX_CPUID_ENTRIES as u64,
            ),
        ];
        for (what, value, cap) in caps {
            if value > cap {
                return Err(StreamError::OverCap {
                    record: r,
                    what,
                    value,
                    cap,
                });
            }
        }
        if self.vcpus == 0 {
            return Err(StreamError::InvalidValue {
                record: r,
                what: "vCPU count",
                value: 0,
            });
        }
        for (i, d) in self.devices.iter().enumerate() {
            if self.devices[..i]
                .iter()
                .any(|e| e.kind == d.kind && e.instance == d.instance)
            {
                return Err(StreamError::InvalidValue {
                    record: r,
                    what: "duplicate device (kind << 16 | instance)",
                    value: (u64::from(d.kind) << 16) | u64::from(d.instance),
                });
            }
        }
        Ok(())
    }

    pub(crate) fn decode(r: &mut Reader<'_>) -> Result<Self, StreamError> {
        let record = r.record();
        let ram_bytes = r.u64("ram_bytes")?;
        let vcpus = r.u32("vcpus")?;
        let n_devices = r.u16("device_count")?;
        let n_cpuid = r.u16("cpuid_count")?;
        // Check the counts before allocating for them.
        if usize::from(n_devices) > MAX_DEVICES {
            return Err(StreamError::OverCap {
                record,
                what: "device count",
                value: u64::from(n_devices),
                cap: MAX_DEVICES as u64,
            });
        }
        if usize::from(n_cpuid) > MAX_CPUID_ENTRIES {
            return Err(StreamError::OverCap {
                record,
                what: "CPUID entry count",
                value: u64::from(n_cpuid),
                cap: MAX_CPUID_ENTRIES as u64,
            });
        }
        let mut devices = Vec::with_capacity(usize::from(n_devices));
        for _ in 0..n_devices {
            devices.push(DeviceDesc {
                kind: r.u16("device.kind")?,
                instance: r.u16("device.instance")?,
                version: r.u32("device.version")?,
            });
        }
        let mut cpuid = Vec::with_capacity(usize::from(n_cpuid));
        for _ in 0..n_cpuid {
            cpuid.push(CpuidEntry {
                leaf: r.u32("cpuid.leaf")?,
                subleaf: r.u32("cpuid.subleaf")?,
                eax: r.u32("cpuid.eax")?,
                ebx: r.u32("cpuid.ebx")?,
                ecx: r.u32("cpuid.ecx")?,
                edx: r.u32("cpuid.edx")?,
            });
        }
        let cfg = VmConfig {
            ram_bytes,
            vcpus,
            devices,
            cpuid,
        };
        cfg.validate().map_err(|e| with_record(e, record))?;
        Ok(cfg)
    }
}

/// Re-label an error produced without a record number.
pub(crate) fn with_record(e: StreamError, record: u64) -> StreamError {
    use StreamError::*;
    match e {
        OverCap {
            what, value, cap, ..
        } => OverCap {
            record,
            what,
            value,
            cap,
        },
        InvalidValue { what, value, .. } => InvalidValue {
            record,
            what,
            value,
        },
        other => other,
    }
}

/// The vCPU record's interruptibility byte: bit 0 the STI/MOV-SS shadow
/// (every version), bit 1 NMIs blocked (version 3,
/// [`crate::stream::NMI_STATE_VERSION`]; the decoder refuses it in older
/// streams, so a version-2 peer never gets a state it would misread).
pub(crate) const INTERRUPT_SHADOW: u8 = 1;
pub(crate) const NMI_BLOCKED: u8 = 2;

/// Fixed part of an encoded [`VcpuState`] (everything but the XSAVE bytes).
pub(crate) const VCPU_FIXED_BYTES: usize = 4
    + Regs::FIELDS * 8
    + 8 * 16
    + 2 * 10
    + 6 * 8
    + 6 * 8
    + Msrs::FIELDS * 8
    + 8
    + (1 + 1 + 1 + 4 + 1)
    + 8
    + 4;

/// The stream encoding of a [`VcpuState`] (the record type lives in the
/// `vmstate` crate; its wire form is this crate's).
pub(crate) trait VcpuWire: Sized {
    /// Encoded payload length.
    fn encoded_len(&self) -> usize;
    /// Append the payload.
    fn encode(&self, out: &mut Vec<u8>);
    /// Decode one payload, checking structure and caps.
    fn decode(r: &mut Reader<'_>) -> Result<Self, StreamError>;
}

impl VcpuWire for VcpuState {
    fn encoded_len(&self) -> usize {
        VCPU_FIXED_BYTES + self.fpu.xsave.len()
    }

    fn encode(&self, out: &mut Vec<u8>) {
        put_u32(out, self.id);
        for v in self.regs.fields() {
            put_u64(out, v);
        }
        for s in self.segments() {
            put_u16(out, s.selector);
            put_u16(out, s.attrib);
            put_u32(out, s.limit);
            put_u64(out, s.base);
        }
        for t in [&self.gdtr, &self.idtr] {
            put_u64(out, t.base);
            put_u16(out, t.limit);
        }
        for v in [self.cr0, self.cr2, self.cr3, self.cr4, self.cr8, self.efer] {
            put_u64(out, v);
        }
        for v in [
            self.dr[0], self.dr[1], self.dr[2], self.dr[3], self.dr6, self.dr7,
        ] {
            put_u64(out, v);
        }
        for v in self.msrs.fields() {
            put_u64(out, v);
        }
        put_u64(out, self.tsc);
        match self.pending_event {
            None => {
                put_u8(out, 0);
                put_u8(out, 0);
                put_u8(out, 0);
                put_u32(out, 0);
            }
            Some(ev) => {
                put_u8(out, if ev.error_code.is_some() { 3 } else { 1 });
                put_u8(out, ev.kind.raw());
                put_u8(out, ev.vector);
                put_u32(out, ev.error_code.unwrap_or(0));
            }
        }
        put_u8(
            out,
            u8::from(self.interrupt_shadow) | if self.nmi_blocked { NMI_BLOCKED } else { 0 },
        );
        put_u64(out, self.fpu.xcr0);
        put_u32(out, u32::try_from(self.fpu.xsave.len()).unwrap_or(u32::MAX));
        out.extend_from_slice(&self.fpu.xsave);
    }

    fn decode(r: &mut Reader<'_>) -> Result<Self, StreamError> {
        let record = r.record();
        let mut s = VcpuState {
            id: r.u32("vcpu.id")?,
            ..Default::default()
        };
        for f in s.regs.fields_mut() {
            *f = r.u64("vcpu.regs")?;
        }
        for seg in s.segments_mut() {
            seg.selector = r.u16("segment.selector")?;
            seg.attrib = r.u16("segment.attrib")?;
            seg.limit = r.u32("segment.limit")?;
            seg.base = r.u64("segment.base")?;
            if seg.attrib & !Segment::ATTR_DEFINED != 0 {
                return Err(StreamError::InvalidValue {
                    record,
                    what: "segment attributes",
                    value: u64::from(seg.attrib),
                });
            }
        }
        for t in [&mut s.gdtr, &mut s.idtr] {
            t.base = r.u64("table.base")?;
            t.limit = r.u16("table.limit")?;
        }
        for f in [
            &mut s.cr0,
            &mut s.cr2,
            &mut s.cr3,
            &mut s.cr4,
            &mut s.cr8,
            &mut s.efer,
        ] {
            *f = r.u64("vcpu.cr")?;
        }
        let mut drs = [0u64; 6];
        for d in drs.iter_mut() {
            *d = r.u64("vcpu.dr")?;
        }
        s.dr = [drs[0], drs[1], drs[2], drs[3]];
        s.dr6 = drs[4];
        s.dr7 = drs[5];
        let mut m = [0u64; Msrs::FIELDS];
        for v in m.iter_mut() {
            *v = r.u64("vcpu.msr")?;
        }
        s.msrs = Msrs::from_fields(m);
        s.tsc = r.u64("vcpu.tsc")?;
        let ev_flags = r.u8("event.flags")?;
        let ev_kind = r.u8("event.kind")?;
        let ev_vector = r.u8("event.vector")?;
        let ev_error = r.u32("event.error_code")?;
        s.pending_event = match ev_flags {
            0 => None,
            1 | 3 => {
                let kind = EventKind::from_raw(ev_kind).ok_or(StreamError::InvalidValue {
                    record,
                    what: "pending event type",
                    value: u64::from(ev_kind),
                })?;
                if kind == EventKind::Exception && ev_vector >= 32 {
                    return Err(StreamError::InvalidValue {
                        record,
                        what: "exception vector",
                        value: u64::from(ev_vector),
                    });
                }
                Some(PendingEvent {
                    vector: ev_vector,
                    kind,
                    error_code: (ev_flags == 3).then_some(ev_error),
                })
            }
            other => {
                return Err(StreamError::InvalidValue {
                    record,
                    what: "pending event flags",
                    value: u64::from(other),
                })
            }
        };
        let flags = r.u8("vcpu.interruptibility")?;
        if flags & !(INTERRUPT_SHADOW | NMI_BLOCKED) != 0 {
            return Err(StreamError::InvalidValue {
                record,
                what: "vcpu.interruptibility",
                value: u64::from(flags),
            });
        }
        s.interrupt_shadow = flags & INTERRUPT_SHADOW != 0;
        s.nmi_blocked = flags & NMI_BLOCKED != 0;
        s.fpu.xcr0 = r.u64("fpu.xcr0")?;
        let len = r.u32("fpu.xsave_len")?;
        if len as usize > MAX_XSAVE_BYTES {
            return Err(StreamError::OverCap {
                record,
                what: "XSAVE image size in bytes",
                value: u64::from(len),
                cap: MAX_XSAVE_BYTES as u64,
            });
        }
        s.fpu.xsave = r.bytes(len as usize, "fpu.xsave")?.to_vec();
        Ok(s)
    }
}

/// One device's saved state.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct DeviceState {
    pub kind: u16,
    pub instance: u16,
    /// Version of `payload`'s format (the device model refuses versions it
    /// cannot read).
    pub version: u32,
    /// Opaque to this crate, at most [`MAX_DEVICE_PAYLOAD`] bytes.
    pub payload: Vec<u8>,
}

impl DeviceState {
    pub(crate) fn encoded_len(&self) -> usize {
        12 + self.payload.len()
    }

    pub(crate) fn encode(&self, out: &mut Vec<u8>) {
        put_u16(out, self.kind);
        put_u16(out, self.instance);
        put_u32(out, self.version);
        put_u32(out, u32::try_from(self.payload.len()).unwrap_or(u32::MAX));
        out.extend_from_slice(&self.payload);
    }

    pub(crate) fn decode(r: &mut Reader<'_>) -> Result<Self, StreamError> {
        let kind = r.u16("device.kind")?;
        let instance = r.u16("device.instance")?;
        let version = r.u32("device.version")?;
        let len = r.u32("device.payload_len")?;
        if len as usize > MAX_DEVICE_PAYLOAD {
            return Err(StreamError::OverCap {
                record: r.record(),
                what: "device state size in bytes",
                value: u64::from(len),
                cap: MAX_DEVICE_PAYLOAD as u64,
            });
        }
        let payload = r.bytes(len as usize, "device.payload")?.to_vec();
        Ok(DeviceState {
            kind,
            instance,
            version,
            payload,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::Reader;

    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
        }
    }

    fn random_vcpu(r: &mut Rng, id: u32) -> VcpuState {
        let mut v = VcpuState {
            id,
            ..Default::default()
        };
        for f in v.regs.fields_mut() {
            *f = r.next();
        }
        for s in v.segments_mut() {
            *s = Segment {
                selector: r.next() as u16,
                attrib: r.next() as u16 & 0x0fff,
                limit: r.next() as u32,
                base: r.next(),
            };
        }
        v.gdtr = TableReg {
            base: r.next(),
            limit: r.next() as u16,
        };
        v.idtr = TableReg {
            base: r.next(),
            limit: r.next() as u16,
        };
        v.cr0 = r.next();
        v.cr2 = r.next();
        v.cr3 = r.next();
        v.cr4 = r.next();
        v.cr8 = r.next();
        v.efer = r.next();
        v.dr = [r.next(), r.next(), r.next(), r.next()];
        v.dr6 = r.next();
        v.dr7 = r.next();
        v.msrs.pat = r.next();
        v.msrs.lstar = r.next();
        v.msrs.sysenter_eip = r.next();
        v.tsc = r.next();
        v.interrupt_shadow = r.next() & 1 == 1;
        v.nmi_blocked = r.next() & 1 == 1;
        v.pending_event = match r.next() % 4 {
            0 => None,
            1 => Some(PendingEvent {
                vector: 0x20,
                kind: EventKind::ExternalInterrupt,
                error_code: None,
            }),
            2 => Some(PendingEvent {
                vector: 2,
                kind: EventKind::Nmi,
                error_code: None,
            }),
            _ => Some(PendingEvent {
                vector: 13,
                kind: EventKind::Exception,
                error_code: Some(r.next() as u32),
            }),
        };
        v.fpu = FpuState {
            xcr0: r.next(),
            xsave: (0..(r.next() % 4096) as usize)
                .map(|_| r.next() as u8)
                .collect(),
        };
        v
    }

    #[test]
    fn vcpu_state_round_trips() {
        let mut r = Rng(0x1234_5678_9abc_def1);
        for id in 0..200 {
            let v = random_vcpu(&mut r, id);
            let mut out = Vec::new();
            v.encode(&mut out);
            assert_eq!(out.len(), v.encoded_len());
            let mut rd = Reader::new(&out, 0);
            assert_eq!(VcpuState::decode(&mut rd).unwrap(), v);
            rd.finish("vCPU").unwrap();
        }
    }

    #[test]
    fn vcpu_state_rejects_out_of_domain_values() {
        let v = random_vcpu(&mut Rng(7), 0);
        let mut good = Vec::new();
        v.encode(&mut good);
        // Offsets of fields after the fixed register block.
        let seg0_attrib = 4 + 18 * 8 + 2;
        let ev_flags = VCPU_FIXED_BYTES - 8 - 1 - 4 - 4 - 1 - 1 - 1;
        let shadow = VCPU_FIXED_BYTES - 8 - 4 - 1;
        let xsave_len = VCPU_FIXED_BYTES - 4;
        let cases: [(usize, &[u8], &str); 6] = [
            (seg0_attrib, &[0x00, 0x10], "segment attributes"),
            (ev_flags, &[2], "pending event flags"),
            (ev_flags, &[1, 9], "pending event type"),
            (ev_flags, &[1, 3, 40], "exception vector"),
            (shadow, &[4], "vcpu.interruptibility"),
            (xsave_len, &[0xff, 0xff, 0, 0], "XSAVE image size in bytes"),
        ];
        for (off, bytes, what) in cases {
            let mut bad = good.clone();
            bad[off..off + bytes.len()].copy_from_slice(bytes);
            let e = VcpuState::decode(&mut Reader::new(&bad, 3)).unwrap_err();
            let named = match &e {
                StreamError::InvalidValue {
                    what, record: 3, ..
                } => *what,
                StreamError::OverCap {
                    what, record: 3, ..
                } => *what,
                other => panic!("{other:?}"),
            };
            assert_eq!(named, what);
        }
        // Cut anywhere: a named truncation, never a panic.
        for cut in 0..good.len() {
            let e = VcpuState::decode(&mut Reader::new(&good[..cut], 1)).unwrap_err();
            assert!(
                matches!(e, StreamError::Truncated { record: 1, .. }),
                "{e:?}"
            );
        }
    }

    #[test]
    fn config_validation() {
        let ok = VmConfig {
            ram_bytes: 1 << 30,
            vcpus: 4,
            devices: alloc::vec![DeviceDesc {
                kind: 1,
                instance: 0,
                version: 1
            }],
            cpuid: alloc::vec![CpuidEntry::default(); 3],
        };
        ok.validate().unwrap();
        let mut out = Vec::new();
        ok.encode(&mut out);
        assert_eq!(out.len(), ok.encoded_len());
        assert_eq!(VmConfig::decode(&mut Reader::new(&out, 0)).unwrap(), ok);
        let bad = [
            VmConfig {
                ram_bytes: 0,
                ..ok.clone()
            },
            VmConfig {
                ram_bytes: 4097,
                ..ok.clone()
            },
            VmConfig {
                ram_bytes: MAX_RAM_BYTES + 4096,
                ..ok.clone()
            },
            VmConfig {
                vcpus: 0,
                ..ok.clone()
            },
            VmConfig {
                vcpus: MAX_VCPUS + 1,
                ..ok.clone()
            },
            VmConfig {
                devices: alloc::vec![ok.devices[0]; 2],
                ..ok.clone()
            },
        ];
        for c in bad {
            assert!(c.validate().is_err(), "{c:?}");
            let mut out = Vec::new();
            c.encode(&mut out);
            assert!(VmConfig::decode(&mut Reader::new(&out, 0)).is_err());
        }
    }
}
