//! The crash campaign's model: which content each block may hold after a kill -9.
//!
//! Every write carries a generation number and its offset in its first 16 bytes, and a
//! byte stream derived from both in the rest, so a block read back names the write it came
//! from and shows whether it is whole. (The few shared contents a dedupe campaign writes
//! at many offsets carry an id that is no offset instead.) For each block the model keeps the generation that
//! a completed flush made durable and the generations written since (acknowledged or in
//! flight when the daemon died). After a crash the block must hold one of those: anything
//! older means an acknowledged, flushed write was lost; anything else is corruption.

use std::collections::BTreeMap;

/// Generation 0: the block reads as zeros (never written, or write-zeroes / discard).
pub const ZEROES: u64 = 0;

/// SplitMix64: reproducible from a printed seed, good enough to pick offsets and delays.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n` (n > 0), close enough for test workloads.
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n
    }
}

/// The bytes of generation `generation` of the block at `offset`.
pub fn content(offset: u64, generation: u64, len: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(len);
    out.extend_from_slice(&offset.to_le_bytes());
    out.extend_from_slice(&generation.to_le_bytes());
    let mut rng = Rng::new(offset.rotate_left(17) ^ generation);
    while out.len() < len {
        out.extend_from_slice(&rng.next_u64().to_le_bytes());
    }
    out.truncate(len);
    out
}

/// Ids of the few contents a dedupe campaign writes at many offsets: the id is what
/// `content` embeds in place of an offset (never a real one), with generation 1.
pub const DUP_BASE: u64 = 1 << 62;

/// The bytes of shared content `p`: the same at every offset, so dedupe can share them.
pub fn dup_content(p: u64, len: usize) -> Vec<u8> {
    content(DUP_BASE + p, 1, len)
}

/// Which generation `data`, read at `offset`, is (for shared content, its id); an error
/// says why it is none.
pub fn identify(offset: u64, data: &[u8]) -> Result<u64, String> {
    if data.iter().all(|&b| b == 0) {
        return Ok(ZEROES);
    }
    let word = |at: usize| {
        let mut w = [0u8; 8];
        w.copy_from_slice(&data[at..at + 8]);
        u64::from_le_bytes(w)
    };
    let (at, generation) = (word(0), word(8));
    if at >= DUP_BASE && generation == 1 && data == content(at, 1, data.len()).as_slice() {
        return Ok(at);
    }
    if at != offset {
        return Err(format!(
            "block {offset:#x} holds data written for offset {at:#x} (generation {generation})"
        ));
    }
    if data != content(offset, generation, data.len()).as_slice() {
        return Err(format!(
            "block {offset:#x} starts as generation {generation} but its bytes differ (torn or corrupt)"
        ));
    }
    Ok(generation)
}

#[derive(Debug, Default)]
struct Block {
    durable: u64,
    since_flush: Vec<u64>,
}

/// What each tracked block may hold.
#[derive(Debug, Default)]
pub struct Model {
    blocks: BTreeMap<u64, Block>,
    next_generation: u64,
}

impl Model {
    pub fn new() -> Model {
        Model {
            blocks: BTreeMap::new(),
            next_generation: 1,
        }
    }

    /// A new generation for a write about to be issued at `offset`: from now on the block
    /// may hold it, whether or not the write completes.
    pub fn write(&mut self, offset: u64) -> u64 {
        let generation = self.next_generation;
        self.next_generation += 1;
        self.issued(offset, generation);
        generation
    }

    /// A write of shared content `p` ([`dup_content`]) about to be issued at `offset`.
    pub fn write_dup(&mut self, offset: u64, p: u64) {
        self.issued(offset, DUP_BASE + p);
    }

    /// Write-zeroes or discard about to be issued at `offset`.
    pub fn zero(&mut self, offset: u64) {
        self.issued(offset, ZEROES);
    }

    fn issued(&mut self, offset: u64, generation: u64) {
        self.blocks
            .entry(offset)
            .or_default()
            .since_flush
            .push(generation);
    }

    /// A flush completed, and every write before it had completed: their content is durable.
    pub fn flushed(&mut self) {
        for b in self.blocks.values_mut() {
            if let Some(&last) = b.since_flush.last() {
                b.durable = last;
            }
            b.since_flush.clear();
        }
    }

    pub fn offsets(&self) -> Vec<u64> {
        self.blocks.keys().copied().collect()
    }

    /// Each block's latest write, for a moment when every write issued has completed:
    /// what a snapshot taken then must hold.
    pub fn current(&self) -> Vec<(u64, u64)> {
        self.blocks
            .iter()
            .map(|(&o, b)| (o, b.since_flush.last().copied().unwrap_or(b.durable)))
            .collect()
    }

    /// Check what the block at `offset` holds after a restart, and take it as the new
    /// baseline. The error names the block and what was wrong.
    pub fn verify(&mut self, offset: u64, data: &[u8]) -> Result<(), String> {
        let found = identify(offset, data)?;
        let b = self.blocks.entry(offset).or_default();
        if found != b.durable && !b.since_flush.contains(&found) {
            return Err(format!(
                "block {offset:#x} holds generation {found}; a flush made generation {} durable \
                 and only {:?} were written since",
                b.durable, b.since_flush
            ));
        }
        b.durable = found;
        b.since_flush.clear();
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn model_accepts_what_may_survive_and_nothing_else() {
        let mut m = Model::new();
        let g1 = m.write(0);
        m.flushed();
        let g2 = m.write(0);
        let g3 = m.write(4096);
        // Unflushed g2 may or may not have survived; flushed g1 must not be older-lost.
        assert!(m.verify(0, &content(0, g1, 4096)).is_ok());
        let g4 = m.write(0);
        assert!(m.verify(0, &content(0, g4, 4096)).is_ok());
        m.flushed();
        assert!(
            m.verify(0, &content(0, g2, 4096)).is_err(),
            "flushed g4 lost"
        );
        assert!(
            m.verify(0, &vec![0; 4096]).is_err(),
            "zeros where g4 was durable"
        );
        assert!(m.verify(4096, &content(4096, g3, 4096)).is_ok());
        let mut torn = content(0, g4, 4096);
        torn[4000] ^= 1;
        assert!(identify(0, &torn).is_err());
        assert!(
            identify(4096, &content(0, g4, 4096)).is_err(),
            "misplaced block"
        );
        m.zero(4096);
        assert!(m.verify(4096, &vec![0; 4096]).is_ok());
        // Shared content is accepted where it was written, and nowhere else.
        m.write_dup(4096, 3);
        assert!(m.verify(8192, &dup_content(3, 4096)).is_err());
        assert!(m.verify(4096, &dup_content(2, 4096)).is_err());
        assert!(m.verify(4096, &dup_content(3, 4096)).is_ok());
    }
}
