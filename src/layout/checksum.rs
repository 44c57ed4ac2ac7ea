//! The whole-database checksum carried with every commit.
//!
//! The checksum of an n-page database is the wrapping sum over p in 1..=n of
//! `page_hash(p, content of page p)`, a page never written counting as a page of zeros. A sum of
//! per-page hashes can be kept up to date in O(1) per written page, so the replicator carries it
//! from commit to commit, and restore and `verify` recompute it to prove a database equal to the
//! source without having the source.
//!
//! Invariant kept: [`PageHashes::db_checksum`] always equals the checksum recomputed from scratch
//! over the pages set so far.

use xxhash_rust::xxh3::xxh3_64_with_seed;

/// The hash of one page: `xxh3_64_with_seed(data, pgno as u64)`. Seeding with the page number
/// makes two swapped pages change the sum.
pub(crate) fn page_hash(pgno: u32, data: &[u8]) -> u64 {
    xxh3_64_with_seed(data, u64::from(pgno))
}

/// Per-page hashes of a database image and their wrapping sum. The database checksum of an
/// n-page database is the wrapping sum over p in 1..=n of page_hash(p, content of page p); a page
/// never written counts as a page of zeros.
///
/// Memory: 8 bytes per page, plus one page of zeros once a gap or growth needs one. A caller
/// applying untrusted commits bounds the database size it accepts (it writes a file that large).
#[derive(Debug, Clone)]
pub(crate) struct PageHashes {
    /// Page size in bytes: the size of the zero page.
    page_size: u32,
    /// `hashes[i]` is the hash of page `i + 1`.
    hashes: Vec<u64>,
    /// Wrapping sum of `hashes`.
    sum: u64,
    /// A page of zeros, allocated the first time a zero page is hashed.
    zeros: Vec<u8>,
}

impl PageHashes {
    /// An empty database image (0 pages) with pages of `page_size` bytes.
    pub(crate) fn new(page_size: u32) -> Self {
        PageHashes {
            page_size,
            hashes: Vec::new(),
            sum: 0,
            zeros: Vec::new(),
        }
    }

    /// Hash of a page of zeros at `pgno`.
    fn zero_hash(&mut self, pgno: u32) -> u64 {
        if self.zeros.len() != self.page_size as usize {
            self.zeros = vec![0; self.page_size as usize];
        }
        page_hash(pgno, &self.zeros)
    }

    /// Grows the image to `pages` pages, the new ones zero.
    fn grow_to(&mut self, pages: u32) {
        let from = self.len();
        if pages <= from {
            return;
        }
        self.hashes.reserve((pages - from) as usize);
        for pgno in from + 1..=pages {
            let h = self.zero_hash(pgno);
            self.hashes.push(h);
            self.sum = self.sum.wrapping_add(h);
        }
    }

    /// Records the content of page `pgno` (1-based; 0 is not a page and is ignored). A `pgno`
    /// beyond the current size extends the image, filling the gap with zero pages.
    pub(crate) fn set(&mut self, pgno: u32, data: &[u8]) {
        if pgno == 0 {
            return;
        }
        self.grow_to(pgno - 1);
        let h = page_hash(pgno, data);
        match self.hashes.get_mut(pgno as usize - 1) {
            Some(old) => {
                self.sum = self.sum.wrapping_sub(*old).wrapping_add(h);
                *old = h;
            }
            None => {
                self.hashes.push(h);
                self.sum = self.sum.wrapping_add(h);
            }
        }
    }

    /// At a commit: sets the database size to `db_pages`, dropping pages beyond it or extending
    /// with zero pages.
    pub(crate) fn set_size(&mut self, db_pages: u32) {
        if db_pages < self.len() {
            for h in self.hashes.drain(db_pages as usize..) {
                self.sum = self.sum.wrapping_sub(h);
            }
        } else {
            self.grow_to(db_pages);
        }
    }

    /// Number of pages in the image.
    pub(crate) fn len(&self) -> u32 {
        // At most u32::MAX entries are ever pushed (page numbers are u32).
        u32::try_from(self.hashes.len()).unwrap_or(u32::MAX)
    }

    /// The database checksum of the image, in O(1).
    pub(crate) fn db_checksum(&self) -> u64 {
        self.sum
    }

    /// The hash of every page, page 1 first.
    pub(crate) fn as_slice(&self) -> &[u64] {
        &self.hashes
    }

    /// An image from saved per-page hashes (page 1 first).
    pub(crate) fn from_hashes(page_size: u32, hashes: Vec<u64>) -> Self {
        let sum = hashes.iter().fold(0u64, |a, h| a.wrapping_add(*h));
        PageHashes {
            page_size,
            hashes,
            sum,
            zeros: Vec::new(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The checksum recomputed from scratch over full page images.
    fn from_scratch(pages: &[Vec<u8>]) -> u64 {
        pages
            .iter()
            .enumerate()
            .fold(0u64, |s, (i, p)| s.wrapping_add(page_hash(i as u32 + 1, p)))
    }

    #[test]
    fn incremental_sum_equals_recomputed_sum() {
        let ps = 512;
        let mut h = PageHashes::new(ps);
        let mut image: Vec<Vec<u8>> = Vec::new();
        assert_eq!(h.len(), 0);
        assert_eq!(h.db_checksum(), 0);
        let steps: &[(u32, u8)] = &[(1, 1), (5, 5), (3, 3), (5, 7), (2, 0), (9, 9)];
        for &(pgno, byte) in steps {
            h.set(pgno, &vec![byte; ps as usize]);
            while image.len() < pgno as usize {
                image.push(vec![0; ps as usize]);
            }
            image[pgno as usize - 1] = vec![byte; ps as usize];
            assert_eq!(h.len() as usize, image.len());
            assert_eq!(h.db_checksum(), from_scratch(&image));
        }
        h.set_size(4);
        image.truncate(4);
        assert_eq!(h.db_checksum(), from_scratch(&image));
        h.set_size(7);
        image.resize(7, vec![0; ps as usize]);
        assert_eq!(h.len(), 7);
        assert_eq!(h.db_checksum(), from_scratch(&image));
        h.set(0, &[1; 512]);
        assert_eq!(h.len(), 7);
        h.set_size(0);
        assert_eq!(h.len(), 0);
        assert_eq!(h.db_checksum(), 0);
    }

    #[test]
    fn swapped_pages_change_the_checksum() {
        let (a, b) = (vec![1u8; 512], vec![2u8; 512]);
        let mut x = PageHashes::new(512);
        x.set(1, &a);
        x.set(2, &b);
        let mut y = PageHashes::new(512);
        y.set(1, &b);
        y.set(2, &a);
        assert_ne!(x.db_checksum(), y.db_checksum());
    }
}
