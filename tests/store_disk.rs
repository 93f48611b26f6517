//! The log on a real file system through glommio: concurrent appends sharing fdatasyncs,
//! zero-copy reads that cross threads and outlive the store, reclaim, and recovery after
//! reopening (including a torn tail written behind the store's back).

use std::future::Future;
use std::path::{Path, PathBuf};
use std::rc::Rc;

use glommio::LocalExecutorBuilder;
use ringmail::store::{RecordId, Store, StoreOptions};

const RECORDS: usize = 200;
const RECORD_BYTES: usize = 10_000;

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

fn opts() -> StoreOptions {
    StoreOptions {
        segment_size_bytes: 1 << 20,
        ..StoreOptions::default()
    }
}

fn body(id: RecordId) -> Vec<u8> {
    (0..RECORD_BYTES)
        .map(|i| (id.0 as usize * 7 + i) as u8)
        .collect()
}

fn newest_segment(dir: &Path) -> PathBuf {
    let mut names: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    names.sort();
    names.pop().unwrap()
}

#[test]
fn append_reclaim_reopen_on_disk() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("data").join("shard-0");

    let first_path = path.clone();
    let (ids, shipped) = on_executor(move || async move {
        let (store, recovered) = Store::open(&first_path, opts()).await.unwrap();
        assert!(recovered.records.is_empty());
        let store = Rc::new(store);
        let ids: Vec<RecordId> = (0..RECORDS).map(|_| store.allocate_id()).collect();
        let tasks: Vec<_> = ids
            .iter()
            .map(|&id| {
                let store = store.clone();
                glommio::spawn_local(async move {
                    let payload = body(id);
                    let (head, tail) = payload.split_at(3000);
                    store
                        .append(id, 7, vec![head.to_vec(), tail.to_vec()])
                        .await
                })
            })
            .collect();
        for task in tasks {
            task.await.unwrap();
        }
        let stats = store.stats();
        assert_eq!(stats.appends, RECORDS as u64);
        assert!(
            stats.fdatasyncs < RECORDS as u64,
            "group commit shares syncs: {stats:?}"
        );
        store.mark_dead(&ids[..150]).await.unwrap();
        let report = store.reclaim().await.unwrap();
        assert!(report.segments_deleted >= 1, "{report:?}");
        assert!(store.free_space_bytes() > 0);
        let shipped = store.read(ids[RECORDS - 1]).unwrap();
        shipped.prefetch();
        assert!(shipped.verify());
        (ids, shipped)
    });
    // The mapping outlives the store and its executor, and crosses threads.
    let copied = std::thread::spawn(move || shipped.to_vec()).join().unwrap();
    assert_eq!(copied, body(ids[RECORDS - 1]));

    // A torn append after the last record of the active segment: the next open must clear it.
    let active = newest_segment(&path);
    let mut bytes = std::fs::read(&active).unwrap();
    let torn_at = (bytes.iter().rposition(|&b| b != 0).unwrap() + 1).next_multiple_of(8);
    bytes[torn_at..torn_at + 100].fill(0x5a);
    std::fs::write(&active, &bytes).unwrap();

    let second_path = path.clone();
    let (live, report) = on_executor(move || async move {
        let (_store, recovered) = Store::open(&second_path, opts()).await.unwrap();
        let live: Vec<(RecordId, bool)> = recovered
            .records
            .iter()
            .map(|r| (r.id, r.record[..] == body(r.id)[..] && r.kind == 7))
            .collect();
        (live, recovered.report)
    });
    let expected: Vec<(RecordId, bool)> = ids[150..].iter().map(|id| (*id, true)).collect();
    assert_eq!(live, expected);
    assert!(report.torn_tail_bytes >= 100, "{report:?}");
    assert_eq!(report.corrupt_regions, 0, "{report:?}");

    let third_path = path.clone();
    let report = on_executor(move || async move {
        let (_store, recovered) = Store::open(&third_path, opts()).await.unwrap();
        recovered.report
    });
    assert_eq!(
        report.torn_tail_bytes, 0,
        "the tail was cleared for good: {report:?}"
    );
    assert_eq!(report.live_records, 50);
}
