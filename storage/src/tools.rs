//! Offline inspection and verification (`sluice inspect`, `sluice verify`).

use std::fmt;
use std::path::{Path, PathBuf};

use crate::format::{self, FileKind};
use crate::store::{self, LoadedFile, DICTIONARY_FILE};
use crate::{Fs, StoreError};

/// One segment as `inspect` sees it.
#[derive(Clone, Debug, PartialEq)]
pub struct SegmentInspection {
    pub shard: u32,
    pub window_start: i64,
    /// Partition width recorded in the segment header (0 if the header is unreadable).
    pub partition_secs: u64,
    pub seq: u64,
    pub path: PathBuf,
    pub file_bytes: u64,
    pub blocks: u64,
    pub points: u64,
    /// Commit records, and the CoAP exchanges they acknowledge.
    pub commits: u64,
    pub exchanges: u64,
    pub min_time: Option<f64>,
    pub max_time: Option<f64>,
    /// Bytes after the last valid frame (a torn tail, or a live writer's in-flight commit).
    pub torn_bytes: u64,
    /// Invalid regions followed by valid frames.
    pub corrupt_regions: u64,
    /// A sealed file (immutable, series-major: `path` is the `.sealed` file; `blocks` counts
    /// its series frames).
    pub sealed: bool,
}

impl SegmentInspection {
    /// A file of `shard` before it is read: its size, nothing counted yet.
    fn new(shard: u32, window_start: i64, seq: u64, path: PathBuf) -> SegmentInspection {
        let file_bytes = std::fs::metadata(&path)
            .map(|metadata| metadata.len())
            .unwrap_or(0);
        SegmentInspection {
            shard,
            window_start,
            partition_secs: 0,
            seq,
            path,
            file_bytes,
            blocks: 0,
            points: 0,
            commits: 0,
            exchanges: 0,
            min_time: None,
            max_time: None,
            torn_bytes: 0,
            corrupt_regions: 0,
            sealed: false,
        }
    }

    pub fn bytes_per_point(&self) -> Option<f64> {
        (self.points > 0).then(|| self.file_bytes as f64 / self.points as f64)
    }
}

/// Reads a sealed file (docs/storage-format.md, "Sealed file") into `segment`, counting its
/// commits in `tally`; a file that is not a valid sealed file is a problem.
fn walk_sealed(
    path: &Path,
    shard: u32,
    known: &[bool],
    segment: &mut SegmentInspection,
    tally: &mut store::CommitTally,
    report: &mut VerifyReport,
    inspection: &mut Inspection,
) {
    let bytes = match std::fs::read(path) {
        Ok(bytes) => bytes,
        Err(error) => {
            return add_problem(report, inspection, path, 0, error.to_string(), false);
        }
    };
    let bytes = {
        let mut aligned = rkyv::util::AlignedVec::<16>::with_capacity(bytes.len());
        aligned.extend_from_slice(&bytes);
        aligned
    };
    let header = match format::FileHeader::decode(&bytes, FileKind::Sealed) {
        Ok(header) => header,
        Err(reason) => {
            return add_problem(
                report,
                inspection,
                path,
                0,
                format!("sealed file: {reason}"),
                false,
            );
        }
    };
    segment.partition_secs = header.partition_secs;
    if header.shard != shard
        || header.window_start != segment.window_start
        || header.seq != segment.seq
    {
        let what = format!(
            "header says shard {} window {} seq {}",
            header.shard, header.window_start, header.seq
        );
        add_problem(report, inspection, path, 0, what, false);
    }
    let scan = format::scan(&bytes, FileKind::Sealed, &mut format::validate_sealed_frame);
    segment.corrupt_regions = scan.holes.len() as u64;
    for (offset, len, reason) in &scan.holes {
        add_problem(
            report,
            inspection,
            path,
            *offset,
            format!("corrupt region of {len} bytes in a sealed file: {reason}"),
            false,
        );
    }
    let checked = match crate::sealed::check(&bytes, &scan) {
        Ok(checked) => checked,
        Err(reason) => {
            return add_problem(
                report,
                inspection,
                path,
                0,
                format!("sealed file: {reason}"),
                false,
            );
        }
    };
    segment.sealed = true;
    for commit in &checked.index.commits {
        tally.add_blocks(commit.commit_seq, commit.blocks);
    }
    let mut unknown = 0u64;
    for frame in &scan.frames {
        report.frames += 1;
        let start = frame.payload_offset() as usize;
        let payload = &bytes[start..start + frame.header.payload_len as usize];
        match frame.header.kind {
            format::FrameKind::Commit => {
                tally.add(frame, payload);
                segment.commits += 1;
                segment.exchanges += frame.header.count as u64;
            }
            format::FrameKind::Block => {
                segment.blocks += 1;
                segment.points += frame.header.count as u64;
                report.points += frame.header.count as u64;
                segment.min_time = Some(segment.min_time.map_or(frame.header.min_time, |time| {
                    time.min(frame.header.min_time)
                }));
                segment.max_time = Some(segment.max_time.map_or(frame.header.max_time, |time| {
                    time.max(frame.header.max_time)
                }));
                if let Ok(block) = format::access_block(payload) {
                    if let Some(id) = block.series.first() {
                        if !known.get(id.to_native() as usize).copied().unwrap_or(false) {
                            unknown += frame.header.count as u64;
                        }
                    }
                }
            }
            format::FrameKind::Index | format::FrameKind::Dictionary => {}
        }
    }
    if unknown > 0 {
        add_problem(
            report,
            inspection,
            path,
            0,
            format!("{unknown} records refer to series ids missing from the dictionary"),
            false,
        );
    }
}

/// What `inspect` found in a data directory.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Inspection {
    pub dir: PathBuf,
    /// (shard, series in its dictionary, dictionary bytes).
    pub dictionaries: Vec<(u32, u64, u64)>,
    /// Sorted by shard, window, seq.
    pub segments: Vec<SegmentInspection>,
    /// Files that could not be read as what their name says.
    pub problems: Vec<String>,
}

impl Inspection {
    pub fn blocks(&self) -> u64 {
        self.segments.iter().map(|segment| segment.blocks).sum()
    }
    pub fn points(&self) -> u64 {
        self.segments.iter().map(|segment| segment.points).sum()
    }
    pub fn bytes(&self) -> u64 {
        self.segments.iter().map(|segment| segment.file_bytes).sum()
    }
    pub fn partitions(&self) -> usize {
        let mut windows: Vec<(u32, i64)> = self
            .segments
            .iter()
            .map(|segment| (segment.shard, segment.window_start))
            .collect();
        windows.dedup();
        windows.len()
    }
}

fn time_text(time: Option<f64>) -> String {
    time.map_or_else(|| "-".to_string(), |time| format!("{time:.3}"))
}

impl fmt::Display for Inspection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "data directory {}", self.dir.display())?;
        for (shard, series, bytes) in &self.dictionaries {
            writeln!(
                f,
                "shard {shard}: {series} series in the dictionary ({bytes} bytes)"
            )?;
        }
        writeln!(
            f,
            "{:>5} {:>12} {:>6} {:>4} {:>12} {:>8} {:>10} {:>9} {:>12} {:>16} {:>16} {:>8}",
            "shard",
            "window",
            "width",
            "seq",
            "bytes",
            "blocks",
            "points",
            "exchanges",
            "bytes/point",
            "min time",
            "max time",
            "torn"
        )?;
        for segment in &self.segments {
            let per_point = segment
                .bytes_per_point()
                .map_or_else(|| "-".to_string(), |value| format!("{value:.1}"));
            writeln!(
                f,
                "{:>5} {:>12} {:>6} {:>4} {:>12} {:>8} {:>10} {:>9} {:>12} {:>16} {:>16} {:>8}{}",
                segment.shard,
                segment.window_start,
                segment.partition_secs,
                segment.seq,
                segment.file_bytes,
                segment.blocks,
                segment.points,
                segment.exchanges,
                per_point,
                time_text(segment.min_time),
                time_text(segment.max_time),
                segment.torn_bytes,
                match (segment.sealed, segment.corrupt_regions) {
                    (true, 0) => "  sealed".to_string(),
                    (true, regions) => format!("  sealed, {regions} corrupt regions"),
                    (false, 0) => String::new(),
                    (false, regions) => format!("  {regions} corrupt regions"),
                }
            )?;
        }
        let per_point = if self.points() > 0 {
            format!("{:.1}", self.bytes() as f64 / self.points() as f64)
        } else {
            "-".to_string()
        };
        writeln!(
            f,
            "total: {} partitions, {} segments, {} blocks, {} points, {} bytes, {} bytes per point",
            self.partitions(),
            self.segments.len(),
            self.blocks(),
            self.points(),
            self.bytes(),
            per_point
        )?;
        for problem in &self.problems {
            writeln!(f, "problem: {problem}")?;
        }
        Ok(())
    }
}

/// One thing `verify` found wrong.
#[derive(Clone, Debug, PartialEq)]
pub struct VerifyProblem {
    pub path: PathBuf,
    pub offset: u64,
    pub what: String,
    /// True when `--repair` fixed it (a torn tail cut, a torn creation removed).
    pub repaired: bool,
}

/// What `verify` checked and found.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct VerifyReport {
    pub files: usize,
    pub frames: u64,
    pub points: u64,
    pub problems: Vec<VerifyProblem>,
}

impl VerifyReport {
    /// No problem is left (problems fixed by repair do not count).
    pub fn is_clean(&self) -> bool {
        self.problems.iter().all(|problem| problem.repaired)
    }
}

impl fmt::Display for VerifyReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for problem in &self.problems {
            writeln!(
                f,
                "{}{} at byte {}: {}",
                if problem.repaired { "repaired: " } else { "" },
                problem.path.display(),
                problem.offset,
                problem.what
            )?;
        }
        write!(
            f,
            "checked {} files, {} frames, {} points: {}",
            self.files,
            self.frames,
            self.points,
            if self.is_clean() {
                "clean".to_string()
            } else {
                format!(
                    "{} problems",
                    self.problems
                        .iter()
                        .filter(|problem| !problem.repaired)
                        .count()
                )
            }
        )
    }
}

/// Reads every file of a data directory without taking the lock (works on a live directory or
/// a copy); with `repair`, cuts torn tails as recovery does.
fn walk(dir: &Path, repair: bool) -> Result<(Inspection, VerifyReport), StoreError> {
    let mut inspection = Inspection {
        dir: dir.to_path_buf(),
        ..Inspection::default()
    };
    let mut report = VerifyReport::default();
    for (shard, shard_dir) in store::list_shards(&Fs, dir)? {
        // Dictionary: ids known to this shard.
        let mut known: Vec<bool> = Vec::new();
        let dictionary_path = shard_dir.join(DICTIONARY_FILE);
        if dictionary_path.exists() {
            report.files += 1;
            match store::load_file(&Fs, &dictionary_path, FileKind::Dictionary) {
                Err(error) => add_problem(
                    &mut report,
                    &mut inspection,
                    &dictionary_path,
                    0,
                    error.to_string(),
                    false,
                ),
                Ok(LoadedFile::TornCreation { len, reason }) => {
                    if repair {
                        store::cut_file(&Fs, &dictionary_path, None)?;
                    }
                    add_problem(
                        &mut report,
                        &mut inspection,
                        &dictionary_path,
                        0,
                        format!("torn creation ({len} bytes): {reason}"),
                        repair,
                    );
                }
                Ok(LoadedFile::Valid {
                    header,
                    bytes,
                    scan,
                }) => {
                    if header.shard != shard {
                        add_problem(
                            &mut report,
                            &mut inspection,
                            &dictionary_path,
                            0,
                            format!("header says shard {}", header.shard),
                            false,
                        );
                    }
                    check_scan(
                        &mut report,
                        &dictionary_path,
                        bytes.len() as u64,
                        &scan,
                        repair,
                    )?;
                    let mut series = 0u64;
                    for frame in &scan.frames {
                        report.frames += 1;
                        let start = frame.payload_offset() as usize;
                        let payload = &bytes[start..start + frame.header.payload_len as usize];
                        let entries =
                            format::decode_dictionary(&frame.header, payload).unwrap_or_default();
                        for entry in entries {
                            let index = entry.id as usize;
                            if known.len() <= index {
                                known.resize(index + 1, false);
                            }
                            if known[index] {
                                add_problem(
                                    &mut report,
                                    &mut inspection,
                                    &dictionary_path,
                                    frame.offset,
                                    format!("series id {} defined twice", entry.id),
                                    false,
                                );
                            }
                            known[index] = true;
                            series += 1;
                        }
                    }
                    inspection
                        .dictionaries
                        .push((shard, series, scan.valid_end));
                }
            }
        }
        let mut tails: Vec<TailState> = Vec::new();
        let mut tally = store::CommitTally::default();
        for files in store::list_segments(&Fs, &shard_dir)? {
            let (window, seq, path) = (files.window, files.seq, files.path.clone());
            let old_seal = store::seal_path(&path);
            if old_seal.exists() {
                // Not a problem: a version 2 seal index, which the next open removes (the
                // segment is then sealed again, series-major).
                report.files += 1;
            }
            if files.sealed {
                report.files += 1;
                let sealed = store::sealed_path(&path);
                let mut segment = SegmentInspection::new(shard, window, seq, sealed.clone());
                walk_sealed(
                    &sealed,
                    shard,
                    &known,
                    &mut segment,
                    &mut tally,
                    &mut report,
                    &mut inspection,
                );
                let valid = segment.sealed;
                inspection.segments.push(segment);
                if valid && files.segment {
                    // A seal interrupted after its rename: the sealed file wins.
                    if repair {
                        store::cut_file(&Fs, &path, None)?;
                    }
                    add_problem(
                        &mut report,
                        &mut inspection,
                        &path,
                        0,
                        "segment left beside its sealed file (the next open removes it)"
                            .to_string(),
                        repair,
                    );
                }
                if valid || !files.segment {
                    continue;
                }
            }
            report.files += 1;
            let mut segment = SegmentInspection::new(shard, window, seq, path.clone());
            match store::load_file(&Fs, &path, FileKind::Segment) {
                Err(error) => add_problem(
                    &mut report,
                    &mut inspection,
                    &path,
                    0,
                    error.to_string(),
                    false,
                ),
                Ok(LoadedFile::TornCreation { len, reason }) => {
                    segment.torn_bytes = len;
                    if repair {
                        store::cut_file(&Fs, &path, None)?;
                    }
                    add_problem(
                        &mut report,
                        &mut inspection,
                        &path,
                        0,
                        format!("torn creation ({len} bytes): {reason}"),
                        repair,
                    );
                }
                Ok(LoadedFile::Valid {
                    header,
                    bytes,
                    scan,
                }) => {
                    segment.partition_secs = header.partition_secs;
                    if header.shard != shard || header.window_start != window || header.seq != seq {
                        let what = format!(
                            "header says shard {} window {} seq {}",
                            header.shard, header.window_start, header.seq
                        );
                        add_problem(&mut report, &mut inspection, &path, 0, what, false);
                    }
                    segment.torn_bytes = (bytes.len() as u64).saturating_sub(scan.valid_end);
                    segment.corrupt_regions = scan.holes.len() as u64;
                    check_scan(&mut report, &path, bytes.len() as u64, &scan, repair)?;
                    let mut unknown = 0u64;
                    if let Some(last) = scan.frames.last() {
                        // Where the segment's last commit starts (its frames end the file).
                        let seq = last.header.commit_seq;
                        if let Some(first) = scan
                            .frames
                            .iter()
                            .find(|frame| frame.header.commit_seq == seq)
                        {
                            tails.push(TailState {
                                path: path.clone(),
                                seq,
                                first_offset: first.offset,
                            });
                        }
                    }
                    for frame in &scan.frames {
                        report.frames += 1;
                        let start = frame.payload_offset() as usize;
                        tally.add(
                            frame,
                            &bytes[start..start + frame.header.payload_len as usize],
                        );
                        if frame.header.kind == format::FrameKind::Commit {
                            segment.commits += 1;
                            segment.exchanges += frame.header.count as u64;
                            continue;
                        }
                        segment.blocks += 1;
                        segment.points += frame.header.count as u64;
                        report.points += frame.header.count as u64;
                        segment.min_time =
                            Some(segment.min_time.map_or(frame.header.min_time, |time: f64| {
                                time.min(frame.header.min_time)
                            }));
                        segment.max_time =
                            Some(segment.max_time.map_or(frame.header.max_time, |time: f64| {
                                time.max(frame.header.max_time)
                            }));
                        let start = frame.payload_offset() as usize;
                        let payload = &bytes[start..start + frame.header.payload_len as usize];
                        if let Ok(block) = format::access_block(payload) {
                            unknown += block
                                .series
                                .iter()
                                .filter(|id| {
                                    !known.get(id.to_native() as usize).copied().unwrap_or(false)
                                })
                                .count() as u64;
                        }
                    }
                    if unknown > 0 {
                        add_problem(
                            &mut report,
                            &mut inspection,
                            &path,
                            0,
                            format!(
                                "{unknown} records refer to series ids missing from the dictionary"
                            ),
                            false,
                        );
                    }
                }
            }
            inspection.segments.push(segment);
        }
        // Earlier commits cannot be torn by a crash under --durability fsync; recovery serves
        // none of an incomplete commit's frames.
        if let Some(last) = tally.last().filter(|&last| !tally.complete_as_last(last)) {
            check_last_commit(
                &mut report,
                &mut inspection,
                &shard_dir,
                &tally,
                &tails,
                repair,
            )?;
            tally.remove(last);
        }
        for (seq, blocks, record) in tally.incomplete() {
            add_problem(
                &mut report,
                &mut inspection,
                &shard_dir,
                0,
                format!(
                    "incomplete commit {seq} ({blocks} blocks found, commit record {}): none of its readings is served (media corruption, or a power loss under --durability os)",
                    record.map_or("missing".to_string(), |count| format!("counts {count}"))
                ),
                false,
            );
        }
    }
    Ok((inspection, report))
}

/// The frames of a segment's last commit (a suffix of the file).
struct TailState {
    path: PathBuf,
    seq: u64,
    first_offset: u64,
}

/// A shard's last commit must have its commit record and every block it counts (in segments
/// and sealed files); otherwise it was torn by a crash before it was acknowledged, and repair
/// cuts its frames at the segments' tails as recovery does.
fn check_last_commit(
    report: &mut VerifyReport,
    inspection: &mut Inspection,
    shard_dir: &Path,
    tally: &store::CommitTally,
    tails: &[TailState],
    repair: bool,
) -> Result<(), StoreError> {
    let Some(last) = tally.last() else {
        return Ok(());
    };
    let (blocks, record_blocks) = tally.counts(last).unwrap_or((0, None));
    let what = format!(
        "incomplete last commit {last} ({blocks} blocks, commit record {}): torn by a crash before it was acknowledged",
        record_blocks.map_or("missing".to_string(), |count| format!("counts {count}"))
    );
    let mut cut_any = false;
    for tail in tails.iter().filter(|tail| tail.seq == last) {
        cut_any = true;
        if repair {
            let len = std::fs::metadata(&tail.path)
                .map_err(|error| StoreError::io("stat", &tail.path, error))?
                .len();
            if len > tail.first_offset {
                store::cut_file(&Fs, &tail.path, Some(tail.first_offset))?;
            }
        }
        add_problem(
            report,
            inspection,
            &tail.path,
            tail.first_offset,
            what.clone(),
            repair,
        );
    }
    if !cut_any {
        // Only in sealed files, which are never cut.
        add_problem(report, inspection, shard_dir, 0, what, false);
    }
    Ok(())
}

fn add_problem(
    report: &mut VerifyReport,
    inspection: &mut Inspection,
    path: &Path,
    offset: u64,
    what: String,
    repaired: bool,
) {
    inspection
        .problems
        .push(format!("{} at byte {offset}: {what}", path.display()));
    report.problems.push(VerifyProblem {
        path: path.to_path_buf(),
        offset,
        what,
        repaired,
    });
}

fn check_scan(
    report: &mut VerifyReport,
    path: &Path,
    len: u64,
    scan: &format::Scan,
    repair: bool,
) -> Result<(), StoreError> {
    for (offset, bytes, reason) in &scan.holes {
        report.problems.push(VerifyProblem {
            path: path.to_path_buf(),
            offset: *offset,
            what: format!("corrupt region of {bytes} bytes followed by valid frames: {reason}"),
            repaired: false,
        });
    }
    if scan.valid_end < len {
        if repair {
            store::cut_file(&Fs, path, Some(scan.valid_end))?;
        }
        report.problems.push(VerifyProblem {
            path: path.to_path_buf(),
            offset: scan.valid_end,
            what: format!(
                "torn tail of {} bytes ({})",
                len - scan.valid_end,
                scan.tail_reason.as_deref().unwrap_or("invalid frame")
            ),
            repaired: repair,
        });
    }
    Ok(())
}

/// Per partition and segment: blocks, points, bytes, min/max time, bytes per point. Does not
/// take the lock: works on a live data directory (an in-flight commit may show as torn bytes)
/// and on a copy.
pub fn inspect(dir: &Path) -> Result<Inspection, StoreError> {
    if !dir.is_dir() {
        return Err(StoreError::io(
            "inspect",
            dir,
            std::io::Error::new(std::io::ErrorKind::NotFound, "not a directory"),
        ));
    }
    walk(dir, false).map(|(inspection, _)| inspection)
}

/// Checks every header, frame checksum, block and dictionary entry, and every record's series
/// id. With `repair`, takes the lock (fails with `Locked` while sluiced runs) and cuts torn
/// tails and torn creations as recovery does; corrupt regions followed by valid data are
/// reported, not repaired.
pub fn verify(dir: &Path, repair: bool) -> Result<VerifyReport, StoreError> {
    if !dir.is_dir() {
        return Err(StoreError::io(
            "verify",
            dir,
            std::io::Error::new(std::io::ErrorKind::NotFound, "not a directory"),
        ));
    }
    let _lock = if repair {
        Some(store::take_lock_for_repair(dir)?)
    } else {
        None
    };
    walk(dir, repair).map(|(_, report)| report)
}
