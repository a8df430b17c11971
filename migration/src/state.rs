//! Vendor-neutral VM state carried by the stream: the VM configuration, one
//! [`VcpuState`] per vCPU and one [`DeviceState`] per device.
//!
//! These are plain structs. The SVM and VMX backends convert their VMCB /
//! VMCS contents to and from them; nothing vendor-specific crosses the wire.
//! Conventions the backends must follow:
//! - Segment attributes use the 12-bit packed form of the AMD VMCB (AMD APM
//!   vol. 2, 15.5.1 "Segment attributes"): bits 0-3 type, 4 S, 5-6 DPL, 7 P,
//!   8 AVL, 9 L, 10 D/B, 11 G. The VMX backend packs its access-rights field
//!   (Intel SDM vol. 3C, 25.4.1, bits 0-7 and 12-15) into the same form and
//!   maps "unusable" (bit 16) to P = 0.
//! - FS/GS base are the `base` of `fs`/`gs` (they *are* IA32_FS_BASE and
//!   IA32_GS_BASE); IA32_KERNEL_GS_BASE is in [`Msrs`].
//! - The FPU/SSE/AVX state is the standard (non-compacted) XSAVE image for
//!   the saved XCR0, opaque here, at most [`MAX_XSAVE_BYTES`].
//! - `tsc` is the value the guest would read with RDTSC at save time; the
//!   destination derives its own TSC offset from it.
//!
//! Invariant: decoding checks structure and caps only (lengths, counts,
//! booleans, enum values). Architectural consistency (CR0/CR4/EFER reserved
//! bits, segment/mode combinations) is the restoring backend's job: it
//! treats these values as guest allegations and refuses with a `VmError`.

use crate::error::StreamError;
use crate::wire::{put_u16, put_u32, put_u64, put_u8, Reader};
use alloc::vec::Vec;

/// Largest guest RAM the protocol accepts (1 TiB).
pub const MAX_RAM_BYTES: u64 = 1 << 40;
/// Most vCPUs in one VM.
pub const MAX_VCPUS: u32 = 256;
/// Most devices in one VM configuration.
pub const MAX_DEVICES: usize = 64;
/// Most CPUID entries in one VM configuration.
pub const MAX_CPUID_ENTRIES: usize = 512;
/// Largest XSAVE image (covers every XCR0 component defined today, AMX
/// included, with room to spare).
pub const MAX_XSAVE_BYTES: usize = 16 * 1024;
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

/// General-purpose registers, RSP, RIP and RFLAGS, in the field order of
/// `hvcore::vcpu::Regs` so backends convert field by field.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct GeneralRegs {
    pub rax: u64,
    pub rbx: u64,
    pub rcx: u64,
    pub rdx: u64,
    pub rsi: u64,
    pub rdi: u64,
    pub rbp: u64,
    pub r8: u64,
    pub r9: u64,
    pub r10: u64,
    pub r11: u64,
    pub r12: u64,
    pub r13: u64,
    pub r14: u64,
    pub r15: u64,
    pub rsp: u64,
    pub rip: u64,
    pub rflags: u64,
}

impl GeneralRegs {
    fn fields_mut(&mut self) -> [&mut u64; 18] {
        [
            &mut self.rax,
            &mut self.rbx,
            &mut self.rcx,
            &mut self.rdx,
            &mut self.rsi,
            &mut self.rdi,
            &mut self.rbp,
            &mut self.r8,
            &mut self.r9,
            &mut self.r10,
            &mut self.r11,
            &mut self.r12,
            &mut self.r13,
            &mut self.r14,
            &mut self.r15,
            &mut self.rsp,
            &mut self.rip,
            &mut self.rflags,
        ]
    }
    fn fields(&self) -> [u64; 18] {
        [
            self.rax,
            self.rbx,
            self.rcx,
            self.rdx,
            self.rsi,
            self.rdi,
            self.rbp,
            self.r8,
            self.r9,
            self.r10,
            self.r11,
            self.r12,
            self.r13,
            self.r14,
            self.r15,
            self.rsp,
            self.rip,
            self.rflags,
        ]
    }
}

/// A segment register including its hidden (descriptor-cache) part.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Segment {
    pub selector: u16,
    /// Packed attributes, AMD VMCB form (see the module docs). Bits 12-15
    /// must be zero.
    pub attrib: u16,
    pub limit: u32,
    pub base: u64,
}

/// GDTR or IDTR.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct TableReg {
    pub base: u64,
    pub limit: u16,
}

/// The MSRs a guest uses that are not part of another field.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Msrs {
    pub pat: u64,
    pub star: u64,
    pub lstar: u64,
    pub cstar: u64,
    pub sfmask: u64,
    pub kernel_gs_base: u64,
    pub tsc_aux: u64,
    pub sysenter_cs: u64,
    pub sysenter_esp: u64,
    pub sysenter_eip: u64,
}

/// How a pending event is delivered (the AMD EVENTINJ TYPE encoding, AMD APM
/// vol. 2, 15.20; VMX interruption types map onto it).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EventKind {
    /// External (maskable) interrupt.
    ExternalInterrupt,
    /// Non-maskable interrupt.
    Nmi,
    /// Hardware exception (vector < 32).
    Exception,
    /// Software interrupt (INTn).
    SoftwareInterrupt,
}

impl EventKind {
    fn raw(self) -> u8 {
        match self {
            EventKind::ExternalInterrupt => 0,
            EventKind::Nmi => 2,
            EventKind::Exception => 3,
            EventKind::SoftwareInterrupt => 4,
        }
    }
    fn from_raw(raw: u8) -> Option<Self> {
        match raw {
            0 => Some(EventKind::ExternalInterrupt),
            2 => Some(EventKind::Nmi),
            3 => Some(EventKind::Exception),
            4 => Some(EventKind::SoftwareInterrupt),
            _ => None,
        }
    }
}

/// An event the vCPU had accepted but not yet delivered.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PendingEvent {
    pub vector: u8,
    pub kind: EventKind,
    pub error_code: Option<u32>,
}

/// FPU/SSE/AVX/... state: an opaque XSAVE image and the XCR0 it was saved
/// with.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct FpuState {
    pub xcr0: u64,
    /// Standard-form XSAVE image, at most [`MAX_XSAVE_BYTES`].
    pub xsave: Vec<u8>,
}

/// Everything needed to continue one vCPU elsewhere.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct VcpuState {
    /// vCPU index, 0-based; records arrive in index order.
    pub id: u32,
    pub regs: GeneralRegs,
    pub es: Segment,
    pub cs: Segment,
    pub ss: Segment,
    pub ds: Segment,
    pub fs: Segment,
    pub gs: Segment,
    pub ldtr: Segment,
    pub tr: Segment,
    pub gdtr: TableReg,
    pub idtr: TableReg,
    pub cr0: u64,
    pub cr2: u64,
    pub cr3: u64,
    pub cr4: u64,
    pub cr8: u64,
    pub efer: u64,
    /// DR0-DR3.
    pub dr: [u64; 4],
    pub dr6: u64,
    pub dr7: u64,
    pub msrs: Msrs,
    pub fpu: FpuState,
    pub pending_event: Option<PendingEvent>,
    /// The vCPU is in an interrupt shadow (after STI / MOV SS).
    pub interrupt_shadow: bool,
    /// Guest-visible TSC at save time.
    pub tsc: u64,
}

/// Fixed part of an encoded [`VcpuState`] (everything but the XSAVE bytes).
pub(crate) const VCPU_FIXED_BYTES: usize =
    4 + 18 * 8 + 8 * 16 + 2 * 10 + 6 * 8 + 6 * 8 + 10 * 8 + 8 + (1 + 1 + 1 + 4 + 1) + 8 + 4;

impl VcpuState {
    fn segments(&self) -> [&Segment; 8] {
        [
            &self.es, &self.cs, &self.ss, &self.ds, &self.fs, &self.gs, &self.ldtr, &self.tr,
        ]
    }
    fn segments_mut(&mut self) -> [&mut Segment; 8] {
        [
            &mut self.es,
            &mut self.cs,
            &mut self.ss,
            &mut self.ds,
            &mut self.fs,
            &mut self.gs,
            &mut self.ldtr,
            &mut self.tr,
        ]
    }
    fn msr_fields(m: &Msrs) -> [u64; 10] {
        [
            m.pat,
            m.star,
            m.lstar,
            m.cstar,
            m.sfmask,
            m.kernel_gs_base,
            m.tsc_aux,
            m.sysenter_cs,
            m.sysenter_esp,
            m.sysenter_eip,
        ]
    }

    /// Encoded payload length.
    pub(crate) fn encoded_len(&self) -> usize {
        VCPU_FIXED_BYTES + self.fpu.xsave.len()
    }

    pub(crate) fn encode(&self, out: &mut Vec<u8>) {
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
        for v in Self::msr_fields(&self.msrs) {
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
        put_u8(out, u8::from(self.interrupt_shadow));
        put_u64(out, self.fpu.xcr0);
        put_u32(out, u32::try_from(self.fpu.xsave.len()).unwrap_or(u32::MAX));
        out.extend_from_slice(&self.fpu.xsave);
    }

    pub(crate) fn decode(r: &mut Reader<'_>) -> Result<Self, StreamError> {
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
            if seg.attrib & 0xf000 != 0 {
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
        let mut m = [0u64; 10];
        for v in m.iter_mut() {
            *v = r.u64("vcpu.msr")?;
        }
        s.msrs = Msrs {
            pat: m[0],
            star: m[1],
            lstar: m[2],
            cstar: m[3],
            sfmask: m[4],
            kernel_gs_base: m[5],
            tsc_aux: m[6],
            sysenter_cs: m[7],
            sysenter_esp: m[8],
            sysenter_eip: m[9],
        };
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
        s.interrupt_shadow = r.bool("vcpu.interrupt_shadow")?;
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
            (shadow, &[2], "vcpu.interrupt_shadow"),
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
