//! sluice-storage: the partitioned append-only telemetry store of sluice.
//!
//! The on-disk format, the commit order and the crash-recovery argument are in
//! `docs/storage-format.md`; `format` mirrors its byte layouts.
//!
//! - [`Store::open`] takes the data directory's lock and recovers every shard found.
//! - [`ShardWriter`] (one per shard, on the shard's thread) buffers readings and commits them
//!   as a group under the configured [`Durability`].
//! - [`Reader`] (cheap to clone, Send + Sync) answers queries from committed data only: the
//!   device/latest summary from memory, series points through mmap.
//! - [`Reader::fleet`] and [`FleetScan::aggregate`]: one series name aggregated over every
//!   device in time buckets, in one pass over the store.
//! - [`inspect`] and [`verify`] are offline tools.
//! - Every file operation goes through a [`Backend`]: [`Fs`] in production, the simulated and
//!   failing disks of [`sim`] in tests ([`Store::open_with`]).

mod backend;
mod fleet;
mod format;
mod sealed;
pub mod sim;
mod store;
mod tools;
mod writer;

use std::net::SocketAddr;
use std::path::PathBuf;

pub use backend::{Backend, DirEntry, FileBytes, Fs, StorageFile};
pub use fleet::{
    FleetAggregate, FleetBucket, FleetError, FleetScan, FLEET_BUCKETS_MAX, FLEET_THREADS_MAX,
};
pub use store::{
    DevicePage, DeviceSummary, LatestValues, ListedDevice, Reader, Retention, RetentionReport,
    SeriesScan, Store, LISTING_CHUNK_BYTES, LISTING_CHUNK_DEVICES, RECOVERED_EXCHANGES_MAX,
    SCAN_CHUNK_POINTS_MAX,
};
pub use tools::{inspect, verify, Inspection, SegmentInspection, VerifyProblem, VerifyReport};
pub use writer::{
    check_reading, CommitStats, Prepared, RawOperation, ShardWriter, EXCHANGES_PER_COMMIT_MAX,
};

/// Segments are rolled when the next frame would take them past this size.
pub const SEGMENT_BYTES_MAX: u64 = 64 << 20;
/// A shard writer keeps at most this many segment files open, closing the least recently used:
/// readings with wildly different times cannot exhaust file descriptors.
pub const OPEN_SEGMENTS_MAX: usize = 64;
pub use format::{BLOCK_RECORDS_MAX, NAME_BYTES_MAX, VALUE_BYTES_MAX};

/// A CoAP exchange a commit acknowledged, as its commit record keeps it (docs/storage-format.md,
/// "Commit record payload"): enough to answer a retransmission after a restart.
#[derive(Clone, Debug, PartialEq)]
pub struct ExchangeRecord {
    pub peer: SocketAddr,
    pub message_id: u16,
    /// The request was confirmable (CON).
    pub confirmable: bool,
    /// Unix seconds at which the request arrived.
    pub arrival: f64,
    /// The response datagram sent for it (opaque to the store; at most 255 bytes).
    pub response: Vec<u8>,
}

/// When `commit` returns.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Durability {
    /// After `fdatasync` of every file the commit wrote: survives power loss.
    Fsync,
    /// After `write(2)`: survives a process crash, not a power loss.
    Os,
}

#[derive(Clone, Debug)]
pub struct StoreConfig {
    pub dir: PathBuf,
    /// Width of a time partition in seconds (> 0).
    pub partition_secs: u64,
    /// How long after its window ends a partition still takes writes before it is sealed
    /// (docs/storage-format.md, "Sealing").
    pub partition_grace_secs: u64,
    pub durability: Durability,
}

/// A reading's value as the caller has it (borrowed).
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum ValueRef<'a> {
    Number(f64),
    Bool(bool),
    String(&'a str),
    Data(&'a [u8]),
}

/// A stored value.
#[derive(Clone, Debug, PartialEq)]
pub enum Value {
    Number(f64),
    Bool(bool),
    String(String),
    Data(Vec<u8>),
}

impl ValueRef<'_> {
    pub fn to_value(&self) -> Value {
        match *self {
            ValueRef::Number(number) => Value::Number(number),
            ValueRef::Bool(boolean) => Value::Bool(boolean),
            ValueRef::String(text) => Value::String(text.to_string()),
            ValueRef::Data(data) => Value::Data(data.to_vec()),
        }
    }
}

impl Value {
    pub fn as_ref(&self) -> ValueRef<'_> {
        match self {
            Value::Number(number) => ValueRef::Number(*number),
            Value::Bool(boolean) => ValueRef::Bool(*boolean),
            Value::String(text) => ValueRef::String(text),
            Value::Data(data) => ValueRef::Data(data),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("data directory {} is locked: another sluiced (pid {pid}) owns it", dir.display())]
    Locked { dir: PathBuf, pid: String },
    #[error("{op} {}: {source}", path.display())]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("corrupt {} at byte {offset}: {reason}", path.display())]
    Corrupt {
        path: PathBuf,
        offset: u64,
        reason: String,
    },
    #[error("invalid store configuration: {0}")]
    Config(String),
    #[error("invalid reading: {0}")]
    InvalidReading(String),
    #[error("shard {shard} already has a live writer")]
    WriterTaken { shard: u32 },
}

impl StoreError {
    pub(crate) fn io(
        op: &'static str,
        path: impl Into<PathBuf>,
        source: std::io::Error,
    ) -> StoreError {
        StoreError::Io {
            op,
            path: path.into(),
            source,
        }
    }
}

/// What `Store::open` found and did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RecoveryReport {
    pub segments: usize,
    pub blocks: u64,
    pub points: u64,
    pub bytes_truncated: u64,
    pub files_truncated: usize,
    /// Invalid regions followed by valid frames (skipped, left in place; see `sluice verify`).
    pub corrupt_regions: u64,
    /// Records referring to a series id the dictionary does not hold (skipped).
    pub unknown_series_points: u64,
    /// Incomplete last commits cut (never acknowledged: a crash during their write).
    pub commits_rolled_back: u64,
    /// Incomplete earlier commits (a block or the commit record lost to media corruption, or to
    /// a power loss under `--durability os`): left in place, none of their frames served.
    pub incomplete_commits: u64,
    /// Exchange records of complete commits found.
    pub exchanges: u64,
    /// Seal files that did not match their segment (removed; the segment is sealed again).
    pub seals_discarded: u64,
}

impl std::fmt::Display for RecoveryReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "recovered {} segments, {} blocks, {} points, {} exchanges; cut {} torn bytes from {} files, rolled back {} incomplete commits",
            self.segments,
            self.blocks,
            self.points,
            self.exchanges,
            self.bytes_truncated,
            self.files_truncated,
            self.commits_rolled_back
        )?;
        if self.seals_discarded > 0 {
            write!(
                f,
                "; discarded {} seals that did not match their segments (sealed again)",
                self.seals_discarded
            )?;
        }
        if self.corrupt_regions > 0 || self.unknown_series_points > 0 || self.incomplete_commits > 0
        {
            write!(
                f,
                "; skipped {} corrupt regions, {} incomplete commits and {} points of unknown series (run `sluice verify`)",
                self.corrupt_regions, self.incomplete_commits, self.unknown_series_points
            )?;
        }
        Ok(())
    }
}

/// Fuzzing entry point (storage/fuzz): reads `bytes` as a segment file the way recovery does
/// (file header, frame scan with validation, every record of every valid block, every exchange
/// of every commit record) and returns how many records and exchanges it read. Never panics on
/// any input; panics only if a frame the scan accepted then fails to read (a bug the fuzzer
/// reports).
#[doc(hidden)]
pub fn fuzz_segment(bytes: &[u8]) -> usize {
    let mut aligned = rkyv::util::AlignedVec::<16>::with_capacity(bytes.len());
    aligned.extend_from_slice(bytes);
    if format::FileHeader::decode(&aligned, format::FileKind::Segment).is_err() {
        return 0;
    }
    let scan = format::scan(
        &aligned,
        format::FileKind::Segment,
        &mut format::validate_segment_frame,
    );
    let mut read = 0;
    for frame in &scan.frames {
        let start = frame.payload_offset() as usize;
        let payload = &aligned[start..start + frame.header.payload_len as usize];
        match frame.header.kind {
            format::FrameKind::Commit => {
                let (_, exchanges) = format::decode_commit(&frame.header, payload)
                    .expect("a commit record the scan accepted decodes");
                read += exchanges.len();
            }
            _ => {
                let block =
                    format::access_block(payload).expect("a block the scan accepted is readable");
                assert_eq!(block.series.len(), frame.header.count as usize);
                for (time, value) in block.times.iter().zip(block.values.iter()) {
                    let time = time.to_native();
                    assert!(time >= frame.header.min_time && time <= frame.header.max_time);
                    let _ = store::archived_value(value);
                    read += 1;
                }
            }
        }
    }
    read
}

/// Fuzzing entry point (storage/fuzz): [`fuzz_segment`] after rewriting the checksums the input
/// declares (the file header's, and each frame's header and payload checksum, walking frames by
/// their declared lengths), so that mutations reach block and commit record decoding instead of
/// stopping at a checksum.
#[doc(hidden)]
pub fn fuzz_segment_checksummed(bytes: &[u8]) -> usize {
    let mut fixed = bytes.to_vec();
    format::rewrite_checksums(&mut fixed);
    fuzz_segment(&fixed)
}

/// Fuzzing entry point: reads `bytes` as a sealed file the way recovery does (header, frame
/// scan with validation, the index against the frames) after rewriting the checksums the input
/// declares, then reads every series a valid index lists through its frames, as a one-series
/// query does. Returns the records read. Never panics on any input; panics only if something
/// the checks accepted then fails to read.
#[doc(hidden)]
pub fn fuzz_sealed_checksummed(bytes: &[u8]) -> usize {
    let mut fixed = rkyv::util::AlignedVec::<16>::with_capacity(bytes.len());
    fixed.extend_from_slice(bytes);
    format::rewrite_checksums(&mut fixed);
    if format::FileHeader::decode(&fixed, format::FileKind::Sealed).is_err() {
        return 0;
    }
    let scan = format::scan(
        &fixed,
        format::FileKind::Sealed,
        &mut format::validate_sealed_frame,
    );
    let Ok(checked) = sealed::check(&fixed, &scan) else {
        return 0;
    };
    let mut read = 0;
    for entry in &checked.sealed.series {
        let first = entry.first as usize;
        for block in &checked.blocks[first..first + entry.frames as usize] {
            let start = block.payload_offset as usize;
            let records = format::access_block(&fixed[start..start + block.payload_len as usize])
                .expect("a series frame the scan accepted is readable");
            assert!(records.series.iter().all(|id| id.to_native() == entry.id));
            read += records.series.len();
        }
    }
    read
}
