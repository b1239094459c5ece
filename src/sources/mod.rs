//! Sources: the protocol listeners that take uplinks in from devices and hand each one to
//! the [`pipeline`](crate::pipeline) as an [`Uplink`](crate::pipeline::Uplink). Each source
//! owns its wire protocol (framing, retransmission, duplicate detection, replies) and
//! nothing after `submit`.

pub mod broker;
pub mod coap;
pub mod mqtt;
