//! The final memory digest carried by the end record.
//!
//! Definition (protocol version 1). Let `P = 0x100000001b3` and
//! `O = 0xcbf29ce484222325` (the 64-bit FNV prime and offset basis), all
//! arithmetic wrapping modulo 2^64.
//! - Page hash of guest frame `gfn` with contents `b[0..4096]`:
//!   `h = (O ^ gfn) * P`, then for each of the 512 little-endian 64-bit words
//!   `w` of the page in order: `h = (h ^ w) * P`.
//!   (An FNV-1a-style fold over words instead of bytes, 8x fewer steps.)
//! - Image digest of a VM with `n` RAM pages: `d = O`, then for `gfn` in
//!   `0..n` ascending: `d = (d ^ page_hash(gfn)) * P`.
//! - A zero page hashes like 4096 zero bytes; its hash needs no page read:
//!   `((O ^ gfn) * P) * P^512` ([`zero_page_hash`]).
//!
//! The source keeps one page hash per guest frame, updated whenever it sends
//! the frame, so its digest covers exactly the bytes it sent (latest copy of
//! each frame). The destination recomputes it from the memory it ends up
//! with. Equal digests mean the destination image is the image sent.
//! It is an integrity check against lost or misapplied records, not a
//! cryptographic MAC (authentication belongs to the transport).

use crate::{Page, PAGE_SIZE};

const FNV_PRIME: u64 = 0x0000_0100_0000_01b3;
const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;

const fn pow_prime(n: u32) -> u64 {
    let mut acc = 1u64;
    let mut i = 0;
    while i < n {
        acc = acc.wrapping_mul(FNV_PRIME);
        i += 1;
    }
    acc
}

/// `P^512`: one multiply per zero word of a page.
const PRIME_POW_PAGE_WORDS: u64 = pow_prime((PAGE_SIZE / 8) as u32);

/// Hash of one guest frame's contents.
pub fn page_hash(gfn: u64, page: &Page) -> u64 {
    let mut h = (FNV_OFFSET ^ gfn).wrapping_mul(FNV_PRIME);
    for w in page.chunks_exact(8) {
        let mut word = [0u8; 8];
        word.copy_from_slice(w);
        h = (h ^ u64::from_le_bytes(word)).wrapping_mul(FNV_PRIME);
    }
    h
}

/// Hash of an all-zero guest frame, without reading it.
pub fn zero_page_hash(gfn: u64) -> u64 {
    (FNV_OFFSET ^ gfn)
        .wrapping_mul(FNV_PRIME)
        .wrapping_mul(PRIME_POW_PAGE_WORDS)
}

/// Whether a page is all zero (sent as a marker only).
pub fn is_zero_page(page: &Page) -> bool {
    page.chunks_exact(8).all(|w| w == [0u8; 8])
}

/// Folds page hashes, in ascending gfn order, into the image digest.
#[derive(Clone, Copy, Debug)]
pub struct ImageDigest {
    state: u64,
}

impl Default for ImageDigest {
    fn default() -> Self {
        Self::new()
    }
}

impl ImageDigest {
    /// An empty fold.
    pub const fn new() -> Self {
        Self { state: FNV_OFFSET }
    }
    /// Add the next frame's hash (frames must be added in gfn order, all of
    /// them, starting at 0).
    pub fn push(&mut self, page_hash: u64) {
        self.state = (self.state ^ page_hash).wrapping_mul(FNV_PRIME);
    }
    /// The digest.
    pub const fn finish(&self) -> u64 {
        self.state
    }
    /// Digest of a whole image given one hash per frame in gfn order.
    pub fn of_hashes(hashes: &[u64]) -> u64 {
        let mut d = Self::new();
        for h in hashes {
            d.push(*h);
        }
        d.finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zero_page_hash_matches_hashing_zero_bytes() {
        let zero = [0u8; PAGE_SIZE];
        for gfn in [0, 1, 7, 0x1234_5678, u64::MAX] {
            assert_eq!(zero_page_hash(gfn), page_hash(gfn, &zero));
        }
    }

    #[test]
    fn hash_depends_on_gfn_contents_and_order() {
        let mut a = [0u8; PAGE_SIZE];
        a[100] = 1;
        let mut b = [0u8; PAGE_SIZE];
        b[101] = 1;
        assert_ne!(page_hash(0, &a), page_hash(0, &b));
        assert_ne!(page_hash(0, &a), page_hash(1, &a));
        let h = [page_hash(0, &a), page_hash(1, &b)];
        let swapped = [page_hash(0, &b), page_hash(1, &a)];
        assert_ne!(ImageDigest::of_hashes(&h), ImageDigest::of_hashes(&swapped));
        assert!(is_zero_page(&[0u8; PAGE_SIZE]));
        assert!(!is_zero_page(&a));
    }

    #[test]
    fn page_hash_is_word_fnv_1a() {
        // Independent restatement of the documented definition.
        let mut page = [0u8; PAGE_SIZE];
        for (i, b) in page.iter_mut().enumerate() {
            *b = (i * 7 + 3) as u8;
        }
        let mut h = (0xcbf2_9ce4_8422_2325u64 ^ 5).wrapping_mul(0x100_0000_01b3);
        for i in 0..512 {
            let w = u64::from_le_bytes(page[i * 8..i * 8 + 8].try_into().unwrap());
            h = (h ^ w).wrapping_mul(0x100_0000_01b3);
        }
        assert_eq!(page_hash(5, &page), h);
    }
}
