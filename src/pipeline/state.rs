//! Per-device state a shard keeps in memory: the last frame counter of each device, to count
//! the frames missing between two uplinks.
//!
//! Only what a decision needs lives here. The counters shown by the API (uplinks, gaps,
//! duplicates, last seen, last peer) are added up in SQL inside the commit transaction
//! (`store::ingest`), so a failed commit cannot leave memory ahead of the disk. This map is
//! loaded from `device_state.last_sequence` at start; one shard owns each device, so it
//! needs no lock.
//!
//! # Frame counters
//!
//! A payload may carry a frame counter or sequence number (`Identity::sequence`). From the
//! previous counter `last` to the new one `new`:
//!
//! - `new > last`: `new - last - 1` frames are missing (a jump of k counts k - 1);
//! - `new == last`: a repeat (a retransmission the source did not catch, or a device whose
//!   counter does not move, like a CJ/T 188 meter echoing SER 0): nothing is counted;
//! - `new < last`: the counter wrapped if `last` was within the wrap window of the top of
//!   the counter's width and `new` within the window above zero (frames missing across
//!   the wrap are counted); otherwise the device restarted its counter: a reset, no gap.
//!
//! The width is 8 bits for the codecs whose counter is one byte (`cjt188` SER, `wmbus`
//! access number) and 16 bits for everything else (Milesight frame counters, layouts),
//! with a wrap window of 1/64 of the range (at least 16): 4 frames around 255 → 0, 1024
//! around 65535 → 0. A 32-bit counter therefore counts its (rare) wrap as a reset.

use std::collections::HashMap;

/// What one new frame counter value means.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SeqStep {
    /// Frames missing just before this one.
    pub gaps: u32,
    /// The counter went backwards without wrapping: the device restarted it.
    pub reset: bool,
}

/// The counter width of a codec's sequence numbers, in bits.
pub fn counter_bits(codec: &str) -> u32 {
    match codec {
        "cjt188" | "wmbus" => 8,
        _ => 16,
    }
}

/// The step from `last` to `new` for a counter of `bits` bits (see the module docs).
pub fn step(last: Option<u32>, new: u32, bits: u32) -> SeqStep {
    let Some(last) = last else {
        return SeqStep::default();
    };
    if new > last {
        return SeqStep {
            gaps: new - last - 1,
            reset: false,
        };
    }
    if new == last {
        return SeqStep::default();
    }
    let max: u64 = (1u64 << bits.min(32)) - 1;
    let window: u64 = ((max + 1) / 64).max(16);
    let (last64, new64) = (u64::from(last), u64::from(new));
    if last64 <= max && last64 + window > max && new64 < window {
        // last .. max, then 0 .. new: the frames strictly between are missing.
        let missing = (max - last64) + new64;
        return SeqStep {
            gaps: u32::try_from(missing).unwrap_or(u32::MAX),
            reset: false,
        };
    }
    SeqStep {
        gaps: 0,
        reset: true,
    }
}

/// The last frame counter of every device of one shard.
#[derive(Debug, Default)]
pub struct Sequences {
    last: HashMap<String, u32>,
}

impl Sequences {
    pub fn insert(&mut self, device: String, sequence: u32) {
        self.last.insert(device, sequence);
    }

    /// Records `new` for `device` and says what it means.
    pub fn advance(&mut self, device: &str, new: u32, bits: u32) -> SeqStep {
        match self.last.get_mut(device) {
            Some(last) => {
                let s = step(Some(*last), new, bits);
                *last = new;
                s
            }
            None => {
                self.last.insert(device.to_owned(), new);
                SeqStep::default()
            }
        }
    }

    pub fn len(&self) -> usize {
        self.last.len()
    }

    pub fn is_empty(&self) -> bool {
        self.last.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gaps(n: u32) -> SeqStep {
        SeqStep {
            gaps: n,
            reset: false,
        }
    }

    const RESET: SeqStep = SeqStep {
        gaps: 0,
        reset: true,
    };

    #[test]
    fn steps() {
        // First value seen: nothing to compare with.
        assert_eq!(step(None, 7, 16), gaps(0));
        assert_eq!(step(Some(7), 8, 16), gaps(0));
        assert_eq!(step(Some(7), 10, 16), gaps(2));
        assert_eq!(step(Some(7), 7, 16), gaps(0));
        // 16-bit wrap: 65535 → 0 loses nothing, 65534 → 1 loses 65535 and 0.
        assert_eq!(step(Some(65_535), 0, 16), gaps(0));
        assert_eq!(step(Some(65_534), 1, 16), gaps(2));
        assert_eq!(step(Some(65_000), 10, 16), gaps(545));
        // Backwards far from the top: a restart.
        assert_eq!(step(Some(1000), 0, 16), RESET);
        assert_eq!(step(Some(64_000), 5, 16), RESET);
        assert_eq!(step(Some(65_535), 2000, 16), RESET);
        // 8-bit counters wrap at 255 with a window of 16.
        assert_eq!(step(Some(255), 0, 8), gaps(0));
        assert_eq!(step(Some(250), 3, 8), gaps(8));
        assert_eq!(step(Some(200), 3, 8), RESET);
        // A 16-bit-wide value on an 8-bit codec is above its range: a restart, not a wrap.
        assert_eq!(step(Some(65_535), 0, 8), RESET);
        // 32-bit: the window is 2^26; no overflow anywhere.
        assert_eq!(step(Some(u32::MAX), 0, 32), gaps(0));
        assert_eq!(step(Some(0), u32::MAX, 16), gaps(u32::MAX - 1));
    }

    #[test]
    fn sequences_remember_per_device() {
        let mut s = Sequences::default();
        s.insert("a".into(), 10);
        assert_eq!(s.advance("a", 13, 16), gaps(2));
        assert_eq!(s.advance("b", 100, 16), gaps(0));
        assert_eq!(s.advance("b", 101, 16), gaps(0));
        assert_eq!(s.advance("a", 1, 16), RESET);
        assert_eq!(s.advance("a", 2, 16), gaps(0));
        assert_eq!(s.len(), 2);
    }
}
