//! The plugin thread: every call into a plugin runs on a thread of its own, never on the
//! agent's async runtime.
//!
//! Why: wasmtime-wasi implements WASI's blocking calls (`blocking-write-and-flush`,
//! `blocking-flush`, `blocking-read`, `poll`, `pollable.block`, and every filesystem or
//! socket call of its synchronous bindings) with `Handle::current().block_on` whenever a
//! tokio runtime is current on the calling thread, and that panics inside a runtime. A
//! guest's `println!` or its panic message takes that path, so a plugin called from the
//! agent's loop could end `gpulet run`. On a thread where no runtime is current,
//! wasmtime-wasi uses a runtime of its own and the same calls just work.
//!
//! The value served (the decision chain, or one plugin for `plugin run`) moves to the
//! thread for each call and back, so the caller keeps plain `&self` access between calls
//! (the chain's status, say) and nothing borrowed crosses threads. A panic inside a call
//! (a host bug; a guest's panic is a trap, not a Rust panic) is caught on the thread and
//! returned as an error; the value comes back either way.
//!
//! Measured (`cargo bench -p gpulet --bench plugins -- chain_decide`): a decision with
//! power-budget on 8 GPUs takes 74 µs through the plugin thread against 5.7 µs on the
//! caller's thread; the difference is waking a parked thread and being woken back on
//! this 2-core VM, once per tick (0.007% of a core at 1 Hz). The other ways out were a
//! fresh thread per call (as costly, and a spawn that can fail every tick) and
//! wasmtime's async support (`call_async` on the runtime), which would make every plugin
//! call and host import async for a cost the tick does not need to pay.

use std::panic::AssertUnwindSafe;
use std::sync::mpsc;

type Job = Box<dyn FnOnce() + Send>;

/// A value that lives on the plugin thread while it is being called.
pub struct PluginThread<T> {
    value: Option<Box<T>>,
    jobs: Option<mpsc::Sender<Job>>,
}

impl<T> std::fmt::Debug for PluginThread<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PluginThread").field("running", &self.jobs.is_some()).finish()
    }
}

impl<T: Send + 'static> PluginThread<T> {
    /// Start the thread that will serve `value`. If no thread can be started, calls run
    /// on the caller's thread (and a panic is still caught), with a warning now.
    pub fn new(value: T) -> PluginThread<T> {
        let (tx, rx) = mpsc::channel::<Job>();
        let jobs = std::thread::Builder::new()
            .name("gpulet-plugins".into())
            .spawn(move || {
                // Ends when the sender is dropped with its `PluginThread`.
                while let Ok(job) = rx.recv() {
                    job();
                }
            })
            .inspect_err(|e| {
                tracing::warn!(error = %e, "cannot start the plugin thread; plugins run on the loop's thread, where a plugin that prints or sleeps faults")
            })
            .ok()
            .map(|_| tx);
        PluginThread { value: Some(Box::new(value)), jobs }
    }

    /// The value, between calls.
    pub fn get(&self) -> &T {
        self.value.as_deref().expect("the value is back after every call")
    }

    /// The value, between calls, to change without a plugin call.
    pub fn get_mut(&mut self) -> &mut T {
        self.value.as_deref_mut().expect("the value is back after every call")
    }

    /// Run `f` on the value on the plugin thread and wait for it. `Err` carries the
    /// message of a panic inside `f`.
    pub fn call<R: Send + 'static>(
        &mut self,
        f: impl FnOnce(&mut T) -> R + Send + 'static,
    ) -> Result<R, String> {
        let mut value = self.value.take().expect("the value is back after every call");
        let Some(jobs) = &self.jobs else {
            let r = std::panic::catch_unwind(AssertUnwindSafe(|| f(&mut value)));
            self.value = Some(value);
            return r.map_err(panic_message);
        };
        let (tx, rx) = mpsc::sync_channel(1);
        let job: Job = Box::new(move || {
            let r = std::panic::catch_unwind(AssertUnwindSafe(|| f(&mut value)));
            let _ = tx.send((value, r.map_err(panic_message)));
        });
        if let Err(mpsc::SendError(job)) = jobs.send(job) {
            // The thread is gone (it only ends when its sender is dropped, so this should
            // not happen): run here rather than stop deciding.
            job();
        }
        let (value, r) = rx.recv().expect("every job answers, caught panics included");
        self.value = Some(value);
        r
    }
}

fn panic_message(p: Box<dyn std::any::Any + Send>) -> String {
    p.downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| p.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a panic without a message".into())
}

#[cfg(test)]
mod tests {
    use super::PluginThread;

    #[test]
    fn calls_run_outside_the_callers_runtime_and_panics_come_back_as_errors() {
        let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
        rt.block_on(async {
            let mut t = PluginThread::new(0u32);
            let inside = t.call(|v| {
                *v += 1;
                tokio::runtime::Handle::try_current().is_ok()
            });
            assert_eq!(inside, Ok(false), "no runtime is current on the plugin thread");
            let e = t.call(|_| -> () { panic!("host bug") }).unwrap_err();
            assert_eq!(e, "host bug");
            assert_eq!(*t.get(), 1, "the value survives a panic");
        });
    }
}
