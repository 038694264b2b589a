//! A process-wide "stop" request (the `gpt2` binary raises it on Ctrl-C), checked at the points
//! where stopping leaves everything consistent: between generated tokens, layers, row blocks,
//! windows and downloaded chunks. A long run then ends with what it has (generation) or with
//! [`Error::Interrupted`], and unfinished output files are removed, never left half-written.

use std::sync::atomic::{AtomicBool, Ordering};

use crate::error::{Error, Result};

static REQUESTED: AtomicBool = AtomicBool::new(false);

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
