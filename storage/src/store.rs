//! The data directory: lock, recovery, the shared catalog and summary, and readers.

use std::collections::{BTreeMap, HashSet};
use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::ops::ControlFlow;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, RwLock};

use crate::backend::{self, Backend, FileBytes, Fs};

use crate::fleet::{self, FleetScan};
use crate::format::{self, ArchivedStoredValue, FileHeader, FileKind, Scan, FILE_HEADER_BYTES};
use crate::sealed::Sealed;
use crate::writer::{self, ShardWriter};
use crate::{Durability, ExchangeRecord, RecoveryReport, StoreConfig, StoreError, Value};

pub(crate) type HashMap<K, V> = std::collections::HashMap<K, V, ahash::RandomState>;

pub(crate) const LOCK_FILE: &str = "LOCK";
pub(crate) const DICTIONARY_FILE: &str = "dictionary.log";
/// Prefix of a partition directory retention is removing.
pub(crate) const DROPPED_PREFIX: &str = "dropped-";

/// Exchanges recovered per shard at most (the newest): the protocol's dedup table holds at most
/// this many per shard (`EndpointConfig::dedup_entries_max`), so more could not be used.
pub const RECOVERED_EXCHANGES_MAX: usize = 262_144;

pub(crate) fn shard_dir(dir: &Path, shard: u32) -> PathBuf {
    dir.join(format!("shard-{shard}"))
}

pub(crate) fn segment_path(shard_dir: &Path, window_start: i64, seq: u64) -> PathBuf {
    shard_dir
        .join(window_start.to_string())
        .join(format!("segment-{seq}.seg"))
}

/// The version 2 seal index of a segment (`segment-<seq>.seal` next to it; removed at open).
pub(crate) fn seal_path(segment: &Path) -> PathBuf {
    segment.with_extension("seal")
}

/// The sealed file replacing a segment (`segment-<seq>.sealed` next to it).
pub(crate) fn sealed_path(segment: &Path) -> PathBuf {
    segment.with_extension("sealed")
}

/// Where a sealed file is written before the rename that makes it the seal.
pub(crate) fn sealed_tmp_path(segment: &Path) -> PathBuf {
    segment.with_extension("sealed.tmp")
}

/// Locks a mutex, recovering the data if a thread panicked while holding it (the summary and
/// catalog are only changed by complete, non-panicking updates).
pub(crate) fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

pub(crate) fn read_lock<T>(lock: &RwLock<T>) -> std::sync::RwLockReadGuard<'_, T> {
    lock.read().unwrap_or_else(|poisoned| poisoned.into_inner())
}

pub(crate) fn write_lock<T>(lock: &RwLock<T>) -> std::sync::RwLockWriteGuard<'_, T> {
    lock.write()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// One published block of a segment (the reader's index).
#[derive(Clone, Copy, Debug)]
pub(crate) struct BlockMeta {
    pub payload_offset: u64,
    pub payload_len: u32,
    pub count: u32,
    pub min_time: f64,
    pub max_time: f64,
}

/// A segment as the catalog knows it, shared by the writer and readers.
pub(crate) struct SegmentShared {
    pub path: PathBuf,
    pub window_start: i64,
    pub partition_secs: u64,
    pub seq: u64,
    /// Bytes of the file readers may look at (end of the last published frame).
    pub published_len: AtomicU64,
    pub blocks: RwLock<Vec<BlockMeta>>,
    /// Set when retention dropped the segment (its file is gone or going).
    pub dropped: AtomicBool,
    /// Set when this is a sealed file (immutable, series-major): its series index.
    pub sealed: OnceLock<Sealed>,
    /// Set on an unsealed segment once it was sealed: the catalog entry of its sealed file
    /// (readers holding this entry follow it; the segment file is removed).
    pub successor: OnceLock<Arc<SegmentShared>>,
    /// Wall-clock unix seconds of the last commit that wrote to it in this process (0: none).
    pub last_write_unix_s: AtomicU64,
    /// One more than the greatest commit_seq with a frame in it (0: none). Retention keeps the
    /// partitions holding the shard's last commit (docs/storage-format.md, "Retention").
    pub last_commit: AtomicU64,
    map: Mutex<Option<Arc<FileBytes>>>,
}

impl SegmentShared {
    pub fn new(
        path: PathBuf,
        window_start: i64,
        partition_secs: u64,
        seq: u64,
        len: u64,
        blocks: Vec<BlockMeta>,
    ) -> Self {
        SegmentShared {
            path,
            window_start,
            partition_secs,
            seq,
            published_len: AtomicU64::new(len),
            blocks: RwLock::new(blocks),
            dropped: AtomicBool::new(false),
            sealed: OnceLock::new(),
            successor: OnceLock::new(),
            last_write_unix_s: AtomicU64::new(0),
            last_commit: AtomicU64::new(0),
            map: Mutex::new(None),
        }
    }

    /// A map covering at least `needed` bytes (remapped when the file has grown).
    pub(crate) fn map(
        &self,
        backend: &dyn Backend,
        needed: u64,
    ) -> Result<Arc<FileBytes>, StoreError> {
        let mut slot = lock(&self.map);
        if let Some(map) = slot.as_ref() {
            if map.len() as u64 >= needed {
                return Ok(map.clone());
            }
        }
        // Segments are append-only; the writer only truncates bytes past the published length,
        // and readers only touch bytes below the published length, so the mapped bytes we read
        // are never changed or cut while mapped (what `Backend::map` asks of its caller).
        let map = backend
            .map(&self.path)
            .map_err(|error| StoreError::io("mmap segment", &self.path, error))?;
        if (map.len() as u64) < needed {
            return Err(StoreError::Corrupt {
                path: self.path.clone(),
                offset: map.len() as u64,
                reason: format!("segment is shorter than its published length {needed}"),
            });
        }
        let map = Arc::new(map);
        *slot = Some(map.clone());
        Ok(map)
    }
}

#[derive(Clone, Debug)]
pub(crate) struct Latest {
    pub time: f64,
    /// (commit_seq, position in the commit): ties on time go to the later write.
    pub order: (u64, u64),
    pub value: Value,
}

/// A known series: its names and what the summary keeps of it.
pub(crate) struct SeriesState {
    /// Index of its device in `Summary::device_states`.
    pub device: u32,
    pub name: String,
    /// Points added to the series in this shard plus points retention dropped from it: it only
    /// grows, and grows with every change, so readers use it to tell whether a series changed.
    pub changes: u64,
    pub latest: Option<Latest>,
}

pub(crate) struct DeviceState {
    pub name: String,
    pub last_seen: f64,
    pub points: u64,
    /// Series name -> id, in name order.
    pub series: BTreeMap<String, u32>,
}

/// A shard's published dictionary and device/latest summary.
#[derive(Default)]
pub(crate) struct Summary {
    /// Series id -> its state; None where a dictionary frame was lost. Indexed by id, so a
    /// commit updates a series without looking its names up.
    pub series: Vec<Option<SeriesState>>,
    /// Device name -> index in `device_states` (a series keeps its device's index, so a commit
    /// updates the device without hashing its name).
    pub devices: HashMap<String, u32>,
    pub device_states: Vec<DeviceState>,
    /// Indices of `device_states` in device name order, but for the devices added since the
    /// last listing, which wait in `unlisted`: a listing sorts only those in
    /// ([`Summary::devices_by_name`]), and a page starts with a binary search.
    by_name: Vec<u32>,
    unlisted: Vec<u32>,
    /// One more than the greatest series id any recovered block refers to: a writer never
    /// hands out an id that orphaned records (after a lost dictionary frame) already use.
    pub id_floor: u32,
}

impl Summary {
    /// Defines series `id`; a second definition of a known (device, name) keeps the first id.
    pub fn intern(&mut self, id: u32, device: &str, name: &str) {
        let (states, unlisted) = (&mut self.device_states, &mut self.unlisted);
        let device_index = *self.devices.entry(device.to_string()).or_insert_with(|| {
            states.push(DeviceState {
                name: device.to_string(),
                last_seen: f64::NEG_INFINITY,
                points: 0,
                series: BTreeMap::new(),
            });
            let index = (states.len() - 1) as u32;
            unlisted.push(index);
            index
        });
        let state = &mut self.device_states[device_index as usize];
        if state.series.contains_key(name) {
            return;
        }
        state.series.insert(name.to_string(), id);
        let index = id as usize;
        if self.series.len() <= index {
            self.series.resize_with(index + 1, || None);
        }
        self.series[index] = Some(SeriesState {
            device: device_index,
            name: name.to_string(),
            changes: 0,
            latest: None,
        });
    }

    /// Series `id`, if known.
    pub fn get(&self, id: u32) -> Option<&SeriesState> {
        self.series.get(id as usize)?.as_ref()
    }

    /// The series `name` of `device`, if known: its id and state.
    pub fn find(&self, device: &str, name: &str) -> Option<(u32, &SeriesState)> {
        let id = *self.device(device)?.series.get(name)?;
        Some((id, self.get(id)?))
    }

    /// Every device (indices of `device_states`) in name order. Devices are never removed, so
    /// only those added since the last call are sorted in: a stable sort of a sorted run and a
    /// short tail merges them in linear time.
    pub fn devices_by_name(&mut self) -> &[u32] {
        if !self.unlisted.is_empty() {
            self.by_name.append(&mut self.unlisted);
            let states = &self.device_states;
            self.by_name
                .sort_by(|&a, &b| states[a as usize].name.cmp(&states[b as usize].name));
        }
        &self.by_name
    }

    /// Device `device`, if known.
    pub fn device(&self, device: &str) -> Option<&DeviceState> {
        self.device_states.get(*self.devices.get(device)? as usize)
    }

    /// Removes the points of a dropped partition (series id -> points; its window start and
    /// width) from the device counts. A series whose latest point was in it loses its latest
    /// value, as a restart would find none: that was the series' newest point, so its other
    /// points went too (but any in a partition retention keeps for the shard's last commit,
    /// from which a restart works out a latest value again).
    pub fn remove_points(&mut self, dropped: &HashMap<u32, u64>, window: i64, partition_secs: u64) {
        for (&id, &count) in dropped {
            let Some(Some(series)) = self.series.get_mut(id as usize) else {
                continue;
            };
            series.changes += count;
            if series
                .latest
                .as_ref()
                .is_some_and(|latest| writer::window_of(latest.time, partition_secs) == window)
            {
                series.latest = None;
            }
            if let Some(state) = self.device_states.get_mut(series.device as usize) {
                state.points = state.points.saturating_sub(count);
            }
        }
    }

    /// Adds `count` points of series `id` with greatest time `latest.0`; returns false for an
    /// unknown id.
    pub fn apply(
        &mut self,
        id: u32,
        count: u64,
        time: f64,
        order: (u64, u64),
        value: impl FnOnce() -> Value,
    ) -> bool {
        let Some(Some(series)) = self.series.get_mut(id as usize) else {
            return false;
        };
        let Some(state) = self.device_states.get_mut(series.device as usize) else {
            return false;
        };
        state.points += count;
        series.changes += count;
        if time > state.last_seen {
            state.last_seen = time;
        }
        let newer = match &series.latest {
            None => true,
            Some(latest) => time > latest.time || (time == latest.time && order >= latest.order),
        };
        if newer {
            series.latest = Some(Latest {
                time,
                order,
                value: value(),
            });
        }
        true
    }
}

pub(crate) struct ShardShared {
    pub shard: u32,
    pub dir: PathBuf,
    pub summary: Mutex<Summary>,
    pub segments: RwLock<Vec<Arc<SegmentShared>>>,
    /// Published length of the dictionary (0: the file does not exist yet).
    pub dictionary_len: AtomicU64,
    pub next_commit_seq: AtomicU64,
    /// Held by a commit, and by retention while it renames a partition directory away.
    pub files: Mutex<()>,
    /// Unix seconds: partitions whose window ends at or before it are dropped (or being
    /// dropped); the writer takes no reading for them.
    pub retention_floor: AtomicI64,
}

impl ShardShared {
    pub fn new(
        shard: u32,
        dir: PathBuf,
        summary: Summary,
        segments: Vec<Arc<SegmentShared>>,
        dictionary_len: u64,
        next_commit_seq: u64,
    ) -> ShardShared {
        ShardShared {
            shard,
            dir,
            summary: Mutex::new(summary),
            segments: RwLock::new(segments),
            dictionary_len: AtomicU64::new(dictionary_len),
            next_commit_seq: AtomicU64::new(next_commit_seq),
            files: Mutex::new(()),
            retention_floor: AtomicI64::new(i64::MIN),
        }
    }
}

pub(crate) fn read_segments(
    shard: &ShardShared,
) -> std::sync::RwLockReadGuard<'_, Vec<Arc<SegmentShared>>> {
    read_lock(&shard.segments)
}

pub(crate) struct Inner {
    pub config: StoreConfig,
    pub generation: AtomicU64,
    pub shards: RwLock<BTreeMap<u32, Arc<ShardShared>>>,
    pub writers: Mutex<HashSet<u32>>,
    /// Exchanges of complete commits found at open, oldest first, until taken.
    recovered_exchanges: Mutex<Vec<ExchangeRecord>>,
    /// Every file operation of the store goes through it (docs/storage-format.md).
    pub backend: Arc<dyn Backend>,
    _lock: Box<dyn std::any::Any + Send + Sync>,
}

/// The whole data directory. The lock is released when the store and every writer and reader
/// made from it are dropped.
pub struct Store {
    inner: Arc<Inner>,
}

impl Store {
    /// Opens (creating it if needed) and recovers the data directory on the real file system.
    pub fn open(config: StoreConfig) -> Result<(Store, RecoveryReport), StoreError> {
        Store::open_with(config, Arc::new(Fs))
    }

    /// [`Store::open`] doing every file operation through `backend` (tests: a simulated disk).
    pub fn open_with(
        config: StoreConfig,
        backend: Arc<dyn Backend>,
    ) -> Result<(Store, RecoveryReport), StoreError> {
        if config.partition_secs == 0 {
            return Err(StoreError::Config(
                "partition_secs must be at least 1".to_string(),
            ));
        }
        // The data directory's entry is made durable too: a store created just before a power
        // loss must not lose its directory with the commits it acknowledged.
        backend::create_dirs(&*backend, &config.dir)?;
        let lock_file = backend.lock(&config.dir)?;
        let mut report = RecoveryReport::default();
        let mut shards = BTreeMap::new();
        let mut exchanges = Vec::new();
        for (shard, path) in list_shards(&*backend, &config.dir)? {
            let mut shard_exchanges = Vec::new();
            let recovered = recover_shard(
                &*backend,
                shard,
                &path,
                true,
                &mut report,
                &mut shard_exchanges,
            )?;
            exchanges.append(&mut shard_exchanges);
            shards.insert(shard, Arc::new(recovered));
        }
        exchanges.sort_by(|a, b| a.arrival.total_cmp(&b.arrival));
        let inner = Inner {
            config,
            generation: AtomicU64::new(0),
            shards: RwLock::new(shards),
            writers: Mutex::new(HashSet::new()),
            recovered_exchanges: Mutex::new(exchanges),
            backend,
            _lock: lock_file,
        };
        Ok((
            Store {
                inner: Arc::new(inner),
            },
            report,
        ))
    }

    pub fn writer(&self, shard: u32) -> Result<ShardWriter, StoreError> {
        {
            let mut writers = lock(&self.inner.writers);
            if !writers.insert(shard) {
                return Err(StoreError::WriterTaken { shard });
            }
        }
        let shared = {
            let mut shards = write_lock(&self.inner.shards);
            shards
                .entry(shard)
                .or_insert_with(|| {
                    Arc::new(ShardShared::new(
                        shard,
                        shard_dir(&self.inner.config.dir, shard),
                        Summary::default(),
                        Vec::new(),
                        0,
                        0,
                    ))
                })
                .clone()
        };
        ShardWriter::new(self.inner.clone(), shared).inspect_err(|_| {
            lock(&self.inner.writers).remove(&shard);
        })
    }

    pub fn reader(&self) -> Reader {
        Reader {
            inner: self.inner.clone(),
        }
    }

    /// The exchanges acknowledged by the complete commits found at open (at most
    /// `RECOVERED_EXCHANGES_MAX` per shard, the newest), oldest first. The first call takes
    /// them; later calls return nothing.
    pub fn take_recovered_exchanges(&self) -> Vec<ExchangeRecord> {
        std::mem::take(&mut *lock(&self.inner.recovered_exchanges))
    }

    /// A handle that drops old partitions (Send + Sync; for a background thread).
    pub fn retention(&self) -> Retention {
        Retention {
            inner: self.inner.clone(),
        }
    }

    pub fn config(&self) -> &StoreConfig {
        &self.inner.config
    }
}

pub(crate) fn take_lock(dir: &Path) -> Result<File, StoreError> {
    let path = dir.join(LOCK_FILE);
    let mut file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .map_err(|error| StoreError::io("open lock file", &path, error))?;
    // SAFETY: flock on a valid, owned descriptor.
    let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    if rc != 0 {
        let error = std::io::Error::last_os_error();
        if error.raw_os_error() == Some(libc::EWOULDBLOCK) {
            let mut pid = String::new();
            let _ = file.read_to_string(&mut pid);
            let pid = pid.trim();
            let pid = if pid.is_empty() {
                "unknown".to_string()
            } else {
                pid.to_string()
            };
            return Err(StoreError::Locked {
                dir: dir.to_path_buf(),
                pid,
            });
        }
        return Err(StoreError::io("lock", &path, error));
    }
    file.set_len(0)
        .map_err(|error| StoreError::io("truncate lock file", &path, error))?;
    writeln!(file, "{}", std::process::id())
        .map_err(|error| StoreError::io("write lock file", &path, error))?;
    Ok(file)
}

/// Takes the lock for offline repair (`verify --repair`).
pub(crate) fn take_lock_for_repair(dir: &Path) -> Result<File, StoreError> {
    take_lock(dir)
}

/// `shard-<n>` directories of a data directory, sorted by n.
pub(crate) fn list_shards(
    backend: &dyn Backend,
    dir: &Path,
) -> Result<Vec<(u32, PathBuf)>, StoreError> {
    let mut shards = Vec::new();
    let entries = backend
        .read_dir(dir)
        .map_err(|error| StoreError::io("read directory", dir, error))?;
    for entry in entries {
        let Some(number) = entry
            .name
            .to_str()
            .and_then(|name| name.strip_prefix("shard-"))
        else {
            continue;
        };
        let Ok(shard) = number.parse::<u32>() else {
            continue;
        };
        if entry.is_dir {
            shards.push((shard, dir.join(&entry.name)));
        }
    }
    shards.sort();
    Ok(shards)
}

/// The files of one segment: the segment, its sealed file, or both (a seal interrupted
/// between the rename and the removal of the segment).
pub(crate) struct SegmentFiles {
    pub window: i64,
    pub seq: u64,
    /// `segment-<seq>.seg` (the path it has or would have).
    pub path: PathBuf,
    pub segment: bool,
    pub sealed: bool,
}

/// Segments of a shard directory, sealed or not, sorted by (window, seq).
pub(crate) fn list_segments(
    backend: &dyn Backend,
    shard_dir: &Path,
) -> Result<Vec<SegmentFiles>, StoreError> {
    let mut by_place: BTreeMap<(i64, u64), SegmentFiles> = BTreeMap::new();
    for (window, seq, path, sealed) in list_segment_files(backend, shard_dir)? {
        let files = by_place
            .entry((window, seq))
            .or_insert_with(|| SegmentFiles {
                window,
                seq,
                path: path.with_extension("seg"),
                segment: false,
                sealed: false,
            });
        if sealed {
            files.sealed = true;
        } else {
            files.segment = true;
        }
    }
    Ok(by_place.into_values().collect())
}

/// `.seg` and `.sealed` files of a shard directory as (window_start, seq, path, sealed).
fn list_segment_files(
    backend: &dyn Backend,
    shard_dir: &Path,
) -> Result<Vec<(i64, u64, PathBuf, bool)>, StoreError> {
    let mut segments = Vec::new();
    let entries = backend
        .read_dir(shard_dir)
        .map_err(|error| StoreError::io("read directory", shard_dir, error))?;
    for entry in entries {
        let Some(window) = entry
            .name
            .to_str()
            .and_then(|name| name.parse::<i64>().ok())
        else {
            continue;
        };
        if !entry.is_dir {
            continue;
        }
        let window_dir = shard_dir.join(&entry.name);
        let files = backend
            .read_dir(&window_dir)
            .map_err(|error| StoreError::io("read directory", &window_dir, error))?;
        for file in files {
            let Some(rest) = file
                .name
                .to_str()
                .and_then(|name| name.strip_prefix("segment-"))
            else {
                continue;
            };
            let (seq, sealed) = match (rest.strip_suffix(".seg"), rest.strip_suffix(".sealed")) {
                (Some(seq), _) => (seq, false),
                (_, Some(seq)) => (seq, true),
                _ => continue,
            };
            let Ok(seq) = seq.parse::<u64>() else {
                continue;
            };
            segments.push((window, seq, window_dir.join(&file.name), sealed));
        }
    }
    segments.sort();
    Ok(segments)
}

/// A file read for recovery, inspection or verification.
pub(crate) enum LoadedFile {
    /// Shorter than a header, or exactly a header that does not validate: a torn creation.
    TornCreation { len: u64, reason: String },
    Valid {
        header: FileHeader,
        bytes: FileBytes,
        scan: Scan,
    },
}

/// Reads and scans a file. A header that does not validate on a file longer than a header is
/// corruption (headers are synced before any frame is written).
pub(crate) fn load_file(
    backend: &dyn Backend,
    path: &Path,
    kind: FileKind,
) -> Result<LoadedFile, StoreError> {
    let bytes = backend
        .read(path)
        .map_err(|error| StoreError::io("read", path, error))?;
    scan_file(path, kind, bytes)
}

/// `load_file` through a map (recovery only: it holds the lock, so no other process cuts the
/// file while it is mapped, and recovery's own cuts never go below bytes it still reads; saves
/// a copy of every segment).
fn load_file_mapped(
    backend: &dyn Backend,
    path: &Path,
    kind: FileKind,
) -> Result<LoadedFile, StoreError> {
    let bytes = backend
        .map(path)
        .map_err(|error| StoreError::io("mmap", path, error))?;
    scan_file(path, kind, bytes)
}

fn scan_file(path: &Path, kind: FileKind, bytes: FileBytes) -> Result<LoadedFile, StoreError> {
    let header = match FileHeader::decode(&bytes, kind) {
        Ok(header) => header,
        Err(reason) if bytes.len() <= FILE_HEADER_BYTES => {
            return Ok(LoadedFile::TornCreation {
                len: bytes.len() as u64,
                reason,
            })
        }
        Err(reason) => {
            return Err(StoreError::Corrupt {
                path: path.to_path_buf(),
                offset: 0,
                reason,
            })
        }
    };
    let scan = match kind {
        FileKind::Segment => format::scan(&bytes, kind, &mut format::validate_segment_frame),
        FileKind::Dictionary => format::scan(&bytes, kind, &mut |header, payload| {
            format::decode_dictionary(header, payload).map(|_| ())
        }),
        FileKind::Sealed => format::scan(&bytes, kind, &mut format::validate_sealed_frame),
    };
    Ok(LoadedFile::Valid {
        header,
        bytes,
        scan,
    })
}

/// Cuts a torn tail (or removes a torn creation), syncing the result.
pub(crate) fn cut_file(
    backend: &dyn Backend,
    path: &Path,
    len: Option<u64>,
) -> Result<(), StoreError> {
    match len {
        None => backend
            .remove_file(path)
            .map_err(|error| StoreError::io("remove torn file", path, error))?,
        Some(len) => {
            let file = backend
                .open(path)
                .map_err(|error| StoreError::io("open", path, error))?;
            file.set_len(len)
                .map_err(|error| StoreError::io("truncate torn tail of", path, error))?;
            file.sync_data()
                .map_err(|error| StoreError::io("fdatasync", path, error))?;
        }
    }
    if let Some(parent) = path.parent() {
        backend::sync_dir(backend, parent)?;
    }
    Ok(())
}

/// A recovered segment before it enters the catalog.
struct RecoveredSegment {
    path: PathBuf,
    window: i64,
    seq: u64,
    partition_secs: u64,
    len: u64,
    blocks: Vec<BlockMeta>,
    /// Valid frames found by the scan (until they are applied).
    frames: Vec<format::ScannedFrame>,
    /// As `SegmentShared::last_commit`.
    last_commit: u64,
    /// The bytes pass 1 scanned, kept for pass 2 (the first `RECOVERY_MAPS_KEPT_MAX` segments
    /// of a shard; the others are mapped again).
    bytes: Option<FileBytes>,
    /// A sealed file (`path` is the `.sealed` file): its series index. Never cut.
    sealed: Option<Sealed>,
}

/// Segment maps recovery keeps from its scan to its second pass, per shard: saves mapping and
/// faulting every page in again (about 10 % of recovery's CPU time) while bounding the maps one
/// shard holds at once (1024 maps of at most 64 MiB: 64 GiB of segments, far below the kernel's
/// default `vm.max_map_count` of 65 530).
const RECOVERY_MAPS_KEPT_MAX: usize = 1024;

/// Per commit of a shard (commit_seq): the block frames found in all its segments and the
/// block count its commit record states (docs/storage-format.md, "Recovery"). The last commit
/// is complete when its record is found and counts exactly the blocks found; an earlier one
/// when its record is found and counts at least the blocks found (retention may have dropped
/// the partitions of some of its blocks, never that of its record: see the docs).
#[derive(Default)]
pub(crate) struct CommitTally {
    commits: std::collections::HashMap<u64, (u32, Option<u32>)>,
    last: Option<u64>,
}

impl CommitTally {
    /// Counts a valid segment frame.
    pub fn add(&mut self, frame: &format::ScannedFrame, payload: &[u8]) {
        self.last = self.last.max(Some(frame.header.commit_seq));
        let entry = self.commits.entry(frame.header.commit_seq).or_default();
        match frame.header.kind {
            format::FrameKind::Commit => entry.1 = format::commit_blocks(payload),
            _ => entry.0 += 1,
        }
    }

    /// Counts `blocks` block frames of a commit that a sealed file's index lists.
    pub fn add_blocks(&mut self, commit_seq: u64, blocks: u32) {
        self.last = self.last.max(Some(commit_seq));
        self.commits.entry(commit_seq).or_default().0 += blocks;
    }

    /// Whether a commit is complete as the shard's last commit.
    pub fn complete_as_last(&self, commit_seq: u64) -> bool {
        self.commits
            .get(&commit_seq)
            .is_some_and(|(blocks, record)| *record == Some(*blocks))
    }

    /// Whether a commit is complete (as the last commit if it is the greatest commit_seq).
    pub fn complete(&self, commit_seq: u64) -> bool {
        if Some(commit_seq) == self.last() {
            return self.complete_as_last(commit_seq);
        }
        self.commits
            .get(&commit_seq)
            .is_some_and(|(blocks, record)| record.is_some_and(|stated| *blocks <= stated))
    }

    /// (blocks found, blocks its record states) of a commit.
    pub fn counts(&self, commit_seq: u64) -> Option<(u32, Option<u32>)> {
        self.commits.get(&commit_seq).copied()
    }

    /// Forgets a commit (its frames were cut).
    pub fn remove(&mut self, commit_seq: u64) {
        self.commits.remove(&commit_seq);
        self.last = self.commits.keys().copied().max();
    }

    /// The greatest commit_seq found.
    pub fn last(&self) -> Option<u64> {
        self.last
    }

    /// Incomplete commits, ascending: (commit_seq, blocks found, blocks the record states).
    pub fn incomplete(&self) -> Vec<(u64, u32, Option<u32>)> {
        let mut incomplete: Vec<(u64, u32, Option<u32>)> = self
            .commits
            .iter()
            .filter(|(&seq, _)| !self.complete(seq))
            .map(|(&seq, &(blocks, record))| (seq, blocks, record))
            .collect();
        incomplete.sort_unstable_by_key(|(seq, _, _)| *seq);
        incomplete
    }
}

/// Recovers one shard directory: dictionary, then segments in (window, seq) order; rolls back an
/// incomplete last commit; rebuilds the summary; collects the exchanges of complete commits
/// (newest `RECOVERED_EXCHANGES_MAX`) into `exchanges`. With `cut`, torn tails and the rolled
/// back commit are cut, torn creations and `dropped-*` directories removed.
pub(crate) fn recover_shard(
    backend: &dyn Backend,
    shard: u32,
    dir: &Path,
    cut: bool,
    report: &mut RecoveryReport,
    exchanges: &mut Vec<ExchangeRecord>,
) -> Result<ShardShared, StoreError> {
    let mut summary = Summary::default();
    let mut next_commit_seq = 0u64;
    let mut dictionary_len = 0u64;
    if cut {
        remove_dropped_partitions(backend, dir)?;
    }
    let dictionary_path = dir.join(DICTIONARY_FILE);
    if backend.exists(&dictionary_path) {
        match load_file(backend, &dictionary_path, FileKind::Dictionary)? {
            LoadedFile::TornCreation { len, .. } => {
                report.bytes_truncated += len;
                report.files_truncated += 1;
                if cut {
                    cut_file(backend, &dictionary_path, None)?;
                }
            }
            LoadedFile::Valid {
                header,
                bytes,
                scan,
            } => {
                check_header(&dictionary_path, &header, shard, None)?;
                account_cut(
                    backend,
                    &dictionary_path,
                    bytes.len() as u64,
                    &scan,
                    cut,
                    report,
                )?;
                for frame in &scan.frames {
                    next_commit_seq = next_commit_seq.max(frame.header.commit_seq + 1);
                    let start = frame.payload_offset() as usize;
                    let payload = &bytes[start..start + frame.header.payload_len as usize];
                    let entries =
                        format::decode_dictionary(&frame.header, payload).map_err(|reason| {
                            StoreError::Corrupt {
                                path: dictionary_path.clone(),
                                offset: frame.offset,
                                reason,
                            }
                        })?;
                    for entry in entries {
                        if summary.get(entry.id).is_some() {
                            return Err(StoreError::Corrupt {
                                path: dictionary_path.clone(),
                                offset: frame.offset,
                                reason: format!("series id {} is defined twice", entry.id),
                            });
                        }
                        summary.intern(entry.id, &entry.device, &entry.name);
                    }
                }
                dictionary_len = scan.valid_end;
            }
        }
    }
    // Pass 1: scan (and validate) every frame of every segment, cut torn tails, count every
    // commit's blocks and records.
    let mut recovered: Vec<RecoveredSegment> = Vec::new();
    let mut tally = CommitTally::default();
    for files in list_segments(backend, dir)? {
        let (window, seq, path) = (files.window, files.seq, files.path.clone());
        // Leftovers of an interrupted seal, and version 2 seal indexes (the segment is sealed
        // again, series-major).
        let tmp = sealed_tmp_path(&path);
        if cut && backend.exists(&tmp) {
            backend
                .remove_file(&tmp)
                .map_err(|error| StoreError::io("remove", &tmp, error))?;
        }
        let old_seal = seal_path(&path);
        if backend.exists(&old_seal) {
            report.seals_discarded += 1;
            if cut {
                backend
                    .remove_file(&old_seal)
                    .map_err(|error| StoreError::io("remove", &old_seal, error))?;
            }
        }
        if files.sealed {
            let sealed = sealed_path(&path);
            match recover_sealed(backend, shard, window, seq, &sealed)? {
                Ok((header, bytes, scan, checked)) => {
                    if files.segment && cut {
                        // The seal was interrupted after its rename: the sealed file wins.
                        cut_file(backend, &path, None)?;
                    }
                    report.segments += 1;
                    report.corrupt_regions += scan.holes.len() as u64;
                    for commit in &checked.index.commits {
                        tally.add_blocks(commit.commit_seq, commit.blocks);
                    }
                    for frame in &scan.frames {
                        next_commit_seq = next_commit_seq.max(frame.header.commit_seq + 1);
                        if frame.header.kind == format::FrameKind::Commit {
                            tally.add(frame, payload_of(&bytes, frame));
                        }
                    }
                    recovered.push(RecoveredSegment {
                        path: sealed,
                        window,
                        seq,
                        partition_secs: header.partition_secs,
                        len: scan.valid_end,
                        blocks: Vec::new(),
                        frames: scan.frames,
                        last_commit: 0,
                        bytes: (recovered.len() < RECOVERY_MAPS_KEPT_MAX).then_some(bytes),
                        sealed: Some(checked.sealed),
                    });
                    continue;
                }
                Err(_) if files.segment => {
                    // Media corruption of a sealed file whose segment is still there: the
                    // segment is used, and sealed again.
                    report.seals_discarded += 1;
                    if cut {
                        backend
                            .remove_file(&sealed)
                            .map_err(|error| StoreError::io("remove", &sealed, error))?;
                    }
                }
                Err(reason) => {
                    return Err(StoreError::Corrupt {
                        path: sealed,
                        offset: 0,
                        reason,
                    })
                }
            }
        }
        if !files.segment {
            continue;
        }
        let (header, bytes, scan) = match load_file_mapped(backend, &path, FileKind::Segment)? {
            LoadedFile::TornCreation { len, .. } => {
                report.bytes_truncated += len;
                report.files_truncated += 1;
                if cut {
                    cut_file(backend, &path, None)?;
                }
                continue;
            }
            LoadedFile::Valid {
                header,
                bytes,
                scan,
            } => (header, bytes, scan),
        };
        check_header(&path, &header, shard, Some((window, seq)))?;
        account_cut(backend, &path, bytes.len() as u64, &scan, cut, report)?;
        report.segments += 1;
        for frame in &scan.frames {
            next_commit_seq = next_commit_seq.max(frame.header.commit_seq + 1);
            tally.add(frame, payload_of(&bytes, frame));
        }
        recovered.push(RecoveredSegment {
            path,
            window,
            seq,
            partition_secs: header.partition_secs,
            len: scan.valid_end,
            blocks: Vec::new(),
            frames: scan.frames,
            last_commit: 0,
            bytes: (recovered.len() < RECOVERY_MAPS_KEPT_MAX).then_some(bytes),
            sealed: None,
        });
    }
    // The last commit, if incomplete, was never acknowledged (its record is written after every
    // block, and the commit returns only after it): its frames end the files it wrote, which are
    // cut at its first frame. The commit before it is then the last one and is held to the same
    // rule (so that a later recovery, which sees it last, agrees); under `fsync` it is complete
    // (it was synced before the next one was written). An earlier incomplete commit cannot be
    // cut (later frames follow): none of its frames is served, so no part of a commit is ever
    // served. Each round removes a commit from the tally: at most as many rounds as commits.
    while let Some(last) = tally.last().filter(|&last| !tally.complete_as_last(last)) {
        report.commits_rolled_back += 1;
        tally.remove(last);
        // A sealed file is never cut: it holds published commits only (see "Sealing").
        for segment in recovered
            .iter_mut()
            .filter(|segment| segment.sealed.is_none())
        {
            let Some(first) = segment
                .frames
                .iter()
                .position(|frame| frame.header.commit_seq == last)
            else {
                continue;
            };
            let offset = segment.frames[first].offset;
            report.bytes_truncated += segment.len - offset;
            report.files_truncated += 1;
            if cut {
                cut_file(backend, &segment.path, Some(offset))?;
            }
            segment.len = offset;
            segment.frames.truncate(first);
        }
    }
    report.incomplete_commits += tally.incomplete().len() as u64;
    // Pass 2: apply the frames of complete commits, in (window, seq) and file order.
    let mut applier = Applier {
        summary: &mut summary,
        report,
        running_index: 0,
        exchanges,
        block_series: Vec::new(),
        block_touched: Vec::new(),
    };
    for segment in recovered.iter_mut() {
        let frames = std::mem::take(&mut segment.frames);
        segment.last_commit = frames
            .iter()
            .map(|frame| frame.header.commit_seq + 1)
            .max()
            .unwrap_or(0);
        let sealed = segment.sealed.is_some();
        // A sealed file's series frames are always served (built from served blocks only);
        // its commit records count when their commit is complete.
        let served = |frame: &format::ScannedFrame| match frame.header.kind {
            format::FrameKind::Block if sealed => true,
            format::FrameKind::Index => false,
            _ => tally.complete(frame.header.commit_seq),
        };
        if !frames.iter().any(served) {
            segment.bytes = None;
            continue;
        }
        let bytes = match segment.bytes.take() {
            Some(bytes) => bytes,
            None => backend
                .map(&segment.path)
                .map_err(|error| StoreError::io("mmap", &segment.path, error))?,
        };
        for frame in &frames {
            if !served(frame) {
                continue;
            }
            applier.apply(
                &segment.path,
                frame,
                payload_of(&bytes, frame),
                &mut segment.blocks,
            )?;
        }
        applier.bound_exchanges();
    }
    keep_newest(applier.exchanges);
    let mut segments = Vec::with_capacity(recovered.len());
    for segment in recovered {
        let sealed = segment.sealed;
        let shared = SegmentShared::new(
            segment.path,
            segment.window,
            segment.partition_secs,
            segment.seq,
            segment.len,
            segment.blocks,
        );
        shared
            .last_commit
            .store(segment.last_commit, Ordering::Release);
        if let Some(index) = sealed {
            let _ = shared.sealed.set(index);
        }
        segments.push(Arc::new(shared));
    }
    Ok(ShardShared::new(
        shard,
        dir.to_path_buf(),
        summary,
        segments,
        dictionary_len,
        next_commit_seq,
    ))
}

/// Loads and checks a sealed file. The outer error is an I/O error; the inner one says why the
/// file is not a valid sealed file of this place (see "Which file wins, at open").
#[allow(clippy::type_complexity)]
fn recover_sealed(
    backend: &dyn Backend,
    shard: u32,
    window: i64,
    seq: u64,
    path: &Path,
) -> Result<Result<(FileHeader, FileBytes, Scan, crate::sealed::Checked), String>, StoreError> {
    let bytes = backend
        .map(path)
        .map_err(|error| StoreError::io("mmap", path, error))?;
    let header = match FileHeader::decode(&bytes, FileKind::Sealed) {
        Ok(header) => header,
        Err(reason) => return Ok(Err(reason)),
    };
    if let Err(error) = check_header(path, &header, shard, Some((window, seq))) {
        return Ok(Err(error.to_string()));
    }
    let scan = format::scan(&bytes, FileKind::Sealed, &mut format::validate_sealed_frame);
    Ok(crate::sealed::check(&bytes, &scan).map(|checked| (header, bytes, scan, checked)))
}

fn payload_of<'a>(bytes: &'a [u8], frame: &format::ScannedFrame) -> &'a [u8] {
    let start = frame.payload_offset() as usize;
    &bytes[start..start + frame.header.payload_len as usize]
}

/// Applies recovered frames to a shard's summary, block index and exchange history.
struct Applier<'a> {
    summary: &'a mut Summary,
    report: &'a mut RecoveryReport,
    /// Frames are applied in write order, so a running index orders a commit's records as
    /// their positions in the commit did.
    running_index: u64,
    exchanges: &'a mut Vec<ExchangeRecord>,
    /// Per known series id (indexed by id, as long as the dictionary's id range), for the
    /// block being applied: points, greatest time and the position of the latest record (ties
    /// to the later one). Reused across blocks.
    block_series: Vec<(u64, f64, usize)>,
    /// Ids with an entry in `block_series` for the current block (at most `BLOCK_RECORDS_MAX`).
    block_touched: Vec<u32>,
}

impl Applier<'_> {
    fn apply(
        &mut self,
        path: &Path,
        frame: &format::ScannedFrame,
        payload: &[u8],
        blocks: &mut Vec<BlockMeta>,
    ) -> Result<(), StoreError> {
        let corrupt = |reason| StoreError::Corrupt {
            path: path.to_path_buf(),
            offset: frame.offset,
            reason,
        };
        let commit_seq = frame.header.commit_seq;
        if frame.header.kind == format::FrameKind::Commit {
            let (_, exchanges) = format::decode_commit(&frame.header, payload).map_err(corrupt)?;
            self.report.exchanges += exchanges.len() as u64;
            self.exchanges.extend(exchanges);
            return Ok(());
        }
        format::with_aligned(payload, |payload| {
            let block = format::access_block(payload).map_err(corrupt)?;
            // The summary is updated once per series of the block, not once per record.
            let summary = &mut *self.summary;
            let known_ids = summary.series.len();
            self.block_series
                .resize(known_ids, (0, f64::NEG_INFINITY, 0));
            for (position, (id, time)) in block.series.iter().zip(block.times.iter()).enumerate() {
                let id = id.to_native();
                summary.id_floor = summary.id_floor.max(id.saturating_add(1));
                let Some(entry) = self.block_series.get_mut(id as usize) else {
                    self.report.unknown_series_points += 1;
                    continue;
                };
                if entry.0 == 0 {
                    self.block_touched.push(id);
                }
                let time = time.to_native();
                entry.0 += 1;
                if time >= entry.1 {
                    entry.1 = time;
                    entry.2 = position;
                }
            }
            let first_index = self.running_index + 1;
            self.running_index += block.series.len() as u64;
            for id in self.block_touched.drain(..) {
                let entry = &mut self.block_series[id as usize];
                let (count, time, position) = *entry;
                *entry = (0, f64::NEG_INFINITY, 0);
                let known = summary.apply(
                    id,
                    count,
                    time,
                    (commit_seq, first_index + position as u64),
                    || archived_value(&block.values[position]),
                );
                if !known {
                    self.report.unknown_series_points += count;
                }
            }
            Ok::<(), StoreError>(())
        })?;
        self.report.blocks += 1;
        self.report.points += frame.header.count as u64;
        blocks.push(BlockMeta {
            payload_offset: frame.payload_offset(),
            payload_len: frame.header.payload_len,
            count: frame.header.count,
            min_time: frame.header.min_time,
            max_time: frame.header.max_time,
        });
        Ok(())
    }

    /// Keeps the newest `RECOVERED_EXCHANGES_MAX` exchanges once twice as many are collected
    /// (and at the end), so recovery's memory stays bounded whatever the store's size.
    fn bound_exchanges(&mut self) {
        if self.exchanges.len() > 2 * RECOVERED_EXCHANGES_MAX {
            keep_newest(self.exchanges);
        }
    }
}

/// Sorts by arrival (oldest first) and keeps the newest `RECOVERED_EXCHANGES_MAX`.
fn keep_newest(exchanges: &mut Vec<ExchangeRecord>) {
    exchanges.sort_by(|a, b| a.arrival.total_cmp(&b.arrival));
    let excess = exchanges.len().saturating_sub(RECOVERED_EXCHANGES_MAX);
    exchanges.drain(..excess);
}

/// Removes `dropped-*` directories: retention drops a crash interrupted.
fn remove_dropped_partitions(backend: &dyn Backend, dir: &Path) -> Result<(), StoreError> {
    let entries = backend
        .read_dir(dir)
        .map_err(|error| StoreError::io("read directory", dir, error))?;
    for entry in entries {
        let is_dropped = entry
            .name
            .to_str()
            .is_some_and(|name| name.starts_with(DROPPED_PREFIX));
        if is_dropped && entry.is_dir {
            let path = dir.join(&entry.name);
            backend
                .remove_dir_all(&path)
                .map_err(|error| StoreError::io("remove dropped partition", &path, error))?;
        }
    }
    Ok(())
}

fn check_header(
    path: &Path,
    header: &FileHeader,
    shard: u32,
    place: Option<(i64, u64)>,
) -> Result<(), StoreError> {
    let mut problem = None;
    if header.shard != shard {
        problem = Some(format!(
            "header says shard {}, directory is shard {shard}",
            header.shard
        ));
    }
    if let Some((window, seq)) = place {
        if header.window_start != window || header.seq != seq {
            problem = Some(format!(
                "header says window {} seq {}, path says window {window} seq {seq}",
                header.window_start, header.seq
            ));
        }
        if header.partition_secs == 0 {
            problem = Some("header has partition_secs 0".to_string());
        }
    }
    match problem {
        Some(reason) => Err(StoreError::Corrupt {
            path: path.to_path_buf(),
            offset: 0,
            reason,
        }),
        None => Ok(()),
    }
}

fn account_cut(
    backend: &dyn Backend,
    path: &Path,
    len: u64,
    scan: &Scan,
    cut: bool,
    report: &mut RecoveryReport,
) -> Result<(), StoreError> {
    report.corrupt_regions += scan.holes.len() as u64;
    if scan.valid_end < len {
        report.bytes_truncated += len - scan.valid_end;
        report.files_truncated += 1;
        if cut {
            cut_file(backend, path, Some(scan.valid_end))?;
        }
    }
    Ok(())
}

pub(crate) fn archived_value(value: &ArchivedStoredValue) -> Value {
    match value {
        ArchivedStoredValue::Number(number) => Value::Number(number.to_native()),
        ArchivedStoredValue::Bool(boolean) => Value::Bool(*boolean),
        ArchivedStoredValue::String(text) => Value::String(text.as_str().to_string()),
        ArchivedStoredValue::Data(data) => Value::Data(data.as_slice().to_vec()),
    }
}

/// A device as the summary knows it.
#[derive(Clone, Debug, PartialEq)]
pub struct DeviceSummary {
    pub device: String,
    /// Greatest reading time seen (unix seconds).
    pub last_seen: f64,
    pub points: u64,
}

/// The latest (time, value) of each series of a device, by series name.
pub type LatestValues = Vec<(String, f64, Value)>;

/// A device in one shard, as a listing sees it (while the shard's summary is locked).
pub struct ListedDevice<'a> {
    summary: &'a Summary,
    state: &'a DeviceState,
}

impl<'a> ListedDevice<'a> {
    pub fn name(&self) -> &'a str {
        &self.state.name
    }

    /// Greatest reading time of the device in this shard (unix seconds).
    pub fn last_seen(&self) -> f64 {
        self.state.last_seen
    }

    /// Points of the device in this shard.
    pub fn points(&self) -> u64 {
        self.state.points
    }

    /// Whether a series of the device has a latest value in this shard.
    pub fn has_latest(&self) -> bool {
        self.latest().next().is_some()
    }

    /// The series of the device with a latest value in this shard, by name: (name, time,
    /// value).
    pub fn latest(&self) -> impl Iterator<Item = (&'a str, f64, &'a Value)> + 'a {
        let summary = self.summary;
        self.state.series.iter().filter_map(move |(name, &id)| {
            let latest = summary.get(id)?.latest.as_ref()?;
            Some((name.as_str(), latest.time, &latest.value))
        })
    }

    /// The points of one device over its views.
    pub fn points_over(views: &[ListedDevice]) -> u64 {
        views.iter().map(ListedDevice::points).sum()
    }

    /// The greatest reading time of one device over its views.
    pub fn last_seen_over(views: &[ListedDevice]) -> f64 {
        views
            .iter()
            .map(ListedDevice::last_seen)
            .fold(f64::NEG_INFINITY, f64::max)
    }

    /// Calls `each` with the latest value of each series of one device over its views, by
    /// series name: on a tie of names the newer time wins, and on a tie of times the later
    /// shard, as within one shard.
    pub fn latest_over(views: &[ListedDevice<'a>], mut each: impl FnMut(&'a str, f64, &'a Value)) {
        if let [view] = views {
            for (name, time, value) in view.latest() {
                each(name, time, value);
            }
            return;
        }
        let mut merged: BTreeMap<&'a str, (f64, &'a Value)> = BTreeMap::new();
        for (name, time, value) in views.iter().flat_map(ListedDevice::latest) {
            let entry = merged.entry(name).or_insert((time, value));
            if time >= entry.0 {
                *entry = (time, value);
            }
        }
        for (name, (time, value)) in merged {
            each(name, time, value);
        }
    }
}

/// Which devices a listing covers: names starting with `prefix`, sorting after `after` (the
/// last device of the previous page), at most `limit` of them, in ascending order.
#[derive(Clone, Copy, Debug)]
pub struct DevicePage<'a> {
    pub prefix: &'a str,
    pub after: Option<&'a str>,
    pub limit: usize,
}

impl DevicePage<'_> {
    pub const ALL: DevicePage<'static> = DevicePage {
        prefix: "",
        after: None,
        limit: usize::MAX,
    };
}

/// Query handle: sees only published commits.
#[derive(Clone)]
pub struct Reader {
    inner: Arc<Inner>,
}

impl Reader {
    fn shards(&self) -> Vec<Arc<ShardShared>> {
        read_lock(&self.inner.shards).values().cloned().collect()
    }

    /// A time `T` (unix seconds) before which every partition is sealed: a query whose range
    /// ends at or before `T` reads only immutable segments, and its answer changes only if a
    /// reading later than the grace period arrives for that range (it is stored, in a late
    /// segment) or retention drops the partition. See "Sealing" in docs/storage-format.md.
    pub fn sealed_before(&self) -> f64 {
        let config = &self.inner.config;
        let now = writer::unix_now();
        let not_due = writer::window_of(
            now - config.partition_grace_secs as f64,
            config.partition_secs,
        ) as f64;
        let mut before = not_due;
        for shard in self.shards() {
            for segment in read_segments(&shard).iter() {
                if segment.sealed.get().is_none() && !segment.dropped.load(Ordering::Acquire) {
                    before = before.min(segment.window_start as f64);
                }
            }
        }
        before
    }

    /// Every device with at least one stored point, in ascending order.
    pub fn devices(&self) -> Vec<DeviceSummary> {
        self.devices_page(&DevicePage::ALL)
    }

    /// The devices of `page` with at least one stored point (points summed and last seen the
    /// greatest over the shards).
    pub fn devices_page(&self, page: &DevicePage) -> Vec<DeviceSummary> {
        let mut devices = Vec::new();
        self.visit_page(
            page,
            |device| device.points() > 0,
            |views| {
                devices.push(DeviceSummary {
                    device: views[0].name().to_string(),
                    last_seen: ListedDevice::last_seen_over(views),
                    points: ListedDevice::points_over(views),
                });
                ControlFlow::Continue(views[0].name().len())
            },
        );
        devices
    }

    /// The devices of `page` with a committed point, each with the latest value of each of its
    /// series (by name; over the shards the newest wins).
    pub fn latest_page(&self, page: &DevicePage) -> Vec<(String, LatestValues)> {
        let mut devices = Vec::new();
        self.visit_page(
            page,
            |device| device.has_latest(),
            |views| {
                let mut latest = LatestValues::new();
                let mut copied = views[0].name().len();
                ListedDevice::latest_over(views, |name, time, value| {
                    copied += name.len()
                        + match value {
                            Value::String(text) => text.len(),
                            Value::Data(data) => data.len(),
                            Value::Number(_) | Value::Bool(_) => 8,
                        };
                    latest.push((name.to_string(), time, value.clone()))
                });
                devices.push((views[0].name().to_string(), latest));
                ControlFlow::Continue(copied)
            },
        );
        devices
    }

    /// Visits the devices of `page` in name order, each once, with its views in the shards that
    /// hold it and where it is `wanted` (in shard order); a device wanted in no shard is skipped
    /// and does not count toward `page.limit`. A listing writes its answer from the views
    /// directly, copying nothing out of the summaries; `visit` says how many bytes it wrote, or
    /// stops the page. The shards' summaries are locked together (in shard order) for up to
    /// [`LISTING_CHUNK_DEVICES`] names or [`LISTING_CHUNK_BYTES`] written at a time, then let go
    /// before the next chunk, which starts after the last name looked at: a shard's commits wait
    /// for at most one chunk. A device in several shards (another shard count before a restart,
    /// or a device whose address changed) has one view in each.
    pub fn visit_page(
        &self,
        page: &DevicePage,
        wanted: impl Fn(&ListedDevice) -> bool,
        mut visit: impl FnMut(&[ListedDevice]) -> ControlFlow<(), usize>,
    ) {
        let shards = self.shards();
        let mut visited = 0;
        // The last name the chunk before looked at (visited or not).
        let mut resume: Option<String> = None;
        while visited < page.limit {
            let mut guards: Vec<MutexGuard<Summary>> =
                shards.iter().map(|shard| lock(&shard.summary)).collect();
            for guard in &mut guards {
                guard.devices_by_name();
            }
            let summaries: Vec<&Summary> = guards.iter().map(|guard| &**guard).collect();
            // Per shard, the position in name order of its next name: the first with the
            // prefix, or the first after the cursor (the page's, or the chunk before's last
            // name) if that is further on; names with the prefix are contiguous in name order.
            let mut next: Vec<usize> = summaries
                .iter()
                .map(|summary| {
                    let name = |&index: &u32| summary.device_states[index as usize].name.as_str();
                    let by_name = &summary.by_name;
                    let mut start = by_name.partition_point(|index| name(index) < page.prefix);
                    if let Some(after) = resume.as_deref().or(page.after) {
                        start = start.max(by_name.partition_point(|index| name(index) <= after));
                    }
                    start
                })
                .collect();
            let state = |shard: usize, position: usize| -> Option<&DeviceState> {
                let summary = summaries[shard];
                let state = &summary.device_states[*summary.by_name.get(position)? as usize];
                state.name.starts_with(page.prefix).then_some(state)
            };
            let mut views: Vec<ListedDevice> = Vec::with_capacity(shards.len());
            let mut last: Option<&str> = None;
            let (mut looked_at, mut bytes) = (0, 0);
            while looked_at < LISTING_CHUNK_DEVICES
                && bytes < LISTING_CHUNK_BYTES
                && visited < page.limit
            {
                let Some(name) = (0..summaries.len())
                    .filter_map(|shard| state(shard, next[shard]))
                    .map(|state| state.name.as_str())
                    .min()
                else {
                    // Every shard's devices with the prefix looked at.
                    return;
                };
                views.clear();
                for (shard, summary) in summaries.iter().enumerate() {
                    if let Some(state) = state(shard, next[shard]).filter(|s| s.name == name) {
                        next[shard] += 1;
                        let view = ListedDevice { summary, state };
                        if wanted(&view) {
                            views.push(view);
                        }
                    }
                }
                if !views.is_empty() {
                    match visit(&views) {
                        ControlFlow::Continue(written) => bytes += written,
                        ControlFlow::Break(()) => return,
                    }
                    visited += 1;
                }
                looked_at += 1;
                last = Some(name);
            }
            resume = last.map(str::to_string);
        }
    }

    pub fn latest(&self, device: &str) -> Option<Vec<(String, f64, Value)>> {
        let mut merged: BTreeMap<String, (f64, Value)> = BTreeMap::new();
        for shard in self.shards() {
            let summary = lock(&shard.summary);
            let Some(state) = summary.device(device) else {
                continue;
            };
            for (name, &id) in &state.series {
                let Some(latest) = summary.get(id).and_then(|series| series.latest.as_ref()) else {
                    continue;
                };
                let newer = match merged.get(name) {
                    None => true,
                    Some((time, _)) => latest.time >= *time,
                };
                if newer {
                    merged.insert(name.clone(), (latest.time, latest.value.clone()));
                }
            }
        }
        if merged.is_empty() {
            return None;
        }
        Some(
            merged
                .into_iter()
                .map(|(name, (time, value))| (name, time, value))
                .collect(),
        )
    }

    /// Every point of a series in `[from, to)` in ascending time order (ties in write order);
    /// None for a series no shard knows. Collects the whole answer: large ranges should use
    /// [`Reader::scan`].
    pub fn series(
        &self,
        device: &str,
        name: &str,
        from: f64,
        to: f64,
    ) -> Result<Option<Vec<(f64, Value)>>, StoreError> {
        let Some(mut scan) = self.scan(device, name, from, to) else {
            return Ok(None);
        };
        let mut points = Vec::new();
        while let Some(chunk) = scan.next_chunk()? {
            points.extend(chunk);
        }
        Ok(Some(points))
    }

    /// A scan of a series' committed points in `[from, to)`, handed out in ascending time
    /// chunks of bounded size; None for a series no shard knows. The scan sees the segments and
    /// blocks published when it was made.
    pub fn scan(&self, device: &str, name: &str, from: f64, to: f64) -> Option<SeriesScan> {
        let mut seen = false;
        let mut sources = Vec::new();
        for shard in self.shards() {
            let id = {
                let summary = lock(&shard.summary);
                summary.find(device, name).map(|(id, _)| id)
            };
            let Some(id) = id else { continue };
            seen = true;
            for segment in read_segments(&shard).iter() {
                let window_start = segment.window_start as f64;
                let window_end = window_start + segment.partition_secs as f64;
                // A sealed segment's index says whether the series is in it at all.
                let may_hold = segment
                    .sealed
                    .get()
                    .is_none_or(|sealed| sealed.find(id).is_some());
                if window_start < to && window_end > from && may_hold {
                    sources.push((segment.clone(), id));
                }
            }
        }
        if !seen {
            return None;
        }
        // Chunks follow partition windows: a point belongs to the window of its own time, so a
        // chunk between two window edges reads only the segments of the windows around it.
        let mut edges: Vec<f64> = sources
            .iter()
            .flat_map(|(segment, _)| {
                let start = segment.window_start as f64;
                [start, start + segment.partition_secs as f64]
            })
            .map(|edge| edge.clamp(from, to))
            .collect();
        edges.sort_by(f64::total_cmp);
        edges.dedup();
        let ranges: Vec<(f64, f64)> = edges
            .windows(2)
            .rev()
            .map(|pair| (pair[0], pair[1]))
            .collect();
        Some(SeriesScan {
            backend: self.inner.backend.clone(),
            sources,
            ranges,
            points_max: SCAN_CHUNK_POINTS_MAX,
            records_scanned: 0,
        })
    }

    /// The series called `name` of every device whose id starts with `prefix` (every device for
    /// an empty prefix), over every shard, ready for a fleet-wide aggregate; None when no shard
    /// has one. Walks each shard's series index under its summary lock (one shard at a time).
    pub fn fleet(&self, name: &str, prefix: &str) -> Option<FleetScan> {
        let mut shards = Vec::new();
        let mut version = 0u64;
        for shard in self.shards() {
            if let Some((found, changes)) = fleet::find_series(&shard, name, prefix) {
                shards.push(found);
                version = version.wrapping_add(changes);
            }
        }
        (!shards.is_empty()).then(|| FleetScan {
            backend: self.inner.backend.clone(),
            name: name.to_string(),
            shards,
            version,
        })
    }

    /// A number that grows whenever a commit adds to the series or retention drops from it
    /// (None: unknown series): it tells a query cache whether an answer can have changed.
    pub fn series_version(&self, device: &str, name: &str) -> Option<u64> {
        let mut total = None;
        for shard in self.shards() {
            let summary = lock(&shard.summary);
            if let Some((_, series)) = summary.find(device, name) {
                *total.get_or_insert(0) += series.changes;
            }
        }
        total
    }

    pub fn generation(&self) -> u64 {
        self.inner.generation.load(Ordering::Acquire)
    }

    pub fn durability(&self) -> Durability {
        self.inner.config.durability
    }
}

/// What one retention pass dropped.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RetentionReport {
    pub partitions: usize,
    pub segments: usize,
    pub points: u64,
    pub bytes: u64,
}

/// Drops partitions older than the retention horizon (docs/storage-format.md, "Retention").
#[derive(Clone)]
pub struct Retention {
    inner: Arc<Inner>,
}

impl Retention {
    /// Drops, in every shard, each partition directory whose segments' windows all ended at or
    /// before `horizon` (unix seconds). Ingestion waits only for a directory rename per
    /// partition; reading the dropped points and removing files happen outside the lock.
    pub fn drop_before(&self, horizon: i64) -> Result<RetentionReport, StoreError> {
        let mut report = RetentionReport::default();
        let backend = &*self.inner.backend;
        let shards: Vec<Arc<ShardShared>> =
            read_lock(&self.inner.shards).values().cloned().collect();
        for shard in shards {
            let mut renamed = Vec::new();
            {
                // Under the lock: no commit writes meanwhile, so the shard's last commit (below)
                // includes one written and not yet published.
                let _files = lock(&shard.files);
                // Partition windows with every segment expired.
                let mut by_window: BTreeMap<i64, Vec<Arc<SegmentShared>>> = BTreeMap::new();
                let mut keep: HashSet<i64> = HashSet::new();
                let segments = read_segments(&shard);
                // The shard's last commit on disk: recovery requires it to be whole, so none of
                // its partitions goes before the shard's next commit.
                let last_commit = segments
                    .iter()
                    .map(|segment| segment.last_commit.load(Ordering::Acquire))
                    .max()
                    .unwrap_or(0);
                for segment in segments.iter() {
                    let holds_last_commit = last_commit > 0
                        && segment.last_commit.load(Ordering::Acquire) == last_commit;
                    if writer::expired(segment.window_start, segment.partition_secs, horizon)
                        && !holds_last_commit
                    {
                        by_window
                            .entry(segment.window_start)
                            .or_default()
                            .push(segment.clone());
                    } else {
                        keep.insert(segment.window_start);
                    }
                }
                drop(segments);
                by_window.retain(|window, _| !keep.contains(window));
                shard.retention_floor.fetch_max(horizon, Ordering::AcqRel);
                if by_window.is_empty() {
                    continue;
                }
                for (window, segments) in &by_window {
                    let from = shard.dir.join(window.to_string());
                    let to = shard.dir.join(format!("{DROPPED_PREFIX}{window}"));
                    backend.rename(&from, &to).map_err(|error| {
                        StoreError::io("rename dropped partition", &from, error)
                    })?;
                    for segment in segments {
                        segment.dropped.store(true, Ordering::Release);
                    }
                    renamed.push((to, segments.clone()));
                }
                write_lock(&shard.segments)
                    .retain(|segment| !segment.dropped.load(Ordering::Acquire));
            }
            backend::sync_dir(backend, &shard.dir)?;
            for (dir, segments) in renamed {
                let mut dropped_points: HashMap<u32, u64> = HashMap::default();
                for segment in &segments {
                    let name = segment.path.file_name().unwrap_or_default();
                    let path = dir.join(name);
                    report.bytes += backend.len(&path).unwrap_or(0);
                    report.segments += 1;
                    if let Some(sealed) = segment.sealed.get() {
                        for entry in &sealed.series {
                            *dropped_points.entry(entry.id).or_default() += entry.points;
                        }
                        continue;
                    }
                    if let Ok(LoadedFile::Valid { bytes, scan, .. }) =
                        load_file(backend, &path, FileKind::Segment)
                    {
                        let published = segment.published_len.load(Ordering::Acquire);
                        for frame in scan.frames.iter().filter(|frame| {
                            frame.header.kind == format::FrameKind::Block
                                && frame.end() <= published
                        }) {
                            if let Ok(block) = format::access_block(payload_of(&bytes, frame)) {
                                for id in block.series.iter() {
                                    *dropped_points.entry(id.to_native()).or_default() += 1;
                                }
                            }
                        }
                    }
                }
                if let Some(segment) = segments.first() {
                    lock(&shard.summary).remove_points(
                        &dropped_points,
                        segment.window_start,
                        segment.partition_secs,
                    );
                }
                report.points += dropped_points.values().sum::<u64>();
                report.partitions += 1;
                backend
                    .remove_dir_all(&dir)
                    .map_err(|error| StoreError::io("remove dropped partition", &dir, error))?;
            }
            backend::sync_dir(backend, &shard.dir)?;
        }
        if report.partitions > 0 {
            self.inner.generation.fetch_add(1, Ordering::AcqRel);
        }
        Ok(report)
    }
}

/// Points one scan chunk holds before its time range is split in two: bounds the memory of a
/// query however large its range (about 40 bytes a numeric point, so about 10 MiB).
pub const SCAN_CHUNK_POINTS_MAX: usize = 256 * 1024;

/// Devices a listing (`/v1/devices`, `/v1/latest`) looks at per lock of a shard's summary.
pub const LISTING_CHUNK_DEVICES: usize = 1024;

/// Bytes a listing writes per lock of the shards' summaries (a chunk ends early when its
/// devices hold large values: a value is up to `VALUE_BYTES_MAX`, 1 MiB).
pub const LISTING_CHUNK_BYTES: usize = 1 << 20;

/// A series scan in progress (see [`Reader::scan`]).
pub struct SeriesScan {
    backend: Arc<dyn Backend>,
    /// Segments whose window overlaps the range, each with the series' id in its shard.
    sources: Vec<(Arc<SegmentShared>, u32)>,
    /// Time ranges still to read, the earliest last.
    ranges: Vec<(f64, f64)>,
    points_max: usize,
    records_scanned: u64,
}

impl SeriesScan {
    /// The next chunk of points in ascending time order (ties in write order), None at the end.
    /// A chunk holds at most [`SCAN_CHUNK_POINTS_MAX`] points unless more share one time.
    pub fn next_chunk(&mut self) -> Result<Option<Vec<(f64, Value)>>, StoreError> {
        while let Some((from, to)) = self.ranges.pop() {
            let mut points = Vec::new();
            let complete = self.read(from, to, &mut points)?;
            if !complete {
                let middle = from + (to - from) / 2.0;
                if middle > from && middle < to {
                    self.ranges.push((middle, to));
                    self.ranges.push((from, middle));
                    continue;
                }
                // Every point at one time: the chunk cannot be split, read it whole.
                points.clear();
                let points_max = std::mem::replace(&mut self.points_max, usize::MAX);
                let read = self.read(from, to, &mut points);
                self.points_max = points_max;
                read?;
            }
            if points.is_empty() {
                continue;
            }
            points.sort_by(|a, b| a.0.total_cmp(&b.0));
            return Ok(Some(points));
        }
        Ok(None)
    }

    /// Splits chunks at `points_max` points instead of [`SCAN_CHUNK_POINTS_MAX`].
    pub fn chunk_points_max(mut self, points_max: usize) -> SeriesScan {
        self.points_max = points_max;
        self
    }

    /// Records looked at so far (of every series in the blocks read).
    pub fn records_scanned(&self) -> u64 {
        self.records_scanned
    }

    /// The blocks of `source` (or of the sealed file that replaced it) that may hold points of
    /// series `id` in `[from, to)`, with a map covering them; None if there are none (or
    /// retention dropped the segment). Of a sealed file, only the series' own frames.
    #[allow(clippy::type_complexity)]
    fn blocks_of(
        &self,
        source: &Arc<SegmentShared>,
        id: u32,
        from: f64,
        to: f64,
    ) -> Result<Option<(Arc<SegmentShared>, Vec<BlockMeta>, Arc<FileBytes>)>, StoreError> {
        let mut segment = source.clone();
        // At most two rounds: a segment sealed while this scan runs has one successor, which
        // is sealed and has none.
        for _ in 0..2 {
            if let Some(next) = segment.successor.get() {
                segment = next.clone();
            }
            let overlaps = |block: &&BlockMeta| block.min_time < to && block.max_time >= from;
            let blocks: Vec<BlockMeta> = {
                let all = read_lock(&segment.blocks);
                match segment.sealed.get() {
                    Some(sealed) => match sealed.find(id) {
                        Some(entry) => {
                            let first = entry.first as usize;
                            let end = (first + entry.frames as usize).min(all.len());
                            all[first.min(end)..end]
                                .iter()
                                .filter(overlaps)
                                .copied()
                                .collect()
                        }
                        None => Vec::new(),
                    },
                    None => all.iter().filter(overlaps).copied().collect(),
                }
            };
            let Some(last) = blocks
                .iter()
                .map(|block| block.payload_offset + block.payload_len as u64)
                .max()
            else {
                return Ok(None);
            };
            match segment.map(&*self.backend, last) {
                Ok(map) => return Ok(Some((segment, blocks, map))),
                // Retention dropped it since the scan was made: it is gone for queries.
                Err(_) if segment.dropped.load(Ordering::Acquire) => return Ok(None),
                // Sealed meanwhile, and the segment file removed: read the sealed file.
                Err(_) if segment.successor.get().is_some() => continue,
                Err(error) => return Err(error),
            }
        }
        Ok(None)
    }

    /// Appends the points in `[from, to)`; false when there are more than `points_max`.
    fn read(
        &mut self,
        from: f64,
        to: f64,
        points: &mut Vec<(f64, Value)>,
    ) -> Result<bool, StoreError> {
        for (source, id) in &self.sources {
            let window_start = source.window_start as f64;
            let window_end = window_start + source.partition_secs as f64;
            if !(window_start < to && window_end > from) {
                continue;
            }
            let Some((segment, blocks, map)) = self.blocks_of(source, *id, from, to)? else {
                continue;
            };
            for block in blocks {
                let start = block.payload_offset as usize;
                let payload = &map[start..start + block.payload_len as usize];
                let records =
                    format::access_block(payload).map_err(|reason| StoreError::Corrupt {
                        path: segment.path.clone(),
                        offset: block.payload_offset,
                        reason,
                    })?;
                self.records_scanned += block.count as u64;
                let whole = block.min_time >= from && block.max_time < to;
                let times = records.times.as_slice();
                let values = records.values.as_slice();
                for (index, series) in records.series.iter().enumerate() {
                    if series.to_native() != *id {
                        continue;
                    }
                    let time = times[index].to_native();
                    if whole || (time >= from && time < to) {
                        points.push((time, archived_value(&values[index])));
                    }
                }
                if points.len() > self.points_max {
                    return Ok(false);
                }
            }
        }
        Ok(true)
    }
}
