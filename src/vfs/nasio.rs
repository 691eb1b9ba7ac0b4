//! NAS calls with a deadline.
//!
//! A NAS that stops answering (a hard NFS mount whose server hangs) keeps every system call on it
//! in the kernel until the server answers again; such a thread cannot be interrupted. So no FUSE
//! request thread calls the NAS itself: every NAS call runs on a thread of this pool, and the
//! request thread waits for the answer at most until the deadline (`nas_timeout=`, default 30 s),
//! or until the health probe says the NAS is offline, whichever comes first. Then it answers the
//! kernel without the NAS (from the cache index, or `EIO`), holding no lock; the call itself
//! finishes, or stays stuck on its pool thread, on its own.
//!
//! The pool grows on demand up to [`MAX_THREADS`] and never queues work behind busy threads: a
//! call gets an idle thread or a new one at once, or fails at once ([`Waited::Busy`]) when every
//! thread is taken (stuck in a hung NAS, typically). A call whose deadline passed before a thread
//! picked it up is skipped, never run late. Idle threads leave after [`IDLE_EXIT`].

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::{Condvar, Mutex};

thread_local! {
    /// On pool threads: what [`NasIo::after`] asked to run once the current call has answered.
    static AFTER: std::cell::RefCell<Option<Vec<Job>>> = const { std::cell::RefCell::new(None) };
}

/// Threads kept when the pool is idle.
const WARM_THREADS: usize = 4;

/// Most threads the pool runs at once. Each stuck NAS call holds one; past this many, new NAS
/// work fails fast instead of piling up.
pub const MAX_THREADS: usize = 64;
/// An idle thread leaves after this long without work.
const IDLE_EXIT: Duration = Duration::from_secs(30);
/// How often a waiter looks at whether it should give up early (the NAS went offline).
const GIVE_UP_POLL: Duration = Duration::from_millis(100);

type Job = Box<dyn FnOnce() + Send>;

/// Why a call has no answer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Waited {
    /// The deadline passed.
    TimedOut,
    /// Every thread of the pool is busy (stuck NAS calls): the call was not started.
    Busy,
    /// The waiter was told to stop waiting (the NAS went offline).
    GaveUp,
}

#[derive(Default)]
struct State {
    /// Threads alive.
    threads: usize,
    /// Threads waiting for work that no queued job has claimed yet.
    idle: usize,
    /// Jobs handed to idle threads, not yet picked up.
    queue: VecDeque<Job>,
}

struct Shared {
    max: usize,
    state: Mutex<State>,
    work: Condvar,
}

/// The pool that runs NAS calls.
pub struct NasIo {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for NasIo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let st = self.shared.state.lock();
        f.debug_struct("NasIo")
            .field("threads", &st.threads)
            .field("idle", &st.idle)
            .finish()
    }
}

enum Slot<T> {
    Pending,
    Running,
    Done(T),
    Abandoned,
}

impl NasIo {
    /// A pool of at most `max` threads (none started yet).
    pub fn new(max: usize) -> Self {
        Self {
            shared: Arc::new(Shared {
                max: max.max(1),
                state: Mutex::new(State::default()),
                work: Condvar::new(),
            }),
        }
    }

    /// Starts the threads that stay when the pool is idle ([`WARM_THREADS`]), so that the first
    /// calls after a quiet spell do not wait for a thread to start.
    pub fn warm(&self) {
        let want = WARM_THREADS.min(self.shared.max);
        loop {
            let mut st = self.shared.state.lock();
            if st.threads >= want {
                return;
            }
            st.threads += 1;
            drop(st);
            if self.spawn(Box::new(|| {})).is_err() {
                return;
            }
        }
    }

    /// Threads alive and, of them, busy with a call (stuck ones included).
    pub fn threads(&self) -> (usize, usize) {
        let st = self.shared.state.lock();
        let waiting = st.idle + st.queue.len();
        (st.threads, st.threads.saturating_sub(waiting))
    }

    /// Runs `f` on the pool and waits for its result until `deadline` has passed or `give_up`
    /// says so (checked every [`GIVE_UP_POLL`]).
    pub fn call<T: Send + 'static>(
        &self,
        deadline: Duration,
        give_up: &dyn Fn() -> bool,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> Result<T, Waited> {
        let slot = Arc::new((Mutex::new(Slot::<T>::Pending), Condvar::new()));
        let theirs = slot.clone();
        let job: Job = Box::new(move || {
            {
                let mut s = theirs.0.lock();
                if matches!(*s, Slot::Abandoned) {
                    return; // its waiter is gone: never run late
                }
                *s = Slot::Running;
            }
            let value = f();
            let mut s = theirs.0.lock();
            if matches!(*s, Slot::Running) {
                *s = Slot::Done(value);
                theirs.1.notify_one();
            }
        });
        self.submit(job).map_err(|_| Waited::Busy)?;
        let until = Instant::now() + deadline;
        let mut s = slot.0.lock();
        loop {
            if let Slot::Done(_) = &*s {
                let Slot::Done(v) = std::mem::replace(&mut *s, Slot::Abandoned) else {
                    unreachable!("checked above")
                };
                return Ok(v);
            }
            let now = Instant::now();
            if now >= until {
                *s = Slot::Abandoned;
                return Err(Waited::TimedOut);
            }
            if give_up() {
                *s = Slot::Abandoned;
                return Err(Waited::GaveUp);
            }
            slot.1.wait_for(&mut s, (until - now).min(GIVE_UP_POLL));
        }
    }

    /// Runs `f` on this pool thread once the call it is running has answered (the rest of a
    /// chunk after the bytes asked for, say); off the pool, as [`Self::detach`] does.
    pub fn after(&self, f: impl FnOnce() + Send + 'static) {
        let job: Job = Box::new(f);
        let queued = AFTER.with(|a| match a.borrow_mut().as_mut() {
            Some(jobs) => {
                jobs.push(job);
                None
            }
            None => Some(job),
        });
        if let Some(job) = queued {
            self.detach(job);
        }
    }

    /// Runs `f` on the pool without waiting for it (a close that may hang on the NAS, say);
    /// when every pool thread is taken, on a thread of its own.
    pub fn detach(&self, f: impl FnOnce() + Send + 'static) {
        if let Err(job) = self.submit(Box::new(f)) {
            let spawned = std::thread::Builder::new()
                .name("arenafs-nas-extra".into())
                .spawn(job);
            if let Err(e) = spawned {
                tracing::warn!(error = %e, "cannot start a thread for a NAS call; dropping it");
            }
        }
    }

    /// Hands `job` to an idle thread, or to a new one; gives it back when the pool is full.
    fn submit(&self, job: Job) -> Result<(), Job> {
        let mut st = self.shared.state.lock();
        if st.idle > 0 {
            st.idle -= 1;
            st.queue.push_back(job);
            drop(st);
            self.shared.work.notify_one();
            return Ok(());
        }
        if st.threads >= self.shared.max {
            return Err(job);
        }
        st.threads += 1;
        drop(st);
        self.spawn(job)
    }

    /// Starts a thread (already counted in `threads`) for `job`; gives the job back when the
    /// thread cannot be started.
    fn spawn(&self, job: Job) -> Result<(), Job> {
        let shared = self.shared.clone();
        // The job goes to the thread through a slot, so that it can be given back if the
        // thread cannot be started.
        let slot = Arc::new(Mutex::new(Some(job)));
        let theirs = slot.clone();
        let spawned = std::thread::Builder::new()
            .name("arenafs-nas".into())
            .spawn(move || {
                if let Some(job) = theirs.lock().take() {
                    worker(shared, job);
                }
            });
        if let Err(e) = spawned {
            tracing::warn!(error = %e, "cannot start a NAS thread");
            self.shared.state.lock().threads -= 1;
            return Err(slot.lock().take().expect("the thread never started"));
        }
        Ok(())
    }
}

/// A pool thread: runs its first job, then whatever is handed to it, until idle for
/// [`IDLE_EXIT`]. Invariant: `idle` = threads waiting here − jobs in the queue.
fn worker(shared: Arc<Shared>, first: Job) {
    AFTER.with(|a| *a.borrow_mut() = Some(Vec::new()));
    let mut job = Some(first);
    loop {
        if let Some(j) = job.take() {
            j();
            loop {
                let then = AFTER.with(|a| a.borrow_mut().as_mut().map(std::mem::take));
                match then {
                    Some(jobs) if !jobs.is_empty() => jobs.into_iter().for_each(|j| j()),
                    _ => break,
                }
            }
        }
        let mut st = shared.state.lock();
        st.idle += 1;
        loop {
            if let Some(j) = st.queue.pop_front() {
                job = Some(j);
                break;
            }
            if shared.work.wait_for(&mut st, IDLE_EXIT).timed_out()
                && st.queue.is_empty()
                && st.threads > WARM_THREADS
            {
                st.idle -= 1;
                st.threads -= 1;
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

    fn never() -> bool {
        false
    }

    #[test]
    fn after_runs_once_the_call_has_answered() {
        let pool = Arc::new(NasIo::new(4));
        let (go_tx, go_rx) = std::sync::mpsc::channel::<()>();
        let (tx, rx) = std::sync::mpsc::channel();
        let got = pool.call(Duration::from_secs(10), &never, {
            let p = pool.clone();
            move || {
                // Waits for the caller, who can only go on once the call has answered.
                p.after(move || {
                    let _ = tx.send(go_rx.recv_timeout(Duration::from_secs(5)).is_ok());
                });
                7
            }
        });
        assert!(matches!(got, Ok(7)));
        go_tx.send(()).unwrap();
        assert!(rx.recv_timeout(Duration::from_secs(10)).unwrap());
        // On the same thread: no other was started.
        assert_eq!(pool.threads().0, 1);
        // Off the pool, it runs on a pool thread of its own.
        let (tx, rx) = std::sync::mpsc::channel();
        pool.after(move || tx.send(()).unwrap());
        rx.recv_timeout(Duration::from_secs(10)).unwrap();
    }

    #[test]
    fn warm_threads_wait_idle() {
        let pool = NasIo::new(64);
        pool.warm();
        let deadline = Instant::now() + Duration::from_secs(10);
        while pool.threads() != (WARM_THREADS, 0) {
            assert!(Instant::now() < deadline, "{:?}", pool.threads());
            std::thread::sleep(Duration::from_millis(5));
        }
        // A call is taken by one of them: no thread is started for it.
        let got = pool.call(Duration::from_secs(10), &never, || 7);
        assert!(matches!(got, Ok(7)));
        assert_eq!(pool.threads().0, WARM_THREADS);
    }

    #[test]
    fn answers_or_times_out() {
        let pool = NasIo::new(4);
        assert_eq!(pool.call(Duration::from_secs(5), &never, || 41 + 1), Ok(42));
        let release = Arc::new(AtomicBool::new(false));
        let r = release.clone();
        let stuck = pool.call(Duration::from_millis(50), &never, move || {
            while !r.load(Ordering::Acquire) {
                std::thread::sleep(Duration::from_millis(5));
            }
        });
        assert_eq!(stuck, Err(Waited::TimedOut));
        // Another thread still serves while one is stuck.
        assert_eq!(pool.call(Duration::from_secs(5), &never, || 7), Ok(7));
        // The thread that answered goes back to idle right after handing over its answer.
        let deadline = Instant::now() + Duration::from_secs(10);
        while pool.threads() != (2, 1) {
            assert!(
                Instant::now() < deadline,
                "one stuck, one idle: {:?}",
                pool.threads()
            );
            std::thread::sleep(Duration::from_millis(1));
        }
        release.store(true, Ordering::Release);
    }

    #[test]
    fn a_full_pool_fails_fast_and_runs_nothing_late() {
        let pool = NasIo::new(2);
        let release = Arc::new(AtomicBool::new(false));
        for _ in 0..2 {
            let r = release.clone();
            let got = pool.call(Duration::from_millis(20), &never, move || {
                while !r.load(Ordering::Acquire) {
                    std::thread::sleep(Duration::from_millis(5));
                }
            });
            assert_eq!(got, Err(Waited::TimedOut));
        }
        let ran = Arc::new(AtomicUsize::new(0));
        let r2 = ran.clone();
        let started = Instant::now();
        let got = pool.call(Duration::from_secs(10), &never, move || {
            r2.fetch_add(1, Ordering::SeqCst);
        });
        assert_eq!(got, Err(Waited::Busy));
        assert!(started.elapsed() < Duration::from_secs(1), "fails at once");
        release.store(true, Ordering::Release);
        // Once the stuck calls return, the pool serves again; the refused call never ran.
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if pool.call(Duration::from_secs(5), &never, || ()) == Ok(()) {
                break;
            }
            assert!(Instant::now() < deadline, "pool did not recover");
            std::thread::sleep(Duration::from_millis(5));
        }
        assert_eq!(ran.load(Ordering::SeqCst), 0);
    }

    #[test]
    fn gives_up_when_told() {
        let pool = NasIo::new(2);
        let release = Arc::new(AtomicBool::new(false));
        let r = release.clone();
        let offline = AtomicBool::new(false);
        let started = Instant::now();
        std::thread::scope(|s| {
            s.spawn(|| {
                std::thread::sleep(Duration::from_millis(50));
                offline.store(true, Ordering::Release);
            });
            let got = pool.call(
                Duration::from_secs(30),
                &|| offline.load(Ordering::Acquire),
                move || {
                    while !r.load(Ordering::Acquire) {
                        std::thread::sleep(Duration::from_millis(5));
                    }
                },
            );
            assert_eq!(got, Err(Waited::GaveUp));
        });
        assert!(started.elapsed() < Duration::from_secs(5));
        release.store(true, Ordering::Release);
    }

    #[test]
    fn many_callers_share_the_threads() {
        let pool = Arc::new(NasIo::new(8));
        let handles: Vec<_> = (0..32)
            .map(|i| {
                let pool = pool.clone();
                std::thread::spawn(move || {
                    for j in 0..200 {
                        // Busy is allowed when every thread is taken; the others must answer.
                        match pool.call(Duration::from_secs(10), &never, move || i * 1000 + j) {
                            Ok(v) => assert_eq!(v, i * 1000 + j),
                            Err(w) => assert_eq!(w, Waited::Busy),
                        }
                    }
                })
            })
            .collect();
        for h in handles {
            h.join().unwrap();
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        while pool.threads().1 != 0 {
            assert!(
                Instant::now() < deadline,
                "threads stay busy: {:?}",
                pool.threads()
            );
            std::thread::sleep(Duration::from_millis(1));
        }
        assert!(pool.threads().0 <= 8);
    }
}
