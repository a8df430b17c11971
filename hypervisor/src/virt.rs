//! Backend selection: creates partitions on whichever virtualization
//! extension this CPU offers (SVM or VMX; [`backend`] decides, and each
//! `match` below has one arm per backend).

use crate::partition::GenericPartition;
use alloc::boxed::Box;
use hvcore::host::{HostError, Partition};

/// The virtualization backends this build knows.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BackendKind {
    /// AMD SVM with nested paging.
    Svm,
    /// Intel VMX with EPT.
    Vmx,
}

/// The backend this CPU can run, if any.
pub fn backend() -> Option<BackendKind> {
    if crate::svm::available() {
        return Some(BackendKind::Svm);
    }
    if crate::vmx::available() {
        return Some(BackendKind::Vmx);
    }
    None
}

/// Create a partition with `ram_bytes` of zeroed guest RAM and one vCPU.
pub fn create_partition(ram_bytes: u64) -> Result<Box<dyn Partition>, HostError> {
    match backend() {
        Some(BackendKind::Svm) => Ok(Box::new(GenericPartition::<crate::svm::Svm>::new(
            ram_bytes,
        )?)),
        Some(BackendKind::Vmx) => Ok(Box::new(GenericPartition::<crate::vmx::Vmx>::new(
            ram_bytes,
        )?)),
        None => Err(HostError::NoVirtualization),
    }
}

/// Bare world-switch round trips, for `bench exits`: elapsed nanoseconds.
pub fn bench_raw_roundtrips(iterations: u64) -> Result<u64, HostError> {
    match backend() {
        Some(BackendKind::Svm) => crate::svm::bench::raw_roundtrips(iterations),
        Some(BackendKind::Vmx) => crate::vmx::bench::raw_roundtrips(iterations),
        None => Err(HostError::NoVirtualization),
    }
}

/// Backend smoke test, run from the node command line (`selftest=1`;
/// `=2` adds the timer-preemption check, which needs the LAPIC timer).
/// Vendor-neutral: drives whichever backend [`create_partition`] picks
/// through the [`Partition`] seam, logging each exit. Returns whether every
/// check passed.
pub mod selftest {
    use super::create_partition;
    use alloc::boxed::Box;
    use alloc::vec;
    use hvcore::addr::Gpa;
    use hvcore::host::{DirtyMode, Partition};
    use hvcore::vcpu::{IoDir, LongModeEntry, VmExit};

    const CODE_GPA: u64 = 0x10_0000;
    const PML4_GPA: u64 = 0x1000;
    const GDT_GPA: u64 = 0x7000;
    const RAM_BYTES: u64 = 4 << 20;

    /// The guest, assembled (GNU as, Intel syntax):
    /// ```text
    /// 00 mov eax, 0x1234 / out 0xe9, al / xor eax, eax / cpuid
    /// 0b mov ecx, 0xc0000080 / rdmsr / vmmcall        ; HC 1: enable log
    /// 15 mov byte [0x200000], 1 / [0x205000], 2 / [0x3ff000], 3 / [0x205001], 4
    /// 35 vmmcall                                         ; HC 2: collect
    /// 38 mov byte [0x200010], 5 / vmmcall                ; HC 3: collect, disable
    /// 43 hlt
    /// 44 mov ecx, 1000 / 1: vmmcall / dec ecx / jnz 1b / hlt   ; round trips
    /// 51 jmp $                                           ; preemption (IF=0)
    /// ```
    const GUEST: [u8; 83] = [
        0xb8, 0x34, 0x12, 0x00, 0x00, 0xe6, 0xe9, 0x31, 0xc0, 0x0f, 0xa2, 0xb9, 0x80, 0x00, 0x00,
        0xc0, 0x0f, 0x32, 0x0f, 0x01, 0xd9, 0xc6, 0x04, 0x25, 0x00, 0x00, 0x20, 0x00, 0x01, 0xc6,
        0x04, 0x25, 0x00, 0x50, 0x20, 0x00, 0x02, 0xc6, 0x04, 0x25, 0x00, 0xf0, 0x3f, 0x00, 0x03,
        0xc6, 0x04, 0x25, 0x01, 0x50, 0x20, 0x00, 0x04, 0x0f, 0x01, 0xd9, 0xc6, 0x04, 0x25, 0x10,
        0x00, 0x20, 0x00, 0x05, 0x0f, 0x01, 0xd9, 0xf4, 0xb9, 0xe8, 0x03, 0x00, 0x00, 0x0f, 0x01,
        0xd9, 0xff, 0xc9, 0x75, 0xf9, 0xf4, 0xeb, 0xfe,
    ];
    /// `ud2` for the triple-fault partition (IDT limit 0).
    const UD2: [u8; 2] = [0x0f, 0x0b];

    /// Identity page tables for the first 1 GiB (2 MiB pages, A and D preset
    /// so the CPU never writes them) and a GDT; then long mode at `rip`.
    fn prepare(p: &mut dyn Partition, code: &[u8]) -> Result<(), &'static str> {
        let m = p.memory();
        let e = |_| "guest memory write";
        // PML4[0] -> PDPT at 0x2000; PDPT[0] -> PD at 0x3000: P|RW|A.
        m.write_u64(Gpa(PML4_GPA), 0x2000 | 0x23).map_err(e)?;
        m.write_u64(Gpa(0x2000), 0x3000 | 0x23).map_err(e)?;
        for i in 0..512u64 {
            // P|RW|A|D|PS.
            m.write_u64(Gpa(0x3000 + i * 8), (i << 21) | 0xe3)
                .map_err(e)?;
        }
        // Accessed bits preset: loading a selector (CS on interrupt delivery)
        // would otherwise write the GDT page (Bochs does).
        m.write_u64(Gpa(GDT_GPA + 8), 0x00af_9b00_0000_ffff)
            .map_err(e)?;
        m.write_u64(Gpa(GDT_GPA + 16), 0x00cf_9300_0000_ffff)
            .map_err(e)?;
        m.write(Gpa(CODE_GPA), code).map_err(e)?;
        p.vcpu().reset_long_mode(&LongModeEntry {
            rip: CODE_GPA,
            rsp: 0x8_0000,
            rdi: 0,
            cr3: Gpa(PML4_GPA),
            gdt_base: Gpa(GDT_GPA),
            gdt_limit: 23,
            rsi: 0,
            code_selector: hvcore::vcpu::SELECTORS_ABI.0,
            data_selector: hvcore::vcpu::SELECTORS_ABI.1,
        });
        Ok(())
    }

    /// Run to the next exit other than a timer interrupt; log it; check it.
    fn expect(
        p: &mut dyn Partition,
        what: &str,
        ok: impl Fn(&VmExit) -> bool,
    ) -> Result<VmExit, &'static str> {
        let exit = loop {
            match p.run() {
                VmExit::ExternalInterrupt => continue,
                e => break e,
            }
        };
        log::info!("selftest: {what}: {exit:?} rip={:#x}", p.vcpu().regs().rip);
        if ok(&exit) {
            Ok(exit)
        } else {
            Err("unexpected exit")
        }
    }

    /// Guest frames of the page tables built by `prepare` (PML4, PDPT, PD).
    /// QEMU TCG and Bochs translate every guest page-table access through
    /// the nested table as a write (even with A/D preset; EXITINFO1 bit 33,
    /// "during the guest page-table walk"), so there they show up as dirty
    /// in every round; real hardware writes them only to set A/D.
    const PAGE_TABLE_FRAMES: [u64; 3] = [1, 2, 3];

    /// The dirty frames minus the guest page-table frames.
    fn dirty_frames(p: &mut dyn Partition) -> Result<alloc::vec::Vec<u64>, &'static str> {
        let mut bitmap = vec![0u64; (p.ram_bytes() / 4096).div_ceil(64) as usize];
        p.collect_dirty(&mut bitmap)
            .map_err(|_| "collect_dirty failed")?;
        let mut frames = alloc::vec::Vec::new();
        for (w, word) in bitmap.iter().enumerate() {
            for b in 0..64 {
                if word & (1 << b) != 0 && !PAGE_TABLE_FRAMES.contains(&(w as u64 * 64 + b)) {
                    frames.push(w as u64 * 64 + b);
                }
            }
        }
        Ok(frames)
    }

    fn main_guest(preempt: bool) -> Result<(), &'static str> {
        let mut p: Box<dyn Partition> =
            create_partition(RAM_BYTES).map_err(|_| "create_partition failed")?;
        let p = p.as_mut();
        prepare(p, &GUEST)?;
        expect(
            p,
            "out",
            |e| matches!(e, VmExit::Io(io) if io.port == 0xe9 && io.dir == IoDir::Out && io.size == 1),
        )?;
        if p.vcpu().regs().rax & 0xff != 0x34 {
            return Err("OUT value");
        }
        p.vcpu().skip_instruction();
        expect(p, "cpuid", |e| {
            matches!(
                e,
                VmExit::Cpuid {
                    leaf: 0,
                    subleaf: _
                }
            )
        })?;
        p.vcpu().skip_instruction();
        expect(p, "rdmsr", |e| {
            matches!(e, VmExit::MsrRead { msr: 0xc000_0080 })
        })?;
        let efer = p.vcpu().read_msr(0xc000_0080).map_err(|_| "EFER read")?;
        log::info!("selftest: guest EFER reads {efer:#x}");
        if efer & (1 << 12) != 0 || efer & 0xd00 != 0xd00 {
            return Err("guest EFER");
        }
        // TSC: a write sets the offset; the guest's clock runs on from there.
        p.vcpu().write_msr(0x10, 1 << 40).map_err(|_| "TSC write")?;
        let tsc = p.vcpu().read_msr(0x10).map_err(|_| "TSC read")?;
        p.vcpu()
            .write_msr(0xc000_0103, 7)
            .map_err(|_| "TSC_AUX write")?;
        if tsc.wrapping_sub(1 << 40) > 1 << 36 || p.vcpu().read_msr(0xc000_0103) != Ok(7) {
            return Err("TSC / TSC_AUX");
        }
        p.vcpu().skip_instruction();
        expect(p, "hc enable", |e| matches!(e, VmExit::Hypercall))?;
        p.enable_dirty_log(DirtyMode::WriteProtect)
            .map_err(|_| "enable_dirty_log")?;
        if p.enable_dirty_log(DirtyMode::Pml).is_ok() && !p.vcpu().caps().pml {
            return Err("PML accepted without the capability");
        }
        p.vcpu().skip_instruction();
        expect(p, "hc collect 1", |e| matches!(e, VmExit::Hypercall))?;
        p.memory()
            .write(Gpa(0x30_0000), &[9])
            .map_err(|_| "host write")?;
        let got = dirty_frames(p)?;
        log::info!("selftest: dirty round 1: {got:x?}, stats {:?}", p.stats());
        if got != [0x200, 0x205, 0x300, 0x3ff] {
            return Err("dirty set round 1");
        }
        p.vcpu().skip_instruction();
        expect(p, "hc collect 2", |e| matches!(e, VmExit::Hypercall))?;
        let got = dirty_frames(p)?;
        log::info!("selftest: dirty round 2: {got:x?}, stats {:?}", p.stats());
        if got != [0x200] {
            return Err("dirty set round 2");
        }
        p.disable_dirty_log();
        let mut b = [0u8; 2];
        p.memory()
            .read(Gpa(0x20_5000), &mut b)
            .map_err(|_| "read back")?;
        if b != [2, 4] {
            return Err("guest writes not in RAM");
        }
        p.vcpu().skip_instruction();
        expect(p, "hlt", |e| matches!(e, VmExit::Hlt))?;
        p.vcpu().skip_instruction();
        let t0 = crate::time::now_ns();
        let exits0 = p.stats().exits;
        let mut calls = 0;
        loop {
            match p.run() {
                VmExit::Hypercall => calls += 1,
                VmExit::Hlt => break,
                VmExit::ExternalInterrupt => continue,
                e => {
                    log::info!("selftest: loop: {e:?}");
                    return Err("unexpected exit in the hypercall loop");
                }
            }
            p.vcpu().skip_instruction();
        }
        let ns = crate::time::now_ns().saturating_sub(t0).max(1);
        log::info!(
            "selftest: {calls} hypercalls, {} exits in {} us: {} round trips/s",
            p.stats().exits - exits0,
            ns / 1000,
            calls * 1_000_000_000 / ns
        );
        if calls != 1000 {
            return Err("hypercall count");
        }
        p.vcpu().skip_instruction();
        if preempt {
            // The guest spins with IF=0 for ever: only the host timer gets
            // the CPU back.
            let t0 = crate::time::now_ns();
            for _ in 0..3 {
                let e = p.run();
                if e != VmExit::ExternalInterrupt {
                    log::info!("selftest: spin: {e:?}");
                    return Err("spinning guest left without a timer interrupt");
                }
            }
            log::info!(
                "selftest: spinning guest preempted 3 times in {} us",
                crate::time::now_ns().saturating_sub(t0) / 1000
            );
        }
        log::info!("selftest: stats {:?}", p.stats());
        Ok(())
    }

    /// Guest for the event re-injection check:
    /// ```text
    /// 000 lidt [0xa000] / vmmcall        ; HC 1: host enables dirty log
    /// 00b mov ecx, 0xc0de0001 / rdmsr    ; host injects #GP(0)
    /// 012 vmmcall / hlt                  ; HC 2: host checks
    /// 100 add qword [rsp+8], 2 / add rsp, 8 / inc qword [0x9f000] / iretq
    /// ```
    const GP_GUEST: [u8; 22] = [
        0x0f, 0x01, 0x1c, 0x25, 0x00, 0xa0, 0x00, 0x00, 0x0f, 0x01, 0xd9, 0xb9, 0x01, 0x00, 0xde,
        0xc0, 0x0f, 0x32, 0x0f, 0x01, 0xd9, 0xf4,
    ];
    const GP_HANDLER: [u8; 20] = [
        0x48, 0x83, 0x44, 0x24, 0x08, 0x02, 0x48, 0x83, 0xc4, 0x08, 0x48, 0xff, 0x04, 0x25, 0x00,
        0xf0, 0x09, 0x00, 0x48, 0xcf,
    ];

    /// Install a one-gate IDT at 0x9000 (gate `vector` -> `handler`, a
    /// 64-bit interrupt gate on selector 0x08) and its IDTR image at 0xa000
    /// for the guest's `lidt [0xa000]`.
    fn install_gate(p: &mut dyn Partition, vector: u64, handler: u64) -> Result<(), &'static str> {
        let e = |_| "guest memory write";
        let m = p.memory();
        let lo =
            (handler & 0xffff) | (0x08 << 16) | (0x8e00 << 32) | ((handler >> 16) & 0xffff) << 48;
        m.write_u64(Gpa(0x9000 + vector * 16), lo).map_err(e)?;
        m.write_u64(Gpa(0x9000 + vector * 16 + 8), handler >> 32)
            .map_err(e)?;
        m.write(Gpa(0xa000), &0x0fffu16.to_le_bytes()).map_err(e)?;
        m.write_u64(Gpa(0xa002), 0x9000).map_err(e)
    }

    /// `lidt [0xa000]` / vmrun / vmload / vmsave / stgi / clgi / invlpga /
    /// vmmcall / hlt.
    const SVM_INSN_GUEST: [u8; 30] = [
        0x0f, 0x01, 0x1c, 0x25, 0x00, 0xa0, 0x00, 0x00, 0x0f, 0x01, 0xd8, 0x0f, 0x01, 0xda, 0x0f,
        0x01, 0xdb, 0x0f, 0x01, 0xdc, 0x0f, 0x01, 0xdd, 0x0f, 0x01, 0xdf, 0x0f, 0x01, 0xd9, 0xf4,
    ];
    /// #UD handler: `add qword [rsp], 3` / `inc qword [0x9f000]` / `iretq`.
    const UD_HANDLER: [u8; 15] = [
        0x48, 0x83, 0x04, 0x24, 0x03, 0x48, 0xff, 0x04, 0x25, 0x00, 0xf0, 0x09, 0x00, 0x48, 0xcf,
    ];

    /// The guest's EFER.SVME is set in the VMCB (VMRUN needs it), so every
    /// SVM instruction must be intercepted and answered with #UD, as on a
    /// CPU without SVM: six of them, six #UDs, no other exit.
    fn svm_instructions_raise_ud() -> Result<(), &'static str> {
        let mut p = create_partition(RAM_BYTES).map_err(|_| "create_partition failed")?;
        let p = p.as_mut();
        prepare(p, &SVM_INSN_GUEST)?;
        p.memory()
            .write(Gpa(CODE_GPA + 0x100), &UD_HANDLER)
            .map_err(|_| "guest memory write")?;
        install_gate(p, 6, CODE_GPA + 0x100)?;
        expect(p, "svm insns", |e| matches!(e, VmExit::Hypercall))?;
        let count = p.memory().read_u64(Gpa(0x9f000)).map_err(|_| "read")?;
        log::info!(
            "selftest: svm insns: {count} #UD delivered, stats {:?}",
            p.stats()
        );
        if count != 6 {
            return Err("SVM instructions did not each raise one #UD");
        }
        Ok(())
    }

    /// An injected #GP whose delivery hits a write-protected stack page:
    /// the nested fault is resolved by the dirty log and the event must be
    /// delivered again from EXITINTINFO (the guest's handler runs once and
    /// the RDMSR does not exit a second time).
    fn event_reinjection() -> Result<(), &'static str> {
        let mut p: Box<dyn Partition> =
            create_partition(RAM_BYTES).map_err(|_| "create_partition failed")?;
        let p = p.as_mut();
        prepare(p, &GP_GUEST)?;
        let handler = CODE_GPA + 0x100;
        p.memory()
            .write(Gpa(handler), &GP_HANDLER)
            .map_err(|_| "guest memory write")?;
        install_gate(p, 13, handler)?;
        expect(p, "reinject: hc enable", |e| matches!(e, VmExit::Hypercall))?;
        p.enable_dirty_log(DirtyMode::WriteProtect)
            .map_err(|_| "enable_dirty_log")?;
        p.vcpu().skip_instruction();
        expect(p, "reinject: rdmsr", |e| {
            matches!(e, VmExit::MsrRead { msr: 0xc0de_0001 })
        })?;
        let faults = p.stats().dirty_faults;
        p.vcpu().inject_exception(13, Some(0));
        expect(p, "reinject: hc check", |e| matches!(e, VmExit::Hypercall))?;
        let count = p.memory().read_u64(Gpa(0x9f000)).map_err(|_| "read")?;
        let got = dirty_frames(p)?;
        log::info!(
            "selftest: reinject: handler ran {count} times, {} dirty faults during delivery, dirty {got:x?}",
            p.stats().dirty_faults - faults
        );
        if count != 1 || got != [0x7f, 0x9f] {
            return Err("#GP not delivered exactly once through the write-protected stack");
        }
        p.vcpu().skip_instruction();
        expect(p, "reinject: hlt", |e| matches!(e, VmExit::Hlt))?;
        Ok(())
    }

    /// `mov al, [0x300]` / `out 0xe9, al` / `hlt`.
    const ECHO_GUEST: [u8; 10] = [0x8a, 0x04, 0x25, 0x00, 0x03, 0x00, 0x00, 0xe6, 0xe9, 0xf4];
    /// More VMs than TCG has ASIDs (16), alive at once, interleaved: each
    /// must read its own RAM (the ones past the ASID supply share one ASID
    /// and flush on every entry).
    fn many_partitions() -> Result<(), &'static str> {
        const N: usize = 20;
        let mut parts = alloc::vec::Vec::new();
        for i in 0..N {
            let mut p = create_partition(RAM_BYTES).map_err(|_| "create_partition failed")?;
            prepare(p.as_mut(), &ECHO_GUEST)?;
            p.memory()
                .write(Gpa(0x300), &[i as u8 + 1])
                .map_err(|_| "guest memory write")?;
            parts.push(p);
        }
        for round in 0..2 {
            for (i, p) in parts.iter_mut().enumerate() {
                p.vcpu().regs_mut().rip = CODE_GPA;
                let e = loop {
                    match p.run() {
                        VmExit::ExternalInterrupt => continue,
                        e => break e,
                    }
                };
                let al = p.vcpu().regs().rax & 0xff;
                if !matches!(e, VmExit::Io(_)) || al != i as u64 + 1 {
                    log::info!("selftest: many: round {round} vm {i}: {e:?} al={al:#x}");
                    return Err("a VM read another VM's memory or exited oddly");
                }
            }
        }
        Ok(())
    }

    /// `1: inc rbx / mov [0x300000], rbx / vmmcall / jmp 1b`.
    const COUNTER_GUEST: [u8; 16] = [
        0x48, 0xff, 0xc3, 0x48, 0x89, 0x1c, 0x25, 0x00, 0x00, 0x30, 0x00, 0x0f, 0x01, 0xd9, 0xeb,
        0xf0,
    ];

    /// Run to the next hypercall and step over it; returns RBX.
    fn next_count(p: &mut dyn Partition) -> Result<u64, &'static str> {
        loop {
            match p.run() {
                VmExit::ExternalInterrupt => continue,
                VmExit::Hypercall => break,
                e => {
                    log::info!("selftest: migrate: {e:?}");
                    return Err("unexpected exit in the counter guest");
                }
            }
        }
        p.vcpu().skip_instruction();
        Ok(p.vcpu().regs().rbx)
    }

    /// A backend-level live migration: run a counter guest, save its vCPU
    /// and copy its RAM into a second partition, restore there, and check
    /// that the guest carries on where it stopped (registers, memory, MSRs,
    /// TSC); a record with a bad field is refused without changing the vCPU.
    fn state_round_trip() -> Result<(), &'static str> {
        let mut a = create_partition(RAM_BYTES).map_err(|_| "create_partition failed")?;
        prepare(a.as_mut(), &COUNTER_GUEST)?;
        for _ in 0..5 {
            next_count(a.as_mut())?;
        }
        a.vcpu()
            .write_msr(0xc000_0100, 0x1234_5000)
            .map_err(|_| "FS_BASE write")?;
        let saved = a.vcpu().save_state();
        let mut b = create_partition(RAM_BYTES).map_err(|_| "create_partition failed")?;
        let mut page = [0u8; 4096];
        for gpa in (0..RAM_BYTES).step_by(4096) {
            a.memory().read(Gpa(gpa), &mut page).map_err(|_| "read")?;
            b.memory().write(Gpa(gpa), &page).map_err(|_| "write")?;
        }
        let mut bad = saved.clone();
        bad.cr4 |= 1 << 18; // OSXSAVE: not offered
        if b.vcpu().restore_state(&bad).is_ok() {
            return Err("a CR4.OSXSAVE record was accepted");
        }
        b.vcpu()
            .restore_state(&saved)
            .map_err(|_| "restore_state refused a saved record")?;
        let again = b.vcpu().save_state();
        let tsc_moved = again.tsc.wrapping_sub(saved.tsc);
        let mut same = again.clone();
        same.tsc = saved.tsc;
        // MXCSR_MASK (FXSAVE bytes 28-31) is informational; restore clears it.
        let mut expected = saved.clone();
        for s in [&mut same, &mut expected] {
            if let Some(mask) = s.fpu.xsave.get_mut(28..32) {
                mask.fill(0);
            }
        }
        if same != expected || tsc_moved > 1 << 36 {
            log::info!("selftest: migrate: saved {expected:x?}");
            log::info!("selftest: migrate: again {same:x?}");
            return Err("saved state differs after restore");
        }
        let rbx_a = next_count(a.as_mut())?;
        let rbx_b = next_count(b.as_mut())?;
        let mem_b = b.memory().read_u64(Gpa(0x30_0000)).map_err(|_| "read")?;
        log::info!("selftest: migrate: source counts {rbx_a}, destination {rbx_b} (RAM {mem_b})");
        if rbx_a != 6 || rbx_b != 6 || mem_b != 6 {
            return Err("the restored guest did not continue where it stopped");
        }
        if b.vcpu().read_msr(0xc000_0100) != Ok(0x1234_5000) {
            return Err("FS_BASE lost");
        }
        Ok(())
    }

    fn triple_fault() -> Result<(), &'static str> {
        let mut p: Box<dyn Partition> =
            create_partition(RAM_BYTES).map_err(|_| "create_partition failed")?;
        let p = p.as_mut();
        prepare(p, &UD2)?;
        loop {
            match p.run() {
                VmExit::ExternalInterrupt => continue,
                VmExit::Shutdown => return Ok(()),
                e => {
                    log::info!("selftest: triple fault: {e:?}");
                    return Err("no shutdown exit");
                }
            }
        }
    }

    /// One named check.
    type Check = fn() -> Result<(), &'static str>;

    /// Run all checks; `preempt` adds the timer check.
    pub fn run(preempt: bool) -> bool {
        let (_, free_before) = crate::mem::memory_stats();
        let mut ok = true;
        let checks: [(&str, Check); 6] = [
            (
                "guest",
                if preempt {
                    || main_guest(true)
                } else {
                    || main_guest(false)
                },
            ),
            ("event-reinjection", event_reinjection),
            ("svm-instructions-ud", svm_instructions_raise_ud),
            ("many-partitions", many_partitions),
            ("state-round-trip", state_round_trip),
            ("triple-fault", triple_fault),
        ];
        for (name, check) in checks {
            log::info!("selftest {name}: start");
            match check() {
                Ok(()) => log::info!("selftest {name}: ok"),
                Err(why) => {
                    log::error!("selftest {name}: FAILED: {why}");
                    ok = false;
                }
            }
        }
        match super::bench_raw_roundtrips(10_000) {
            Ok(ns) => log::info!(
                "selftest: raw: 10000 round trips in {} us: {} per s",
                ns / 1000,
                10_000u64 * 1_000_000_000 / ns.max(1)
            ),
            Err(e) => {
                log::error!("selftest raw bench: FAILED: {e}");
                ok = false;
            }
        }
        let (_, free_after) = crate::mem::memory_stats();
        if free_after != free_before {
            log::error!(
                "selftest: FAILED: leaked {} bytes",
                free_before as i64 - free_after as i64
            );
            ok = false;
        }
        log::info!("selftest: {}", if ok { "PASSED" } else { "FAILED" });
        ok
    }
}
