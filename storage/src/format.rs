//! On-disk format, mirroring `docs/storage-format.md` (version 3). All integers little endian.

use std::net::{IpAddr, SocketAddr};

use rkyv::rancor;

use crate::ExchangeRecord;
use rkyv::util::AlignedVec;

/// Format version written in every file header.
pub const FORMAT_VERSION: u32 = 3;
/// Oldest version whose segments and dictionaries this build reads (same layout).
pub const FORMAT_VERSION_READ_MIN: u32 = 2;

pub const SEGMENT_MAGIC: [u8; 8] = *b"SLUICESG";
pub const DICTIONARY_MAGIC: [u8; 8] = *b"SLUICEDI";
pub const SEALED_MAGIC: [u8; 8] = *b"SLUICESM";

/// File header: magic 0..8, version 8..12, shard 12..16, window_start 16..24,
/// partition_secs 24..32, seq 32..40, reserved 40..44, header_crc 44..48.
pub const FILE_HEADER_BYTES: usize = 48;
const FILE_HEADER_CRC_OFFSET: usize = 44;

/// Frame magic "SLBK": a block of records in a segment.
pub const BLOCK_MAGIC: u32 = u32::from_le_bytes(*b"SLBK");
/// Frame magic "SLCM": a commit record in a segment (block count and acknowledged exchanges).
pub const COMMIT_MAGIC: u32 = u32::from_le_bytes(*b"SLCM");
/// Frame magic "SLDE": dictionary entries.
pub const DICTIONARY_FRAME_MAGIC: u32 = u32::from_le_bytes(*b"SLDE");
/// Frame magic "SLIX": the index of a sealed file (its last frame).
pub const INDEX_MAGIC: u32 = u32::from_le_bytes(*b"SLIX");

/// Frame header: magic 0..4, header_crc 4..8 (crc32c of 8..48), payload_len 8..12,
/// payload_crc 12..16, count 16..20, flags 20..24, commit_seq 24..32, min_time 32..40,
/// max_time 40..48.
pub const FRAME_HEADER_BYTES: usize = 48;
/// Frames start at multiples of this, so every payload (48 bytes after the frame start) is
/// 16-aligned in the file and in an mmap of it.
pub const FRAME_ALIGN: usize = 16;
/// Largest payload a frame may declare. Blocks are cut at `BLOCK_BYTES_TARGET` (plus one value
/// of at most `VALUE_BYTES_MAX`), so this is generous; it bounds what a corrupt length can ask for.
pub const FRAME_PAYLOAD_BYTES_MAX: usize = 64 << 20;

/// Device ids and series names are at most this many bytes (they are stored with u16 lengths).
pub const NAME_BYTES_MAX: usize = 1024;
/// A string or data value is at most this many bytes (a reading arrives in a CoAP request, which
/// the daemon bounds far below this).
pub const VALUE_BYTES_MAX: usize = 1 << 20;
/// Records per block at most: keeps blocks small enough that min/max pruning is useful.
pub const BLOCK_RECORDS_MAX: usize = 8192;
/// A block is closed once its string/data values reach this many bytes.
pub const BLOCK_BYTES_TARGET: usize = 1 << 20;

const _: () = assert!(FRAME_HEADER_BYTES & (FRAME_ALIGN - 1) == 0);
const _: () = assert!(FILE_HEADER_BYTES & (FRAME_ALIGN - 1) == 0);
const _: () = assert!(
    BLOCK_BYTES_TARGET + VALUE_BYTES_MAX + 16 * BLOCK_RECORDS_MAX * 4 < FRAME_PAYLOAD_BYTES_MAX
);
// The archive format must be rkyv's default: little endian, aligned, 32-bit lengths.
const _: () = assert!(core::mem::size_of::<rkyv::Archived<usize>>() == 4);
const _: () = assert!(core::mem::align_of::<rkyv::Archived<f64>>() == 8);
const _: () = assert!(core::mem::align_of::<rkyv::Archived<u32>>() == 4);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FileKind {
    Segment,
    Dictionary,
    /// A sealed segment, rewritten series-major (version 3).
    Sealed,
}

impl FileKind {
    fn file_magic(self) -> [u8; 8] {
        match self {
            FileKind::Segment => SEGMENT_MAGIC,
            FileKind::Dictionary => DICTIONARY_MAGIC,
            FileKind::Sealed => SEALED_MAGIC,
        }
    }
    /// The kind of frame a magic announces, if this file kind holds such frames.
    fn frame_kind(self, magic: u32) -> Option<FrameKind> {
        match (self, magic) {
            (FileKind::Segment, BLOCK_MAGIC) => Some(FrameKind::Block),
            (FileKind::Segment, COMMIT_MAGIC) => Some(FrameKind::Commit),
            (FileKind::Dictionary, DICTIONARY_FRAME_MAGIC) => Some(FrameKind::Dictionary),
            (FileKind::Sealed, BLOCK_MAGIC) => Some(FrameKind::Block),
            (FileKind::Sealed, COMMIT_MAGIC) => Some(FrameKind::Commit),
            (FileKind::Sealed, INDEX_MAGIC) => Some(FrameKind::Index),
            _ => None,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FrameKind {
    Block,
    Commit,
    Dictionary,
    /// The index of a sealed file.
    Index,
}

impl FrameKind {
    fn magic(self) -> u32 {
        match self {
            FrameKind::Block => BLOCK_MAGIC,
            FrameKind::Commit => COMMIT_MAGIC,
            FrameKind::Dictionary => DICTIONARY_FRAME_MAGIC,
            FrameKind::Index => INDEX_MAGIC,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq)]
pub struct FileHeader {
    pub kind: FileKind,
    pub shard: u32,
    pub window_start: i64,
    pub partition_secs: u64,
    pub seq: u64,
}

impl FileHeader {
    pub fn encode(&self) -> [u8; FILE_HEADER_BYTES] {
        let mut bytes = [0u8; FILE_HEADER_BYTES];
        bytes[0..8].copy_from_slice(&self.kind.file_magic());
        bytes[8..12].copy_from_slice(&FORMAT_VERSION.to_le_bytes());
        bytes[12..16].copy_from_slice(&self.shard.to_le_bytes());
        bytes[16..24].copy_from_slice(&self.window_start.to_le_bytes());
        bytes[24..32].copy_from_slice(&self.partition_secs.to_le_bytes());
        bytes[32..40].copy_from_slice(&self.seq.to_le_bytes());
        let crc = crc32c::crc32c(&bytes[..FILE_HEADER_CRC_OFFSET]);
        bytes[44..48].copy_from_slice(&crc.to_le_bytes());
        bytes
    }

    /// Decodes and checks a file header; the error says what is wrong.
    pub fn decode(bytes: &[u8], kind: FileKind) -> Result<FileHeader, String> {
        if bytes.len() < FILE_HEADER_BYTES {
            return Err(format!(
                "file header needs {FILE_HEADER_BYTES} bytes, file has {}",
                bytes.len()
            ));
        }
        if bytes[0..8] != kind.file_magic() {
            return Err("bad file magic".to_string());
        }
        let stored_crc = read_u32(bytes, 44);
        if crc32c::crc32c(&bytes[..FILE_HEADER_CRC_OFFSET]) != stored_crc {
            return Err("file header checksum mismatch".to_string());
        }
        let version = read_u32(bytes, 8);
        let oldest = match kind {
            FileKind::Sealed => FORMAT_VERSION,
            _ => FORMAT_VERSION_READ_MIN,
        };
        if !(oldest..=FORMAT_VERSION).contains(&version) {
            return Err(format!(
                "unsupported format version {version} (this build reads {oldest} to {FORMAT_VERSION})"
            ));
        }
        Ok(FileHeader {
            kind,
            shard: read_u32(bytes, 12),
            window_start: read_u64(bytes, 16) as i64,
            partition_secs: read_u64(bytes, 24),
            seq: read_u64(bytes, 32),
        })
    }
}

#[derive(Clone, Copy, Debug, PartialEq)]
pub struct FrameHeader {
    pub kind: FrameKind,
    pub payload_len: u32,
    pub payload_crc: u32,
    pub count: u32,
    pub commit_seq: u64,
    pub min_time: f64,
    pub max_time: f64,
}

impl FrameHeader {
    pub fn frame_len(&self) -> usize {
        padded_frame_len(self.payload_len as usize)
    }
}

/// Header plus payload plus zero padding to the next multiple of `FRAME_ALIGN`.
pub fn padded_frame_len(payload_len: usize) -> usize {
    (FRAME_HEADER_BYTES + payload_len).div_ceil(FRAME_ALIGN) * FRAME_ALIGN
}

/// Appends a complete frame (header, payload, padding) to `out`.
pub fn encode_frame(out: &mut Vec<u8>, header: &FrameHeader, payload: &[u8]) {
    let mut head = [0u8; FRAME_HEADER_BYTES];
    head[0..4].copy_from_slice(&header.kind.magic().to_le_bytes());
    head[8..12].copy_from_slice(&(payload.len() as u32).to_le_bytes());
    head[12..16].copy_from_slice(&crc32c::crc32c(payload).to_le_bytes());
    head[16..20].copy_from_slice(&header.count.to_le_bytes());
    head[24..32].copy_from_slice(&header.commit_seq.to_le_bytes());
    head[32..40].copy_from_slice(&header.min_time.to_le_bytes());
    head[40..48].copy_from_slice(&header.max_time.to_le_bytes());
    let crc = crc32c::crc32c(&head[8..]);
    head[4..8].copy_from_slice(&crc.to_le_bytes());
    out.extend_from_slice(&head);
    out.extend_from_slice(payload);
    let padding = padded_frame_len(payload.len()) - FRAME_HEADER_BYTES - payload.len();
    out.extend(std::iter::repeat_n(0u8, padding));
}

/// Rewrites the file header checksum and, walking frames by their declared lengths, each
/// frame's payload and header checksum, as a writer would have computed them (fuzzing only:
/// lets mutated inputs past the checksums).
pub fn rewrite_checksums(bytes: &mut [u8]) {
    if bytes.len() < FILE_HEADER_BYTES {
        return;
    }
    let crc = crc32c::crc32c(&bytes[..FILE_HEADER_CRC_OFFSET]);
    bytes[FILE_HEADER_CRC_OFFSET..FILE_HEADER_BYTES].copy_from_slice(&crc.to_le_bytes());
    let mut offset = FILE_HEADER_BYTES;
    while offset + FRAME_HEADER_BYTES <= bytes.len() {
        let payload_len = read_u32(bytes, offset + 8) as usize;
        let start = offset + FRAME_HEADER_BYTES;
        let Some(end) = start
            .checked_add(payload_len)
            .filter(|end| *end <= bytes.len())
        else {
            break;
        };
        let payload_crc = crc32c::crc32c(&bytes[start..end]);
        bytes[offset + 12..offset + 16].copy_from_slice(&payload_crc.to_le_bytes());
        let header_crc = crc32c::crc32c(&bytes[offset + 8..start]);
        bytes[offset + 4..offset + 8].copy_from_slice(&header_crc.to_le_bytes());
        offset += padded_frame_len(payload_len);
    }
}

/// Why the bytes at an offset are not a valid frame.
#[derive(Clone, Debug, PartialEq)]
pub enum FrameError {
    /// Magic, header checksum or declared length is wrong: the frame's extent is unknown.
    Header(&'static str),
    /// The header is intact but the frame runs past the end of the file.
    Truncated,
    /// The header is intact (so the frame's extent is known) but the payload is not.
    Payload(String),
}

/// Decodes the frame header at `offset` and checks the payload checksum; `validate` then checks
/// the payload's content.
pub fn frame_at(
    bytes: &[u8],
    offset: usize,
    kind: FileKind,
    validate: Validator<'_>,
) -> Result<FrameHeader, FrameError> {
    let Some(head) = bytes.get(offset..offset.saturating_add(FRAME_HEADER_BYTES)) else {
        return Err(FrameError::Header(
            "frame header runs past the end of the file",
        ));
    };
    let Some(frame_kind) = kind.frame_kind(read_u32(head, 0)) else {
        return Err(FrameError::Header("bad frame magic"));
    };
    if crc32c::crc32c(&head[8..]) != read_u32(head, 4) {
        return Err(FrameError::Header("frame header checksum mismatch"));
    }
    let header = FrameHeader {
        kind: frame_kind,
        payload_len: read_u32(head, 8),
        payload_crc: read_u32(head, 12),
        count: read_u32(head, 16),
        commit_seq: read_u64(head, 24),
        min_time: f64::from_le_bytes(head[32..40].try_into().unwrap_or([0; 8])),
        max_time: f64::from_le_bytes(head[40..48].try_into().unwrap_or([0; 8])),
    };
    if header.payload_len as usize > FRAME_PAYLOAD_BYTES_MAX {
        return Err(FrameError::Header("frame payload length above the maximum"));
    }
    // The whole frame, padding included, must be in the file: a frame whose padding is cut
    // was never completely written.
    if offset + header.frame_len() > bytes.len() {
        return Err(FrameError::Truncated);
    }
    let start = offset + FRAME_HEADER_BYTES;
    let Some(payload) = bytes.get(start..start + header.payload_len as usize) else {
        return Err(FrameError::Truncated);
    };
    if crc32c::crc32c(payload) != header.payload_crc {
        return Err(FrameError::Payload("payload checksum mismatch".to_string()));
    }
    validate(&header, payload).map_err(FrameError::Payload)?;
    Ok(header)
}

/// Checks a frame's payload content (after its checksum matched).
pub type Validator<'a> = &'a mut dyn FnMut(&FrameHeader, &[u8]) -> Result<(), String>;

/// A valid frame found by `scan`.
#[derive(Clone, Copy, Debug)]
pub struct ScannedFrame {
    pub offset: u64,
    pub header: FrameHeader,
}

impl ScannedFrame {
    pub fn payload_offset(&self) -> u64 {
        self.offset + FRAME_HEADER_BYTES as u64
    }
    pub fn end(&self) -> u64 {
        self.offset + self.header.frame_len() as u64
    }
}

/// The result of walking a file's frames.
#[derive(Debug, Default)]
pub struct Scan {
    pub frames: Vec<ScannedFrame>,
    /// Invalid regions followed by a valid frame: (offset, bytes, reason).
    pub holes: Vec<(u64, u64, String)>,
    /// End of the last valid frame (or of the file header): where a torn tail is cut.
    pub valid_end: u64,
    /// Why the tail (bytes after `valid_end`) is invalid, if there is one.
    pub tail_reason: Option<String>,
}

/// Walks every frame after the file header. At an invalid frame, searches forward (16-byte
/// steps) for the next valid frame: found, the invalid bytes are a hole; not found, a torn tail.
pub fn scan(bytes: &[u8], kind: FileKind, validate: Validator<'_>) -> Scan {
    let mut result = Scan {
        valid_end: FILE_HEADER_BYTES as u64,
        ..Scan::default()
    };
    let mut offset = FILE_HEADER_BYTES;
    while offset < bytes.len() {
        match frame_at(bytes, offset, kind, validate) {
            Ok(header) => {
                let frame = ScannedFrame {
                    offset: offset as u64,
                    header,
                };
                offset = frame.end() as usize;
                result.valid_end = frame.end();
                result.frames.push(frame);
            }
            Err(error) => {
                let reason = match &error {
                    FrameError::Header(reason) => (*reason).to_string(),
                    FrameError::Truncated => "frame runs past the end of the file".to_string(),
                    FrameError::Payload(reason) => reason.clone(),
                };
                // Where the search for the next valid frame starts.
                let search_from = match error {
                    FrameError::Payload(_) => {
                        let len = read_u32(bytes, offset + 8) as usize;
                        offset + padded_frame_len(len)
                    }
                    _ => offset + FRAME_ALIGN,
                };
                let mut candidate = search_from;
                let mut next = None;
                while candidate + FRAME_HEADER_BYTES <= bytes.len() {
                    if frame_at(bytes, candidate, kind, validate).is_ok() {
                        next = Some(candidate);
                        break;
                    }
                    candidate += FRAME_ALIGN;
                }
                match next {
                    Some(next) => {
                        result
                            .holes
                            .push((offset as u64, (next - offset) as u64, reason));
                        offset = next;
                    }
                    None => {
                        result.tail_reason = Some(reason);
                        break;
                    }
                }
            }
        }
    }
    result
}

// ---------------------------------------------------------------------------------------------
// Block payload (rkyv)

#[derive(rkyv::Archive, rkyv::Serialize, rkyv::Deserialize, Debug, Clone, PartialEq)]
pub enum StoredValue {
    Number(f64),
    Bool(bool),
    String(String),
    Data(Vec<u8>),
}

#[derive(rkyv::Archive, rkyv::Serialize, rkyv::Deserialize, Debug, Default)]
pub struct BlockRecords {
    pub series: Vec<u32>,
    pub times: Vec<f64>,
    pub values: Vec<StoredValue>,
}

pub fn encode_block(block: &BlockRecords) -> Result<AlignedVec, String> {
    rkyv::to_bytes::<rancor::Error>(block).map_err(|error| error.to_string())
}

/// Checked access to a block payload. `payload` must be 16-aligned (see `with_aligned`).
pub fn access_block(payload: &[u8]) -> Result<&ArchivedBlockRecords, String> {
    rkyv::access::<ArchivedBlockRecords, rancor::Error>(payload)
        .map_err(|error| format!("block does not validate: {error}"))
}

/// Validates a block against its frame header: rkyv validation, equal column lengths equal to
/// `count`, times finite and within [min_time, max_time].
pub fn validate_block(header: &FrameHeader, payload: &[u8]) -> Result<(), String> {
    with_aligned(payload, |payload| {
        let block = access_block(payload)?;
        let count = header.count as usize;
        if block.series.len() != count || block.times.len() != count || block.values.len() != count
        {
            return Err(format!(
                "block columns have {}/{}/{} entries, header says {count}",
                block.series.len(),
                block.times.len(),
                block.values.len()
            ));
        }
        for time in block.times.iter() {
            let time = time.to_native();
            if !(time >= header.min_time && time <= header.max_time) {
                return Err(format!(
                    "record time {time} outside the block's [{}, {}]",
                    header.min_time, header.max_time
                ));
            }
        }
        Ok(())
    })
}

/// Validates a segment frame's payload: a block or a commit record.
pub fn validate_segment_frame(header: &FrameHeader, payload: &[u8]) -> Result<(), String> {
    match header.kind {
        FrameKind::Block => validate_block(header, payload),
        FrameKind::Commit => decode_commit(header, payload).map(|_| ()),
        FrameKind::Dictionary | FrameKind::Index => {
            Err("dictionary or index frame in a segment".to_string())
        }
    }
}

/// Validates a sealed file's frame: a series frame (a block of one series, times ascending), a
/// commit record or the index.
pub fn validate_sealed_frame(header: &FrameHeader, payload: &[u8]) -> Result<(), String> {
    match header.kind {
        FrameKind::Block => {
            validate_block(header, payload)?;
            with_aligned(payload, |payload| {
                let block = access_block(payload)?;
                let first = block.series.first().map(|id| id.to_native());
                if block.series.iter().any(|id| Some(id.to_native()) != first) {
                    return Err("series frame holds more than one series".to_string());
                }
                let times = block.times.as_slice();
                if times
                    .windows(2)
                    .any(|pair| pair[0].to_native() > pair[1].to_native())
                {
                    return Err("series frame times are not ascending".to_string());
                }
                Ok(())
            })
        }
        FrameKind::Commit => decode_commit(header, payload).map(|_| ()),
        FrameKind::Index => decode_sealed_index(header, payload).map(|_| ()),
        FrameKind::Dictionary => Err("dictionary frame in a sealed file".to_string()),
    }
}

/// Runs `f` on `bytes` if they are 16-aligned, else on an aligned copy.
pub fn with_aligned<R>(bytes: &[u8], f: impl FnOnce(&[u8]) -> R) -> R {
    if (bytes.as_ptr() as usize) & (FRAME_ALIGN - 1) == 0 {
        f(bytes)
    } else {
        let mut copy = AlignedVec::<16>::with_capacity(bytes.len());
        copy.extend_from_slice(bytes);
        f(&copy)
    }
}

// ---------------------------------------------------------------------------------------------
// Commit record payload

/// Fixed part of an exchange record (the response follows).
pub const EXCHANGE_RECORD_BYTES: usize = 32;
/// Longest response an exchange record holds (its length is a u8).
pub const EXCHANGE_RESPONSE_BYTES_MAX: usize = 255;
/// Block count and reserved word before the exchange records.
const COMMIT_PREFIX_BYTES: usize = 8;

/// Appends the commit record prefix: the commit's block count and a reserved zero word.
pub fn encode_commit_prefix(out: &mut Vec<u8>, blocks: u32) {
    out.extend_from_slice(&blocks.to_le_bytes());
    out.extend_from_slice(&0u32.to_le_bytes());
}

/// Appends one exchange record. The caller refuses responses above
/// `EXCHANGE_RESPONSE_BYTES_MAX` (longer ones are cut here, never written past the u8 length).
pub fn encode_exchange(
    out: &mut Vec<u8>,
    peer: SocketAddr,
    message_id: u16,
    confirmable: bool,
    arrival: f64,
    response: &[u8],
) {
    let mut fixed = [0u8; EXCHANGE_RECORD_BYTES];
    match peer.ip() {
        IpAddr::V4(ip) => {
            fixed[0] = 4;
            fixed[16..20].copy_from_slice(&ip.octets());
        }
        IpAddr::V6(ip) => {
            fixed[0] = 6;
            fixed[16..32].copy_from_slice(&ip.octets());
        }
    }
    fixed[1] = u8::from(confirmable);
    fixed[2..4].copy_from_slice(&peer.port().to_le_bytes());
    fixed[4..6].copy_from_slice(&message_id.to_le_bytes());
    let response = &response[..response.len().min(EXCHANGE_RESPONSE_BYTES_MAX)];
    fixed[6] = response.len() as u8;
    fixed[8..16].copy_from_slice(&arrival.to_le_bytes());
    out.extend_from_slice(&fixed);
    out.extend_from_slice(response);
}

/// The block count of a valid commit record's payload (without decoding its exchanges).
pub fn commit_blocks(payload: &[u8]) -> Option<u32> {
    (payload.len() >= COMMIT_PREFIX_BYTES).then(|| read_u32(payload, 0))
}

/// Decodes a commit record payload into (block count, exchanges); checks the grammar and that
/// every arrival lies within the frame's [min_time, max_time].
pub fn decode_commit(
    header: &FrameHeader,
    payload: &[u8],
) -> Result<(u32, Vec<ExchangeRecord>), String> {
    if payload.len() < COMMIT_PREFIX_BYTES || read_u32(payload, 4) != 0 {
        return Err("commit record prefix is cut short or not zero-padded".to_string());
    }
    let blocks = read_u32(payload, 0);
    let mut exchanges = Vec::new();
    let mut offset = COMMIT_PREFIX_BYTES;
    for index in 0..header.count {
        let Some(fixed) = payload.get(offset..offset + EXCHANGE_RECORD_BYTES) else {
            return Err(format!("exchange record {index} is cut short"));
        };
        let ip = match fixed[0] {
            4 if fixed[20..32].iter().all(|&byte| byte == 0) => {
                IpAddr::from([fixed[16], fixed[17], fixed[18], fixed[19]])
            }
            6 => {
                let mut octets = [0u8; 16];
                octets.copy_from_slice(&fixed[16..32]);
                IpAddr::from(octets)
            }
            family => {
                return Err(format!(
                    "exchange record {index}: bad address family {family}"
                ))
            }
        };
        if fixed[1] & !1 != 0 || fixed[7] != 0 {
            return Err(format!("exchange record {index}: reserved bits set"));
        }
        let arrival = f64::from_le_bytes(fixed[8..16].try_into().unwrap_or([0; 8]));
        if !(arrival >= header.min_time && arrival <= header.max_time) {
            return Err(format!(
                "exchange record {index}: arrival {arrival} outside [{}, {}]",
                header.min_time, header.max_time
            ));
        }
        let start = offset + EXCHANGE_RECORD_BYTES;
        let response_len = usize::from(fixed[6]);
        let Some(response) = payload.get(start..start + response_len) else {
            return Err(format!("exchange record {index}: response is cut short"));
        };
        exchanges.push(ExchangeRecord {
            peer: SocketAddr::new(ip, u16::from_le_bytes([fixed[2], fixed[3]])),
            message_id: u16::from_le_bytes([fixed[4], fixed[5]]),
            confirmable: fixed[1] & 1 == 1,
            arrival,
            response: response.to_vec(),
        });
        offset = start + response_len;
    }
    if offset != payload.len() {
        return Err(format!(
            "commit record has {} trailing bytes",
            payload.len() - offset
        ));
    }
    Ok((blocks, exchanges))
}

// ---------------------------------------------------------------------------------------------
// Dictionary payload

#[derive(Clone, Debug, PartialEq)]
pub struct DictionaryEntry {
    pub id: u32,
    pub device: String,
    pub name: String,
}

pub fn encode_dictionary_entry(out: &mut Vec<u8>, id: u32, device: &str, name: &str) {
    out.extend_from_slice(&id.to_le_bytes());
    out.extend_from_slice(&(device.len() as u16).to_le_bytes());
    out.extend_from_slice(&(name.len() as u16).to_le_bytes());
    out.extend_from_slice(device.as_bytes());
    out.extend_from_slice(name.as_bytes());
}

pub fn decode_dictionary(
    header: &FrameHeader,
    payload: &[u8],
) -> Result<Vec<DictionaryEntry>, String> {
    let mut entries = Vec::new();
    let mut offset = 0usize;
    for _ in 0..header.count {
        let Some(fixed) = payload.get(offset..offset + 8) else {
            return Err(format!(
                "dictionary entry at payload byte {offset} is cut short"
            ));
        };
        let id = read_u32(fixed, 0);
        let device_len = u16::from_le_bytes([fixed[4], fixed[5]]) as usize;
        let name_len = u16::from_le_bytes([fixed[6], fixed[7]]) as usize;
        if device_len == 0 || device_len > NAME_BYTES_MAX || name_len > NAME_BYTES_MAX {
            return Err(format!(
                "dictionary entry {id} has bad lengths {device_len}/{name_len}"
            ));
        }
        let start = offset + 8;
        let Some(text) = payload.get(start..start + device_len + name_len) else {
            return Err(format!("dictionary entry {id} is cut short"));
        };
        let device = std::str::from_utf8(&text[..device_len])
            .map_err(|_| format!("dictionary entry {id}: device is not UTF-8"))?;
        let name = std::str::from_utf8(&text[device_len..])
            .map_err(|_| format!("dictionary entry {id}: name is not UTF-8"))?;
        entries.push(DictionaryEntry {
            id,
            device: device.to_string(),
            name: name.to_string(),
        });
        offset = start + device_len + name_len;
    }
    if offset != payload.len() {
        return Err(format!(
            "dictionary frame has {} trailing bytes",
            payload.len() - offset
        ));
    }
    Ok(entries)
}

fn read_u32(bytes: &[u8], offset: usize) -> u32 {
    match bytes.get(offset..offset + 4) {
        Some(b) => u32::from_le_bytes([b[0], b[1], b[2], b[3]]),
        None => 0,
    }
}

fn read_u64(bytes: &[u8], offset: usize) -> u64 {
    match bytes.get(offset..offset + 8) {
        Some(b) => u64::from_le_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]]),
        None => 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frame_round_trip_and_alignment() {
        let mut out = vec![0u8; FILE_HEADER_BYTES];
        let header = FrameHeader {
            kind: FrameKind::Dictionary,
            payload_len: 0,
            payload_crc: 0,
            count: 1,
            commit_seq: 7,
            min_time: 1.0,
            max_time: 2.0,
        };
        encode_frame(&mut out, &header, b"hello");
        assert_eq!(out.len() % FRAME_ALIGN, 0);
        let found = frame_at(
            &out,
            FILE_HEADER_BYTES,
            FileKind::Dictionary,
            &mut |_, _| Ok(()),
        )
        .unwrap();
        assert_eq!(found.payload_len, 5);
        assert_eq!(found.commit_seq, 7);
        assert!(
            frame_at(&out, FILE_HEADER_BYTES, FileKind::Segment, &mut |_, _| Ok(
                ()
            ))
            .is_err()
        );
    }

    /// Pins the archive bytes of a known block: if a workspace crate changes rkyv's format
    /// features (endianness, alignment, pointer width), this fails instead of the disk format
    /// changing silently.
    #[test]
    fn block_archive_bytes_are_pinned() {
        let block = BlockRecords {
            series: vec![1],
            times: vec![2.0],
            values: vec![StoredValue::Number(3.0)],
        };
        let bytes = encode_block(&block).unwrap();
        let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
        // series [1u32], pad, times [2.0f64], values [Number(3.0)] (tag 0, pad, f64), then the
        // root: three (relative offset i32, length u32) pairs.
        let pinned = "01000000000000000000000000000040000000000000000000000000000008\
                      40e0ffffff01000000e0ffffff01000000e0ffffff01000000";
        assert_eq!(hex, pinned.replace(' ', ""));
    }
}

// ---------------------------------------------------------------------------------------------
// Sealed file index (docs/storage-format.md, "Sealed file")

/// Fixed part of an index payload.
const INDEX_FIXED_BYTES: usize = 16;
/// Bytes of one series entry of an index.
const INDEX_SERIES_BYTES: usize = 40;
/// Bytes of one commit entry of an index.
const INDEX_COMMIT_BYTES: usize = 16;

/// One series of a sealed file.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct SealedSeries {
    pub id: u32,
    /// Its series frames, consecutive.
    pub frames: u32,
    /// File offset of its first series frame.
    pub offset: u64,
    pub points: u64,
    pub min_time: f64,
    pub max_time: f64,
}

/// One commit with a frame in the segment a sealed file replaces.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SealedCommit {
    pub commit_seq: u64,
    /// Valid block frames of the commit the segment held (served or not).
    pub blocks: u32,
    /// Its commit record is in the sealed file.
    pub record: bool,
}

/// The index frame's payload.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct SealedIndex {
    pub source_len: u64,
    /// Ascending by id.
    pub series: Vec<SealedSeries>,
    /// Ascending by commit_seq.
    pub commits: Vec<SealedCommit>,
}

pub fn encode_sealed_index(out: &mut Vec<u8>, index: &SealedIndex) {
    out.extend_from_slice(&index.source_len.to_le_bytes());
    out.extend_from_slice(&(index.series.len() as u32).to_le_bytes());
    out.extend_from_slice(&(index.commits.len() as u32).to_le_bytes());
    for series in &index.series {
        out.extend_from_slice(&series.id.to_le_bytes());
        out.extend_from_slice(&series.frames.to_le_bytes());
        out.extend_from_slice(&series.offset.to_le_bytes());
        out.extend_from_slice(&series.points.to_le_bytes());
        out.extend_from_slice(&series.min_time.to_le_bytes());
        out.extend_from_slice(&series.max_time.to_le_bytes());
    }
    for commit in &index.commits {
        out.extend_from_slice(&commit.commit_seq.to_le_bytes());
        out.extend_from_slice(&commit.blocks.to_le_bytes());
        out.extend_from_slice(&u32::from(commit.record).to_le_bytes());
    }
}

/// Decodes an index payload: lengths, ascending ids and commit_seqs, flags.
pub fn decode_sealed_index(header: &FrameHeader, payload: &[u8]) -> Result<SealedIndex, String> {
    if payload.len() < INDEX_FIXED_BYTES {
        return Err("index is cut short".to_string());
    }
    let series_count = read_u32(payload, 8) as usize;
    let commit_count = read_u32(payload, 12) as usize;
    if series_count != header.count as usize {
        return Err("index series count differs from its frame's count".to_string());
    }
    let expected = series_count
        .checked_mul(INDEX_SERIES_BYTES)
        .and_then(|series| series.checked_add(commit_count.checked_mul(INDEX_COMMIT_BYTES)?))
        .and_then(|lists| lists.checked_add(INDEX_FIXED_BYTES));
    if expected != Some(payload.len()) {
        return Err("index length does not match its counts".to_string());
    }
    let series: Vec<SealedSeries> = (0..series_count)
        .map(|i| {
            let at = INDEX_FIXED_BYTES + INDEX_SERIES_BYTES * i;
            SealedSeries {
                id: read_u32(payload, at),
                frames: read_u32(payload, at + 4),
                offset: read_u64(payload, at + 8),
                points: read_u64(payload, at + 16),
                min_time: f64::from_bits(read_u64(payload, at + 24)),
                max_time: f64::from_bits(read_u64(payload, at + 32)),
            }
        })
        .collect();
    if series.windows(2).any(|pair| pair[0].id >= pair[1].id) {
        return Err("index series ids are not ascending".to_string());
    }
    let commits_at = INDEX_FIXED_BYTES + INDEX_SERIES_BYTES * series_count;
    let mut commits = Vec::with_capacity(commit_count);
    for i in 0..commit_count {
        let at = commits_at + INDEX_COMMIT_BYTES * i;
        let flags = read_u32(payload, at + 12);
        if flags > 1 {
            return Err(format!("index commit entry has unknown flags {flags:#x}"));
        }
        commits.push(SealedCommit {
            commit_seq: read_u64(payload, at),
            blocks: read_u32(payload, at + 8),
            record: flags == 1,
        });
    }
    if commits
        .windows(2)
        .any(|pair| pair[0].commit_seq >= pair[1].commit_seq)
    {
        return Err("index commit_seqs are not ascending".to_string());
    }
    Ok(SealedIndex {
        source_len: read_u64(payload, 0),
        series,
        commits,
    })
}
