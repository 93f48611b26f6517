//! Segment files: their names, their header record, and the pure scan that recovery runs over
//! a segment's bytes (no I/O here, so every kind of damage is unit-tested on plain buffers).

use super::record::{
    self, RecordError, RecordHeader, RecordType, ALIGN_BYTES, HEADER_BYTES, MAGIC,
};
use super::RecordId;

/// Version written in every segment header; recovery refuses nothing, but reports others.
pub const FORMAT_VERSION: u32 = 1;
/// Payload bytes of the segment-header record.
pub const SEGMENT_HEADER_PAYLOAD_BYTES: usize = 32;
/// Bytes the segment-header record occupies at the start of every segment.
pub const SEGMENT_HEADER_BYTES: u64 = (HEADER_BYTES + SEGMENT_HEADER_PAYLOAD_BYTES) as u64;

/// Identity of a segment file, all of it carried by its name so that it survives damage to
/// the file's contents: `seg-<seq:016x>-<salt:08x>.log`.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct SegmentName {
    /// Order of segments in the log; never reused within a shard directory.
    pub seq: u64,
    /// Random seed of this segment's header checksums (see [`record`]).
    pub salt: u32,
}

impl SegmentName {
    /// The file name.
    pub fn file_name(&self) -> String {
        format!("seg-{:016x}-{:08x}.log", self.seq, self.salt)
    }

    /// Parses a file name made by [`SegmentName::file_name`]; anything else is not ours.
    pub fn parse(name: &str) -> Option<SegmentName> {
        let rest = name.strip_prefix("seg-")?.strip_suffix(".log")?;
        let (seq, salt) = rest.split_once('-')?;
        if seq.len() != 16 || salt.len() != 8 {
            return None;
        }
        Some(SegmentName {
            seq: u64::from_str_radix(seq, 16).ok()?,
            salt: u32::from_str_radix(salt, 16).ok()?,
        })
    }
}

/// Contents of the record at offset 0 of every segment.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct SegmentHeader {
    /// [`FORMAT_VERSION`] of the writer.
    pub version: u32,
    /// Same as in the file name; a mismatch means a renamed or copied file.
    pub seq: u64,
    /// Every id allocated before this segment was created is below this: ids stay unique even
    /// after every segment holding records was deleted.
    pub id_floor: u64,
    /// Preallocated size of the file.
    pub size_bytes: u64,
}

impl SegmentHeader {
    /// The complete header record (header + payload), ready to write at offset 0.
    pub fn encode_record(&self, salt: u32) -> Vec<u8> {
        let mut payload = [0u8; SEGMENT_HEADER_PAYLOAD_BYTES];
        payload[0..4].copy_from_slice(&self.version.to_le_bytes());
        payload[8..16].copy_from_slice(&self.seq.to_le_bytes());
        payload[16..24].copy_from_slice(&self.id_floor.to_le_bytes());
        payload[24..32].copy_from_slice(&self.size_bytes.to_le_bytes());
        let header = RecordHeader {
            record_type: RecordType::SegmentHeader,
            kind: 0,
            id: RecordId(0),
            payload_len: SEGMENT_HEADER_PAYLOAD_BYTES as u32,
            payload_crc: crc32c::crc32c(&payload),
        };
        let mut out = header.encode(salt).to_vec();
        out.extend_from_slice(&payload);
        out
    }

    fn decode_payload(payload: &[u8]) -> Option<SegmentHeader> {
        if payload.len() != SEGMENT_HEADER_PAYLOAD_BYTES {
            return None;
        }
        let u64_at = |at: usize| u64::from_le_bytes(payload[at..at + 8].try_into().expect("8"));
        Some(SegmentHeader {
            version: u32::from_le_bytes(payload[0..4].try_into().expect("4")),
            seq: u64_at(8),
            id_floor: u64_at(16),
            size_bytes: u64_at(24),
        })
    }
}

/// One valid record found by [`scan`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ScannedRecord {
    /// Offset of the record's header in the segment.
    pub offset: u64,
    /// The verified header.
    pub header: RecordHeader,
}

/// A stretch of bytes between valid records that holds something other than zeros.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CorruptRegion {
    /// First byte of the region.
    pub start: u64,
    /// One past the last byte of the region.
    pub end: u64,
    /// Records in the region whose header was intact (their payload was not).
    pub damaged_records: u32,
}

/// Everything recovery needs to know about one segment's bytes.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SegmentScan {
    /// The decoded header record, if offset 0 holds one.
    pub header: Option<SegmentHeader>,
    /// Valid data and tombstone records, in file order.
    pub records: Vec<ScannedRecord>,
    /// Damaged regions followed by a valid record: reported and skipped.
    pub corrupt: Vec<CorruptRegion>,
    /// End of the last valid record: appends after a crash were torn beyond it.
    pub valid_end: u64,
    /// End of the last nonzero byte after `valid_end` (rounded up to alignment): the torn tail
    /// is `valid_end..tail_end`, empty when the segment ends cleanly.
    pub tail_end: u64,
}

impl SegmentScan {
    /// Bytes of torn tail that recovery must clear.
    pub fn torn_tail_bytes(&self) -> u64 {
        self.tail_end - self.valid_end
    }
}

/// Scans a whole segment. Never panics and never trusts a length from a header whose checksum
/// failed; after damage it resynchronises at the next aligned offset holding a valid header.
pub fn scan(bytes: &[u8], salt: u32) -> SegmentScan {
    let mut out = SegmentScan::default();
    let mut pos = 0usize;
    // Start of the damaged (or zero) stretch we are in, and intact headers seen inside it.
    let mut gap: Option<(usize, u32)> = None;
    while pos + HEADER_BYTES <= bytes.len() {
        if bytes[pos..pos + 4] != MAGIC.to_le_bytes() {
            gap.get_or_insert((pos, 0));
            pos += ALIGN_BYTES as usize;
            continue;
        }
        match record::decode_at(bytes, pos, salt) {
            Ok((header, payload)) => {
                if let Some((start, damaged_records)) = gap.take() {
                    let region = &bytes[start..pos];
                    if damaged_records > 0 || region.iter().any(|&b| b != 0) {
                        out.corrupt.push(CorruptRegion {
                            start: start as u64,
                            end: pos as u64,
                            damaged_records,
                        });
                    }
                }
                match header.record_type {
                    RecordType::SegmentHeader if pos == 0 => {
                        out.header = SegmentHeader::decode_payload(&bytes[payload]);
                    }
                    // A segment header anywhere else is a stray copy: ignore it.
                    RecordType::SegmentHeader => {}
                    RecordType::Data | RecordType::Tombstone => out.records.push(ScannedRecord {
                        offset: pos as u64,
                        header,
                    }),
                }
                pos += header.encoded_len() as usize;
                out.valid_end = pos as u64;
            }
            Err(RecordError::PayloadCrc(header)) => {
                // The header is intact, so its length can be trusted to step over the payload.
                let entry = gap.get_or_insert((pos, 0));
                entry.1 += 1;
                pos += header.encoded_len() as usize;
            }
            Err(_) => {
                gap.get_or_insert((pos, 0));
                pos += ALIGN_BYTES as usize;
            }
        }
    }
    let valid_end = out.valid_end as usize;
    let last_nonzero = bytes
        .get(valid_end..)
        .unwrap_or(&[])
        .iter()
        .rposition(|&b| b != 0);
    out.tail_end = match last_nonzero {
        Some(at) => (valid_end + at + 1)
            .next_multiple_of(ALIGN_BYTES as usize)
            .min(bytes.len()) as u64,
        None => out.valid_end,
    };
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::record::{encoded_len, payload_crc};
    use proptest::prelude::*;

    const SALT: u32 = 0xfeed;

    fn segment_with(payloads: &[&[u8]], size: usize) -> (Vec<u8>, Vec<u64>) {
        segment_salted(payloads, size, SALT)
    }

    fn segment_salted(payloads: &[&[u8]], size: usize, salt: u32) -> (Vec<u8>, Vec<u64>) {
        let mut bytes = SegmentHeader {
            version: 1,
            seq: 3,
            id_floor: 10,
            size_bytes: size as u64,
        }
        .encode_record(salt);
        let mut offsets = Vec::new();
        for (i, payload) in payloads.iter().enumerate() {
            offsets.push(bytes.len() as u64);
            let header = RecordHeader {
                record_type: RecordType::Data,
                kind: 1,
                id: RecordId(10 + i as u64),
                payload_len: payload.len() as u32,
                payload_crc: payload_crc(&[payload]),
            };
            bytes.extend_from_slice(&header.encode(salt));
            bytes.extend_from_slice(payload);
            bytes.resize(
                *offsets.last().unwrap() as usize + encoded_len(payload.len() as u64) as usize,
                0,
            );
        }
        bytes.resize(size, 0);
        (bytes, offsets)
    }

    fn ids(scan: &SegmentScan) -> Vec<u64> {
        scan.records.iter().map(|r| r.header.id.0).collect()
    }

    #[test]
    fn names_round_trip_and_reject_strangers() {
        let name = SegmentName {
            seq: 0x1234,
            salt: 0xdead_beef,
        };
        assert_eq!(name.file_name(), "seg-0000000000001234-deadbeef.log");
        assert_eq!(SegmentName::parse(&name.file_name()), Some(name));
        for stranger in [
            "seg-1-2.log",
            "seg-0000000000001234-deadbeef.tmp",
            "lost+found",
            "seg-000000000000123g-deadbeef.log",
        ] {
            assert_eq!(SegmentName::parse(stranger), None, "{stranger}");
        }
    }

    #[test]
    fn clean_segment() {
        let (bytes, offsets) = segment_with(&[b"one", b"two two", b""], 4096);
        let scan = scan(&bytes, SALT);
        assert_eq!(
            scan.header,
            Some(SegmentHeader {
                version: 1,
                seq: 3,
                id_floor: 10,
                size_bytes: 4096
            })
        );
        assert_eq!(ids(&scan), [10, 11, 12]);
        assert_eq!(scan.records[1].offset, offsets[1]);
        assert!(scan.corrupt.is_empty());
        assert_eq!(scan.torn_tail_bytes(), 0);
        assert_eq!(scan.valid_end, offsets[2] + 32);
    }

    #[test]
    fn damage_table() {
        let payloads: [&[u8]; 4] = [
            b"first record",
            b"second record",
            b"third record",
            b"fourth",
        ];
        let (good, offsets) = segment_with(&payloads, 1024);
        let end = offsets[3] as usize + encoded_len(6) as usize;
        type Damage = Box<dyn Fn(&mut Vec<u8>)>;
        struct Case {
            name: &'static str,
            damage: Damage,
            ids: Vec<u64>,
            corrupt_regions: usize,
            torn_tail: bool,
        }
        let at: [usize; 4] = std::array::from_fn(|i| offsets[i] as usize);
        let cases = vec![
            Case {
                name: "torn tail: last payload half written",
                damage: Box::new(move |b| b[at[3] + 35..end].fill(0)),
                ids: vec![10, 11, 12],
                corrupt_regions: 0,
                torn_tail: true,
            },
            Case {
                name: "torn tail: last header half written",
                damage: Box::new(move |b| b[at[3] + 16..end].fill(0)),
                ids: vec![10, 11, 12],
                corrupt_regions: 0,
                torn_tail: true,
            },
            Case {
                name: "zero-filled tail",
                damage: Box::new(move |b| b[at[2]..].fill(0)),
                ids: vec![10, 11],
                corrupt_regions: 0,
                torn_tail: false,
            },
            Case {
                name: "garbage appended",
                damage: Box::new(move |b| b[end..end + 100].fill(0xa5)),
                ids: vec![10, 11, 12, 13],
                corrupt_regions: 0,
                torn_tail: true,
            },
            Case {
                name: "flipped payload bit in the middle",
                damage: Box::new(move |b| b[at[1] + 40] ^= 4),
                ids: vec![10, 12, 13],
                corrupt_regions: 1,
                torn_tail: false,
            },
            Case {
                name: "flipped header bit in the middle",
                damage: Box::new(move |b| b[at[1] + 9] ^= 1),
                ids: vec![10, 12, 13],
                corrupt_regions: 1,
                torn_tail: false,
            },
            Case {
                name: "zero hole in the middle (an unwritten reservation)",
                damage: Box::new(move |b| b[at[1]..at[2]].fill(0)),
                ids: vec![10, 12, 13],
                corrupt_regions: 0,
                torn_tail: false,
            },
            Case {
                name: "flipped bit in the last record",
                damage: Box::new(move |b| b[at[3] + 33] ^= 1),
                ids: vec![10, 11, 12],
                corrupt_regions: 0,
                torn_tail: true,
            },
        ];
        for case in cases {
            let mut bytes = good.clone();
            (case.damage)(&mut bytes);
            let scan = scan(&bytes, SALT);
            assert_eq!(ids(&scan), case.ids, "{}", case.name);
            assert_eq!(scan.corrupt.len(), case.corrupt_regions, "{}", case.name);
            assert_eq!(scan.torn_tail_bytes() > 0, case.torn_tail, "{}", case.name);
        }
    }

    #[test]
    fn garbage_tail_rounds_up_but_stays_inside_the_segment() {
        let (mut bytes, _) = segment_with(&[b"a"], 203);
        *bytes.last_mut().unwrap() = 1;
        let scan = scan(&bytes, SALT);
        assert_eq!(scan.tail_end, 203);
    }

    #[test]
    fn record_smuggled_in_a_payload_is_not_resurrected_after_resync() {
        // A payload holding a valid segment of another shard (another salt), e.g. a mailed file.
        let (inner, _) = segment_salted(&[b"smuggled"], 200, SALT ^ 1);
        let (mut bytes, offsets) = segment_with(&[&inner[..]], 1024);
        bytes[offsets[0] as usize + 4] ^= 1; // corrupt the outer header: recovery must resync
        let scan = scan(&bytes, SALT);
        assert!(ids(&scan).is_empty());
        assert_eq!(scan.valid_end, SEGMENT_HEADER_BYTES);
    }

    proptest! {
        #[test]
        fn scan_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..600), salt: u32) {
            let scan = scan(&bytes, salt);
            prop_assert!(scan.valid_end <= scan.tail_end);
            prop_assert!(scan.tail_end as usize <= bytes.len().max(scan.valid_end as usize));
        }

        #[test]
        fn damage_after_a_record_never_loses_it(cut in 0usize..400, fill: u8) {
            let (mut bytes, offsets) = segment_with(&[b"keep me", b"maybe", b"maybe too"], 400);
            let keep_end = offsets[1] as usize;
            let cut = cut.max(keep_end);
            bytes[cut..].fill(fill);
            let scan = scan(&bytes, SALT);
            prop_assert_eq!(ids(&scan)[0], 10);
        }
    }
}
