//! Typed addresses. A guest-physical address is never a host-physical one:
//! the newtypes keep the two spaces apart at compile time.

use core::fmt;

/// Size of a base page in bytes.
pub const PAGE_SIZE: u64 = 4096;
/// Size of a large (2 MiB) page in bytes.
pub const LARGE_PAGE_SIZE: u64 = 2 * 1024 * 1024;

macro_rules! addr_type {
    ($(#[$m:meta])* $name:ident) => {
        $(#[$m])*
        #[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
        #[repr(transparent)]
        pub struct $name(pub u64);

        impl $name {
            /// The raw address.
            pub const fn as_u64(self) -> u64 {
                self.0
            }
            /// Whether the address is aligned to `align` (a power of two).
            pub const fn is_aligned(self, align: u64) -> bool {
                self.0 & (align - 1) == 0
            }
            /// Round down to a multiple of `align` (a power of two).
            pub const fn align_down(self, align: u64) -> Self {
                Self(self.0 & !(align - 1))
            }
            /// Offset within the 4 KiB page.
            pub const fn page_offset(self) -> u64 {
                self.0 & (PAGE_SIZE - 1)
            }
            /// `self + bytes`, or `None` on overflow.
            pub const fn checked_add(self, bytes: u64) -> Option<Self> {
                match self.0.checked_add(bytes) {
                    Some(v) => Some(Self(v)),
                    None => None,
                }
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, concat!(stringify!($name), "({:#x})"), self.0)
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{:#x}", self.0)
            }
        }
    };
}

addr_type!(
    /// Guest-physical address.
    Gpa
);
addr_type!(
    /// Host-physical address.
    Hpa
);

/// Guest frame number: a guest-physical address divided by 4 KiB.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default, Debug)]
#[repr(transparent)]
pub struct Gfn(pub u64);

impl Gfn {
    /// The frame containing `gpa`.
    pub const fn containing(gpa: Gpa) -> Self {
        Self(gpa.0 / PAGE_SIZE)
    }
    /// First byte of the frame.
    pub const fn gpa(self) -> Gpa {
        Gpa(self.0 * PAGE_SIZE)
    }
}

/// Host frame number.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default, Debug)]
#[repr(transparent)]
pub struct Hfn(pub u64);

impl Hfn {
    /// The frame containing `hpa`.
    pub const fn containing(hpa: Hpa) -> Self {
        Self(hpa.0 / PAGE_SIZE)
    }
    /// First byte of the frame.
    pub const fn hpa(self) -> Hpa {
        Hpa(self.0 * PAGE_SIZE)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frame_round_trip() {
        let gpa = Gpa(0x1234_5678);
        assert_eq!(Gfn::containing(gpa).gpa(), Gpa(0x1234_5000));
        assert_eq!(gpa.page_offset(), 0x678);
        assert!(Gpa(0x20_0000).is_aligned(LARGE_PAGE_SIZE));
        assert_eq!(Gpa(u64::MAX).checked_add(1), None);
    }
}
