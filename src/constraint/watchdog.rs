//! Wall-clock budgets for llguidance's work. Its fuel limits count units of work, but some
//! hostile constraints (nested counted repetitions) make one unit slow; so each step also runs
//! under a deadline, after which one thread shared by the process cancels it. llguidance checks
//! for cancellation inside its lexer, so a cancelled step returns promptly with an error.

use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::time::{Duration, Instant};

use llguidance::CancellationHandle;

#[derive(Default)]
struct Watched {
    next_ticket: u64,
    /// (ticket, deadline, what to cancel when it passes).
    entries: Vec<(u64, Instant, CancellationHandle)>,
}

struct Shared {
    watched: Mutex<Watched>,
    changed: Condvar,
}

fn shared() -> &'static Arc<Shared> {
    static SHARED: OnceLock<Arc<Shared>> = OnceLock::new();
    SHARED.get_or_init(|| {
        let shared = Arc::new(Shared {
            watched: Mutex::new(Watched::default()),
            changed: Condvar::new(),
        });
        let watcher = shared.clone();
        // Should the thread fail to start, steps simply run without a deadline.
        let _ = std::thread::Builder::new()
            .name("phi3-grammar-watchdog".into())
            .spawn(move || watch(&watcher));
        shared
    })
}

fn watch(shared: &Shared) {
    let mut watched = shared.watched.lock().unwrap_or_else(|e| e.into_inner());
    loop {
        let now = Instant::now();
        watched.entries.retain(|(_, deadline, handle)| {
            let expired = *deadline <= now;
            if expired {
                handle.cancel();
            }
            !expired
        });
        let next = watched.entries.iter().map(|e| e.1).min();
        watched = match next {
            None => shared
                .changed
                .wait(watched)
                .unwrap_or_else(|e| e.into_inner()),
            Some(deadline) => {
                shared
                    .changed
                    .wait_timeout(watched, deadline.saturating_duration_since(now))
                    .unwrap_or_else(|e| e.into_inner())
                    .0
            }
        };
    }
}

/// Runs `work`; if it takes longer than `limit`, `handle` is cancelled.
pub(super) fn within<T>(
    handle: &CancellationHandle,
    limit: Duration,
    work: impl FnOnce() -> T,
) -> T {
    let shared = shared();
    let ticket = {
        let mut watched = shared.watched.lock().unwrap_or_else(|e| e.into_inner());
        let ticket = watched.next_ticket;
        watched.next_ticket += 1;
        watched
            .entries
            .push((ticket, Instant::now() + limit, handle.clone()));
        ticket
    };
    shared.changed.notify_one();
    let result = work();
    let mut watched = shared.watched.lock().unwrap_or_else(|e| e.into_inner());
    watched.entries.retain(|e| e.0 != ticket);
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_step_over_its_limit_is_cancelled_and_one_within_is_not() {
        let slow = CancellationHandle::default();
        within(&slow, Duration::from_millis(10), || {
            let start = Instant::now();
            while !slow.is_cancelled() && start.elapsed() < Duration::from_secs(60) {
                std::thread::sleep(Duration::from_millis(1));
            }
        });
        assert!(slow.is_cancelled());
        let quick = CancellationHandle::default();
        within(&quick, Duration::from_secs(60), || ());
        std::thread::sleep(Duration::from_millis(20));
        assert!(!quick.is_cancelled());
    }
}
