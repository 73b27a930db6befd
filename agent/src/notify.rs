//! The systemd notify protocol (`sd_notify(3)`), for a `Type=notify` unit: `READY=1` once
//! the agent is doing its job (the first tick ran, the plugins loaded), `STATUS=` lines
//! saying what it is doing, `RELOADING=1` … `READY=1` around a reload, `STOPPING=1` at
//! shutdown, and `WATCHDOG=1` from the tick loop itself (never from a side thread), so
//! that a loop that is stuck stops the pings and systemd restarts the agent.
//!
//! Without `NOTIFY_SOCKET` (not run by systemd, or by a unit of another type) every call
//! is a no-op. A message that cannot be sent is logged once, never a reason to stop.

use std::time::{Duration, Instant};

use sd_notify::NotifyState;

#[derive(Debug)]
pub struct Notifier {
    enabled: bool,
    /// Half of `WatchdogSec=` (`WATCHDOG_USEC`): pings at least this often.
    ping_every: Option<Duration>,
    last_ping: Option<Instant>,
    last_status: String,
    failed: bool,
}

impl Notifier {
    /// From the environment systemd sets (`NOTIFY_SOCKET`, `WATCHDOG_USEC`,
    /// `WATCHDOG_PID`).
    pub fn from_env() -> Notifier {
        let enabled = std::env::var_os("NOTIFY_SOCKET").is_some();
        // As sd_watchdog_enabled(3): `WATCHDOG_USEC`, for this process when
        // `WATCHDOG_PID` names it or is not set. (The crate's own check requires the
        // PID.)
        let var = |k: &str| std::env::var(k).ok().and_then(|v| v.parse::<u64>().ok());
        let ours = var("WATCHDOG_PID").is_none_or(|p| p == u64::from(std::process::id()));
        let ping_every = var("WATCHDOG_USEC")
            .filter(|&u| enabled && ours && u > 0)
            .map(|u| Duration::from_micros(u / 2));
        Notifier { enabled, ping_every, last_ping: None, last_status: String::new(), failed: false }
    }

    /// Whether systemd listens (`NOTIFY_SOCKET`): the status line is built only then.
    pub fn enabled(&self) -> bool {
        self.enabled
    }

    /// The watchdog interval systemd expects pings within, if any.
    pub fn watchdog(&self) -> Option<Duration> {
        self.ping_every.map(|d| d * 2)
    }

    fn send(&mut self, states: &[NotifyState<'_>]) {
        if !self.enabled {
            return;
        }
        if let Err(e) = sd_notify::notify(false, states)
            && !std::mem::replace(&mut self.failed, true)
        {
            tracing::warn!(error = %e, "cannot notify systemd (NOTIFY_SOCKET); the unit may time out or be restarted by its watchdog");
        }
    }

    /// The agent does its job now: the first tick ran (or a reload finished).
    pub fn ready(&mut self, status: &str) {
        self.last_status = status.to_owned();
        self.send(&[NotifyState::Ready, NotifyState::Status(status)]);
        self.ping();
    }

    /// Say what the agent is doing, when it changed.
    pub fn status(&mut self, status: &str) {
        if status != self.last_status {
            self.last_status = status.to_owned();
            self.send(&[NotifyState::Status(status)]);
        }
    }

    /// A reload begins (`ready` ends it).
    pub fn reloading(&mut self) {
        let now = NotifyState::monotonic_usec_now();
        match now {
            Ok(now) => self.send(&[NotifyState::Reloading, now]),
            Err(_) => self.send(&[NotifyState::Reloading]),
        }
    }

    pub fn stopping(&mut self) {
        self.send(&[NotifyState::Stopping, NotifyState::Status("stopping")]);
    }

    /// From the tick loop, every tick: a watchdog ping when half the interval passed.
    pub fn tick(&mut self) {
        let Some(every) = self.ping_every else { return };
        if self.last_ping.is_none_or(|t| t.elapsed() >= every) {
            self.ping();
        }
    }

    fn ping(&mut self) {
        if self.ping_every.is_some() {
            self.last_ping = Some(Instant::now());
            self.send(&[NotifyState::Watchdog]);
        }
    }
}
