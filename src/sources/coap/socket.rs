//! The UDP socket's kernel side: its buffer sizes, and the datagrams the kernel dropped
//! because the receive buffer was full.
//!
//! A burst of uplinks arrives faster than one receive loop drains it whenever the loop is
//! busy for a moment (a group commit answering a thousand ACKs, a scheduler hiccup). The
//! default receive buffer (`net.core.rmem_default`, 208 KiB on most distributions) holds
//! about 1 500 small datagrams; what does not fit is dropped silently, and a CoAP device
//! retransmits only after 2–3 s (RFC 7252 §4.2) — a 2 s latency spike from a 10 ms stall.
//! So the socket asks for a large buffer ([`super::CoapSettings::socket_buffer`]). The
//! kernel grants at most `net.core.rmem_max` / `wmem_max` (it doubles what it grants for its
//! own bookkeeping and reports the doubled value); the gateway logs what it got and warns
//! when that is much less than asked, naming the sysctl.
//!
//! Drops are the `drops` column of the socket's line in `/proc/net/udp` (or `udp6`), found
//! by the socket's inode, polled once a second into `nbiot_udp_receive_drops_total`. Linux
//! only; elsewhere nothing is counted.

use std::time::Duration;

use tokio::net::UdpSocket;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::telemetry::metrics as names;

/// How often the drop counter is read.
const DROPS_POLL: Duration = Duration::from_secs(1);

/// Buffer sizes the kernel granted (as it reports them: twice the usable bytes).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Buffers {
    pub receive: Option<usize>,
    pub send: Option<usize>,
}

/// Asks for `bytes` of receive and send buffer and logs what the kernel granted.
pub(crate) fn set_buffers(socket: &UdpSocket, bytes: usize) -> Buffers {
    let sock = socket2::SockRef::from(socket);
    if bytes > 0 {
        if let Err(e) = sock.set_recv_buffer_size(bytes) {
            warn!(error = %e, requested = bytes, "Cannot set the CoAP socket's receive buffer.");
        }
        if let Err(e) = sock.set_send_buffer_size(bytes) {
            warn!(error = %e, requested = bytes, "Cannot set the CoAP socket's send buffer.");
        }
    }
    let granted = Buffers {
        receive: sock.recv_buffer_size().ok(),
        send: sock.send_buffer_size().ok(),
    };
    // Linux reports twice what it granted; below half the request it was capped.
    if bytes > 0 && granted.receive.is_some_and(|g| g < bytes) {
        warn!(
            requested = bytes,
            granted = granted.receive,
            "CoAP receive buffer capped by the kernel; bursts may be dropped. Raise it with \
             `sysctl -w net.core.rmem_max=N` (and wmem_max)."
        );
    } else {
        info!(
            receive = granted.receive,
            send = granted.send,
            "CoAP socket buffers set."
        );
    }
    granted
}

/// The socket's inode (`/proc/self/fd/N` → `socket:[INODE]`), which names its line in
/// `/proc/net/udp`.
#[cfg(target_os = "linux")]
fn inode(socket: &UdpSocket) -> Option<u64> {
    use std::os::fd::AsRawFd;
    let link = std::fs::read_link(format!("/proc/self/fd/{}", socket.as_raw_fd())).ok()?;
    let link = link.to_str()?;
    link.strip_prefix("socket:[")?
        .strip_suffix(']')?
        .parse()
        .ok()
}

/// The `drops` column of the line with `inode` in a `/proc/net/udp`-format table.
pub(crate) fn drops_in_table(table: &str, inode: u64) -> Option<u64> {
    table.lines().skip(1).find_map(|line| {
        let f: Vec<&str> = line.split_whitespace().collect();
        // sl local rem st tx:rx tr:when retrnsmt uid timeout inode ref pointer drops
        (f.get(9)?.parse::<u64>().ok()? == inode).then(|| f.last()?.parse().ok())?
    })
}

#[cfg(target_os = "linux")]
fn read_drops(inode: u64) -> Option<u64> {
    ["/proc/net/udp", "/proc/net/udp6"].iter().find_map(|file| {
        let table = std::fs::read_to_string(file).ok()?;
        drops_in_table(&table, inode)
    })
}

/// Counts the socket's receive-buffer drops into `nbiot_udp_receive_drops_total` until
/// `shutdown`. Returns at once where the table cannot be read (not Linux, no /proc).
pub(crate) fn spawn_drop_counter(socket: &UdpSocket, shutdown: CancellationToken) {
    #[cfg(target_os = "linux")]
    {
        let Some(inode) = inode(socket) else {
            debug!("CoAP socket inode unknown; receive drops are not counted.");
            return;
        };
        let counter = metrics::counter!(names::UDP_RECEIVE_DROPS, "protocol" => "coap");
        tokio::spawn(async move {
            // Drops before we started (a reused socket) are not ours to count.
            let mut last = read_drops(inode).unwrap_or(0);
            let mut tick = tokio::time::interval(DROPS_POLL);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    // Cancellation-safe: nothing is held between ticks.
                    () = shutdown.cancelled() => return,
                    _ = tick.tick() => {}
                }
                let Some(now) = read_drops(inode) else {
                    continue;
                };
                if now > last {
                    counter.increment(now - last);
                    debug!(
                        dropped = now - last,
                        "CoAP datagrams dropped: receive buffer full."
                    );
                }
                last = now;
            }
        });
    }
    #[cfg(not(target_os = "linux"))]
    {
        let _ = (socket, shutdown, names::UDP_RECEIVE_DROPS);
        debug!("Receive drops are counted on Linux only.");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn drops_are_read_from_the_sockets_line() {
        let table = "\
  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode ref pointer drops
  187: 0100007F:3D83 00000000:0000 07 00000000:00000000 00:00000000 00000000     0        0 41234 2 0000000000000000 17
  200: 00000000:0044 00000000:0000 07 00000000:00000000 00:00000000 00000000     0        0 999 2 0000000000000000 3
";
        assert_eq!(drops_in_table(table, 41234), Some(17));
        assert_eq!(drops_in_table(table, 999), Some(3));
        assert_eq!(drops_in_table(table, 5), None);
    }

    #[tokio::test]
    async fn buffers_are_raised_and_the_socket_is_found() {
        let socket = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let before = socket2::SockRef::from(&socket).recv_buffer_size().unwrap();
        let granted = set_buffers(&socket, 1 << 20);
        // Granted up to the kernel's cap (rmem_max), never less than the default.
        assert!(granted.receive.unwrap() >= before, "{granted:?} < {before}");
        #[cfg(target_os = "linux")]
        {
            let inode = inode(&socket).expect("socket inode");
            assert_eq!(read_drops(inode), Some(0));
        }
    }
}
