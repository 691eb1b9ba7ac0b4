//! Is the NAS there? A prober thread checks it every [`PROBE_INTERVAL`] ([`Nas::probe`]: the root
//! path still names the mounted directory, and it answers). The NAS is offline when the last probe
//! failed, or when a probe has not come back within [`PROBE_TIMEOUT`] (a hung NFS server). While
//! offline the file system serves complete cache copies as last-known-good and fails everything
//! else with `EIO` at once, without touching the NAS (DESIGN.md §2.6); the worker starts no copy.
//! Nothing is dropped from the cache because of what an unhealthy NAS says.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use parking_lot::{Condvar, Mutex};
use serde::Serialize;

use crate::source::Nas;

/// Time between probes.
pub const PROBE_INTERVAL: Duration = Duration::from_secs(1);
/// A probe that takes longer than this makes the NAS offline (or `nas_timeout`, if shorter: the
/// verdict comes no later than the first NAS call's deadline).
pub const PROBE_TIMEOUT: Duration = Duration::from_secs(3);

#[derive(Debug)]
struct State {
    /// When the running probe started (`None`: none running).
    running_since: Option<Instant>,
    /// Why the NAS is offline.
    reason: Option<String>,
    /// When it went offline (seconds since the epoch).
    since: Option<u64>,
    stop: bool,
    kick: bool,
}

/// The NAS's health, shared by the file system, the worker and the control API.
#[derive(Debug)]
pub struct Health {
    offline: AtomicBool,
    state: Mutex<State>,
    wake: Condvar,
}

/// What status reports.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct HealthReport {
    /// Whether the NAS is offline.
    pub offline: bool,
    /// Why.
    pub reason: Option<String>,
    /// Since when (seconds since the epoch).
    pub since: Option<u64>,
}

impl Default for Health {
    fn default() -> Self {
        Self {
            offline: AtomicBool::new(false),
            state: Mutex::new(State {
                running_since: None,
                reason: None,
                since: None,
                stop: false,
                kick: false,
            }),
            wake: Condvar::new(),
        }
    }
}

impl Health {
    /// Whether the NAS is offline (one atomic load).
    pub fn offline(&self) -> bool {
        self.offline.load(Ordering::Acquire)
    }

    /// The current verdict and its reason.
    pub fn report(&self) -> HealthReport {
        let st = self.state.lock();
        HealthReport {
            offline: self.offline(),
            reason: st.reason.clone(),
            since: st.since,
        }
    }

    /// Asks for a probe now (an operation just saw an error that smells like a lost NAS).
    pub fn kick(&self) {
        self.state.lock().kick = true;
        self.wake.notify_all();
    }

    fn set(&self, result: Result<(), String>) {
        let mut st = self.state.lock();
        match result {
            Ok(()) => {
                if self.offline.swap(false, Ordering::AcqRel) {
                    tracing::info!("NAS back online; normal service resumes");
                }
                st.reason = None;
                st.since = None;
            }
            Err(reason) => {
                if !self.offline.swap(true, Ordering::AcqRel) {
                    tracing::warn!(%reason, "NAS offline: serving complete cache copies, failing the rest with EIO");
                    st.since = Some(crate::cache::live::now_secs());
                }
                st.reason = Some(reason);
            }
        }
    }

    /// Starts the prober and its watchdog; a probe that takes longer than `nas_timeout` (at
    /// most [`PROBE_TIMEOUT`]) makes the NAS offline. Stops when [`Health::stop`] is called.
    pub fn start(self: &Arc<Self>, nas: Arc<Nas>, nas_timeout: Duration) -> std::io::Result<()> {
        let timeout = PROBE_TIMEOUT.min(nas_timeout);
        let me = self.clone();
        std::thread::Builder::new()
            .name("arenafs-probe".into())
            .spawn(move || {
                loop {
                    {
                        let mut st = me.state.lock();
                        if st.stop {
                            return;
                        }
                        st.running_since = Some(Instant::now());
                    }
                    let result = nas.probe();
                    me.set(result);
                    let mut st = me.state.lock();
                    st.running_since = None;
                    if !st.kick && !st.stop {
                        me.wake.wait_for(&mut st, PROBE_INTERVAL);
                    }
                    st.kick = false;
                }
            })?;
        let me = self.clone();
        std::thread::Builder::new()
            .name("arenafs-watchdog".into())
            .spawn(move || {
                loop {
                    let hung = {
                        let mut st = me.state.lock();
                        if st.stop {
                            return;
                        }
                        me.wake
                            .wait_for(&mut st, (timeout / 4).min(PROBE_INTERVAL / 2));
                        st.running_since.is_some_and(|t| t.elapsed() > timeout)
                    };
                    if hung && !me.offline() {
                        me.set(Err(format!(
                            "the NAS did not answer within {:.1} s",
                            timeout.as_secs_f64()
                        )));
                    }
                }
            })?;
        Ok(())
    }

    /// Stops the threads (a prober stuck in a hung NAS call is left behind).
    pub fn stop(&self) {
        self.state.lock().stop = true;
        self.wake.notify_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_directory_renamed_away_is_offline_until_it_is_back() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().join("nas");
        std::fs::create_dir(&root).unwrap();
        let nas = Arc::new(Nas::open(&root).unwrap());
        assert!(nas.probe().is_ok());
        std::fs::rename(&root, tmp.path().join("away")).unwrap();
        std::fs::create_dir(&root).unwrap(); // an empty stand-in at the same path
        let err = nas.probe().unwrap_err();
        assert!(err.contains("no longer the NAS"), "{err}");
        std::fs::remove_dir(&root).unwrap();
        assert!(nas.probe().is_err());
        std::fs::rename(tmp.path().join("away"), &root).unwrap();
        assert!(nas.probe().is_ok());

        let h = Health::default();
        h.set(Err("gone".into()));
        assert!(h.offline());
        assert_eq!(h.report().reason.as_deref(), Some("gone"));
        h.set(Ok(()));
        assert!(!h.offline());
        assert_eq!(h.report().since, None);
    }
}
