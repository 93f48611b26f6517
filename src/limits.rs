//! Connection admission across the whole process (`max_connections`, `max_connections_per_ip`).
//!
//! These limits are per process while connections land on any shard, so the counts are shared.
//! They are touched once when a connection opens and once when it closes — never per message —
//! so an atomic and a briefly held mutex cost nothing measurable next to the accept itself.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

/// Shared counters for one protocol's connections.
#[derive(Debug)]
pub struct ConnectionLimits {
    max_total: usize,
    max_per_ip: usize,
    total: AtomicUsize,
    per_ip: Mutex<HashMap<IpAddr, usize>>,
}

/// Why a connection was turned away.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    TooManyConnections,
    TooManyFromAddress,
}

/// Holds one admitted connection's place; dropping it frees the place, however the
/// connection ended.
#[derive(Debug)]
pub struct ConnectionSlot {
    limits: Arc<ConnectionLimits>,
    ip: IpAddr,
}

impl ConnectionLimits {
    pub fn new(max_total: usize, max_per_ip: usize) -> Arc<Self> {
        Arc::new(ConnectionLimits {
            max_total,
            max_per_ip,
            total: AtomicUsize::new(0),
            per_ip: Mutex::new(HashMap::new()),
        })
    }

    /// Admits a connection from `ip`, or says which limit it would break.
    pub fn admit(self: &Arc<Self>, ip: IpAddr) -> Result<ConnectionSlot, Refusal> {
        // A dual-stack listener shows an IPv4 client as ::ffff:a.b.c.d; counted raw, the same
        // client would get a second allowance beside its plain IPv4 connections.
        let ip = ip.to_canonical();
        if self.total.fetch_add(1, Ordering::AcqRel) >= self.max_total {
            self.total.fetch_sub(1, Ordering::AcqRel);
            return Err(Refusal::TooManyConnections);
        }
        let mut per_ip = self.per_ip.lock().unwrap_or_else(|p| p.into_inner());
        let count = per_ip.entry(ip).or_insert(0);
        if *count >= self.max_per_ip {
            drop(per_ip);
            self.total.fetch_sub(1, Ordering::AcqRel);
            return Err(Refusal::TooManyFromAddress);
        }
        *count += 1;
        Ok(ConnectionSlot {
            limits: Arc::clone(self),
            ip,
        })
    }

    /// Connections open right now (for metrics and tests).
    pub fn open(&self) -> usize {
        self.total.load(Ordering::Acquire)
    }
}

impl Drop for ConnectionSlot {
    fn drop(&mut self) {
        let mut per_ip = self.limits.per_ip.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(count) = per_ip.get_mut(&self.ip) {
            *count -= 1;
            if *count == 0 {
                // Keeps the map as small as the set of connected clients.
                per_ip.remove(&self.ip);
            }
        }
        drop(per_ip);
        self.limits.total.fetch_sub(1, Ordering::AcqRel);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limits_are_enforced_and_released() {
        let limits = ConnectionLimits::new(3, 2);
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        let b: IpAddr = "10.0.0.2".parse().unwrap();
        let s1 = limits.admit(a).unwrap();
        let _s2 = limits.admit(a).unwrap();
        assert_eq!(limits.admit(a).unwrap_err(), Refusal::TooManyFromAddress);
        let _s3 = limits.admit(b).unwrap();
        assert_eq!(limits.admit(b).unwrap_err(), Refusal::TooManyConnections);
        assert_eq!(limits.open(), 3);
        drop(s1);
        assert_eq!(limits.open(), 2);
        let _s4 = limits.admit(a).unwrap();
        assert!(limits.per_ip.lock().unwrap().len() == 2);
    }

    #[test]
    fn ipv4_mapped_addresses_count_as_their_ipv4_address() {
        let limits = ConnectionLimits::new(10, 2);
        let v4: IpAddr = "192.0.2.7".parse().unwrap();
        let mapped: IpAddr = "::ffff:192.0.2.7".parse().unwrap();
        let _s1 = limits.admit(v4).unwrap();
        let s2 = limits.admit(mapped).unwrap();
        assert_eq!(limits.admit(v4).unwrap_err(), Refusal::TooManyFromAddress);
        assert_eq!(
            limits.admit(mapped).unwrap_err(),
            Refusal::TooManyFromAddress
        );
        assert_eq!(limits.per_ip.lock().unwrap().len(), 1);
        // The slot frees the canonical entry it counted, not the mapped form.
        drop(s2);
        let _s3 = limits.admit(mapped).unwrap();
        // A real IPv6 address is its own client.
        let _s4 = limits.admit("2001:db8::7".parse().unwrap()).unwrap();
    }
}
