//! Sealed files: a sealed segment rewritten series-major (docs/storage-format.md, "Sealing" and
//! "Sealed file"). `build` turns a segment's bytes into a sealed file's bytes; `check` validates
//! a scanned sealed file against its index and gives the in-memory series index readers use.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::mpsc::{Receiver, Sender};
use std::sync::Arc;
use std::thread::JoinHandle;

use crate::backend::{self, Backend};

use crate::format::{
    self, BlockRecords, FileHeader, FileKind, FrameHeader, FrameKind, SealedCommit, SealedIndex,
    SealedSeries, StoredValue, BLOCK_BYTES_TARGET, BLOCK_RECORDS_MAX, FILE_HEADER_BYTES,
};
use crate::store::{
    read_lock, sealed_path, sealed_tmp_path, write_lock, BlockMeta, SegmentShared, ShardShared,
};
use crate::StoreError;

/// A sealed file is written and synced in pieces of this size (the last one may be shorter).
const SEAL_WRITE_PIECE_BYTES: usize = 1 << 20;

/// One series of a sealed file as readers use it: its frames are `blocks[first..first + frames]`
/// of the segment's block list.
#[derive(Clone, Copy, Debug)]
pub(crate) struct SealedEntry {
    pub id: u32,
    pub first: u32,
    pub frames: u32,
    pub points: u64,
}

/// A sealed file's series index, in memory (ascending by id).
#[derive(Debug, Default)]
pub(crate) struct Sealed {
    pub series: Vec<SealedEntry>,
}

impl Sealed {
    /// The series' entry (binary search).
    pub fn find(&self, id: u32) -> Option<&SealedEntry> {
        self.series
            .binary_search_by_key(&id, |entry| entry.id)
            .ok()
            .map(|index| &self.series[index])
    }
}

/// What recovery and `verify` take from a valid sealed file.
pub(crate) struct Checked {
    pub index: SealedIndex,
    /// Series frames, in file order.
    pub blocks: Vec<BlockMeta>,
    pub sealed: Sealed,
}

/// Builds the bytes of the sealed file replacing a segment: `segment` is the segment's bytes up
/// to its published length, `published` its published blocks (the only records served). Errors
/// name what is wrong (a published block that does not validate is corruption).
pub(crate) fn build(
    header: &FileHeader,
    segment: &[u8],
    published: &[BlockMeta],
) -> Result<Vec<u8>, String> {
    let scan = format::scan(
        segment,
        FileKind::Segment,
        &mut format::validate_segment_frame,
    );
    let mut published_offsets: Vec<u64> = published.iter().map(|b| b.payload_offset).collect();
    published_offsets.sort_unstable();
    // Per commit: valid blocks found, and the raw bytes of its record frame.
    let mut commits: BTreeMap<u64, (u32, Option<&[u8]>)> = BTreeMap::new();
    // Sort keys of every served record: (series, time, block, position in block).
    let mut keys: Vec<(u32, f64, u32, u32)> = Vec::new();
    let mut blocks = Vec::new();
    let mut block_commits: Vec<u64> = Vec::new();
    let mut max_commit_seq = 0u64;
    for frame in &scan.frames {
        let seq = frame.header.commit_seq;
        max_commit_seq = max_commit_seq.max(seq);
        let entry = commits.entry(seq).or_default();
        match frame.header.kind {
            FrameKind::Commit => {
                entry.1 = Some(&segment[frame.offset as usize..frame.end() as usize]);
            }
            FrameKind::Block => {
                entry.0 += 1;
                if published_offsets
                    .binary_search(&frame.payload_offset())
                    .is_err()
                {
                    continue;
                }
                let start = frame.payload_offset() as usize;
                let payload = &segment[start..start + frame.header.payload_len as usize];
                let block = format::access_block(payload)?;
                let number = blocks.len() as u32;
                for (position, (id, time)) in
                    block.series.iter().zip(block.times.iter()).enumerate()
                {
                    keys.push((id.to_native(), time.to_native(), number, position as u32));
                }
                blocks.push(block);
                block_commits.push(seq);
            }
            FrameKind::Dictionary | FrameKind::Index => {}
        }
    }
    if blocks.len() != published.len() {
        return Err(format!(
            "{} of {} published blocks found in the segment",
            blocks.len(),
            published.len()
        ));
    }
    // Stable: records of one series at one time keep their write (file) order.
    keys.sort_by(|a, b| a.0.cmp(&b.0).then(a.1.total_cmp(&b.1)));

    let mut out = Vec::with_capacity(segment.len() + 4096);
    out.extend_from_slice(&header.encode());
    let mut index = SealedIndex {
        source_len: segment.len() as u64,
        ..SealedIndex::default()
    };
    let (mut min_time, mut max_time) = (f64::INFINITY, f64::NEG_INFINITY);
    let mut start = 0;
    while start < keys.len() {
        let id = keys[start].0;
        let end = start + keys[start..].partition_point(|key| key.0 == id);
        let mut series = SealedSeries {
            id,
            frames: 0,
            offset: out.len() as u64,
            points: (end - start) as u64,
            min_time: keys[start].1,
            max_time: keys[end - 1].1,
        };
        min_time = min_time.min(series.min_time);
        max_time = max_time.max(series.max_time);
        // Frames of at most BLOCK_RECORDS_MAX records and about BLOCK_BYTES_TARGET of values.
        let mut records = BlockRecords::default();
        let mut value_bytes = 0usize;
        for (index_in_run, &(_, time, block, position)) in keys[start..end].iter().enumerate() {
            let value = &blocks[block as usize].values[position as usize];
            let value = match value {
                format::ArchivedStoredValue::Number(n) => StoredValue::Number(n.to_native()),
                format::ArchivedStoredValue::Bool(b) => StoredValue::Bool(*b),
                format::ArchivedStoredValue::String(s) => {
                    value_bytes += s.len();
                    StoredValue::String(s.as_str().to_string())
                }
                format::ArchivedStoredValue::Data(d) => {
                    value_bytes += d.len();
                    StoredValue::Data(d.as_slice().to_vec())
                }
            };
            records.series.push(id);
            records.times.push(time);
            records.values.push(value);
            let last_commit = block_commits[block as usize];
            let last = index_in_run + 1 == end - start;
            if last
                || records.series.len() >= BLOCK_RECORDS_MAX
                || value_bytes >= BLOCK_BYTES_TARGET
            {
                write_series_frame(&mut out, &records, last_commit)?;
                series.frames += 1;
                records = BlockRecords::default();
                value_bytes = 0;
            }
        }
        index.series.push(series);
        start = end;
    }
    for (&commit_seq, &(blocks, record)) in &commits {
        if let Some(frame) = record {
            out.extend_from_slice(frame);
        }
        index.commits.push(SealedCommit {
            commit_seq,
            blocks,
            record: record.is_some(),
        });
    }
    let mut payload = Vec::new();
    format::encode_sealed_index(&mut payload, &index);
    let (min_time, max_time) = if keys.is_empty() {
        (0.0, 0.0)
    } else {
        (min_time, max_time)
    };
    format::encode_frame(
        &mut out,
        &FrameHeader {
            kind: FrameKind::Index,
            payload_len: 0,
            payload_crc: 0,
            count: index.series.len() as u32,
            commit_seq: max_commit_seq,
            min_time,
            max_time,
        },
        &payload,
    );
    Ok(out)
}

fn write_series_frame(
    out: &mut Vec<u8>,
    records: &BlockRecords,
    commit_seq: u64,
) -> Result<(), String> {
    let payload = format::encode_block(records)?;
    let header = FrameHeader {
        kind: FrameKind::Block,
        payload_len: 0,
        payload_crc: 0,
        count: records.series.len() as u32,
        commit_seq,
        min_time: records.times.first().copied().unwrap_or(0.0),
        max_time: records.times.last().copied().unwrap_or(0.0),
    };
    format::encode_frame(out, &header, &payload);
    Ok(())
}

/// Checks a scanned sealed file (docs/storage-format.md, "Sealed file"): no torn tail, the index
/// is the last frame, and, where no hole is, the frames are exactly those the index lists. Holes
/// (corrupt series or commit frames, counted by the caller) lose their frames only.
pub(crate) fn check(bytes: &[u8], scan: &format::Scan) -> Result<Checked, String> {
    if let Some(reason) = &scan.tail_reason {
        return Err(format!(
            "sealed file's end is not a valid index frame ({reason}) at byte {}",
            scan.valid_end
        ));
    }
    let Some(last) = scan
        .frames
        .last()
        .filter(|frame| frame.header.kind == FrameKind::Index)
    else {
        return Err("sealed file has no index frame at its end".to_string());
    };
    if scan.frames[..scan.frames.len() - 1]
        .iter()
        .any(|frame| frame.header.kind == FrameKind::Index)
    {
        return Err("sealed file has more than one index frame".to_string());
    }
    let start = last.payload_offset() as usize;
    let index = format::decode_sealed_index(
        &last.header,
        &bytes[start..start + last.header.payload_len as usize],
    )?;
    let blocks: Vec<BlockMeta> = scan
        .frames
        .iter()
        .filter(|frame| frame.header.kind == FrameKind::Block)
        .map(|frame| BlockMeta {
            payload_offset: frame.payload_offset(),
            payload_len: frame.header.payload_len,
            count: frame.header.count,
            min_time: frame.header.min_time,
            max_time: frame.header.max_time,
        })
        .collect();
    let first_other = scan
        .frames
        .iter()
        .find(|frame| frame.header.kind != FrameKind::Block)
        .map_or(u64::MAX, |frame| frame.offset);
    let mut series = Vec::with_capacity(index.series.len());
    for (i, entry) in index.series.iter().enumerate() {
        let span_end = index
            .series
            .get(i + 1)
            .map_or(first_other, |next| next.offset);
        let first = blocks.partition_point(|block| block.payload_offset < entry.offset);
        let end = blocks.partition_point(|block| block.payload_offset < span_end);
        let frames = end.saturating_sub(first);
        if scan.holes.is_empty() {
            let points: u64 = blocks[first..end.max(first)]
                .iter()
                .map(|block| block.count as u64)
                .sum();
            let at_offset = blocks.get(first).is_some_and(|block| {
                block.payload_offset == entry.offset + format::FRAME_HEADER_BYTES as u64
            });
            if frames != entry.frames as usize || points != entry.points || !at_offset {
                return Err(format!(
                    "index entry of series {} ({} frames, {} points at byte {}) does not match the file ({frames} frames, {points} points)",
                    entry.id, entry.frames, entry.points, entry.offset
                ));
            }
        }
        // Every frame in the span holds the entry's series (a frame holds one series: the
        // scan validated it), so a query never needs to look at another series' records.
        for block in &blocks[first..end.max(first)] {
            let start = block.payload_offset as usize;
            let payload = &bytes[start..start + block.payload_len as usize];
            let id = format::with_aligned(payload, |payload| {
                format::access_block(payload)
                    .map(|records| records.series.first().map(|id| id.to_native()))
            })?;
            if id.is_some_and(|id| id != entry.id) {
                return Err(format!(
                    "series frame at byte {} holds series {id:?}, the index says {}",
                    block.payload_offset - format::FRAME_HEADER_BYTES as u64,
                    entry.id
                ));
            }
        }
        series.push(SealedEntry {
            id: entry.id,
            first: first as u32,
            frames: frames as u32,
            points: entry.points,
        });
    }
    if scan.holes.is_empty() {
        let listed: u32 = index.series.iter().map(|entry| entry.frames).sum();
        let records = index.commits.iter().filter(|commit| commit.record).count();
        let found = scan
            .frames
            .iter()
            .filter(|frame| frame.header.kind == FrameKind::Commit)
            .count();
        if listed as usize != blocks.len() || records != found {
            return Err(format!(
                "sealed file holds {} series frames and {found} commit records, its index lists {listed} and {records}",
                blocks.len()
            ));
        }
        if blocks.first().is_some_and(|block| {
            block.payload_offset != (FILE_HEADER_BYTES + format::FRAME_HEADER_BYTES) as u64
        }) {
            return Err("sealed file's first series frame is not at its start".to_string());
        }
    }
    Ok(Checked {
        index,
        blocks,
        sealed: Sealed { series },
    })
}

/// A seal to do: the segment as the writer saw it (docs/storage-format.md, "Sealing").
pub(crate) struct Job {
    pub backend: Arc<dyn Backend>,
    pub shard: u32,
    pub segment: Arc<SegmentShared>,
    /// The segment's published length and blocks when the seal started.
    pub published_len: u64,
    pub blocks: Vec<BlockMeta>,
    /// Files to fdatasync before the segment itself (under `os`: the dictionary and the shard's
    /// other unsealed segments, so that every commit the sealed file holds is durable).
    pub sync_first: Vec<PathBuf>,
}

/// A sealed file written and synced under its temporary name, not yet renamed.
pub(crate) struct Built {
    pub segment: Arc<SegmentShared>,
    pub published_len: u64,
    pub tmp: PathBuf,
    pub len: u64,
    pub checked: Checked,
}

/// Steps 1 to 3 of a seal up to the synced temporary file: syncs, builds, writes. Touches no
/// shared state, so it may run on another thread while the writer commits.
pub(crate) fn write(job: Job) -> Result<Built, (Arc<SegmentShared>, StoreError)> {
    let segment = job.segment.clone();
    write_inner(job).map_err(|error| (segment, error))
}

fn write_inner(job: Job) -> Result<Built, StoreError> {
    let backend = &*job.backend;
    let segment = &job.segment;
    let path = &segment.path;
    for file in job.sync_first.iter().chain(std::iter::once(path)) {
        let handle = backend
            .open(file)
            .map_err(|error| StoreError::io("open", file, error))?;
        handle
            .sync_data()
            .map_err(|error| StoreError::io("fdatasync", file, error))?;
    }
    let header = FileHeader {
        kind: FileKind::Sealed,
        shard: job.shard,
        window_start: segment.window_start,
        partition_secs: segment.partition_secs,
        seq: segment.seq,
    };
    let corrupt = |reason: String| StoreError::Corrupt {
        path: path.clone(),
        offset: 0,
        reason: format!("cannot seal: {reason}"),
    };
    let bytes = {
        let map = segment.map(backend, job.published_len)?;
        build(&header, &map[..job.published_len as usize], &job.blocks).map_err(corrupt)?
    };
    // What readers will use, checked as recovery checks it.
    let checked = {
        let scan = format::scan(&bytes, FileKind::Sealed, &mut |_, _| Ok(()));
        check(&bytes, &scan).map_err(corrupt)?
    };
    let tmp = sealed_tmp_path(path);
    let written = backend
        .create(&tmp)
        .map_err(|error| StoreError::io("create", &tmp, error))
        .and_then(|file| {
            // In pieces, each synced: the disk never holds much of the seal's data unwritten,
            // so the commits' own fdatasyncs meanwhile do not wait behind 64 MiB of it.
            for (index, piece) in bytes.chunks(SEAL_WRITE_PIECE_BYTES).enumerate() {
                file.write_all_at(piece, (index * SEAL_WRITE_PIECE_BYTES) as u64)
                    .map_err(|error| StoreError::io("write", &tmp, error))?;
                file.sync_data()
                    .map_err(|error| StoreError::io("fdatasync", &tmp, error))?;
            }
            Ok(())
        });
    if let Err(error) = written {
        // Best effort: a leftover is removed at the next open or overwritten by the next try.
        let _ = backend.remove_file(&tmp);
        return Err(error);
    }
    Ok(Built {
        segment: job.segment,
        published_len: job.published_len,
        tmp,
        len: bytes.len() as u64,
        checked,
    })
}

/// Steps 3 (the rename: the seal) to 5, with the shard's file lock held (no commit writes and
/// retention drops nothing meanwhile). Returns the sealed file's catalog entry, or None (and
/// the temporary file removed) when the segment changed since the seal started (a late reading
/// was appended: it is sealed again later) or retention dropped it.
pub(crate) fn publish(
    backend: &dyn Backend,
    shard: &ShardShared,
    built: Built,
) -> Result<Option<Arc<SegmentShared>>, StoreError> {
    let segment = &built.segment;
    let current = !segment.dropped.load(Ordering::Acquire)
        && segment.published_len.load(Ordering::Acquire) == built.published_len
        && read_lock(&shard.segments)
            .iter()
            .any(|entry| Arc::ptr_eq(entry, segment));
    if !current {
        match backend.remove_file(&built.tmp) {
            Ok(()) => {}
            // Retention moved the directory away with it.
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => {}
            Err(error) => return Err(StoreError::io("remove", &built.tmp, error)),
        }
        return Ok(None);
    }
    let path = &segment.path;
    let sealed = sealed_path(path);
    backend
        .rename(&built.tmp, &sealed)
        .map_err(|error| StoreError::io("rename", &built.tmp, error))?;
    let dir = path.parent().unwrap_or(Path::new("."));
    backend::sync_dir(backend, dir)?;
    // Step 4: the sealed file replaces the segment in the catalog.
    let shared = Arc::new(SegmentShared::new(
        sealed,
        segment.window_start,
        segment.partition_secs,
        segment.seq,
        built.len,
        built.checked.blocks,
    ));
    let _ = shared.sealed.set(built.checked.sealed);
    shared.last_commit.store(
        segment.last_commit.load(Ordering::Acquire),
        Ordering::Release,
    );
    for entry in write_lock(&shard.segments).iter_mut() {
        if Arc::ptr_eq(entry, segment) {
            *entry = shared.clone();
        }
    }
    let _ = segment.successor.set(shared.clone());
    // Step 5: the segment file goes (readers holding its map keep reading it).
    backend
        .remove_file(path)
        .map_err(|error| StoreError::io("remove sealed segment", path, error))?;
    backend::sync_dir(backend, dir)?;
    Ok(Some(shared))
}

/// Result of a seal on the sealer thread.
pub(crate) type Outcome = Result<Built, (Arc<SegmentShared>, StoreError)>;

/// What a sealing thread is handed.
enum Work {
    Seal(Job),
    /// The writer's last handles on a segment it sealed (its file, its catalog entry and map),
    /// dropped on the sealing thread: the last handle of a removed segment file frees its
    /// blocks when it goes (40–65 ms for 64 MiB on ext4 mounted with `discard`), which the
    /// commit that published the seal should not wait for.
    Release(Box<dyn Send>),
}

/// A shard writer's sealing thread: builds and writes sealed files while the writer commits;
/// the writer renames them into place at its next seal check (`publish`) and hands it back the
/// handles of the segments they replaced (`release`).
pub(crate) struct Sealer {
    /// Seals (at most `capacity` at a time) and releases (at most one per published seal).
    jobs: Option<Sender<Work>>,
    done: Receiver<Outcome>,
    /// Segments handed to the thread and not back yet (at most `capacity`).
    in_flight: Vec<Arc<SegmentShared>>,
    capacity: usize,
    thread: Option<JoinHandle<()>>,
}

impl Sealer {
    /// Starts the thread; it takes at most `capacity` seals at a time.
    pub fn start(shard: u32, capacity: usize) -> std::io::Result<Sealer> {
        let (jobs, receive_jobs) = std::sync::mpsc::channel::<Work>();
        let (send_done, done) = std::sync::mpsc::sync_channel::<Outcome>(capacity);
        let thread = std::thread::Builder::new()
            .name(format!("sluice-seal-{shard}"))
            .spawn(move || {
                for work in receive_jobs {
                    match work {
                        Work::Seal(job) => {
                            if send_done.send(write(job)).is_err() {
                                break;
                            }
                        }
                        Work::Release(handles) => drop(handles),
                    }
                }
            })?;
        Ok(Sealer {
            jobs: Some(jobs),
            done,
            in_flight: Vec::new(),
            capacity,
            thread: Some(thread),
        })
    }

    /// Whether the segment is being sealed on the thread.
    pub fn busy_with(&self, segment: &Arc<SegmentShared>) -> bool {
        self.in_flight
            .iter()
            .any(|entry| Arc::ptr_eq(entry, segment))
    }

    /// How many more seals the thread takes now.
    pub fn room(&self) -> usize {
        self.capacity - self.in_flight.len()
    }

    /// Hands a seal to the thread (false: it is full or gone).
    pub fn submit(&mut self, job: Job) -> bool {
        if self.room() == 0 {
            return false;
        }
        let segment = job.segment.clone();
        let sent = self
            .jobs
            .as_ref()
            .is_some_and(|jobs| jobs.send(Work::Seal(job)).is_ok());
        if sent {
            self.in_flight.push(segment);
        }
        sent
    }

    /// Hands the thread handles to drop (dropped here if it is gone).
    pub fn release(&self, handles: Box<dyn Send>) {
        if let Some(jobs) = &self.jobs {
            let _ = jobs.send(Work::Release(handles));
        }
    }

    /// The seals the thread finished since the last call.
    pub fn finished(&mut self) -> Vec<Outcome> {
        let outcomes: Vec<Outcome> = self.done.try_iter().collect();
        for outcome in &outcomes {
            let segment = match outcome {
                Ok(built) => &built.segment,
                Err((segment, _)) => segment,
            };
            self.in_flight.retain(|entry| !Arc::ptr_eq(entry, segment));
        }
        outcomes
    }
}

impl Drop for Sealer {
    /// Waits for the seal in progress (its temporary file is removed at the next open).
    fn drop(&mut self) {
        self.jobs = None;
        // The thread may be blocked sending a result nobody reads: drain while joining.
        if let Some(thread) = self.thread.take() {
            while !thread.is_finished() {
                let _ = self.done.recv_timeout(std::time::Duration::from_millis(10));
            }
            let _ = thread.join();
        }
    }
}
