//! The simulated clock: a queue of future events ordered by time. Events due at the same time run
//! in the order they were scheduled, so a run depends only on its seed.

use std::collections::BTreeMap;

use tandem_core::Time;

/// Identifies a scheduled event, to cancel or move it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct EventKey {
    at: Time,
    seq: u64,
}

impl EventKey {
    /// When the event is due.
    pub fn at(self) -> Time {
        self.at
    }
}

/// Future events, earliest first; ties broken by scheduling order.
#[derive(Clone, Debug)]
pub struct EventQueue<E> {
    events: BTreeMap<EventKey, E>,
    next_seq: u64,
}

impl<E> Default for EventQueue<E> {
    fn default() -> EventQueue<E> {
        EventQueue {
            events: BTreeMap::new(),
            next_seq: 0,
        }
    }
}

impl<E> EventQueue<E> {
    /// An empty queue.
    pub fn new() -> EventQueue<E> {
        EventQueue::default()
    }

    /// Schedules `event` at `at`.
    pub fn schedule(&mut self, at: Time, event: E) -> EventKey {
        let key = EventKey {
            at,
            seq: self.next_seq,
        };
        self.next_seq += 1;
        self.events.insert(key, event);
        key
    }

    /// When the next event is due.
    pub fn next_time(&self) -> Option<Time> {
        self.events.keys().next().map(|key| key.at)
    }

    /// Removes and returns the next event.
    pub fn pop(&mut self) -> Option<(Time, E)> {
        self.events.pop_first().map(|(key, event)| (key.at, event))
    }

    /// Removes a scheduled event.
    pub fn cancel(&mut self, key: EventKey) -> Option<E> {
        self.events.remove(&key)
    }

    /// Moves a scheduled event to `at` (it then runs after the events already due at `at`).
    pub fn reschedule(&mut self, key: EventKey, at: Time) -> Option<EventKey> {
        let event = self.events.remove(&key)?;
        Some(self.schedule(at, event))
    }

    /// Every scheduled event, earliest first.
    pub fn iter(&self) -> impl Iterator<Item = (EventKey, &E)> {
        self.events.iter().map(|(key, event)| (*key, event))
    }

    /// Number of scheduled events.
    pub fn len(&self) -> usize {
        self.events.len()
    }

    /// Whether nothing is scheduled.
    pub fn is_empty(&self) -> bool {
        self.events.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn earliest_first_then_scheduling_order() {
        let mut queue = EventQueue::new();
        queue.schedule(Time(5), "late");
        let moved = queue.schedule(Time(1), "moved");
        queue.schedule(Time(2), "first at 2");
        queue.schedule(Time(2), "second at 2");
        let cancelled = queue.schedule(Time(3), "cancelled");
        assert_eq!(queue.cancel(cancelled), Some("cancelled"));
        assert!(queue.reschedule(moved, Time(2)).is_some());
        let order: Vec<_> = std::iter::from_fn(|| queue.pop()).collect();
        assert_eq!(
            order,
            vec![
                (Time(2), "first at 2"),
                (Time(2), "second at 2"),
                (Time(2), "moved"),
                (Time(5), "late")
            ]
        );
    }
}
