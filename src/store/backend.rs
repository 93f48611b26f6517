//! The small file-system surface the log needs, behind traits so that the property test can
//! swap in [`super::memfs::MemDir`], which loses or tears unsynced writes like a power cut.
//! [`DiskDir`] is the real one: glommio's io_uring `BufferedFile` for writes and fdatasync,
//! memmap2 for reads.
//!
//! We use `BufferedFile`, not `DmaFile`: O_DIRECT needs block-aligned buffers and offsets, and
//! our records are written from the very (unaligned, arbitrarily sized) buffers SMTP DATA was
//! read into; buffered writes also land in the page cache that the read-side mmap serves from.

use std::io;
use std::ops::Range;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use glommio::io::{BufferedFile, Directory, OpenOptions};

/// Read access to a segment's bytes that can outlive the store's handle on the file and cross
/// threads (a record handed to another shard keeps its mapping alive).
pub trait SegmentMap: Send + Sync {
    /// The mapped bytes (the whole file, as long as it was when mapped).
    fn bytes(&self) -> &[u8];
    /// Asks for `range` to be read ahead, so that touching it later does not stall the thread.
    fn prefetch(&self, _range: Range<usize>) {}
}

/// One segment file opened for appending.
#[allow(async_fn_in_trait)] // the store and its files live on one executor thread: no Send bound
pub trait SegmentFile {
    /// True when a mapping reflects later writes (a shared mmap); false when [`map`](Self::map)
    /// returns a snapshot, which the store then takes again for each read.
    const MAP_IS_LIVE: bool;
    /// Writes `buf` at `pos`; may write less than all of it, like `pwrite`.
    async fn write_at(&self, buf: Vec<u8>, pos: u64) -> io::Result<usize>;
    /// Makes every write completed before the call durable.
    async fn fdatasync(&self) -> io::Result<()>;
    /// Current file length.
    async fn len_bytes(&self) -> io::Result<u64>;
    /// Maps the first `len_bytes` bytes read-only.
    fn map(&self, len_bytes: u64) -> io::Result<Arc<dyn SegmentMap>>;
}

/// The directory holding one shard's segments.
#[allow(async_fn_in_trait)]
pub trait SegmentDir {
    /// The file type this directory opens.
    type File: SegmentFile;
    /// Names of the files in the directory (ours and anything else).
    async fn list(&self) -> io::Result<Vec<String>>;
    /// Creates a new file (failing if it exists) preallocated to `size_bytes` of zeros.
    async fn create(&self, name: &str, size_bytes: u64) -> io::Result<Self::File>;
    /// Opens an existing file for reading and writing.
    async fn open(&self, name: &str) -> io::Result<Self::File>;
    /// Renames a file, replacing nothing (durable only after [`sync`](Self::sync)).
    async fn rename(&self, from: &str, to: &str) -> io::Result<()>;
    /// Unlinks a file (durable only after [`sync`](Self::sync)).
    async fn remove(&self, name: &str) -> io::Result<()>;
    /// fsyncs the directory, making creations and removals durable.
    async fn sync(&self) -> io::Result<()>;
    /// Bytes available to unprivileged writers on the file system.
    fn free_space_bytes(&self) -> io::Result<u64>;
}

/// The directory holding `path`, whose sync makes `path`'s name durable ("." for a bare
/// relative name).
pub(crate) fn parent_dir(path: &Path) -> &Path {
    match path.parent() {
        Some(parent) if !parent.as_os_str().is_empty() => parent,
        _ => Path::new("."),
    }
}

/// A shard's segment directory on a real file system.
pub struct DiskDir {
    /// Where the segments live (`data_dir/shard-N`).
    path: PathBuf,
    /// Kept open for directory fsyncs.
    dir: Directory,
}

impl DiskDir {
    /// Opens `path`, creating it and any missing parents.
    pub async fn open(path: &Path) -> io::Result<DiskDir> {
        let mut missing = Vec::new();
        let mut cursor = Some(path);
        while let Some(at) = cursor {
            if at.as_os_str().is_empty() || at.exists() {
                break;
            }
            missing.push(at);
            cursor = at.parent();
        }
        for at in missing.into_iter().rev() {
            Directory::create(at).await?;
            // A new directory's name is durable only once its parent is synced; without it
            // a power cut could take the shard directory, and the log in it, with it.
            Directory::open(parent_dir(at)).await?.sync().await?;
        }
        Ok(DiskDir {
            path: path.to_owned(),
            dir: Directory::open(path).await?,
        })
    }
}

impl SegmentDir for DiskDir {
    type File = DiskFile;

    async fn list(&self) -> io::Result<Vec<String>> {
        // A metadata-only call, made once at open, before the shard serves anything.
        let mut names = Vec::new();
        for entry in self.dir.sync_read_dir()? {
            names.push(entry?.file_name().to_string_lossy().into_owned());
        }
        Ok(names)
    }

    async fn create(&self, name: &str, size_bytes: u64) -> io::Result<DiskFile> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .buffered_open(self.path.join(name))
            .await?;
        if let Err(error) = file.pre_allocate(size_bytes, false).await {
            // Out of space, most likely: leave no empty file behind for every refused
            // message (recovery would remove them, but with a misleading warning).
            let _ = file.close().await;
            let _ = self.remove(name).await;
            return Err(error.into());
        }
        Ok(DiskFile { file })
    }

    async fn open(&self, name: &str) -> io::Result<DiskFile> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .buffered_open(self.path.join(name))
            .await?;
        Ok(DiskFile { file })
    }

    async fn rename(&self, from: &str, to: &str) -> io::Result<()> {
        Ok(glommio::io::rename(self.path.join(from), self.path.join(to)).await?)
    }

    async fn remove(&self, name: &str) -> io::Result<()> {
        Ok(glommio::io::remove(self.path.join(name)).await?)
    }

    async fn sync(&self) -> io::Result<()> {
        Ok(self.dir.sync().await?)
    }

    fn free_space_bytes(&self) -> io::Result<u64> {
        free_space_bytes(&self.path)
    }
}

/// statvfs: the space a non-root writer may still use on the file system holding `path`.
pub fn free_space_bytes(path: &Path) -> io::Result<u64> {
    use std::os::unix::ffi::OsStrExt;
    let c_path = std::ffi::CString::new(path.as_os_str().as_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "path holds a NUL byte"))?;
    let mut stats = std::mem::MaybeUninit::<libc::statvfs>::uninit();
    // SAFETY: c_path is NUL-terminated and stats is a valid out-pointer for one statvfs.
    let rc = unsafe { libc::statvfs(c_path.as_ptr(), stats.as_mut_ptr()) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: statvfs returned 0, so it filled the struct.
    let stats = unsafe { stats.assume_init() };
    // The field widths differ between libc targets; on some this conversion is a no-op.
    #[allow(clippy::useless_conversion)]
    Ok(u64::from(stats.f_bavail) * u64::from(stats.f_frsize))
}

/// A segment file on disk.
pub struct DiskFile {
    /// io_uring-backed file; buffered so unaligned caller buffers are written as they are.
    file: BufferedFile,
}

/// A read-only shared mapping of a segment file.
struct DiskMap(memmap2::Mmap);

impl SegmentMap for DiskMap {
    fn bytes(&self) -> &[u8] {
        &self.0
    }

    fn prefetch(&self, range: Range<usize>) {
        let page = 4096;
        let start = range.start / page * page;
        let end = range.end.min(self.0.len());
        if start < end {
            // Advice only: a failure changes timing, never correctness.
            let _ = self
                .0
                .advise_range(memmap2::Advice::WillNeed, start, end - start);
        }
    }
}

impl SegmentFile for DiskFile {
    const MAP_IS_LIVE: bool = true;

    async fn write_at(&self, buf: Vec<u8>, pos: u64) -> io::Result<usize> {
        Ok(self.file.write_at(buf, pos).await?)
    }

    async fn fdatasync(&self) -> io::Result<()> {
        Ok(self.file.fdatasync().await?)
    }

    async fn len_bytes(&self) -> io::Result<u64> {
        Ok(self.file.file_size().await?)
    }

    fn map(&self, len_bytes: u64) -> io::Result<Arc<dyn SegmentMap>> {
        let len = usize::try_from(len_bytes)
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "segment too large"))?;
        // SAFETY: segment files are private to this store: only this shard writes them, only
        // by appending into preallocated space and zeroing torn tails, and never truncates them
        // while mapped, so the mapped range stays backed by the file.
        let map = unsafe {
            memmap2::MmapOptions::new()
                .len(len)
                .map(self.file.as_raw_fd())?
        };
        Ok(Arc::new(DiskMap(map)))
    }
}
