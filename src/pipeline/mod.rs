//! The ingest pipeline: from an [`Uplink`] a source received to a durable commit and the
//! acknowledgement the source sends back. (Contract written by the lead; the internals —
//! sharding, decode, group commit — are being built behind it.)
//!
//! ```text
//! source ──submit──▶ shard(device) ──▶ registry lookup → token → decode → per-device state
//!                                           │
//!                                           ▼
//!                       store writer: group commit (raw uplink + readings, one transaction)
//!                                           │
//!                          Outcome ◀────────┘ (oneshot to the source: CoAP 2.04 / PUBACK)
//! ```
//!
//! Every queue is bounded. `submit` never waits: a full shard queue is an immediate
//! [`SubmitError::Overloaded`], which the source turns into a reply the device can act on
//! (CoAP 5.03 + Max-Age; MQTT: no PUBACK, so the broker redelivers).

use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::oneshot;

/// How an uplink arrived (a closed set: it is a metric label).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Transport {
    Coap,
    Mqtt,
}

impl Transport {
    pub fn as_str(self) -> &'static str {
        match self {
            Transport::Coap => "coap",
            Transport::Mqtt => "mqtt",
        }
    }
}

/// One message from a device, as a source received it.
#[derive(Debug)]
pub struct Uplink {
    /// The device id from the CoAP path or the MQTT topic.
    pub device: String,
    /// The payload exactly as sent (transport encoding still applied).
    pub payload: Bytes,
    pub transport: Transport,
    /// The CoAP peer (None for MQTT, where the broker is the peer).
    pub peer: Option<SocketAddr>,
    /// Receive time, milliseconds since the Unix epoch (UTC).
    pub received_at_ms: i64,
    /// The device token presented (CoAP `?t=`), if any.
    pub token: Option<String>,
    /// Where the outcome goes once it is decided; `None` for at-most-once (CoAP NON,
    /// MQTT QoS 0): the pipeline then commits without telling anyone.
    pub reply: Option<oneshot::Sender<Outcome>>,
}

/// What happened to an uplink; sent after the commit when it was committed.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    /// Raw payload and readings are durable. Reply 2.04 / PUBACK.
    Committed {
        readings: usize,
        /// A pending downlink for the device (CoAP piggybacks it on the ACK).
        downlink: Option<Bytes>,
    },
    /// Committed as a raw row with its error (a fixed codec can re-decode it later), but the
    /// device should know: CoAP 4.00 with a short diagnostic; MQTT PUBACK (it is stored).
    Undecodable { code: &'static str, message: String },
    /// Not committed: nothing to keep.
    Rejected(Reject),
}

/// Why an uplink was not committed (a closed set: it is the `reason` metric label).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reject {
    UnknownDevice,
    BadToken,
    /// The device's profile is not loaded (e.g. removed by a reload).
    NoProfile,
    /// The store is failing or backlogged; retry after this long.
    Unavailable {
        retry_after: Duration,
    },
}

impl Reject {
    pub fn reason(self) -> &'static str {
        match self {
            Reject::UnknownDevice => "unknown_device",
            Reject::BadToken => "bad_token",
            Reject::NoProfile => "no_profile",
            Reject::Unavailable { .. } => "unavailable",
        }
    }
}

/// Why `submit` refused an uplink without queueing it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum SubmitError {
    #[error("pipeline overloaded; retry after {retry_after:?}")]
    Overloaded { retry_after: Duration },
    #[error("pipeline is shutting down")]
    Closed,
}

/// What sources hold to hand uplinks to the pipeline. Cheap to clone.
///
/// A device always maps to the same shard, so its uplinks are processed in arrival order
/// and its state needs no lock.
#[derive(Debug, Clone)]
pub struct PipelineHandle {
    shards: std::sync::Arc<[tokio::sync::mpsc::Sender<Uplink>]>,
    retry_after: Duration,
}

impl PipelineHandle {
    /// A handle over the shards' queues (the pipeline builds them; tests may pass their
    /// own channel and play the pipeline).
    pub fn from_shards(
        shards: Vec<tokio::sync::mpsc::Sender<Uplink>>,
        retry_after: Duration,
    ) -> Self {
        assert!(!shards.is_empty(), "a pipeline has at least one shard");
        PipelineHandle {
            shards: shards.into(),
            retry_after,
        }
    }

    /// The shard a device belongs to (FNV-1a of its id: stable, cheap, well spread).
    pub fn shard_of(&self, device: &str) -> usize {
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        for b in device.bytes() {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
        (h % self.shards.len() as u64) as usize
    }

    /// Queues an uplink without waiting. A full queue is an immediate `Overloaded`: the
    /// caller answers the device (5.03 + Max-Age, or withholds the PUBACK) and counts it.
    pub fn submit(&self, uplink: Uplink) -> Result<(), SubmitError> {
        use tokio::sync::mpsc::error::TrySendError;
        let shard = &self.shards[self.shard_of(&uplink.device)];
        match shard.try_send(uplink) {
            Ok(()) => Ok(()),
            Err(TrySendError::Full(_)) => Err(SubmitError::Overloaded {
                retry_after: self.retry_after,
            }),
            Err(TrySendError::Closed(_)) => Err(SubmitError::Closed),
        }
    }

    /// Queues an uplink, waiting for room (MQTT: the broker holds unacked messages anyway,
    /// so waiting is the right backpressure there). Cancel-safe: on cancellation the
    /// uplink is dropped unqueued, and its reply sender with it.
    pub async fn submit_wait(&self, uplink: Uplink) -> Result<(), SubmitError> {
        let shard = &self.shards[self.shard_of(&uplink.device)];
        shard.send(uplink).await.map_err(|_| SubmitError::Closed)
    }
}
