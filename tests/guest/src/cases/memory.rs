//! `memory`: write a position-dependent pattern over all free RAM (from the
//! end of the kernel image, which holds the stack, to the end of RAM; the
//! low 1 MiB is below the image and so excluded), then verify every word.

use crate::layout::{align_down, pattern};
use crate::{fail, println, report, Env};

pub fn run(env: &Env) -> ! {
    let start = env.free_start;
    let end = align_down(env.params.ram_bytes, 8);
    let words = (end - start) / 8;
    let base = start as *mut u64;
    for i in 0..words {
        let gpa = start + i * 8;
        // SAFETY: [start, end) is free guest RAM (above the kernel image and
        // its stack, below ram_bytes, identity-mapped) that no Rust object
        // owns; volatile keeps every store.
        unsafe { base.add(i as usize).write_volatile(pattern(gpa)) };
    }
    for i in 0..words {
        let gpa = start + i * 8;
        // SAFETY: as above; reading back what was just written.
        let got = unsafe { base.add(i as usize).read_volatile() };
        if got != pattern(gpa) {
            fail!(
                "mismatch at GPA {:#x}: read {:#018x}, wrote {:#018x}",
                gpa,
                got,
                pattern(gpa)
            );
        }
    }
    println!(
        "memory: wrote and verified {} KiB at GPA {:#x}..{:#x}",
        (end - start) / 1024,
        start,
        end
    );
    report::ok("pattern verified over all free RAM")
}
