//! Two tiny single-thread async helpers the log needs and that would otherwise tie it to one
//! executor: a broadcast wake-up and a join over many futures.

use std::cell::RefCell;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, Waker};

/// Wakes every waiting task when some shared state changed; waiters re-check their condition
/// in a loop, so a spurious wake-up is harmless and a missed one impossible (single thread:
/// nothing changes between the check and the registration).
#[derive(Default)]
pub struct Notify {
    /// Tasks to wake on the next [`Notify::notify_all`].
    wakers: RefCell<Vec<Waker>>,
}

impl Notify {
    /// Wakes every task waiting now.
    pub fn notify_all(&self) {
        for waker in self.wakers.take() {
            waker.wake();
        }
    }

    /// Resolves after the next [`Notify::notify_all`] (or a spurious wake-up).
    pub fn wait(&self) -> Wait<'_> {
        Wait {
            notify: self,
            registered: false,
        }
    }
}

/// Future returned by [`Notify::wait`].
pub struct Wait<'a> {
    /// Where to register.
    notify: &'a Notify,
    /// Pending once, then ready.
    registered: bool,
}

impl Future for Wait<'_> {
    type Output = ();

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        if self.registered {
            return Poll::Ready(());
        }
        self.registered = true;
        self.notify.wakers.borrow_mut().push(cx.waker().clone());
        Poll::Pending
    }
}

/// A future being joined and, once it finished, its output.
type Slot<F> = (Pin<Box<F>>, Option<<F as Future>::Output>);

/// Runs every future concurrently on the current task and returns their outputs in order.
pub async fn join_all<F: Future>(futures: Vec<F>) -> Vec<F::Output> {
    let mut slots: Vec<Slot<F>> = futures.into_iter().map(|f| (Box::pin(f), None)).collect();
    std::future::poll_fn(|cx| {
        let mut all_done = true;
        for (future, output) in slots.iter_mut() {
            if output.is_none() {
                match future.as_mut().poll(cx) {
                    Poll::Ready(value) => *output = Some(value),
                    Poll::Pending => all_done = false,
                }
            }
        }
        if all_done {
            Poll::Ready(())
        } else {
            Poll::Pending
        }
    })
    .await;
    slots
        .into_iter()
        .map(|(_, output)| output.expect("every future completed"))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::Cell;

    #[test]
    fn join_all_interleaves_and_keeps_order() {
        let notify = Notify::default();
        let ready = Cell::new(false);
        let waiter = async {
            while !ready.get() {
                notify.wait().await;
            }
            1
        };
        let setter = async {
            futures_lite::future::yield_now().await;
            ready.set(true);
            notify.notify_all();
            2
        };
        let outputs = futures_lite::future::block_on(join_all(vec![
            Box::pin(waiter) as Pin<Box<dyn Future<Output = i32>>>,
            Box::pin(setter),
        ]));
        assert_eq!(outputs, [1, 2]);
    }
}
