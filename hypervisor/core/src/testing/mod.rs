//! Test doubles for the memory and vCPU traits, shared with other crates'
//! host tests through the `testing` feature.
//!
//! * [`test_memory`] returns a [`TestMem`] ([`PhysMem`]) and a [`TestAlloc`]
//!   ([`FrameAlloc`]) over one shared `BTreeMap` of 4 KiB frames. The
//!   allocator hands out zeroed frames (reusing freed ones), counts every
//!   allocation and free, and can be capped to provoke `OutOfFrames`. The
//!   memory records every write in order and panics on any access to a frame
//!   that is neither allocated nor declared with [`TestMem::add_region`], so
//!   a use after free or a stray pointer fails the test at once.
//! * [`FakeVcpu`] runs nothing: `run` returns queued exits, and skips,
//!   injected exceptions, TLB flushes and MSR accesses are recorded.
//! * [`FakeCpuid`] answers CPUID from a table.
//!
//! Panics here are test assertions, not error handling.

mod memory;
mod vcpu;

pub use memory::{test_memory, TestAlloc, TestMem};
pub use vcpu::{FakeCpuid, FakeVcpu};
