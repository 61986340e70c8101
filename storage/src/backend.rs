//! Storage I/O behind a trait: the store does every file and directory operation through a
//! [`Backend`], so tests can run it on a simulated disk that records what was made durable and
//! builds the files a crash would leave ([`crate::sim::SimDisk`]), or on one that fails I/O
//! after a countdown ([`crate::sim::FaultyDisk`]). Production uses [`Fs`], the real file system.
//!
//! The operations are the ones the store needs, with the durability each promises spelled out
//! (docs/storage-format.md, "What is assumed of the disk"). Costs: one indirect call per
//! operation, next to a system call of its own; file handles are shared (`Arc`), so handing a
//! commit's files to a sync thread or an io_uring costs no `dup(2)`.

use std::ffi::OsString;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::Arc;

use memmap2::Mmap;
use rkyv::util::AlignedVec;

use crate::format::FILE_HEADER_BYTES;
use crate::StoreError;

/// An open file of a [`Backend`], shared by the writer and the I/O of its commits.
pub trait StorageFile: Send + Sync {
    /// pwrite(2) of all of `bytes` at `offset` (the file grows as needed). Not durable until
    /// [`StorageFile::sync_data`] returns.
    fn write_all_at(&self, bytes: &[u8], offset: u64) -> io::Result<()>;
    /// ftruncate(2). Not durable until [`StorageFile::sync_data`] returns.
    fn set_len(&self, len: u64) -> io::Result<()>;
    /// fdatasync(2): the file's bytes and length are durable when it returns Ok. The file's
    /// directory entry is not: see [`Backend::sync_dir`].
    fn sync_data(&self) -> io::Result<()>;
    /// The file's descriptor, for a caller that submits its I/O itself (an io_uring); None for
    /// a file that is not a real one.
    fn raw_fd(&self) -> Option<RawFd> {
        None
    }
}

/// A directory entry as [`Backend::read_dir`] lists it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DirEntry {
    pub name: OsString,
    pub is_dir: bool,
}

/// A whole file's bytes: read into a 16-aligned buffer, or mapped (page aligned).
pub enum FileBytes {
    Read(AlignedVec<16>),
    Mapped(Mmap),
}

impl std::ops::Deref for FileBytes {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        match self {
            FileBytes::Read(bytes) => bytes,
            FileBytes::Mapped(map) => map,
        }
    }
}

/// The file system operations of the store. Paths are those the store builds from
/// `StoreConfig::dir`. Creating, renaming and removing an entry is durable only once
/// [`Backend::sync_dir`] of its parent directory returned.
pub trait Backend: Send + Sync {
    /// mkdir(2) of one directory whose parent exists.
    fn create_dir(&self, path: &Path) -> io::Result<()>;
    /// Whether the path exists (a file or a directory).
    fn exists(&self, path: &Path) -> bool;
    fn is_dir(&self, path: &Path) -> bool;
    /// The entries of a directory, in no particular order.
    fn read_dir(&self, dir: &Path) -> io::Result<Vec<DirEntry>>;
    /// Creates a file, or truncates it to 0 bytes if it exists, open for reading and writing.
    fn create(&self, path: &Path) -> io::Result<Arc<dyn StorageFile>>;
    /// Opens an existing file for reading and writing.
    fn open(&self, path: &Path) -> io::Result<Arc<dyn StorageFile>>;
    /// The file's current length in bytes.
    fn len(&self, path: &Path) -> io::Result<u64>;
    /// A copy of the whole file.
    fn read(&self, path: &Path) -> io::Result<FileBytes>;
    /// The whole file, possibly mapped: the caller makes sure no byte it reads is changed or cut
    /// while the map lives (segments are append-only; cuts never go below what readers read).
    fn map(&self, path: &Path) -> io::Result<FileBytes>;
    /// rename(2), atomic: after a crash the entry is at `from` or at `to`.
    fn rename(&self, from: &Path, to: &Path) -> io::Result<()>;
    fn remove_file(&self, path: &Path) -> io::Result<()>;
    fn remove_dir_all(&self, path: &Path) -> io::Result<()>;
    /// fsync(2) of a directory: the entries created, renamed or removed in it are durable.
    fn sync_dir(&self, dir: &Path) -> io::Result<()>;
    /// Takes the data directory's lock for as long as the returned guard lives.
    fn lock(&self, dir: &Path) -> Result<Box<dyn std::any::Any + Send + Sync>, StoreError>;
    /// Whether a commit's seal check may leave the seals to a sealing thread (docs/storage-
    /// format.md, "Sealing"). The simulated disks say no: their tests count operations in order.
    fn background_seals(&self) -> bool {
        true
    }
}

/// The real file system (production).
#[derive(Clone, Copy, Debug, Default)]
pub struct Fs;

struct RealFile(File);

impl StorageFile for RealFile {
    fn write_all_at(&self, bytes: &[u8], offset: u64) -> io::Result<()> {
        self.0.write_all_at(bytes, offset)
    }
    fn set_len(&self, len: u64) -> io::Result<()> {
        self.0.set_len(len)
    }
    fn sync_data(&self) -> io::Result<()> {
        self.0.sync_data()
    }
    fn raw_fd(&self) -> Option<RawFd> {
        Some(self.0.as_raw_fd())
    }
}

impl Backend for Fs {
    fn create_dir(&self, path: &Path) -> io::Result<()> {
        std::fs::create_dir(path)
    }
    fn exists(&self, path: &Path) -> bool {
        path.exists()
    }
    fn is_dir(&self, path: &Path) -> bool {
        path.is_dir()
    }
    fn read_dir(&self, dir: &Path) -> io::Result<Vec<DirEntry>> {
        let mut entries = Vec::new();
        for entry in std::fs::read_dir(dir)? {
            let entry = entry?;
            entries.push(DirEntry {
                is_dir: entry.path().is_dir(),
                name: entry.file_name(),
            });
        }
        Ok(entries)
    }
    fn create(&self, path: &Path) -> io::Result<Arc<dyn StorageFile>> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(path)?;
        Ok(Arc::new(RealFile(file)))
    }
    fn open(&self, path: &Path) -> io::Result<Arc<dyn StorageFile>> {
        let file = OpenOptions::new().read(true).write(true).open(path)?;
        Ok(Arc::new(RealFile(file)))
    }
    fn len(&self, path: &Path) -> io::Result<u64> {
        Ok(std::fs::metadata(path)?.len())
    }
    fn read(&self, path: &Path) -> io::Result<FileBytes> {
        let mut file = File::open(path)?;
        let len = file.metadata()?.len();
        let mut bytes = AlignedVec::<16>::with_capacity(len as usize);
        bytes.extend_from_reader(&mut file)?;
        Ok(FileBytes::Read(bytes))
    }
    fn map(&self, path: &Path) -> io::Result<FileBytes> {
        let file = File::open(path)?;
        // An empty file cannot be mapped; a file shorter than a header is read.
        if file.metadata()?.len() < FILE_HEADER_BYTES as u64 {
            return self.read(path);
        }
        // SAFETY: the caller guarantees (see the trait) that the bytes it reads are neither
        // changed nor cut while mapped.
        let map = unsafe { Mmap::map(&file) }?;
        Ok(FileBytes::Mapped(map))
    }
    fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
        std::fs::rename(from, to)
    }
    fn remove_file(&self, path: &Path) -> io::Result<()> {
        std::fs::remove_file(path)
    }
    fn remove_dir_all(&self, path: &Path) -> io::Result<()> {
        std::fs::remove_dir_all(path)
    }
    fn sync_dir(&self, dir: &Path) -> io::Result<()> {
        File::open(dir)?.sync_all()
    }
    fn lock(&self, dir: &Path) -> Result<Box<dyn std::any::Any + Send + Sync>, StoreError> {
        Ok(Box::new(crate::store::take_lock(dir)?))
    }
}

/// Creates `dir` and its missing ancestors, making each created entry durable in its parent
/// (outermost first) before returning.
pub(crate) fn create_dirs(backend: &dyn Backend, dir: &Path) -> Result<(), StoreError> {
    let missing: Vec<&Path> = dir
        .ancestors()
        .take_while(|ancestor| !ancestor.as_os_str().is_empty() && !backend.exists(ancestor))
        .collect();
    for created in missing.iter().rev() {
        match backend.create_dir(created) {
            Ok(()) => {}
            Err(error) if error.kind() == io::ErrorKind::AlreadyExists => {}
            Err(error) => return Err(StoreError::io("create directory", *created, error)),
        }
        if let Some(parent) = created.parent() {
            let parent = if parent.as_os_str().is_empty() {
                Path::new(".")
            } else {
                parent
            };
            sync_dir(backend, parent)?;
        }
    }
    Ok(())
}

pub(crate) fn sync_dir(backend: &dyn Backend, dir: &Path) -> Result<(), StoreError> {
    backend
        .sync_dir(dir)
        .map_err(|error| StoreError::io("fsync directory", dir, error))
}
