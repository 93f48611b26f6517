//! The shard-local log: every message and every fact about it is a record appended to the
//! segments of one shard's directory (`data_dir/shard-N/`). The log is the truth; indexes above
//! it are rebuilt from what [`Store::open`] recovers.
//!
//! - [`record`]: the record codec (type, kind, id, length, CRC32C of header and payload).
//! - [`segment`]: segment names and headers, and the pure scan recovery runs over a segment.
//! - [`backend`]: the file-system surface (glommio io_uring writes, memmap2 reads) as traits.
//! - [`memfs`]: an in-memory backend that loses or tears unsynced writes, for tests.
//! - `log`: appends and group commit; `recovery`: open; `reclaim`: deletion and compaction;
//!   `spare`: the next segment, zero-filled ahead of time.
//!
//! Decisions worth knowing:
//! - Group commit: an fdatasync round covers every record whose writes completed before it
//!   began. Up to two rounds run at once, so a record written while one is in flight starts
//!   the next at once instead of waiting for it to end. An appender whose record no round
//!   covers yet runs the next one itself (no background task), after letting the record
//!   writes already started finish, so that a round covers the whole wave of appenders woken
//!   by the previous one (this doubled records per fdatasync at 64 appenders; the wait is
//!   bounded by writes already issued, so it cannot starve).
//! - Two rounds never sync a file through the same open file description: Linux reports a
//!   writeback error once per description, so the second could report success for pages whose
//!   error the first consumed. The segment taking appends is therefore opened twice, before
//!   its first append (a description opened later would never hear of an earlier error).
//! - The records of a batch are written concurrently, not coalesced into one write: a record
//!   larger than [`StoreOptions::copy_below_bytes`] (4 KiB) is written from the caller's own
//!   buffers (one io_uring write per large piece, all in flight at once; leading pieces of at
//!   most 1 KiB, such as an envelope and a `Received:` header, ride in the header's write), so
//!   a message body is never copied in user space; a smaller record is copied behind its
//!   header and written with one operation, which measured cheaper than two.
//! - A failed fdatasync (or write) poisons its segment: every record in it that was not yet
//!   reported durable gets [`StoreError::SyncFailed`], and the next append rolls to a new
//!   segment. Records reported durable earlier stay readable.
//! - At open, appends resume after the last valid record of the newest segment (its torn tail
//!   cleared first); a fresh segment is started only when that one is damaged.
//! - New segments come from a spare whose zeros were written and synced in the background
//!   ([`Store::prepare_spare`]): overwriting written blocks changes no file-system metadata, so
//!   a group commit's fdatasync does not also wait for a journal commit, as it does on the
//!   unwritten extents `fallocate` leaves. Only when no spare is ready is a segment
//!   fallocated on the spot.

pub mod backend;
mod log;
pub mod memfs;
mod reclaim;
pub mod record;
mod recovery;
pub mod segment;
mod spare;
mod wait;

#[cfg(test)]
mod tests;

use std::cell::{Cell, RefCell};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt;
use std::ops::Deref;
use std::rc::Rc;
use std::sync::Arc;
use std::time::Duration;

pub use backend::{DiskDir, SegmentDir, SegmentFile, SegmentMap};
use segment::SegmentName;

/// Per-shard identity of a record; stable across compaction and restarts. Ids are never reused
/// for a record that was ever reported durable: each segment header persists a floor above
/// every id allocated before it. (An id allocated but never appended before a crash may be
/// handed out again; nothing on disk names it.) Id 0 is never allocated.
#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RecordId(pub u64);

impl fmt::Display for RecordId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:016X}", self.0)
    }
}

/// Tunables of one shard's log.
#[derive(Clone, Debug)]
pub struct StoreOptions {
    /// Size segments are preallocated to; a record larger than this gets a segment of its own.
    pub segment_size_bytes: u64,
    /// Largest payload [`Store::append`] accepts (at most [`record::MAX_PAYLOAD_BYTES`]).
    pub max_record_bytes: u64,
    /// A sealed segment whose live records take less than this share of its used bytes is
    /// compacted by [`Store::reclaim`].
    pub compact_below_live_percent: u8,
    /// Upper bound on the bytes one [`Store::reclaim`] call copies, to bound its duration.
    pub reclaim_max_copy_bytes: u64,
    /// Payloads up to this size are copied behind their header and written with one io_uring
    /// write; larger ones are written from the caller's buffers, one write per piece. Copying
    /// a few KiB costs less than the extra operations (measured: see `benches/store.rs`).
    pub copy_below_bytes: u64,
}

impl Default for StoreOptions {
    fn default() -> Self {
        StoreOptions {
            segment_size_bytes: 64 << 20,
            max_record_bytes: 256 << 20,
            compact_below_live_percent: 50,
            reclaim_max_copy_bytes: 256 << 20,
            copy_below_bytes: 4096,
        }
    }
}

/// Smallest segment size accepted: a header and a few small records.
pub const MIN_SEGMENT_SIZE_BYTES: u64 = 4096;
/// Most ids one tombstone record carries (bounds the record, 512 KiB).
pub const MAX_IDS_PER_TOMBSTONE: usize = 65536;
/// Records copied concurrently by compaction (bounds its memory to this many records).
const COMPACTION_BATCH_RECORDS: usize = 64;

/// Why a store operation failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The file system refused an operation; `op` says which.
    #[error("{op}: {source}")]
    Io {
        /// What we were doing.
        op: &'static str,
        /// The OS error.
        source: std::io::Error,
    },
    /// The fdatasync (or a write) covering this record failed: it is not durable, and its
    /// segment takes no more writes. SMTP answers 451 4.3.0.
    #[error("a write or fdatasync of the log failed; the record is not durable")]
    SyncFailed,
    /// The payload exceeds [`StoreOptions::max_record_bytes`].
    #[error("record of {size_bytes} bytes exceeds the limit of {max_bytes}")]
    RecordTooLarge {
        /// Requested payload size.
        size_bytes: u64,
        /// The limit.
        max_bytes: u64,
    },
    /// No live record has this id.
    #[error("no live record {0}")]
    NotFound(RecordId),
    /// The id was never allocated by [`Store::allocate_id`].
    #[error("record id {0} was never allocated")]
    UnallocatedId(RecordId),
    /// The options cannot work.
    #[error("invalid store options: {0}")]
    InvalidOptions(&'static str),
    /// A record failed its checksum when read back for copying.
    #[error("record {0} is corrupt")]
    Corrupt(RecordId),
}

fn io_error(op: &'static str) -> impl FnOnce(std::io::Error) -> StoreError {
    move |source| StoreError::Io { op, source }
}

/// A live record's payload, read in place from the segment's memory map. Cheap to clone, and
/// `Send + Sync`: another shard can send it to its socket without copying it. Holding it keeps
/// the mapping (and so the bytes) alive even after its segment was compacted or deleted.
#[derive(Clone)]
pub struct RecordRef {
    /// The segment's mapping.
    map: Arc<dyn SegmentMap>,
    /// Payload offset within the mapping.
    start: usize,
    /// Payload length.
    len: usize,
    /// Which record this is.
    id: RecordId,
    /// The upper layer's kind byte.
    kind: u8,
    /// Expected CRC32C of the payload, for [`RecordRef::verify`].
    payload_crc: u32,
}

impl RecordRef {
    /// The record's id.
    pub fn id(&self) -> RecordId {
        self.id
    }

    /// The kind byte given to [`Store::append`].
    pub fn kind(&self) -> u8 {
        self.kind
    }

    /// Asks the kernel to read the payload ahead (madvise WILLNEED), so that sending it from a
    /// cold segment does not fault inside `send()` and stall the shard.
    pub fn prefetch(&self) {
        self.map.prefetch(self.start..self.start + self.len);
    }

    /// Recomputes the payload checksum (records are verified at recovery and compaction; call
    /// this to check end to end before sending).
    pub fn verify(&self) -> bool {
        crc32c::crc32c(self) == self.payload_crc
    }
}

impl Deref for RecordRef {
    type Target = [u8];

    fn deref(&self) -> &[u8] {
        &self.map.bytes()[self.start..self.start + self.len]
    }
}

impl fmt::Debug for RecordRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RecordRef")
            .field("id", &self.id)
            .field("kind", &self.kind)
            .field("len", &self.len)
            .finish()
    }
}

/// One live record handed to index rebuilding at open.
#[derive(Clone, Debug)]
pub struct RecoveredRecord {
    /// The record's id.
    pub id: RecordId,
    /// The upper layer's kind byte.
    pub kind: u8,
    /// The payload.
    pub record: RecordRef,
}

/// What recovery found, for the log line and metrics.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RecoveryReport {
    /// Segment files read.
    pub segments: u64,
    /// Bytes of valid records verified.
    pub bytes_verified: u64,
    /// Live records handed back.
    pub live_records: u64,
    /// Payload bytes of the live records.
    pub live_payload_bytes: u64,
    /// Dead or superseded data records seen (space a reclaim will free).
    pub dead_records: u64,
    /// Bytes of torn tails cleared (unsynced appends cut by a crash).
    pub torn_tail_bytes: u64,
    /// Damaged regions skipped (before some valid record), reported as errors.
    pub corrupt_regions: u64,
    /// Bytes in those regions.
    pub corrupt_bytes: u64,
    /// Records with an intact header but a damaged payload, inside those regions.
    pub corrupt_records: u64,
    /// Segment files without a header or record (a crash while creating one), removed.
    pub empty_segments_removed: u64,
    /// Wall time of the whole open.
    pub elapsed: Duration,
}

/// What [`Store::open`] hands back besides the store.
#[derive(Debug)]
pub struct Recovered {
    /// Every live record, in log order (a compacted record appears where its copy is).
    pub records: Vec<RecoveredRecord>,
    /// What recovery found.
    pub report: RecoveryReport,
}

/// What one [`Store::reclaim`] did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ReclaimReport {
    /// Segments deleted because nothing in them was live any more.
    pub segments_deleted: u64,
    /// Sparse segments whose live records were copied forward, then deleted.
    pub segments_compacted: u64,
    /// Live records copied by compaction.
    pub records_copied: u64,
    /// Payload bytes copied by compaction.
    pub bytes_copied: u64,
    /// Tombstoned ids rewritten because the records they kill still exist elsewhere.
    pub tombstones_carried: u64,
    /// File bytes given back to the file system.
    pub bytes_freed: u64,
}

/// Counters for metrics; all monotonic.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct StoreStats {
    /// Data records reported durable.
    pub appends: u64,
    /// Payload bytes of those records.
    pub append_payload_bytes: u64,
    /// Tombstone records reported durable.
    pub tombstones: u64,
    /// fdatasync calls completed (one per dirty segment per group-commit round).
    pub fdatasyncs: u64,
    /// fdatasync calls that failed.
    pub fdatasync_failures: u64,
    /// Group-commit rounds completed.
    pub commit_rounds: u64,
    /// Of the rounds begun, those begun while another was still in flight.
    pub overlapping_rounds: u64,
    /// Total time spent in group-commit rounds.
    pub commit_nanos_total: u64,
    /// Longest group-commit round.
    pub commit_nanos_max: u64,
    /// Segments created.
    pub segments_created: u64,
    /// Of those, segments that were a zero-filled spare made ahead of time.
    pub segments_from_spare: u64,
    /// Segments deleted (empty or compacted).
    pub segments_deleted: u64,
    /// Payload bytes copied by compaction.
    pub compaction_bytes_copied: u64,
    /// Payload bytes copied behind their record header: whole small records (see
    /// [`StoreOptions::copy_below_bytes`]) and the small leading pieces of large ones;
    /// everything else is written without a copy.
    pub payload_bytes_copied: u64,
}

/// Where a live record is.
#[derive(Copy, Clone, Debug)]
struct Location {
    seq: u64,
    offset: u64,
    payload_len: u32,
    payload_crc: u32,
    kind: u8,
}

impl Location {
    fn encoded_len(&self) -> u64 {
        record::encoded_len(u64::from(self.payload_len))
    }
}

/// One segment file and what the store knows about it.
struct Segment<F> {
    /// Sequence number and checksum salt.
    name: SegmentName,
    /// Open handle; shared with in-flight writes.
    file: Rc<F>,
    /// A second open file description of the same file, so that two commit rounds can sync it
    /// at once (see [`log::MAX_ROUNDS_IN_FLIGHT`]); only a segment that takes appends has one.
    /// It is opened before anything is appended to the segment: a description opened later
    /// would not hear of a writeback error that happened before it existed.
    twin: Option<Rc<F>>,
    /// Which descriptions a commit round is syncing now: `[file, twin]`. Linux reports a
    /// writeback error once per description, so two rounds never share one.
    syncing: [bool; 2],
    /// File size (preallocated).
    size_bytes: u64,
    /// Next free byte: everything below it is reserved or written.
    write_offset: u64,
    /// The live mapping, when the backend's mappings are live.
    map: Option<Arc<dyn SegmentMap>>,
    /// Records reserved but not fully written yet.
    writes_in_flight: u32,
    /// Records written whose append has not resolved yet.
    awaiting_sync: u32,
    /// Written since the last group-commit round that syncs it began.
    dirty: bool,
    /// The newest commit round that synced this file without error: every record written here
    /// before that round began is durable.
    synced_through: u64,
    /// A write or fdatasync failed on this file (or a round syncing it was abandoned): it takes
    /// no more writes, is never synced again, and no record not yet acknowledged in it ever
    /// will be.
    poisoned: bool,
    /// The file was unlinked but the directory sync making that durable failed: the next
    /// reclaim retries the sync before forgetting the segment.
    unlinked: bool,
    /// Created by this process with `fallocate` only (no spare was ready), so its unwritten
    /// extents make every commit pay a journal commit; see [`Store::switch_to_spare_early`].
    unwritten_extents: bool,
    /// Live data records located here.
    live_records: u64,
    /// Their encoded bytes.
    live_bytes: u64,
    /// Every data record here, live or not (one entry per occurrence).
    data_ids: Vec<RecordId>,
    /// Every id a tombstone here kills.
    tombstoned: Vec<RecordId>,
}

impl<F: SegmentFile> Segment<F> {
    /// A segment as it is opened or created: nothing in flight, nothing counted yet.
    fn new(
        name: SegmentName,
        file: Rc<F>,
        size_bytes: u64,
        write_offset: u64,
        map: Option<Arc<dyn SegmentMap>>,
    ) -> Self {
        Segment {
            name,
            file,
            twin: None,
            syncing: [false; 2],
            size_bytes,
            write_offset,
            map,
            writes_in_flight: 0,
            awaiting_sync: 0,
            dirty: false,
            synced_through: 0,
            poisoned: false,
            unlinked: false,
            unwritten_extents: false,
            live_records: 0,
            live_bytes: 0,
            data_ids: Vec::new(),
            tombstoned: Vec::new(),
        }
    }

    fn map(&self) -> Result<Arc<dyn SegmentMap>, StoreError> {
        match &self.map {
            Some(map) => Ok(map.clone()),
            None => self
                .file
                .map(self.size_bytes)
                .map_err(io_error("map segment")),
        }
    }

    /// A description of this file no commit round is syncing now, with its slot in `syncing`.
    fn free_sync_handle(&self) -> Option<(usize, Rc<F>)> {
        [Some(&self.file), self.twin.as_ref()]
            .into_iter()
            .enumerate()
            .find_map(|(slot, file)| Some((slot, Rc::clone(file?))).filter(|_| !self.syncing[slot]))
    }

    fn is_quiet(&self) -> bool {
        self.writes_in_flight == 0 && self.awaiting_sync == 0 && !self.dirty
    }
}

/// Everything mutable, behind one RefCell (never borrowed across an await).
struct State<F> {
    segments: BTreeMap<u64, Segment<F>>,
    /// The segment appends go to; None only before open finished or after a failed roll.
    active: Option<u64>,
    next_seq: u64,
    next_id: u64,
    /// A task is creating the next segment; appenders wait for it.
    rolling: bool,
    /// Live records.
    index: HashMap<RecordId, Location>,
    /// Ids killed by a durable tombstone whose records still exist in some segment.
    dead: HashSet<RecordId>,
    /// Per id: data records (live or dead) with this id across all segments.
    record_holders: HashMap<RecordId, u32>,
    /// Per id: tombstones killing it across all segments.
    tombstone_holders: HashMap<RecordId, u32>,
    commit_rounds_started: u64,
    rounds_in_flight: u32,
    /// Record writes started (reservations) and finished (written, failed or abandoned): a
    /// would-be commit leader first lets the writes already started finish, so one round
    /// covers a whole wave of concurrent appenders instead of the first few.
    writes_started: u64,
    writes_finished: u64,
    /// While a would-be leader waits: the `writes_finished` value it waits for.
    gather_until: Option<u64>,
    stats: StoreStats,
}

impl<F> Default for State<F> {
    fn default() -> Self {
        State {
            segments: BTreeMap::new(),
            active: None,
            next_seq: 1,
            next_id: 1,
            rolling: false,
            index: HashMap::new(),
            dead: HashSet::new(),
            record_holders: HashMap::new(),
            tombstone_holders: HashMap::new(),
            commit_rounds_started: 0,
            rounds_in_flight: 0,
            writes_started: 0,
            writes_finished: 0,
            gather_until: None,
            stats: StoreStats::default(),
        }
    }
}

/// One shard's log. `!Send`: it lives on its shard's executor, and only that shard appends,
/// marks dead, and reclaims; other shards get [`RecordRef`]s.
pub struct Store<D: SegmentDir = DiskDir> {
    /// The segment directory.
    dir: D,
    /// Tunables.
    opts: StoreOptions,
    /// Segments, index and group-commit state.
    state: RefCell<State<D::File>>,
    /// Woken when a commit round or a segment roll finishes.
    changed: wait::Notify,
    /// A reclaim is running (one at a time).
    reclaiming: Cell<bool>,
    /// The next segment, made ahead of time.
    spare: spare::SpareSlot<D::File>,
}

impl<D: SegmentDir> Store<D> {
    /// Allocates the id the next record will carry (SMTP needs the queue id before it builds
    /// the record). Ids may be appended out of order.
    pub fn allocate_id(&self) -> RecordId {
        let mut st = self.state.borrow_mut();
        let id = RecordId(st.next_id);
        st.next_id += 1;
        id
    }

    /// Zero-copy read of a live record's payload.
    pub fn read(&self, id: RecordId) -> Result<RecordRef, StoreError> {
        let st = self.state.borrow();
        let loc = *st.index.get(&id).ok_or(StoreError::NotFound(id))?;
        let map = st.segments[&loc.seq].map()?;
        let start = (loc.offset as usize) + record::HEADER_BYTES;
        if start + loc.payload_len as usize > map.bytes().len() {
            return Err(StoreError::Corrupt(id));
        }
        Ok(RecordRef {
            map,
            start,
            len: loc.payload_len as usize,
            id,
            kind: loc.kind,
            payload_crc: loc.payload_crc,
        })
    }

    /// Whether `id` is live.
    pub fn contains(&self, id: RecordId) -> bool {
        self.state.borrow().index.contains_key(&id)
    }

    /// Number of live records.
    pub fn live_records(&self) -> usize {
        self.state.borrow().index.len()
    }

    /// Segment files currently held.
    pub fn segment_count(&self) -> usize {
        self.state.borrow().segments.len()
    }

    /// Counters for metrics.
    pub fn stats(&self) -> StoreStats {
        self.state.borrow().stats.clone()
    }

    /// Free space on the log's file system (statvfs); 0 when it cannot be read, so callers
    /// that refuse mail below a floor fail safe.
    pub fn free_space_bytes(&self) -> u64 {
        self.dir.free_space_bytes().unwrap_or(0)
    }

    /// The directory backend (tests reach the fault injector through it).
    pub fn dir(&self) -> &D {
        &self.dir
    }
}
