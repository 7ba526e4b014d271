//! Continuous batching: one thread per engine runs every active generation, and each of its
//! forward passes takes the next token of every decoding stream and a chunk of a prompt being
//! read, so that the weights are read once for all of them. Decode is memory-bound, so this is
//! what makes several streams faster than one.
//!
//! A stream joins or leaves between passes. Events reach its [`StreamHandle`] over a channel;
//! a stream whose reader falls [`MAX_AHEAD`] events behind sits out passes until it catches up,
//! so an unread stream costs no work. Dropping the handle cancels the stream: its generation is
//! dropped on the scheduler thread, which hands its cache to the prefix pool.

use std::collections::VecDeque;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::Duration;

use super::{Event, Generation, Stats, PREFILL_CHUNK};
use crate::error::{panic_message, Error, Result};
use crate::model::Workspace;

/// Streams per forward pass unless the engine is told otherwise. More streams give more tokens
/// per second in all, up to where the pass stops being bound by reading the weights.
pub const DEFAULT_MAX_BATCH: usize = 8;

/// Events a stream may be ahead of its reader.
pub const MAX_AHEAD: usize = 8;

/// Prompt tokens per pass while other streams decode: their next token waits for the pass, so
/// a long prompt is read in smaller chunks than when it runs alone ([`PREFILL_CHUNK`]).
pub const PREFILL_CHUNK_WHILE_DECODING: usize = 64;

/// What one stream shares between the scheduler and its handle.
struct StreamState {
    cancelled: AtomicBool,
    /// Events sent and not yet received.
    ahead: AtomicUsize,
    stats: Mutex<Stats>,
}

struct Job {
    generation: Generation,
    events: Sender<Result<Event>>,
    state: Arc<StreamState>,
}

impl Job {
    fn runnable(&self) -> bool {
        self.state.ahead.load(Ordering::Acquire) < MAX_AHEAD
    }

    fn publish_stats(&self) {
        *self.state.stats.lock().unwrap_or_else(|e| e.into_inner()) =
            self.generation.stats().clone();
    }

    /// Sends the stream's last event after dropping its generation, so that a reader that
    /// sees the end also finds its cache in the prefix pool and its turn in its conversation.
    fn finish(self, last: Result<Event>) {
        self.publish_stats();
        let Job {
            generation,
            events,
            state,
        } = self;
        drop(generation);
        state.ahead.fetch_add(1, Ordering::AcqRel);
        let _ = events.send(last);
    }

    fn send(&self, event: Result<Event>) {
        self.state.ahead.fetch_add(1, Ordering::AcqRel);
        // The handle may be gone already; the job ends either way.
        let _ = self.events.send(event);
    }
}

#[derive(Default)]
struct Inbox {
    submitted: Vec<Job>,
    /// The engine is dropping: the thread ends once it has nothing left to run.
    closing: bool,
}

#[derive(Default)]
struct Shared {
    inbox: Mutex<Inbox>,
    /// Rung on a submission, a cancellation, a read that lets a stream run again, and closing.
    wake: Condvar,
    /// Streams in the running batch and waiting for a place in it.
    active: AtomicUsize,
    queued: AtomicUsize,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Inbox> {
        // Every update leaves the inbox whole, so a panic elsewhere need not poison it.
        self.inbox.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn ring(&self) {
        // Taking the lock orders the ring after the state change the scheduler is about to check.
        drop(self.lock());
        self.wake.notify_all();
    }
}

/// The scheduler of one engine.
pub struct Scheduler {
    shared: Arc<Shared>,
    max_batch: usize,
}

impl Scheduler {
    pub fn new(max_batch: usize) -> Result<Self> {
        if max_batch == 0 {
            return Err(Error::invalid_argument("max_batch must be >= 1, got 0"));
        }
        let shared = Arc::new(Shared::default());
        let thread_shared = shared.clone();
        std::thread::Builder::new()
            .name("phi3-scheduler".into())
            .spawn(move || run(&thread_shared, max_batch))
            .map_err(|e| Error::Internal(format!("cannot start the scheduler thread: {e}")))?;
        Ok(Self { shared, max_batch })
    }

    pub fn max_batch(&self) -> usize {
        self.max_batch
    }

    /// Streams in the running batch.
    pub fn active(&self) -> usize {
        self.shared.active.load(Ordering::Relaxed)
    }

    /// Streams waiting for a place in the batch.
    pub fn queued(&self) -> usize {
        self.shared.queued.load(Ordering::Relaxed)
    }

    /// Hands `generation` to the scheduler thread; its events come through the handle.
    pub fn submit(&self, generation: Generation) -> StreamHandle {
        let (events, receiver) = mpsc::channel();
        let state = Arc::new(StreamState {
            cancelled: AtomicBool::new(false),
            ahead: AtomicUsize::new(0),
            stats: Mutex::new(generation.stats().clone()),
        });
        let job = Job {
            generation,
            events,
            state: state.clone(),
        };
        self.shared.queued.fetch_add(1, Ordering::Relaxed);
        self.shared.lock().submitted.push(job);
        self.shared.wake.notify_all();
        StreamHandle {
            receiver: Mutex::new(receiver),
            state,
            shared: self.shared.clone(),
            done: false,
        }
    }
}

impl Drop for Scheduler {
    fn drop(&mut self) {
        self.shared.lock().closing = true;
        self.shared.wake.notify_all();
    }
}

/// The reading end of a submitted generation.
pub struct StreamHandle {
    /// In a mutex only to make the handle `Sync` (Python objects must be); reads go through
    /// `&mut self` and never lock.
    receiver: Mutex<Receiver<Result<Event>>>,
    state: Arc<StreamState>,
    shared: Arc<Shared>,
    /// A `Finished` event or an error came: nothing more will.
    done: bool,
}

impl StreamHandle {
    /// The next event, waiting at most `timeout`: `None` when none came in time. After the
    /// last event (`Finished` or an error) every call returns `Finished` with no text.
    pub fn next_timeout(&mut self, timeout: Duration) -> Option<Result<Event>> {
        if self.done {
            return Some(Ok(Event::Finished {
                text: String::new(),
            }));
        }
        let receiver = self.receiver.get_mut().unwrap_or_else(|e| e.into_inner());
        let event = match receiver.recv_timeout(timeout) {
            Ok(event) => event,
            Err(RecvTimeoutError::Timeout) => return None,
            Err(RecvTimeoutError::Disconnected) => Err(Error::Internal(
                "the scheduler dropped a stream without finishing it".into(),
            )),
        };
        if self.state.ahead.fetch_sub(1, Ordering::AcqRel) == MAX_AHEAD {
            // The stream was held back for this reader; it may run again.
            self.shared.ring();
        }
        self.done = matches!(event, Ok(Event::Finished { .. }) | Err(_));
        Some(event)
    }

    /// The next event, waiting as long as it takes.
    pub fn wait_next(&mut self) -> Result<Event> {
        loop {
            if let Some(event) = self.next_timeout(Duration::from_secs(3600)) {
                return event;
            }
        }
    }

    /// Ends the stream and waits until the scheduler has let go of it: its place in the batch
    /// is free and its cache is in the prefix pool when this returns.
    pub fn close(mut self) {
        if self.done {
            return;
        }
        self.done = true;
        self.state.cancelled.store(true, Ordering::Release);
        self.shared.ring();
        // The scheduler drops the stream's sender with its generation.
        let receiver = self.receiver.get_mut().unwrap_or_else(|e| e.into_inner());
        while receiver.recv().is_ok() {}
    }

    /// Counts and speeds so far, as of the last event sent.
    pub fn stats(&self) -> Stats {
        self.state
            .stats
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
}

impl Drop for StreamHandle {
    fn drop(&mut self) {
        if !self.done {
            self.state.cancelled.store(true, Ordering::Release);
            self.shared.ring();
        }
    }
}

/// The scheduler thread: admits streams, runs passes, delivers events, until the engine is
/// dropped and nothing is left to run.
fn run(shared: &Shared, max_batch: usize) {
    let mut waiting: VecDeque<Job> = VecDeque::new();
    let mut batch: Vec<Job> = Vec::new();
    let mut workspace = Workspace::default();
    loop {
        {
            let mut inbox = shared.lock();
            loop {
                waiting.extend(inbox.submitted.drain(..));
                let cancelled = |j: &Job| j.state.cancelled.load(Ordering::Acquire);
                let ready = batch.iter().any(|j| j.runnable() || cancelled(j))
                    || (batch.len() < max_batch && !waiting.is_empty())
                    || waiting.iter().any(cancelled);
                if ready {
                    break;
                }
                if inbox.closing && batch.is_empty() && waiting.is_empty() {
                    return;
                }
                inbox = shared.wake.wait(inbox).unwrap_or_else(|e| e.into_inner());
            }
        }
        // Cancelled streams leave (their generations drop here, outside the lock: the cache
        // goes to the prefix pool), and waiting streams take the free places.
        batch.retain(|j| !j.state.cancelled.load(Ordering::Acquire));
        waiting.retain(|j| !j.state.cancelled.load(Ordering::Acquire));
        while batch.len() < max_batch {
            let Some(job) = waiting.pop_front() else {
                break;
            };
            batch.push(job);
        }
        shared.active.store(batch.len(), Ordering::Relaxed);
        shared.queued.store(waiting.len(), Ordering::Relaxed);
        if batch.iter().any(Job::runnable) {
            step(&mut batch, &mut workspace);
        }
        shared.active.store(batch.len(), Ordering::Relaxed);
    }
}

/// One forward pass over the runnable streams of `batch`, then an event for each; finished
/// and failed streams leave the batch.
fn step(batch: &mut Vec<Job>, workspace: &mut Workspace) {
    let runnable: Vec<usize> = (0..batch.len()).filter(|&i| batch[i].runnable()).collect();
    let mut last: Vec<Option<Result<Event>>> = (0..batch.len()).map(|_| None).collect();
    match catch_unwind(AssertUnwindSafe(|| forward(batch, &runnable, workspace))) {
        Ok(failed) => {
            for (i, error) in failed {
                last[i] = Some(Err(error));
            }
        }
        Err(panic) => {
            // The caches of this pass may be half written: every stream in it ends.
            let message = panic_message(panic.as_ref());
            for &i in &runnable {
                last[i] = Some(Err(Error::Internal(message.clone())));
            }
        }
    }
    for &i in &runnable {
        if last[i].is_some() {
            continue;
        }
        let job = &mut batch[i];
        let event = catch_unwind(AssertUnwindSafe(|| job.generation.produce()))
            .unwrap_or_else(|panic| Err(Error::Internal(panic_message(panic.as_ref()))));
        match event {
            Ok(Event::Prefilled) => job.publish_stats(),
            Ok(Event::Token(piece)) => {
                job.publish_stats();
                job.send(Ok(Event::Token(piece)));
            }
            end => last[i] = Some(end),
        }
    }
    for (job, last) in std::mem::take(batch).into_iter().zip(last) {
        match last {
            None => batch.push(job),
            Some(last) => job.finish(last),
        }
    }
}

/// The model work of one pass: every stream that needs it, in one `forward_batch`. Returns the
/// streams that failed. When the pass as a whole fails (it checks its inputs before writing any
/// cache), each stream runs alone, so that one bad stream does not end the others.
fn forward(
    batch: &mut [Job],
    runnable: &[usize],
    workspace: &mut Workspace,
) -> Vec<(usize, Error)> {
    let decoding = runnable
        .iter()
        .filter(|&&i| batch[i].generation.is_decoding())
        .count();
    let full_budget = if decoding > 0 {
        PREFILL_CHUNK_WHILE_DECODING
    } else {
        PREFILL_CHUNK
    };
    let mut prompt_budget = full_budget;
    let Some(runtime) = runnable
        .first()
        .map(|&i| batch[i].generation.runtime().clone())
    else {
        return Vec::new();
    };
    let mut members = Vec::new();
    let mut inputs = Vec::new();
    // `runnable` is in batch order: one walk pairs it with the batch's disjoint borrows.
    let mut next_runnable = runnable.iter().copied().peekable();
    for (i, job) in batch.iter_mut().enumerate() {
        if next_runnable.next_if_eq(&i).is_none() {
            continue;
        }
        let reading_prompt = !job.generation.is_decoding();
        if reading_prompt && prompt_budget == 0 {
            continue;
        }
        if let Some(input) = job.generation.input(prompt_budget) {
            if reading_prompt {
                prompt_budget -= input.tokens.len();
            }
            members.push(i);
            inputs.push(input);
        }
    }
    if inputs.is_empty() {
        return Vec::new();
    }
    let runner = &runtime.runner;
    let vocab = runner.vocab_size();
    match runner.forward_batch(&mut inputs, workspace) {
        Ok(logits) => {
            drop(inputs);
            for (&i, row) in members.iter().zip(logits.chunks_exact(vocab)) {
                batch[i].generation.evaluated(row.to_vec());
            }
            Vec::new()
        }
        Err(_) if members.len() > 1 => {
            drop(inputs);
            let mut failed = Vec::new();
            for &i in &members {
                let generation = &mut batch[i].generation;
                let Some(input) = generation.input(full_budget) else {
                    continue;
                };
                match runner.forward_batch(&mut [input], workspace) {
                    Ok(logits) => generation.evaluated(logits),
                    Err(e) => failed.push((i, e)),
                }
            }
            failed
        }
        Err(e) => vec![(members[0], e)],
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::{Engine, EngineOptions, Prompt};
    use crate::generate::GenerationParams;
    use crate::sampling::SamplingParams;
    use crate::test_support::fixture;

    const TOPICS: [&str; 6] = [
        "ice hockey",
        "autumn rain",
        "a lighthouse",
        "snow",
        "the sea",
        "a cat",
    ];

    fn engine(max_batch: usize) -> Arc<Engine> {
        let options = EngineOptions {
            max_batch: Some(max_batch),
            cache_bytes: Some(0),
            ..EngineOptions::default()
        };
        Arc::new(Engine::load(&fixture("tiny-phi3-haiku-q4_k_m.gguf"), &options).unwrap())
    }

    fn generation(engine: &Arc<Engine>, topic: &str, max_tokens: usize) -> Generation {
        let params = GenerationParams {
            max_tokens,
            sampling: SamplingParams {
                temperature: 0.0,
                ..SamplingParams::default()
            },
            ..GenerationParams::default()
        };
        let prompt = Prompt::Text(format!("Write a haiku about {topic}"));
        engine.generate(&prompt, params).unwrap()
    }

    fn alone(mut generation: Generation) -> Vec<u32> {
        let mut ids = Vec::new();
        loop {
            match generation.step().unwrap() {
                Event::Token(piece) => ids.push(piece.id),
                Event::Finished { .. } => return ids,
                Event::Prefilled => {}
            }
        }
    }

    fn drain(handle: &mut StreamHandle) -> Vec<u32> {
        let mut ids = Vec::new();
        loop {
            match handle.wait_next().unwrap() {
                Event::Token(piece) => ids.push(piece.id),
                Event::Finished { .. } => return ids,
                Event::Prefilled => unreachable!("prefill events stay on the scheduler"),
            }
        }
    }

    /// Six streams on a batch of four (two wait for a place), some joining while others
    /// decode: each answers what it answers alone.
    #[test]
    fn batched_streams_answer_as_alone() {
        let engine = engine(4);
        let want: Vec<Vec<u32>> = TOPICS
            .iter()
            .map(|t| alone(generation(&engine, t, 40)))
            .collect();
        let mut handles: Vec<StreamHandle> = TOPICS[..3]
            .iter()
            .map(|t| engine.submit(generation(&engine, t, 40)))
            .collect();
        // Some tokens of the first ones before the others join.
        let mut got: Vec<Vec<u32>> = vec![Vec::new(); TOPICS.len()];
        for (handle, ids) in handles.iter_mut().zip(got.iter_mut()) {
            for _ in 0..3 {
                if let Event::Token(piece) = handle.wait_next().unwrap() {
                    ids.push(piece.id);
                }
            }
        }
        handles.extend(
            TOPICS[3..]
                .iter()
                .map(|t| engine.submit(generation(&engine, t, 40))),
        );
        for (handle, ids) in handles.iter_mut().zip(got.iter_mut()) {
            ids.extend(drain(handle));
        }
        assert_eq!(got, want);
        assert_eq!(engine.scheduler().queued(), 0);
    }

    /// A stream nobody reads stops MAX_AHEAD events ahead, and dropping it gives its place to
    /// a waiting one.
    #[test]
    fn unread_streams_wait_and_dropped_ones_leave() {
        let engine = engine(1);
        let unread = engine.submit(generation(&engine, "snow", 200));
        let deadline = std::time::Instant::now() + Duration::from_secs(120);
        while unread.stats().generated_tokens < MAX_AHEAD {
            assert!(std::time::Instant::now() < deadline, "{:?}", unread.stats());
            std::thread::sleep(Duration::from_millis(5));
        }
        let mut waiting = engine.submit(generation(&engine, "rain", 10));
        std::thread::sleep(Duration::from_millis(100));
        assert_eq!(unread.stats().generated_tokens, MAX_AHEAD);
        assert_eq!(waiting.stats().generated_tokens, 0);
        assert_eq!(engine.scheduler().queued(), 1);
        drop(unread);
        let ids = drain(&mut waiting);
        assert_eq!(ids, alone(generation(&engine, "rain", 10)));
        assert_eq!(
            waiting.stats().finish_reason,
            Some(super::super::FinishReason::Length)
        );
    }
}
