//! The node's entropy sources and pool, behind `Host::entropy`.
//!
//! Sources, each an [`hvcore::entropy::RawSource`]:
//! * QEMU's `virtio-rng-pci` (virtio 1.1, 5.4), driven by `virtio-drivers`'
//!   `VirtIORng` over modern PCI; QEMU fills requests from the host's
//!   `getrandom()`;
//! * RDRAND (CPUID.01H:ECX[30]) and RDSEED (CPUID.(EAX=07H,ECX=0):EBX[18])
//!   where the CPU has them (Intel SDM vol. 1, 7.3.17; AMD APM vol. 3). QEMU
//!   TCG emulates RDRAND (`-cpu qemu64,+rdrand`) but not RDSEED.
//!
//! The pool ([`hvcore::entropy::EntropyPool`]) hashes their output and the
//! TSC together and refuses to hand anything out unless at least one real
//! source seeded it at boot: a node with neither says so at boot
//! ([`NodeEntropy::init`] logs the reason) and the service then refuses to
//! serve what needs nonces.

use crate::pci;
use crate::virtio_hal::VirtioHal;
use alloc::vec::Vec;
use hvcore::entropy::{EntropyError, EntropyPool, RawSource, Sources};
use virtio_drivers::device::rng::VirtIORng;
use virtio_drivers::transport::pci::PciTransport;
use virtio_drivers::transport::DeviceType;

/// RDRAND/RDSEED attempts per 64-bit value before the source gives up for
/// this request: Intel's DRNG guide recommends 10 for RDRAND; RDSEED fails
/// more often under load and gets more, with a pause between.
const RDRAND_RETRIES: u32 = 10;
const RDSEED_RETRIES: u32 = 100;

/// Whether the CPU has RDRAND (CPUID.01H:ECX[30]).
pub fn has_rdrand() -> bool {
    crate::cpu::cpuid(1, 0).ecx & (1 << 30) != 0
}

/// Whether the CPU has RDSEED (CPUID.(EAX=07H,ECX=0):EBX[18]).
pub fn has_rdseed() -> bool {
    crate::cpu::cpuid(0, 0).eax >= 7 && crate::cpu::cpuid(7, 0).ebx & (1 << 18) != 0
}

/// One RDRAND value, `None` when the DRNG has none now (CF = 0 each time).
///
/// # Safety
/// The CPU must support RDRAND ([`has_rdrand`]).
#[target_feature(enable = "rdrand")]
unsafe fn rdrand64() -> Option<u64> {
    for _ in 0..RDRAND_RETRIES {
        let mut v = 0u64;
        // Safe here: this function is compiled with the `rdrand` feature.
        if core::arch::x86_64::_rdrand64_step(&mut v) == 1 {
            return Some(v);
        }
    }
    None
}

/// One RDSEED value, `None` when the entropy source has none now.
///
/// # Safety
/// The CPU must support RDSEED ([`has_rdseed`]).
#[target_feature(enable = "rdseed")]
unsafe fn rdseed64() -> Option<u64> {
    for _ in 0..RDSEED_RETRIES {
        let mut v = 0u64;
        // Safe here: this function is compiled with the `rdseed` feature.
        if core::arch::x86_64::_rdseed64_step(&mut v) == 1 {
            return Some(v);
        }
        core::hint::spin_loop();
    }
    None
}

/// Fill `buf` 8 bytes at a time from `next`; stops at the first failure.
fn fill_words(buf: &mut [u8], mut next: impl FnMut() -> Option<u64>) -> usize {
    let mut n = 0;
    for chunk in buf.chunks_mut(8) {
        let Some(v) = next() else { break };
        chunk.copy_from_slice(&v.to_le_bytes()[..chunk.len()]);
        n += chunk.len();
    }
    n
}

/// RDRAND, on a CPU that has it.
pub struct Rdrand(());

impl Rdrand {
    /// The source, if the CPU has the instruction.
    pub fn probe() -> Option<Self> {
        has_rdrand().then_some(Self(()))
    }
}

impl RawSource for Rdrand {
    fn name(&self) -> &'static str {
        "RDRAND"
    }
    fn fill(&mut self, buf: &mut [u8]) -> usize {
        // SAFETY: `probe` checked CPUID for RDRAND.
        fill_words(buf, || unsafe { rdrand64() })
    }
}

/// RDSEED, on a CPU that has it.
pub struct Rdseed(());

impl Rdseed {
    /// The source, if the CPU has the instruction.
    pub fn probe() -> Option<Self> {
        has_rdseed().then_some(Self(()))
    }
}

impl RawSource for Rdseed {
    fn name(&self) -> &'static str {
        "RDSEED"
    }
    fn fill(&mut self, buf: &mut [u8]) -> usize {
        // SAFETY: `probe` checked CPUID for RDSEED.
        fill_words(buf, || unsafe { rdseed64() })
    }
}

/// The first virtio entropy device.
pub struct VirtioRng(VirtIORng<VirtioHal, PciTransport>);

impl VirtioRng {
    /// The device, if bus 0 has one the driver accepts.
    pub fn probe() -> Option<Self> {
        let mut root = pci::root();
        let df = *pci::find_virtio(&mut root, DeviceType::EntropySource).first()?;
        let transport = PciTransport::new::<VirtioHal, _>(&mut root, df).ok()?;
        match VirtIORng::new(transport) {
            Ok(rng) => Some(Self(rng)),
            Err(e) => {
                log::warn!(
                    "entropy: the virtio entropy device at pci 00:{:02x}.{} failed to start: {e:?}",
                    df.device,
                    df.function
                );
                None
            }
        }
    }
}

impl RawSource for VirtioRng {
    fn name(&self) -> &'static str {
        "virtio-rng"
    }
    fn fill(&mut self, buf: &mut [u8]) -> usize {
        // The device reports how much it wrote; never trust more than the
        // buffer.
        self.0.request_entropy(buf).map_or(0, |n| n.min(buf.len()))
    }
}

/// The node's sources and pool.
pub struct NodeEntropy {
    pool: EntropyPool,
    virtio: Option<VirtioRng>,
    rdrand: Option<Rdrand>,
    rdseed: Option<Rdseed>,
    /// What seeded the pool at boot, or why nothing did.
    status: Result<Sources, EntropyError>,
}

impl NodeEntropy {
    /// Find the sources, seed the pool from them and say at boot what it
    /// has (or that it has nothing).
    pub fn init() -> Self {
        let mut e = Self {
            pool: EntropyPool::new(),
            virtio: VirtioRng::probe(),
            rdrand: Rdrand::probe(),
            rdseed: Rdseed::probe(),
            status: Err(EntropyError::NoSource),
        };
        let sources = e.reseed();
        e.status = if e.pool.is_seeded() {
            log::info!("entropy: seeded from {sources}");
            Ok(sources)
        } else {
            log::error!(
                "entropy: {}; the node will not serve anything that needs nonces",
                EntropyError::NoSource
            );
            Err(EntropyError::NoSource)
        };
        e
    }

    fn reseed(&mut self) -> Sources {
        let mut present: Vec<&mut dyn RawSource> = Vec::with_capacity(3);
        if let Some(s) = self.virtio.as_mut() {
            present.push(s);
        }
        if let Some(s) = self.rdseed.as_mut() {
            present.push(s);
        }
        if let Some(s) = self.rdrand.as_mut() {
            present.push(s);
        }
        self.pool.reseed(&mut present, crate::cpu::rdtsc())
    }

    /// What seeded the pool, or why nothing did.
    pub fn sources(&self) -> Result<Sources, EntropyError> {
        self.status.clone()
    }

    /// Fill `buf`: fresh source bytes and the TSC mixed in, then pool
    /// output. `Err` only on a node whose pool was never seeded.
    pub fn fill(&mut self, buf: &mut [u8]) -> Result<(), EntropyError> {
        if self.status.is_err() {
            return Err(EntropyError::NoSource);
        }
        self.reseed();
        self.pool.fill(buf)
    }
}
