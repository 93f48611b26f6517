//! An in-memory [`SegmentDir`] that behaves like a disk with a volatile cache, for tests: a
//! write is visible at once but durable only after an fdatasync that began after it completed;
//! a created or removed name is durable only after a directory sync. Faults are injected:
//!
//! - a power cut after the N-th mutating operation: the durable state, plus any subset of the
//!   unsynced writes (each whole, lost, or torn sector by sector), becomes a [`CrashImage`] to
//!   reopen, and every later operation fails;
//! - a failing directory sync, after which each name change it covered may or may not survive
//!   a power cut;
//! - a failing fdatasync, which (like Linux) drops the writes it covered for good, or, if asked,
//!   lets them land anyway (Linux leaves open which). As on Linux, the error is reported once
//!   to every open file description: each handle's next fdatasync fails too, but a handle
//!   opened afterwards never hears of it.
//!
//! Several handles may sync one file at once; each sync covers the writes completed before it
//! began, whichever handle wrote them.
//!
//! Every operation yields once before taking effect, so concurrent appends really interleave.

use std::cell::{Cell, RefCell};
use std::collections::{BTreeMap, HashMap};
use std::io;
use std::rc::Rc;
use std::sync::Arc;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use super::backend::{SegmentDir, SegmentFile, SegmentMap};

/// Granularity at which a torn write survives or not.
const SECTOR_BYTES: usize = 512;

/// What to break, and when.
#[derive(Clone, Debug, Default)]
pub struct Faults {
    /// Cut power when the mutating operation with this number (from 1) starts.
    pub power_cut_at_op: Option<u64>,
    /// Fail the fdatasync with this number (from 1).
    pub fail_fdatasync_at: Option<u64>,
    /// Fail the directory sync with this number (from 1): the name changes it would have made
    /// durable stay as they were, each of them on the disk or not at a power cut.
    pub fail_dir_sync_at: Option<u64>,
    /// Seeds the choice of which unsynced writes survive the power cut.
    pub seed: u64,
    /// Extra executor turns every fdatasync takes, like a slow disk: lets commit rounds overlap.
    pub fdatasync_yields: u32,
    /// The writes a failed fdatasync covered reach the disk anyway. Linux leaves open whether
    /// they did; without this they never do.
    pub failed_sync_lands: bool,
}

/// The files (by name) as a disk would hold them after the power cut.
#[derive(Clone, Debug, Default)]
pub struct CrashImage {
    /// Contents of every file that survived.
    pub files: BTreeMap<String, Vec<u8>>,
}

/// A directory of in-memory files with a volatile cache and injected faults.
#[derive(Clone)]
pub struct MemDir {
    /// Shared with every file handle, which must see the same power cut.
    fs: Rc<RefCell<FsState>>,
}

struct FsState {
    files: HashMap<u64, FileState>,
    visible_names: BTreeMap<String, u64>,
    durable_names: BTreeMap<String, u64>,
    next_file_id: u64,
    mutating_ops: u64,
    fdatasyncs: u64,
    dir_syncs: u64,
    faults: Faults,
    rng: StdRng,
    image: Option<CrashImage>,
}

#[derive(Default)]
struct FileState {
    /// What reads see (the page cache).
    visible: Vec<u8>,
    /// What survives a power cut for sure.
    durable: Vec<u8>,
    /// Writes not yet covered by a successful fdatasync, in completion order, numbered.
    pending: Vec<PendingWrite>,
    /// Number of the next write.
    next_write: u64,
    /// Failed fdatasyncs so far (Linux's per-file error sequence).
    errors: u64,
}

/// A completed write not yet durable.
struct PendingWrite {
    number: u64,
    pos: usize,
    data: Vec<u8>,
}

fn power_cut() -> io::Error {
    io::Error::other("power cut (injected)")
}

impl MemDir {
    /// An empty directory with the given faults.
    pub fn new(faults: Faults) -> MemDir {
        MemDir::from_image(&CrashImage::default(), faults)
    }

    /// A directory holding what a power cut left, every byte of it durable.
    pub fn from_image(image: &CrashImage, faults: Faults) -> MemDir {
        let mut state = FsState {
            files: HashMap::new(),
            visible_names: BTreeMap::new(),
            durable_names: BTreeMap::new(),
            next_file_id: 0,
            mutating_ops: 0,
            fdatasyncs: 0,
            dir_syncs: 0,
            rng: StdRng::seed_from_u64(faults.seed),
            faults,
            image: None,
        };
        for (name, bytes) in &image.files {
            let id = state.next_file_id;
            state.next_file_id += 1;
            state.files.insert(
                id,
                FileState {
                    visible: bytes.clone(),
                    durable: bytes.clone(),
                    ..FileState::default()
                },
            );
            state.visible_names.insert(name.clone(), id);
            state.durable_names.insert(name.clone(), id);
        }
        MemDir {
            fs: Rc::new(RefCell::new(state)),
        }
    }

    /// The image taken at the power cut, once it happened.
    pub fn crash_image(&self) -> Option<CrashImage> {
        self.fs.borrow().image.clone()
    }

    /// Cuts power now (if not done already) and returns what survived.
    pub fn cut_power_now(&self) -> CrashImage {
        let mut fs = self.fs.borrow_mut();
        if fs.image.is_none() {
            fs.image = Some(fs.take_image());
        }
        fs.image.clone().expect("just taken")
    }

    /// Mutating operations so far (to pick a power-cut point within a run).
    pub fn mutating_ops(&self) -> u64 {
        self.fs.borrow().mutating_ops
    }

    /// Counts a mutating operation, cutting power if this is the chosen one.
    fn begin_op(&self) -> io::Result<()> {
        let mut fs = self.fs.borrow_mut();
        fs.mutating_ops += 1;
        if fs.image.is_none() && fs.faults.power_cut_at_op == Some(fs.mutating_ops) {
            fs.image = Some(fs.take_image());
        }
        fs.check_power()
    }
}

impl FsState {
    fn check_power(&self) -> io::Result<()> {
        match self.image {
            Some(_) => Err(power_cut()),
            None => Ok(()),
        }
    }

    fn take_image(&mut self) -> CrashImage {
        let mut names: Vec<(String, u64)> = Vec::new();
        let all: BTreeMap<&String, u64> = self
            .durable_names
            .iter()
            .chain(self.visible_names.iter())
            .map(|(n, id)| (n, *id))
            .collect();
        for (name, id) in all {
            let durable = self.durable_names.get(name) == Some(&id);
            let visible = self.visible_names.get(name) == Some(&id);
            // An unsynced creation or removal may or may not have reached the disk.
            if (durable && visible) || self.rng.gen_bool(0.5) {
                names.push((name.clone(), id));
            }
        }
        let mut image = CrashImage::default();
        for (name, id) in names {
            let file = &self.files[&id];
            let mut bytes = file.durable.clone();
            if self.rng.gen_bool(0.5) {
                // The size change of a preallocation may have landed too.
                bytes.resize(bytes.len().max(file.visible.len()), 0);
            }
            for PendingWrite { pos, data, .. } in &file.pending {
                let mode = self.rng.gen_range(0..3);
                for (i, sector) in data.chunks(SECTOR_BYTES).enumerate() {
                    let keep = match mode {
                        0 => false,
                        1 => true,
                        _ => self.rng.gen_bool(0.5),
                    };
                    let at = pos + i * SECTOR_BYTES;
                    if keep && at < bytes.len() {
                        let end = (at + sector.len()).min(bytes.len());
                        bytes[at..end].copy_from_slice(&sector[..end - at]);
                    }
                }
            }
            image.files.insert(name, bytes);
        }
        image
    }
}

/// A handle on one in-memory file: an open file description.
pub struct MemFile {
    /// The directory's shared state.
    dir: MemDir,
    /// Which file (names may be removed while handles live on).
    id: u64,
    /// The file's error sequence when this handle last reported (or was opened).
    errors_seen: Cell<u64>,
}

impl MemFile {
    fn new(dir: &MemDir, id: u64) -> MemFile {
        let errors_seen = Cell::new(dir.fs.borrow().files[&id].errors);
        MemFile {
            dir: dir.clone(),
            id,
            errors_seen,
        }
    }
}

/// Makes `writes` and a file length of `len` durable.
fn land(file: &mut FileState, len: usize, writes: Vec<PendingWrite>) {
    if file.durable.len() < len {
        file.durable.resize(len, 0);
    }
    for PendingWrite { pos, data, .. } in writes {
        if file.durable.len() < pos + data.len() {
            file.durable.resize(pos + data.len(), 0);
        }
        file.durable[pos..pos + data.len()].copy_from_slice(&data);
    }
}

/// A snapshot of a file's visible bytes.
struct MemMap(Vec<u8>);

impl SegmentMap for MemMap {
    fn bytes(&self) -> &[u8] {
        &self.0
    }
}

impl SegmentFile for MemFile {
    const MAP_IS_LIVE: bool = false;

    async fn write_at(&self, buf: Vec<u8>, pos: u64) -> io::Result<usize> {
        self.dir.begin_op()?;
        futures_lite::future::yield_now().await;
        let mut fs = self.dir.fs.borrow_mut();
        fs.check_power()?;
        let pos = pos as usize;
        let file = fs.files.get_mut(&self.id).expect("open file exists");
        if file.visible.len() < pos + buf.len() {
            file.visible.resize(pos + buf.len(), 0);
        }
        file.visible[pos..pos + buf.len()].copy_from_slice(&buf);
        let written = buf.len();
        file.pending.push(PendingWrite {
            number: file.next_write,
            pos,
            data: buf,
        });
        file.next_write += 1;
        Ok(written)
    }

    async fn fdatasync(&self) -> io::Result<()> {
        self.dir.begin_op()?;
        let (covered_below, len) = {
            let fs = self.dir.fs.borrow();
            let file = &fs.files[&self.id];
            (file.next_write, file.visible.len())
        };
        let yields = self.dir.fs.borrow().faults.fdatasync_yields;
        for _ in 0..=yields {
            futures_lite::future::yield_now().await;
        }
        let mut fs = self.dir.fs.borrow_mut();
        fs.check_power()?;
        fs.fdatasyncs += 1;
        let fail = fs.faults.fail_fdatasync_at == Some(fs.fdatasyncs);
        let file = fs.files.get_mut(&self.id).expect("open file exists");
        let (covered, rest): (Vec<_>, Vec<_>) = std::mem::take(&mut file.pending)
            .into_iter()
            .partition(|write| write.number < covered_below);
        file.pending = rest;
        if fail {
            // Linux marks the pages clean anyway: these writes reached the disk by now or
            // never will.
            file.errors += 1;
            self.errors_seen.set(file.errors);
            if fs.faults.failed_sync_lands {
                let file = fs.files.get_mut(&self.id).expect("open file exists");
                land(file, len, covered);
            }
            return Err(io::Error::other("fdatasync failed (injected)"));
        }
        if self.errors_seen.replace(file.errors) < file.errors {
            // An earlier failure, reported to this description now; what this sync covered
            // may or may not have reached the disk.
            file.pending.extend(covered);
            file.pending.sort_by_key(|write| write.number);
            return Err(io::Error::other("fdatasync failed earlier (injected)"));
        }
        land(file, len, covered);
        Ok(())
    }

    async fn len_bytes(&self) -> io::Result<u64> {
        Ok(self.dir.fs.borrow().files[&self.id].visible.len() as u64)
    }

    fn map(&self, len_bytes: u64) -> io::Result<Arc<dyn SegmentMap>> {
        let fs = self.dir.fs.borrow();
        let visible = &fs.files[&self.id].visible;
        let len = (len_bytes as usize).min(visible.len());
        Ok(Arc::new(MemMap(visible[..len].to_vec())))
    }
}

impl SegmentDir for MemDir {
    type File = MemFile;

    async fn list(&self) -> io::Result<Vec<String>> {
        Ok(self.fs.borrow().visible_names.keys().cloned().collect())
    }

    async fn create(&self, name: &str, size_bytes: u64) -> io::Result<MemFile> {
        self.begin_op()?;
        futures_lite::future::yield_now().await;
        let mut fs = self.fs.borrow_mut();
        fs.check_power()?;
        if fs.visible_names.contains_key(name) {
            return Err(io::ErrorKind::AlreadyExists.into());
        }
        let id = fs.next_file_id;
        fs.next_file_id += 1;
        let visible = vec![0; size_bytes as usize];
        fs.files.insert(
            id,
            FileState {
                visible,
                ..FileState::default()
            },
        );
        fs.visible_names.insert(name.to_owned(), id);
        drop(fs);
        Ok(MemFile::new(self, id))
    }

    async fn open(&self, name: &str) -> io::Result<MemFile> {
        let id = *self
            .fs
            .borrow()
            .visible_names
            .get(name)
            .ok_or(io::ErrorKind::NotFound)?;
        Ok(MemFile::new(self, id))
    }

    async fn rename(&self, from: &str, to: &str) -> io::Result<()> {
        self.begin_op()?;
        futures_lite::future::yield_now().await;
        let mut fs = self.fs.borrow_mut();
        fs.check_power()?;
        if fs.visible_names.contains_key(to) {
            return Err(io::ErrorKind::AlreadyExists.into());
        }
        let id = fs
            .visible_names
            .remove(from)
            .ok_or(io::ErrorKind::NotFound)?;
        fs.visible_names.insert(to.to_owned(), id);
        Ok(())
    }

    async fn remove(&self, name: &str) -> io::Result<()> {
        self.begin_op()?;
        futures_lite::future::yield_now().await;
        let mut fs = self.fs.borrow_mut();
        fs.check_power()?;
        fs.visible_names
            .remove(name)
            .ok_or(io::ErrorKind::NotFound)?;
        Ok(())
    }

    async fn sync(&self) -> io::Result<()> {
        self.begin_op()?;
        let names = self.fs.borrow().visible_names.clone();
        futures_lite::future::yield_now().await;
        let mut fs = self.fs.borrow_mut();
        fs.check_power()?;
        fs.dir_syncs += 1;
        if fs.faults.fail_dir_sync_at == Some(fs.dir_syncs) {
            return Err(io::Error::other("directory sync failed (injected)"));
        }
        fs.durable_names = names;
        Ok(())
    }

    fn free_space_bytes(&self) -> io::Result<u64> {
        Ok(u64::MAX)
    }
}
