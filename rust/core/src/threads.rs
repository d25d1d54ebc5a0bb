//! Thread pools: one cached rayon pool per requested size. The size comes from an
//! explicit argument, else `KIMI_LOADER_THREADS`, else the number of CPUs.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};

use rayon::{ThreadPool, ThreadPoolBuilder};

use crate::error::{Error, Result};

pub const THREADS_ENV: &str = "KIMI_LOADER_THREADS";

/// Resolves the thread count: `explicit`, else the environment, else the CPU count.
pub fn resolve(explicit: Option<usize>) -> Result<usize> {
    if let Some(n) = explicit {
        return if n == 0 {
            Err(Error::InvalidArgument {
                reason: "threads must be at least 1".into(),
            })
        } else {
            Ok(n)
        };
    }
    if let Ok(v) = std::env::var(THREADS_ENV) {
        return match v.trim().parse::<usize>() {
            Ok(n) if n > 0 => Ok(n),
            _ => Err(Error::InvalidArgument {
                reason: format!("{THREADS_ENV}={v:?} is not a positive integer"),
            }),
        };
    }
    Ok(std::thread::available_parallelism().map_or(1, |n| n.get()))
}

/// A pool with the resolved number of threads, built once per size and reused.
pub fn pool(explicit: Option<usize>) -> Result<Arc<ThreadPool>> {
    static POOLS: OnceLock<Mutex<HashMap<usize, Arc<ThreadPool>>>> = OnceLock::new();
    let n = resolve(explicit)?;
    let mut pools = POOLS
        .get_or_init(Default::default)
        .lock()
        .unwrap_or_else(|e| e.into_inner());
    if let Some(p) = pools.get(&n) {
        return Ok(p.clone());
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
    pools.insert(n, p.clone());
    Ok(p)
}
