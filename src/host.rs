//! What the host grants: locked memory for io_uring and open files.
//!
//! glommio registers a pool of I/O memory with each ring. Unprivileged users usually have an
//! 8 MiB locked-memory limit; glommio then quietly skips registration, and below 512 KiB it
//! cannot start at all. We check for ourselves, size the registered pool to fit the limit, say
//! once what the limit costs, and refuse only where the engine truly cannot run.

use std::fmt;

/// glommio's own default pool of registered I/O memory per shard.
pub const PREFERRED_IO_MEMORY_BYTES: u64 = 10 << 20;
/// Below this glommio refuses to build a reactor.
pub const MIN_MEMLOCK_BYTES: u64 = 512 << 10;
/// The smallest registered pool glommio will use.
const MIN_IO_MEMORY_BYTES: u64 = 64 << 10;
/// Descriptors one shard needs before any connection: rings, eventfds, listeners, log files.
const FDS_PER_SHARD: u64 = 32;
/// Descriptors the process needs besides its shards (stdio, lock file, signal pipe…).
const FDS_BASE: u64 = 64;

/// How the engine will run on this host.
#[derive(Debug, Clone, PartialEq)]
pub struct HostPlan {
    /// Registered I/O memory to give each shard's reactor.
    pub io_memory_per_shard_bytes: u64,
    /// The open-files limit in force after raising the soft limit to the hard one.
    pub open_files: u64,
    /// Things worth saying once at start: what a limit costs and how to raise it.
    pub notes: Vec<String>,
}

/// A limit below what the engine needs to run at all.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum HostError {
    #[error("the locked-memory limit (RLIMIT_MEMLOCK, `ulimit -l`) is {limit_kib} KiB, below the {min_kib} KiB io_uring needs to start; raise it with `ulimit -l unlimited`, LimitMEMLOCK=infinity in the systemd unit, or memlock in /etc/security/limits.conf (see tuning/README.md)")]
    MemlockTooLow { limit_kib: u64, min_kib: u64 },
    #[error("the open-files limit (RLIMIT_NOFILE, `ulimit -n`) is {limit}, below the {needed} that {shards} shards need to start; raise it with `ulimit -n 1048576` or LimitNOFILE= in the systemd unit (see tuning/README.md)")]
    OpenFilesTooLow {
        limit: u64,
        needed: u64,
        shards: usize,
    },
}

/// One resource limit: soft and hard, `None` meaning unlimited.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Limit {
    pub soft: Option<u64>,
    pub hard: Option<u64>,
}

fn get_limit(resource: libc::__rlimit_resource_t) -> Limit {
    let mut rl = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes into the struct we own.
    unsafe { libc::getrlimit(resource, &mut rl) };
    let finite = |v: libc::rlim_t| (v != libc::RLIM_INFINITY).then_some(v);
    Limit {
        soft: finite(rl.rlim_cur),
        hard: finite(rl.rlim_max),
    }
}

/// Whether this process holds CAP_IPC_LOCK, which exempts it from RLIMIT_MEMLOCK.
fn has_ipc_lock_capability() -> bool {
    const CAP_IPC_LOCK: u32 = 14;
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|status| {
            status
                .lines()
                .find_map(|l| l.strip_prefix("CapEff:"))
                .and_then(|hex| u64::from_str_radix(hex.trim(), 16).ok())
        })
        .is_some_and(|caps| caps & (1 << CAP_IPC_LOCK) != 0)
}

/// Raises the open-files soft limit to the hard limit and plans the engine around what is left.
pub fn prepare(shards: usize, max_connections: usize) -> Result<HostPlan, HostError> {
    let memlock = get_limit(libc::RLIMIT_MEMLOCK);
    let privileged = has_ipc_lock_capability();
    let open_files = raise_open_files();
    plan(shards, max_connections, memlock, privileged, open_files)
}

fn raise_open_files() -> Limit {
    let before = get_limit(libc::RLIMIT_NOFILE);
    if before.soft != before.hard {
        let rl = libc::rlimit {
            rlim_cur: before.hard.unwrap_or(libc::RLIM_INFINITY),
            rlim_max: before.hard.unwrap_or(libc::RLIM_INFINITY),
        };
        // SAFETY: setrlimit reads the struct we own; raising soft up to hard is always allowed.
        unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &rl) };
    }
    get_limit(libc::RLIMIT_NOFILE)
}

/// The decision, separated from the system calls so it can be tested.
pub fn plan(
    shards: usize,
    max_connections: usize,
    memlock: Limit,
    privileged: bool,
    open_files: Limit,
) -> Result<HostPlan, HostError> {
    let mut notes = Vec::new();
    let shards_u64 = shards as u64;
    let io_memory_per_shard_bytes = match memlock.soft {
        Some(_) if privileged => PREFERRED_IO_MEMORY_BYTES,
        None => PREFERRED_IO_MEMORY_BYTES,
        Some(limit) if limit < MIN_MEMLOCK_BYTES => {
            return Err(HostError::MemlockTooLow {
                limit_kib: limit >> 10,
                min_kib: MIN_MEMLOCK_BYTES >> 10,
            })
        }
        Some(limit) => {
            let wanted = PREFERRED_IO_MEMORY_BYTES * shards_u64;
            // The rings themselves also count against the limit on older kernels: keep half back.
            let share = (limit / 2 / shards_u64.max(1)) & !4095;
            if share < PREFERRED_IO_MEMORY_BYTES {
                notes.push(format!(
                    "locked-memory limit is {} KiB: each shard registers {} KiB of I/O memory instead of {} KiB ({} KiB for {shards} shards); larger log writes then use unregistered buffers and cost more CPU. Raise it with `ulimit -l unlimited` or LimitMEMLOCK=infinity (tuning/README.md)",
                    limit >> 10,
                    share.max(MIN_IO_MEMORY_BYTES) >> 10,
                    PREFERRED_IO_MEMORY_BYTES >> 10,
                    wanted >> 10,
                ));
            }
            share.clamp(MIN_IO_MEMORY_BYTES, PREFERRED_IO_MEMORY_BYTES)
        }
    };
    let needed = FDS_BASE + FDS_PER_SHARD * shards_u64;
    let limit = open_files.soft.unwrap_or(u64::MAX);
    if limit < needed {
        return Err(HostError::OpenFilesTooLow {
            limit,
            needed,
            shards,
        });
    }
    let comfortable = needed + max_connections as u64 * 2;
    if limit < comfortable {
        notes.push(format!(
            "open-files limit is {limit}: fewer than the {comfortable} that max_connections = {max_connections} could use; connections beyond it fail to be accepted. Raise it with `ulimit -n 1048576` or LimitNOFILE= (tuning/README.md)"
        ));
    }
    Ok(HostPlan {
        io_memory_per_shard_bytes,
        open_files: limit,
        notes,
    })
}

impl fmt::Display for HostPlan {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} KiB registered I/O memory per shard, {} open files",
            self.io_memory_per_shard_bytes >> 10,
            self.open_files
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const UNLIMITED: Limit = Limit {
        soft: None,
        hard: None,
    };

    fn files(n: u64) -> Limit {
        Limit {
            soft: Some(n),
            hard: Some(n),
        }
    }

    #[test]
    fn unprivileged_default_limit_runs_with_a_note() {
        let memlock = Limit {
            soft: Some(8 << 20),
            hard: Some(8 << 20),
        };
        let plan = plan(2, 10_000, memlock, false, files(1 << 20)).unwrap();
        assert_eq!(plan.io_memory_per_shard_bytes, 2 << 20);
        assert_eq!(plan.notes.len(), 1);
        assert!(plan.notes[0].contains("locked-memory limit is 8192 KiB"));
    }

    #[test]
    fn privileged_or_unlimited_gets_the_full_pool() {
        let memlock = Limit {
            soft: Some(64 << 10),
            hard: Some(64 << 10),
        };
        let p = plan(4, 10, memlock, true, files(4096)).unwrap();
        assert_eq!(p.io_memory_per_shard_bytes, PREFERRED_IO_MEMORY_BYTES);
        assert!(p.notes.is_empty());
        let p = plan(4, 10, UNLIMITED, false, UNLIMITED).unwrap();
        assert_eq!(p.io_memory_per_shard_bytes, PREFERRED_IO_MEMORY_BYTES);
    }

    #[test]
    fn too_little_memlock_or_files_is_refused_with_the_limit_named() {
        let memlock = Limit {
            soft: Some(256 << 10),
            hard: Some(256 << 10),
        };
        let err = plan(2, 10, memlock, false, files(4096)).unwrap_err();
        assert!(err.to_string().contains("RLIMIT_MEMLOCK"));
        let err = plan(8, 10, UNLIMITED, false, files(100)).unwrap_err();
        assert!(err.to_string().contains("RLIMIT_NOFILE"));
    }
}
