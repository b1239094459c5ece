//! The ack FIFO of the MQTT source (no I/O): every QoS 1 message of the current connection
//! in arrival order, each waiting for its pipeline outcome or decided, and the rule that
//! turns an outcome into an ack or a withheld message. Acks leave from the head only, so
//! they go out in the order the PUBLISHes arrived (MQTT 3.1.1 §4.6).

use std::collections::VecDeque;
use std::time::Duration;

use rumqttc::{Publish, QoS};
use tokio::sync::oneshot;

use crate::pipeline::{Outcome, Reject};

/// What to do with a QoS 1 message once its fate is known.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Verdict {
    Ack,
    /// Do not acknowledge; resume the session after this long (None: the backoff's max).
    Withhold {
        retry_after: Option<Duration>,
    },
}

/// The verdict for an outcome (None: the reply was dropped undecided). The pipeline counts
/// the rejections it decides (unknown device, bad token, no profile, unavailable); only the
/// source's own decision — a reply dropped undecided — is counted here.
pub(super) fn verdict(outcome: Option<Outcome>, shutting_down: &metrics::Counter) -> Verdict {
    match outcome {
        Some(Outcome::Committed { .. } | Outcome::Undecodable { .. }) => Verdict::Ack,
        // Can never succeed: acknowledge, so it does not block the session.
        Some(Outcome::Rejected(Reject::UnknownDevice | Reject::BadToken | Reject::NoProfile)) => {
            Verdict::Ack
        }
        Some(Outcome::Rejected(Reject::Unavailable { retry_after })) => Verdict::Withhold {
            retry_after: Some(retry_after),
        },
        // The pipeline dropped the reply without deciding: it is shutting down.
        None => {
            shutting_down.increment(1);
            Verdict::Withhold { retry_after: None }
        }
    }
}

enum SlotState {
    Waiting(oneshot::Receiver<Outcome>),
    Decided(Verdict),
}

struct Slot {
    pkid: u16,
    qos: QoS,
    state: SlotState,
}

/// QoS 1 messages of the current connection in arrival order, each waiting for its
/// outcome or decided. Acks leave from the head only, so they go out in arrival order.
#[derive(Default)]
pub(super) struct AckQueue {
    slots: VecDeque<Slot>,
}

impl AckQueue {
    pub(super) fn len(&self) -> usize {
        self.slots.len()
    }

    pub(super) fn clear(&mut self) {
        self.slots.clear();
    }

    /// A slot waiting for the pipeline; the returned sender is the uplink's reply.
    pub(super) fn push_waiting(&mut self, pkid: u16, qos: QoS) -> oneshot::Sender<Outcome> {
        let (tx, rx) = oneshot::channel();
        self.slots.push_back(Slot {
            pkid,
            qos,
            state: SlotState::Waiting(rx),
        });
        tx
    }

    /// A slot decided on arrival (a message refused before the pipeline).
    pub(super) fn push_decided(&mut self, pkid: u16, qos: QoS, verdict: Verdict) {
        self.slots.push_back(Slot {
            pkid,
            qos,
            state: SlotState::Decided(verdict),
        });
    }

    /// True when the head waits for an outcome (the only one worth awaiting: nothing
    /// behind it can be acknowledged first).
    pub(super) fn front_waiting(&self) -> bool {
        matches!(
            self.slots.front(),
            Some(Slot {
                state: SlotState::Waiting(_),
                ..
            })
        )
    }

    /// The head's outcome (None: the reply was dropped undecided). Cancellation-safe:
    /// awaiting `&mut Receiver` leaves an outcome that arrives later in the channel.
    /// Pending forever if the head is not waiting.
    pub(super) async fn next_outcome(&mut self) -> Option<Outcome> {
        match self.slots.front_mut() {
            Some(Slot {
                state: SlotState::Waiting(rx),
                ..
            }) => rx.await.ok(),
            _ => std::future::pending().await,
        }
    }

    /// Decides the head (after [`AckQueue::next_outcome`]).
    pub(super) fn decide_front(&mut self, verdict: Verdict) {
        if let Some(slot) = self.slots.front_mut() {
            slot.state = SlotState::Decided(verdict);
        }
    }

    /// Moves the acks that may go out now, in order, into `out`: the run of decided
    /// `Ack`s at the head, deciding waiting slots whose outcome has already arrived with
    /// `decide`. Stops at a slot still waiting, or returns the head's `Withhold` (which
    /// stays at the head: nothing behind it may be acknowledged before it).
    pub(super) fn release(
        &mut self,
        out: &mut Vec<(u16, QoS)>,
        mut decide: impl FnMut(Option<Outcome>) -> Verdict,
    ) -> Option<Verdict> {
        while let Some(slot) = self.slots.front_mut() {
            match &mut slot.state {
                SlotState::Waiting(rx) => match rx.try_recv() {
                    Ok(outcome) => slot.state = SlotState::Decided(decide(Some(outcome))),
                    Err(oneshot::error::TryRecvError::Empty) => return None,
                    Err(oneshot::error::TryRecvError::Closed) => {
                        slot.state = SlotState::Decided(decide(None))
                    }
                },
                SlotState::Decided(Verdict::Ack) => {
                    out.push((slot.pkid, slot.qos));
                    self.slots.pop_front();
                }
                SlotState::Decided(w @ Verdict::Withhold { .. }) => return Some(*w),
            }
        }
        None
    }
}

/// The PUBACK (or PUBREC for a broker that sent QoS 2) rumqttc builds from a publish.
pub(super) fn ack_packet(pkid: u16, qos: QoS) -> Publish {
    let mut p = Publish::new("", qos, Vec::new());
    p.pkid = pkid;
    p
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    fn committed() -> Outcome {
        Outcome::Committed {
            readings: 1,
            downlink: None,
        }
    }

    fn release(q: &mut AckQueue, m: &metrics::Counter) -> (Vec<u16>, Option<Verdict>) {
        let mut out = Vec::new();
        let w = q.release(&mut out, |o| verdict(o, m));
        (out.into_iter().map(|(p, _)| p).collect(), w)
    }

    #[test]
    fn acks_leave_in_arrival_order_whatever_order_outcomes_come_in() {
        let m = metrics::Counter::noop();
        let mut q = AckQueue::default();
        let r1 = q.push_waiting(1, QoS::AtLeastOnce);
        let r2 = q.push_waiting(2, QoS::AtLeastOnce);
        q.push_decided(3, QoS::AtLeastOnce, Verdict::Ack); // unmatched topic
        let r4 = q.push_waiting(4, QoS::AtLeastOnce);
        // 4 and 2 finish first: nothing may go out before 1.
        r4.send(committed()).unwrap();
        r2.send(Outcome::Rejected(Reject::UnknownDevice)).unwrap();
        assert_eq!(release(&mut q, &m), (vec![], None));
        assert!(q.front_waiting());
        // 1 finishes: 1, 2, 3, 4 go out, in that order.
        r1.send(Outcome::Undecodable {
            code: "short",
            message: "too short".into(),
        })
        .unwrap();
        assert_eq!(release(&mut q, &m), (vec![1, 2, 3, 4], None));
        assert_eq!(q.len(), 0);
    }

    #[test]
    fn a_withheld_message_stops_the_release_at_its_slot() {
        let m = metrics::Counter::noop();
        let mut q = AckQueue::default();
        let r1 = q.push_waiting(1, QoS::AtLeastOnce);
        let r2 = q.push_waiting(2, QoS::AtLeastOnce);
        let r3 = q.push_waiting(3, QoS::AtLeastOnce);
        r1.send(committed()).unwrap();
        r2.send(Outcome::Rejected(Reject::Unavailable {
            retry_after: Duration::from_secs(2),
        }))
        .unwrap();
        r3.send(committed()).unwrap();
        let want = Verdict::Withhold {
            retry_after: Some(Duration::from_secs(2)),
        };
        assert_eq!(release(&mut q, &m), (vec![1], Some(want)));
        // It stays at the head: asking again releases nothing behind it.
        assert_eq!(release(&mut q, &m), (vec![], Some(want)));
        assert_eq!(q.len(), 2);
    }

    #[test]
    fn a_dropped_reply_is_withheld_not_acked() {
        let m = metrics::Counter::noop();
        let mut q = AckQueue::default();
        drop(q.push_waiting(9, QoS::AtLeastOnce));
        assert_eq!(
            release(&mut q, &m),
            (vec![], Some(Verdict::Withhold { retry_after: None }))
        );
    }

    #[tokio::test]
    async fn next_outcome_awaits_only_the_head() {
        let m = metrics::Counter::noop();
        let mut q = AckQueue::default();
        let r1 = q.push_waiting(1, QoS::AtLeastOnce);
        let r2 = q.push_waiting(2, QoS::AtLeastOnce);
        r2.send(committed()).unwrap();
        // The head has no outcome yet: next_outcome stays pending.
        let pending = tokio::time::timeout(Duration::from_millis(20), q.next_outcome()).await;
        assert!(pending.is_err());
        r1.send(committed()).unwrap();
        let o = q.next_outcome().await;
        q.decide_front(verdict(o, &m));
        assert_eq!(release(&mut q, &m), (vec![1, 2], None));
    }

    #[test]
    fn verdicts() {
        let m = metrics::Counter::noop();
        let v = |o| verdict(Some(o), &m);
        assert_eq!(v(committed()), Verdict::Ack);
        for r in [Reject::UnknownDevice, Reject::BadToken, Reject::NoProfile] {
            assert_eq!(v(Outcome::Rejected(r)), Verdict::Ack, "{r:?}");
        }
        assert_eq!(
            v(Outcome::Rejected(Reject::Unavailable {
                retry_after: Duration::from_secs(1)
            })),
            Verdict::Withhold {
                retry_after: Some(Duration::from_secs(1))
            }
        );
        assert_eq!(verdict(None, &m), Verdict::Withhold { retry_after: None });
    }

    #[test]
    fn ack_packet_is_a_puback_for_qos1() {
        let p = ack_packet(77, QoS::AtLeastOnce);
        assert_eq!((p.pkid, p.qos), (77, QoS::AtLeastOnce));
        assert_eq!(p.payload, Bytes::new());
    }
}
