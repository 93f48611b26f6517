//! Space reclaim: delete sealed segments holding nothing live, compact sparse ones.
//!
//! Two rules keep a crash at any point from resurrecting or duplicating a record:
//! - a tombstone is carried forward (rewritten in the active segment, durably) before the
//!   segment holding it is deleted, as long as a record it kills still exists in some other
//!   segment and no other segment holds a tombstone for it;
//! - a compacted record keeps its id, recovery keeps only the last copy of an id, and a
//!   tombstone kills every copy wherever it sits in the log. The original segment is deleted
//!   only after every copy is durable.

use std::collections::HashMap;

use super::backend::SegmentDir;
use super::record::{self, RecordType};
use super::segment::SEGMENT_HEADER_BYTES;
use super::wait::join_all;
use super::{
    io_error, Location, ReclaimReport, RecordId, Store, StoreError, COMPACTION_BATCH_RECORDS,
};

/// Resets the "reclaim running" flag however the reclaim ends.
struct Reclaiming<'a, D: SegmentDir> {
    store: &'a Store<D>,
}

impl<D: SegmentDir> Drop for Reclaiming<'_, D> {
    fn drop(&mut self) {
        self.store.reclaiming.set(false);
    }
}

impl<D: SegmentDir> Store<D> {
    /// Deletes sealed segments whose records are all dead and compacts sparse sealed ones
    /// (live records copied forward under the same ids). The shard calls this periodically;
    /// a call made while another runs returns an empty report.
    pub async fn reclaim(&self) -> Result<ReclaimReport, StoreError> {
        let mut report = ReclaimReport::default();
        if self.reclaiming.replace(true) {
            return Ok(report);
        }
        let _reclaiming = Reclaiming { store: self };
        let candidates: Vec<u64> = {
            let st = self.state.borrow();
            st.segments
                .iter()
                .filter(|(seq, seg)| Some(**seq) != st.active && seg.is_quiet())
                .map(|(seq, _)| *seq)
                .collect()
        };
        let mut copy_budget_bytes = self.opts.reclaim_max_copy_bytes;
        for seq in candidates {
            let Some((live_records, live_bytes, used_bytes, size_bytes)) = self.usage(seq) else {
                continue;
            };
            if live_records == 0 {
                if self.delete_segment(seq, &mut report).await? {
                    report.segments_deleted += 1;
                    report.bytes_freed += size_bytes;
                }
            } else if live_bytes * 100
                < used_bytes * u64::from(self.opts.compact_below_live_percent)
                && live_bytes <= copy_budget_bytes
            {
                copy_budget_bytes -= live_bytes;
                if self.compact(seq, &mut report).await? {
                    report.segments_compacted += 1;
                    report.bytes_freed += size_bytes;
                }
            }
        }
        Ok(report)
    }

    /// (live records, live bytes, used bytes, file size) of a quiet sealed segment.
    fn usage(&self, seq: u64) -> Option<(u64, u64, u64, u64)> {
        let st = self.state.borrow();
        let seg = st.segments.get(&seq)?;
        if Some(seq) == st.active || !seg.is_quiet() {
            return None;
        }
        let used_bytes = seg.write_offset.saturating_sub(SEGMENT_HEADER_BYTES);
        Some((seg.live_records, seg.live_bytes, used_bytes, seg.size_bytes))
    }

    /// Copies the live records of `seq` forward (verifying each), then deletes it.
    async fn compact(&self, seq: u64, report: &mut ReclaimReport) -> Result<bool, StoreError> {
        let (map, salt, mut live) = {
            let st = self.state.borrow();
            let seg = &st.segments[&seq];
            let mut live: Vec<(RecordId, Location)> = seg
                .data_ids
                .iter()
                .filter_map(|id| {
                    st.index
                        .get(id)
                        .filter(|loc| loc.seq == seq)
                        .map(|loc| (*id, *loc))
                })
                .collect();
            live.sort_unstable_by_key(|(_, loc)| loc.offset);
            live.dedup_by_key(|(id, _)| *id);
            (seg.map()?, seg.name.salt, live)
        };
        // Records may have died since; copying them anyway is harmless (they stay dead).
        live.retain(|(id, _)| self.contains(*id));
        for batch in live.chunks(COMPACTION_BATCH_RECORDS) {
            let mut copies = Vec::with_capacity(batch.len());
            for &(id, loc) in batch {
                let (header, payload) = record::decode_at(map.bytes(), loc.offset as usize, salt)
                    .map_err(|_| StoreError::Corrupt(id))?;
                if header.id != id {
                    return Err(StoreError::Corrupt(id));
                }
                let bytes = map.bytes()[payload].to_vec();
                report.records_copied += 1;
                report.bytes_copied += bytes.len() as u64;
                copies.push(self.append_record(RecordType::Data, id, loc.kind, vec![bytes]));
            }
            // Count every copy that landed before giving up on one that did not: an
            // uncounted durable copy would let this record's tombstone be dropped later,
            // and the copy would come back to life after a restart.
            let mut first_error = None;
            for placed in join_all(copies).await {
                match placed {
                    Ok(placed) => self.apply_data(placed),
                    Err(error) => {
                        first_error.get_or_insert(error);
                    }
                }
            }
            if let Some(error) = first_error {
                return Err(error);
            }
        }
        self.state.borrow_mut().stats.compaction_bytes_copied += report.bytes_copied;
        self.delete_segment(seq, report).await
    }

    /// Deletes a sealed segment with no live record, first carrying forward the tombstones
    /// still needed. Returns false when the segment turned out to be in use after all.
    async fn delete_segment(
        &self,
        seq: u64,
        report: &mut ReclaimReport,
    ) -> Result<bool, StoreError> {
        let carry: Vec<RecordId> = {
            let st = self.state.borrow();
            let seg = &st.segments[&seq];
            let mut held_here: HashMap<RecordId, u32> = HashMap::new();
            for id in &seg.data_ids {
                *held_here.entry(*id).or_default() += 1;
            }
            let mut killed_here: HashMap<RecordId, u32> = HashMap::new();
            for id in &seg.tombstoned {
                *killed_here.entry(*id).or_default() += 1;
            }
            // A segment unlinked but not yet known to be gone (its directory sync failed)
            // is gone for good after the next sync, ours included: its tombstones protect
            // nothing. (Its data copies still count as held: the file may also come back.)
            let mut killed_in_unlinked: HashMap<RecordId, u32> = HashMap::new();
            for other in st
                .segments
                .values()
                .filter(|s| s.unlinked && s.name.seq != seq)
            {
                for id in &other.tombstoned {
                    *killed_in_unlinked.entry(*id).or_default() += 1;
                }
            }
            let mut carry: Vec<RecordId> = killed_here
                .iter()
                .filter(|(id, killed)| {
                    let held_elsewhere = st
                        .record_holders
                        .get(id)
                        .copied()
                        .unwrap_or(0)
                        .saturating_sub(held_here.get(id).copied().unwrap_or(0));
                    let killed_elsewhere = st
                        .tombstone_holders
                        .get(id)
                        .copied()
                        .unwrap_or(0)
                        .saturating_sub(**killed)
                        .saturating_sub(killed_in_unlinked.get(id).copied().unwrap_or(0));
                    held_elsewhere > 0 && killed_elsewhere == 0
                })
                .map(|(id, _)| *id)
                .collect();
            carry.sort_unstable();
            carry
        };
        if !carry.is_empty() {
            self.write_tombstones(&carry).await?;
            report.tombstones_carried += carry.len() as u64;
        }
        let (file_name, unlinked) = {
            let st = self.state.borrow();
            let seg = &st.segments[&seq];
            if seg.live_records != 0 || !seg.is_quiet() {
                // A record moved in or was appended while we carried tombstones: keep it.
                return Ok(false);
            }
            (seg.name.file_name(), seg.unlinked)
        };
        if !unlinked {
            self.dir
                .remove(&file_name)
                .await
                .map_err(io_error("remove segment"))?;
            if let Some(seg) = self.state.borrow_mut().segments.get_mut(&seq) {
                seg.unlinked = true;
            }
        }
        // Only once the unlink is durable may the tombstones killing its records go: were the
        // file to come back after a crash without them, its dead records would resurrect.
        self.dir
            .sync()
            .await
            .map_err(io_error("sync log directory"))?;
        let mut guard = self.state.borrow_mut();
        let st = &mut *guard;
        let seg = st.segments.remove(&seq).expect("segment being deleted");
        for id in seg.data_ids {
            let holders = st.record_holders.get_mut(&id).expect("counted holder");
            *holders -= 1;
            if *holders == 0 {
                st.record_holders.remove(&id);
                st.dead.remove(&id);
            }
        }
        for id in seg.tombstoned {
            let holders = st
                .tombstone_holders
                .get_mut(&id)
                .expect("counted tombstone");
            *holders -= 1;
            if *holders == 0 {
                st.tombstone_holders.remove(&id);
            }
        }
        st.stats.segments_deleted += 1;
        tracing::debug!(segment = seq, "segment deleted");
        Ok(true)
    }
}
