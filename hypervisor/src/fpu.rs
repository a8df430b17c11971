//! The guest's x87/SSE register file, which neither VMRUN nor VM entry
//! switches (AMD APM vol. 2, 15.5.1; Intel SDM vol. 3C, 27.3 and 28.3 name
//! no x87/SSE state): each vCPU keeps a 512-byte FXSAVE image and the
//! world switch loads it before entry and saves it after the exit.
//!
//! The host never uses these registers (soft-float target), so nothing of
//! the host's is lost; both backends set CR4.OSFXSR so the image includes
//! the SSE state.

use hvcore::vcpu_state::{initial_fxsave, FXSAVE_BYTES};

/// A 16-byte aligned FXSAVE image (the alignment FXSAVE/FXRSTOR require).
#[repr(C, align(16))]
pub struct FxArea(pub [u8; FXSAVE_BYTES]);
const _: () = assert!(core::mem::size_of::<FxArea>() == FXSAVE_BYTES);

impl FxArea {
    /// The state after INIT.
    pub fn initial() -> Self {
        Self(initial_fxsave())
    }

    /// Load the image into the x87/SSE registers (FXRSTOR64).
    ///
    /// # Safety
    /// The image must be loadable: MXCSR without reserved bits (FXRSTOR
    /// raises #GP otherwise); `hvcore::vcpu_state::fxsave_image` checks a
    /// restored one, and an image FXSAVE wrote is always loadable.
    pub unsafe fn load(&self) {
        // SAFETY: a 16-byte aligned 512-byte area; the caller guarantees
        // MXCSR is valid; the host keeps no state in these registers.
        unsafe {
            core::arch::asm!("fxrstor64 [{}]", in(reg) self.0.as_ptr(), options(nostack, readonly));
        }
    }

    /// Store the x87/SSE registers into the image (FXSAVE64).
    pub fn store(&mut self) {
        // SAFETY: FXSAVE writes exactly the 512 bytes of this 16-byte
        // aligned area and changes no register.
        unsafe {
            core::arch::asm!("fxsave64 [{}]", in(reg) self.0.as_mut_ptr(), options(nostack));
        }
    }
}
