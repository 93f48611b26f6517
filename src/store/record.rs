//! The on-disk record codec: a 32-byte header (type, kind, id, length, CRC32C of the payload,
//! CRC32C of the header) followed by the payload, padded to 8 bytes.
//!
//! The header CRC is seeded with a per-segment salt (kept in the segment's file name), so bytes
//! inside a payload (a mailed copy of a segment, say) can never pass for a record when recovery
//! resynchronises after a torn or corrupt region.

use super::RecordId;

/// Size of every record header; payloads start right after it.
pub const HEADER_BYTES: usize = 32;
/// Records start at multiples of this, so recovery can resynchronise by stepping over it.
pub const ALIGN_BYTES: u64 = 8;
/// "RMLG": lets recovery skip non-record words without computing a CRC.
pub const MAGIC: u32 = 0x474C_4D52;
/// Hard upper bound for a payload (the length field is a u32; we stay well below it).
pub const MAX_PAYLOAD_BYTES: u64 = 1 << 30;

/// What a record is, as far as the store is concerned (upper layers use [`RecordHeader::kind`]).
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum RecordType {
    /// First record of every segment: format version, sequence number, id floor.
    SegmentHeader = 1,
    /// A record appended by an upper layer (a message, a delivery outcome...).
    Data = 2,
    /// A list of record ids that are dead from now on.
    Tombstone = 3,
}

impl RecordType {
    fn from_u8(value: u8) -> Option<RecordType> {
        match value {
            1 => Some(RecordType::SegmentHeader),
            2 => Some(RecordType::Data),
            3 => Some(RecordType::Tombstone),
            _ => None,
        }
    }
}

/// The decoded fixed-size header of one record.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct RecordHeader {
    /// Store-level meaning of the record.
    pub record_type: RecordType,
    /// Opaque to the store; owned by upper layers (0 for store-internal records).
    pub kind: u8,
    /// Identity of a data record (0 for store-internal records).
    pub id: RecordId,
    /// Exact payload length, excluding header and padding.
    pub payload_len: u32,
    /// CRC32C (unseeded) of the payload, so a copy between segments keeps it.
    pub payload_crc: u32,
}

/// Why bytes at some offset are not a valid record.
#[derive(Copy, Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum RecordError {
    /// Fewer than [`HEADER_BYTES`] bytes left: a torn header or the end of the segment.
    #[error("header cut short")]
    ShortHeader,
    /// The first word is not [`MAGIC`]: zeros, garbage, or the middle of something else.
    #[error("bad magic")]
    BadMagic,
    /// The header checksum does not match: a torn or flipped header.
    #[error("header checksum mismatch")]
    HeaderCrc,
    /// The checksum matched but a field holds a value this version never writes.
    #[error("invalid header field")]
    InvalidField,
    /// The header is intact but the payload runs past the end of the segment.
    #[error("payload cut short")]
    ShortPayload(RecordHeader),
    /// The header is intact but the payload checksum does not match (torn or flipped payload).
    #[error("payload checksum mismatch")]
    PayloadCrc(RecordHeader),
}

impl RecordHeader {
    /// Serialises the header; `salt` is the segment's seed for the header checksum.
    pub fn encode(&self, salt: u32) -> [u8; HEADER_BYTES] {
        let mut out = [0u8; HEADER_BYTES];
        out[0..4].copy_from_slice(&MAGIC.to_le_bytes());
        out[8..12].copy_from_slice(&self.payload_len.to_le_bytes());
        out[12] = self.record_type as u8;
        out[13] = self.kind;
        out[16..24].copy_from_slice(&self.id.0.to_le_bytes());
        out[24..28].copy_from_slice(&self.payload_crc.to_le_bytes());
        let header_crc = crc32c::crc32c_append(salt, &out[8..]);
        out[4..8].copy_from_slice(&header_crc.to_le_bytes());
        out
    }

    /// Parses and verifies a header (not the payload).
    pub fn decode(bytes: &[u8], salt: u32) -> Result<RecordHeader, RecordError> {
        let bytes = bytes.get(..HEADER_BYTES).ok_or(RecordError::ShortHeader)?;
        if read_u32(bytes, 0) != MAGIC {
            return Err(RecordError::BadMagic);
        }
        if read_u32(bytes, 4) != crc32c::crc32c_append(salt, &bytes[8..]) {
            return Err(RecordError::HeaderCrc);
        }
        let record_type = RecordType::from_u8(bytes[12]).ok_or(RecordError::InvalidField)?;
        let payload_len = read_u32(bytes, 8);
        let reserved_are_zero = bytes[14..16] == [0, 0] && bytes[28..32] == [0, 0, 0, 0];
        if !reserved_are_zero || u64::from(payload_len) > MAX_PAYLOAD_BYTES {
            return Err(RecordError::InvalidField);
        }
        Ok(RecordHeader {
            record_type,
            kind: bytes[13],
            id: RecordId(u64::from_le_bytes(
                bytes[16..24].try_into().expect("8 bytes"),
            )),
            payload_len,
            payload_crc: read_u32(bytes, 24),
        })
    }

    /// Bytes this record occupies in a segment, padding included.
    pub fn encoded_len(&self) -> u64 {
        encoded_len(u64::from(self.payload_len))
    }
}

/// Bytes a record with `payload_len` payload bytes occupies, header and padding included.
pub fn encoded_len(payload_len: u64) -> u64 {
    (HEADER_BYTES as u64 + payload_len).div_ceil(ALIGN_BYTES) * ALIGN_BYTES
}

/// CRC32C of a payload given as pieces, without concatenating them.
pub fn payload_crc<P: AsRef<[u8]>>(pieces: &[P]) -> u32 {
    pieces
        .iter()
        .fold(0, |crc, piece| crc32c::crc32c_append(crc, piece.as_ref()))
}

/// Decodes and fully verifies the record starting at `offset` of `segment`; returns the header
/// and the payload's range within `segment`.
pub fn decode_at(
    segment: &[u8],
    offset: usize,
    salt: u32,
) -> Result<(RecordHeader, std::ops::Range<usize>), RecordError> {
    let header = RecordHeader::decode(segment.get(offset..).unwrap_or(&[]), salt)?;
    let start = offset + HEADER_BYTES;
    let end = start + header.payload_len as usize;
    let payload = segment
        .get(start..end)
        .ok_or(RecordError::ShortPayload(header))?;
    if crc32c::crc32c(payload) != header.payload_crc {
        return Err(RecordError::PayloadCrc(header));
    }
    Ok((header, start..end))
}

fn read_u32(bytes: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(bytes[at..at + 4].try_into().expect("4 bytes"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn encode_record(header: &RecordHeader, payload: &[u8], salt: u32) -> Vec<u8> {
        let mut out = header.encode(salt).to_vec();
        out.extend_from_slice(payload);
        out.resize(header.encoded_len() as usize, 0);
        out
    }

    fn data_header(payload: &[u8]) -> RecordHeader {
        RecordHeader {
            record_type: RecordType::Data,
            kind: 7,
            id: RecordId(42),
            payload_len: payload.len() as u32,
            payload_crc: payload_crc(&[payload]),
        }
    }

    #[test]
    fn encoded_len_pads_to_alignment() {
        for (payload, expected) in [(0, 32), (1, 40), (8, 40), (9, 48), (1024, 1056)] {
            assert_eq!(encoded_len(payload), expected, "payload {payload}");
        }
    }

    #[test]
    fn payload_crc_of_pieces_equals_crc_of_concatenation() {
        let whole = crc32c::crc32c(b"hello, world");
        assert_eq!(payload_crc(&[&b"hello"[..], b", ", b"", b"world"]), whole);
    }

    #[test]
    fn round_trip() {
        let payload = b"Received: by test\r\n\r\nbody\r\n";
        let header = data_header(payload);
        let bytes = encode_record(&header, payload, 99);
        let (decoded, range) = decode_at(&bytes, 0, 99).unwrap();
        assert_eq!(decoded, header);
        assert_eq!(&bytes[range], payload);
    }

    #[test]
    fn damage_is_classified() {
        let payload = b"0123456789abcdef";
        let header = data_header(payload);
        let good = encode_record(&header, payload, 5);
        type Damage = fn(&mut Vec<u8>);
        let table: [(&str, Damage, RecordError); 7] = [
            (
                "flipped payload bit",
                |b| b[40] ^= 1,
                RecordError::PayloadCrc(header),
            ),
            ("flipped id bit", |b| b[16] ^= 1, RecordError::HeaderCrc),
            ("flipped magic", |b| b[0] ^= 1, RecordError::BadMagic),
            ("zeroed header", |b| b[..32].fill(0), RecordError::BadMagic),
            ("short header", |b| b.truncate(20), RecordError::ShortHeader),
            (
                "short payload",
                |b| b.truncate(40),
                RecordError::ShortPayload(header),
            ),
            (
                "zeroed payload",
                |b| b[32..].fill(0),
                RecordError::PayloadCrc(header),
            ),
        ];
        for (name, damage, expected) in table {
            let mut bytes = good.clone();
            damage(&mut bytes);
            assert_eq!(decode_at(&bytes, 0, 5).unwrap_err(), expected, "{name}");
        }
    }

    #[test]
    fn wrong_salt_rejects_header() {
        let header = data_header(b"x");
        let bytes = encode_record(&header, b"x", 1);
        assert_eq!(decode_at(&bytes, 0, 2).unwrap_err(), RecordError::HeaderCrc);
    }

    #[test]
    fn nonzero_reserved_field_is_invalid() {
        let header = data_header(b"");
        let mut bytes = header.encode(0);
        bytes[14] = 1;
        let crc = crc32c::crc32c_append(0, &bytes[8..]);
        bytes[4..8].copy_from_slice(&crc.to_le_bytes());
        assert_eq!(
            RecordHeader::decode(&bytes, 0).unwrap_err(),
            RecordError::InvalidField
        );
    }

    proptest! {
        #[test]
        fn decode_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..200), offset in 0usize..220, salt: u32) {
            let _ = decode_at(&bytes, offset, salt);
        }

        #[test]
        fn encode_decode_round_trips(payload in proptest::collection::vec(any::<u8>(), 0..300), kind: u8, id: u64, salt: u32) {
            let header = RecordHeader { kind, id: RecordId(id), ..data_header(&payload) };
            let bytes = encode_record(&header, &payload, salt);
            let (decoded, range) = decode_at(&bytes, 0, salt).unwrap();
            prop_assert_eq!(decoded, header);
            prop_assert_eq!(&bytes[range], &payload[..]);
        }

        #[test]
        fn any_single_bit_flip_is_detected(payload in proptest::collection::vec(any::<u8>(), 1..64), bit in 0usize..(96 * 8)) {
            let header = data_header(&payload);
            let mut bytes = encode_record(&header, &payload, 3);
            let bit = bit % ((HEADER_BYTES + payload.len()) * 8);
            bytes[bit / 8] ^= 1 << (bit % 8);
            prop_assert!(decode_at(&bytes, 0, 3).is_err());
        }
    }
}
