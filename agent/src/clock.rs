//! Time, behind a trait, so that the same agent runs on the wall clock in production and
//! on a virtual clock in tests, benchmarks and the demo (faster than real time, and
//! repeatable).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// A source of time. `elapsed` is monotonic and drives the simulator; `wall_ms` stamps
/// telemetry and may jump (NTP), so nothing measures intervals with it.
pub trait Clock: Send + Sync + std::fmt::Debug {
    /// Milliseconds since the Unix epoch.
    fn wall_ms(&self) -> u64;
    /// Monotonic time since the clock was made.
    fn elapsed(&self) -> Duration;
}

/// The machine's clocks.
#[derive(Debug)]
pub struct SystemClock {
    start: Instant,
}

impl SystemClock {
    pub fn new() -> Arc<SystemClock> {
        Arc::new(SystemClock { start: Instant::now() })
    }
}

impl Clock for SystemClock {
    fn wall_ms(&self) -> u64 {
        SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
    }
    fn elapsed(&self) -> Duration {
        self.start.elapsed()
    }
}

/// The node's offset from UTC at `unix_ms`, seconds east of Greenwich, from its time
/// zone (`TZ`, else `/etc/localtime`): what a time-of-day policy needs beside the wall
/// time (`host.wall-clock`). 0 where the time zone cannot be read.
#[allow(unsafe_code)]
pub fn utc_offset_s(unix_ms: u64) -> i32 {
    let t = (unix_ms / 1000) as libc::time_t;
    // SAFETY: `tzset` reads `TZ` and the zone file (glibc's `localtime_r` alone reads
    // them once per process: a node whose time zone is changed would keep the old one);
    // gpulet never sets `TZ`. `localtime_r` writes only into `tm`, which is ours and
    // zeroed (a valid `struct tm`); it is the thread-safe variant.
    unsafe { tzset() };
    let mut tm: libc::tm = unsafe { std::mem::zeroed() };
    if unsafe { libc::localtime_r(&t, &mut tm) }.is_null() {
        return 0;
    }
    tm.tm_gmtoff as i32
}

#[allow(unsafe_code)]
unsafe extern "C" {
    // POSIX; the libc crate declares it for Windows only.
    fn tzset();
}

/// A clock that moves only when told to. Cloning shares the same time.
#[derive(Debug, Clone)]
pub struct VirtualClock {
    start_wall_ms: u64,
    elapsed_ns: Arc<AtomicU64>,
}

impl VirtualClock {
    /// A virtual clock whose wall time starts at `start_wall_ms`.
    pub fn new(start_wall_ms: u64) -> VirtualClock {
        VirtualClock { start_wall_ms, elapsed_ns: Arc::new(AtomicU64::new(0)) }
    }

    pub fn advance(&self, by: Duration) {
        self.elapsed_ns.fetch_add(by.as_nanos() as u64, Ordering::Relaxed);
    }
}

impl Clock for VirtualClock {
    fn wall_ms(&self) -> u64 {
        self.start_wall_ms + self.elapsed().as_millis() as u64
    }
    fn elapsed(&self) -> Duration {
        Duration::from_nanos(self.elapsed_ns.load(Ordering::Relaxed))
    }
}
