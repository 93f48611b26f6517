//! Appending: space reservation, segment roll, concurrent zero-copy writes, group commit.

use std::rc::Rc;
use std::time::Instant;

use super::backend::{SegmentDir, SegmentFile};
use super::record::{self, RecordHeader, RecordType};
use super::segment::{SegmentHeader, SegmentName, FORMAT_VERSION, SEGMENT_HEADER_BYTES};
use super::wait::join_all;
use super::{io_error, Location, RecordId, Segment, Store, StoreError, MAX_IDS_PER_TOMBSTONE};

/// Where a durable record landed.
#[derive(Copy, Clone, Debug)]
pub(super) struct Placed {
    pub(super) seq: u64,
    pub(super) offset: u64,
    pub(super) header: RecordHeader,
}

/// Undoes a reservation's bookkeeping if the appending future is dropped mid-write.
struct WriteInFlight<'a, D: SegmentDir> {
    store: &'a Store<D>,
    seq: u64,
}

impl<D: SegmentDir> Drop for WriteInFlight<'_, D> {
    fn drop(&mut self) {
        let mut st = self.store.state.borrow_mut();
        if let Some(seg) = st.segments.get_mut(&self.seq) {
            seg.writes_in_flight -= 1;
        }
        st.writes_finished += 1;
        let gathered = st.gather_until == Some(st.writes_finished);
        drop(st);
        if gathered {
            self.store.changed.notify_all();
        }
    }
}

/// Counts a written record until its append resolves (reclaim leaves such segments alone).
struct AwaitingSync<'a, D: SegmentDir> {
    store: &'a Store<D>,
    seq: u64,
}

impl<D: SegmentDir> Drop for AwaitingSync<'_, D> {
    fn drop(&mut self) {
        if let Some(seg) = self.store.state.borrow_mut().segments.get_mut(&self.seq) {
            seg.awaiting_sync -= 1;
        }
    }
}

/// Set while a task runs a commit round. If that task is dropped mid-round, its fdatasyncs
/// may still finish in the kernel with nobody to hear their result, and a writeback error
/// reported to them is reported to nobody else on those descriptions: so the segments it was
/// syncing are poisoned, and the records waiting in them fail rather than trust a later round.
struct RoundInFlight<'a, D: SegmentDir> {
    store: &'a Store<D>,
    round: u64,
    syncs: Vec<(u64, usize)>,
    finished: bool,
}

impl<D: SegmentDir> Drop for RoundInFlight<'_, D> {
    fn drop(&mut self) {
        if self.finished {
            return;
        }
        let mut st = self.store.state.borrow_mut();
        st.rounds_in_flight -= 1;
        for &(seq, slot) in &self.syncs {
            if let Some(seg) = st.segments.get_mut(&seq) {
                seg.syncing[slot] = false;
                seg.poisoned = true;
            }
        }
        drop(st);
        tracing::error!(
            round = self.round,
            "a commit round was abandoned mid-flight; its segments take no more writes"
        );
        self.store.changed.notify_all();
    }
}

/// Commit rounds that may be in flight at once. A record written while a round is in flight
/// need not wait for that round to end before its own begins, so it waits about one fdatasync
/// rather than one and a half. Two, not more: each needs its own file description per segment
/// (see [`Segment::twin`](super::Segment)), and two concurrent fdatasyncs of one file already
/// did 14,000 a second where one at a time did 9,500 (ext4 on this project's test VM).
pub(super) const MAX_ROUNDS_IN_FLIGHT: u32 = 2;

/// Clears the "rolling" flag if the task creating a segment is dropped.
pub(super) struct Rolling<'a, D: SegmentDir> {
    pub(super) store: &'a Store<D>,
}

impl<D: SegmentDir> Drop for Rolling<'_, D> {
    fn drop(&mut self) {
        self.store.state.borrow_mut().rolling = false;
        self.store.changed.notify_all();
    }
}

/// Leading pieces up to this size are copied into the record header's write rather than
/// written on their own.
const COALESCE_PIECE_BYTES: u64 = 1024;

/// Writes all of `buf` at `pos`. `write_at` takes the buffer by value (io_uring owns it while
/// the kernel works), so the rest of a short write is gone: a short write (only possible on a
/// full or failing device, since segments are preallocated) counts as a failed write.
pub(super) async fn write_all<F: SegmentFile>(
    file: &F,
    buf: Vec<u8>,
    pos: u64,
) -> std::io::Result<()> {
    let len = buf.len();
    let written = file.write_at(buf, pos).await?;
    if written < len {
        return Err(std::io::Error::new(
            std::io::ErrorKind::WriteZero,
            format!("short write: {written} of {len} bytes"),
        ));
    }
    Ok(())
}

impl<D: SegmentDir> Store<D> {
    /// Appends one record whose payload is the concatenation of `pieces`, written from these
    /// very buffers, and resolves once the group commit covering it completed. `id` must come
    /// from [`Store::allocate_id`]; `kind` is opaque to the store.
    ///
    /// If the returned future is dropped before it resolves, the record may or may not be
    /// found after a restart (it was never reported durable).
    pub async fn append(
        &self,
        id: RecordId,
        kind: u8,
        pieces: Vec<Vec<u8>>,
    ) -> Result<(), StoreError> {
        if id.0 == 0 || id.0 >= self.state.borrow().next_id {
            return Err(StoreError::UnallocatedId(id));
        }
        payload_len_within(&pieces, self.record_limit())?;
        let placed = self
            .append_record(RecordType::Data, id, kind, pieces)
            .await?;
        self.apply_data(placed);
        let mut st = self.state.borrow_mut();
        st.stats.appends += 1;
        st.stats.append_payload_bytes += u64::from(placed.header.payload_len);
        Ok(())
    }

    /// Durably marks records dead (a tombstone record in this log); resolves after the group
    /// commit covering it. Ids that are not live (already dead, never appended) are skipped,
    /// so retrying after a failure is safe.
    pub async fn mark_dead(&self, ids: &[RecordId]) -> Result<(), StoreError> {
        let mut live: Vec<RecordId> = {
            let st = self.state.borrow();
            ids.iter()
                .copied()
                .filter(|id| st.index.contains_key(id))
                .collect()
        };
        live.sort_unstable();
        live.dedup();
        self.write_tombstones(&live).await
    }

    /// Writes tombstones for `ids` and applies them once durable.
    pub(super) async fn write_tombstones(&self, ids: &[RecordId]) -> Result<(), StoreError> {
        // Eight bytes an id; a small max_record_bytes (a small max_message_size) must not
        // make a large batch unwritable, or reclaim would stall on it for good.
        let ids_per_record = usize::try_from(self.record_limit() / 8)
            .unwrap_or(usize::MAX)
            .clamp(1, MAX_IDS_PER_TOMBSTONE);
        for chunk in ids.chunks(ids_per_record) {
            let payload: Vec<u8> = chunk.iter().flat_map(|id| id.0.to_le_bytes()).collect();
            let placed = self
                .append_record(RecordType::Tombstone, RecordId(0), 0, vec![payload])
                .await?;
            self.apply_tombstone(placed.seq, chunk);
            self.state.borrow_mut().stats.tombstones += 1;
        }
        Ok(())
    }

    /// Records a durable data record (a new one or a compaction copy) in the index.
    pub(super) fn apply_data(&self, placed: Placed) {
        let mut guard = self.state.borrow_mut();
        let st = &mut *guard;
        let id = placed.header.id;
        *st.record_holders.entry(id).or_default() += 1;
        let seg = st
            .segments
            .get_mut(&placed.seq)
            .expect("segment of a durable record");
        seg.data_ids.push(id);
        if st.dead.contains(&id) {
            // A compaction copy of a record killed while it was being copied.
            return;
        }
        let loc = Location {
            seq: placed.seq,
            offset: placed.offset,
            payload_len: placed.header.payload_len,
            payload_crc: placed.header.payload_crc,
            kind: placed.header.kind,
        };
        seg.live_records += 1;
        seg.live_bytes += loc.encoded_len();
        if let Some(old) = st.index.insert(id, loc) {
            if let Some(old_seg) = st.segments.get_mut(&old.seq) {
                old_seg.live_records -= 1;
                old_seg.live_bytes -= old.encoded_len();
            }
        }
    }

    /// Records a durable tombstone in segment `seq` killing `ids`.
    pub(super) fn apply_tombstone(&self, seq: u64, ids: &[RecordId]) {
        let mut guard = self.state.borrow_mut();
        let st = &mut *guard;
        let seg = st
            .segments
            .get_mut(&seq)
            .expect("segment of a durable tombstone");
        seg.tombstoned.extend_from_slice(ids);
        for &id in ids {
            *st.tombstone_holders.entry(id).or_default() += 1;
            if let Some(old) = st.index.remove(&id) {
                if let Some(old_seg) = st.segments.get_mut(&old.seq) {
                    old_seg.live_records -= 1;
                    old_seg.live_bytes -= old.encoded_len();
                }
            }
            if st.record_holders.contains_key(&id) {
                st.dead.insert(id);
            }
        }
    }

    /// The largest payload a new record may have: `max_record_bytes`, within the format's.
    fn record_limit(&self) -> u64 {
        self.opts.max_record_bytes.min(record::MAX_PAYLOAD_BYTES)
    }

    /// Checks, reserves, writes and commits one record of any type.
    pub(super) async fn append_record(
        &self,
        record_type: RecordType,
        id: RecordId,
        kind: u8,
        pieces: Vec<Vec<u8>>,
    ) -> Result<Placed, StoreError> {
        // Only the format's own bound: `max_record_bytes` limits new records (`append`,
        // tombstones split to fit it), never compaction's copies of records accepted under
        // an earlier, larger setting, which must stay movable.
        let payload_len = payload_len_within(&pieces, record::MAX_PAYLOAD_BYTES)?;
        let header = RecordHeader {
            record_type,
            kind,
            id,
            payload_len: payload_len as u32,
            payload_crc: record::payload_crc(&pieces),
        };
        let (seq, offset, file, salt) = self.reserve(header.encoded_len()).await?;
        let in_flight = WriteInFlight { store: self, seq };
        let header_bytes = header.encode(salt);
        // Check the header before it is written, as recovery will check it after.
        if RecordHeader::decode(&header_bytes, salt) != Ok(header) {
            return Err(StoreError::Corrupt(id));
        }
        let small = payload_len <= self.opts.copy_below_bytes;
        let result = if small {
            // One write instead of one per piece: below this size an io_uring operation costs
            // more than copying the bytes (see `copy_below_bytes`).
            let mut whole = Vec::with_capacity(record::HEADER_BYTES + payload_len as usize);
            whole.extend_from_slice(&header_bytes);
            for piece in &pieces {
                whole.extend_from_slice(piece);
            }
            self.state.borrow_mut().stats.payload_bytes_copied += payload_len;
            write_all(&*file, whole, offset).await
        } else {
            // Every large piece written from its own buffer, all at once. Small leading pieces
            // (an envelope, a Received: header) ride in the header's write: each io_uring write
            // of a buffered file may cost a hand-off to a kernel worker, a few hundred bytes of
            // copy cost far less.
            let mut head = header_bytes.to_vec();
            let mut pieces = pieces.into_iter().peekable();
            while let Some(piece) =
                pieces.next_if(|piece| piece.len() as u64 <= COALESCE_PIECE_BYTES)
            {
                head.extend_from_slice(&piece);
                self.state.borrow_mut().stats.payload_bytes_copied += piece.len() as u64;
            }
            let mut pos = offset + head.len() as u64;
            let mut writes = vec![write_all(&*file, head, offset)];
            for piece in pieces.filter(|piece| !piece.is_empty()) {
                let len = piece.len() as u64;
                writes.push(write_all(&*file, piece, pos));
                pos += len;
            }
            join_all(writes).await.into_iter().collect()
        };
        drop(in_flight);
        {
            let mut st = self.state.borrow_mut();
            let seg = st
                .segments
                .get_mut(&seq)
                .expect("segment with a write in flight");
            if let Err(error) = result {
                tracing::error!(segment = seq, %error, "log write failed; segment takes no more writes");
                seg.poisoned = true;
                return Err(StoreError::SyncFailed);
            }
            seg.dirty = true;
            seg.awaiting_sync += 1;
        }
        let _awaiting = AwaitingSync { store: self, seq };
        let ticket = self.state.borrow().commit_rounds_started + 1;
        self.wait_durable(seq, ticket).await?;
        Ok(Placed {
            seq,
            offset,
            header,
        })
    }

    /// Waits until a commit round numbered `ticket` or later (so begun after the record in
    /// segment `seq` was written) synced that segment, leading rounds itself when none covers
    /// the record yet and one may start.
    async fn wait_durable(&self, seq: u64, ticket: u64) -> Result<(), StoreError> {
        enum Next {
            Lead,
            Wait,
            LetOthersReserve,
        }
        let mut yielded = false;
        loop {
            let next = {
                let mut st = self.state.borrow_mut();
                let seg = &st.segments[&seq];
                if seg.synced_through >= ticket {
                    return Ok(());
                }
                if seg.poisoned {
                    return Err(StoreError::SyncFailed);
                }
                // Not dirty: a round begun since the write syncs this segment now. No free
                // description, or rounds enough in flight: one of them ends first.
                if !seg.dirty
                    || seg.free_sync_handle().is_none()
                    || st.rounds_in_flight >= MAX_ROUNDS_IN_FLIGHT
                {
                    Next::Wait
                } else if st.gather_until.is_none() && !yielded {
                    // The appenders woken by the last round are still queued: let them reserve
                    // their space first, so that this round's gathering includes them.
                    Next::LetOthersReserve
                } else {
                    let started = st.writes_started;
                    let until = *st.gather_until.get_or_insert(started);
                    if st.writes_finished >= until {
                        Next::Lead
                    } else {
                        Next::Wait
                    }
                }
            };
            match next {
                Next::Lead => self.commit_round().await,
                Next::Wait => self.changed.wait().await,
                Next::LetOthersReserve => {
                    yielded = true;
                    futures_lite::future::yield_now().await;
                }
            }
        }
    }

    /// One group-commit round: fdatasync every segment written since the last round that
    /// synced it began, each through a description no other round is using. A segment whose
    /// descriptions are all busy stays dirty for the next round.
    async fn commit_round(&self) {
        let (round, syncs) = {
            let mut st = self.state.borrow_mut();
            st.rounds_in_flight += 1;
            if st.rounds_in_flight > 1 {
                st.stats.overlapping_rounds += 1;
            }
            st.gather_until = None;
            st.commit_rounds_started += 1;
            let mut syncs: Vec<(u64, usize, Rc<D::File>)> = Vec::new();
            for (&seq, seg) in st.segments.iter_mut().filter(|(_, seg)| seg.dirty) {
                if seg.poisoned {
                    // A poisoned file is never synced again: nothing in it can become durable.
                    seg.dirty = false;
                } else if let Some((slot, file)) = seg.free_sync_handle() {
                    seg.dirty = false;
                    seg.syncing[slot] = true;
                    syncs.push((seq, slot, file));
                }
            }
            (st.commit_rounds_started, syncs)
        };
        let mut in_flight = RoundInFlight {
            store: self,
            round,
            syncs: syncs.iter().map(|(seq, slot, _)| (*seq, *slot)).collect(),
            finished: false,
        };
        let started = Instant::now();
        let results = join_all(syncs.iter().map(|(_, _, file)| file.fdatasync()).collect()).await;
        in_flight.finished = true;
        let nanos = started.elapsed().as_nanos() as u64;
        {
            let mut st = self.state.borrow_mut();
            st.rounds_in_flight -= 1;
            for ((seq, slot, _), result) in syncs.iter().zip(results) {
                st.stats.fdatasyncs += 1;
                if result.is_err() {
                    st.stats.fdatasync_failures += 1;
                }
                let Some(seg) = st.segments.get_mut(seq) else {
                    continue;
                };
                seg.syncing[*slot] = false;
                match result {
                    // A file poisoned meanwhile stays so: its records fail, as in any round.
                    Ok(()) if !seg.poisoned => {
                        seg.synced_through = seg.synced_through.max(round);
                    }
                    Ok(()) => {}
                    Err(error) => {
                        tracing::error!(segment = seq, %error, "fdatasync failed; segment takes no more writes");
                        seg.poisoned = true;
                    }
                }
            }
            st.stats.commit_rounds += 1;
            st.stats.commit_nanos_total += nanos;
            st.stats.commit_nanos_max = st.stats.commit_nanos_max.max(nanos);
        }
        self.changed.notify_all();
    }

    /// Reserves `len` bytes in the active segment, rolling to a new one when it is full or
    /// poisoned.
    async fn reserve(&self, len: u64) -> Result<(u64, u64, Rc<D::File>, u32), StoreError> {
        loop {
            let must_roll = {
                let mut guard = self.state.borrow_mut();
                let st = &mut *guard;
                if st.rolling {
                    false
                } else {
                    if let Some(seq) = st.active {
                        let seg = st.segments.get_mut(&seq).expect("active segment");
                        if !seg.poisoned && seg.write_offset + len <= seg.size_bytes {
                            let offset = seg.write_offset;
                            seg.write_offset += len;
                            seg.writes_in_flight += 1;
                            st.writes_started += 1;
                            return Ok((seq, offset, seg.file.clone(), seg.name.salt));
                        }
                    }
                    st.rolling = true;
                    true
                }
            };
            if must_roll {
                let _rolling = Rolling { store: self };
                self.roll(len).await?;
            } else {
                // Another appender is creating the next segment.
                self.changed.wait().await;
            }
        }
    }

    /// Opens a second description of a segment about to take appends, for overlapping commit
    /// rounds. Without one (the open failed: too many open files?) the segment is synced one
    /// round at a time, which is slower but as safe.
    pub(super) async fn open_twin(&self, file_name: &str) -> Option<Rc<D::File>> {
        match self.dir.open(file_name).await {
            Ok(twin) => Some(Rc::new(twin)),
            Err(error) => {
                tracing::warn!(file = file_name, %error, "cannot open a segment twice; its commits will not overlap");
                None
            }
        }
    }

    /// Creates, preallocates and durably names a new active segment with room for a record of
    /// `needed` bytes (a record larger than a segment gets a segment of its own size).
    pub(super) async fn roll(&self, needed: u64) -> Result<(), StoreError> {
        let (seq, id_floor) = {
            let mut st = self.state.borrow_mut();
            st.next_seq += 1;
            (st.next_seq - 1, st.next_id)
        };
        let name = SegmentName {
            seq,
            salt: rand::random(),
        };
        let file_name = name.file_name();
        let size_bytes = self
            .opts
            .segment_size_bytes
            .max(SEGMENT_HEADER_BYTES + needed);
        let spare = self.take_spare(size_bytes);
        let from_spare = spare.is_some();
        let file = match spare {
            // The spare's zeros are already written and durable; only its name changes.
            Some(spare) => match self.dir.rename(&spare.name, &file_name).await {
                Ok(()) => spare.file,
                Err(error) => {
                    let _ = self.dir.remove(&spare.name).await;
                    return Err(io_error("rename spare segment")(error));
                }
            },
            None => Rc::new(
                self.dir
                    .create(&file_name, size_bytes)
                    .await
                    .map_err(io_error("create segment"))?,
            ),
        };
        let header = SegmentHeader {
            version: FORMAT_VERSION,
            seq,
            id_floor,
            size_bytes,
        };
        let made_durable = async {
            write_all(&*file, header.encode_record(name.salt), 0).await?;
            file.fdatasync().await?;
            self.dir.sync().await
        };
        if let Err(error) = made_durable.await {
            // Best effort: recovery also removes a segment holding nothing.
            let _ = self.dir.remove(&file_name).await;
            return Err(io_error("initialise segment")(error));
        }
        let map = if <D::File as SegmentFile>::MAP_IS_LIVE {
            Some(file.map(size_bytes).map_err(io_error("map segment"))?)
        } else {
            None
        };
        let twin = self.open_twin(&file_name).await;
        let mut st = self.state.borrow_mut();
        if let Some(old) = st.active.and_then(|active| st.segments.get_mut(&active)) {
            // A round syncing it holds its own handle; later rounds use the first description.
            old.twin = None;
        }
        let mut segment = Segment::new(name, file, size_bytes, SEGMENT_HEADER_BYTES, map);
        segment.twin = twin;
        segment.unwritten_extents = !from_spare;
        st.segments.insert(seq, segment);
        st.active = Some(seq);
        st.stats.segments_created += 1;
        st.stats.segments_from_spare += u64::from(from_spare);
        tracing::debug!(segment = seq, size_bytes, "new active segment");
        Ok(())
    }
}

/// The payload length of `pieces`, or `RecordTooLarge` beyond `max_bytes`.
fn payload_len_within(pieces: &[Vec<u8>], max_bytes: u64) -> Result<u64, StoreError> {
    let size_bytes: u64 = pieces.iter().map(|piece| piece.len() as u64).sum();
    if size_bytes > max_bytes {
        return Err(StoreError::RecordTooLarge {
            size_bytes,
            max_bytes,
        });
    }
    Ok(size_bytes)
}
