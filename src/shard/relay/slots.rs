//! `max_connections_per_domain` across the whole process: every shard relays on its own, so
//! the count of open connections per destination domain is the one thing they share. The
//! mutex is taken once per connection (not per message), far off the hot path.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

/// Open relay connections per destination domain, across every shard.
#[derive(Debug)]
pub struct DomainConnectionLimits {
    /// `max_connections_per_domain`.
    cap: usize,
    /// Domain → connections open now; a domain leaves the map when its count drops to zero,
    /// so the map never holds more entries than there are open connections.
    open: Mutex<HashMap<String, usize>>,
}

impl DomainConnectionLimits {
    /// Limits with at most `cap` connections per domain (at least one, or nothing is sent).
    pub fn new(cap: usize) -> Arc<Self> {
        Arc::new(DomainConnectionLimits {
            cap: cap.max(1),
            open: Mutex::new(HashMap::new()),
        })
    }

    /// The per-domain cap.
    pub fn cap(&self) -> usize {
        self.cap
    }

    /// A slot for one more connection to `domain`, or `None` when the cap is reached; the
    /// slot is given back when dropped.
    pub fn try_acquire(self: &Arc<Self>, domain: &str) -> Option<ConnectionSlot> {
        let mut open = self.open.lock().unwrap_or_else(|e| e.into_inner());
        let count = open.entry(domain.to_owned()).or_insert(0);
        if *count >= self.cap {
            return None;
        }
        *count += 1;
        Some(ConnectionSlot {
            limits: Arc::clone(self),
            domain: domain.to_owned(),
        })
    }

    /// Connections open to `domain` now (for tests and metrics).
    pub fn open(&self, domain: &str) -> usize {
        let open = self.open.lock().unwrap_or_else(|e| e.into_inner());
        open.get(domain).copied().unwrap_or(0)
    }
}

/// One open (or opening) connection's claim on its domain's cap.
#[derive(Debug)]
pub struct ConnectionSlot {
    limits: Arc<DomainConnectionLimits>,
    domain: String,
}

impl Drop for ConnectionSlot {
    fn drop(&mut self) {
        let mut open = self.limits.open.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(count) = open.get_mut(&self.domain) {
            *count = count.saturating_sub(1);
            if *count == 0 {
                open.remove(&self.domain);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_are_capped_per_domain_and_given_back_on_drop() {
        let limits = DomainConnectionLimits::new(2);
        let a = limits.try_acquire("far.test").unwrap();
        let b = limits.try_acquire("far.test").unwrap();
        assert!(limits.try_acquire("far.test").is_none());
        let other = limits.try_acquire("other.test").unwrap();
        assert_eq!(limits.open("far.test"), 2);
        drop(a);
        assert_eq!(limits.open("far.test"), 1);
        let c = limits.try_acquire("far.test").unwrap();
        drop((b, c, other));
        assert_eq!(limits.open("far.test"), 0);
        assert!(limits.open.lock().unwrap().is_empty());
    }

    #[test]
    fn a_zero_cap_still_allows_one_connection() {
        let limits = DomainConnectionLimits::new(0);
        assert_eq!(limits.cap(), 1);
        let _slot = limits.try_acquire("x").unwrap();
        assert!(limits.try_acquire("x").is_none());
    }
}
