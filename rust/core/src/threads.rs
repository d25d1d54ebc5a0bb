//! Thread pools. The size comes from an explicit argument, else `KIMI_LOADER_THREADS`, else
//! the number of CPUs, and is capped at [`MAX_THREADS`]. Pools are cached, at most
//! [`MAX_POOLS`] sizes at a time (least recently used dropped, which ends its threads once
//! the last call using it returns), and the cache is forgotten in a forked child, where
//! the parent's worker threads do not exist: the child builds its own pools.

use std::sync::{Arc, Mutex, OnceLock};

use rayon::{ThreadPool, ThreadPoolBuilder};

use crate::error::{Error, Result};

pub const THREADS_ENV: &str = "KIMI_LOADER_THREADS";
/// More threads than this never helps a loader and takes seconds just to start.
pub const MAX_THREADS: usize = 256;
/// Distinct pool sizes kept alive at once.
pub const MAX_POOLS: usize = 4;

fn checked(n: usize, what: &str) -> Result<usize> {
    if n == 0 || n > MAX_THREADS {
        return Err(Error::InvalidArgument {
            reason: format!("{what} must be between 1 and {MAX_THREADS}, got {n}"),
        });
    }
    Ok(n)
}

/// Resolves the thread count: `explicit`, else the environment, else the CPU count.
pub fn resolve(explicit: Option<usize>) -> Result<usize> {
    if let Some(n) = explicit {
        return checked(n, "threads");
    }
    if let Ok(v) = std::env::var(THREADS_ENV) {
        return match v.trim().parse::<usize>() {
            Ok(n) => checked(n, THREADS_ENV),
            Err(_) => Err(Error::InvalidArgument {
                reason: format!("{THREADS_ENV}={v:?} is not a positive integer"),
            }),
        };
    }
    Ok(std::thread::available_parallelism().map_or(1, |n| n.get().min(MAX_THREADS)))
}

/// The cached pools, most recently used last, and the process they were built in.
struct Cache {
    pid: u32,
    pools: Vec<(usize, Arc<ThreadPool>)>,
}

/// A pool with the resolved number of threads, built once per size and reused.
pub fn pool(explicit: Option<usize>) -> Result<Arc<ThreadPool>> {
    static CACHE: OnceLock<Mutex<Cache>> = OnceLock::new();
    let n = resolve(explicit)?;
    let pid = std::process::id();
    let mut cache = CACHE
        .get_or_init(|| {
            Mutex::new(Cache {
                pid,
                pools: Vec::new(),
            })
        })
        .lock()
        .unwrap_or_else(|e| e.into_inner());
    if cache.pid != pid {
        // A forked child: the pools' threads stayed in the parent. Dropping them here
        // would wait on threads that will never answer, so they are leaked (their memory
        // is a copy of the parent's) and new ones are built.
        std::mem::forget(std::mem::take(&mut cache.pools));
        cache.pid = pid;
    }
    if let Some(i) = cache.pools.iter().position(|(size, _)| *size == n) {
        let entry = cache.pools.remove(i);
        let p = entry.1.clone();
        cache.pools.push(entry);
        return Ok(p);
    }
    let p = Arc::new(
        ThreadPoolBuilder::new()
            .num_threads(n)
            .thread_name(|i| format!("kimi-loader-{i}"))
            .build()
            .map_err(|e| Error::InvalidArgument {
                reason: format!("cannot start {n} threads: {e}"),
            })?,
    );
    if cache.pools.len() >= MAX_POOLS {
        cache.pools.remove(0);
    }
    cache.pools.push((n, p.clone()));
    Ok(p)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_are_bounded_and_pools_reused() {
        assert!(resolve(Some(0)).is_err());
        assert!(resolve(Some(MAX_THREADS + 1)).is_err());
        let a = pool(Some(3)).unwrap();
        assert!(Arc::ptr_eq(&a, &pool(Some(3)).unwrap()));
        for n in 1..=(MAX_POOLS + 2) {
            pool(Some(n)).unwrap();
        }
        let b = pool(Some(3)).unwrap();
        assert_eq!(b.current_num_threads(), 3);
    }
}
