//! Rate-limited reporting of refused input ([`NetEvent::Refused`]).
//!
//! Anyone who can reach the ports can make us refuse packets or connections, as fast as the
//! network allows. Every refusal is logged at debug level, but at most one [`NetEvent::Refused`]
//! per `(channel, source IP, kind of refusal)` is emitted per [`REFUSAL_WINDOW`]; the next one
//! that gets through says how many were suppressed in between. The table of sources is bounded
//! (spoofed UDP sources could otherwise grow it without limit).

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

use tokio::sync::mpsc;

use crate::NetEvent;

/// At most one refusal event per source, channel and kind within this window.
pub const REFUSAL_WINDOW: Duration = Duration::from_secs(10);

/// Largest number of sources remembered at a time.
const MAX_SOURCES: usize = 4096;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
struct Key {
    channel: &'static str,
    ip: IpAddr,
    kind: &'static str,
}

#[derive(Debug)]
struct Entry {
    last_emitted: Instant,
    suppressed: u64,
}

/// The pure rate-limiting table (no I/O, explicit clock), unit-tested below.
#[derive(Debug, Default)]
struct Limiter {
    entries: HashMap<Key, Entry>,
}

impl Limiter {
    /// Returns `Some(number of refusals suppressed since the last emitted one)` when this
    /// refusal must be emitted, `None` when it is suppressed.
    fn admit(&mut self, key: Key, now: Instant) -> Option<u64> {
        if let Some(entry) = self.entries.get_mut(&key) {
            if now.saturating_duration_since(entry.last_emitted) < REFUSAL_WINDOW {
                entry.suppressed = entry.suppressed.saturating_add(1);
                return None;
            }
            let suppressed = entry.suppressed;
            entry.last_emitted = now;
            entry.suppressed = 0;
            return Some(suppressed);
        }
        if self.entries.len() >= MAX_SOURCES {
            self.entries.retain(|_, entry| {
                now.saturating_duration_since(entry.last_emitted) < REFUSAL_WINDOW
            });
            if self.entries.len() >= MAX_SOURCES {
                // Flooded from many sources at once: stay quiet rather than grow.
                return None;
            }
        }
        self.entries.insert(
            key,
            Entry {
                last_emitted: now,
                suppressed: 0,
            },
        );
        Some(0)
    }
}

/// Emits rate-limited [`NetEvent::Refused`] events; shared by all tasks of one `Net`.
#[derive(Debug)]
pub(crate) struct Reporter {
    events: mpsc::Sender<NetEvent>,
    limiter: Mutex<Limiter>,
}

impl Reporter {
    pub(crate) fn new(events: mpsc::Sender<NetEvent>) -> Reporter {
        Reporter {
            events,
            limiter: Mutex::new(Limiter::default()),
        }
    }

    /// Reports that input from `from` on `channel` ("udp" or "tcp") was refused.
    ///
    /// `kind` is a short static class of the refusal (rate limiting is per class, so that a
    /// source that sends garbage and then uses a wrong secret is reported for both); `reason`
    /// is the human-readable text.
    pub(crate) fn refuse(
        &self,
        from: SocketAddr,
        channel: &'static str,
        kind: &'static str,
        reason: String,
    ) {
        tracing::debug!(%from, channel, kind, %reason, "refused");
        let key = Key {
            channel,
            ip: from.ip().to_canonical(),
            kind,
        };
        let admitted = self
            .limiter
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .admit(key, Instant::now());
        let Some(suppressed) = admitted else {
            return;
        };
        let reason = if suppressed == 0 {
            reason
        } else {
            format!(
                "{reason} ({suppressed} similar refusals from this address suppressed in the last {} s)",
                REFUSAL_WINDOW.as_secs()
            )
        };
        // Refusals are advisory: if the consumer is behind, drop rather than block the network
        // tasks (which are the ones being flooded).
        if let Err(error) = self.events.try_send(NetEvent::Refused {
            from,
            channel,
            reason,
        }) {
            tracing::debug!(%error, "refusal event dropped");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(ip: [u8; 4], kind: &'static str) -> Key {
        Key {
            channel: "udp",
            ip: IpAddr::from(ip),
            kind,
        }
    }

    #[test]
    fn one_event_per_window_with_suppressed_count() {
        let mut limiter = Limiter::default();
        let start = Instant::now();
        assert_eq!(limiter.admit(key([10, 0, 0, 1], "garbage"), start), Some(0));
        for step in 1..=100u64 {
            let now = start + Duration::from_millis(step * 10);
            assert_eq!(limiter.admit(key([10, 0, 0, 1], "garbage"), now), None);
        }
        // Other sources and other kinds are independent.
        assert_eq!(limiter.admit(key([10, 0, 0, 2], "garbage"), start), Some(0));
        assert_eq!(limiter.admit(key([10, 0, 0, 1], "auth"), start), Some(0));
        let later = start + REFUSAL_WINDOW + Duration::from_millis(1);
        assert_eq!(
            limiter.admit(key([10, 0, 0, 1], "garbage"), later),
            Some(100)
        );
        assert_eq!(limiter.admit(key([10, 0, 0, 1], "garbage"), later), None);
    }

    #[test]
    fn table_is_bounded() {
        let mut limiter = Limiter::default();
        let start = Instant::now();
        for index in 0..(MAX_SOURCES as u32 + 100) {
            let _ = limiter.admit(key(index.to_be_bytes(), "garbage"), start);
        }
        assert!(limiter.entries.len() <= MAX_SOURCES);
        // Once the window has passed, old entries make room for new sources.
        let later = start + REFUSAL_WINDOW;
        assert_eq!(
            limiter.admit(key([192, 0, 2, 1], "garbage"), later),
            Some(0)
        );
        assert!(limiter.entries.len() <= MAX_SOURCES);
    }
}
