//! Pure arithmetic behind the memory-touching cases: where free RAM starts,
//! the `memory` pattern, the `dirty-log` layout and bitmap, the stack range a
//! dirty-log round touches, and the walk that finds the guest's own
//! page-table pages. No memory is touched here; the cases pass in slices and
//! read functions, so all of this is unit-tested on the host.

/// Guest page size (4 KiB; the dirty log tracks 4 KiB frames).
pub const PAGE_BYTES: u64 = 4096;

/// Round `x` down to a multiple of `align` (a power of two).
pub const fn align_down(x: u64, align: u64) -> u64 {
    x & !(align - 1)
}

/// Round `x` up to a multiple of `align` (a power of two); saturates.
pub const fn align_up(x: u64, align: u64) -> u64 {
    align_down(x.saturating_add(align - 1), align)
}

/// First free GPA: after both the image end the VMM reports and the end of
/// our own image as linked (whichever is later), page-aligned.
pub fn free_start(kernel_end_gpa: u64, image_end: u64) -> u64 {
    align_up(kernel_end_gpa.max(image_end), PAGE_BYTES)
}

/// The `memory` case's position-dependent 64-bit pattern for the word at
/// `gpa`: distinct for every word, and unlike the zeroes of fresh RAM.
pub const fn pattern(gpa: u64) -> u64 {
    gpa.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ 0xa5a5_5a5a_c3c3_3c3c
}

/// Rounds in the `dirty-log` case.
pub const DIRTY_ROUNDS: u64 = 3;
/// Pages in each round's private region of the buffer (regions are disjoint,
/// so the rounds' page sets are too).
pub const DIRTY_REGION_PAGES: u64 = 1024;
/// Distinct pages the guest writes per round (>= 400 required; 3 x 450 =
/// 1350 distinct over the case, >= 1000 required).
pub const DIRTY_PAGES_PER_ROUND: u64 = 450;
// The case's minimums (docs/DESIGN.md, case 4), and room in each region.
const _: () = assert!(DIRTY_PAGES_PER_ROUND >= 400);
const _: () = assert!(DIRTY_PAGES_PER_ROUND * DIRTY_ROUNDS >= 1000);
const _: () = assert!(DIRTY_PAGES_PER_ROUND <= DIRTY_REGION_PAGES / 2);

/// Where the `dirty-log` case keeps its bitmap and picks its pages.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DirtyLayout {
    /// GPA of the guest's bitmap (bit n = guest frame n), page-aligned.
    pub bitmap_gpa: u64,
    /// Bitmap length in bytes (a multiple of 8: it is used as u64 words).
    pub bitmap_len: u64,
    /// Start of the first round's region, page-aligned.
    pub buffer_gpa: u64,
}

impl DirtyLayout {
    /// Lay out bitmap, the three regions and the three `HC_FILL_PAGE` pages
    /// from `free` (page-aligned) up; `Err` if they do not fit in RAM.
    pub fn new(ram_bytes: u64, free: u64) -> Result<Self, &'static str> {
        let frames = ram_bytes / PAGE_BYTES;
        let bitmap_len = frames.div_ceil(64) * 8;
        let bitmap_gpa = align_up(free, PAGE_BYTES);
        let buffer_gpa = align_up(bitmap_gpa + bitmap_len, PAGE_BYTES);
        let layout = Self {
            bitmap_gpa,
            bitmap_len,
            buffer_gpa,
        };
        if layout.end() > ram_bytes {
            return Err("not enough free RAM for the dirty-log buffer");
        }
        Ok(layout)
    }

    /// Bitmap length in u64 words.
    pub fn bitmap_words(&self) -> usize {
        (self.bitmap_len / 8) as usize
    }

    /// First GPA of round `round`'s region.
    pub fn region_gpa(&self, round: u64) -> u64 {
        self.buffer_gpa + round * DIRTY_REGION_PAGES * PAGE_BYTES
    }

    /// The page the hypervisor fills in round `round` (outside every region).
    pub fn fill_gpa(&self, round: u64) -> u64 {
        self.region_gpa(DIRTY_ROUNDS) + round * PAGE_BYTES
    }

    /// First GPA after everything the case uses.
    pub fn end(&self) -> u64 {
        self.fill_gpa(DIRTY_ROUNDS)
    }

    /// Pages the bitmap itself occupies: `(first gpa, count)`.
    pub fn bitmap_pages(&self) -> (u64, u64) {
        (self.bitmap_gpa, self.bitmap_len.div_ceil(PAGE_BYTES))
    }
}

/// Pages of the stack a dirty-log round must touch and report: from two
/// pages below the page holding `rsp` (room for the round's callees) up to
/// the top, clamped to the stack. Returns `(first page gpa, end gpa)`.
pub fn stack_touch_range(rsp: u64, stack_bottom: u64, stack_top: u64) -> (u64, u64) {
    let low = align_down(rsp, PAGE_BYTES).saturating_sub(2 * PAGE_BYTES);
    (
        low.max(align_down(stack_bottom, PAGE_BYTES)),
        align_up(stack_top, PAGE_BYTES),
    )
}

/// A bitmap of guest frames over borrowed u64 words (bit n of the
/// little-endian words = bit n % 8 of byte n / 8 = frame n, the layout
/// `HC_DIRTY_LOG_CHECK` reads).
pub struct FrameBitmap<'a> {
    words: &'a mut [u64],
}

impl<'a> FrameBitmap<'a> {
    /// Wrap `words`.
    pub fn new(words: &'a mut [u64]) -> Self {
        Self { words }
    }

    /// Clear every bit (this writes every word, hence every bitmap page).
    pub fn clear(&mut self) {
        self.words.fill(0);
    }

    /// Set frame `gfn`'s bit; `true` if it was clear. Frames past the end
    /// are ignored (and reported as not newly set).
    pub fn set(&mut self, gfn: u64) -> bool {
        let Some(word) = self.words.get_mut((gfn / 64) as usize) else {
            return false;
        };
        let mask = 1u64 << (gfn % 64);
        let was_clear = *word & mask == 0;
        *word |= mask;
        was_clear
    }

    /// Mark every page of `[gpa, gpa + pages * 4 KiB)`.
    pub fn set_pages(&mut self, gpa: u64, pages: u64) {
        let first = gpa / PAGE_BYTES;
        for gfn in first..first + pages {
            self.set(gfn);
        }
    }

    /// Whether frame `gfn`'s bit is set.
    #[cfg(test)]
    pub fn test(&self, gfn: u64) -> bool {
        self.words
            .get((gfn / 64) as usize)
            .is_some_and(|w| w & (1 << (gfn % 64)) != 0)
    }

    /// The words, for `HC_DIRTY_LOG_CHECK`.
    pub fn words(&self) -> &[u64] {
        self.words
    }

    /// Number of set bits.
    pub fn count(&self) -> u64 {
        self.words.iter().map(|w| u64::from(w.count_ones())).sum()
    }
}

/// Most page-table pages [`page_table_pages`] reports.
pub const MAX_PT_PAGES: usize = 32;

const PTE_PRESENT: u64 = 1;
const PTE_PAGE_SIZE: u64 = 1 << 7;
const PTE_ADDR_MASK: u64 = 0x000f_ffff_ffff_f000;

/// Find every page-table page reachable from `cr3` (4-level paging): the
/// PML4, the PDPTs, page directories and page tables (2 MiB and 1 GiB leaf
/// entries end the walk). `read(gpa)` reads one u64 entry. Writes the pages'
/// GPAs into `out` and returns how many; `Err` if there are more than
/// `out.len()` (the walk is bounded by `out`, never by the entries).
///
/// The dirty-log case needs these because the MMU writes them (accessed and
/// dirty bits) and an emulator may treat every guest page-table walk as a
/// write under nested paging (AMD APM vol. 2, 15.25.5; QEMU probes guest
/// page-table pages for write access), so the guest touches and reports them.
pub fn page_table_pages(
    cr3: u64,
    read: impl Fn(u64) -> u64,
    out: &mut [u64],
) -> Result<usize, &'static str> {
    let mut n = 0usize;
    let mut push = |gpa: u64, out: &mut [u64]| -> Result<(), &'static str> {
        let slot = out.get_mut(n).ok_or("too many page-table pages")?;
        *slot = gpa;
        n += 1;
        Ok(())
    };
    let pml4 = cr3 & PTE_ADDR_MASK;
    push(pml4, out)?;
    // Level 4 -> 3 -> 2 -> 1; `huge_ok` says whether PS ends the walk there.
    for i in 0..512 {
        let e4 = read(pml4 + i * 8);
        if e4 & PTE_PRESENT == 0 {
            continue;
        }
        let pdpt = e4 & PTE_ADDR_MASK;
        push(pdpt, out)?;
        for j in 0..512 {
            let e3 = read(pdpt + j * 8);
            if e3 & PTE_PRESENT == 0 || e3 & PTE_PAGE_SIZE != 0 {
                continue;
            }
            let pd = e3 & PTE_ADDR_MASK;
            push(pd, out)?;
            for k in 0..512 {
                let e2 = read(pd + k * 8);
                if e2 & PTE_PRESENT == 0 || e2 & PTE_PAGE_SIZE != 0 {
                    continue;
                }
                push(e2 & PTE_ADDR_MASK, out)?;
            }
        }
    }
    Ok(n)
}

/// `disk-verify`: the round that last wrote span `span` by the end of
/// round `round`, when round r (from 1) writes span (r - 1) % `spans`;
/// 0 = no round wrote it yet.
pub fn last_writer(round: u64, span: u64, spans: u64) -> u64 {
    if spans == 0 || round == 0 || span >= spans {
        return 0;
    }
    let last = round - 1;
    if last < span {
        return 0;
    }
    // The largest j <= last with j % spans == span, as a 1-based round.
    last - (last - span) % spans + 1
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    #[test]
    fn alignment() {
        assert_eq!(align_up(0x1001, 0x1000), 0x2000);
        assert_eq!(align_up(0x1000, 0x1000), 0x1000);
        assert_eq!(align_down(0x1fff, 0x1000), 0x1000);
        assert_eq!(align_up(u64::MAX, 0x1000), align_down(u64::MAX, 0x1000));
        assert_eq!(free_start(0x12_3456, 0x11_0000), 0x12_4000);
        assert_eq!(free_start(0x10_0000, 0x11_0000), 0x11_0000);
    }

    #[test]
    fn pattern_is_position_dependent() {
        let words: Vec<u64> = (0..4096u64).map(|i| pattern(0x20_0000 + i * 8)).collect();
        let mut sorted = words.clone();
        sorted.sort_unstable();
        sorted.dedup();
        assert_eq!(sorted.len(), words.len());
        assert!(words.iter().all(|&w| w != 0));
    }

    #[test]
    fn dirty_layout_64_mib() {
        let l = DirtyLayout::new(64 << 20, 0x13_2000).unwrap();
        assert_eq!(l.bitmap_gpa, 0x13_2000);
        assert_eq!(l.bitmap_len, 2048);
        assert_eq!(l.bitmap_words(), 256);
        assert_eq!(l.bitmap_pages(), (0x13_2000, 1));
        assert_eq!(l.buffer_gpa, 0x13_3000);
        assert_eq!(l.region_gpa(1), 0x13_3000 + 1024 * 4096);
        // Fill pages lie past all three regions and are distinct.
        assert_eq!(l.fill_gpa(0), l.region_gpa(3));
        assert!(l.fill_gpa(2) < l.end());
        assert!(l.end() <= 64 << 20);
    }

    #[test]
    fn dirty_layout_rejects_small_ram() {
        assert!(DirtyLayout::new(8 << 20, 0x20_0000).is_err());
    }

    #[test]
    fn stack_range() {
        // rsp in the middle of a 16-page stack at 0x20_0000..0x21_0000.
        let (lo, hi) = stack_touch_range(0x20_8a30, 0x20_0000, 0x21_0000);
        assert_eq!((lo, hi), (0x20_6000, 0x21_0000));
        // Near the bottom: clamped.
        let (lo, _) = stack_touch_range(0x20_0100, 0x20_0000, 0x21_0000);
        assert_eq!(lo, 0x20_0000);
    }

    #[test]
    fn bitmap_bits_match_byte_layout() {
        let mut words = vec![0u64; 4];
        let mut b = FrameBitmap::new(&mut words);
        assert!(b.set(0));
        assert!(!b.set(0));
        assert!(b.set(9));
        assert!(b.set(255));
        assert!(!b.set(256), "past the end is ignored");
        assert!(b.test(9) && !b.test(10));
        assert_eq!(b.count(), 3);
        b.set_pages(0x4000, 3); // frames 4, 5, 6
        assert_eq!(b.count(), 6);
        let bytes: Vec<u8> = words.iter().flat_map(|w| w.to_le_bytes()).collect();
        assert_eq!(bytes[0], 0b0111_0001);
        assert_eq!(bytes[1], 0b0000_0010);
        assert_eq!(bytes[31], 0b1000_0000);
        let mut b = FrameBitmap::new(&mut words);
        b.clear();
        assert_eq!(b.count(), 0);
    }

    /// The guest start state of abi.rs: PML4 at 0x1000, PDPT at 0x2000, four
    /// page directories of 2 MiB pages at 0x3000..0x7000.
    #[test]
    fn walk_finds_the_abi_tables() {
        let mut mem: HashMap<u64, u64> = HashMap::new();
        mem.insert(0x1000, 0x2000 | 3);
        for i in 0..4u64 {
            mem.insert(0x2000 + i * 8, (0x3000 + i * 0x1000) | 3);
            for k in 0..512u64 {
                mem.insert(0x3000 + i * 0x1000 + k * 8, ((i * 512 + k) << 21) | 0x83);
            }
        }
        let read = |gpa: u64| mem.get(&gpa).copied().unwrap_or(0);
        let mut out = [0u64; MAX_PT_PAGES];
        let n = page_table_pages(0x1000, read, &mut out).unwrap();
        assert_eq!(&out[..n], &[0x1000, 0x2000, 0x3000, 0x4000, 0x5000, 0x6000]);
        // A 4 KiB page table under the first directory entry is found too.
        mem.insert(0x3000, 0x9000 | 3);
        let read = |gpa: u64| mem.get(&gpa).copied().unwrap_or(0);
        let n = page_table_pages(0x1000, read, &mut out).unwrap();
        assert_eq!(n, 7);
        assert_eq!(out[3], 0x9000);
        // Too small an output is an error, not a panic.
        let mut tiny = [0u64; 2];
        assert!(page_table_pages(0x1000, read, &mut tiny).is_err());
    }

    #[test]
    fn last_writer_matches_a_simulation() {
        for spans in 1..6u64 {
            let mut writer = [0u64; 6];
            for round in 1..40u64 {
                writer[((round - 1) % spans) as usize] = round;
                for span in 0..spans {
                    assert_eq!(
                        last_writer(round, span, spans),
                        writer[span as usize],
                        "round {round} span {span} of {spans}"
                    );
                }
            }
        }
        assert_eq!(last_writer(0, 0, 4), 0);
        assert_eq!(last_writer(3, 9, 4), 0);
    }
}
