//! Connection limits: open connections per client IP across all workers
//! (`server.max_connections_per_ip`) and per worker (`server.max_connections`).

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

/// Shards of the per-IP table: a connection locks one, so workers accepting at once rarely
/// wait on each other.
const SHARDS: usize = 16;

/// Open connections per client IP. An IP's entry goes when its last connection closes, so
/// the table holds only the IPs with connections open.
pub struct ClientConnections {
    max: usize,
    /// IPv6 clients are counted per network of this many bits (one subscriber holds a
    /// whole /64 and could otherwise open `max` connections from each address in it).
    ipv6_prefix: u8,
    shards: Box<[Mutex<HashMap<IpAddr, usize>>]>,
}

impl ClientConnections {
    /// `max` = 0: no limit (nothing is counted).
    pub fn new(max: usize, ipv6_prefix: u8) -> ClientConnections {
        ClientConnections {
            max,
            ipv6_prefix,
            shards: (0..SHARDS).map(|_| Mutex::default()).collect(),
        }
    }

    fn shard(&self, ip: &IpAddr) -> &Mutex<HashMap<IpAddr, usize>> {
        let hash = match ip {
            IpAddr::V4(v4) => u32::from(*v4) as usize,
            IpAddr::V6(v6) => (u128::from(*v6) ^ (u128::from(*v6) >> 64)) as usize,
        };
        &self.shards[hash.wrapping_mul(0x9E37_79B9) % SHARDS]
    }

    /// A slot for one more connection from `ip`, or `None` at the limit.
    pub fn open(self: &Arc<Self>, ip: IpAddr) -> Option<IpSlot> {
        if self.max == 0 {
            return Some(IpSlot { table: None, ip });
        }
        let ip = self.client(ip);
        let mut shard = self.shard(&ip).lock().unwrap_or_else(|e| e.into_inner());
        let count = shard.entry(ip).or_insert(0);
        if *count >= self.max {
            return None;
        }
        *count += 1;
        Some(IpSlot {
            table: Some(self.clone()),
            ip,
        })
    }

    /// The address a client is counted by: IPv4 as is, IPv6 by its network.
    fn client(&self, ip: IpAddr) -> IpAddr {
        match ip {
            IpAddr::V6(v6) if self.ipv6_prefix < 128 => {
                let mask = u128::MAX.checked_shl(128 - u32::from(self.ipv6_prefix)).unwrap_or(0);
                IpAddr::V6(std::net::Ipv6Addr::from(u128::from(v6) & mask))
            }
            ip => ip,
        }
    }

    pub fn open_from(&self, ip: IpAddr) -> usize {
        let ip = self.client(ip);
        let shard = self.shard(&ip).lock().unwrap_or_else(|e| e.into_inner());
        shard.get(&ip).copied().unwrap_or(0)
    }

    fn close(&self, ip: IpAddr) {
        let mut shard = self.shard(&ip).lock().unwrap_or_else(|e| e.into_inner());
        if let Some(count) = shard.get_mut(&ip) {
            *count -= 1;
            if *count == 0 {
                shard.remove(&ip);
            }
        }
    }
}

/// One connection's place in the per-IP count, given back on drop.
pub struct IpSlot {
    table: Option<Arc<ClientConnections>>,
    ip: IpAddr,
}

impl Drop for IpSlot {
    fn drop(&mut self) {
        if let Some(table) = &self.table {
            table.close(self.ip);
        }
    }
}

/// A worker's open connections against `server.max_connections`.
pub struct WorkerConnections {
    max: usize,
    open: AtomicUsize,
}

impl WorkerConnections {
    pub fn new(max: usize) -> WorkerConnections {
        WorkerConnections {
            max,
            open: AtomicUsize::new(0),
        }
    }

    pub fn open(self: &Arc<Self>) -> Option<WorkerSlot> {
        let before = self.open.fetch_add(1, Ordering::Relaxed);
        let slot = WorkerSlot(self.clone());
        (self.max == 0 || before < self.max).then_some(slot)
    }
}

pub struct WorkerSlot(Arc<WorkerConnections>);

impl Drop for WorkerSlot {
    fn drop(&mut self) {
        self.0.open.fetch_sub(1, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn per_ip_slots_stop_at_the_limit_and_come_back() {
        let table = Arc::new(ClientConnections::new(2, 64));
        let a: IpAddr = "192.0.2.1".parse().unwrap();
        let b: IpAddr = "2001:db8::1".parse().unwrap();
        let first = table.open(a).unwrap();
        let _second = table.open(a).unwrap();
        assert!(table.open(a).is_none());
        let _other = table.open(b).expect("another IP is not affected");
        drop(first);
        assert!(table.open(a).is_some());
        assert_eq!(table.open_from(a), 1);
        let unlimited = Arc::new(ClientConnections::new(0, 64));
        let many: Vec<_> = (0..100).map(|_| unlimited.open(a).unwrap()).collect();
        assert_eq!(many.len(), 100);
    }

    #[test]
    fn ipv6_clients_are_counted_per_network() {
        let table = Arc::new(ClientConnections::new(2, 64));
        let a: IpAddr = "2001:db8:1:2::1".parse().unwrap();
        let b: IpAddr = "2001:db8:1:2:ffff::9".parse().unwrap();
        let _first = table.open(a).unwrap();
        let _second = table.open(b).unwrap();
        assert!(table.open("2001:db8:1:2::77".parse().unwrap()).is_none(), "same /64");
        assert!(table.open("2001:db8:1:3::1".parse().unwrap()).is_some(), "another /64");
        let exact = Arc::new(ClientConnections::new(1, 128));
        let _one = exact.open(a).unwrap();
        assert!(exact.open(b).is_some());
    }

    #[test]
    fn closed_ips_leave_the_table() {
        let table = Arc::new(ClientConnections::new(5, 64));
        for i in 0..1000u32 {
            drop(table.open(IpAddr::from(i.to_be_bytes())).unwrap());
        }
        let held: usize = table.shards.iter().map(|s| s.lock().unwrap().len()).sum();
        assert_eq!(held, 0);
    }

    #[test]
    fn worker_slots() {
        let worker = Arc::new(WorkerConnections::new(1));
        let first = worker.open().unwrap();
        assert!(worker.open().is_none());
        drop(first);
        assert!(worker.open().is_some());
    }
}
