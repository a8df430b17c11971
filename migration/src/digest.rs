//! The final memory digest carried by the end record.
//!
//! Definition (protocol version 1). Let `P = 0x100000001b3` and
//! `O = 0xcbf29ce484222325` (the 64-bit FNV-1a prime and offset basis), all
//! arithmetic wrapping modulo 2^64, `crc32` the CRC-32/ISO-HDLC checksum
//! (the one `crc32fast` and zlib compute).
//! - Page hash of guest frame `gfn` with contents `b[0..4096]`:
//!   `page_hash = (((O ^ gfn) * P) ^ crc32(b)) * P`.
//! - Image digest of a VM with `n` RAM pages: `d = O`, then for `gfn` in
//!   `0..n` ascending: `d = (d ^ page_hash(gfn)) * P`.
//! - A zero page hashes like 4096 zero bytes (`crc32` = `0xc71c0011`), so
//!   its hash needs no page read ([`zero_page_hash`]).
//!
//! - Version 5 (a sealed link, verification mode off): a data page's hash
//!   names where its bytes travelled instead of what they were:
//!   `page_hash = (((O ^ gfn) * P) ^ (s | 2^63)) * P`, `s` the offset of
//!   the page's first byte in the source's stream (its magic is bytes
//!   0..8): [`page_hash_at`]. Zero pages hash as above. With verification
//!   mode, version 5 uses the content hash above (the source compares it
//!   with what its memory holds).
//!
//! Why CRC-32 per page: it runs at memory speed with the carry-less
//! multiply instructions (the hot path during downtime), detects every
//! error burst up to 32 bits, and misses random corruption of a page with
//! probability 2^-32; the 64-bit fold binds each page's checksum to its
//! frame number and position.
//!
//! The source keeps one page hash per guest frame, updated whenever it sends
//! the frame, so its digest covers exactly the bytes it sent (latest copy of
//! each frame). The destination computes it from the memory it ends up with
//! ([`crate::receiver::DigestCheck`]). Equal digests mean the destination
//! image is the image sent. It is an integrity check against lost, stale or
//! misapplied pages, not a cryptographic MAC (authentication belongs to the
//! transport).
//!
//! Why version 5 may name positions instead of contents: over a sealed
//! link every byte the destination reads was checked by the link's
//! Poly1305 tag, which catches any change on the way far more surely than
//! a CRC; what the digest must still catch is the engines' bookkeeping
//! going wrong (a page never sent or never applied, applied to another
//! frame, or an older copy applied after a newer one), and a page's
//! stream offset is unique to each copy of each page, so the fold of
//! `(gfn, offset of its last copy)` differs exactly when the destination
//! applied a different set of last copies than the source sent. It no
//! longer covers the page bytes between the source's read and the seal,
//! and between the tag check and the write (software copies inside each
//! node); verification mode's re-reads cover those, and more.

use crate::Page;

const FNV_PRIME: u64 = 0x0000_0100_0000_01b3;
const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
/// CRC-32 of 4096 zero bytes.
const ZERO_PAGE_CRC: u32 = 0xc71c_0011;

fn mix(gfn: u64, crc: u32) -> u64 {
    mix64(gfn, u64::from(crc))
}

fn mix64(gfn: u64, v: u64) -> u64 {
    ((FNV_OFFSET ^ gfn).wrapping_mul(FNV_PRIME) ^ v).wrapping_mul(FNV_PRIME)
}

/// Hash of one guest frame's contents.
pub fn page_hash(gfn: u64, page: &Page) -> u64 {
    mix(gfn, crc32fast::hash(page))
}

/// Version 5's hash of a data page whose bytes started at `stream_offset`
/// in the source's stream (module docs). Never equal to a content hash of
/// the same frame (the offset's top bit is set; a CRC is 32 bits).
pub fn page_hash_at(gfn: u64, stream_offset: u64) -> u64 {
    mix64(gfn, stream_offset | 1 << 63)
}

/// [`page_hash`] from the page's CRC-32 (`crc32fast::hash(page)`), for a
/// caller that needs the CRC anyway ([`crc32_append_page`]).
pub fn page_hash_of_crc(gfn: u64, page_crc: u32) -> u64 {
    mix(gfn, page_crc)
}

/// The reflected CRC-32 polynomial (ISO-HDLC).
const CRC_POLY: u32 = 0xedb8_8320;

/// `a * b` modulo the CRC polynomial, in the reflected bit order CRC-32
/// uses (bit 31 is x^0).
const fn mul_mod_poly(a: u32, mut b: u32) -> u32 {
    let mut m: u32 = 1 << 31;
    let mut p: u32 = 0;
    while m != 0 {
        if a & m != 0 {
            p ^= b;
        }
        m >>= 1;
        b = if b & 1 != 0 {
            (b >> 1) ^ CRC_POLY
        } else {
            b >> 1
        };
    }
    p
}

/// `x^(8 * 4096)` modulo the polynomial: the operator that shifts a CRC
/// past one page.
const X_POW_PAGE_BITS: u32 = {
    let mut p: u32 = 1 << 31; // x^0
    let mut i = 0;
    while i < 8 * crate::PAGE_SIZE {
        p = if p & 1 != 0 {
            (p >> 1) ^ CRC_POLY
        } else {
            p >> 1
        };
        i += 1;
    }
    p
};

/// The CRC-32 of `A || page` from `crc32(A)` and `crc32(page)` (the
/// standard combination of CRCs, for a 4096-byte second part with the
/// operator precomputed): a record's CRC is built from the page CRCs the
/// page hashes need, so each page's bytes go through one CRC pass.
pub const fn crc32_append_page(crc_a: u32, page_crc: u32) -> u32 {
    mul_mod_poly(X_POW_PAGE_BITS, crc_a) ^ page_crc
}

/// Hash of an all-zero guest frame, without reading it.
pub fn zero_page_hash(gfn: u64) -> u64 {
    mix(gfn, ZERO_PAGE_CRC)
}

/// Whether a page is all zero (sent as a marker only). Word by word: on
/// the bare-metal target a comparison with a zero page becomes a byte-wise
/// `memcmp`, eight times the work, and this runs over all of guest memory
/// in pass 0 and again at a verified switch-over.
pub fn is_zero_page(page: &Page) -> bool {
    page.chunks_exact(8)
        .all(|w| <[u8; 8]>::try_from(w).is_ok_and(|w| u64::from_ne_bytes(w) == 0))
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
    use crate::PAGE_SIZE;

    #[test]
    fn zero_page_hash_matches_hashing_zero_bytes() {
        assert_eq!(crc32fast::hash(&[0u8; PAGE_SIZE]), ZERO_PAGE_CRC);
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
        let mut last = [0u8; PAGE_SIZE];
        last[PAGE_SIZE - 1] = 0x80;
        assert!(!is_zero_page(&last));
    }

    #[test]
    fn page_crcs_combine_into_the_crc_of_the_whole() {
        let mut a = alloc::vec::Vec::new();
        for i in 0..20u32 {
            a.push((i * 13) as u8);
        }
        let mut whole = a.clone();
        let mut crc = crc32fast::hash(&a);
        for k in 0..3u64 {
            let mut page = [0u8; PAGE_SIZE];
            for (i, b) in page.iter_mut().enumerate() {
                *b = (i as u64 * 31 + k * 7) as u8;
            }
            if k == 1 {
                page = [0u8; PAGE_SIZE];
            }
            whole.extend_from_slice(&page);
            let page_crc = crc32fast::hash(&page);
            crc = crc32_append_page(crc, page_crc);
            assert_eq!(crc, crc32fast::hash(&whole), "after page {k}");
            assert_eq!(page_hash_of_crc(k, page_crc), page_hash(k, &page));
        }
        assert_eq!(
            crc32_append_page(crc32fast::hash(&[]), ZERO_PAGE_CRC),
            ZERO_PAGE_CRC
        );
    }

    /// Version 5's positional hash: distinct per frame and per copy, and
    /// never a content hash of the frame (a page whose newest copy was
    /// not applied, or landed in another frame, changes the fold).
    #[test]
    fn positional_hashes_name_frame_and_copy() {
        let o: u64 = 0xcbf2_9ce4_8422_2325;
        let p: u64 = 0x100_0000_01b3;
        assert_eq!(
            page_hash_at(3, 0x1234),
            (((o ^ 3).wrapping_mul(p)) ^ (0x1234 | 1 << 63)).wrapping_mul(p)
        );
        assert_ne!(page_hash_at(3, 0x1234), page_hash_at(4, 0x1234));
        assert_ne!(page_hash_at(3, 0x1234), page_hash_at(3, 0x2234));
        for crc in [0, 0x1234, ZERO_PAGE_CRC, u32::MAX] {
            assert_ne!(page_hash_at(3, u64::from(crc)), page_hash_of_crc(3, crc));
        }
        assert_ne!(page_hash_at(3, u64::from(ZERO_PAGE_CRC)), zero_page_hash(3));
    }

    #[test]
    fn digest_follows_the_documented_formula() {
        // Independent restatement of the module docs, for a 2-page image.
        let p: u64 = 0x100_0000_01b3;
        let o: u64 = 0xcbf2_9ce4_8422_2325;
        let mut page = [0u8; PAGE_SIZE];
        for (i, b) in page.iter_mut().enumerate() {
            *b = (i * 7 + 3) as u8;
        }
        let crc = u64::from(crc32fast::hash(&page));
        let h0 = ((o.wrapping_mul(p)) ^ crc).wrapping_mul(p); // gfn 0: o ^ 0 = o
        let h1 = (((o ^ 1).wrapping_mul(p)) ^ 0xc71c_0011).wrapping_mul(p);
        let d = ((o ^ h0).wrapping_mul(p) ^ h1).wrapping_mul(p);
        assert_eq!(page_hash(0, &page), h0);
        assert_eq!(zero_page_hash(1), h1);
        assert_eq!(ImageDigest::of_hashes(&[h0, h1]), d);
    }
}
