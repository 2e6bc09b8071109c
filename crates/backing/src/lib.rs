//! tandem-backing: the layer under the replicated directory, shared by the primary's mount
//! (`tandem-fs`) and the secondary's applier (`tandem-replica`).
//!
//! - [`FileHandle`]: an inode's identity by kernel file handle (`name_to_handle_at`), which holds
//!   no descriptor and reopens the inode on demand (`open_by_handle_at`);
//! - [`FdCache`] and [`Slot`]: the bounded set of descriptors kept open for the inodes in use,
//!   so that the descriptors of a process serving millions of files stay few;
//! - [`sys`]: the `*at` system calls on a backing directory (one component at a time, no
//!   symlink followed, nothing resolved through a mount of ours).

#![warn(missing_docs)]

mod cache;
mod handle;
pub mod sys;

pub use cache::{CacheStats, FdCache, Slot, Slots};
pub use handle::FileHandle;
