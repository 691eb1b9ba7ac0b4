//! NAS reads with a deadline. A NAS that stops answering (a hung NFS server) would otherwise hold
//! a FUSE request, and the process reading through the mount, until it answers. Reads that touch
//! the NAS run on a small pool of threads instead, and the request gets `EIO` when the answer
//! does not come within the deadline (`nas_timeout=`, default 30 s); the health probe is asked
//! to look at once, so later requests fail fast in offline mode. A thread stuck in the NAS stays
//! stuck until the NAS answers; the pool is bounded, so they cannot pile up without limit.

use std::sync::Arc;
use std::sync::mpsc;
use std::time::Duration;

use parking_lot::Mutex;

type Job = Box<dyn FnOnce() + Send>;

/// A bounded pool running NAS calls.
pub struct NasIo {
    tx: Mutex<mpsc::Sender<Job>>,
}

impl NasIo {
    /// Starts `threads` workers.
    pub fn new(threads: usize) -> std::io::Result<Self> {
        let (tx, rx) = mpsc::channel::<Job>();
        let rx = Arc::new(Mutex::new(rx));
        for i in 0..threads {
            let rx = rx.clone();
            std::thread::Builder::new()
                .name(format!("arenafs-nasio-{i}"))
                .spawn(move || {
                    loop {
                        let job = rx.lock().recv();
                        match job {
                            Ok(job) => job(),
                            Err(_) => return,
                        }
                    }
                })?;
        }
        Ok(Self { tx: Mutex::new(tx) })
    }

    /// Runs `f` on the pool; `None` when it has not finished within `deadline`.
    pub fn run<T: Send + 'static>(
        &self,
        deadline: Duration,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> Option<T> {
        let (rtx, rrx) = mpsc::sync_channel(1);
        let job: Job = Box::new(move || {
            let _ = rtx.send(f());
        });
        self.tx.lock().send(job).ok()?;
        rrx.recv_timeout(deadline).ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_or_times_out() {
        let pool = NasIo::new(2).unwrap();
        assert_eq!(pool.run(Duration::from_secs(5), || 41 + 1), Some(42));
        let stuck = pool.run(Duration::from_millis(50), || {
            std::thread::sleep(Duration::from_millis(500));
        });
        assert_eq!(stuck, None);
        // The other worker still serves.
        assert_eq!(pool.run(Duration::from_secs(5), || 7), Some(7));
    }
}
