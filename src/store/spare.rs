//! The spare segment: the next segment, created and filled with zeros ahead of time.
//!
//! A segment preallocated with `fallocate` holds *unwritten* extents, and the first write into
//! each of them changes file-system metadata, so every group commit's fdatasync then waits for a
//! journal commit as well as the data. A segment whose zeros were written and synced in advance
//! has no such metadata left to change: measured on ext4 with 10 KiB records, write +
//! fdatasync took 99 µs against 163 µs on a fallocated file. Writing the zeros takes a segment's
//! worth of disk bandwidth, so it happens in the background, a piece at a time with pauses
//! (the caller's), while the active segment fills; a roll then only renames the spare.
//!
//! The trade, measured with loadgen on this project's 2-core machine (10 KiB, 32 connections):
//! closed-loop ingest 6,200-6,600 msgs/s at one message per connection against 5,870 without
//! spares, 11,700-12,400 against 11,100 with 100 per connection; but open loop at 6,200 msgs/s
//! has a p99 of 11-15 ms against 5-7 ms, from commits that meet a piece of zeros at the disk.
//!
//! A spare is named `spare-<random>.tmp`, never a segment name, so a crash can never leave one
//! that recovery mistakes for a segment; recovery removes leftover spares.

use std::cell::{Cell, RefCell};
use std::rc::Rc;

use super::backend::{SegmentDir, SegmentFile};
use super::wait::Notify;
use super::{io_error, Store, StoreError};

/// Zeros are written and synced in pieces this large, so that the writeback of a whole
/// segment never lands on the disk at once in front of the live segment's group commits
/// (with ext4's ordered data mode, a journal commit also waits for every newly allocated
/// block to be written). Measured on this project's ext4 disk: 64 MiB synced 1 MiB at a time
/// took 0.56 ms per piece, 38 ms in all; 8 MiB pieces took 23 ms each, and group commits
/// stuck behind them took the open-loop p99 of 10 KiB ingest at 6,200 msgs/s from 5 to
/// 53 ms.
const ZERO_PIECE_BYTES: u64 = 1 << 20;

/// A zero-filled, synced file waiting to become the next segment.
pub(super) struct Spare<F> {
    pub(super) name: String,
    pub(super) file: Rc<F>,
    pub(super) size_bytes: u64,
}

/// Whether a spare exists or is being made, and who waits for one to be needed.
pub(super) struct SpareSlot<F> {
    ready: RefCell<Option<Spare<F>>>,
    preparing: Cell<bool>,
    /// Woken when a roll takes the spare.
    taken: Notify,
}

impl<F> Default for SpareSlot<F> {
    fn default() -> Self {
        SpareSlot {
            ready: RefCell::new(None),
            preparing: Cell::new(false),
            taken: Notify::default(),
        }
    }
}

/// Whether `file_name` is a spare this module made.
pub(super) fn is_spare_name(file_name: &str) -> bool {
    file_name.starts_with("spare-") && file_name.ends_with(".tmp")
}

/// Clears `preparing` however the preparation ends (done, failed or dropped).
struct Preparing<'a, D: SegmentDir> {
    store: &'a Store<D>,
}

impl<D: SegmentDir> Drop for Preparing<'_, D> {
    fn drop(&mut self) {
        self.store.spare.preparing.set(false);
    }
}

impl<D: SegmentDir> Store<D> {
    /// Resolves once no spare segment exists and none is being made.
    pub async fn spare_wanted(&self) {
        while self.spare.ready.borrow().is_some() || self.spare.preparing.get() {
            self.spare.taken.wait().await;
        }
    }

    /// Creates the spare segment, writes its zeros and syncs them, awaiting `pause()` after
    /// every piece so that the writing spreads out between the live segment's commits; a no-op
    /// while one exists or is being made. On failure the partial file is removed.
    pub async fn prepare_spare<P, W>(&self, pause: P) -> Result<(), StoreError>
    where
        P: Fn() -> W,
        W: std::future::Future<Output = ()>,
    {
        if self.spare.ready.borrow().is_some() || self.spare.preparing.replace(true) {
            return Ok(());
        }
        let _preparing = Preparing { store: self };
        let name = format!("spare-{:016x}.tmp", rand::random::<u64>());
        let size_bytes = self.opts.segment_size_bytes;
        let file = self
            .dir
            .create(&name, size_bytes)
            .await
            .map_err(io_error("create spare segment"))?;
        if let Err(error) = zero_fill(&file, size_bytes, pause).await {
            let _ = self.dir.remove(&name).await;
            return Err(io_error("zero spare segment")(error));
        }
        *self.spare.ready.borrow_mut() = Some(Spare {
            name,
            file: Rc::new(file),
            size_bytes,
        });
        Ok(())
    }

    /// Rolls to the ready spare now if the active segment has unwritten extents (it was made
    /// before any spare existed, as the first segment of a fresh log is) and is less than half
    /// full: commits then stop paying for extent conversion at once rather than a segment
    /// later. The unused rest of that segment is freed with it when its records die. Returns
    /// whether it rolled.
    pub async fn switch_to_spare_early(&self) -> Result<bool, StoreError> {
        {
            let mut st = self.state.borrow_mut();
            let young_unwritten = st
                .active
                .and_then(|seq| st.segments.get(&seq))
                .is_some_and(|seg| seg.unwritten_extents && seg.write_offset < seg.size_bytes / 2);
            if st.rolling || !young_unwritten || self.spare.ready.borrow().is_none() {
                return Ok(false);
            }
            st.rolling = true;
        }
        let _rolling = super::log::Rolling { store: self };
        self.roll(0).await?;
        Ok(true)
    }

    /// Takes the spare for a roll that needs a segment of `size_bytes`, if one that size is
    /// ready.
    pub(super) fn take_spare(&self, size_bytes: u64) -> Option<Spare<D::File>> {
        let mut ready = self.spare.ready.borrow_mut();
        if ready.as_ref()?.size_bytes != size_bytes {
            return None;
        }
        let spare = ready.take();
        drop(ready);
        self.spare.taken.notify_all();
        spare
    }
}

/// Writes `size_bytes` of zeros from the start of `file` and makes them durable.
async fn zero_fill<F, P, W>(file: &F, size_bytes: u64, pause: P) -> std::io::Result<()>
where
    F: SegmentFile,
    P: Fn() -> W,
    W: std::future::Future<Output = ()>,
{
    let mut at = 0;
    while at < size_bytes {
        let len = (size_bytes - at).min(ZERO_PIECE_BYTES);
        super::log::write_all(file, vec![0; len as usize], at).await?;
        file.fdatasync().await?;
        at += len;
        pause().await;
    }
    Ok(())
}
