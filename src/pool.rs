//! A small thread pool for the decode kernels: the caller works too, chunks are claimed one at a
//! time, and the caller waits only for chunks already claimed, never for a worker to wake.
//!
//! Why not rayon or candle's `barrier_pool`: a decode step makes ~50 of these short calls, and
//! waking sleeping threads on every call (a futex, an IPI in a VM) cost a quarter of decode with
//! rayon (docs/PERF.md), so workers spin briefly ([`SPIN`]) after a job before they sleep. A barrier that waits
//! for *every* worker (candle's) collapses on a busy machine: a descheduled worker stalls each
//! call for a time slice. Here the caller just takes the chunks a late worker did not.
//!
//! A panic in a chunk, on the caller or on a worker, is caught: the job ends (nobody claims more
//! chunks), every worker stays alive, and [`run`] returns [`Panicked`] with the message.

use std::any::Any;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicUsize, Ordering::*};
use std::sync::{Condvar, Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};

/// After a job, workers spin this long for the next before they sleep. The gaps between the
/// kernel calls of one decode step are shorter; between tokens (sampling, streaming) workers
/// sleep and cost nothing.
pub(crate) const SPIN: Duration = Duration::from_micros(80);

/// At most this many threads share a job, the caller included. Decode is bound by memory
/// bandwidth: past the cores it takes to saturate it, more threads only add contention on the
/// job's counters (docs/PERF.md: measured on 2 cores only).
pub(crate) const MAX_THREADS: usize = 8;

/// A chunk panicked (on the caller or on a worker); the output is incomplete.
#[derive(Debug)]
pub(crate) struct Panicked(pub(crate) String);

/// Run `f(c)` for each chunk `c < n`. The lifetime of `f` is erased: see [`run`].
#[derive(Clone, Copy)]
struct Job {
    f: *const (dyn Fn(usize) + Sync),
    n: usize,
    /// Workers this job takes: one fewer than its chunks at most.
    wanted: usize,
}
// SAFETY: `f` is `Sync`, and `run` keeps it alive while any worker can reach it.
unsafe impl Send for Job {}

struct Slot {
    /// The job workers may join; `None` once its caller has stopped taking joiners.
    job: Option<Job>,
    /// Workers that joined it.
    joined: usize,
    sleepers: usize,
    /// The first panic of the current job.
    panic: Option<Box<dyn Any + Send>>,
}

struct Pool {
    workers: usize,
    slot: Mutex<Slot>,
    wake: Condvar,
    /// Bumped (under `slot`'s lock) for each job, for spinning workers to see.
    epoch: AtomicUsize,
    /// The next chunk to claim.
    next: AtomicUsize,
    /// Workers inside the current job.
    active: AtomicUsize,
}

/// Threads a job is shared by, the caller included: candle's count (`RAYON_NUM_THREADS`, else
/// the physical cores), no more than the process may run at once (cgroup quotas, `taskset`:
/// [`std::thread::available_parallelism`]) and no more than [`MAX_THREADS`].
fn thread_count() -> usize {
    let allowed = std::thread::available_parallelism().map_or(1, |n| n.get());
    candle_core::utils::get_num_threads()
        .min(allowed)
        .clamp(1, MAX_THREADS)
}

fn pool() -> &'static Pool {
    static POOL: OnceLock<&'static Pool> = OnceLock::new();
    POOL.get_or_init(|| {
        let mut pool = Box::new(Pool {
            workers: thread_count() - 1,
            slot: Mutex::new(Slot {
                job: None,
                joined: 0,
                sleepers: 0,
                panic: None,
            }),
            wake: Condvar::new(),
            epoch: AtomicUsize::new(0),
            next: AtomicUsize::new(0),
            active: AtomicUsize::new(0),
        });
        // A worker that cannot be started is a smaller pool, not an error.
        let started = (0..pool.workers)
            .take_while(|i| {
                std::thread::Builder::new()
                    .name(format!("gpt2-linear-{i}"))
                    .spawn(|| pool_ref().work())
                    .is_ok()
            })
            .count();
        pool.workers = started;
        Box::leak(pool)
    })
}

/// The pool, for workers, which start before `POOL` is set and wait on it.
fn pool_ref() -> &'static Pool {
    pool()
}

/// Threads that share a job, the caller included.
pub(crate) fn threads() -> usize {
    pool().workers + 1
}

/// An output buffer written by several threads at disjoint places.
#[derive(Clone, Copy)]
pub(crate) struct SharedOut(pub(crate) *mut f32);

impl SharedOut {
    /// # Safety
    /// `i` must be inside the live buffer, and no other thread may access element `i` meanwhile.
    pub(crate) unsafe fn write(self, i: usize, v: f32) {
        // SAFETY: the caller's promise.
        unsafe { *self.0.add(i) = v };
    }

    /// # Safety
    /// `start..start + len` must be inside the live buffer and touched by no other thread while
    /// the slice lives.
    #[allow(clippy::mut_from_ref)]
    pub(crate) unsafe fn slice<'a>(self, start: usize, len: usize) -> &'a mut [f32] {
        // SAFETY: the caller's promise.
        unsafe { std::slice::from_raw_parts_mut(self.0.add(start), len) }
    }
}

// SAFETY: the pointer is only used through `write` and `slice`, whose callers keep threads on
// disjoint elements of a buffer that outlives them.
unsafe impl Sync for SharedOut {}
// SAFETY: as for `Sync`.
unsafe impl Send for SharedOut {}

/// Workers alive (for tests: a panic must not lose one).
#[cfg(test)]
pub(crate) fn workers() -> usize {
    pool().workers
}

fn lock(m: &Mutex<Slot>) -> MutexGuard<'_, Slot> {
    // Chunks run outside the lock and panics are caught, so it is never poisoned; if it were,
    // its data is still consistent (every field is written whole).
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn message(payload: &(dyn Any + Send)) -> String {
    payload
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a decode kernel panicked".into())
}

/// Runs `f(c)` for each chunk `c` in `0..n`, on the caller and on any worker that joins.
/// Callers take turns (the lock below): chunks of different calls never mix.
pub(crate) fn run(n: usize, f: &(dyn Fn(usize) + Sync)) -> Result<(), Panicked> {
    static TURN: Mutex<()> = Mutex::new(());
    let pool = pool();
    if pool.workers == 0 || n <= 1 {
        return catch_unwind(AssertUnwindSafe(|| (0..n).for_each(f)))
            .map_err(|p| Panicked(message(&*p)));
    }
    let _turn = TURN.lock().unwrap_or_else(|e| e.into_inner());
    let f: *const (dyn Fn(usize) + Sync + '_) = f;
    // SAFETY (lifetime erasure only): workers dereference `f` only between joining (while
    // `job` is set, counted in `active` under the lock) and leaving (`active` decremented after
    // their last call). `Withdraw` clears `job` under that lock, then waits for `active` to
    // drain, before this function returns: `f` outlives every use.
    let f: *const (dyn Fn(usize) + Sync) = unsafe { std::mem::transmute(f) };
    let wanted = pool.workers.min(n - 1);
    pool.next.store(0, Relaxed); // joiners see it through the lock below
    {
        let mut slot = lock(&pool.slot);
        slot.job = Some(Job { f, n, wanted });
        slot.joined = 0;
        slot.panic = None;
        pool.epoch.fetch_add(1, Relaxed);
        for _ in 0..slot.sleepers.min(wanted) {
            pool.wake.notify_one();
        }
    }
    let withdraw = Withdraw(pool);
    // SAFETY: `f` is the caller's reference, alive for this whole call.
    pool.claim(unsafe { &*f }, n);
    drop(withdraw);
    match lock(&pool.slot).panic.take() {
        Some(p) => Err(Panicked(message(&*p))),
        None => Ok(()),
    }
}

/// Ends the current job: once dropped, no worker is inside it or can join it.
struct Withdraw(&'static Pool);

impl Drop for Withdraw {
    fn drop(&mut self) {
        lock(&self.0.slot).job = None;
        // Workers are finishing their last chunk; one may have been preempted on this core.
        let mut spins = 0;
        while self.0.active.load(Acquire) != 0 {
            if spins < 10_000 {
                std::hint::spin_loop();
                spins += 1;
            } else {
                std::thread::yield_now();
            }
        }
    }
}

impl Pool {
    /// Claims and runs chunks until none is left; a panic is kept in the slot and ends the job.
    fn claim(&self, f: &(dyn Fn(usize) + Sync), n: usize) {
        loop {
            let c = self.next.fetch_add(1, Relaxed);
            if c >= n {
                return;
            }
            if let Err(p) = catch_unwind(AssertUnwindSafe(|| f(c))) {
                self.next.store(n, Relaxed); // nobody claims more
                lock(&self.slot).panic.get_or_insert(p);
                return;
            }
        }
    }

    fn work(&self) {
        let mut seen = 0;
        loop {
            let job = self.join(&mut seen);
            // SAFETY: joined while `job` was set, so `f` lives until `active` is decremented
            // below (see `run`). `claim` catches panics, so this thread always gets there.
            self.claim(unsafe { &*job.f }, job.n);
            self.active.fetch_sub(1, Release);
        }
    }

    /// Waits for a job newer than `seen` that still wants workers, and joins it.
    fn join(&self, seen: &mut usize) -> Job {
        let idle = Instant::now();
        loop {
            if self.epoch.load(Relaxed) != *seen {
                let mut slot = lock(&self.slot);
                *seen = self.epoch.load(Relaxed);
                if let Some(job) = slot.job {
                    if slot.joined < job.wanted {
                        slot.joined += 1;
                        self.active.fetch_add(1, Relaxed); // under the lock: `Withdraw` sees it
                        return job;
                    }
                }
                continue; // that job is over already, or has its workers
            }
            if idle.elapsed() < SPIN {
                std::hint::spin_loop();
            } else {
                let mut slot = lock(&self.slot);
                if self.epoch.load(Relaxed) == *seen {
                    slot.sleepers += 1;
                    slot = self.wake.wait(slot).unwrap_or_else(|e| e.into_inner());
                    slot.sleepers -= 1;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicBool;

    #[test]
    fn every_chunk_runs_once() {
        let hits: Vec<AtomicUsize> = (0..100).map(|_| AtomicUsize::new(0)).collect();
        for _ in 0..50 {
            run(hits.len(), &|c| {
                hits[c].fetch_add(1, Relaxed);
            })
            .map_err(|p| p.0)
            .unwrap_or_else(|e| panic!("{e}"));
        }
        assert!(hits.iter().all(|h| h.load(Relaxed) == 50));
    }

    #[test]
    fn panics_on_caller_and_worker_are_errors_and_the_pool_recovers() {
        let before = workers();
        // Every chunk panics: the caller's and (with a worker) a worker's.
        for _ in 0..20 {
            let err = run(64, &|c| {
                std::thread::sleep(Duration::from_micros(50));
                panic!("chunk {c} failed");
            });
            let msg = err.err().map(|p| p.0).unwrap_or_default();
            assert!(
                msg.starts_with("chunk ") && msg.ends_with(" failed"),
                "{msg}"
            );
        }
        // Then it works again, with every worker.
        let done = AtomicUsize::new(0);
        let worker_ran = AtomicBool::new(false);
        let caller = std::thread::current().id();
        for _ in 0..200 {
            let r = run(64, &|_| {
                std::thread::sleep(Duration::from_micros(20));
                if std::thread::current().id() != caller {
                    worker_ran.store(true, Relaxed);
                }
                done.fetch_add(1, Relaxed);
            });
            assert!(r.is_ok());
        }
        assert_eq!(done.load(Relaxed), 200 * 64);
        assert_eq!(workers(), before);
        if before > 0 {
            assert!(
                worker_ran.load(Relaxed),
                "no worker joined after the panics"
            );
        }
    }

    #[test]
    fn idle_workers_sleep() {
        // After a job and SPIN, a worker is parked: its CPU time stops growing. Other tests
        // share the pool, so wait for a quiet moment; the deadline only catches workers that
        // never sleep (a loaded 2-core machine can keep the pool busy for seconds).
        let _ = run(8, &|_| std::thread::sleep(Duration::from_micros(10)));
        let start = Instant::now();
        while lock(&pool().slot).sleepers < pool().workers {
            assert!(
                start.elapsed() < Duration::from_secs(120),
                "workers never slept"
            );
            std::thread::sleep(SPIN);
        }
    }
}
