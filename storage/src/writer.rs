//! The single writer of a shard: buffers readings, commits them as a group.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::os::fd::RawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Arc;

use crate::backend::{self, Backend, StorageFile};
use crate::format::{
    self, BlockRecords, FileHeader, FileKind, FrameHeader, FrameKind, StoredValue,
    BLOCK_BYTES_TARGET, BLOCK_RECORDS_MAX, EXCHANGE_RESPONSE_BYTES_MAX, FILE_HEADER_BYTES,
    NAME_BYTES_MAX, VALUE_BYTES_MAX,
};
use crate::store::{
    lock, read_lock, segment_path, write_lock, BlockMeta, HashMap, Inner, SegmentShared,
    ShardShared, DICTIONARY_FILE,
};
use crate::{Durability, StoreError, Value, ValueRef, OPEN_SEGMENTS_MAX, SEGMENT_BYTES_MAX};

/// Exchanges one commit may record: a commit record of this many maximal exchange records stays
/// far below the frame payload bound (65 536 × 287 bytes = 18 MiB); the daemon commits once per
/// receive batch, far fewer.
pub const EXCHANGES_PER_COMMIT_MAX: usize = 65_536;

/// Reading times must lie within ±2^53 seconds: exact in f64 and far from i64 overflow when
/// computing partition windows.
const TIME_ABS_MAX: f64 = 9_007_199_254_740_992.0;

/// How often a commit looks for segments due to be sealed: a scan of the shard's catalog per
/// second costs nothing next to commits, and a partition is sealed at most this late.
const SEAL_CHECK_INTERVAL_MS: u64 = 1000;
/// Seals a shard writer's sealing thread has in flight at most, and segments one `seal_due` call
/// seals at most (the rest at the next checks): after a restart or an upgrade with many unsealed
/// old segments, the disk holds at most this many segments twice (segment and sealed file) per
/// shard at a time, and commits never wait for a rewrite (docs/storage-format.md, "Sealing").
const SEALS_PER_CHECK_MAX: usize = 2;

/// What a commit did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CommitStats {
    pub points: usize,
    pub bytes: u64,
    /// True when the commit's data was fdatasync'ed before returning.
    pub synced: bool,
    /// Readings not written because retention dropped their partition while they were buffered.
    pub expired_points: usize,
    /// Readings later than the partition grace period (stored in a late segment of their
    /// partition; docs/storage-format.md, "Sealing").
    pub late_points: usize,
}

/// Emptied blocks a writer keeps for their capacity (each up to `BLOCK_RECORDS_MAX` records):
/// enough for the blocks of a usual commit, a bound on what a burst leaves allocated.
const SPARE_BLOCKS_MAX: usize = 8;

/// The readings buffered for the next commit, already in block form: each goes straight into
/// the block being filled for its partition window (a block is full at `BLOCK_RECORDS_MAX`
/// records or `BLOCK_BYTES_TARGET` value bytes), and what it changes in the summary is kept per
/// series id as it comes.
#[derive(Default)]
struct Buffer {
    /// Blocks in the order they were started; per window, only the last one may be filling.
    blocks: Vec<BufferedBlock>,
    /// Readings buffered.
    points: usize,
    /// Per series id: readings buffered, greatest time, and where the latest reading is
    /// (its append position in the commit, its block and index there). Valid for `touched` ids.
    deltas: Vec<Delta>,
    touched: Vec<u32>,
    /// Emptied blocks, kept for their capacity.
    spare: Vec<BlockRecords>,
}

struct BufferedBlock {
    window: i64,
    records: BlockRecords,
    value_bytes: usize,
    full: bool,
}

#[derive(Clone, Copy)]
struct Delta {
    count: u64,
    time: f64,
    position: u32,
    block: u32,
    index: u32,
}

impl Delta {
    const NONE: Delta = Delta {
        count: 0,
        time: f64::NEG_INFINITY,
        position: 0,
        block: 0,
        index: 0,
    };
}

impl Buffer {
    fn push(&mut self, series: u32, time: f64, window: i64, value: StoredValue) {
        let value_bytes = match &value {
            StoredValue::String(text) => text.len(),
            StoredValue::Data(data) => data.len(),
            _ => 0,
        };
        let block = match self
            .blocks
            .iter()
            .rposition(|block| block.window == window && !block.full)
        {
            Some(block) => block,
            None => {
                self.blocks.push(BufferedBlock {
                    window,
                    records: self.spare.pop().unwrap_or_default(),
                    value_bytes: 0,
                    full: false,
                });
                self.blocks.len() - 1
            }
        };
        let filling = &mut self.blocks[block];
        let index = filling.records.series.len();
        filling.records.series.push(series);
        filling.records.times.push(time);
        filling.records.values.push(value);
        filling.value_bytes += value_bytes;
        filling.full = filling.records.series.len() >= BLOCK_RECORDS_MAX
            || filling.value_bytes >= BLOCK_BYTES_TARGET;
        let id = series as usize;
        if self.deltas.len() <= id {
            self.deltas.resize(id + 1, Delta::NONE);
        }
        let delta = &mut self.deltas[id];
        if delta.count == 0 {
            self.touched.push(series);
        }
        delta.count += 1;
        if time >= delta.time {
            *delta = Delta {
                count: delta.count,
                time,
                position: self.points as u32,
                block: block as u32,
                index: index as u32,
            };
        }
        self.points += 1;
    }

    /// Drops the readings of the windows `expired` says, and what they changed; returns how many.
    fn drop_windows(&mut self, expired: impl Fn(i64) -> bool) -> usize {
        if !self.blocks.iter().any(|block| expired(block.window)) {
            return 0;
        }
        let before = self.points;
        let blocks = std::mem::take(&mut self.blocks);
        self.clear();
        for block in blocks {
            if expired(block.window) {
                self.recycle(block.records);
                continue;
            }
            let BlockRecords {
                series,
                times,
                values,
            } = block.records;
            for ((series, time), value) in series.into_iter().zip(times).zip(values) {
                self.push(series, time, block.window, value);
            }
        }
        before - self.points
    }

    /// What the buffered readings change in the summary: per series, count, greatest time,
    /// the latest reading's append position and value.
    fn latest(&self) -> Vec<(u32, u64, f64, u32, Value)> {
        self.touched
            .iter()
            .map(|&id| {
                let delta = self.deltas[id as usize];
                let value = &self.blocks[delta.block as usize].records.values[delta.index as usize];
                (
                    id,
                    delta.count,
                    delta.time,
                    delta.position,
                    stored_value(value),
                )
            })
            .collect()
    }

    fn recycle(&mut self, mut records: BlockRecords) {
        if self.spare.len() >= SPARE_BLOCKS_MAX {
            return;
        }
        records.series.clear();
        records.times.clear();
        records.values.clear();
        self.spare.push(records);
    }

    fn clear(&mut self) {
        for id in self.touched.drain(..) {
            self.deltas[id as usize] = Delta::NONE;
        }
        let mut blocks = std::mem::take(&mut self.blocks);
        for block in blocks.drain(..) {
            self.recycle(block.records);
        }
        self.blocks = blocks;
        self.points = 0;
    }
}

fn stored_value(value: &StoredValue) -> Value {
    match value {
        StoredValue::Number(number) => Value::Number(*number),
        StoredValue::Bool(boolean) => Value::Bool(*boolean),
        StoredValue::String(text) => Value::String(text.clone()),
        StoredValue::Data(data) => Value::Data(data.clone()),
    }
}

struct OpenSegment {
    file: Arc<dyn StorageFile>,
    shared: Arc<SegmentShared>,
    /// Bytes written (published plus this commit's frames).
    len: u64,
    last_used: u64,
    written_this_commit: bool,
}

/// A commit built by [`ShardWriter::prepare`]: its frames, and the I/O that makes it durable,
/// not done yet. Send: [`Prepared::perform`] may run on another thread, or the I/O may be
/// submitted elsewhere ([`Prepared::raw_operation`], an io_uring).
pub struct Prepared {
    /// The commit's frames; write operations name ranges of it.
    bytes: Vec<u8>,
    /// The I/O, in order: the dictionary's write and (fsync mode) fdatasync, the segments'
    /// writes, then (fsync mode) their fdatasyncs. Each must finish before the next starts.
    operations: Vec<Operation>,
    /// What publishing changes; None for a commit that wrote nothing.
    publish: Option<PublishState>,
    stats: CommitStats,
}

struct Operation {
    file: Arc<dyn StorageFile>,
    path: PathBuf,
    kind: OperationKind,
}

#[derive(Clone, Copy)]
enum OperationKind {
    /// pwrite of `bytes[start..end]` at `offset`.
    Write {
        offset: u64,
        start: usize,
        end: usize,
    },
    /// fdatasync.
    Sync,
}

struct PublishState {
    dictionary_end: u64,
    published: Vec<(Arc<SegmentShared>, BlockMeta, u64)>,
    latest: Vec<(u32, u64, f64, u32, Value)>,
    dictionary: Vec<(u32, String, String)>,
    commit_seq: u64,
}

/// One I/O operation of a [`Prepared`] commit on a file descriptor, for a caller that submits
/// it itself (an io_uring). The bytes live as long as the `Prepared`, which does not move them.
#[derive(Clone, Copy, Debug)]
pub enum RawOperation<'a> {
    /// pwrite(2) of all of `bytes` at `offset`; a short write is a failure.
    Write {
        fd: RawFd,
        offset: u64,
        bytes: &'a [u8],
    },
    /// fdatasync(2).
    Sync { fd: RawFd },
}

impl Prepared {
    /// Does the commit's I/O in order: writes its frames, then (fsync mode) fdatasyncs every
    /// file it wrote. The commit is durable as asked when this returns Ok.
    pub fn perform(&self) -> Result<(), StoreError> {
        for (index, operation) in self.operations.iter().enumerate() {
            let result = match operation.kind {
                OperationKind::Write { offset, start, end } => {
                    operation.file.write_all_at(&self.bytes[start..end], offset)
                }
                OperationKind::Sync => operation.file.sync_data(),
            };
            result.map_err(|error| self.failed(index, error))?;
        }
        Ok(())
    }

    /// Whether the I/O ends with an fdatasync (`Durability::Fsync` and data written).
    pub fn needs_sync(&self) -> bool {
        self.operations
            .iter()
            .any(|operation| matches!(operation.kind, OperationKind::Sync))
    }

    /// Readings the commit holds.
    pub fn points(&self) -> usize {
        self.stats.points
    }

    /// How many I/O operations the commit needs.
    pub fn operations(&self) -> usize {
        self.operations.len()
    }

    /// The `index`th operation on a file descriptor; None past the end or when the backend's
    /// files have no descriptor (a simulated disk: use [`Prepared::perform`]).
    pub fn raw_operation(&self, index: usize) -> Option<RawOperation<'_>> {
        let operation = self.operations.get(index)?;
        let fd = operation.file.raw_fd()?;
        Some(match operation.kind {
            OperationKind::Write { offset, start, end } => RawOperation::Write {
                fd,
                offset,
                bytes: &self.bytes[start..end],
            },
            OperationKind::Sync => RawOperation::Sync { fd },
        })
    }

    /// The error of the `index`th operation failing with `error`, naming its file.
    pub fn failed(&self, index: usize, error: std::io::Error) -> StoreError {
        match self.operations.get(index) {
            Some(operation) => {
                let op = match operation.kind {
                    OperationKind::Write { .. } => "write",
                    OperationKind::Sync => "fdatasync",
                };
                StoreError::io(op, &operation.path, error)
            }
            None => StoreError::io("commit", PathBuf::new(), error),
        }
    }
}

/// The single writer of one shard (Send; used on the shard's own thread).
pub struct ShardWriter {
    inner: Arc<Inner>,
    shard: Arc<ShardShared>,
    durability: Durability,
    partition_secs: u64,
    /// device -> name -> series id: everything interned, published or pending.
    ids: HashMap<String, HashMap<String, u32>>,
    next_id: u32,
    buffer: Buffer,
    pending_dictionary: Vec<(u32, String, String)>,
    /// Exchange records the next commit acknowledges, encoded (its commit record's payload
    /// after the prefix), how many, and their arrival range.
    exchange_bytes: Vec<u8>,
    exchange_count: u32,
    exchange_arrivals: (f64, f64),
    dictionary: Option<Arc<dyn StorageFile>>,
    dictionary_path: PathBuf,
    /// Published length of the dictionary.
    dictionary_len: u64,
    /// Ordered by window, so the order of a commit's I/O is deterministic (simulated disks).
    open: BTreeMap<i64, OpenSegment>,
    tick: u64,
    next_commit_seq: u64,
    /// Set when a commit failed: segments it may have written past their published length.
    failed: Option<Vec<Arc<SegmentShared>>>,
    /// Segments written by the commit in progress (for the cut-back after a failure).
    touched: Vec<Arc<SegmentShared>>,
    /// The frames of the commit being prepared (taken by its `Prepared`, given back when it
    /// is published or abandoned, so the capacity is reused).
    commit_bytes: Vec<u8>,
    /// The I/O of the commit being prepared, in order, but for the closing fdatasyncs.
    operations: Vec<Operation>,
    /// Files the commit being prepared wrote and must fdatasync: segments closed meanwhile.
    closed: Vec<(Arc<dyn StorageFile>, PathBuf)>,
    segment_bytes_max: u64,
    partition_grace_secs: u64,
    /// When the last look for segments due to be sealed happened.
    last_seal_check: Option<std::time::Instant>,
    /// The sealing thread, started at the first seal check of a commit.
    sealer: Option<crate::sealed::Sealer>,
    /// The partition windows of the request being appended (`append_all`), kept for the capacity.
    windows: Vec<i64>,
}

impl ShardWriter {
    pub(crate) fn new(
        inner: Arc<Inner>,
        shard: Arc<ShardShared>,
    ) -> Result<ShardWriter, StoreError> {
        let mut ids: HashMap<String, HashMap<String, u32>> = HashMap::default();
        let next_id = {
            let summary = lock(&shard.summary);
            for (id, series) in summary.series.iter().enumerate() {
                if let Some(series) = series {
                    let device = &summary.device_states[series.device as usize].name;
                    ids.entry(device.clone())
                        .or_default()
                        .insert(series.name.clone(), id as u32);
                }
            }
            (summary.series.len() as u32).max(summary.id_floor)
        };
        let dictionary_path = shard.dir.join(DICTIONARY_FILE);
        let config = &inner.config;
        let mut writer = ShardWriter {
            durability: config.durability,
            partition_secs: config.partition_secs,
            ids,
            next_id,
            buffer: Buffer::default(),
            pending_dictionary: Vec::new(),
            exchange_bytes: Vec::new(),
            exchange_count: 0,
            exchange_arrivals: (f64::INFINITY, f64::NEG_INFINITY),
            dictionary: None,
            dictionary_path,
            dictionary_len: shard.dictionary_len.load(Ordering::Acquire),
            open: BTreeMap::new(),
            tick: 0,
            next_commit_seq: shard.next_commit_seq.load(Ordering::Acquire),
            failed: None,
            touched: Vec::new(),
            commit_bytes: Vec::new(),
            operations: Vec::new(),
            closed: Vec::new(),
            segment_bytes_max: SEGMENT_BYTES_MAX,
            partition_grace_secs: config.partition_grace_secs,
            last_seal_check: None,
            sealer: None,
            windows: Vec::new(),
            inner,
            shard,
        };
        writer.open_dictionary()?;
        Ok(writer)
    }

    pub fn shard(&self) -> u32 {
        self.shard.shard
    }

    /// Opens the dictionary, creating the shard directory and the file if needed.
    fn open_dictionary(&mut self) -> Result<(), StoreError> {
        let path = self.dictionary_path.clone();
        if self.dictionary_len >= FILE_HEADER_BYTES as u64 {
            let file = self
                .inner
                .backend
                .open(&path)
                .map_err(|error| StoreError::io("open dictionary", &path, error))?;
            self.dictionary = Some(file);
            return Ok(());
        }
        let header = FileHeader {
            kind: FileKind::Dictionary,
            shard: self.shard.shard,
            window_start: 0,
            partition_secs: 0,
            seq: 0,
        };
        let file = create_with_header(&*self.inner.backend, &self.shard.dir, &path, &header)?;
        self.dictionary = Some(file);
        self.dictionary_len = FILE_HEADER_BYTES as u64;
        self.shard
            .dictionary_len
            .store(self.dictionary_len, Ordering::Release);
        Ok(())
    }

    /// Buffers one reading (no I/O). Interns (device, name).
    pub fn append(
        &mut self,
        device: &str,
        name: &str,
        time: f64,
        value: ValueRef<'_>,
    ) -> Result<(), StoreError> {
        check_reading(device, name, time, &value)?;
        let window = window_of(time, self.partition_secs);
        self.append_checked(device, std::iter::once(((name, time, value), window)))
    }

    /// Buffers every reading of one request (`parts` gives each one's name, time and value), or
    /// none: all are checked first, as [`ShardWriter::check`] does, and each only once.
    pub fn append_all<R>(
        &mut self,
        device: &str,
        readings: &[R],
        parts: impl Fn(&R) -> (&str, f64, ValueRef<'_>),
    ) -> Result<(), StoreError> {
        // Each reading's partition window, worked out by the check, is kept for the append.
        let mut windows = std::mem::take(&mut self.windows);
        windows.clear();
        let checked = readings.iter().try_for_each(|reading| {
            let (name, time, value) = parts(reading);
            windows.push(self.check(device, name, time, &value)?);
            Ok(())
        });
        let appended = checked.and_then(|()| {
            let readings = readings.iter().map(&parts);
            self.append_checked(device, readings.zip(windows.iter().copied()))
        });
        self.windows = windows;
        appended
    }

    /// Buffers readings of `device` that [`check_reading`] accepted, each with its partition
    /// window; the device's series are looked up once for all of them.
    fn append_checked<'a>(
        &mut self,
        device: &str,
        readings: impl Iterator<Item = ((&'a str, f64, ValueRef<'a>), i64)>,
    ) -> Result<(), StoreError> {
        let mut readings = readings.peekable();
        if readings.peek().is_none() {
            return Ok(());
        }
        let ShardWriter {
            ids,
            next_id,
            pending_dictionary,
            buffer,
            ..
        } = self;
        let names = match ids.get_mut(device) {
            Some(names) => names,
            None => ids.entry(device.to_string()).or_default(),
        };
        for ((name, time, value), window) in readings {
            let series = match names.get(name) {
                Some(&id) => id,
                None => {
                    let id = *next_id;
                    *next_id = id.checked_add(1).ok_or_else(|| {
                        StoreError::InvalidReading("shard has 2^32 series".to_string())
                    })?;
                    names.insert(name.to_string(), id);
                    pending_dictionary.push((id, device.to_string(), name.to_string()));
                    id
                }
            };
            let value = match value {
                ValueRef::Number(number) => StoredValue::Number(number),
                ValueRef::Bool(boolean) => StoredValue::Bool(boolean),
                ValueRef::String(text) => StoredValue::String(text.to_string()),
                ValueRef::Data(data) => StoredValue::Data(data.to_vec()),
            };
            buffer.push(series, time, window, value);
        }
        Ok(())
    }

    /// Whether the store can hold this reading now: [`check_reading`], and its partition is not
    /// older than the retention horizon (such a reading would be dropped at once). Ok: the
    /// start of its partition's window.
    pub fn check(
        &self,
        device: &str,
        name: &str,
        time: f64,
        value: &ValueRef<'_>,
    ) -> Result<i64, StoreError> {
        check_reading(device, name, time, value)?;
        let window = window_of(time, self.partition_secs);
        let floor = self.shard.retention_floor.load(Ordering::Acquire);
        if expired(window, self.partition_secs, floor) {
            return Err(StoreError::InvalidReading(format!(
                "time {time} is older than the retention period"
            )));
        }
        Ok(window)
    }

    /// Records an exchange the next commit acknowledges; its commit record keeps it so that a
    /// retransmission after a restart is answered again (docs/storage-format.md). Refused when
    /// the response is longer than 255 bytes or the commit already holds
    /// `EXCHANGES_PER_COMMIT_MAX` exchanges.
    /// No allocation beyond the commit's reused buffer.
    pub fn record_exchange(
        &mut self,
        peer: SocketAddr,
        message_id: u16,
        confirmable: bool,
        arrival: f64,
        response: &[u8],
    ) -> Result<(), StoreError> {
        if response.len() > EXCHANGE_RESPONSE_BYTES_MAX {
            return Err(StoreError::InvalidReading(format!(
                "response of {} bytes exceeds {EXCHANGE_RESPONSE_BYTES_MAX}",
                response.len()
            )));
        }
        if self.exchange_count as usize >= EXCHANGES_PER_COMMIT_MAX {
            return Err(StoreError::InvalidReading(format!(
                "a commit records at most {EXCHANGES_PER_COMMIT_MAX} exchanges"
            )));
        }
        if !arrival.is_finite() {
            return Err(StoreError::InvalidReading(
                "exchange arrival time is not finite".to_string(),
            ));
        }
        format::encode_exchange(
            &mut self.exchange_bytes,
            peer,
            message_id,
            confirmable,
            arrival,
            response,
        );
        self.exchange_count += 1;
        let (min, max) = self.exchange_arrivals;
        self.exchange_arrivals = (min.min(arrival), max.max(arrival));
        Ok(())
    }

    /// When a commit counts as done: after fdatasync, or after write(2).
    pub fn durability(&self) -> Durability {
        self.durability
    }

    /// Readings buffered since the last commit.
    pub fn pending(&self) -> usize {
        self.buffer.points
    }

    /// Writes, syncs (per durability) and publishes the buffered readings. On error nothing of
    /// this commit is published, the buffered readings are discarded and the next commit first
    /// cuts the files back to their published lengths.
    pub fn commit(&mut self) -> Result<CommitStats, StoreError> {
        let prepared = self.prepare()?;
        let done = prepared.perform();
        self.conclude(prepared, done)
    }

    /// The second half of a commit: publishes the prepared commit to readers and the summary if
    /// its I/O (`done`: [`Prepared::perform`], or the same operations done by the caller)
    /// succeeded. Otherwise nothing of it is published, the readings buffered since it was
    /// prepared are discarded with it (their series ids may follow its own), and the next
    /// commit first cuts the files back to their published lengths.
    pub fn conclude(
        &mut self,
        prepared: Prepared,
        done: Result<(), StoreError>,
    ) -> Result<CommitStats, StoreError> {
        match done {
            Ok(()) => Ok(self.publish(prepared)),
            Err(error) => {
                self.abandon(prepared);
                Err(error)
            }
        }
    }

    /// The first half of [`ShardWriter::commit`], for a caller that does the commit's I/O
    /// elsewhere (a sync thread, an io_uring) while it goes on appending: encodes the buffered
    /// readings into frames (creating the segments they go to) and returns the writes and
    /// fdatasyncs ([`Prepared::perform`]) that must be done, in order, before
    /// [`ShardWriter::conclude`]. A grown dictionary's write and sync come first, before any
    /// block refers to it. Readings appended
    /// meanwhile go to the next commit; call `prepare` again only after [`ShardWriter::conclude`].
    /// On error nothing is published and the buffered readings are discarded, as for `commit`.
    pub fn prepare(&mut self) -> Result<Prepared, StoreError> {
        self.touched.clear();
        self.commit_bytes.clear();
        self.operations.clear();
        self.closed.clear();
        // Retention renames partition directories under this lock: no file of this shard is
        // created or dropped while a commit writes.
        let shard = self.shard.clone();
        let files = lock(&shard.files);
        let result = self.prepare_inner();
        drop(files);
        self.exchange_bytes.clear();
        self.exchange_count = 0;
        self.exchange_arrivals = (f64::INFINITY, f64::NEG_INFINITY);
        if result.is_err() {
            self.operations.clear();
            self.closed.clear();
            self.discard_failed_commit();
        }
        result
    }

    /// The prepared commit is durable: publishes it to readers and the summary.
    fn publish(&mut self, mut prepared: Prepared) -> CommitStats {
        self.reuse(&mut prepared);
        let Some(state) = prepared.publish else {
            return prepared.stats;
        };
        for segment in self.open.values_mut() {
            segment.written_this_commit = false;
        }
        self.dictionary_len = state.dictionary_end;
        self.shard
            .dictionary_len
            .store(state.dictionary_end, Ordering::Release);
        let now_s = unix_now() as u64;
        for (segment, meta, end) in state.published {
            segment.last_write_unix_s.store(now_s, Ordering::Release);
            write_lock(&segment.blocks).push(meta);
            segment.published_len.fetch_max(end, Ordering::AcqRel);
        }
        {
            let mut summary = lock(&self.shard.summary);
            for (id, device, name) in state.dictionary {
                summary.intern(id, &device, &name);
            }
            for (id, count, time, position, value) in state.latest {
                summary.apply(id, count, time, (state.commit_seq, position as u64), || {
                    value
                });
            }
        }
        self.next_commit_seq = state.commit_seq + 1;
        self.shard
            .next_commit_seq
            .store(self.next_commit_seq, Ordering::Release);
        self.inner.generation.fetch_add(1, Ordering::AcqRel);
        prepared.stats
    }

    /// The prepared commit could not be made durable: nothing of it is published, and the
    /// readings buffered since it was prepared are discarded with it (their series ids may
    /// follow its own); the next commit first cuts the files back to their published lengths.
    fn abandon(&mut self, mut prepared: Prepared) {
        self.reuse(&mut prepared);
        if let Some(state) = prepared.publish {
            let mut dictionary = state.dictionary;
            dictionary.append(&mut self.pending_dictionary);
            self.pending_dictionary = dictionary;
        }
        self.exchange_bytes.clear();
        self.exchange_count = 0;
        self.exchange_arrivals = (f64::INFINITY, f64::NEG_INFINITY);
        self.discard_failed_commit();
    }

    /// Keeps the larger of the frame buffers (the commit's, the spare one) for the next commit.
    fn reuse(&mut self, prepared: &mut Prepared) {
        if prepared.bytes.capacity() > self.commit_bytes.capacity() {
            std::mem::swap(&mut self.commit_bytes, &mut prepared.bytes);
            self.commit_bytes.clear();
        }
        prepared.operations.clear();
    }

    /// Test hook: roll segments at this size instead of `SEGMENT_BYTES_MAX`.
    #[doc(hidden)]
    pub fn set_segment_bytes_max(&mut self, bytes: u64) {
        self.segment_bytes_max = bytes;
    }

    fn discard_failed_commit(&mut self) {
        self.buffer.clear();
        if let Some(&(first_id, _, _)) = self.pending_dictionary.first() {
            for (_, device, name) in self.pending_dictionary.drain(..) {
                if let Some(names) = self.ids.get_mut(&device) {
                    names.remove(&name);
                    if names.is_empty() {
                        self.ids.remove(&device);
                    }
                }
            }
            self.next_id = first_id;
        }
        let mut failed = self.failed.take().unwrap_or_default();
        failed.append(&mut self.touched);
        for segment in self.open.values_mut() {
            if segment.written_this_commit {
                failed.push(segment.shared.clone());
            }
            segment.len = segment.shared.published_len.load(Ordering::Acquire);
            segment.written_this_commit = false;
        }
        self.failed = Some(failed);
    }

    /// Cuts everything a failed commit may have written back to the published lengths.
    fn cut_back(&mut self) -> Result<(), StoreError> {
        let Some(failed) = self.failed.clone() else {
            return Ok(());
        };
        let sync = self.durability == Durability::Fsync;
        if let Some(dictionary) = &self.dictionary {
            dictionary
                .set_len(self.dictionary_len)
                .map_err(|error| StoreError::io("truncate", &self.dictionary_path, error))?;
            if sync {
                dictionary
                    .sync_data()
                    .map_err(|error| StoreError::io("fdatasync", &self.dictionary_path, error))?;
            }
        }
        for segment in &failed {
            if segment.dropped.load(Ordering::Acquire) {
                continue;
            }
            let published = segment.published_len.load(Ordering::Acquire);
            let file = self
                .inner
                .backend
                .open(&segment.path)
                .map_err(|error| StoreError::io("open", &segment.path, error))?;
            file.set_len(published)
                .map_err(|error| StoreError::io("truncate", &segment.path, error))?;
            if sync {
                file.sync_data()
                    .map_err(|error| StoreError::io("fdatasync", &segment.path, error))?;
            }
        }
        self.failed = None;
        Ok(())
    }

    fn prepare_inner(&mut self) -> Result<Prepared, StoreError> {
        self.cut_back()?;
        let check_due = self.last_seal_check.is_none_or(|last| {
            last.elapsed() >= std::time::Duration::from_millis(SEAL_CHECK_INTERVAL_MS)
        });
        if check_due {
            self.seal_due_locked()?;
        }
        if self.dictionary.is_none() {
            self.open_dictionary()?;
        }
        // Readings whose partition retention dropped since they were checked go with it.
        let floor = self.shard.retention_floor.load(Ordering::Acquire);
        let partition_secs = self.partition_secs;
        let expired_points = self
            .buffer
            .drop_windows(|window| expired(window, partition_secs, floor));
        if self.buffer.points == 0 && self.pending_dictionary.is_empty() {
            return Ok(Prepared {
                bytes: Vec::new(),
                operations: Vec::new(),
                publish: None,
                stats: CommitStats {
                    points: 0,
                    bytes: 0,
                    synced: false,
                    expired_points,
                    late_points: 0,
                },
            });
        }
        let sync = self.durability == Durability::Fsync;
        let commit_seq = self.next_commit_seq;
        let mut bytes_written = 0u64;

        // 1. Dictionary entries, durable before any block refers to them.
        let mut dictionary_end = self.dictionary_len;
        if !self.pending_dictionary.is_empty() {
            let mut payload = Vec::new();
            for (id, device, name) in &self.pending_dictionary {
                format::encode_dictionary_entry(&mut payload, *id, device, name);
            }
            let header = FrameHeader {
                kind: FrameKind::Dictionary,
                payload_len: 0,
                payload_crc: 0,
                count: self.pending_dictionary.len() as u32,
                commit_seq,
                min_time: 0.0,
                max_time: 0.0,
            };
            let start = self.commit_bytes.len();
            format::encode_frame(&mut self.commit_bytes, &header, &payload);
            let frame_len = (self.commit_bytes.len() - start) as u64;
            let Some(dictionary) = self.dictionary.clone() else {
                return Err(StoreError::io(
                    "write",
                    &self.dictionary_path,
                    std::io::Error::other("dictionary is not open"),
                ));
            };
            let path = self.dictionary_path.clone();
            self.queue_write(&dictionary, &path, dictionary_end, start);
            if sync {
                self.operations.push(Operation {
                    file: dictionary,
                    path,
                    kind: OperationKind::Sync,
                });
            }
            dictionary_end += frame_len;
            bytes_written += frame_len;
        }

        // 2. What this commit changes in the summary: per series, count and latest reading.
        let latest = self.buffer.latest();

        // 3. Blocks, by window and in append order within one, each written to its window's
        //    active segment.
        let points = self.buffer.points;
        let due_before = window_of(
            unix_now() - self.partition_grace_secs as f64,
            self.partition_secs,
        );
        let mut blocks = std::mem::take(&mut self.buffer.blocks);
        blocks.sort_by_key(|block| block.window);
        let late_points = blocks
            .iter()
            .filter(|block| block.window < due_before)
            .map(|block| block.records.series.len())
            .sum();
        let mut published: Vec<(Arc<SegmentShared>, BlockMeta, u64)> = Vec::new();
        let mut written = Ok(());
        for block in blocks.drain(..) {
            if written.is_ok() {
                written = self
                    .write_block(block.window, &block.records, commit_seq)
                    .map(|(segment, meta, end)| {
                        bytes_written +=
                            end - (meta.payload_offset - format::FRAME_HEADER_BYTES as u64);
                        published.push((segment, meta, end));
                    });
            }
            self.buffer.recycle(block.records);
        }
        self.buffer.clear();
        // Emptied, its capacity kept for the next commit.
        self.buffer.blocks = blocks;
        written?;

        // The commit record, right after the commit's last block (same segment, same sync).
        if let Some(window) = published.last().map(|(segment, _, _)| segment.window_start) {
            let before = last_block_end(&published);
            let end = self.write_commit_record(window, published.len() as u32, commit_seq)?;
            bytes_written += end - before;
            if let Some(last) = published.last_mut() {
                last.2 = end;
            }
        }

        // 4. What must be made durable: every segment written, including those closed while
        //    the commit was prepared.
        let mut operations = std::mem::take(&mut self.operations);
        let closed = self.closed.drain(..);
        let open = self
            .open
            .values()
            .filter(|segment| segment.written_this_commit)
            .map(|segment| (segment.file.clone(), segment.shared.path.clone()));
        if sync {
            for (file, path) in closed.chain(open) {
                operations.push(Operation {
                    file,
                    path,
                    kind: OperationKind::Sync,
                });
            }
        }
        Ok(Prepared {
            bytes: std::mem::take(&mut self.commit_bytes),
            operations,
            publish: Some(PublishState {
                dictionary_end,
                published,
                latest,
                dictionary: std::mem::take(&mut self.pending_dictionary),
                commit_seq,
            }),
            stats: CommitStats {
                points,
                bytes: bytes_written,
                synced: sync,
                expired_points,
                late_points,
            },
        })
    }

    /// Writes the commit record (block count and pending exchanges) at the end of the open
    /// segment of `window`, which the commit's last block went to; returns the segment's new end.
    fn write_commit_record(
        &mut self,
        window: i64,
        blocks: u32,
        commit_seq: u64,
    ) -> Result<u64, StoreError> {
        let (min_time, max_time) = if self.exchange_count == 0 {
            (0.0, 0.0)
        } else {
            self.exchange_arrivals
        };
        let mut payload = Vec::with_capacity(8 + self.exchange_bytes.len());
        format::encode_commit_prefix(&mut payload, blocks);
        payload.extend_from_slice(&self.exchange_bytes);
        let header = FrameHeader {
            kind: FrameKind::Commit,
            payload_len: 0,
            payload_crc: 0,
            count: self.exchange_count,
            commit_seq,
            min_time,
            max_time,
        };
        let start = self.commit_bytes.len();
        format::encode_frame(&mut self.commit_bytes, &header, &payload);
        let frame_len = (self.commit_bytes.len() - start) as u64;
        let Some(segment) = self.open.get_mut(&window) else {
            return Err(StoreError::io(
                "write",
                &self.shard.dir,
                std::io::Error::other("segment of the commit's last block is not open"),
            ));
        };
        segment.written_this_commit = true;
        segment
            .shared
            .last_commit
            .fetch_max(commit_seq + 1, Ordering::AcqRel);
        let (file, offset) = (segment.file.clone(), segment.len);
        segment.len += frame_len;
        let end = segment.len;
        let path = segment.shared.path.clone();
        self.queue_write(&file, &path, offset, start);
        Ok(end)
    }

    /// Writes one block frame to the active segment of `window`; returns the segment, the block's
    /// index entry and the frame's end offset.
    fn write_block(
        &mut self,
        window: i64,
        block: &BlockRecords,
        commit_seq: u64,
    ) -> Result<(Arc<SegmentShared>, BlockMeta, u64), StoreError> {
        let payload = format::encode_block(block).map_err(|reason| {
            StoreError::io(
                "encode block",
                &self.shard.dir,
                std::io::Error::other(reason),
            )
        })?;
        let min_time = block.times.iter().copied().fold(f64::INFINITY, f64::min);
        let max_time = block
            .times
            .iter()
            .copied()
            .fold(f64::NEG_INFINITY, f64::max);
        let header = FrameHeader {
            kind: FrameKind::Block,
            payload_len: 0,
            payload_crc: 0,
            count: block.series.len() as u32,
            commit_seq,
            min_time,
            max_time,
        };
        let start = self.commit_bytes.len();
        format::encode_frame(&mut self.commit_bytes, &header, &payload);
        let frame_len = (self.commit_bytes.len() - start) as u64;
        self.segment_for(window, frame_len)?;
        let Some(segment) = self.open.get_mut(&window) else {
            return Err(StoreError::io(
                "write",
                &self.shard.dir,
                std::io::Error::other("segment not open"),
            ));
        };
        // Marked now: a failed write may still write part of the frame.
        segment.written_this_commit = true;
        segment
            .shared
            .last_commit
            .fetch_max(commit_seq + 1, Ordering::AcqRel);
        let offset = segment.len;
        segment.len += frame_len;
        let (file, shared) = (segment.file.clone(), segment.shared.clone());
        self.queue_write(&file, &shared.path, offset, start);
        let meta = BlockMeta {
            payload_offset: offset + format::FRAME_HEADER_BYTES as u64,
            payload_len: payload.len() as u32,
            count: header.count,
            min_time,
            max_time,
        };
        Ok((shared, meta, offset + frame_len))
    }

    /// Makes sure `open[window]` is a segment with room for `frame_len` more bytes (or empty).
    fn segment_for(&mut self, window: i64, frame_len: u64) -> Result<(), StoreError> {
        self.tick += 1;
        let tick = self.tick;
        if self.open.get(&window).is_some_and(|segment| {
            segment.shared.dropped.load(Ordering::Acquire) || segment.shared.sealed.get().is_some()
        }) {
            // Retention dropped it (a segment of another partition width in this window).
            self.open.remove(&window);
        }
        if let Some(segment) = self.open.get_mut(&window) {
            segment.last_used = tick;
            if segment.len <= FILE_HEADER_BYTES as u64
                || segment.len + frame_len <= self.segment_bytes_max
            {
                return Ok(());
            }
            // Full: roll to the next sequence number.
            let seq = segment.shared.seq + 1;
            self.close(window);
            return self.create_segment(window, seq);
        }
        // Not open: reuse the newest segment of this window if it matches and has room.
        let (newest_matching, next_seq) = {
            let segments = crate::store::read_segments(&self.shard);
            let in_window: Vec<&Arc<SegmentShared>> = segments
                .iter()
                .filter(|segment| segment.window_start == window)
                .collect();
            let next_seq = in_window
                .iter()
                .map(|segment| segment.seq + 1)
                .max()
                .unwrap_or(0);
            let newest = in_window
                .iter()
                .max_by_key(|segment| segment.seq)
                .copied()
                .cloned();
            (
                newest.filter(|segment| {
                    segment.partition_secs == self.partition_secs && segment.sealed.get().is_none()
                }),
                next_seq,
            )
        };
        if let Some(shared) = newest_matching {
            let len = shared.published_len.load(Ordering::Acquire);
            if len + frame_len <= self.segment_bytes_max || len <= FILE_HEADER_BYTES as u64 {
                let file = self
                    .inner
                    .backend
                    .open(&shared.path)
                    .map_err(|error| StoreError::io("open segment", &shared.path, error))?;
                self.make_room()?;
                self.open.insert(
                    window,
                    OpenSegment {
                        file,
                        shared,
                        len,
                        last_used: tick,
                        written_this_commit: false,
                    },
                );
                return Ok(());
            }
        }
        self.create_segment(window, next_seq)
    }

    fn create_segment(&mut self, window: i64, seq: u64) -> Result<(), StoreError> {
        self.make_room()?;
        let path = segment_path(&self.shard.dir, window, seq);
        let header = FileHeader {
            kind: FileKind::Segment,
            shard: self.shard.shard,
            window_start: window,
            partition_secs: self.partition_secs,
            seq,
        };
        let window_dir = path.parent().map(Path::to_path_buf).unwrap_or_default();
        let file = create_with_header(&*self.inner.backend, &window_dir, &path, &header)?;
        let shared = Arc::new(SegmentShared::new(
            path,
            window,
            self.partition_secs,
            seq,
            FILE_HEADER_BYTES as u64,
            Vec::new(),
        ));
        write_lock(&self.shard.segments).push(shared.clone());
        self.open.insert(
            window,
            OpenSegment {
                file,
                shared,
                len: FILE_HEADER_BYTES as u64,
                last_used: self.tick,
                written_this_commit: false,
            },
        );
        Ok(())
    }

    /// Closes the least recently used segment if `open_segments_max` are open.
    fn make_room(&mut self) -> Result<(), StoreError> {
        while self.open.len() >= OPEN_SEGMENTS_MAX {
            let Some(window) = self
                .open
                .iter()
                .min_by_key(|(_, segment)| segment.last_used)
                .map(|(window, _)| *window)
            else {
                break;
            };
            self.close(window);
        }
        Ok(())
    }

    /// Closes an open segment; if the commit being prepared wrote to it, the commit's I/O
    /// syncs it (its handle lives until then).
    fn close(&mut self, window: i64) {
        let Some(segment) = self.open.remove(&window) else {
            return;
        };
        if segment.written_this_commit {
            self.touched.push(segment.shared.clone());
            self.closed
                .push((segment.file, segment.shared.path.clone()));
        }
    }

    /// Queues the write of the frame that starts at `commit_bytes[start..]` (to its end) at
    /// `offset` of `file`; a write that continues the previous one on the same file joins it.
    fn queue_write(&mut self, file: &Arc<dyn StorageFile>, path: &Path, offset: u64, start: usize) {
        let end = self.commit_bytes.len();
        if let Some(Operation {
            file: last_file,
            kind:
                OperationKind::Write {
                    offset: last_offset,
                    start: last_start,
                    end: last_end,
                },
            ..
        }) = self.operations.last_mut()
        {
            if Arc::ptr_eq(last_file, file)
                && *last_end == start
                && *last_offset + (*last_end - *last_start) as u64 == offset
            {
                *last_end = end;
                return;
            }
        }
        self.operations.push(Operation {
            file: file.clone(),
            path: path.to_path_buf(),
            kind: OperationKind::Write { offset, start, end },
        });
    }

    /// Seals every segment of this shard whose partition window plus the grace period has
    /// passed (docs/storage-format.md, "Sealing"), at most `SEALS_PER_CHECK_MAX` per call, on
    /// this thread; returns how many (with those a commit's check had started on the sealing
    /// thread and that are finished). Commits check at most once per `SEAL_CHECK_INTERVAL_MS`,
    /// and leave the work to the sealing thread.
    pub fn seal_due(&mut self) -> Result<usize, StoreError> {
        let shard = self.shard.clone();
        let _files = lock(&shard.files);
        self.cut_back()?;
        self.seal_check(false)
    }

    /// A commit's seal check (the shard's file lock held, no failed commit left to cut back):
    /// publishes the seals the sealing thread finished and hands it the next due segments. On a
    /// simulated disk (whose operations tests count in order) the seals run here instead.
    fn seal_due_locked(&mut self) -> Result<usize, StoreError> {
        let background = self.inner.backend.background_seals();
        self.seal_check(background)
    }

    fn seal_check(&mut self, background: bool) -> Result<usize, StoreError> {
        self.last_seal_check = Some(std::time::Instant::now());
        let mut sealed = 0;
        let finished = self
            .sealer
            .as_mut()
            .map(|sealer| sealer.finished())
            .unwrap_or_default();
        let mut failure = None;
        for outcome in finished {
            match outcome {
                Ok(built) => sealed += usize::from(self.publish_seal(built)?),
                // Retention dropped the partition meanwhile: nothing to seal.
                Err((segment, _)) if segment.dropped.load(Ordering::Acquire) => {}
                // Tried again at a later check; the commit reports it, as a seal on this thread.
                Err((_, error)) => failure = Some(error),
            }
        }
        if let Some(error) = failure {
            return Err(error);
        }
        let horizon = unix_now() - self.partition_grace_secs as f64;
        // Due: the window ended more than the grace period ago, and the segment was not written
        // for the grace period (a late segment stays open while a device backfills).
        let due: Vec<Arc<SegmentShared>> = read_lock(&self.shard.segments)
            .iter()
            .filter(|segment| {
                segment.sealed.get().is_none()
                    && !segment.dropped.load(Ordering::Acquire)
                    && (segment.window_start as f64 + segment.partition_secs as f64) <= horizon
                    && segment.last_write_unix_s.load(Ordering::Acquire) as f64 <= horizon
                    && !self
                        .sealer
                        .as_ref()
                        .is_some_and(|sealer| sealer.busy_with(segment))
            })
            .take(SEALS_PER_CHECK_MAX)
            .cloned()
            .collect();
        if background {
            if self.sealer.is_none() {
                let sealer = crate::sealed::Sealer::start(self.shard.shard, SEALS_PER_CHECK_MAX)
                    .map_err(|error| {
                        StoreError::io("start the sealing thread", &self.shard.dir, error)
                    })?;
                self.sealer = Some(sealer);
            }
            for segment in due {
                let job = self.seal_job(segment);
                let Some(sealer) = self.sealer.as_mut().filter(|sealer| sealer.room() > 0) else {
                    break;
                };
                sealer.submit(job);
            }
            return Ok(sealed);
        }
        for segment in due {
            let built = crate::sealed::write(self.seal_job(segment)).map_err(|(_, error)| error)?;
            sealed += usize::from(self.publish_seal(built)?);
        }
        Ok(sealed)
    }

    /// What a seal of `segment` starts from: its published length and blocks now.
    fn seal_job(&self, segment: Arc<SegmentShared>) -> crate::sealed::Job {
        let mut sync_first = Vec::new();
        if self.durability == Durability::Os {
            sync_first.push(self.dictionary_path.clone());
            sync_first.extend(
                read_lock(&self.shard.segments)
                    .iter()
                    .filter(|other| {
                        other.sealed.get().is_none()
                            && !other.dropped.load(Ordering::Acquire)
                            && !Arc::ptr_eq(other, &segment)
                    })
                    .map(|other| other.path.clone()),
            );
        }
        let blocks = read_lock(&segment.blocks).clone();
        crate::sealed::Job {
            backend: self.inner.backend.clone(),
            shard: self.shard.shard,
            published_len: segment.published_len.load(Ordering::Acquire),
            blocks,
            segment,
            sync_first,
        }
    }

    /// Renames a built sealed file into place (the file lock held): the segment is closed here
    /// and replaced in the catalog. False when the segment changed meanwhile.
    fn publish_seal(&mut self, built: crate::sealed::Built) -> Result<bool, StoreError> {
        let segment = built.segment.clone();
        let published = crate::sealed::publish(&*self.inner.backend, &self.shard, built)?;
        if published.is_none() {
            return Ok(false);
        }
        let open = self
            .open
            .get(&segment.window_start)
            .is_some_and(|open| Arc::ptr_eq(&open.shared, &segment))
            .then(|| self.open.remove(&segment.window_start))
            .flatten();
        self.inner.generation.fetch_add(1, Ordering::AcqRel);
        // The segment file is removed: its last handle frees its blocks, off this thread.
        if let Some(sealer) = &self.sealer {
            sealer.release(Box::new((open, segment)));
        }
        Ok(true)
    }

    /// Segment files open right now (bounded by `OPEN_SEGMENTS_MAX`).
    pub fn open_segments(&self) -> usize {
        self.open.len()
    }
}

impl Drop for ShardWriter {
    fn drop(&mut self) {
        lock(&self.inner.writers).remove(&self.shard.shard);
    }
}

/// floor(time / partition_secs) * partition_secs, in whole seconds.
/// Whether the store can hold this reading: what [`ShardWriter::append`] checks before it buffers
/// anything. Callers that append several readings as one unit check them all first.
pub fn check_reading(
    device: &str,
    name: &str,
    time: f64,
    value: &ValueRef<'_>,
) -> Result<(), StoreError> {
    if device.is_empty() || device.len() > NAME_BYTES_MAX {
        return Err(StoreError::InvalidReading(format!(
            "device id must be 1 to {NAME_BYTES_MAX} bytes, is {}",
            device.len()
        )));
    }
    if name.len() > NAME_BYTES_MAX {
        return Err(StoreError::InvalidReading(format!(
            "series name must be at most {NAME_BYTES_MAX} bytes, is {}",
            name.len()
        )));
    }
    if !time.is_finite() || time.abs() > TIME_ABS_MAX {
        return Err(StoreError::InvalidReading(format!(
            "time {time} is not a finite number of seconds within ±2^53"
        )));
    }
    let value_len = match value {
        ValueRef::String(text) => text.len(),
        ValueRef::Data(data) => data.len(),
        _ => 0,
    };
    if value_len > VALUE_BYTES_MAX {
        return Err(StoreError::InvalidReading(format!(
            "value of {value_len} bytes exceeds {VALUE_BYTES_MAX}"
        )));
    }
    Ok(())
}

/// Whether a partition window of this width lies wholly below the retention floor.
pub(crate) fn expired(window: i64, partition_secs: u64, floor: i64) -> bool {
    window.saturating_add(partition_secs as i64) <= floor
}

/// End of the commit's last block (where its commit record goes).
fn last_block_end(published: &[(Arc<SegmentShared>, BlockMeta, u64)]) -> u64 {
    published.last().map_or(0, |(_, _, end)| *end)
}

/// Wall-clock unix seconds.
pub(crate) fn unix_now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0.0, |since| since.as_secs_f64())
}

pub(crate) fn window_of(time: f64, partition_secs: u64) -> i64 {
    let width = partition_secs as f64;
    // floor() by a truncating conversion (a libm call on baseline x86-64, per reading): exact,
    // as reading times are within ±2^53 (`TIME_ABS_MAX`).
    let quotient = time / width;
    let truncated = quotient as i64;
    let floor = if (truncated as f64) > quotient {
        truncated - 1
    } else {
        truncated
    };
    (floor as f64 * width) as i64
}

/// Creates a file (and its directory), writes the header, and makes both durable before any
/// frame is written to it.
fn create_with_header(
    backend: &dyn Backend,
    dir: &Path,
    path: &Path,
    header: &FileHeader,
) -> Result<Arc<dyn StorageFile>, StoreError> {
    backend::create_dirs(backend, dir)?;
    let file = backend
        .create(path)
        .map_err(|error| StoreError::io("create", path, error))?;
    file.write_all_at(&header.encode(), 0)
        .map_err(|error| StoreError::io("write header", path, error))?;
    file.sync_data()
        .map_err(|error| StoreError::io("fdatasync", path, error))?;
    backend::sync_dir(backend, dir)?;
    Ok(file)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn window_of_floors_at_the_edges() {
        assert_eq!(window_of(0.0, 3600), 0);
        assert_eq!(window_of(3599.999, 3600), 0);
        assert_eq!(window_of(3600.0, 3600), 3600);
        assert_eq!(window_of(-0.5, 3600), -3600);
        assert_eq!(window_of(-3600.0, 3600), -3600);
        assert_eq!(window_of(-3600.5, 3600), -7200);
        assert_eq!(window_of(TIME_ABS_MAX, 1), TIME_ABS_MAX as i64);
        assert_eq!(window_of(-TIME_ABS_MAX, 1), -TIME_ABS_MAX as i64);
    }

    proptest! {
        #[test]
        fn window_of_is_floor_of_the_quotient(time in -TIME_ABS_MAX..TIME_ABS_MAX, width in 1u64..1_000_000) {
            let expected = ((time / width as f64).floor() * width as f64) as i64;
            prop_assert_eq!(window_of(time, width), expected);
        }
    }
}
