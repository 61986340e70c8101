//! Test backends (docs/storage-format.md, "How the argument is tested"):
//!
//! - [`SimDisk`]: an in-memory disk that records, per file, which bytes were written and which
//!   were made durable (`fdatasync`), and, per directory, which entries were created, renamed or
//!   removed since its last `fsync`. [`SimDisk::crash`] builds the disk a power loss at that
//!   moment could leave: durable state kept, each unsynced operation kept or lost, unsynced
//!   writes torn at 512-byte sector granularity. [`SimDisk::crash_after_ops`] stops the disk
//!   after any number of operations (later ones fail), so a test can crash after every write.
//! - [`FaultyDisk`]: wraps a backend and fails I/O after a countdown (ENOSPC or EIO), once or
//!   until healed.
//!
//! Neither is used by sluiced; both are public for the storage crate's tests.

use std::collections::{BTreeMap, HashMap};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

use rkyv::util::AlignedVec;

use crate::backend::{Backend, DirEntry, FileBytes, StorageFile};
use crate::StoreError;

/// What a sector is: the unit a torn write keeps or loses.
pub const SECTOR_BYTES: u64 = 512;

/// Which unsynced operations a crash image keeps.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Loss {
    /// A process crash: the kernel keeps everything written (the page cache survives).
    KeepAll,
    /// A power loss that keeps nothing that was not made durable.
    LoseAll,
    /// A power loss that keeps any subset: each unsynced namespace change kept or lost, each
    /// unsynced write kept, lost, or torn sector by sector (lost sectors past the old end may
    /// read as zeros), each unsynced truncation kept or lost.
    Torn,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Node {
    Dir,
    File(usize),
}

#[derive(Clone, Debug)]
enum DataOp {
    Write { offset: u64, bytes: Vec<u8> },
    SetLen(u64),
}

#[derive(Clone, Debug, Default)]
struct Inode {
    durable: Vec<u8>,
    volatile: Vec<u8>,
    /// Writes and truncations since the last fdatasync, in order.
    unsynced: Vec<DataOp>,
}

#[derive(Clone, Debug)]
enum NsKind {
    Create(PathBuf, Node),
    Remove(PathBuf),
    Rename(PathBuf, PathBuf),
}

#[derive(Clone, Debug)]
struct NsOp {
    kind: NsKind,
    /// Directories whose fsync makes the change durable.
    parents: Vec<PathBuf>,
    durable: bool,
}

#[derive(Default)]
struct SimState {
    inodes: Vec<Inode>,
    /// The namespace as of the oldest change not yet durable (the root `/` is implicit).
    base: BTreeMap<PathBuf, Node>,
    /// Namespace changes after `base`, in order.
    log: Vec<NsOp>,
    /// The namespace as the running process sees it.
    volatile: BTreeMap<PathBuf, Node>,
    /// Mutating operations done.
    ops: u64,
    crash_after: Option<u64>,
    crashed: bool,
}

/// An in-memory disk that knows what is durable (see the module documentation). Cheap to clone
/// (clones share the disk).
#[derive(Clone, Default)]
pub struct SimDisk {
    state: Arc<Mutex<SimState>>,
}

fn crashed_error() -> io::Error {
    io::Error::other("simulated crash: the disk is gone")
}

fn not_found(path: &Path) -> io::Error {
    io::Error::new(
        io::ErrorKind::NotFound,
        format!("{}: no such file or directory", path.display()),
    )
}

fn is_root(path: &Path) -> bool {
    path.parent().is_none()
}

fn parent_of(path: &Path) -> PathBuf {
    path.parent().map(Path::to_path_buf).unwrap_or_default()
}

fn is_dir_in(namespace: &BTreeMap<PathBuf, Node>, path: &Path) -> bool {
    is_root(path) || namespace.get(path) == Some(&Node::Dir)
}

/// Entries at `path` and below it.
fn subtree(namespace: &BTreeMap<PathBuf, Node>, path: &Path) -> Vec<PathBuf> {
    namespace
        .range(path.to_path_buf()..)
        .take_while(|(entry, _)| entry.starts_with(path))
        .map(|(entry, _)| entry.clone())
        .collect()
}

/// Applies a namespace change; false (and no change) when it does not apply.
fn apply(namespace: &mut BTreeMap<PathBuf, Node>, kind: &NsKind) -> bool {
    match kind {
        NsKind::Create(path, node) => {
            if !is_dir_in(namespace, &parent_of(path)) {
                return false;
            }
            namespace.insert(path.clone(), *node);
            true
        }
        NsKind::Remove(path) => {
            let entries = subtree(namespace, path);
            for entry in &entries {
                namespace.remove(entry);
            }
            !entries.is_empty()
        }
        NsKind::Rename(from, to) => {
            if !namespace.contains_key(from) || !is_dir_in(namespace, &parent_of(to)) {
                return false;
            }
            for entry in subtree(namespace, to) {
                namespace.remove(&entry);
            }
            for entry in subtree(namespace, from) {
                if let Some(node) = namespace.remove(&entry) {
                    let rest = entry.strip_prefix(from).unwrap_or(Path::new(""));
                    let moved = if rest.as_os_str().is_empty() {
                        to.clone()
                    } else {
                        to.join(rest)
                    };
                    namespace.insert(moved, node);
                }
            }
            true
        }
    }
}

/// splitmix64: the crash images' choices, reproducible from a seed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// Writes `bytes` at `offset` into `content`, zero-filling a gap.
fn write_into(content: &mut Vec<u8>, offset: u64, bytes: &[u8]) {
    let start = offset as usize;
    let end = start + bytes.len();
    if content.len() < end {
        content.resize(end, 0);
    }
    content[start..end].copy_from_slice(bytes);
}

impl Inode {
    /// The file as a crash could leave it.
    fn image(&self, loss: Loss, rng: &mut Rng) -> Vec<u8> {
        let mut content = self.durable.clone();
        for op in &self.unsynced {
            match op {
                DataOp::SetLen(len) => {
                    if keep(loss, rng) {
                        content.resize(*len as usize, 0);
                    }
                }
                DataOp::Write { offset, bytes } => match loss {
                    Loss::KeepAll => write_into(&mut content, *offset, bytes),
                    Loss::LoseAll => {}
                    Loss::Torn => match rng.below(3) {
                        0 => write_into(&mut content, *offset, bytes),
                        1 => {}
                        _ => {
                            // Torn: each sector of the write new, old, or (past the end) zero.
                            let end = offset + bytes.len() as u64;
                            let mut at = *offset;
                            while at < end {
                                let piece_end = ((at / SECTOR_BYTES + 1) * SECTOR_BYTES).min(end);
                                let piece =
                                    &bytes[(at - offset) as usize..(piece_end - offset) as usize];
                                match rng.below(3) {
                                    0 => write_into(&mut content, at, piece),
                                    1 => {}
                                    _ => {
                                        if content.len() < piece_end as usize {
                                            content.resize(piece_end as usize, 0);
                                        }
                                    }
                                }
                                at = piece_end;
                            }
                        }
                    },
                },
            }
        }
        content
    }
}

fn keep(loss: Loss, rng: &mut Rng) -> bool {
    match loss {
        Loss::KeepAll => true,
        Loss::LoseAll => false,
        Loss::Torn => rng.below(2) == 0,
    }
}

impl SimState {
    /// Counts a mutating operation, or fails it once the disk has crashed.
    fn begin(&mut self) -> io::Result<()> {
        if self.crashed {
            return Err(crashed_error());
        }
        if self.crash_after == Some(self.ops) {
            self.crashed = true;
            return Err(crashed_error());
        }
        self.ops += 1;
        Ok(())
    }

    fn change(&mut self, kind: NsKind) -> io::Result<()> {
        let parents = match &kind {
            NsKind::Create(path, _) | NsKind::Remove(path) => vec![parent_of(path)],
            NsKind::Rename(from, to) => vec![parent_of(from), parent_of(to)],
        };
        apply(&mut self.volatile, &kind);
        self.log.push(NsOp {
            kind,
            parents,
            durable: false,
        });
        Ok(())
    }

    fn file(&self, path: &Path) -> io::Result<usize> {
        match self.volatile.get(path) {
            Some(Node::File(inode)) => Ok(*inode),
            Some(Node::Dir) => Err(io::Error::other(format!(
                "{}: is a directory",
                path.display()
            ))),
            None => Err(not_found(path)),
        }
    }

    fn write(&mut self, inode: usize, bytes: &[u8], offset: u64) -> io::Result<()> {
        self.begin()?;
        let file = &mut self.inodes[inode];
        write_into(&mut file.volatile, offset, bytes);
        file.unsynced.push(DataOp::Write {
            offset,
            bytes: bytes.to_vec(),
        });
        Ok(())
    }

    fn set_len(&mut self, inode: usize, len: u64) -> io::Result<()> {
        self.begin()?;
        let file = &mut self.inodes[inode];
        file.volatile.resize(len as usize, 0);
        file.unsynced.push(DataOp::SetLen(len));
        Ok(())
    }

    fn sync_data(&mut self, inode: usize) -> io::Result<()> {
        self.begin()?;
        let file = &mut self.inodes[inode];
        file.durable = file.volatile.clone();
        file.unsynced.clear();
        Ok(())
    }
}

struct SimFile {
    state: Arc<Mutex<SimState>>,
    inode: usize,
}

fn lock(state: &Mutex<SimState>) -> MutexGuard<'_, SimState> {
    state
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl StorageFile for SimFile {
    fn write_all_at(&self, bytes: &[u8], offset: u64) -> io::Result<()> {
        lock(&self.state).write(self.inode, bytes, offset)
    }
    fn set_len(&self, len: u64) -> io::Result<()> {
        lock(&self.state).set_len(self.inode, len)
    }
    fn sync_data(&self) -> io::Result<()> {
        lock(&self.state).sync_data(self.inode)
    }
}

impl SimDisk {
    /// An empty disk (only the root directory `/`).
    pub fn new() -> SimDisk {
        SimDisk::default()
    }

    fn state(&self) -> MutexGuard<'_, SimState> {
        lock(&self.state)
    }

    /// Mutating operations (create, write, truncate, sync, rename, remove, mkdir) done so far.
    pub fn ops(&self) -> u64 {
        self.state().ops
    }

    /// After `ops` more mutating operations in total (counted from the disk's creation), the disk
    /// crashes: that operation and every later one fails. [`SimDisk::crash`] then gives the disk
    /// as the crash left it.
    pub fn crash_after_ops(&self, ops: u64) {
        self.state().crash_after = Some(ops);
    }

    /// Whether the disk has crashed (see [`SimDisk::crash_after_ops`]).
    pub fn crashed(&self) -> bool {
        self.state().crashed
    }

    /// A new disk holding what a crash now would leave: everything durable, and of the rest
    /// what `loss` says (choices drawn from `seed`).
    pub fn crash(&self, loss: Loss, seed: u64) -> SimDisk {
        let state = self.state();
        let mut rng = Rng(seed);
        let mut namespace = state.base.clone();
        for op in &state.log {
            if op.durable || keep(loss, &mut rng) {
                apply(&mut namespace, &op.kind);
            }
        }
        // Entries whose directory did not survive are unreachable.
        let reachable: Vec<(PathBuf, Node)> = namespace
            .iter()
            .filter(|(path, _)| {
                path.ancestors()
                    .skip(1)
                    .all(|ancestor| is_dir_in(&namespace, ancestor))
            })
            .map(|(path, node)| (path.clone(), *node))
            .collect();
        let mut images: HashMap<usize, usize> = HashMap::new();
        let mut inodes = Vec::new();
        let mut tree = BTreeMap::new();
        for (path, node) in reachable {
            let node = match node {
                Node::Dir => Node::Dir,
                Node::File(old) => {
                    let new = *images.entry(old).or_insert_with(|| {
                        let content = state.inodes[old].image(loss, &mut rng);
                        inodes.push(Inode {
                            durable: content.clone(),
                            volatile: content,
                            unsynced: Vec::new(),
                        });
                        inodes.len() - 1
                    });
                    Node::File(new)
                }
            };
            tree.insert(path, node);
        }
        SimDisk {
            state: Arc::new(Mutex::new(SimState {
                inodes,
                base: tree.clone(),
                log: Vec::new(),
                volatile: tree,
                ..SimState::default()
            })),
        }
    }

    /// Every file under `root` with its current bytes (as the running process sees them).
    pub fn files(&self, root: &Path) -> BTreeMap<PathBuf, Vec<u8>> {
        let state = self.state();
        state
            .volatile
            .iter()
            .filter(|(path, _)| path.starts_with(root))
            .filter_map(|(path, node)| match node {
                Node::File(inode) => Some((path.clone(), state.inodes[*inode].volatile.clone())),
                Node::Dir => None,
            })
            .collect()
    }

    /// Writes the tree under `root` (as the running process sees it) into the real directory
    /// `dir` (for the offline tools, which work on real files).
    pub fn materialize(&self, root: &Path, dir: &Path) -> io::Result<()> {
        let state = self.state();
        for (path, node) in state.volatile.range(root.to_path_buf()..) {
            let Ok(rest) = path.strip_prefix(root) else {
                break;
            };
            let target = dir.join(rest);
            match node {
                Node::Dir => std::fs::create_dir_all(&target)?,
                Node::File(inode) => std::fs::write(&target, &state.inodes[*inode].volatile)?,
            }
        }
        Ok(())
    }
}

impl Backend for SimDisk {
    fn background_seals(&self) -> bool {
        false
    }

    fn create_dir(&self, path: &Path) -> io::Result<()> {
        let mut state = self.state();
        state.begin()?;
        if is_dir_in(&state.volatile, path) || state.volatile.contains_key(path) {
            return Err(io::Error::new(
                io::ErrorKind::AlreadyExists,
                format!("{}: exists", path.display()),
            ));
        }
        if !is_dir_in(&state.volatile, &parent_of(path)) {
            return Err(not_found(&parent_of(path)));
        }
        state.change(NsKind::Create(path.to_path_buf(), Node::Dir))
    }

    fn exists(&self, path: &Path) -> bool {
        is_root(path) || self.state().volatile.contains_key(path)
    }

    fn is_dir(&self, path: &Path) -> bool {
        is_dir_in(&self.state().volatile, path)
    }

    fn read_dir(&self, dir: &Path) -> io::Result<Vec<DirEntry>> {
        let state = self.state();
        if !is_dir_in(&state.volatile, dir) {
            return Err(not_found(dir));
        }
        Ok(state
            .volatile
            .range(dir.to_path_buf()..)
            .take_while(|(path, _)| path.starts_with(dir))
            .filter(|(path, _)| path.parent() == Some(dir))
            .filter_map(|(path, node)| {
                path.file_name().map(|name| DirEntry {
                    name: name.to_os_string(),
                    is_dir: *node == Node::Dir,
                })
            })
            .collect())
    }

    fn create(&self, path: &Path) -> io::Result<Arc<dyn StorageFile>> {
        let mut state = self.state();
        let inode = match state.volatile.get(path) {
            Some(Node::File(inode)) => {
                let inode = *inode;
                state.set_len(inode, 0)?;
                inode
            }
            Some(Node::Dir) => return Err(io::Error::other("is a directory")),
            None => {
                state.begin()?;
                if !is_dir_in(&state.volatile, &parent_of(path)) {
                    return Err(not_found(&parent_of(path)));
                }
                state.inodes.push(Inode::default());
                let inode = state.inodes.len() - 1;
                state.change(NsKind::Create(path.to_path_buf(), Node::File(inode)))?;
                inode
            }
        };
        Ok(Arc::new(SimFile {
            state: self.state.clone(),
            inode,
        }))
    }

    fn open(&self, path: &Path) -> io::Result<Arc<dyn StorageFile>> {
        let inode = self.state().file(path)?;
        Ok(Arc::new(SimFile {
            state: self.state.clone(),
            inode,
        }))
    }

    fn len(&self, path: &Path) -> io::Result<u64> {
        let state = self.state();
        let inode = state.file(path)?;
        Ok(state.inodes[inode].volatile.len() as u64)
    }

    fn read(&self, path: &Path) -> io::Result<FileBytes> {
        let state = self.state();
        let inode = state.file(path)?;
        let content = &state.inodes[inode].volatile;
        let mut bytes = AlignedVec::<16>::with_capacity(content.len());
        bytes.extend_from_slice(content);
        Ok(FileBytes::Read(bytes))
    }

    fn map(&self, path: &Path) -> io::Result<FileBytes> {
        self.read(path)
    }

    fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
        let mut state = self.state();
        state.begin()?;
        if !state.volatile.contains_key(from) {
            return Err(not_found(from));
        }
        if !is_dir_in(&state.volatile, &parent_of(to)) {
            return Err(not_found(&parent_of(to)));
        }
        state.change(NsKind::Rename(from.to_path_buf(), to.to_path_buf()))
    }

    fn remove_file(&self, path: &Path) -> io::Result<()> {
        let mut state = self.state();
        state.begin()?;
        state.file(path)?;
        state.change(NsKind::Remove(path.to_path_buf()))
    }

    fn remove_dir_all(&self, path: &Path) -> io::Result<()> {
        let mut state = self.state();
        state.begin()?;
        if state.volatile.get(path) != Some(&Node::Dir) {
            return Err(not_found(path));
        }
        state.change(NsKind::Remove(path.to_path_buf()))
    }

    fn sync_dir(&self, dir: &Path) -> io::Result<()> {
        let mut state = self.state();
        state.begin()?;
        if !is_dir_in(&state.volatile, dir) {
            return Err(not_found(dir));
        }
        for op in state.log.iter_mut() {
            if op.parents.iter().any(|parent| parent == dir) {
                op.durable = true;
            }
        }
        // Changes durable from the start of the log on are folded into the base.
        let durable = state.log.iter().take_while(|op| op.durable).count();
        let folded: Vec<NsOp> = state.log.drain(..durable).collect();
        for op in folded {
            apply(&mut state.base, &op.kind);
        }
        Ok(())
    }

    fn lock(&self, _dir: &Path) -> Result<Box<dyn std::any::Any + Send + Sync>, StoreError> {
        Ok(Box::new(()))
    }
}

/// The error a [`FaultyDisk`] injects.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fault {
    /// ENOSPC: the disk is full.
    NoSpace,
    /// EIO: the device failed.
    Io,
}

impl Fault {
    fn error(self) -> io::Error {
        io::Error::from_raw_os_error(match self {
            Fault::NoSpace => libc::ENOSPC,
            Fault::Io => libc::EIO,
        })
    }
}

#[derive(Default)]
struct FaultState {
    /// Operations still allowed before the fault.
    countdown: Option<u64>,
    fault: Option<Fault>,
    /// Once the fault happened, every later operation fails until `heal`.
    until_healed: bool,
    failing: bool,
    injected: u64,
}

impl FaultState {
    fn check(&mut self) -> io::Result<()> {
        let Some(fault) = self.fault else {
            return Ok(());
        };
        if self.failing {
            self.injected += 1;
            return Err(fault.error());
        }
        match self.countdown.as_mut() {
            Some(0) => {
                self.countdown = None;
                self.injected += 1;
                if self.until_healed {
                    self.failing = true;
                } else {
                    self.fault = None;
                }
                Err(fault.error())
            }
            Some(remaining) => {
                *remaining -= 1;
                Ok(())
            }
            None => Ok(()),
        }
    }
}

/// A backend that fails I/O after a countdown. The operations counted (and failed) are those
/// that change or sync something, and opening files: create, open, write, truncate, fdatasync,
/// mkdir, rename, remove, directory fsync. Reads never fail (a full disk still reads).
#[derive(Clone)]
pub struct FaultyDisk {
    inner: Arc<dyn Backend>,
    faults: Arc<Mutex<FaultState>>,
}

struct FaultyFile {
    inner: Arc<dyn StorageFile>,
    faults: Arc<Mutex<FaultState>>,
}

fn check(faults: &Mutex<FaultState>) -> io::Result<()> {
    faults
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
        .check()
}

impl StorageFile for FaultyFile {
    fn write_all_at(&self, bytes: &[u8], offset: u64) -> io::Result<()> {
        check(&self.faults)?;
        self.inner.write_all_at(bytes, offset)
    }
    fn set_len(&self, len: u64) -> io::Result<()> {
        check(&self.faults)?;
        self.inner.set_len(len)
    }
    fn sync_data(&self) -> io::Result<()> {
        check(&self.faults)?;
        self.inner.sync_data()
    }
}

impl FaultyDisk {
    pub fn new(inner: Arc<dyn Backend>) -> FaultyDisk {
        FaultyDisk {
            inner,
            faults: Arc::default(),
        }
    }

    fn faults(&self) -> MutexGuard<'_, FaultState> {
        self.faults
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// The operation after the next `ops` counted operations fails with `fault` (0: the next
    /// one). With `until_healed`, every later operation fails too, until [`FaultyDisk::heal`].
    pub fn fail_after(&self, ops: u64, fault: Fault, until_healed: bool) {
        let mut faults = self.faults();
        faults.countdown = Some(ops);
        faults.fault = Some(fault);
        faults.until_healed = until_healed;
        faults.failing = false;
    }

    /// I/O works again (space returned); a fault still counting down is disarmed.
    pub fn heal(&self) {
        let mut faults = self.faults();
        faults.countdown = None;
        faults.fault = None;
        faults.failing = false;
    }

    /// Operations failed so far.
    pub fn injected(&self) -> u64 {
        self.faults().injected
    }

    fn wrap(&self, file: Arc<dyn StorageFile>) -> Arc<dyn StorageFile> {
        Arc::new(FaultyFile {
            inner: file,
            faults: self.faults.clone(),
        })
    }
}

impl Backend for FaultyDisk {
    fn background_seals(&self) -> bool {
        false
    }

    fn create_dir(&self, path: &Path) -> io::Result<()> {
        check(&self.faults)?;
        self.inner.create_dir(path)
    }
    fn exists(&self, path: &Path) -> bool {
        self.inner.exists(path)
    }
    fn is_dir(&self, path: &Path) -> bool {
        self.inner.is_dir(path)
    }
    fn read_dir(&self, dir: &Path) -> io::Result<Vec<DirEntry>> {
        self.inner.read_dir(dir)
    }
    fn create(&self, path: &Path) -> io::Result<Arc<dyn StorageFile>> {
        check(&self.faults)?;
        Ok(self.wrap(self.inner.create(path)?))
    }
    fn open(&self, path: &Path) -> io::Result<Arc<dyn StorageFile>> {
        check(&self.faults)?;
        Ok(self.wrap(self.inner.open(path)?))
    }
    fn len(&self, path: &Path) -> io::Result<u64> {
        self.inner.len(path)
    }
    fn read(&self, path: &Path) -> io::Result<FileBytes> {
        self.inner.read(path)
    }
    fn map(&self, path: &Path) -> io::Result<FileBytes> {
        self.inner.map(path)
    }
    fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
        check(&self.faults)?;
        self.inner.rename(from, to)
    }
    fn remove_file(&self, path: &Path) -> io::Result<()> {
        check(&self.faults)?;
        self.inner.remove_file(path)
    }
    fn remove_dir_all(&self, path: &Path) -> io::Result<()> {
        check(&self.faults)?;
        self.inner.remove_dir_all(path)
    }
    fn sync_dir(&self, dir: &Path) -> io::Result<()> {
        check(&self.faults)?;
        self.inner.sync_dir(dir)
    }
    fn lock(&self, dir: &Path) -> Result<Box<dyn std::any::Any + Send + Sync>, StoreError> {
        self.inner.lock(dir)
    }
}
