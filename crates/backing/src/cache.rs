//! A bounded set of open descriptors: each inode keeps a [`Slot`] that may hold an open
//! descriptor of it; the [`FdCache`] counts the filled slots and, past its capacity, empties the
//! least recently used ones (CLOCK: a slot used since the hand last passed gets a second chance).
//! A hit costs one uncontended lock of the slot itself; only a miss takes the cache's lock.
//!
//! A descriptor handed out stays open while its user holds it (it is an `Arc`), even if its slot
//! is emptied meanwhile: the number of open descriptors is at most the capacity plus those in use
//! at that moment. Pinned slots (an inode that must stay open: unlinked but still used) are
//! never emptied and not counted.

use std::collections::VecDeque;
use std::io;
use std::os::fd::OwnedFd;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, Weak};

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // Every critical section here leaves its data consistent at each step.
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Where an inode may keep one open descriptor. 24 bytes.
#[derive(Debug, Default)]
pub struct Slot {
    fd: Mutex<Option<Arc<OwnedFd>>>,
    /// Used since the clock hand last passed.
    referenced: AtomicBool,
    /// Pin count: a pinned slot is never emptied.
    pins: AtomicU32,
}

impl Slot {
    /// A slot holding `fd` (an inode opened before it was known), pinned or not. A slot filled
    /// here is not counted by any cache: use it for descriptors kept for the owner's lifetime.
    pub fn with(fd: Arc<OwnedFd>, pinned: bool) -> Slot {
        Slot {
            fd: Mutex::new(Some(fd)),
            referenced: AtomicBool::new(true),
            pins: AtomicU32::new(u32::from(pinned)),
        }
    }

    /// The descriptor, if the slot holds one (marks it used).
    pub fn get(&self) -> Option<Arc<OwnedFd>> {
        let fd = lock(&self.fd).clone();
        if fd.is_some() {
            self.referenced.store(true, Ordering::Relaxed);
        }
        fd
    }

    /// Whether the slot holds a descriptor.
    pub fn is_open(&self) -> bool {
        lock(&self.fd).is_some()
    }

    /// Keeps the slot's descriptor open until [`Slot::unpin`] (the slot must be filled for the
    /// pin to keep anything: pin after a successful [`FdCache::get`]).
    pub fn pin(&self) {
        self.pins.fetch_add(1, Ordering::AcqRel);
    }

    /// Undoes one [`Slot::pin`].
    pub fn unpin(&self) {
        let _ = self
            .pins
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| n.checked_sub(1));
    }

    /// Whether the slot is pinned.
    pub fn is_pinned(&self) -> bool {
        self.pins.load(Ordering::Acquire) > 0
    }
}

/// Something that owns slots (an inode entry); the cache reaches them through a weak reference.
pub trait Slots: Send + Sync {
    /// The slot number `index` (as given to [`FdCache::get`]).
    fn slot(&self, index: u8) -> &Slot;
}

/// The bounded set of filled slots. See the module documentation.
pub struct FdCache {
    capacity: usize,
    /// Filled slots in the order they were filled or given a second chance.
    ring: Mutex<VecDeque<(Weak<dyn Slots>, u8)>>,
    /// Filled slots counted in the ring (some may have been dropped with their owner since).
    open: AtomicUsize,
    hits: AtomicUsize,
    misses: AtomicUsize,
    evictions: AtomicUsize,
}

impl std::fmt::Debug for FdCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FdCache")
            .field("capacity", &self.capacity)
            .field("stats", &self.stats())
            .finish()
    }
}

/// Counters of a cache.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CacheStats {
    /// Most slots kept filled.
    pub capacity: usize,
    /// Slots filled now (an upper bound).
    pub open: usize,
    /// Lookups that found the slot filled.
    pub hits: usize,
    /// Lookups that opened a descriptor (not counting [`FdCache::insert`]).
    pub misses: usize,
    /// Slots emptied to stay within the capacity.
    pub evictions: usize,
}

impl FdCache {
    /// A cache keeping at most `capacity` slots filled (at least 1).
    pub fn new(capacity: usize) -> FdCache {
        FdCache {
            capacity: capacity.max(1),
            ring: Mutex::new(VecDeque::new()),
            open: AtomicUsize::new(0),
            hits: AtomicUsize::new(0),
            misses: AtomicUsize::new(0),
            evictions: AtomicUsize::new(0),
        }
    }

    /// The descriptor in `owner`'s slot `index`, else one `open` makes, kept in the slot (and
    /// another slot emptied if the cache is full).
    pub fn get<T: Slots + 'static>(
        &self,
        owner: &Arc<T>,
        index: u8,
        open: impl FnOnce() -> io::Result<OwnedFd>,
    ) -> io::Result<Arc<OwnedFd>> {
        let slot = owner.slot(index);
        if let Some(fd) = slot.get() {
            self.hits.fetch_add(1, Ordering::Relaxed);
            return Ok(fd);
        }
        self.misses.fetch_add(1, Ordering::Relaxed);
        Ok(self.insert(owner, index, open()?))
    }

    /// Keeps `fd`, just opened for `owner` (a lookup's), in its slot `index`, unless the slot is
    /// filled already; returns the slot's descriptor.
    pub fn insert<T: Slots + 'static>(
        &self,
        owner: &Arc<T>,
        index: u8,
        fd: OwnedFd,
    ) -> Arc<OwnedFd> {
        let slot = owner.slot(index);
        let fresh = Arc::new(fd);
        {
            let mut current = lock(&slot.fd);
            if let Some(fd) = current.as_ref() {
                // Another thread filled it meanwhile: use theirs, close ours.
                return fd.clone();
            }
            *current = Some(fresh.clone());
        }
        slot.referenced.store(true, Ordering::Relaxed);
        let weak: Weak<dyn Slots> = Arc::downgrade(owner) as Weak<dyn Slots>;
        let mut ring = lock(&self.ring);
        ring.push_back((weak, index));
        let open = self.open.fetch_add(1, Ordering::AcqRel) + 1;
        if open > self.capacity {
            self.evict(&mut ring, open - self.capacity);
        }
        fresh
    }

    /// Empties `n` slots (or fewer, when every slot is pinned or used since the last pass).
    fn evict(&self, ring: &mut VecDeque<(Weak<dyn Slots>, u8)>, mut n: usize) {
        // Two passes at most: the first clears the `referenced` bits it meets.
        let mut budget = ring.len() * 2;
        while n > 0 && budget > 0 {
            budget -= 1;
            let Some((weak, index)) = ring.pop_front() else {
                break;
            };
            let Some(owner) = weak.upgrade() else {
                // Its owner is gone, and its descriptor with it.
                self.open.fetch_sub(1, Ordering::AcqRel);
                n -= 1;
                continue;
            };
            let slot = owner.slot(index);
            if slot.is_pinned() || slot.referenced.swap(false, Ordering::Relaxed) {
                ring.push_back((weak, index));
                continue;
            }
            let closed = lock(&slot.fd).take();
            self.open.fetch_sub(1, Ordering::AcqRel);
            if closed.is_some() {
                self.evictions.fetch_add(1, Ordering::Relaxed);
            }
            n -= 1;
        }
    }

    /// Empties the slot `index` of `owner` now (its inode is gone), if it is not pinned.
    pub fn close(&self, owner: &dyn Slots, index: u8) {
        let slot = owner.slot(index);
        if !slot.is_pinned() {
            // Counted until the ring passes over it.
            lock(&slot.fd).take();
        }
    }

    /// The counters.
    pub fn stats(&self) -> CacheStats {
        CacheStats {
            capacity: self.capacity,
            open: self.open.load(Ordering::Acquire),
            hits: self.hits.load(Ordering::Relaxed),
            misses: self.misses.load(Ordering::Relaxed),
            evictions: self.evictions.load(Ordering::Relaxed),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Node(Slot);
    impl Slots for Node {
        fn slot(&self, _: u8) -> &Slot {
            &self.0
        }
    }

    fn null() -> io::Result<OwnedFd> {
        Ok(rustix::fs::open(
            "/dev/null",
            rustix::fs::OFlags::RDONLY,
            0.into(),
        )?)
    }

    #[test]
    fn at_most_capacity_slots_stay_filled() {
        let cache = FdCache::new(8);
        let nodes: Vec<Arc<Node>> = (0..100).map(|_| Arc::new(Node(Slot::default()))).collect();
        for n in &nodes {
            cache.get(n, 0, null).expect("open");
            assert!(nodes.iter().filter(|n| n.0.is_open()).count() <= 8);
        }
        assert_eq!(nodes.iter().filter(|n| n.0.is_open()).count(), 8);
        let stats = cache.stats();
        assert_eq!((stats.misses, stats.evictions, stats.open), (100, 92, 8));
        // A hit does not open.
        let last = nodes.last().expect("node");
        cache
            .get(last, 0, || panic!("a hit must not open"))
            .expect("hit");
        assert_eq!(cache.stats().hits, 1);
    }

    #[test]
    fn recently_used_and_pinned_slots_stay() {
        let cache = FdCache::new(4);
        let nodes: Vec<Arc<Node>> = (0..4).map(|_| Arc::new(Node(Slot::default()))).collect();
        for n in &nodes {
            cache.get(n, 0, null).expect("open");
        }
        nodes[0].0.pin();
        for _ in 0..50 {
            let other = Arc::new(Node(Slot::default()));
            cache.get(&other, 0, null).expect("open");
            cache.get(&nodes[1], 0, null).expect("hit or reopen");
        }
        assert!(nodes[0].0.is_open(), "a pinned slot was emptied");
        assert!(
            nodes[1].0.is_open(),
            "the slot used between misses was emptied"
        );
        nodes[0].0.unpin();
        assert!(!nodes[0].0.is_pinned());
    }

    #[test]
    fn dropped_owners_free_their_place() {
        let cache = FdCache::new(2);
        for _ in 0..10 {
            let n = Arc::new(Node(Slot::default()));
            cache.get(&n, 0, null).expect("open");
        }
        assert!(cache.stats().open <= 2);
        assert_eq!(cache.stats().evictions, 0, "nothing alive was emptied");
    }
}
