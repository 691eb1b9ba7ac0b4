//! Which chunks of a cached file are present on the SSD.
//!
//! A cache file is a sparse copy of one NAS file, split into fixed-size chunks (the last one may be
//! short). The map records which chunks hold valid data. It is a plain value type: the store
//! persists it in the index, the data path consults and updates it.
//!
//! Chunk granularity (rather than arbitrary byte ranges) keeps the map small and fixed-size (one bit
//! per chunk: a 20 GiB model at 4 MiB chunks needs 640 bytes) and makes "each NAS byte is fetched at
//! most once" a matter of fetching whole chunks exactly once.

/// A bitmap of present chunks of a file of `len` bytes cut into `chunk_size`-byte chunks.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ChunkMap {
    len: u64,
    chunk_size: u64,
    words: Vec<u64>,
    present: u64,
}

impl ChunkMap {
    /// An empty map (no chunk present).
    ///
    /// # Panics
    /// If `chunk_size` is zero.
    pub fn new(len: u64, chunk_size: u64) -> Self {
        assert!(chunk_size > 0, "chunk size must be positive");
        let chunks = len.div_ceil(chunk_size);
        Self {
            len,
            chunk_size,
            words: vec![0; chunks.div_ceil(64) as usize],
            present: 0,
        }
    }

    /// A complete map (every chunk present).
    ///
    /// # Panics
    /// If `chunk_size` is zero.
    pub fn full(len: u64, chunk_size: u64) -> Self {
        let mut m = Self::new(len, chunk_size);
        let chunks = m.chunk_count();
        for (i, w) in m.words.iter_mut().enumerate() {
            let bits = chunks - 64 * i as u64;
            *w = if bits >= 64 {
                u64::MAX
            } else {
                (1 << bits) - 1
            };
        }
        m.present = chunks;
        m
    }

    /// Length of the file the map describes.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Whether the file is empty (an empty file is trivially complete).
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Size of one chunk in bytes.
    pub fn chunk_size(&self) -> u64 {
        self.chunk_size
    }

    /// Number of chunks in the file.
    pub fn chunk_count(&self) -> u64 {
        self.len.div_ceil(self.chunk_size)
    }

    /// Number of chunks present.
    pub fn present_count(&self) -> u64 {
        self.present
    }

    /// Byte range `[start, end)` of chunk `idx`.
    pub fn chunk_range(&self, idx: u64) -> (u64, u64) {
        let start = idx * self.chunk_size;
        (start, (start + self.chunk_size).min(self.len))
    }

    /// Chunks overlapping the byte range `[offset, offset + size)`, clipped to the file.
    pub fn chunks_for(&self, offset: u64, size: u64) -> std::ops::Range<u64> {
        let end = offset.saturating_add(size).min(self.len);
        if offset >= end {
            return 0..0;
        }
        (offset / self.chunk_size)..end.div_ceil(self.chunk_size)
    }

    /// Whether chunk `idx` is present.
    pub fn is_present(&self, idx: u64) -> bool {
        idx < self.chunk_count() && self.words[(idx / 64) as usize] & (1 << (idx % 64)) != 0
    }

    /// Marks chunk `idx` present. Returns whether it was newly set.
    pub fn set_present(&mut self, idx: u64) -> bool {
        assert!(idx < self.chunk_count(), "chunk {idx} out of range");
        let word = &mut self.words[(idx / 64) as usize];
        let bit = 1 << (idx % 64);
        if *word & bit != 0 {
            return false;
        }
        *word |= bit;
        self.present += 1;
        true
    }

    /// Whether every chunk is present.
    pub fn is_complete(&self) -> bool {
        self.present == self.chunk_count()
    }

    /// Bytes covered by present chunks.
    pub fn present_bytes(&self) -> u64 {
        if self.is_complete() {
            return self.len;
        }
        let last = self.chunk_count().saturating_sub(1);
        let short_last = self.len - last * self.chunk_size;
        self.present * self.chunk_size
            - if self.is_present(last) {
                self.chunk_size - short_last
            } else {
                0
            }
    }

    /// The first missing chunk at or after `from`, wrapping around to the start.
    pub fn next_missing(&self, from: u64) -> Option<u64> {
        let n = self.chunk_count();
        if self.is_complete() {
            return None;
        }
        (from..n)
            .chain(0..from.min(n))
            .find(|&i| !self.is_present(i))
    }

    /// The raw bitmap words, for persisting.
    pub fn words(&self) -> &[u64] {
        &self.words
    }

    /// Rebuilds a map from persisted words. Returns `None` if the words do not fit the geometry
    /// (a corrupt or foreign record), so the caller discards the entry instead of trusting it.
    pub fn from_words(len: u64, chunk_size: u64, words: Vec<u64>) -> Option<Self> {
        if chunk_size == 0 {
            return None;
        }
        let chunks = len.div_ceil(chunk_size);
        if words.len() as u64 != chunks.div_ceil(64) {
            return None;
        }
        // Bits past the last chunk must be clear.
        if let Some(last) = words.last()
            && !chunks.is_multiple_of(64)
            && last >> (chunks % 64) != 0
        {
            return None;
        }
        let present = words.iter().map(|w| u64::from(w.count_ones())).sum();
        Some(Self {
            len,
            chunk_size,
            words,
            present,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_file_is_complete() {
        let m = ChunkMap::new(0, 4);
        assert!(m.is_complete());
        assert_eq!(m.chunk_count(), 0);
        assert_eq!(m.chunks_for(0, 10), 0..0);
        assert_eq!(m.present_bytes(), 0);
        assert_eq!(m.next_missing(0), None);
    }

    #[test]
    fn geometry_around_chunk_size() {
        for (len, chunks) in [(1, 1), (3, 1), (4, 1), (5, 2), (8, 2), (9, 3)] {
            assert_eq!(ChunkMap::new(len, 4).chunk_count(), chunks, "len {len}");
        }
        let m = ChunkMap::new(9, 4);
        assert_eq!(m.chunk_range(0), (0, 4));
        assert_eq!(m.chunk_range(2), (8, 9));
    }

    #[test]
    fn chunks_for_clips_and_crosses_boundaries() {
        let m = ChunkMap::new(10, 4);
        assert_eq!(m.chunks_for(0, 1), 0..1);
        assert_eq!(m.chunks_for(3, 2), 0..2);
        assert_eq!(m.chunks_for(4, 4), 1..2);
        assert_eq!(m.chunks_for(7, 100), 1..3);
        assert_eq!(m.chunks_for(10, 1), 0..0);
        assert_eq!(m.chunks_for(50, 1), 0..0);
        assert_eq!(m.chunks_for(u64::MAX - 1, 5), 0..0);
    }

    #[test]
    fn set_and_count() {
        let mut m = ChunkMap::new(10, 4);
        assert!(m.set_present(2));
        assert!(!m.set_present(2));
        assert_eq!(m.present_bytes(), 2);
        assert_eq!(m.next_missing(0), Some(0));
        assert_eq!(m.next_missing(2), Some(0));
        m.set_present(0);
        assert_eq!(m.present_bytes(), 6);
        assert_eq!(m.next_missing(2), Some(1));
        m.set_present(1);
        assert!(m.is_complete());
        assert_eq!(m.present_bytes(), 10);
    }

    #[test]
    fn full_maps_are_complete() {
        for (len, chunk) in [
            (0, 4),
            (1, 4),
            (9, 4),
            (64 * 4, 4),
            (65 * 4 + 1, 4),
            (1000, 7),
        ] {
            let mut by_hand = ChunkMap::new(len, chunk);
            for c in 0..by_hand.chunk_count() {
                by_hand.set_present(c);
            }
            assert_eq!(
                ChunkMap::full(len, chunk),
                by_hand,
                "len {len} chunk {chunk}"
            );
        }
    }

    #[test]
    fn many_words_roundtrip() {
        let mut m = ChunkMap::new(1000 * 7 + 3, 7);
        for i in (0..m.chunk_count()).step_by(3) {
            m.set_present(i);
        }
        let back = ChunkMap::from_words(m.len(), m.chunk_size(), m.words().to_vec()).unwrap();
        assert_eq!(back, m);
    }

    #[test]
    fn from_words_rejects_bad_geometry() {
        assert!(ChunkMap::from_words(10, 0, vec![]).is_none());
        assert!(ChunkMap::from_words(10, 4, vec![]).is_none());
        assert!(ChunkMap::from_words(10, 4, vec![0, 0]).is_none());
        // Bit 3 set although the file has only 3 chunks.
        assert!(ChunkMap::from_words(10, 4, vec![0b1000]).is_none());
        assert!(
            ChunkMap::from_words(10, 4, vec![0b111])
                .unwrap()
                .is_complete()
        );
    }
}
