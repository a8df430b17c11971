//! The small cases: `hello`, `cpuid`, `bad-msr`, `triple-fault`.

use core::arch::asm;

use hvcore::abi::{CPUID_HV_LEAF, HV_SIGNATURE};

use crate::arch;
use crate::{fail, println, report};

/// The exact line the node (and qemu-runner) look for.
pub const HELLO_LINE: &str = "Hello from the hvmigrate guest";

/// `hello`: one line on COM1, nothing else.
pub fn hello() -> ! {
    println!("{}", HELLO_LINE);
    report::ok("hello printed")
}

/// `cpuid`: the hypervisor bit, our vendor leaf, and no virtualization
/// extensions visible to the guest.
pub fn cpuid() -> ! {
    // CPUID Fn0000_0001 ECX[31]: reserved for a hypervisor to set.
    let leaf1 = arch::cpuid(1, 0);
    if leaf1.ecx & (1 << 31) == 0 {
        fail!(
            "CPUID.1:ECX[31] (hypervisor present) is 0 (ECX={:#x})",
            leaf1.ecx
        );
    }
    // CPUID Fn0000_0001 ECX[5]: VMX.
    if leaf1.ecx & (1 << 5) != 0 {
        fail!(
            "CPUID.1:ECX[5] (VMX) is visible to the guest (ECX={:#x})",
            leaf1.ecx
        );
    }
    let hv = arch::cpuid(CPUID_HV_LEAF, 0);
    let mut sig = [0u8; 12];
    sig[0..4].copy_from_slice(&hv.ebx.to_le_bytes());
    sig[4..8].copy_from_slice(&hv.ecx.to_le_bytes());
    sig[8..12].copy_from_slice(&hv.edx.to_le_bytes());
    if hv.eax < CPUID_HV_LEAF {
        fail!(
            "CPUID(0x40000000).EAX = {:#x}, expected >= 0x40000000",
            hv.eax
        );
    }
    if &sig != HV_SIGNATURE {
        fail!(
            "CPUID(0x40000000) signature is {:?} ({:02x?}), expected \"hvmigrateHV!\"",
            core::str::from_utf8(&sig).unwrap_or("<not UTF-8>"),
            sig
        );
    }
    // CPUID Fn8000_0001 ECX[2]: SVM (AMD APM vol. 3, appendix E.4.2).
    let max_ext = arch::cpuid(0x8000_0000, 0).eax;
    if max_ext >= 0x8000_0001 {
        let ext = arch::cpuid(0x8000_0001, 0);
        if ext.ecx & (1 << 2) != 0 {
            fail!(
                "CPUID.80000001:ECX[2] (SVM) is visible to the guest (ECX={:#x})",
                ext.ecx
            );
        }
    }
    println!(
        "cpuid: hypervisor bit set, signature \"hvmigrateHV!\", max leaf {:#x}, SVM and VMX hidden",
        hv.eax
    );
    report::ok("cpuid checks passed")
}

/// MSR the hypervisor does not implement: reading it must raise #GP.
const UNIMPLEMENTED_MSR: u32 = 0xc0de_0001;

/// `bad-msr`: `rdmsr` of an unknown MSR takes one #GP, the handler skips the
/// instruction, and execution continues here.
pub fn bad_msr() -> ! {
    crate::idt::expect_gp(true);
    let (lo, hi): (u32, u32);
    // SAFETY: RDMSR of an unimplemented MSR faults (#GP) before it has any
    // effect; the #GP handler (idt.rs) skips the 2-byte instruction. EDX:EAX
    // are declared outputs: whatever they hold afterwards is ignored.
    unsafe {
        asm!("rdmsr", in("ecx") UNIMPLEMENTED_MSR, out("eax") lo, out("edx") hi, options(nostack))
    };
    let _ = (lo, hi);
    let faults = crate::idt::gp_count();
    crate::idt::expect_gp(false);
    if faults != 1 {
        fail!(
            "rdmsr {:#x}: expected exactly one #GP, got {}",
            UNIMPLEMENTED_MSR,
            faults
        );
    }
    println!(
        "bad-msr: rdmsr {:#x} raised #GP once, handler skipped it, execution continued",
        UNIMPLEMENTED_MSR
    );
    report::ok("one #GP, execution continued")
}

/// `triple-fault`: the node expects this VM to stop with a triple fault.
pub fn triple_fault() -> ! {
    println!("triple-fault: loading an empty IDT and executing ud2");
    crate::idt::triple_fault();
    fail!("still running after ud2 with an empty IDT (no triple fault)")
}
