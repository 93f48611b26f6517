//! The per-shard cap on DATA bytes not yet durable (README, "Limits without a configuration
//! key").
//!
//! Every SMTP session counts each body byte it holds, from the read that brought it in until
//! its record is durable or the body is dropped, through a [`BodyHold`] whose drop gives the
//! bytes back on every path (refusal, disconnect, a task dropped at the end of the shutdown
//! grace).
//!
//! Only reads of body bytes the session keeps wait for room: a session in command phase, or
//! throwing a body away (too big, a bare line ending), is always read, so a shard at its cap
//! still greets and answers everyone else, and refuses an oversized body as it streams in.
//!
//! Progress: waiting sessions cannot free anything, so if every session were mid-body and
//! waiting, none would ever finish. The body that started first (the oldest ticket) is
//! therefore never held back: it finishes, or its client is cut off by the idle timeout or
//! the minimum data rate, and the next oldest inherits the right. Tickets are handed out in
//! order, so every waiting body gets its turn.
//!
//! Bound: a session checks for room before each read and reads at most one input buffer, so
//! the count stays below `cap + M + B + n × B`, where M is `max_message_size` (plus the
//! stuffing dots, which the size leaves out) that the oldest body may add beyond the cap, B is
//! `DATA_BUFFER_BYTES` (64 KiB) and n the number of sessions reading a body at once that
//! found room; those n buffers are the input buffers such sessions have allocated anyway.
//!
//! What the bound costs, on purpose:
//! - between the chunks of a BDAT transaction the next read usually carries chunk octets
//!   behind the BDAT command, so it waits for room like any body read, even if the client
//!   meant to send RSET or QUIT. Reading there freely would let a client of tiny chunks add
//!   to its body without ever waiting;
//! - an oldest BDAT body whose client idles between chunks keeps its right, and holds the
//!   others back until it goes on or the idle timeout ends it. Handing the right on instead
//!   would let each body in turn grow past the cap.

use std::cell::{Cell, RefCell};
use std::collections::{BTreeSet, HashMap};
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, Waker};

/// The cap for `max_message_size` from 16 MiB to 128 MiB (the default 25 MiB included);
/// above that, two maximal messages.
pub const DATA_BYTES_CAP_DEFAULT: u64 = 256 << 20;
/// Below [`DATA_BYTES_CAP_DEFAULT`], the cap is this many maximal messages: a server that
/// only takes small messages sets aside memory in proportion to what it accepts, and still
/// holds far more typical bodies than that in flight.
const CAP_IN_MAXIMAL_MESSAGES: u64 = 16;
/// Never fewer maximal messages than this, so one always fits beside another in progress.
const MIN_MAXIMAL_MESSAGES: u64 = 2;

/// The cap on a shard's DATA bytes not yet durable for a given `max_message_size`.
pub fn data_bytes_cap(max_message_size: u64) -> u64 {
    max_message_size
        .saturating_mul(CAP_IN_MAXIMAL_MESSAGES)
        .min(DATA_BYTES_CAP_DEFAULT)
        .max(max_message_size.saturating_mul(MIN_MAXIMAL_MESSAGES))
}

/// One shard's count of undurable body bytes and the sessions waiting for room.
#[derive(Debug)]
pub struct DataBytes {
    cap: u64,
    held: Cell<u64>,
    /// Tickets of the bodies in progress; the first is the one never held back.
    bodies: RefCell<BTreeSet<u64>>,
    next_ticket: Cell<u64>,
    /// Sessions waiting for room, by waiter number.
    waiters: RefCell<HashMap<u64, Waker>>,
    next_waiter: Cell<u64>,
}

impl DataBytes {
    pub fn new(cap: u64) -> DataBytes {
        DataBytes {
            cap,
            held: Cell::new(0),
            bodies: RefCell::new(BTreeSet::new()),
            next_ticket: Cell::new(0),
            waiters: RefCell::new(HashMap::new()),
            next_waiter: Cell::new(0),
        }
    }

    /// A session's account, holding nothing yet.
    pub fn hold(&self) -> BodyHold<'_> {
        BodyHold {
            ledger: self,
            bytes: 0,
            ticket: None,
        }
    }

    /// Bytes counted right now, over all sessions.
    pub fn held(&self) -> u64 {
        self.held.get()
    }

    /// Room appeared or the oldest body changed: every waiter looks again. Wakers are taken
    /// out first so that no borrow is held while they run.
    fn wake_waiters(&self) {
        let waiters: Vec<Waker> = self.waiters.borrow_mut().drain().map(|(_, w)| w).collect();
        for waker in waiters {
            waker.wake();
        }
    }
}

/// One session's counted body bytes and its place in line; dropping it gives both back.
#[derive(Debug)]
pub struct BodyHold<'a> {
    ledger: &'a DataBytes,
    bytes: u64,
    ticket: Option<u64>,
}

impl BodyHold<'_> {
    /// The session now holds `bytes` body bytes; `in_body` says whether a body is under
    /// way. A body takes its ticket when it starts and keeps it until it is over and none
    /// of its bytes are held any more (durable or dropped).
    pub fn update(&mut self, bytes: u64, in_body: bool) {
        let ledger = self.ledger;
        let mut freed = false;
        if bytes != self.bytes {
            ledger
                .held
                .set((ledger.held.get() + bytes).saturating_sub(self.bytes));
            freed = bytes < self.bytes;
            self.bytes = bytes;
        }
        match self.ticket {
            None if in_body || bytes > 0 => {
                let ticket = ledger.next_ticket.get();
                ledger.next_ticket.set(ticket + 1);
                ledger.bodies.borrow_mut().insert(ticket);
                self.ticket = Some(ticket);
            }
            Some(ticket) if !in_body && bytes == 0 => {
                ledger.bodies.borrow_mut().remove(&ticket);
                self.ticket = None;
                freed = true;
            }
            _ => {}
        }
        if freed {
            ledger.wake_waiters();
        }
    }

    /// Whether this session may read body bytes now: there is room under the cap, or its
    /// body is the oldest in progress.
    pub fn may_read(&self) -> bool {
        let ledger = self.ledger;
        ledger.held.get() < ledger.cap
            || self
                .ticket
                .is_some_and(|t| ledger.bodies.borrow().first() == Some(&t))
    }

    /// Resolves once [`BodyHold::may_read`] holds; woken by releases, never by polling.
    pub fn room(&self) -> Room<'_, '_> {
        Room {
            hold: self,
            waiter: None,
        }
    }
}

impl Drop for BodyHold<'_> {
    fn drop(&mut self) {
        self.update(0, false);
    }
}

/// The future of [`BodyHold::room`].
#[derive(Debug)]
pub struct Room<'h, 'a> {
    hold: &'h BodyHold<'a>,
    waiter: Option<u64>,
}

impl Future for Room<'_, '_> {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let this = self.get_mut();
        let ledger = this.hold.ledger;
        if this.hold.may_read() {
            if let Some(waiter) = this.waiter.take() {
                ledger.waiters.borrow_mut().remove(&waiter);
            }
            return Poll::Ready(());
        }
        let waiter = *this.waiter.get_or_insert_with(|| {
            let waiter = ledger.next_waiter.get();
            ledger.next_waiter.set(waiter + 1);
            waiter
        });
        ledger
            .waiters
            .borrow_mut()
            .insert(waiter, cx.waker().clone());
        Poll::Pending
    }
}

impl Drop for Room<'_, '_> {
    fn drop(&mut self) {
        if let Some(waiter) = self.waiter {
            self.hold.ledger.waiters.borrow_mut().remove(&waiter);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;
    use std::task::Wake;

    #[derive(Default)]
    struct CountingWaker(AtomicUsize);

    impl Wake for CountingWaker {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    fn poll(room: &mut Room<'_, '_>, waker: &Arc<CountingWaker>) -> Poll<()> {
        let waker = Waker::from(Arc::clone(waker));
        Pin::new(room).poll(&mut Context::from_waker(&waker))
    }

    #[test]
    fn the_cap_scales_with_small_messages_and_keeps_two_big_ones() {
        assert_eq!(data_bytes_cap(26_214_400), DATA_BYTES_CAP_DEFAULT);
        assert_eq!(data_bytes_cap(16 << 20), DATA_BYTES_CAP_DEFAULT);
        assert_eq!(data_bytes_cap(256 << 10), 4 << 20);
        assert_eq!(data_bytes_cap(1 << 30), 2 << 30);
        assert_eq!(data_bytes_cap(u64::MAX), u64::MAX);
    }

    #[test]
    fn every_byte_counts_until_released_on_every_path() {
        let ledger = DataBytes::new(1000);
        let mut a = ledger.hold();
        let mut b = ledger.hold();
        a.update(300, true);
        b.update(500, true);
        assert_eq!(ledger.held(), 800);
        // Handed to the store: no longer in body, still counted until durable.
        a.update(300, false);
        assert_eq!(ledger.held(), 800);
        a.update(0, false);
        assert_eq!(ledger.held(), 500);
        // A disconnect drops the hold.
        drop(b);
        assert_eq!(ledger.held(), 0);
        assert!(ledger.bodies.borrow().is_empty());
        drop(a);
        assert_eq!(ledger.held(), 0);
    }

    #[test]
    fn over_the_cap_only_the_oldest_body_may_read() {
        let ledger = DataBytes::new(1000);
        let mut old = ledger.hold();
        let mut young = ledger.hold();
        let mut fresh = ledger.hold();
        old.update(100, true);
        young.update(1950, true);
        fresh.update(0, true);
        assert!(old.may_read());
        assert!(!young.may_read());
        assert!(!fresh.may_read());
        // The oldest finishing hands the right to the next in line, even over the cap.
        old.update(0, false);
        assert!(ledger.held() >= 1000 && young.may_read() && !fresh.may_read());
        young.update(0, false);
        assert!(fresh.may_read());
    }

    #[test]
    fn a_waiter_is_woken_by_a_release_and_forgotten_when_dropped() {
        let ledger = DataBytes::new(1000);
        let mut old = ledger.hold();
        let mut young = ledger.hold();
        old.update(1200, true);
        young.update(10, true);
        let waker = Arc::new(CountingWaker::default());
        let mut room = young.room();
        assert!(poll(&mut room, &waker).is_pending());
        assert!(poll(&mut room, &waker).is_pending());
        // Re-polling replaces the registration rather than piling up wakers.
        assert_eq!(ledger.waiters.borrow().len(), 1);
        // Growth frees nothing: no wake-up.
        old.update(1300, true);
        assert_eq!(waker.0.load(Ordering::SeqCst), 0);
        old.update(0, false);
        assert_eq!(waker.0.load(Ordering::SeqCst), 1);
        assert!(poll(&mut room, &waker).is_ready());
        assert!(ledger.waiters.borrow().is_empty());

        let mut blocker = ledger.hold();
        blocker.update(2000, false);
        let mut third = ledger.hold();
        third.update(0, true);
        {
            let mut room = third.room();
            assert!(poll(&mut room, &waker).is_pending());
        }
        assert!(ledger.waiters.borrow().is_empty());
    }
}
