//! A process-wide "stop" request (the `gpt2` binary raises it on Ctrl-C), checked at the points
//! where stopping leaves everything consistent: between generated tokens, layers, row blocks,
//! windows and downloaded chunks. A long run then ends with what it has (generation) or with
//! [`Error::Interrupted`], and unfinished output files are removed, never left half-written.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use crate::error::{Error, Result};

static REQUESTED: AtomicBool = AtomicBool::new(false);

/// How many [`ReadingInput`] guards are alive.
static READING: AtomicUsize = AtomicUsize::new(0);

/// Asks every running operation to stop at its next check. Safe to call from a signal handler's
/// thread.
pub fn request() {
    REQUESTED.store(true, Ordering::SeqCst);
}

/// Whether a stop was requested.
pub fn requested() -> bool {
    REQUESTED.load(Ordering::Relaxed)
}

/// `Err(Error::Interrupted)` once a stop was requested.
pub(crate) fn check() -> Result<()> {
    if requested() {
        Err(Error::Interrupted)
    } else {
        Ok(())
    }
}

/// Held while the process waits on input that no check can interrupt (standard input or a FIFO
/// that stays open): a stop request then cannot wait for the next check, and the `gpt2` binary
/// exits at once (see [`reading_input`]).
pub struct ReadingInput(());

/// Marks a blocking read of input until the guard drops; `Err(Error::Interrupted)` if a stop
/// was already requested. A handler that calls [`request`] and then [`is_reading_input`] never
/// misses a read: either it sees the guard, or this sees its request (both are `SeqCst`).
pub fn reading_input() -> Result<ReadingInput> {
    READING.fetch_add(1, Ordering::SeqCst);
    let guard = ReadingInput(());
    if REQUESTED.load(Ordering::SeqCst) {
        return Err(Error::Interrupted);
    }
    Ok(guard)
}

/// Whether a [`ReadingInput`] guard is alive: a stop request cannot be seen until it drops.
pub fn is_reading_input() -> bool {
    READING.load(Ordering::SeqCst) > 0
}

impl Drop for ReadingInput {
    fn drop(&mut self) {
        READING.fetch_sub(1, Ordering::SeqCst);
    }
}
