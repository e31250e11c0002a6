//! Jobs of very different sizes (the files of a checkpoint, the shards of a model) run on a few threads,
//! largest first so that no thread is left with a big one at the end.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Mutex;

use crate::error::Result;

/// Run `job(i)` for every index of `sizes` on up to `threads` threads (scoped: nothing outlives the
/// call), taking the jobs in decreasing size. Returns the results in input order, or the error of the
/// lowest failed index; after a failure no further job is started, and the results of the jobs that
/// succeeded are dropped.
pub fn largest_first<R: Send>(
    sizes: &[u64],
    threads: usize,
    job: impl Fn(usize) -> Result<R> + Sync,
) -> Result<Vec<R>> {
    let threads = threads.clamp(1, sizes.len().max(1));
    if threads == 1 {
        return (0..sizes.len()).map(&job).collect();
    }
    let mut order: Vec<usize> = (0..sizes.len()).collect();
    order.sort_by_key(|&i| std::cmp::Reverse(sizes[i]));
    let next = AtomicUsize::new(0);
    let failed = AtomicBool::new(false);
    let done: Mutex<Vec<(usize, Result<R>)>> = Mutex::new(Vec::with_capacity(sizes.len()));
    std::thread::scope(|s| {
        for _ in 0..threads {
            s.spawn(|| {
                while !failed.load(Ordering::Relaxed) {
                    let Some(&i) = order.get(next.fetch_add(1, Ordering::Relaxed)) else {
                        return;
                    };
                    let result = job(i);
                    if result.is_err() {
                        failed.store(true, Ordering::Relaxed);
                    }
                    done.lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .push((i, result));
                }
            });
        }
    });
    let mut done = done.into_inner().unwrap_or_else(|p| p.into_inner());
    done.sort_by_key(|(i, _)| *i);
    done.into_iter().map(|(_, r)| r).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::Error;

    #[test]
    fn results_come_back_in_input_order_whatever_ran_first() {
        let sizes = [3, 50, 7, 50, 1, 9];
        for threads in [1, 2, 4, 16] {
            let out = largest_first(&sizes, threads, |i| Ok(i * 10)).unwrap();
            assert_eq!(out, vec![0, 10, 20, 30, 40, 50], "{threads} threads");
        }
        assert!(largest_first(&[], 4, Ok).unwrap().is_empty());
    }

    #[test]
    fn a_failure_is_reported_and_stops_the_jobs_not_yet_started() {
        let started = AtomicUsize::new(0);
        let sizes: Vec<u64> = (0..64).rev().collect(); // job 0 is the largest: taken first
        let err = largest_first(&sizes, 2, |i| {
            started.fetch_add(1, Ordering::Relaxed);
            if i == 0 {
                Err(Error::tensor("t0", "refused"))
            } else {
                std::thread::sleep(std::time::Duration::from_millis(10));
                Ok(i)
            }
        })
        .unwrap_err();
        assert!(err.to_string().contains("tensor `t0`"), "{err}");
        // The other thread may have taken a few jobs while job 0 failed, not all of them (10 ms each).
        assert!(started.load(Ordering::Relaxed) < 64);
    }
}
