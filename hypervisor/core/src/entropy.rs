//! The node's entropy pool: what `Host::entropy` hands out, built from the
//! platform's hardware sources (a virtio entropy device, RDRAND, RDSEED)
//! through SHA-256.
//!
//! A [`RawSource`] delivers bytes an attacker cannot predict, or nothing. The
//! pool is a hash chain: every input (source output, a timestamp) is hashed
//! into a 256-bit state, and every output block is the hash of the state and
//! a counter, after which the state is replaced by another hash of it (so
//! bytes handed out never reveal the state, and a state learnt later never
//! reveals earlier output). Domain strings keep the three uses of SHA-256
//! apart.
//!
//! Invariants:
//! * the pool hands out nothing until it has been *seeded*: at least
//!   [`SEED_BYTES`] bytes from real sources in one [`EntropyPool::reseed`];
//!   timestamps are mixed in as well but never count (TSC jitter alone is
//!   guessable), so a node with no source refuses instead of producing
//!   guessable nonces;
//! * once seeded it keeps working if every source later fails (it is then a
//!   SHA-256 DRBG from a 256-bit secret state), and each request mixes in
//!   whatever fresh source bytes are available first;
//! * the output counter never repeats, so no two requests return the same
//!   bytes even if the sources repeat themselves.

use core::fmt;
use sha2::{Digest, Sha256};

/// Source bytes one seeding needs (the state's size).
pub const SEED_BYTES: usize = 32;
/// Bytes asked of each source per request.
const REQUEST_BYTES: usize = 32;

/// A hardware source of unpredictable bytes.
pub trait RawSource {
    /// What it is, for messages (`virtio-rng`, `RDRAND`, ...).
    fn name(&self) -> &'static str;
    /// Fill a prefix of `buf`; returns how many bytes it filled (0 when the
    /// source has nothing now, e.g. RDRAND's retries ran out).
    fn fill(&mut self, buf: &mut [u8]) -> usize;
}

/// Why the pool gives nothing.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EntropyError {
    /// No source delivered [`SEED_BYTES`] bytes: the node has neither a
    /// virtio entropy device nor RDRAND/RDSEED (or they all failed).
    NoSource,
}

impl fmt::Display for EntropyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            EntropyError::NoSource => write!(
                f,
                "no entropy source: neither a virtio entropy device nor RDRAND/RDSEED delivered bytes \
                 (QEMU: -device virtio-rng-pci, or a CPU model with RDRAND: -cpu qemu64,+rdrand); \
                 timestamps alone are guessable"
            ),
        }
    }
}

/// Which sources a pool was seeded from (for the boot message and
/// `node info`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Sources {
    names: alloc::vec::Vec<&'static str>,
}

impl Sources {
    /// Sources named `names` (test doubles).
    pub fn new(names: &[&'static str]) -> Self {
        Self {
            names: names.to_vec(),
        }
    }
    /// The sources' names, in the order they were asked.
    pub fn names(&self) -> &[&'static str] {
        &self.names
    }
}

impl fmt::Display for Sources {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, n) in self.names.iter().enumerate() {
            if i > 0 {
                f.write_str(", ")?;
            }
            f.write_str(n)?;
        }
        Ok(())
    }
}

/// The pool.
#[derive(Clone, Debug)]
pub struct EntropyPool {
    state: [u8; 32],
    counter: u64,
    seeded: bool,
}

impl Default for EntropyPool {
    fn default() -> Self {
        Self::new()
    }
}

impl EntropyPool {
    /// An unseeded pool.
    pub fn new() -> Self {
        Self {
            state: [0; 32],
            counter: 0,
            seeded: false,
        }
    }

    /// Whether the pool has been seeded from real sources.
    pub fn is_seeded(&self) -> bool {
        self.seeded
    }

    /// Hash `input` into the state.
    fn absorb(&mut self, label: &[u8], input: &[u8]) {
        let mut h = Sha256::new();
        h.update(b"hvmigrate entropy absorb v1");
        h.update(self.state);
        h.update((label.len() as u64).to_be_bytes());
        h.update(label);
        h.update((input.len() as u64).to_be_bytes());
        h.update(input);
        self.state = h.finalize().into();
    }

    /// Ask every source for fresh bytes and hash them, with `timestamp`,
    /// into the state. Seeds the pool once the sources together delivered
    /// [`SEED_BYTES`]; returns the sources that delivered anything.
    pub fn reseed(&mut self, sources: &mut [&mut dyn RawSource], timestamp: u64) -> Sources {
        let mut delivered = Sources::default();
        let mut total = 0;
        for s in sources.iter_mut() {
            let mut buf = [0u8; REQUEST_BYTES];
            let n = s.fill(&mut buf).min(buf.len());
            if n > 0 {
                self.absorb(s.name().as_bytes(), &buf[..n]);
                delivered.names.push(s.name());
                total += n;
            }
        }
        // Never counted: it only varies what the sources already made
        // unpredictable.
        self.absorb(b"timestamp", &timestamp.to_be_bytes());
        if total >= SEED_BYTES {
            self.seeded = true;
        }
        delivered
    }

    /// Fill `out` with output bytes, or refuse while unseeded.
    pub fn fill(&mut self, out: &mut [u8]) -> Result<(), EntropyError> {
        if !self.seeded {
            return Err(EntropyError::NoSource);
        }
        for chunk in out.chunks_mut(32) {
            self.counter = self.counter.wrapping_add(1);
            let mut h = Sha256::new();
            h.update(b"hvmigrate entropy output v1");
            h.update(self.state);
            h.update(self.counter.to_be_bytes());
            let block: [u8; 32] = h.finalize().into();
            chunk.copy_from_slice(&block[..chunk.len()]);
            // Ratchet: the next state does not reveal this block.
            let mut h = Sha256::new();
            h.update(b"hvmigrate entropy ratchet v1");
            h.update(self.state);
            h.update(self.counter.to_be_bytes());
            self.state = h.finalize().into();
        }
        Ok(())
    }

    /// One request as `Host::entropy` serves it: fresh source bytes and
    /// `timestamp` mixed in, then `out` filled.
    pub fn request(
        &mut self,
        sources: &mut [&mut dyn RawSource],
        timestamp: u64,
        out: &mut [u8],
    ) -> Result<(), EntropyError> {
        self.reseed(sources, timestamp);
        self.fill(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::vec;
    use alloc::vec::Vec;

    /// A source that replays a fixed byte pattern `n` bytes at a time, and
    /// can be switched off.
    struct Fixed {
        name: &'static str,
        byte: u8,
        per_call: usize,
        calls: u32,
        on: bool,
    }

    impl Fixed {
        fn new(name: &'static str, byte: u8, per_call: usize) -> Self {
            Self {
                name,
                byte,
                per_call,
                calls: 0,
                on: true,
            }
        }
    }

    impl RawSource for Fixed {
        fn name(&self) -> &'static str {
            self.name
        }
        fn fill(&mut self, buf: &mut [u8]) -> usize {
            self.calls += 1;
            if !self.on {
                return 0;
            }
            let n = self.per_call.min(buf.len());
            buf[..n].fill(self.byte);
            n
        }
    }

    #[test]
    fn no_source_no_output() {
        let mut pool = EntropyPool::new();
        let mut out = [0u8; 16];
        assert_eq!(pool.fill(&mut out), Err(EntropyError::NoSource));
        // Timestamps alone never seed it, however many.
        for t in 0..100 {
            let got = pool.reseed(&mut [], t);
            assert!(got.names().is_empty());
        }
        assert!(!pool.is_seeded());
        assert_eq!(
            pool.request(&mut [], 7, &mut out),
            Err(EntropyError::NoSource)
        );
        assert_eq!(out, [0u8; 16], "nothing written on refusal");
        let msg = EntropyError::NoSource.to_string();
        assert!(
            msg.contains("virtio-rng-pci") && msg.contains("+rdrand"),
            "{msg}"
        );
    }

    #[test]
    fn failed_and_short_sources_do_not_seed() {
        let mut off = Fixed::new("virtio-rng", 1, 32);
        off.on = false;
        let mut short = Fixed::new("RDRAND", 2, 8);
        let mut pool = EntropyPool::new();
        let got = pool.reseed(&mut [&mut off, &mut short], 1);
        assert_eq!(got.names(), ["RDRAND"]);
        assert!(!pool.is_seeded(), "8 bytes are not a seed");
        assert_eq!(off.calls, 1, "a failed source is still asked");
        // Either source alone, delivering a full seed, is enough.
        let mut rng = Fixed::new("virtio-rng", 3, 32);
        let got = pool.reseed(&mut [&mut rng, &mut off], 2);
        assert_eq!(got.to_string(), "virtio-rng");
        assert!(pool.is_seeded());
        // Two short sources that together make a seed.
        let mut p2 = EntropyPool::new();
        let mut a = Fixed::new("RDRAND", 4, 16);
        let mut b = Fixed::new("RDSEED", 5, 16);
        let got = p2.reseed(&mut [&mut a, &mut b], 3);
        assert_eq!(got.to_string(), "RDRAND, RDSEED");
        assert!(p2.is_seeded());
    }

    #[test]
    fn output_depends_on_every_input_and_never_repeats() {
        let seeded = |byte: u8, t: u64| {
            let mut p = EntropyPool::new();
            p.reseed(&mut [&mut Fixed::new("virtio-rng", byte, 32)], t);
            p
        };
        let out = |p: &mut EntropyPool| {
            let mut b = [0u8; 32];
            p.fill(&mut b).unwrap();
            b
        };
        // Same inputs, same bytes (a hash chain, nothing hidden).
        assert_eq!(out(&mut seeded(1, 5)), out(&mut seeded(1, 5)));
        // Source bytes and timestamp both change everything.
        assert_ne!(out(&mut seeded(1, 5)), out(&mut seeded(2, 5)));
        assert_ne!(out(&mut seeded(1, 5)), out(&mut seeded(1, 6)));
        // A source's name separates its bytes from another's.
        let mut p = EntropyPool::new();
        p.reseed(&mut [&mut Fixed::new("RDRAND", 1, 32)], 5);
        assert_ne!(out(&mut p), out(&mut seeded(1, 5)));
        // A source that repeats itself, requests that repeat their
        // timestamp: still no two outputs alike.
        let mut p = seeded(9, 1);
        let mut stuck = Fixed::new("virtio-rng", 9, 32);
        let mut seen: Vec<[u8; 32]> = Vec::new();
        for _ in 0..200 {
            let mut b = [0u8; 32];
            p.request(&mut [&mut stuck], 1, &mut b).unwrap();
            assert!(!seen.contains(&b));
            seen.push(b);
        }
    }

    #[test]
    fn keeps_serving_after_its_sources_fail() {
        let mut rng = Fixed::new("virtio-rng", 7, 32);
        let mut pool = EntropyPool::new();
        pool.reseed(&mut [&mut rng], 1);
        rng.on = false;
        let mut a = [0u8; 64];
        let mut b = [0u8; 64];
        pool.request(&mut [&mut rng], 2, &mut a).unwrap();
        pool.request(&mut [&mut rng], 2, &mut b).unwrap();
        assert_ne!(a, b);
        assert_ne!(a[..32], a[32..], "blocks within one request differ");
    }

    #[test]
    fn odd_lengths_are_filled_exactly() {
        let mut pool = EntropyPool::new();
        pool.reseed(&mut [&mut Fixed::new("RDSEED", 1, 32)], 0);
        for len in [0usize, 1, 31, 32, 33, 100] {
            let mut buf = vec![0u8; len + 1];
            pool.fill(&mut buf[..len]).unwrap();
            assert_eq!(buf[len], 0, "no byte past the request");
            if len >= 16 {
                assert!(buf[..len].iter().any(|b| *b != 0));
            }
        }
    }
}
