//! Criterion benches for the shard-local log:
//! - `store/codec`: record header encode + payload CRC, and full decode + verify;
//! - `store/append`: durable appends with group commit on one shard, at 1/10/100 KiB and
//!   1/16/64 concurrent appenders (criterion reports MB/s; a summary line per configuration
//!   adds records/s and fdatasyncs/s);
//! - `store/recovery`: `Store::open` over a prepared log, page cache warm and cold (MB/s).
//!
//! Disk benches write under `$RINGMAIL_BENCH_DIR` (default: the system temp dir); the recovery
//! log size is `$RINGMAIL_BENCH_RECOVERY_MIB` (default 64).

use std::cell::Cell;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::time::{Duration, Instant};

use criterion::{black_box, criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use glommio::LocalExecutorBuilder;
use ringmail::store::record::{self, RecordHeader, RecordType};
use ringmail::store::{RecordId, Store, StoreOptions};

const KIB: usize = 1024;

fn bench_dir() -> PathBuf {
    std::env::var_os("RINGMAIL_BENCH_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(std::env::temp_dir)
}

/// Runs `make()` on a fresh glommio executor thread and returns its output.
fn on_executor<T, F, Fut>(make: F) -> T
where
    T: Send + 'static,
    F: FnOnce() -> Fut + Send + 'static,
    Fut: Future<Output = T> + 'static,
{
    LocalExecutorBuilder::default()
        .spawn(make)
        .expect("executor")
        .join()
        .expect("executor thread")
}

fn codec(c: &mut Criterion) {
    let mut group = c.benchmark_group("store/codec");
    for size in [KIB, 100 * KIB] {
        let payload = vec![0x61u8; size];
        group.throughput(Throughput::Bytes(size as u64));
        group.bench_with_input(BenchmarkId::new("encode", size), &payload, |b, payload| {
            b.iter(|| {
                let header = RecordHeader {
                    record_type: RecordType::Data,
                    kind: 1,
                    id: RecordId(42),
                    payload_len: payload.len() as u32,
                    payload_crc: record::payload_crc(&[black_box(payload)]),
                };
                header.encode(0x1234_5678)
            })
        });
        let header = RecordHeader {
            record_type: RecordType::Data,
            kind: 1,
            id: RecordId(42),
            payload_len: size as u32,
            payload_crc: record::payload_crc(&[&payload]),
        };
        let mut encoded = header.encode(7).to_vec();
        encoded.extend_from_slice(&payload);
        group.bench_with_input(BenchmarkId::new("decode", size), &encoded, |b, encoded| {
            b.iter(|| record::decode_at(black_box(encoded), 0, 7).expect("valid"))
        });
    }
    group.finish();
}

/// Appends `records` records of `size` bytes to `store` from `appenders` concurrent tasks and
/// waits until every one is durable.
async fn append_concurrently(store: &Rc<Store>, appenders: usize, records: u64, size: usize) {
    let remaining = Rc::new(Cell::new(records));
    let tasks: Vec<_> = (0..appenders)
        .map(|_| {
            let (store, remaining) = (store.clone(), remaining.clone());
            glommio::spawn_local(async move {
                while remaining.get() > 0 {
                    remaining.set(remaining.get() - 1);
                    let id = store.allocate_id();
                    // A fresh buffer per record, as SMTP DATA would hand over.
                    store
                        .append(id, 1, vec![vec![0x61; size]])
                        .await
                        .expect("append");
                }
            })
        })
        .collect();
    for task in tasks {
        task.await;
    }
}

/// Runs `records` durable appends of `size` bytes from `appenders` concurrent tasks on one
/// fresh log; returns (time, fdatasyncs).
fn run_appends(size: usize, appenders: usize, records: u64, opts: StoreOptions) -> (Duration, u64) {
    on_executor(move || async move {
        let dir = tempfile::Builder::new()
            .prefix("store-bench")
            .tempdir_in(bench_dir())
            .expect("tempdir");
        let (store, _) = Store::open(&dir.path().join("shard-0"), opts)
            .await
            .expect("open");
        let store = Rc::new(store);
        let started = Instant::now();
        append_concurrently(&store, appenders, records, size).await;
        let elapsed = started.elapsed();
        let fdatasyncs = store.stats().fdatasyncs;
        drop(store);
        (elapsed, fdatasyncs)
    })
}

fn append(c: &mut Criterion) {
    let mut group = c.benchmark_group("store/append");
    group
        .sample_size(10)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(3));
    // The last configuration turns the small-record copy off, to show what it buys.
    let zero_copy = StoreOptions {
        copy_below_bytes: 0,
        ..StoreOptions::default()
    };
    let configurations = [KIB, 10 * KIB, 100 * KIB]
        .into_iter()
        .flat_map(|size| {
            [1usize, 16, 64].map(|appenders| (size, appenders, "", StoreOptions::default()))
        })
        .chain([(KIB, 64, "-uncopied", zero_copy)]);
    for (size, appenders, variant, opts) in configurations {
        {
            group.throughput(Throughput::Bytes(size as u64));
            let (mut total_records, mut total_time, mut total_syncs) = (0u64, Duration::ZERO, 0u64);
            group.bench_function(
                BenchmarkId::new(format!("{}KiB{variant}", size / KIB), appenders),
                |b| {
                    b.iter_custom(|records| {
                        let (elapsed, syncs) = run_appends(size, appenders, records, opts.clone());
                        total_records += records;
                        total_time += elapsed;
                        total_syncs += syncs;
                        elapsed
                    })
                },
            );
            let secs = total_time.as_secs_f64();
            if total_records == 0 {
                continue; // filtered out
            }
            eprintln!(
                "store/append {:>3} KiB{variant:<9} x {:>2} appenders: {:>9.0} records/s {:>8.1} MB/s {:>7.0} fdatasyncs/s ({:.1} records per fdatasync)",
                size / KIB,
                appenders,
                total_records as f64 / secs,
                (total_records as f64 * size as f64) / secs / 1e6,
                total_syncs as f64 / secs,
                total_records as f64 / total_syncs.max(1) as f64,
            );
        }
    }
    group.finish();
}

/// Writes a log of about `size_mib` MiB of 10 KiB records into `path`.
fn prepare_log(path: PathBuf, size_mib: u64) {
    on_executor(move || async move {
        let (store, _) = Store::open(&path, StoreOptions::default())
            .await
            .expect("open");
        let records = size_mib * 1024 * 1024 / (10 * KIB as u64);
        append_concurrently(&Rc::new(store), 64, records, 10 * KIB).await;
    })
}

/// Drops the log's pages from the page cache so the next open reads from the device.
fn evict(path: &Path) {
    use std::os::unix::io::AsRawFd;
    for entry in std::fs::read_dir(path).expect("log dir") {
        let file = std::fs::File::open(entry.expect("entry").path()).expect("segment");
        // SAFETY: a valid open descriptor; advice only.
        unsafe { libc::posix_fadvise(file.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
    }
}

/// Opens the log at `path` and returns (open time, bytes verified, live records).
fn timed_open(path: PathBuf) -> (Duration, u64, u64) {
    on_executor(move || async move {
        let started = Instant::now();
        let (_store, recovered) = Store::open(&path, StoreOptions::default())
            .await
            .expect("open");
        let elapsed = started.elapsed();
        (
            elapsed,
            recovered.report.bytes_verified,
            recovered.report.live_records,
        )
    })
}

fn recovery(c: &mut Criterion) {
    let size_mib: u64 = std::env::var("RINGMAIL_BENCH_RECOVERY_MIB")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(64);
    let dir = tempfile::Builder::new()
        .prefix("store-recovery")
        .tempdir_in(bench_dir())
        .expect("tempdir");
    let path = dir.path().join("shard-0");
    prepare_log(path.clone(), size_mib);
    let (_, bytes, records) = timed_open(path.clone());
    let mut group = c.benchmark_group("store/recovery");
    group
        .sample_size(10)
        .warm_up_time(Duration::from_millis(100))
        .measurement_time(Duration::from_secs(5));
    group.throughput(Throughput::Bytes(bytes));
    for cold in [false, true] {
        let name = if cold { "open/cold" } else { "open/warm" };
        let (mut total, mut opens) = (Duration::ZERO, 0u32);
        group.bench_function(BenchmarkId::new(name, format!("{size_mib}MiB")), |b| {
            b.iter_custom(|iters| {
                let mut elapsed = Duration::ZERO;
                for _ in 0..iters {
                    if cold {
                        evict(&path);
                    }
                    elapsed += timed_open(path.clone()).0;
                }
                total += elapsed;
                opens += iters as u32;
                elapsed
            })
        });
        if opens == 0 {
            continue; // filtered out
        }
        let per_open = total / opens;
        eprintln!(
            "store/recovery {name}: {records} records, {:.1} MiB verified in {:.1} ms per open = {:.0} MB/s",
            bytes as f64 / (1 << 20) as f64,
            per_open.as_secs_f64() * 1e3,
            bytes as f64 / per_open.as_secs_f64() / 1e6,
        );
    }
    group.finish();
}

criterion_group!(benches, codec, append, recovery);
criterion_main!(benches);
