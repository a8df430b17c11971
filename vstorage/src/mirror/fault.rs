//! Test doubles that fail chosen operations ([`FaultyDisk`] on a
//! [`VirtualDisk`], [`FaultyIo`] on a [`BlockIo`]), for testing that
//! a migration survives a failing source or destination at any point.
//!
//! Operations are counted from 1 per kind (reads, writes, flushes). A write
//! that fails may have written nothing or everything ([`FaultPlan::torn`]):
//! an unacknowledged write may or may not be present afterwards, and tests
//! must accept both.
//!
//! With [`FaultPlan::volatile`] the double also models a write cache:
//! writes stay volatile (visible to reads, lost by [`FaultyDisk::crash`])
//! until a flush succeeds, so a test can check that whatever was
//! acknowledged had been made durable.

use alloc::string::String;
use alloc::vec::Vec;

use crate::io::{BlockIo, DiskError, IoError, VirtualDisk};

/// Which operations fail.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FaultPlan {
    /// Fail the Nth read (1-based).
    pub fail_read: Option<u64>,
    /// Fail the Nth write (1-based).
    pub fail_write: Option<u64>,
    /// Fail the Nth flush (1-based).
    pub fail_flush: Option<u64>,
    /// After the first injected fault, fail every later operation too (a
    /// disk that went away) instead of just that one.
    pub sticky: bool,
    /// A failing write still lands on the inner disk (a write that reached
    /// the medium but whose completion was lost).
    pub torn: bool,
    /// Report these allocated ranges instead of the inner disk's.
    pub allocated: Option<Vec<(u64, u64)>>,
    /// Keep writes in a volatile cache until the next successful flush.
    pub volatile: bool,
}

/// Operation counts of a [`FaultyDisk`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct OpCounts {
    /// Reads attempted.
    pub reads: u64,
    /// Writes attempted.
    pub writes: u64,
    /// Flushes attempted.
    pub flushes: u64,
    /// Faults injected.
    pub faults: u64,
}

/// Wraps a disk and injects the faults of a [`FaultPlan`].
#[derive(Debug)]
pub struct FaultyDisk<D> {
    inner: D,
    plan: FaultPlan,
    counts: OpCounts,
    /// Unflushed writes `(offset, data)`, oldest first (volatile mode).
    cache: Vec<(u64, Vec<u8>)>,
}

fn injected(op: &'static str, n: u64) -> DiskError {
    DiskError::Io(IoError::Host {
        op,
        detail: String::from("injected fault") + &alloc::format!(" (operation {n})"),
    })
}

impl<D: VirtualDisk> FaultyDisk<D> {
    /// Wraps `inner`.
    pub fn new(inner: D, plan: FaultPlan) -> Self {
        FaultyDisk {
            inner,
            plan,
            counts: OpCounts::default(),
            cache: Vec::new(),
        }
    }

    /// Loses every unflushed write, as a power cut would (volatile mode).
    pub fn crash(&mut self) {
        self.cache.clear();
    }

    /// Number of writes not yet made durable (volatile mode).
    pub fn unflushed(&self) -> usize {
        self.cache.len()
    }

    /// Counts so far.
    pub fn counts(&self) -> OpCounts {
        self.counts
    }

    /// The wrapped disk.
    pub fn inner_mut(&mut self) -> &mut D {
        &mut self.inner
    }

    /// Unwraps the disk.
    pub fn into_inner(self) -> D {
        self.inner
    }

    fn land(&mut self, offset: u64, data: &[u8]) -> Result<(), DiskError> {
        if !self.plan.volatile {
            return self.inner.write(offset, data);
        }
        crate::io::check_request(
            offset,
            data.len(),
            self.inner.logical_sector_size(),
            self.inner.virtual_size(),
        )?;
        self.cache.push((offset, data.to_vec()));
        Ok(())
    }

    /// Whether operation number `n` of a kind whose planned failure is
    /// `at` must fail.
    fn should_fail(&mut self, at: Option<u64>, n: u64) -> bool {
        let fail = (self.plan.sticky && self.counts.faults > 0) || at == Some(n);
        if fail {
            self.counts.faults += 1;
        }
        fail
    }
}

impl<D: VirtualDisk> VirtualDisk for FaultyDisk<D> {
    fn virtual_size(&self) -> u64 {
        self.inner.virtual_size()
    }

    fn logical_sector_size(&self) -> u32 {
        self.inner.logical_sector_size()
    }

    fn read(&mut self, offset: u64, buf: &mut [u8]) -> Result<(), DiskError> {
        self.counts.reads += 1;
        let n = self.counts.reads;
        if self.should_fail(self.plan.fail_read, n) {
            return Err(injected("read", n));
        }
        self.inner.read(offset, buf)?;
        // Newer cached writes shadow the medium, oldest applied first.
        let end = offset.saturating_add(buf.len() as u64);
        for (w_off, data) in &self.cache {
            let w_end = w_off.saturating_add(data.len() as u64);
            let (lo, hi) = (offset.max(*w_off), end.min(w_end));
            if lo < hi {
                let dst = usize::try_from(lo - offset).unwrap_or(0);
                let src = usize::try_from(lo - w_off).unwrap_or(0);
                let n = usize::try_from(hi - lo).unwrap_or(0);
                buf[dst..dst + n].copy_from_slice(&data[src..src + n]);
            }
        }
        Ok(())
    }

    fn write(&mut self, offset: u64, data: &[u8]) -> Result<(), DiskError> {
        self.counts.writes += 1;
        let n = self.counts.writes;
        if self.should_fail(self.plan.fail_write, n) {
            if self.plan.torn {
                // The outcome is reported as an error whatever happens here.
                let _ = self.land(offset, data);
            }
            return Err(injected("write", n));
        }
        self.land(offset, data)
    }

    fn flush(&mut self) -> Result<(), DiskError> {
        self.counts.flushes += 1;
        let n = self.counts.flushes;
        if self.should_fail(self.plan.fail_flush, n) {
            return Err(injected("flush", n));
        }
        for (off, data) in core::mem::take(&mut self.cache) {
            self.inner.write(off, &data)?;
        }
        self.inner.flush()
    }

    fn allocated_ranges(&mut self) -> Result<Vec<(u64, u64)>, DiskError> {
        match &self.plan.allocated {
            Some(r) => Ok(r.clone()),
            None => self.inner.allocated_ranges(),
        }
    }
}

/// A [`BlockIo`] double that fails the Nth `write_at` or `flush` (1-based),
/// for running a format engine (VHDX) over a failing store inside a
/// migration. After the first injected fault, every later write and flush
/// fails too (the store went away); reads keep working.
#[derive(Debug)]
pub struct FaultyIo<B> {
    inner: B,
    fail_write: Option<u64>,
    fail_flush: Option<u64>,
    writes: u64,
    flushes: u64,
    failed: bool,
}

impl<B: BlockIo> FaultyIo<B> {
    /// Wraps `inner`, failing its `fail_write`th write or `fail_flush`th flush.
    pub fn new(inner: B, fail_write: Option<u64>, fail_flush: Option<u64>) -> Self {
        FaultyIo {
            inner,
            fail_write,
            fail_flush,
            writes: 0,
            flushes: 0,
            failed: false,
        }
    }

    /// True once a fault was injected.
    pub fn has_failed(&self) -> bool {
        self.failed
    }

    /// Unwraps the store.
    pub fn into_inner(self) -> B {
        self.inner
    }
}

impl<B: BlockIo> BlockIo for FaultyIo<B> {
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<(), IoError> {
        self.inner.read_at(offset, buf)
    }

    fn write_at(&mut self, offset: u64, data: &[u8]) -> Result<(), IoError> {
        self.writes += 1;
        if self.failed || self.fail_write == Some(self.writes) {
            self.failed = true;
            return Err(IoError::Host {
                op: "write",
                detail: alloc::format!("injected fault (write {})", self.writes),
            });
        }
        self.inner.write_at(offset, data)
    }

    fn flush(&mut self) -> Result<(), IoError> {
        self.flushes += 1;
        if self.failed || self.fail_flush == Some(self.flushes) {
            self.failed = true;
            return Err(IoError::Host {
                op: "flush",
                detail: alloc::format!("injected fault (flush {})", self.flushes),
            });
        }
        self.inner.flush()
    }

    fn len(&self) -> Result<u64, IoError> {
        self.inner.len()
    }

    fn set_len(&mut self, len: u64) -> Result<(), IoError> {
        if self.failed {
            return Err(IoError::Host {
                op: "set_len",
                detail: String::from("injected fault (store gone)"),
            });
        }
        self.inner.set_len(len)
    }
}
