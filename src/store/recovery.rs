//! Opening a shard's log: verify every record, clear torn tails, skip (and report) corruption,
//! rebuild the index, and hand the live records to whoever rebuilds the upper indexes.

use std::cell::{Cell, RefCell};
use std::path::Path;
use std::rc::Rc;
use std::time::Instant;

use super::backend::{DiskDir, SegmentDir, SegmentFile};
use super::record::RecordType;
use super::segment::{self, SegmentName, SEGMENT_HEADER_BYTES};
use super::{
    io_error, wait, Location, RecordId, Recovered, RecoveredRecord, RecoveryReport, Segment, State,
    Store, StoreError, StoreOptions, MIN_SEGMENT_SIZE_BYTES,
};

/// Zeros are written over a torn tail in chunks of this size (bounds the buffer).
const ZERO_CHUNK_BYTES: u64 = 1 << 20;

impl Store<DiskDir> {
    /// Opens (creating if needed) `dir` (= `data_dir/shard-N`) on disk; see [`Store::open_in`].
    pub async fn open(dir: &Path, opts: StoreOptions) -> Result<(Store, Recovered), StoreError> {
        let disk = DiskDir::open(dir)
            .await
            .map_err(io_error("open log directory"))?;
        Store::open_in(disk, opts).await
    }
}

impl<D: SegmentDir> Store<D> {
    /// Opens the log held by `dir`: verifies every record, truncates torn tails (with a
    /// warning), reports and skips corruption elsewhere, and returns every live record in log
    /// order. Appends continue in the newest segment when it is intact, else in a fresh one.
    pub async fn open_in(dir: D, opts: StoreOptions) -> Result<(Store<D>, Recovered), StoreError> {
        if opts.segment_size_bytes < MIN_SEGMENT_SIZE_BYTES {
            return Err(StoreError::InvalidOptions("segment_size_bytes below 4096"));
        }
        if opts.compact_below_live_percent > 100 {
            return Err(StoreError::InvalidOptions(
                "compact_below_live_percent above 100",
            ));
        }
        let started = Instant::now();
        let mut names: Vec<SegmentName> = Vec::new();
        for file_name in dir.list().await.map_err(io_error("list log directory"))? {
            match SegmentName::parse(&file_name) {
                Some(name) => names.push(name),
                // Never named durably nor holding records: a fresh one is cheaper to trust.
                None if super::spare::is_spare_name(&file_name) => dir
                    .remove(&file_name)
                    .await
                    .map_err(io_error("remove leftover spare segment"))?,
                None => tracing::warn!(file = %file_name, "ignoring a file that is not a segment"),
            }
        }
        names.sort_by_key(|name| name.seq);
        let store = Store {
            dir,
            opts,
            state: RefCell::new(State::default()),
            changed: wait::Notify::default(),
            reclaiming: Cell::new(false),
            spare: Default::default(),
        };
        let mut report = RecoveryReport::default();
        // Data records in log order: (segment, offset, header).
        let mut occurrences = Vec::new();
        let mut id_floor = 1u64;
        // The newest segment, if its header is intact and it has its full preallocated size.
        let mut last_intact = None;
        for name in names {
            let Some(scan) = store.recover_segment(name, &mut report).await? else {
                continue;
            };
            let mut st = store.state.borrow_mut();
            st.next_seq = st.next_seq.max(name.seq + 1);
            last_intact = None;
            if let Some(header) = scan.header {
                id_floor = id_floor.max(header.id_floor);
                if header.seq == name.seq && header.size_bytes == st.segments[&name.seq].size_bytes
                {
                    last_intact = Some(name.seq);
                }
            }
            for scanned in &scan.records {
                let header = scanned.header;
                match header.record_type {
                    RecordType::Data => {
                        id_floor = id_floor.max(header.id.0 + 1);
                        occurrences.push((name.seq, scanned.offset, header));
                    }
                    RecordType::Tombstone => {
                        let map = st.segments[&name.seq].map()?;
                        let start = scanned.offset as usize + super::record::HEADER_BYTES;
                        let payload = &map.bytes()[start..start + header.payload_len as usize];
                        let ids: Vec<RecordId> = payload
                            .chunks_exact(8)
                            .map(|id| RecordId(u64::from_le_bytes(id.try_into().expect("8"))))
                            .collect();
                        for id in &ids {
                            id_floor = id_floor.max(id.0 + 1);
                            *st.tombstone_holders.entry(*id).or_default() += 1;
                            st.dead.insert(*id);
                        }
                        st.segments
                            .get_mut(&name.seq)
                            .expect("just added")
                            .tombstoned
                            .extend(ids);
                    }
                    RecordType::SegmentHeader => {}
                }
            }
        }
        let records = store.rebuild_index(occurrences, id_floor, &mut report)?;
        if report.empty_segments_removed > 0 {
            store
                .dir
                .sync()
                .await
                .map_err(io_error("sync log directory"))?;
        }
        match store.resume_last_segment(last_intact) {
            Some(file_name) => {
                // Torn tails are cleared and synced by now; appends start after this.
                let twin = store.open_twin(&file_name).await;
                let mut st = store.state.borrow_mut();
                let active = st.active.expect("just resumed");
                st.segments.get_mut(&active).expect("active segment").twin = twin;
            }
            None => store.roll(0).await?,
        }
        report.elapsed = started.elapsed();
        tracing::info!(?report, "log recovered");
        Ok((store, Recovered { records, report }))
    }

    /// Makes the newest segment the active one again, so that every restart does not leave a
    /// mostly empty segment behind. Safe because everything after its last valid record is
    /// zero again (torn tails were cleared), and ids stay unique: the recovered next id is
    /// above every id in any record or segment header. Returns its file name, or None if there
    /// is none.
    fn resume_last_segment(&self, last_intact: Option<u64>) -> Option<String> {
        let mut st = self.state.borrow_mut();
        match last_intact {
            Some(seq) if st.segments.keys().next_back() == Some(&seq) => {
                st.active = Some(seq);
                Some(st.segments[&seq].name.file_name())
            }
            _ => None,
        }
    }

    /// Scans one segment, clears its torn tail, and adds it (sealed) to the state. Returns
    /// None for a file that holds nothing (removed).
    async fn recover_segment(
        &self,
        name: SegmentName,
        report: &mut RecoveryReport,
    ) -> Result<Option<segment::SegmentScan>, StoreError> {
        let file_name = name.file_name();
        let file = self
            .dir
            .open(&file_name)
            .await
            .map_err(io_error("open segment"))?;
        let len = file.len_bytes().await.map_err(io_error("stat segment"))?;
        let mut map = if len > 0 {
            Some(file.map(len).map_err(io_error("map segment"))?)
        } else {
            None
        };
        let scan = match &map {
            Some(map) => {
                map.prefetch(0..len as usize);
                segment::scan(map.bytes(), name.salt)
            }
            None => segment::SegmentScan::default(),
        };
        if scan.header.is_none() && scan.records.is_empty() && scan.corrupt.is_empty() {
            tracing::warn!(file = %file_name, "removing a segment that holds nothing (crash while creating it)");
            self.dir
                .remove(&file_name)
                .await
                .map_err(io_error("remove empty segment"))?;
            report.empty_segments_removed += 1;
            return Ok(None);
        }
        match scan.header {
            Some(header) if header.seq != name.seq => {
                tracing::warn!(file = %file_name, header_seq = header.seq, "segment header names another sequence number");
            }
            Some(_) => {}
            None => {
                tracing::error!(file = %file_name, "segment header is damaged; reading its records anyway")
            }
        }
        for region in &scan.corrupt {
            tracing::error!(
                file = %file_name,
                start = region.start,
                end = region.end,
                damaged_records = region.damaged_records,
                "corrupt region in the log skipped"
            );
            report.corrupt_regions += 1;
            report.corrupt_bytes += region.end - region.start;
            report.corrupt_records += u64::from(region.damaged_records);
        }
        if scan.torn_tail_bytes() > 0 {
            tracing::warn!(
                file = %file_name,
                offset = scan.valid_end,
                bytes = scan.torn_tail_bytes(),
                "truncating a torn tail (appends cut by a crash, never acknowledged)"
            );
            let mut at = scan.valid_end;
            while at < scan.tail_end {
                let chunk = (scan.tail_end - at).min(ZERO_CHUNK_BYTES);
                let written = file
                    .write_at(vec![0; chunk as usize], at)
                    .await
                    .map_err(io_error("clear torn tail"))?;
                if written == 0 {
                    return Err(io_error("clear torn tail")(
                        std::io::ErrorKind::WriteZero.into(),
                    ));
                }
                at += written as u64;
            }
            file.fdatasync()
                .await
                .map_err(io_error("sync cleared tail"))?;
            report.torn_tail_bytes += scan.torn_tail_bytes();
            if !<D::File as SegmentFile>::MAP_IS_LIVE {
                map = Some(file.map(len).map_err(io_error("map segment"))?);
            }
        }
        report.segments += 1;
        report.bytes_verified += scan.valid_end;
        let map = if <D::File as SegmentFile>::MAP_IS_LIVE {
            map
        } else {
            None
        };
        self.state.borrow_mut().segments.insert(
            name.seq,
            Segment::new(
                name,
                Rc::new(file),
                len,
                scan.valid_end.max(SEGMENT_HEADER_BYTES).min(len),
                map,
            ),
        );
        Ok(Some(scan))
    }

    /// Builds the index from every data record seen (the last copy of an id wins: compaction
    /// copies forward) minus every id a tombstone kills, whatever their order in the log.
    fn rebuild_index(
        &self,
        occurrences: Vec<(u64, u64, super::record::RecordHeader)>,
        id_floor: u64,
        report: &mut RecoveryReport,
    ) -> Result<Vec<RecoveredRecord>, StoreError> {
        let mut guard = self.state.borrow_mut();
        let st = &mut *guard;
        st.next_id = id_floor;
        for &(seq, offset, header) in &occurrences {
            *st.record_holders.entry(header.id).or_default() += 1;
            st.segments
                .get_mut(&seq)
                .expect("scanned segment")
                .data_ids
                .push(header.id);
            if st.dead.contains(&header.id) {
                report.dead_records += 1;
                continue;
            }
            let loc = Location {
                seq,
                offset,
                payload_len: header.payload_len,
                payload_crc: header.payload_crc,
                kind: header.kind,
            };
            if let Some(old) = st.index.insert(header.id, loc) {
                report.dead_records += 1;
                let old_seg = st.segments.get_mut(&old.seq).expect("indexed segment");
                old_seg.live_records -= 1;
                old_seg.live_bytes -= old.encoded_len();
            }
            let seg = st.segments.get_mut(&seq).expect("scanned segment");
            seg.live_records += 1;
            seg.live_bytes += loc.encoded_len();
        }
        // A dead id whose records are all gone needs no remembering (ids are never reused).
        let holders = &st.record_holders;
        st.dead.retain(|id| holders.contains_key(id));
        let mut live: Vec<(RecordId, Location)> =
            st.index.iter().map(|(id, loc)| (*id, *loc)).collect();
        live.sort_unstable_by_key(|(_, loc)| (loc.seq, loc.offset));
        let mut records = Vec::with_capacity(live.len());
        drop(guard);
        for (id, loc) in live {
            let record = self.read(id)?;
            debug_assert_eq!(record.kind(), loc.kind);
            report.live_payload_bytes += record.len() as u64;
            records.push(RecoveredRecord {
                id,
                kind: loc.kind,
                record,
            });
        }
        report.live_records = records.len() as u64;
        Ok(records)
    }
}
