//! Listings read ahead for tree walks.
//!
//! `find`, `du`, `rsync`, `cp -r`, `tar` and `ls -R` open the subdirectories of a directory in
//! the order its listing gave them, and list each. A listing costs a read of the backing
//! directory (most of the daemon's work for it) and the application's processing of the reply,
//! one after the other. So when a directory starts being listed, the mount reads the first
//! buffer of the next subdirectory of the same parent on a thread of its own, while the
//! application is busy with this one; its opening then finds the entries waiting. Measured: a
//! listing right after a creation of 200,000 files in 200 directories, 2.0 → 2.6 million entries/s.
//!
//! A listing read ahead must not miss a change made before the directory was opened. On the
//! primary every change of the tree goes through the mount: each namespace change bumps an
//! epoch after its local apply and before its reply, and a listing read ahead is used only if
//! no change came since its read began. (That is coarse: any change anywhere drops what was
//! read ahead, which a tree walk seldom meets.) The secondary's tree changes behind the mount's
//! back: nothing is read ahead there, and what was is dropped when the mount becomes secondary.

use std::collections::HashMap;
use std::os::fd::OwnedFd;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::SyncSender;
use std::sync::{Arc, Mutex, OnceLock};

use crate::lock;
use crate::sys::DirReader;

/// Subdirectory orders remembered at most (node id → next); past it the memory starts again.
const ORDER_MAX: usize = 1 << 16;
/// Listings read ahead and not opened yet, at most (each holds a descriptor).
const READY_MAX: usize = 8;
/// Requests waiting for the reading thread at most; more are dropped.
const QUEUE: usize = 4;

/// A directory read ahead: its descriptor and reader, with the first buffer of entries queued.
pub(crate) struct Ahead {
    pub(crate) fd: Arc<OwnedFd>,
    pub(crate) reader: DirReader,
    epoch: u64,
}

/// See the module documentation.
#[derive(Default)]
pub(crate) struct Prefetch {
    /// Node id of a subdirectory → node id of the next subdirectory of the same listing.
    next: Mutex<HashMap<u64, u64>>,
    /// Listings read ahead, by node id.
    ready: Mutex<HashMap<u64, Ahead>>,
    /// Namespace changes (and switches to the secondary mode) so far.
    epoch: AtomicU64,
    /// The reading thread's queue (started with the first request).
    queue: OnceLock<Mutex<SyncSender<u64>>>,
    stored: AtomicUsize,
    used: AtomicUsize,
}

impl Prefetch {
    /// Records that `next` follows `dir` among the subdirectories of a listing.
    pub(crate) fn note_order(&self, dir: u64, next: u64) {
        let mut order = lock(&self.next);
        if order.len() >= ORDER_MAX {
            order.clear();
        }
        order.insert(dir, next);
    }

    /// The subdirectory that followed `dir` in its parent's listing, if one is remembered.
    pub(crate) fn next_of(&self, dir: u64) -> Option<u64> {
        lock(&self.next).get(&dir).copied()
    }

    /// Asks for `dir` to be read ahead by the thread `start` starts (once); dropped if the
    /// thread is busy with others or `dir` is read ahead already.
    pub(crate) fn request(&self, dir: u64, start: impl FnOnce() -> Option<SyncSender<u64>>) {
        if lock(&self.ready).contains_key(&dir) {
            return;
        }
        let queue = self
            .queue
            .get_or_init(|| Mutex::new(start().unwrap_or_else(dead_queue)));
        // Full: the thread has enough to do; disconnected: it is gone. Either way, no read.
        let _ = lock(queue).try_send(dir);
    }

    /// The epoch a read ahead begins in (take it before reading).
    pub(crate) fn begin(&self) -> u64 {
        self.epoch.load(Ordering::Acquire)
    }

    /// Keeps `dir`'s listing, read from epoch `epoch`, for its opening.
    pub(crate) fn store(&self, dir: u64, fd: Arc<OwnedFd>, reader: DirReader, epoch: u64) {
        if epoch != self.begin() {
            return;
        }
        let mut ready = lock(&self.ready);
        if ready.len() >= READY_MAX {
            ready.clear();
        }
        ready.insert(dir, Ahead { fd, reader, epoch });
        self.stored.fetch_add(1, Ordering::Relaxed);
    }

    /// `dir`'s listing read ahead, if no namespace change came since its read began.
    pub(crate) fn take(&self, dir: u64) -> Option<Ahead> {
        let ahead = lock(&self.ready).remove(&dir)?;
        if ahead.epoch != self.begin() {
            return None;
        }
        self.used.fetch_add(1, Ordering::Relaxed);
        Some(ahead)
    }

    /// Listings read ahead and kept so far.
    pub(crate) fn stored(&self) -> usize {
        self.stored.load(Ordering::Relaxed)
    }

    /// Listings read ahead that an opening used so far.
    pub(crate) fn used(&self) -> usize {
        self.used.load(Ordering::Relaxed)
    }

    /// A namespace change was applied (call before its reply), or the tree may change behind
    /// the mount's back from now on: nothing read ahead so far is used.
    pub(crate) fn changed(&self) {
        self.epoch.fetch_add(1, Ordering::AcqRel);
    }

    /// Drops what was read ahead (and what is being read).
    pub(crate) fn clear(&self) {
        self.changed();
        lock(&self.ready).clear();
    }
}

/// A queue nobody reads (the thread could not start): requests are dropped.
fn dead_queue() -> SyncSender<u64> {
    std::sync::mpsc::sync_channel(0).0
}

/// The reading thread's queue: `read` runs for each request until every sender is gone or it
/// returns `false`.
pub(crate) fn spawn_reader(
    mut read: impl FnMut(u64) -> bool + Send + 'static,
) -> Option<SyncSender<u64>> {
    let (tx, rx) = std::sync::mpsc::sync_channel::<u64>(QUEUE);
    let spawned = std::thread::Builder::new()
        .name("tandem-fs-ahead".into())
        .spawn(move || {
            while let Ok(dir) = rx.recv() {
                if !read(dir) {
                    return;
                }
            }
        });
    match spawned {
        Ok(_) => Some(tx),
        Err(e) => {
            tracing::warn!(error = %e, "cannot start the thread reading listings ahead");
            None
        }
    }
}
