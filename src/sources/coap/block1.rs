//! Block-wise uploads (RFC 7959 §2.5, Block1): the blocks of one payload, put back
//! together before the payload goes to the pipeline. Pure: time comes in as a parameter.
//!
//! An upload is keyed by `(peer, device, Request-Tag)`. Not by the CoAP token: clients may
//! use a new token for every block (libcoap does), and RFC 9175 §3 made Request-Tag the
//! way to tell concurrent uploads to one resource apart; a client that sends none gets
//! one upload per peer and device, which is what RFC 7959 alone allows.
//!
//! Rules, in the order they are checked:
//! - Size1 (the announced total) or the data so far plus this block above `max_payload`:
//!   4.13 with Size1 = `max_payload`, as early as the first block when Size1 says so.
//! - Block 0 starts (or restarts) an upload; a later block must continue exactly where
//!   the data so far ends (NUM × block size = bytes so far — this also allows a client to
//!   switch to smaller blocks mid-way, §2.5), else 4.08 Request Entity Incomplete and the
//!   upload is forgotten. A block for an upload we do not have is 4.08 as well.
//! - More than `per_peer` uploads from one address, or more than `max_bytes` buffered in
//!   all: 5.03 + Max-Age (memory is bounded whatever clients do).
//! - An upload with no block for `timeout` (EXCHANGE_LIFETIME) is forgotten.
//! - A retransmitted block (same MID) never gets here: the message-ID cache answers it
//!   with the 2.31 it got before.
//!
//! A change of the peer's address mid-upload (NAT rebinding) makes the next block a block
//! of an upload we do not have: 4.08, and the client starts over. Memory per upload is the
//! bytes received so far (capacity grown exactly) plus the key and ≈ 100 bytes.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::Duration;

use coap_lite::ResponseType;
use tokio::time::Instant;

use super::events::Refused;
use super::request::{Block, Refusal};
use super::ReassemblyLimits;

/// One upload's identity.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(crate) struct UploadKey {
    pub peer: SocketAddr,
    pub device: String,
    pub request_tag: Option<Vec<u8>>,
}

#[derive(Debug)]
struct Upload {
    data: Vec<u8>,
    last_block: Instant,
}

/// What to answer a block with.
#[derive(Debug, PartialEq)]
pub(crate) enum Step {
    /// Stored; answer 2.31 Continue.
    Continue,
    /// The last block arrived: the whole payload.
    Complete(Vec<u8>),
    /// An error response (4.08, 4.13).
    Refuse(Refusal),
    /// Out of upload slots or buffer memory: 5.03 + Max-Age.
    Busy,
}

/// Uploads in progress.
#[derive(Debug)]
pub(crate) struct Reassembly {
    uploads: HashMap<UploadKey, Upload>,
    per_peer: HashMap<SocketAddr, usize>,
    /// Capacity of every upload buffer together.
    bytes: usize,
    limits: ReassemblyLimits,
    max_payload: usize,
    last_sweep: Option<Instant>,
}

/// Sweeping for timed-out uploads scans them all, so it runs at most this often.
const SWEEP_EVERY: Duration = Duration::from_secs(1);

impl Reassembly {
    pub(crate) fn new(limits: ReassemblyLimits, max_payload: usize) -> Reassembly {
        Reassembly {
            uploads: HashMap::new(),
            per_peer: HashMap::new(),
            bytes: 0,
            limits,
            max_payload,
            last_sweep: None,
        }
    }

    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.uploads.len()
    }

    #[cfg(test)]
    pub(crate) fn bytes(&self) -> usize {
        self.bytes
    }

    /// Takes one block (its payload length already checked against the block size).
    pub(crate) fn offer(
        &mut self,
        key: UploadKey,
        block: Block,
        size1: Option<u32>,
        payload: &[u8],
        now: Instant,
    ) -> Step {
        self.sweep(now);
        let too_large = Step::Refuse(Refusal::too_large(self.max_payload));
        let Some(offset) = (block.num as usize).checked_mul(block.size()) else {
            self.forget(&key);
            return too_large;
        };
        let total = offset.saturating_add(payload.len());
        if size1.is_some_and(|s| s as usize > self.max_payload) || total > self.max_payload {
            self.forget(&key);
            return too_large;
        }
        if block.num == 0 {
            // A first block starts over, whatever was there.
            self.forget(&key);
            if !block.more {
                return Step::Complete(payload.to_vec());
            }
            let peer_uploads = self.per_peer.get(&key.peer).copied().unwrap_or(0);
            if peer_uploads >= self.limits.per_peer {
                return Step::Busy;
            }
            *self.per_peer.entry(key.peer).or_insert(0) += 1;
            self.uploads.insert(
                key.clone(),
                Upload {
                    data: Vec::new(),
                    last_block: now,
                },
            );
        }
        let Some(upload) = self.uploads.get_mut(&key) else {
            return Step::Refuse(Refusal::new(
                ResponseType::RequestEntityIncomplete,
                Refused::Incomplete,
            ));
        };
        if upload.data.len() != offset {
            self.forget(&key);
            return Step::Refuse(Refusal::new(
                ResponseType::RequestEntityIncomplete,
                Refused::Incomplete,
            ));
        }
        if self.bytes + payload.len() > self.limits.max_bytes {
            self.forget(&key);
            return Step::Busy;
        }
        let before = upload.data.capacity();
        upload.data.reserve_exact(payload.len());
        upload.data.extend_from_slice(payload);
        upload.last_block = now;
        self.bytes = self.bytes + upload.data.capacity() - before;
        if block.more {
            return Step::Continue;
        }
        match self.take(&key) {
            Some(data) => Step::Complete(data),
            None => Step::Busy, // unreachable: the upload was just found
        }
    }

    fn take(&mut self, key: &UploadKey) -> Option<Vec<u8>> {
        let upload = self.uploads.remove(key)?;
        self.bytes -= upload.data.capacity();
        if let Some(n) = self.per_peer.get_mut(&key.peer) {
            *n -= 1;
            if *n == 0 {
                self.per_peer.remove(&key.peer);
            }
        }
        Some(upload.data)
    }

    fn forget(&mut self, key: &UploadKey) {
        let _ = self.take(key);
    }

    /// Forgets uploads idle for longer than the timeout.
    pub(crate) fn sweep(&mut self, now: Instant) {
        if self.last_sweep.is_some_and(|t| now < t + SWEEP_EVERY) {
            return;
        }
        self.last_sweep = Some(now);
        let timeout = self.limits.timeout;
        let stale: Vec<UploadKey> = self
            .uploads
            .iter()
            .filter(|(_, u)| now >= u.last_block + timeout)
            .map(|(k, _)| k.clone())
            .collect();
        for key in stale {
            self.forget(&key);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sources::coap::EXCHANGE_LIFETIME;

    fn key(port: u16, tag: Option<&[u8]>) -> UploadKey {
        UploadKey {
            peer: SocketAddr::from(([10, 0, 0, 1], port)),
            device: "dev-1".into(),
            request_tag: tag.map(<[u8]>::to_vec),
        }
    }

    fn block(num: u32, more: bool) -> Block {
        Block { num, more, szx: 0 } // 16-byte blocks
    }

    fn r(max_bytes: usize) -> Reassembly {
        Reassembly::new(
            ReassemblyLimits {
                per_peer: 2,
                max_bytes,
                timeout: EXCHANGE_LIFETIME,
            },
            40,
        )
    }

    fn incomplete() -> Step {
        Step::Refuse(Refusal::new(
            ResponseType::RequestEntityIncomplete,
            Refused::Incomplete,
        ))
    }

    #[test]
    fn blocks_in_order_make_the_payload() {
        let now = Instant::now();
        let mut r = r(1000);
        assert_eq!(
            r.offer(key(1, None), block(0, true), Some(36), &[1; 16], now),
            Step::Continue
        );
        assert_eq!(
            r.offer(key(1, None), block(1, true), Some(36), &[2; 16], now),
            Step::Continue
        );
        assert_eq!(r.bytes(), 32);
        let mut whole = vec![1; 16];
        whole.extend([2; 16]);
        whole.extend([3; 4]);
        assert_eq!(
            r.offer(key(1, None), block(2, false), Some(36), &[3; 4], now),
            Step::Complete(whole)
        );
        assert_eq!((r.len(), r.bytes()), (0, 0));
        // A single final block needs no buffer.
        assert_eq!(
            r.offer(key(1, None), block(0, false), None, &[9; 5], now),
            Step::Complete(vec![9; 5])
        );
        assert_eq!(r.len(), 0);
    }

    #[test]
    fn smaller_blocks_mid_way_continue_at_the_same_offset() {
        let now = Instant::now();
        let mut r = r(1000);
        let b32 = Block {
            num: 0,
            more: true,
            szx: 1,
        };
        assert_eq!(
            r.offer(key(1, None), b32, None, &[1; 32], now),
            Step::Continue
        );
        // 32 bytes so far = block 2 of 16 bytes.
        assert_eq!(
            r.offer(key(1, None), block(2, false), None, &[2; 3], now),
            Step::Complete([vec![1; 32], vec![2; 3]].concat())
        );
    }

    #[test]
    fn out_of_order_and_unknown_uploads_are_incomplete() {
        let now = Instant::now();
        let mut r = r(1000);
        assert_eq!(
            r.offer(key(1, None), block(1, true), None, &[0; 16], now),
            incomplete()
        );
        assert_eq!(
            r.offer(key(1, None), block(0, true), None, &[0; 16], now),
            Step::Continue
        );
        assert_eq!(
            r.offer(key(1, None), block(2, false), None, &[0; 1], now),
            incomplete()
        );
        // The upload is forgotten: even the right block now is out of context.
        assert_eq!(
            r.offer(key(1, None), block(1, true), None, &[0; 16], now),
            incomplete()
        );
        assert_eq!((r.len(), r.bytes()), (0, 0));
    }

    #[test]
    fn uploads_are_told_apart_by_peer_and_request_tag() {
        let now = Instant::now();
        let mut r = r(1000);
        assert_eq!(
            r.offer(key(1, Some(b"a")), block(0, true), None, &[1; 16], now),
            Step::Continue
        );
        assert_eq!(
            r.offer(key(1, Some(b"b")), block(0, true), None, &[2; 16], now),
            Step::Continue
        );
        // A new port (NAT rebinding) is a different upload.
        assert_eq!(
            r.offer(key(2, Some(b"a")), block(1, false), None, &[3; 1], now),
            incomplete()
        );
        assert_eq!(
            r.offer(key(1, Some(b"b")), block(1, false), None, &[3; 1], now),
            Step::Complete([vec![2; 16], vec![3]].concat())
        );
        assert_eq!(r.len(), 1);
    }

    #[test]
    fn too_large_is_refused_early_and_forgets_the_upload() {
        let now = Instant::now();
        let mut r = r(1000);
        let too_large = Step::Refuse(Refusal::too_large(40));
        assert_eq!(
            r.offer(key(1, None), block(0, true), Some(41), &[0; 16], now),
            too_large
        );
        assert_eq!(r.len(), 0);
        assert_eq!(
            r.offer(key(1, None), block(0, true), None, &[0; 16], now),
            Step::Continue
        );
        assert_eq!(
            r.offer(key(1, None), block(1, true), None, &[0; 16], now),
            Step::Continue
        );
        assert_eq!(
            r.offer(key(1, None), block(2, false), None, &[0; 9], now),
            too_large
        );
        assert_eq!((r.len(), r.bytes()), (0, 0));
        let huge = Block {
            num: 0xF_FFFF,
            more: true,
            szx: 6,
        };
        assert_eq!(
            r.offer(key(1, None), huge, None, &[0; 1024], now),
            too_large
        );
    }

    #[test]
    fn slots_and_memory_are_bounded() {
        let now = Instant::now();
        let mut r = r(40);
        assert_eq!(
            r.offer(key(1, Some(b"a")), block(0, true), None, &[0; 16], now),
            Step::Continue
        );
        assert_eq!(
            r.offer(key(1, Some(b"b")), block(0, true), None, &[0; 16], now),
            Step::Continue
        );
        // Third upload from the same peer.
        assert_eq!(
            r.offer(key(1, Some(b"c")), block(0, true), None, &[0; 16], now),
            Step::Busy
        );
        // Another peer, but only 8 bytes of the 40 left.
        assert_eq!(
            r.offer(key(2, None), block(0, true), None, &[0; 16], now),
            Step::Busy
        );
        assert_eq!((r.len(), r.bytes()), (2, 32));
    }

    #[tokio::test(start_paused = true)]
    async fn idle_uploads_time_out() {
        let mut r = r(1000);
        assert_eq!(
            r.offer(key(1, None), block(0, true), None, &[0; 16], Instant::now()),
            Step::Continue
        );
        tokio::time::advance(EXCHANGE_LIFETIME - Duration::from_secs(1)).await;
        assert_eq!(
            r.offer(key(1, None), block(1, true), None, &[0; 16], Instant::now()),
            Step::Continue
        );
        tokio::time::advance(EXCHANGE_LIFETIME).await;
        r.sweep(Instant::now());
        assert_eq!((r.len(), r.bytes()), (0, 0));
        assert_eq!(
            r.offer(key(1, None), block(2, false), None, &[0; 1], Instant::now()),
            incomplete()
        );
    }
}
