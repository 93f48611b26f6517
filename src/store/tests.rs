//! Store tests on the in-memory, fault-injecting backend: behaviour tables, then the power-cut
//! property test (appends, tombstones, reclaim, failed fdatasyncs, cut at any operation).

use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::pin::Pin;

use futures_lite::future::block_on;
use proptest::prelude::*;

use super::memfs::{CrashImage, Faults, MemDir};
use super::wait::join_all;
use super::*;

fn small_opts() -> StoreOptions {
    StoreOptions {
        segment_size_bytes: 4096,
        max_record_bytes: 64 << 10,
        // Both write paths (one copied write, and one write per piece) get exercised.
        copy_below_bytes: 512,
        ..StoreOptions::default()
    }
}

fn open(image: &CrashImage, faults: Faults) -> (Store<MemDir>, Recovered) {
    block_on(Store::open_in(
        MemDir::from_image(image, faults),
        small_opts(),
    ))
    .expect("open")
}

fn payload(id: RecordId, len: usize) -> Vec<u8> {
    (0..len).map(|i| (id.0 as usize * 31 + i) as u8).collect()
}

fn recovered_ids(recovered: &Recovered) -> Vec<u64> {
    recovered.records.iter().map(|r| r.id.0).collect()
}

/// The ids a fresh open finds after the power is cut now.
fn ids_after_power_cut(store: &Store<MemDir>) -> Vec<u64> {
    recovered_ids(&open(&store.dir().cut_power_now(), Faults::default()).1)
}

fn raw_ids(ids: &[RecordId]) -> Vec<u64> {
    ids.iter().map(|id| id.0).collect()
}

#[test]
fn append_read_and_reopen() {
    let (store, recovered) = open(&CrashImage::default(), Faults::default());
    assert!(recovered.records.is_empty());
    let ids: Vec<RecordId> = (0..5).map(|_| store.allocate_id()).collect();
    block_on(async {
        for (i, id) in ids.iter().enumerate() {
            let body = payload(*id, 100 + i);
            let (head, tail) = body.split_at(10);
            store
                .append(*id, i as u8, vec![head.to_vec(), Vec::new(), tail.to_vec()])
                .await
                .unwrap();
        }
    });
    let record = store.read(ids[2]).unwrap();
    assert_eq!(&record[..], &payload(ids[2], 102)[..]);
    assert_eq!((record.id(), record.kind()), (ids[2], 2));
    assert!(record.verify());
    assert_eq!(store.stats().appends, 5);

    let image = store.dir().cut_power_now();
    let (reopened, recovered) = open(&image, Faults::default());
    assert_eq!(recovered_ids(&recovered), raw_ids(&ids));
    assert_eq!(&recovered.records[4].record[..], &payload(ids[4], 104)[..]);
    assert_eq!(recovered.records[4].kind, 4);
    assert_eq!(recovered.report.torn_tail_bytes, 0);
    assert!(reopened.allocate_id() > ids[4]);
    assert_eq!(
        reopened.segment_count(),
        1,
        "appends resume in the intact newest segment"
    );
}

#[test]
fn concurrent_appends_share_fdatasyncs() {
    let (store, _) = open(&CrashImage::default(), Faults::default());
    let before = store.stats().fdatasyncs;
    let appends: Vec<_> = (0..64)
        .map(|_| {
            let id = store.allocate_id();
            store.append(id, 1, vec![payload(id, 40)])
        })
        .collect();
    for result in block_on(join_all(appends)) {
        result.unwrap();
    }
    let syncs = store.stats().fdatasyncs - before;
    assert!(syncs <= 8, "64 concurrent appends took {syncs} fdatasyncs");
    assert_eq!(store.live_records(), 64);
}

/// On a disk whose fdatasyncs take 20 extra turns: appends a record, and a second one once the
/// first one's commit round is in flight. Returns both ids and both outcomes.
fn append_during_a_round(
    faults: Faults,
) -> (Store<MemDir>, [RecordId; 2], [Result<(), StoreError>; 2]) {
    let slow_disk = Faults {
        fdatasync_yields: 20,
        ..faults
    };
    let (store, _) = open(&CrashImage::default(), slow_disk);
    let ids = [store.allocate_id(), store.allocate_id()];
    let during_first_round = async {
        while store.state.borrow().rounds_in_flight == 0 {
            futures_lite::future::yield_now().await;
        }
        store.append(ids[1], 1, vec![payload(ids[1], 40)]).await
    };
    let (a, b) = block_on(futures_lite::future::zip(
        store.append(ids[0], 1, vec![payload(ids[0], 40)]),
        during_first_round,
    ));
    (store, ids, [a, b])
}

#[test]
fn a_record_written_during_a_commit_round_starts_the_next_at_once() {
    let (store, ids, [a, b]) = append_during_a_round(Faults::default());
    a.unwrap();
    b.unwrap();
    let stats = store.stats();
    assert_eq!((stats.commit_rounds, stats.overlapping_rounds), (2, 1));
    assert_eq!(ids_after_power_cut(&store), raw_ids(&ids));
}

#[test]
fn a_failure_reported_to_one_of_two_overlapping_rounds_fails_both() {
    // fdatasync 1 initialises the first segment; 2 and 3 are the overlapping rounds.
    let (store, ids, [a, b]) = append_during_a_round(Faults {
        fail_fdatasync_at: Some(2),
        ..Faults::default()
    });
    assert!(matches!(a, Err(StoreError::SyncFailed)), "{a:?}");
    assert!(matches!(b, Err(StoreError::SyncFailed)), "{b:?}");
    assert_eq!(store.stats().overlapping_rounds, 1);
    append_after_poisoning(&store);
    assert!(!ids_after_power_cut(&store).contains(&ids[0].0));
}

#[test]
fn record_larger_than_a_segment_gets_its_own() {
    let (store, _) = open(&CrashImage::default(), Faults::default());
    let id = store.allocate_id();
    let big = payload(id, 10_000);
    block_on(store.append(id, 9, vec![big.clone()])).unwrap();
    assert_eq!(&store.read(id).unwrap()[..], &big[..]);
    let small = store.allocate_id();
    block_on(store.append(small, 1, vec![b"after".to_vec()])).unwrap();
    let (_, recovered) = open(&store.dir().cut_power_now(), Faults::default());
    assert_eq!(recovered_ids(&recovered), [id.0, small.0]);
    assert_eq!(&recovered.records[0].record[..], &big[..]);
}

#[test]
fn too_large_and_unallocated_are_refused() {
    let (store, _) = open(&CrashImage::default(), Faults::default());
    let id = store.allocate_id();
    let error = block_on(store.append(id, 0, vec![vec![0; 65 << 10]])).unwrap_err();
    assert!(
        matches!(error, StoreError::RecordTooLarge { .. }),
        "{error}"
    );
    let error = block_on(store.append(RecordId(999), 0, vec![])).unwrap_err();
    assert!(matches!(error, StoreError::UnallocatedId(_)), "{error}");
    assert!(matches!(
        store.read(RecordId(999)),
        Err(StoreError::NotFound(_))
    ));
}

/// Appends a record to a log whose only segment was just poisoned: it lands in a new one.
fn append_after_poisoning(store: &Store<MemDir>) -> RecordId {
    let id = store.allocate_id();
    block_on(store.append(id, 1, vec![b"kept".to_vec()])).unwrap();
    assert_eq!(
        store.segment_count(),
        2,
        "the poisoned segment takes no more writes"
    );
    id
}

#[test]
fn a_commit_round_abandoned_mid_flight_poisons_its_segment() {
    let slow_disk = Faults {
        fdatasync_yields: 20,
        ..Faults::default()
    };
    let (store, _) = open(&CrashImage::default(), slow_disk);
    let id = store.allocate_id();
    block_on(async {
        let mut append = Box::pin(store.append(id, 1, vec![payload(id, 40)]));
        while store.state.borrow().rounds_in_flight == 0 {
            assert!(futures_lite::future::poll_once(&mut append).await.is_none());
        }
        // Its fdatasync may still finish, unheard: nothing in that file is trusted again.
        drop(append);
    });
    assert_eq!(store.state.borrow().rounds_in_flight, 0);
    append_after_poisoning(&store);
}

#[test]
fn failed_fdatasync_fails_its_records_and_rolls() {
    // fdatasync 1 initialises the first segment; 2 is the first commit round.
    let faults = Faults {
        fail_fdatasync_at: Some(2),
        ..Faults::default()
    };
    let (store, _) = open(&CrashImage::default(), faults);
    let first = store.allocate_id();
    let error = block_on(store.append(first, 1, vec![b"lost".to_vec()])).unwrap_err();
    assert!(matches!(error, StoreError::SyncFailed), "{error}");
    assert!(store.read(first).is_err());
    assert_eq!(store.stats().fdatasync_failures, 1);
    let second = append_after_poisoning(&store);
    assert_eq!(ids_after_power_cut(&store), [second.0]);
}

#[test]
fn mark_dead_survives_restart_and_is_idempotent() {
    let (store, _) = open(&CrashImage::default(), Faults::default());
    let ids: Vec<RecordId> = (0..4).map(|_| store.allocate_id()).collect();
    block_on(async {
        for id in &ids {
            store.append(*id, 0, vec![payload(*id, 10)]).await.unwrap();
        }
        store.mark_dead(&[ids[1], ids[3]]).await.unwrap();
        store.mark_dead(&[ids[1], RecordId(12345)]).await.unwrap();
    });
    assert!(store.read(ids[1]).is_err());
    assert_eq!(ids_after_power_cut(&store), [ids[0].0, ids[2].0]);
}

#[test]
fn a_roll_takes_the_zero_filled_spare() {
    let (store, _) = open(&CrashImage::default(), Faults::default());
    block_on(store.prepare_spare(|| async {})).unwrap();
    block_on(store.prepare_spare(|| async {})).unwrap(); // one spare at a time
    let spares = |store: &Store<MemDir>| {
        block_on(store.dir().list())
            .unwrap()
            .into_iter()
            .filter(|name| spare::is_spare_name(name))
            .count()
    };
    assert_eq!(spares(&store), 1);
    // 3 records of 1.5 KiB fill a 4 KiB segment: the third one rolls.
    let ids = fill(&store, 3, 1500);
    let stats = store.stats();
    assert_eq!((stats.segments_created, stats.segments_from_spare), (2, 1));
    assert_eq!(spares(&store), 0);
    // Taken, so wanted again: this resolves at once.
    block_on(store.spare_wanted());
    assert_eq!(ids_after_power_cut(&store), raw_ids(&ids));
}

#[test]
fn a_young_fallocated_segment_gives_way_to_the_spare_at_once() {
    let (store, _) = open(&CrashImage::default(), Faults::default());
    let first = fill(&store, 1, 100);
    // No spare yet: nothing to switch to.
    assert!(!block_on(store.switch_to_spare_early()).unwrap());
    block_on(store.prepare_spare(|| async {})).unwrap();
    assert!(block_on(store.switch_to_spare_early()).unwrap());
    assert_eq!(store.stats().segments_from_spare, 1);
    // The active segment is the zero-filled spare now.
    block_on(store.prepare_spare(|| async {})).unwrap();
    assert!(!block_on(store.switch_to_spare_early()).unwrap());
    let second = fill(&store, 1, 100);
    assert_eq!(ids_after_power_cut(&store), [first[0].0, second[0].0]);
}

#[test]
fn a_spare_that_fails_to_sync_is_removed_and_rolls_do_without() {
    // fdatasync 1 makes the first segment durable at open; 2 is the spare's zeros.
    let faults = Faults {
        fail_fdatasync_at: Some(2),
        ..Faults::default()
    };
    let (store, _) = open(&CrashImage::default(), faults);
    assert!(block_on(store.prepare_spare(|| async {})).is_err());
    let names = block_on(store.dir().list()).unwrap();
    assert!(
        !names.iter().any(|name| spare::is_spare_name(name)),
        "{names:?}"
    );
    block_on(store.spare_wanted()); // nothing ready, nothing being made
    let ids = fill(&store, 3, 1500);
    let stats = store.stats();
    assert_eq!((stats.segments_created, stats.segments_from_spare), (2, 0));
    assert_eq!(ids_after_power_cut(&store), raw_ids(&ids));
}

#[test]
fn leftover_spares_are_removed_at_open() {
    let (store, _) = open(&CrashImage::default(), Faults::default());
    block_on(store.prepare_spare(|| async {})).unwrap();
    block_on(store.dir().sync()).unwrap(); // the spare's name survives the cut
    let image = store.dir().cut_power_now();
    assert!(image.files.keys().any(|name| spare::is_spare_name(name)));
    let (reopened, _) = open(&image, Faults::default());
    let names = block_on(reopened.dir().list()).unwrap();
    assert!(
        !names.iter().any(|name| spare::is_spare_name(name)),
        "{names:?}"
    );
}

/// Fills segments with records of `len` bytes; returns their ids.
fn fill(store: &Store<MemDir>, count: usize, len: usize) -> Vec<RecordId> {
    let ids: Vec<RecordId> = (0..count).map(|_| store.allocate_id()).collect();
    block_on(async {
        for id in &ids {
            store.append(*id, 0, vec![payload(*id, len)]).await.unwrap();
        }
    });
    ids
}

#[test]
fn reclaim_deletes_dead_segments_and_compacts_sparse_ones() {
    let (store, _) = open(&CrashImage::default(), Faults::default());
    let ids = fill(&store, 30, 500); // about 7 per 4 KiB segment
    let segments_before = store.segment_count();
    // Kill the first 14 (two segments' worth) and all but one in the rest.
    let (dead, keep): (Vec<_>, Vec<_>) = ids
        .iter()
        .enumerate()
        .partition(|(i, _)| *i < 14 || i % 7 != 0);
    let dead: Vec<RecordId> = dead.into_iter().map(|(_, id)| *id).collect();
    let keep: Vec<RecordId> = keep.into_iter().map(|(_, id)| *id).collect();
    block_on(store.mark_dead(&dead)).unwrap();
    let report = block_on(store.reclaim()).unwrap();
    assert!(report.segments_deleted >= 2, "{report:?}");
    assert!(report.segments_compacted >= 1, "{report:?}");
    assert!(store.segment_count() < segments_before);
    for id in &keep {
        assert_eq!(&store.read(*id).unwrap()[..], &payload(*id, 500)[..]);
    }
    let (reopened, recovered) = open(&store.dir().cut_power_now(), Faults::default());
    let mut got = recovered_ids(&recovered);
    got.sort_unstable();
    assert_eq!(got, keep.iter().map(|id| id.0).collect::<Vec<_>>());
    assert!(reopened.allocate_id() > *ids.last().unwrap());
}

#[test]
fn compaction_moves_records_larger_than_a_lowered_record_limit() {
    // Written under a 64 KiB limit, compacted after a restart with 2 KiB: still movable.
    let opts = |max_record_bytes| StoreOptions {
        max_record_bytes,
        compact_below_live_percent: 100,
        ..small_opts()
    };
    let open_with = |image: &CrashImage, max_record_bytes| {
        block_on(Store::open_in(
            MemDir::from_image(image, Faults::default()),
            opts(max_record_bytes),
        ))
        .unwrap()
        .0
    };
    let store = open_with(&CrashImage::default(), 64 << 10);
    let [dead, big] = [(); 2].map(|_| store.allocate_id());
    block_on(store.append(dead, 0, vec![payload(dead, 500)])).unwrap();
    block_on(store.append(big, 0, vec![payload(big, 2500)])).unwrap();
    let keep = fill(&store, 2, 1500); // rolls: the first segment is sealed
    block_on(store.mark_dead(&[dead])).unwrap();
    let store = open_with(&store.dir().cut_power_now(), 2 << 10);
    let report = block_on(store.reclaim()).unwrap();
    assert!(report.segments_compacted >= 1, "{report:?}");
    assert_eq!(&store.read(big).unwrap()[..], &payload(big, 2500)[..]);
    let mut got = ids_after_power_cut(&store);
    got.sort_unstable();
    assert_eq!(got, vec![big.0, keep[0].0, keep[1].0]);
}

#[test]
fn tombstone_is_carried_while_its_record_survives() {
    let (store, _) = open(&CrashImage::default(), Faults::default());
    // Segment A: seven records filling it exactly, one of which we kill; A stays (not sparse).
    let a = fill(&store, 7, 540);
    // The tombstone lands in the next segment B, together with records we then kill in bulk.
    block_on(store.mark_dead(&[a[0]])).unwrap();
    let b = fill(&store, 20, 500);
    block_on(store.mark_dead(&b)).unwrap();
    let report = block_on(store.reclaim()).unwrap();
    assert!(report.tombstones_carried >= 1, "{report:?}");
    let (_, recovered) = open(&store.dir().cut_power_now(), Faults::default());
    assert_eq!(
        recovered_ids(&recovered),
        a[1..].iter().map(|id| id.0).collect::<Vec<_>>()
    );
}

#[test]
fn a_tombstone_batch_larger_than_one_record_is_split_to_fit() {
    // 9,000 ids take 72,000 bytes, more than this store's 64 KiB records.
    let (store, _) = open(&CrashImage::default(), Faults::default());
    let ids = fill(&store, 9000, 0);
    block_on(store.mark_dead(&ids)).unwrap();
    assert!(ids_after_power_cut(&store).is_empty());
}

#[test]
fn a_compaction_that_fails_part_way_still_counts_the_copies_it_made() {
    // Two live records (x1 large, x2 small) share a sparse segment. Compaction copies both;
    // for some sync failure the large copy needs a roll that fails while the small one
    // lands. Both are then killed and everything reclaimed: no killed record may return.
    let (store, _) = open(&CrashImage::default(), Faults::default());
    let [x1, x2, d1, d2, l1, l2] = [(); 6].map(|_| store.allocate_id());
    block_on(async {
        store.append(x1, 0, vec![payload(x1, 1500)]).await.unwrap();
        store.append(x2, 0, vec![payload(x2, 100)]).await.unwrap();
        store.append(d1, 0, vec![payload(d1, 1500)]).await.unwrap();
        store.append(d2, 0, vec![payload(d2, 700)]).await.unwrap();
        store.append(l1, 0, vec![payload(l1, 1500)]).await.unwrap();
        store.mark_dead(&[d1, d2]).await.unwrap();
        store.append(l2, 0, vec![payload(l2, 1500)]).await.unwrap();
    });
    assert_eq!(store.segment_count(), 2);
    let image = store.dir().cut_power_now();
    let mut failed_compactions = 0;
    for failing_sync in 1..8 {
        let faults = Faults {
            fail_fdatasync_at: Some(failing_sync),
            ..Faults::default()
        };
        let (store, _) = open(&image, faults);
        if block_on(store.reclaim()).is_ok() {
            continue;
        }
        failed_compactions += 1;
        let [y1, y2, z] = [(); 3].map(|_| store.allocate_id());
        let went_on = block_on(async {
            store.append(y1, 0, vec![payload(y1, 1500)]).await?;
            store.mark_dead(&[x1, x2]).await?;
            store.append(y2, 0, vec![payload(y2, 1500)]).await?;
            store.mark_dead(&[y1, y2]).await?;
            store.append(z, 0, vec![payload(z, 1500)]).await?;
            Ok::<_, StoreError>(())
        });
        if went_on.is_err() {
            continue;
        }
        let _ = block_on(store.reclaim());
        let got = ids_after_power_cut(&store);
        assert!(
            !got.contains(&x1.0) && !got.contains(&x2.0),
            "sync {failing_sync} failing: a killed record came back: {got:?}"
        );
    }
    assert!(
        failed_compactions > 0,
        "no injected failure reached compaction"
    );
}

#[test]
fn a_segment_whose_unlink_was_not_synced_keeps_the_tombstones_of_its_records() {
    // Dead records fill segment A; their tombstones sit in later segments. Reclaim unlinks A
    // but the directory sync fails, so A may come back after a crash. Until a sync has made
    // its removal durable, the tombstones must stay, whatever is reclaimed or cut meanwhile.
    // Two records a segment: A = [dead, dead]; B = [short-lived, tombstone of A's records,
    // short-lived, its tombstone], so B can go too; then live records.
    let (store, _) = open(&CrashImage::default(), Faults::default());
    let dead = fill(&store, 2, 1500);
    for _ in 0..2 {
        let short_lived = fill(&store, 1, 1500);
        block_on(store.mark_dead(&dead)).unwrap();
        block_on(store.mark_dead(&short_lived)).unwrap();
    }
    let survivors = fill(&store, 2, 1500);
    fill(&store, 4, 1500);
    let image = store.dir().cut_power_now();
    let mut failed_unlinks = 0;
    for failing_dir_sync in 1..6 {
        for cut in 1..60 {
            for seed in 0..8 {
                let faults = Faults {
                    fail_dir_sync_at: Some(failing_dir_sync),
                    power_cut_at_op: Some(cut),
                    seed,
                    ..Faults::default()
                };
                let Ok(store) = open_faulty(&image, faults) else {
                    continue;
                };
                if block_on(store.reclaim()).is_err() {
                    failed_unlinks += 1;
                }
                // More churn, then reclaim again: the tombstones' segments go too.
                let _ = block_on(async {
                    let ids = [(); 4].map(|_| store.allocate_id());
                    for id in ids {
                        store.append(id, 0, vec![payload(id, 1500)]).await?;
                    }
                    store.mark_dead(&ids).await?;
                    store.reclaim().await
                });
                let got = ids_after_power_cut(&store);
                assert!(
                    dead.iter().all(|id| !got.contains(&id.0)),
                    "dir sync {failing_dir_sync} failing, cut at {cut}, seed {seed}: \
                     a dead record came back: {got:?}"
                );
                assert!(
                    survivors.iter().all(|id| got.contains(&id.0)),
                    "dir sync {failing_dir_sync} failing, cut at {cut}, seed {seed}: lost {got:?}"
                );
            }
        }
    }
    assert!(failed_unlinks > 0, "no injected failure reached an unlink");
}

#[test]
fn ids_are_not_reused_after_every_segment_was_deleted() {
    let (store, _) = open(&CrashImage::default(), Faults::default());
    let ids = fill(&store, 20, 500);
    block_on(store.mark_dead(&ids)).unwrap();
    fill(&store, 0, 0);
    let (reopened, _) = open(&store.dir().cut_power_now(), Faults::default());
    block_on(reopened.reclaim()).unwrap();
    let (again, recovered) = open(&reopened.dir().cut_power_now(), Faults::default());
    assert!(recovered.records.is_empty());
    assert!(again.allocate_id() > *ids.last().unwrap());
}

#[test]
fn power_cut_mid_append_leaves_a_torn_tail_that_recovery_clears() {
    // Find a cut that tears something, then check the second recovery is clean.
    for seed in 0..20 {
        let faults = Faults {
            power_cut_at_op: Some(12),
            seed,
            ..Faults::default()
        };
        let (store, _) = open(&CrashImage::default(), faults);
        let appends: Vec<_> = (0..8)
            .map(|_| {
                let id = store.allocate_id();
                store.append(id, 0, vec![payload(id, 900)])
            })
            .collect();
        let _ = block_on(join_all(appends));
        let image = store.dir().crash_image().expect("the cut happened");
        let (reopened, recovered) = open(&image, Faults::default());
        let (_, again) = open(&reopened.dir().cut_power_now(), Faults::default());
        assert_eq!(again.report.torn_tail_bytes, 0, "seed {seed}");
        assert_eq!(
            again.report.corrupt_regions, recovered.report.corrupt_regions,
            "seed {seed}"
        );
    }
}

// ---- the power-cut property test ----

/// One step of a generated workload.
#[derive(Clone, Debug)]
enum Op {
    /// Concurrent appends of these payload sizes (in pieces of at most `piece` bytes), the
    /// n-th starting `n * stagger` executor turns after the first (so that some are written
    /// while a commit round is in flight).
    Append {
        sizes: Vec<usize>,
        piece: usize,
        stagger: usize,
    },
    /// Marks dead the records at these positions of the attempted list (modulo its length).
    MarkDead(Vec<usize>),
    /// Runs a reclaim.
    Reclaim,
    /// Appends and kills concurrently with a reclaim and the making of a spare segment.
    Mixed { sizes: Vec<usize>, kill: Vec<usize> },
    /// Makes a spare segment for the next roll to take.
    PrepareSpare,
}

fn op_strategy() -> impl Strategy<Value = Op> {
    let size = prop_oneof![8 => 0usize..1200, 1 => 4000usize..9000];
    let sizes = proptest::collection::vec(size, 1..12);
    let picks = proptest::collection::vec(any::<usize>(), 1..8);
    prop_oneof![
        5 => (sizes.clone(), 1usize..2000, 0usize..8)
            .prop_map(|(sizes, piece, stagger)| Op::Append { sizes, piece, stagger }),
        3 => picks.clone().prop_map(Op::MarkDead),
        2 => Just(Op::Reclaim),
        2 => (sizes, picks).prop_map(|(sizes, kill)| Op::Mixed { sizes, kill }),
        1 => Just(Op::PrepareSpare),
    ]
}

/// What the test knows about the outcome of every operation.
#[derive(Default)]
struct Model {
    /// Every id an append was attempted for, with its payload.
    attempted: BTreeMap<RecordId, Vec<u8>>,
    /// Ids reported durable.
    acked: BTreeSet<RecordId>,
    /// Ids for which a mark_dead was attempted.
    kill_attempted: BTreeSet<RecordId>,
    /// Ids whose mark_dead was reported durable.
    kill_acked: BTreeSet<RecordId>,
}

type Boxed<'a> = Pin<Box<dyn Future<Output = ()> + 'a>>;

fn append_futures<'a>(
    store: &'a Store<MemDir>,
    model: &'a std::cell::RefCell<Model>,
    sizes: &[usize],
    piece: usize,
    stagger: usize,
) -> Vec<Boxed<'a>> {
    sizes
        .iter()
        .enumerate()
        .map(|(n, &size)| {
            let id = store.allocate_id();
            let body = payload(id, size);
            {
                let mut m = model.borrow_mut();
                m.attempted.insert(id, body.clone());
            }
            let pieces: Vec<Vec<u8>> = body.chunks(piece.max(1)).map(<[u8]>::to_vec).collect();
            Box::pin(async move {
                for _ in 0..n * stagger {
                    futures_lite::future::yield_now().await;
                }
                if store.append(id, (size % 251) as u8, pieces).await.is_ok() {
                    model.borrow_mut().acked.insert(id);
                }
            }) as Boxed<'a>
        })
        .collect()
}

fn kill_future<'a>(
    store: &'a Store<MemDir>,
    model: &'a std::cell::RefCell<Model>,
    picks: &'a [usize],
) -> Boxed<'a> {
    Box::pin(async move {
        // Only records reported durable can be killed: a mark_dead of anything else is a no-op.
        let victims: Vec<RecordId> = {
            let mut m = model.borrow_mut();
            let candidates: Vec<RecordId> = m.acked.iter().copied().collect();
            if candidates.is_empty() {
                return;
            }
            let victims: Vec<RecordId> = picks
                .iter()
                .map(|p| candidates[p % candidates.len()])
                .collect();
            m.kill_attempted.extend(victims.iter().copied());
            victims
        };
        if store.mark_dead(&victims).await.is_ok() {
            model.borrow_mut().kill_acked.extend(victims);
        }
    })
}

fn run_ops(store: &Store<MemDir>, model: &std::cell::RefCell<Model>, ops: &[Op]) {
    block_on(async {
        for op in ops {
            match op {
                Op::Append {
                    sizes,
                    piece,
                    stagger,
                } => {
                    join_all(append_futures(store, model, sizes, *piece, *stagger)).await;
                }
                Op::MarkDead(picks) => kill_future(store, model, picks).await,
                Op::Reclaim => {
                    let _ = store.reclaim().await;
                }
                Op::Mixed { sizes, kill } => {
                    let mut all = append_futures(store, model, sizes, 700, 0);
                    all.push(kill_future(store, model, kill));
                    all.push(Box::pin(async {
                        let _ = store.reclaim().await;
                    }));
                    all.push(Box::pin(async {
                        let _ = store.prepare_spare(|| async {}).await;
                    }));
                    join_all(all).await;
                }
                Op::PrepareSpare => {
                    let _ = store.prepare_spare(|| async {}).await;
                    let _ = store.switch_to_spare_early().await;
                }
            }
        }
    });
}

/// Checks a recovery against the model: nothing acknowledged lost, nothing killed resurrected,
/// nothing duplicated, every payload intact, no id reused.
fn check(recovered: &Recovered, store: &Store<MemDir>, model: &Model) -> Result<(), TestCaseError> {
    let mut seen = BTreeSet::new();
    for record in &recovered.records {
        prop_assert!(seen.insert(record.id), "duplicate {:?}", record.id);
        let expected = model.attempted.get(&record.id);
        prop_assert!(expected.is_some(), "unknown record {:?}", record.id);
        prop_assert_eq!(
            &record.record[..],
            &expected.unwrap()[..],
            "payload of {:?}",
            record.id
        );
        prop_assert!(
            !model.kill_acked.contains(&record.id),
            "resurrected {:?}",
            record.id
        );
    }
    for id in &model.acked {
        if !model.kill_attempted.contains(id) {
            prop_assert!(seen.contains(id), "lost {:?}", id);
        }
    }
    let next = store.allocate_id();
    prop_assert!(
        model.acked.iter().all(|id| *id < next),
        "id {next:?} reused"
    );
    Ok(())
}

/// Opens a log from `image` with `faults`; a fault during the open itself (a power cut or a
/// failed fdatasync) yields what the disk holds then instead of a store.
fn open_faulty(image: &CrashImage, faults: Faults) -> Result<Store<MemDir>, CrashImage> {
    let dir = MemDir::from_image(image, faults);
    match block_on(Store::open_in(dir.clone(), small_opts())) {
        Ok((store, _)) => Ok(store),
        Err(_) => Err(dir.cut_power_now()),
    }
}

/// Runs `ops` on a log opened from `image` and cut by `faults`; returns what the cut left.
fn run_phase(
    image: &CrashImage,
    faults: Faults,
    model: &std::cell::RefCell<Model>,
    ops: &[Op],
) -> CrashImage {
    match open_faulty(image, faults) {
        Ok(store) => {
            run_ops(&store, model, ops);
            store.dir().cut_power_now()
        }
        Err(image) => image,
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]

    #[test]
    fn power_cut_never_loses_or_resurrects(
        first in proptest::collection::vec(op_strategy(), 1..12),
        second in proptest::collection::vec(op_strategy(), 0..8),
        cut_first in 1u64..400,
        cut_second in 1u64..400,
        fail_sync in proptest::option::weighted(0.2, 1u64..40),
        fail_dir_sync in proptest::option::weighted(0.2, 1u64..12),
        sync_yields in prop_oneof![0u32..2, 2u32..12],
        failed_sync_lands: bool,
        seed: u64,
    ) {
        let model = std::cell::RefCell::new(Model::default());
        // Phase one: a fresh log, cut at some operation (or after the last). Slow fdatasyncs
        // make commit rounds overlap.
        let faults = Faults {
            power_cut_at_op: Some(cut_first),
            fail_fdatasync_at: fail_sync,
            fail_dir_sync_at: fail_dir_sync,
            seed,
            fdatasync_yields: sync_yields,
            failed_sync_lands,
        };
        let image = run_phase(&CrashImage::default(), faults, &model, &first);
        let (store, recovered) = open(&image, Faults::default());
        check(&recovered, &store, &model.borrow())?;
        // Whatever recovery handed back is durable now, acknowledged or not.
        model.borrow_mut().acked.extend(recovered.records.iter().map(|r| r.id));
        // Phase two: keep going on the recovered log, cut again.
        let faults = Faults {
            power_cut_at_op: Some(cut_second),
            seed: seed ^ 1,
            fdatasync_yields: sync_yields,
            ..Faults::default()
        };
        let image = run_phase(&store.dir().cut_power_now(), faults, &model, &second);
        let (store, recovered) = open(&image, Faults::default());
        check(&recovered, &store, &model.borrow())?;
    }
}
