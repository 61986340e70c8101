//! Fleet-wide aggregates: one series name over every device (or the devices whose id starts
//! with a prefix), in time buckets, read in one pass over the store (docs/http-api.md,
//! "GET /v1/aggregate"). Sealed files are read through their series index, frame by frame, only
//! the frames of matching series; unsealed blocks are read once for all matching series. No
//! `Value` is built per point: the value column is read in place.
//!
//! Every point of every matching series in `[from, to)` counts, equal times included: the answer
//! is the aggregate of the union of what [`Reader::scan`](crate::Reader::scan) returns for each
//! matching device (the tests hold it to that).

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;

use crate::backend::Backend;
use crate::format::{ArchivedBlockRecords, ArchivedStoredValue, FRAME_HEADER_BYTES};
use crate::sealed::Sealed;
use crate::store::{lock, read_lock, read_segments, BlockMeta, SegmentShared, ShardShared};
use crate::StoreError;

/// Buckets one aggregate may span (held in memory, per thread, while the store is read: 40
/// bytes each, so at most 4 MB a thread).
pub const FLEET_BUCKETS_MAX: usize = 100_000;

/// Threads one aggregate reads the store on, at most.
pub const FLEET_THREADS_MAX: usize = 4;

/// A series id's state in a shard, one byte per id: matching, and what it contributed.
const WANTED: u8 = 1;
const HAS_POINT: u8 = 2;
const HAS_NUMBER: u8 = 4;

/// Largest bucket number (`floor(t / step)`) an aggregate works with: beyond it an `f64` no
/// longer holds every whole number, so bucket starts would not be exact.
const BUCKET_NUMBER_MAX: f64 = (1u64 << 52) as f64;

#[derive(Debug, thiserror::Error)]
pub enum FleetError {
    #[error("{buckets} buckets over the range, at most {}", FLEET_BUCKETS_MAX)]
    TooManyBuckets { buckets: u64 },
    #[error("the step is too small for times this far from the epoch")]
    StepTooSmall,
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// One non-empty bucket of an aggregate.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct FleetBucket {
    /// `floor(t / step) * step` of its points.
    pub start: f64,
    /// Points of any type.
    pub count: u64,
    /// Numeric points, and their sum, least and greatest value (f64::min/max: NaN ignored).
    pub numbers: u64,
    pub sum: f64,
    pub min: f64,
    pub max: f64,
}

/// What [`FleetScan::aggregate`] found.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct FleetAggregate {
    /// Non-empty buckets, ascending.
    pub buckets: Vec<FleetBucket>,
    /// Points aggregated, of any type / numeric.
    pub points: u64,
    pub numbers: u64,
    /// Devices with at least one point / one numeric point aggregated (a device with the series
    /// in several shards counts once).
    pub devices: u64,
    pub devices_with_numbers: u64,
}

/// The matching series of every shard, found by [`Reader::fleet`](crate::Reader::fleet).
pub struct FleetScan {
    pub(crate) backend: Arc<dyn Backend>,
    pub(crate) name: String,
    pub(crate) shards: Vec<FleetShard>,
    pub(crate) version: u64,
}

pub(crate) struct FleetShard {
    pub shard: Arc<ShardShared>,
    /// Indexed by series id: `WANTED` for the matching series, 0 for the others.
    pub wanted: Vec<u8>,
}

/// Series ids looked at per lock of a shard's summary while finding the matching series (a
/// commit of the shard waits for at most this many, not for the whole fleet).
const FIND_CHUNK_SERIES: usize = 8192;

/// Finds the matching series of a shard: `wanted` (indexed by id) and the sum of their change
/// counters. None when the shard has none. The summary is locked for [`FIND_CHUNK_SERIES`] ids
/// at a time: ids are never reused, so a chunk's ids are the same series in the next lock;
/// a series added meanwhile is not in the aggregate (its points were committed after it
/// started), and changes to a chunk already read only make the version older than the answer.
pub(crate) fn find_series(
    shard: &Arc<ShardShared>,
    name: &str,
    prefix: &str,
) -> Option<(FleetShard, u64)> {
    let known = lock(&shard.summary).series.len();
    let mut wanted = vec![0u8; known];
    let mut version = 0u64;
    let mut any = false;
    for first in (0..known).step_by(FIND_CHUNK_SERIES) {
        let summary = lock(&shard.summary);
        let end = (first + FIND_CHUNK_SERIES).min(known);
        for (id, series) in summary.series[first..end].iter().enumerate() {
            let Some(series) = series else { continue };
            if series.name != name {
                continue;
            }
            if !prefix.is_empty()
                && !summary
                    .device_states
                    .get(series.device as usize)
                    .is_some_and(|device| device.name.starts_with(prefix))
            {
                continue;
            }
            wanted[first + id] = WANTED;
            version = version.wrapping_add(series.changes);
            any = true;
        }
    }
    any.then(|| {
        (
            FleetShard {
                shard: shard.clone(),
                wanted,
            },
            version,
        )
    })
}

impl FleetScan {
    /// A number that grows whenever a commit adds to one of the matching series or retention
    /// drops from one (the sum of their change counters when the scan was made).
    pub fn version(&self) -> u64 {
        self.version
    }

    /// The aggregate of every point of the matching series in `[from, to)`, in buckets of
    /// `step` seconds (> 0), reading the store on up to `threads` threads (at most
    /// [`FLEET_THREADS_MAX`]). It sees the segments and blocks published when it starts.
    pub fn aggregate(
        &self,
        from: f64,
        to: f64,
        step: f64,
        threads: usize,
    ) -> Result<FleetAggregate, FleetError> {
        // The partitions that may hold points in the range, and the time they span.
        let mut items: Vec<(usize, Arc<SegmentShared>)> = Vec::new();
        let (mut low, mut high) = (f64::INFINITY, f64::NEG_INFINITY);
        for (index, shard) in self.shards.iter().enumerate() {
            for segment in read_segments(&shard.shard).iter() {
                let start = segment.window_start as f64;
                let end = start + segment.partition_secs as f64;
                if start < to && end > from && !segment.dropped.load(Ordering::Acquire) {
                    low = low.min(start);
                    high = high.max(end);
                    items.push((index, segment.clone()));
                }
            }
        }
        let (low, high) = (low.max(from), high.min(to));
        if items.is_empty() || low >= high {
            return Ok(FleetAggregate::default());
        }
        let first = bucket_number(low, step);
        let last = bucket_number(high.next_down(), step);
        if !(first.abs() <= BUCKET_NUMBER_MAX && last.abs() <= BUCKET_NUMBER_MAX) {
            return Err(FleetError::StepTooSmall);
        }
        let buckets = (last - first) as u64 + 1;
        if buckets > FLEET_BUCKETS_MAX as u64 {
            return Err(FleetError::TooManyBuckets { buckets });
        }
        let layout = Layout::new(from, to, step, first, buckets as usize);
        // Larger files first, so that threads finish together.
        items.sort_by_key(|(_, segment)| {
            std::cmp::Reverse(segment.published_len.load(Ordering::Relaxed))
        });
        let threads = threads.clamp(1, FLEET_THREADS_MAX).min(items.len());
        let next = AtomicUsize::new(0);
        let failed = AtomicBool::new(false);
        let work = || -> Result<Worker, StoreError> {
            let mut worker = Worker::new(self, &layout);
            loop {
                let index = next.fetch_add(1, Ordering::Relaxed);
                let Some((shard, segment)) = items.get(index) else {
                    break;
                };
                if failed.load(Ordering::Relaxed) {
                    break;
                }
                worker
                    .segment(&*self.backend, *shard, segment)
                    .inspect_err(|_| failed.store(true, Ordering::Relaxed))?;
            }
            Ok(worker)
        };
        let mut workers = if threads == 1 {
            vec![work()]
        } else {
            std::thread::scope(|scope| {
                let handles: Vec<_> = (0..threads).map(|_| scope.spawn(work)).collect();
                handles
                    .into_iter()
                    .map(|handle| {
                        handle
                            .join()
                            .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
                    })
                    .collect()
            })
        }
        .into_iter();
        let mut merged = workers.next().expect("at least one worker")?;
        for worker in workers {
            merged.merge(&worker?);
        }
        Ok(self.finish(merged))
    }

    /// The non-empty buckets and the totals, devices counted once over the shards.
    fn finish(&self, worker: Worker) -> FleetAggregate {
        let Worker {
            layout,
            buckets,
            seen,
            ..
        } = worker;
        let mut answer = FleetAggregate::default();
        for (index, bucket) in buckets.iter().enumerate() {
            if bucket.count == 0 {
                continue;
            }
            answer.points += bucket.count;
            answer.numbers += bucket.numbers;
            answer.buckets.push(FleetBucket {
                start: (layout.first + index as f64) * layout.step,
                count: bucket.count,
                numbers: bucket.numbers,
                sum: bucket.sum,
                min: bucket.min,
                max: bucket.max,
            });
        }
        for (k, shard) in self.shards.iter().enumerate() {
            let earlier_seen = seen[..k].iter().any(|ids| {
                ids.iter()
                    .any(|state| state & (HAS_POINT | HAS_NUMBER) != 0)
            });
            let mine: Vec<(u32, u8)> = seen[k]
                .iter()
                .enumerate()
                .filter_map(|(id, state)| {
                    let state = state & (HAS_POINT | HAS_NUMBER);
                    (state != 0).then_some((id as u32, state))
                })
                .collect();
            if !earlier_seen {
                for (_, state) in &mine {
                    answer.devices += u64::from(state & HAS_POINT != 0);
                    answer.devices_with_numbers += u64::from(state & HAS_NUMBER != 0);
                }
                continue;
            }
            // A device whose series is in several shards (another shard count before a
            // restart) counts in the first shard where it contributed: its bits in earlier
            // shards are taken off. Summaries are locked two at a time, the lower shard first,
            // for a bounded number of devices at a time.
            for chunk in mine.chunks(DEVICE_LOOKUPS_PER_LOCK) {
                let mut states: Vec<u8> = chunk.iter().map(|(_, state)| *state).collect();
                for (j, earlier) in self.shards[..k].iter().enumerate() {
                    let earlier_summary = lock(&earlier.shard.summary);
                    let summary = lock(&shard.shard.summary);
                    for ((id, _), state) in chunk.iter().zip(states.iter_mut()) {
                        let Some(device) = summary
                            .get(*id)
                            .and_then(|series| summary.device_states.get(series.device as usize))
                        else {
                            continue;
                        };
                        let Some((earlier_id, _)) = earlier_summary.find(&device.name, &self.name)
                        else {
                            continue;
                        };
                        let before = seen[j].get(earlier_id as usize).copied().unwrap_or(0);
                        *state &= !before;
                    }
                }
                for state in states {
                    answer.devices += u64::from(state & HAS_POINT != 0);
                    answer.devices_with_numbers += u64::from(state & HAS_NUMBER != 0);
                }
            }
        }
        answer
    }
}

/// Devices looked up in other shards' summaries per lock taken (a commit of either shard waits
/// for at most this many lookups).
const DEVICE_LOOKUPS_PER_LOCK: usize = 4096;

/// `floor(t / step)`: the bucket number of a point, as `/v1/series` computes it.
#[inline]
fn bucket_number(time: f64, step: f64) -> f64 {
    floor(time / step)
}

/// `f64::floor` without the library call it is on baseline x86-64 (no SSE4.1 `roundsd`): the
/// same result for every input, the sign of zero included.
#[inline]
fn floor(x: f64) -> f64 {
    // From 2^52 on (and for infinities and NaN) every f64 is already whole.
    if x.is_nan() || x.abs() >= BUCKET_NUMBER_MAX {
        return x;
    }
    let truncated = x as i64 as f64;
    if truncated == x {
        x
    } else if truncated > x {
        truncated - 1.0
    } else {
        truncated
    }
}

/// The buckets of one aggregate: `buckets` numbers from `first`.
struct Layout {
    from: f64,
    to: f64,
    step: f64,
    first: f64,
    buckets: usize,
    /// `buckets + 1` edges: `edges[k]` is the least time whose bucket number is at least
    /// `first + k` (NaN where the search gave up: that edge is never used), so bucket `k` is
    /// `[edges[k], edges[k + 1])`.
    edges: Vec<f64>,
}

impl Layout {
    fn new(from: f64, to: f64, step: f64, first: f64, buckets: usize) -> Layout {
        let edges = (0..=buckets)
            .map(|k| edge(first + k as f64, step))
            .collect();
        Layout {
            from,
            to,
            step,
            first,
            buckets,
            edges,
        }
    }
}

/// How far (in representable steps) the least time of a bucket is looked for from
/// `number * step`, which is a few rounding errors from it.
const BUCKET_EDGE_NUDGES: usize = 64;

/// The least time whose bucket number (`floor(t / step)`) is at least `number`; NaN if not
/// found within [`BUCKET_EDGE_NUDGES`] steps. Division by a positive number is monotonic in
/// IEEE arithmetic, so the times of bucket numbers at least `number` are every time from one on.
fn edge(number: f64, step: f64) -> f64 {
    let mut time = number * step;
    if bucket_number(time, step) >= number {
        for _ in 0..BUCKET_EDGE_NUDGES {
            let below = time.next_down();
            if bucket_number(below, step) < number {
                return time;
            }
            time = below;
        }
    } else {
        for _ in 0..BUCKET_EDGE_NUDGES {
            time = time.next_up();
            if bucket_number(time, step) >= number {
                return time;
            }
        }
    }
    f64::NAN
}

/// Running aggregate of one bucket.
#[derive(Clone, Copy)]
struct Acc {
    count: u64,
    numbers: u64,
    sum: f64,
    min: f64,
    max: f64,
}

impl Acc {
    const EMPTY: Acc = Acc {
        count: 0,
        numbers: 0,
        sum: 0.0,
        min: f64::INFINITY,
        max: f64::NEG_INFINITY,
    };

    fn merge(&mut self, other: &Acc) {
        self.count += other.count;
        self.numbers += other.numbers;
        self.sum += other.sum;
        self.min = self.min.min(other.min);
        self.max = self.max.max(other.max);
    }

    /// Adds one value (16 bytes of the value column); false for a tag that is no value.
    /// A NaN is counted and summed but is never the least or greatest (as `f64::min` and
    /// `f64::max`, which `/v1/series` uses, ignore it).
    #[inline(always)]
    fn add(&mut self, value: &[u8; VALUE_BYTES]) -> bool {
        self.count += 1;
        if value[0] == NUMBER_TAG {
            let number = f64::from_le_bytes(value[8..16].try_into().expect("8 bytes"));
            self.numbers += 1;
            self.sum += number;
            if number < self.min {
                self.min = number;
            }
            if number > self.max {
                self.max = number;
            }
        }
        value[0] <= DATA_TAG
    }

    /// Adds every value of a column; false if one has a tag that is no value.
    fn add_all(&mut self, values: &[u8]) -> bool {
        if let Some(numbers) = numbers_only(values) {
            return numbers.into(self);
        }
        let mut lanes = Lanes::new();
        let mut quads = values.chunks_exact(LANES * VALUE_BYTES);
        for quad in &mut quads {
            for lane in 0..LANES {
                let value = &quad[lane * VALUE_BYTES..(lane + 1) * VALUE_BYTES];
                lanes.add(lane, value.try_into().expect("16 bytes"));
            }
        }
        for value in quads.remainder().chunks_exact(VALUE_BYTES) {
            lanes.add(0, value.try_into().expect("16 bytes"));
        }
        lanes.into(self)
    }
}

/// The lanes of a column of values that are all numbers (None: one is not, and the caller
/// takes the general path). Every number is read as if it were one and the tags are checked once
/// at the end, so the loop has no branch and no select: runs of a series are nearly always all
/// numbers, and this is the loop a full scan spends its time in.
#[inline(always)]
fn numbers_only(values: &[u8]) -> Option<Lanes> {
    let mut lanes = Lanes::new();
    let mut tags = 0u8;
    let mut add = |lane: usize, value: &[u8]| {
        tags |= value[0];
        let number = f64::from_le_bytes(value[8..16].try_into().expect("8 bytes"));
        lanes.sum[lane] += number;
        // NaN compares false: never the least or greatest.
        lanes.min[lane] = if number < lanes.min[lane] {
            number
        } else {
            lanes.min[lane]
        };
        lanes.max[lane] = if number > lanes.max[lane] {
            number
        } else {
            lanes.max[lane]
        };
    };
    let mut quads = values.chunks_exact(LANES * VALUE_BYTES);
    for quad in &mut quads {
        for lane in 0..LANES {
            add(lane, &quad[lane * VALUE_BYTES..(lane + 1) * VALUE_BYTES]);
        }
    }
    for value in quads.remainder().chunks_exact(VALUE_BYTES) {
        add(0, value);
    }
    lanes.count = (values.len() / VALUE_BYTES) as u64;
    lanes.numbers = lanes.count;
    (tags == NUMBER_TAG).then_some(lanes)
}

/// Accumulators of a run of values that all go to one bucket, in [`LANES`] independent lanes
/// (value `i` in lane `i % LANES`): the additions and comparisons of one lane do not wait for
/// those of the others, so a core does several at once.
const LANES: usize = 4;

struct Lanes {
    count: u64,
    numbers: u64,
    sum: [f64; LANES],
    min: [f64; LANES],
    max: [f64; LANES],
    valid: bool,
}

impl Lanes {
    fn new() -> Lanes {
        Lanes {
            count: 0,
            numbers: 0,
            sum: [0.0; LANES],
            min: [f64::INFINITY; LANES],
            max: [f64::NEG_INFINITY; LANES],
            valid: true,
        }
    }

    /// As [`Acc::add`], in lane `lane`, without a branch: a value that is not a number adds
    /// 0 to the sum and infinities to the comparisons. Returns the value's tag.
    #[inline(always)]
    fn add(&mut self, lane: usize, value: &[u8; VALUE_BYTES]) -> u8 {
        let tag = value[0];
        let number = f64::from_le_bytes(value[8..16].try_into().expect("8 bytes"));
        let is_number = tag == NUMBER_TAG;
        self.count += 1;
        self.numbers += u64::from(is_number);
        self.valid &= tag <= DATA_TAG;
        self.sum[lane] += if is_number { number } else { 0.0 };
        let low = if is_number { number } else { f64::INFINITY };
        let high = if is_number { number } else { f64::NEG_INFINITY };
        // NaN compares false: never the least or greatest.
        self.min[lane] = if low < self.min[lane] {
            low
        } else {
            self.min[lane]
        };
        self.max[lane] = if high > self.max[lane] {
            high
        } else {
            self.max[lane]
        };
        tag
    }

    /// Adds the lanes to `acc`; false if a value had a tag that is no value.
    fn into(self, acc: &mut Acc) -> bool {
        let sum = (self.sum[0] + self.sum[1]) + (self.sum[2] + self.sum[3]);
        acc.merge(&Acc {
            count: self.count,
            numbers: self.numbers,
            sum,
            min: self.min.iter().copied().fold(f64::INFINITY, f64::min),
            max: self.max.iter().copied().fold(f64::NEG_INFINITY, f64::max),
        });
        self.valid
    }
}

/// Which bucket a time falls in: the exact `floor(t / step)` (a division) only when the time
/// leaves the bucket of the last one, whose edges are known (a NaN edge is never inside).
struct Bucketer<'a> {
    step: f64,
    first: f64,
    edges: &'a [f64],
    /// Times in `[low, high)` fall in bucket `index` (NaN: none known yet).
    low: f64,
    high: f64,
    index: usize,
}

impl<'a> Bucketer<'a> {
    fn new(layout: &'a Layout) -> Bucketer<'a> {
        Bucketer {
            step: layout.step,
            first: layout.first,
            edges: &layout.edges,
            low: f64::NAN,
            high: f64::NAN,
            index: 0,
        }
    }

    /// The bucket index of `time` (None: outside the layout, which a point within its
    /// partition's window never is).
    #[inline(always)]
    fn index(&mut self, time: f64) -> Option<usize> {
        if time >= self.low && time < self.high {
            return Some(self.index);
        }
        // The next bucket, where a run of ascending times goes on.
        if time >= self.high {
            if let Some(&high) = self.edges.get(self.index + 2) {
                if time < high {
                    self.index += 1;
                    self.low = self.high;
                    self.high = high;
                    return Some(self.index);
                }
            }
        }
        self.locate(time)
    }

    #[cold]
    fn locate(&mut self, time: f64) -> Option<usize> {
        let offset = bucket_number(time, self.step) - self.first;
        if !(offset >= 0.0 && offset < (self.edges.len() - 1) as f64) {
            return None;
        }
        let index = offset as usize;
        self.low = self.edges[index];
        self.high = self.edges[index + 1];
        self.index = index;
        Some(index)
    }
}

/// One thread's share: buckets and, per shard, what each series contributed.
struct Worker<'a> {
    layout: &'a Layout,
    buckets: Vec<Acc>,
    /// Per shard, per series id: `WANTED` plus `HAS_POINT`/`HAS_NUMBER` once it contributed.
    seen: Vec<Vec<u8>>,
    bucketer: Bucketer<'a>,
}

impl<'a> Worker<'a> {
    fn new(scan: &FleetScan, layout: &'a Layout) -> Worker<'a> {
        Worker {
            layout,
            buckets: vec![Acc::EMPTY; layout.buckets],
            seen: scan
                .shards
                .iter()
                .map(|shard| shard.wanted.clone())
                .collect(),
            bucketer: Bucketer::new(layout),
        }
    }

    fn merge(&mut self, other: &Worker) {
        for (mine, theirs) in self.buckets.iter_mut().zip(&other.buckets) {
            mine.merge(theirs);
        }
        for (mine, theirs) in self.seen.iter_mut().zip(&other.seen) {
            for (state, other) in mine.iter_mut().zip(theirs) {
                *state |= other;
            }
        }
    }

    /// Reads one segment (or the sealed file that replaced it).
    fn segment(
        &mut self,
        backend: &dyn Backend,
        shard: usize,
        source: &Arc<SegmentShared>,
    ) -> Result<(), StoreError> {
        let mut segment = source.clone();
        // At most two rounds: a segment sealed while the aggregate runs has one successor,
        // which is sealed and has none.
        for _ in 0..2 {
            if let Some(next) = segment.successor.get() {
                segment = next.clone();
            }
            match segment.sealed.get() {
                Some(sealed) => {
                    // A sealed file's block list never changes: read under the read lock.
                    let blocks = read_lock(&segment.blocks);
                    let Some(map) = map_blocks(backend, &segment, &blocks)? else {
                        return Ok(());
                    };
                    return self.sealed(&segment, sealed, &blocks, &map, shard);
                }
                None => {
                    // A copy: the writer publishes into an unsealed segment's list meanwhile.
                    let blocks: Vec<BlockMeta> = read_lock(&segment.blocks)
                        .iter()
                        .filter(|block| {
                            block.min_time < self.layout.to && block.max_time >= self.layout.from
                        })
                        .copied()
                        .collect();
                    match map_blocks(backend, &segment, &blocks) {
                        Ok(Some(map)) => return self.unsealed(&segment, &blocks, &map, shard),
                        Ok(None) => return Ok(()),
                        // Sealed meanwhile, and the segment file removed: read the sealed file.
                        Err(_) if segment.successor.get().is_some() => continue,
                        Err(error) => return Err(error),
                    }
                }
            }
        }
        Ok(())
    }

    /// The frames of the matching series of a sealed file.
    fn sealed(
        &mut self,
        segment: &SegmentShared,
        sealed: &Sealed,
        blocks: &[BlockMeta],
        map: &[u8],
        shard: usize,
    ) -> Result<(), StoreError> {
        let (from, to) = (self.layout.from, self.layout.to);
        let seen = &mut self.seen[shard];
        // The frames to read, in file order: series id and frame.
        let mut frames: Vec<(u32, &BlockMeta)> = Vec::new();
        for entry in &sealed.series {
            if seen
                .get(entry.id as usize)
                .is_none_or(|state| state & WANTED == 0)
            {
                continue;
            }
            let first = (entry.first as usize).min(blocks.len());
            let end = (first + entry.frames as usize).min(blocks.len());
            frames.extend(
                blocks[first..end]
                    .iter()
                    .filter(|block| block.min_time < to && block.max_time >= from)
                    .map(|block| (entry.id, block)),
            );
        }
        for (index, (id, block)) in frames.iter().enumerate() {
            // A frame is a few dozen records: without asking for the frames ahead, each
            // one's first access waits for memory.
            if let Some((_, ahead)) = frames.get(index + PREFETCH_FRAMES_AHEAD) {
                prefetch(map, ahead);
            }
            let columns =
                Columns::of(map, block).map_err(|reason| corrupt(segment, block, reason))?;
            let added = add_run(
                &mut self.buckets,
                &mut self.bucketer,
                self.layout,
                block,
                columns.times,
                columns.values,
            )
            .ok_or_else(|| corrupt(segment, block, "a value has an unknown tag".to_string()))?;
            seen[*id as usize] |= added;
        }
        Ok(())
    }

    /// Every block of an unsealed segment, once, for all matching series.
    fn unsealed(
        &mut self,
        segment: &SegmentShared,
        blocks: &[BlockMeta],
        map: &[u8],
        shard: usize,
    ) -> Result<(), StoreError> {
        let (from, to) = (self.layout.from, self.layout.to);
        let seen = &mut self.seen[shard];
        for block in blocks {
            let columns =
                Columns::of(map, block).map_err(|reason| corrupt(segment, block, reason))?;
            let whole = block.min_time >= from && block.max_time < to;
            // One bucket for the whole block: the times need not be read.
            let single = whole
                && self.bucketer.index(block.min_time).is_some()
                && self.bucketer.index(block.max_time) == self.bucketer.index(block.min_time);
            let mut valid = true;
            if single {
                let index = self.bucketer.index(block.min_time).expect("checked");
                valid &= add_wanted(
                    &mut self.buckets[index],
                    seen,
                    columns.series,
                    columns.values,
                );
            } else {
                let mut acc = Acc::EMPTY;
                let mut open: Option<usize> = None;
                for ((series, time), value) in columns
                    .series
                    .chunks_exact(4)
                    .zip(columns.times.chunks_exact(8))
                    .zip(columns.values.chunks_exact(VALUE_BYTES))
                {
                    let id = u32::from_le_bytes(series.try_into().expect("4 bytes")) as usize;
                    let Some(state) = seen.get_mut(id) else {
                        continue;
                    };
                    if *state & WANTED == 0 {
                        continue;
                    }
                    let time = f64::from_le_bytes(time.try_into().expect("8 bytes"));
                    if !(time >= from && time < to) {
                        continue;
                    }
                    let Some(index) = self.bucketer.index(time) else {
                        continue;
                    };
                    if open != Some(index) {
                        if let Some(open) = open {
                            self.buckets[open].merge(&acc);
                        }
                        acc = Acc::EMPTY;
                        open = Some(index);
                    }
                    let value: &[u8; VALUE_BYTES] = value.try_into().expect("16 bytes");
                    valid &= acc.add(value);
                    *state |= HAS_POINT
                        | if value[0] == NUMBER_TAG {
                            HAS_NUMBER
                        } else {
                            0
                        };
                }
                if let Some(open) = open {
                    self.buckets[open].merge(&acc);
                }
            }
            if !valid {
                return Err(corrupt(
                    segment,
                    block,
                    "a value has an unknown tag".to_string(),
                ));
            }
        }
        Ok(())
    }
}

/// Adds the values of the wanted series of an unsealed block (its series and value columns),
/// which all fall in one bucket, to `acc`, and marks what each series contributed in `seen`;
/// false for a value with an unknown tag. A function of its own: inlined into the reading
/// loop, its accumulators did not all stay in registers (a fifth slower).
#[inline(never)]
fn add_wanted(acc: &mut Acc, seen: &mut [u8], series: &[u8], values: &[u8]) -> bool {
    let mut lanes = Lanes::new();
    let mut add = |lane: usize, series: &[u8], value: &[u8]| {
        let id = u32::from_le_bytes(series.try_into().expect("4 bytes")) as usize;
        let Some(state) = seen.get_mut(id) else {
            return;
        };
        if *state & WANTED != 0 {
            let tag = lanes.add(lane, value.try_into().expect("16 bytes"));
            *state |= HAS_POINT | if tag == NUMBER_TAG { HAS_NUMBER } else { 0 };
        }
    };
    let mut series = series.chunks_exact(LANES * 4);
    let mut values = values.chunks_exact(LANES * VALUE_BYTES);
    for (ids, quad) in (&mut series).zip(&mut values) {
        for lane in 0..LANES {
            add(
                lane,
                &ids[lane * 4..(lane + 1) * 4],
                &quad[lane * VALUE_BYTES..(lane + 1) * VALUE_BYTES],
            );
        }
    }
    for (id, value) in series
        .remainder()
        .chunks_exact(4)
        .zip(values.remainder().chunks_exact(VALUE_BYTES))
    {
        add(0, id, value);
    }
    lanes.into(acc)
}

/// How many frames ahead of the one it reads the aggregate asks the CPU to fetch.
const PREFETCH_FRAMES_AHEAD: usize = 8;

/// Asks the CPU to bring a frame's payload into its caches (a hint: nothing is read).
#[inline(always)]
fn prefetch(map: &[u8], block: &BlockMeta) {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T0};
        // The value column and the root: an archive ends with them (a column's strings and
        // bytes come before its entries, the root last), and the times are read only when a
        // frame spans buckets.
        let tail =
            (block.count as usize * VALUE_BYTES + ROOT_BYTES + 8).min(block.payload_len as usize);
        let end = ((block.payload_offset + block.payload_len as u64) as usize).min(map.len());
        let start = end.saturating_sub(tail);
        for offset in (start..end).step_by(64) {
            // SAFETY: a prefetch is a hint that never faults and changes nothing observable;
            // the address is inside the map anyway; SSE is part of every x86_64 target.
            unsafe { _mm_prefetch::<_MM_HINT_T0>(map.as_ptr().add(offset) as *const i8) };
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = (map, block);
}

/// Adds the points of one series' frame (times and values columns) in `[from, to)` to their
/// buckets; returns what the series contributed (`HAS_POINT`, `HAS_NUMBER`), None for a value
/// with an unknown tag.
#[inline(never)]
fn add_run(
    buckets: &mut [Acc],
    bucketer: &mut Bucketer<'_>,
    layout: &Layout,
    block: &BlockMeta,
    times: &[u8],
    values: &[u8],
) -> Option<u8> {
    let (from, to) = (layout.from, layout.to);
    let whole = block.min_time >= from && block.max_time < to;
    let mut contributed = 0;
    let mut close = |bucket: &mut Acc, acc: &Acc| {
        bucket.merge(acc);
        contributed |= if acc.count > 0 { HAS_POINT } else { 0 }
            | if acc.numbers > 0 { HAS_NUMBER } else { 0 };
    };
    let low = bucketer.index(block.min_time);
    if let Some(index) = low.filter(|_| whole && bucketer.index(block.max_time) == low) {
        // One bucket for the whole frame: the times need not be read.
        let mut acc = Acc::EMPTY;
        let valid = acc.add_all(values);
        close(&mut buckets[index], &acc);
        return valid.then_some(contributed);
    }
    // A frame's times ascend: its points fall in runs of one bucket, each added as a column.
    // A run ends at the first time outside the bucket's known range or `[from, to)`, so times in
    // any order (which a valid frame never has) still land in their own buckets.
    let time = |i: usize| f64::from_le_bytes(times[i * 8..i * 8 + 8].try_into().expect("8 bytes"));
    let count = (times.len() / 8).min(values.len() / VALUE_BYTES);
    let mut valid = true;
    let mut i = 0;
    while i < count {
        let first = time(i);
        let index = (first >= from && first < to)
            .then(|| bucketer.index(first))
            .flatten();
        let Some(index) = index else {
            i += 1;
            continue;
        };
        // An edge the search gave up on (NaN) ends the run at its first point.
        let low = if bucketer.low.is_nan() {
            f64::INFINITY
        } else {
            bucketer.low.max(from)
        };
        let high = bucketer.high;
        let mut end = i + 1;
        while end < count {
            let next = time(end);
            if !(next >= low && next < high && next < to) {
                break;
            }
            end += 1;
        }
        let mut acc = Acc::EMPTY;
        valid &= acc.add_all(&values[i * VALUE_BYTES..end * VALUE_BYTES]);
        close(&mut buckets[index], &acc);
        i = end;
    }
    valid.then_some(contributed)
}

fn corrupt(segment: &SegmentShared, block: &BlockMeta, reason: String) -> StoreError {
    StoreError::Corrupt {
        path: segment.path.clone(),
        offset: block.payload_offset - FRAME_HEADER_BYTES as u64,
        reason,
    }
}

/// A map of `segment` covering `blocks` (None: no blocks, or retention dropped the segment
/// since the aggregate started).
fn map_blocks(
    backend: &dyn Backend,
    segment: &SegmentShared,
    blocks: &[BlockMeta],
) -> Result<Option<Arc<crate::backend::FileBytes>>, StoreError> {
    let Some(needed) = blocks
        .iter()
        .map(|block| block.payload_offset + block.payload_len as u64)
        .max()
    else {
        return Ok(None);
    };
    match segment.map(backend, needed) {
        Ok(map) => Ok(Some(map)),
        Err(_) if segment.dropped.load(Ordering::Acquire) => Ok(None),
        Err(error) => Err(error),
    }
}

// ---------------------------------------------------------------------------------------------
// The columns of a block payload, located in place.
//
// A block payload is an rkyv archive of `BlockRecords` (docs/storage-format.md, "Block
// payload"): its root, at the end, is three (relative offset i32, length u32) pairs for the
// `series` (u32), `times` (f64) and `values` (`ArchivedStoredValue`, 16 bytes: a tag byte, and
// for a number the f64 at byte 8) columns. The aggregate reads the columns as bytes, checking
// the bounds and lengths it relies on and every value's tag, instead of rkyv's whole validation
// per block: a sealed series frame holds about 45 records, and validating it costs more than
// aggregating it. It never reads string or data bytes, so it does not check them. The layout is
// pinned by the assertions below and by a test against rkyv's own access.

const ROOT_BYTES: usize = 24;
const VALUE_BYTES: usize = 16;
const NUMBER_TAG: u8 = 0;
/// The last variant's tag (`Number`, `Bool`, `String`, `Data`: 0 to 3).
const DATA_TAG: u8 = 3;

const _: () = assert!(std::mem::size_of::<ArchivedBlockRecords>() == ROOT_BYTES);
const _: () = assert!(std::mem::size_of::<ArchivedStoredValue>() == VALUE_BYTES);
const _: () = assert!(std::mem::align_of::<ArchivedStoredValue>() == 8);

struct Columns<'a> {
    series: &'a [u8],
    times: &'a [u8],
    values: &'a [u8],
}

impl<'a> Columns<'a> {
    /// The columns of `block` in `map`, each of `block.count` entries.
    #[inline]
    fn of(map: &'a [u8], block: &BlockMeta) -> Result<Columns<'a>, String> {
        let start = block.payload_offset as usize;
        let payload = start
            .checked_add(block.payload_len as usize)
            .and_then(|end| map.get(start..end))
            .ok_or_else(|| "block lies beyond its file's end".to_string())?;
        Columns::parse(payload, block.count as usize)
    }

    #[inline]
    fn parse(payload: &'a [u8], count: usize) -> Result<Columns<'a>, String> {
        let Some(root) = payload.len().checked_sub(ROOT_BYTES) else {
            return Err("block payload is shorter than its root".to_string());
        };
        let (series, times, values) = (
            column(payload, root, 0, 4, count),
            column(payload, root, 1, 8, count),
            column(payload, root, 2, VALUE_BYTES, count),
        );
        match (series, times, values) {
            (Some(series), Some(times), Some(values)) => Ok(Columns {
                series,
                times,
                values,
            }),
            _ => Err(format!(
                "a block column does not hold the {count} entries its header says, inside its payload"
            )),
        }
    }
}

/// Column `field` of a block payload whose root is at `root`: `count` entries of `width` bytes
/// (None: another length, or not inside the payload before the root).
#[inline(always)]
fn column(payload: &[u8], root: usize, field: usize, width: usize, count: usize) -> Option<&[u8]> {
    let at = root + field * 8;
    let pair: &[u8; 8] = payload[at..at + 8].try_into().expect("8 bytes");
    let offset = i32::from_le_bytes([pair[0], pair[1], pair[2], pair[3]]);
    let len = u32::from_le_bytes([pair[4], pair[5], pair[6], pair[7]]);
    if len as usize != count {
        return None;
    }
    if count == 0 {
        return Some(&[]);
    }
    let begin = at as i64 + offset as i64;
    let end = begin + (count * width) as i64;
    if begin < 0 || end > root as i64 {
        return None;
    }
    Some(&payload[begin as usize..end as usize])
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::format::{access_block, encode_block, BlockRecords, StoredValue};

    #[test]
    fn columns_read_in_place_agree_with_rkyv() {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(5);
        for round in 0..200 {
            let count = if round == 0 {
                0
            } else {
                rng.random_range(1..300)
            };
            let mut block = BlockRecords::default();
            for _ in 0..count {
                block.series.push(rng.random_range(0..1000));
                block.times.push(rng.random_range(-1e9..1e9));
                block.values.push(match rng.random_range(0..4) {
                    0 => StoredValue::Number(rng.random_range(-1e6..1e6)),
                    1 => StoredValue::Bool(rng.random()),
                    2 => StoredValue::String("x".repeat(rng.random_range(0..20))),
                    _ => StoredValue::Data(vec![7; rng.random_range(0..20)]),
                });
            }
            let bytes = encode_block(&block).unwrap();
            let archived = access_block(&bytes).unwrap();
            let columns = Columns::parse(&bytes, count).unwrap();
            for (i, value) in archived.values.iter().enumerate() {
                let series =
                    u32::from_le_bytes(columns.series[i * 4..i * 4 + 4].try_into().unwrap());
                assert_eq!(series, archived.series[i].to_native());
                let time = f64::from_le_bytes(columns.times[i * 8..i * 8 + 8].try_into().unwrap());
                assert_eq!(time, archived.times[i].to_native());
                let raw: &[u8; 16] = columns.values[i * 16..i * 16 + 16].try_into().unwrap();
                let tag = match value {
                    ArchivedStoredValue::Number(number) => {
                        assert_eq!(
                            f64::from_le_bytes(raw[8..16].try_into().unwrap()),
                            number.to_native()
                        );
                        0
                    }
                    ArchivedStoredValue::Bool(_) => 1,
                    ArchivedStoredValue::String(_) => 2,
                    ArchivedStoredValue::Data(_) => 3,
                };
                assert_eq!(raw[0], tag);
            }
            assert!(Columns::parse(&bytes, count + 1).is_err());
        }
        assert!(Columns::parse(&[0u8; 10], 0).is_err());
    }

    #[test]
    fn bad_roots_are_errors_not_panics() {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(6);
        let block = BlockRecords {
            series: vec![1, 2, 3],
            times: vec![1.0, 2.0, 3.0],
            values: vec![
                StoredValue::Number(1.0),
                StoredValue::Bool(true),
                StoredValue::Number(2.0),
            ],
        };
        let bytes = encode_block(&block).unwrap();
        for _ in 0..2000 {
            let mut mutated = bytes.to_vec();
            let at = rng.random_range(0..mutated.len());
            mutated[at] = rng.random();
            let _ = Columns::parse(&mutated, 3);
        }
    }

    /// A column of 16-byte values: (tag, number).
    fn column_of(values: &[(u8, f64)]) -> Vec<u8> {
        values
            .iter()
            .flat_map(|(tag, number)| {
                let mut value = [0u8; VALUE_BYTES];
                value[0] = *tag;
                value[8..].copy_from_slice(&number.to_le_bytes());
                value
            })
            .collect()
    }

    #[test]
    fn the_numbers_only_path_agrees_with_adding_one_by_one() {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(9);
        let special = [f64::NAN, f64::INFINITY, f64::NEG_INFINITY, -0.0, 1e300];
        for len in 0..40 {
            let mut values: Vec<(u8, f64)> = (0..len)
                .map(|_| match rng.random_range(0..8) {
                    0 => (NUMBER_TAG, special[rng.random_range(0..special.len())]),
                    _ => (NUMBER_TAG, rng.random_range(-100..100) as f64),
                })
                .collect();
            let mut one_by_one = Acc::EMPTY;
            for value in column_of(&values).chunks_exact(VALUE_BYTES) {
                assert!(one_by_one.add(value.try_into().unwrap()));
            }
            let mut all = Acc::EMPTY;
            assert!(numbers_only(&column_of(&values))
                .expect("numbers only")
                .into(&mut all));
            assert_eq!(all.count, one_by_one.count);
            assert_eq!(all.numbers, one_by_one.numbers);
            // Equal as numbers: of a zero's two signs, which one a least or greatest zero
            // keeps depends on the order values are looked at, here as in the lanes of the
            // general path.
            assert_eq!(all.min, one_by_one.min, "{values:?}");
            assert_eq!(all.max, one_by_one.max, "{values:?}");
            assert!(
                all.sum == one_by_one.sum || (all.sum.is_nan() && one_by_one.sum.is_nan()),
                "{values:?}"
            );
            // One value that is not a number sends the column to the general path.
            if len > 0 {
                let at = rng.random_range(0..len);
                values[at].0 = rng.random_range(1..=DATA_TAG + 1);
                assert!(numbers_only(&column_of(&values)).is_none());
                let mut acc = Acc::EMPTY;
                assert_eq!(acc.add_all(&column_of(&values)), values[at].0 <= DATA_TAG);
                assert_eq!(acc.count, len as u64);
                assert_eq!(acc.numbers, len as u64 - 1);
            }
        }
    }

    #[test]
    fn floor_is_f64_floor() {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(8);
        let special = [
            0.0,
            -0.0,
            0.5,
            -0.5,
            -1.0,
            1.0 - f64::EPSILON,
            -(1.0 - f64::EPSILON),
            4503599627370495.5,
            -4503599627370495.5,
            4503599627370496.0,
            1e300,
            -1e300,
            f64::INFINITY,
            f64::NEG_INFINITY,
            f64::MIN_POSITIVE,
            -f64::MIN_POSITIVE,
        ];
        let wide: Vec<f64> = (0..100_000)
            .map(|_| rng.random_range(-1e16..1e16))
            .collect();
        let near: Vec<f64> = (0..100_000)
            .map(|_| rng.random_range(-10.0..10.0))
            .collect();
        for x in special.into_iter().chain(wide).chain(near) {
            assert_eq!(floor(x).to_bits(), x.floor().to_bits(), "{x}");
        }
        assert!(floor(f64::NAN).is_nan());
    }

    #[test]
    fn buckets_are_those_of_floor_t_over_step() {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        for _ in 0..200 {
            let step = match rng.random_range(0..4) {
                0 => rng.random_range(0.001..10.0),
                1 => [0.1, 0.3, 1.0, 60.0, 300.0, 3600.0][rng.random_range(0..6)],
                2 => rng.random_range(1.0..100_000.0),
                _ => 7.0 / 3.0,
            };
            let low = rng.random_range(-2e9..2e9);
            let layout = Layout::new(
                f64::NEG_INFINITY,
                f64::INFINITY,
                step,
                bucket_number(low, step),
                1000,
            );
            for (k, edge) in layout.edges.iter().enumerate() {
                let number = layout.first + k as f64;
                assert!(bucket_number(*edge, step) >= number, "{edge} / {step}");
                assert!(
                    bucket_number(edge.next_down(), step) < number,
                    "{edge} / {step}"
                );
            }
            let mut bucketer = Bucketer::new(&layout);
            let mut time = low;
            for _ in 0..500 {
                // Steps of every size, edges included.
                time = match rng.random_range(0..4) {
                    0 => time.next_up(),
                    1 => ((bucket_number(time, step) + 1.0) * step).next_down(),
                    2 => (bucket_number(time, step) + 1.0) * step,
                    _ => time + rng.random_range(0.0..step),
                };
                let number = bucket_number(time, step);
                let expected = (number - layout.first) as usize;
                if number - layout.first >= 1000.0 {
                    assert_eq!(bucketer.index(time), None);
                    break;
                }
                assert_eq!(bucketer.index(time), Some(expected), "{time} / {step}");
                // And back by the smallest step, which may cross an edge.
                let back = time.next_down();
                let offset = bucket_number(back, step) - layout.first;
                let expected = (offset >= 0.0).then_some(offset as usize);
                assert_eq!(bucketer.index(back), expected, "{back} / {step}");
            }
        }
    }
}
