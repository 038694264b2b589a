//! The cache's download lock: the one `huggingface_hub` takes on
//! `.locks/<repo folder>/<etag>.lock`, so a Python process and gpt2 never write one blob at once.

use std::fs::{File, OpenOptions};
use std::path::Path;
use std::time::Duration;

use super::answer::Failure;
use crate::error::Error;

/// An exclusive lock on a file, held until dropped (the OS releases it when the file closes,
/// also when the process dies, so a crash never leaves a stale lock).
pub(super) struct Lock {
    _file: File,
}

impl Lock {
    /// Waits (without a limit, but Ctrl-C ends the wait) until no other process holds `path`.
    pub(super) fn acquire(path: &Path, name: &str, tell: bool) -> Result<Self, Failure> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        }
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(path)
            .map_err(|e| Error::io(path, e))?;
        let mut told = false;
        loop {
            if try_lock(&file).map_err(|e| Error::io(path, e))? {
                return Ok(Self { _file: file });
            }
            if tell && !told {
                eprintln!("waiting for another download of {name} to finish...");
                told = true;
            }
            crate::interrupt::check()?;
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

/// Whether it got the lock, without waiting: polled rather than blocking ([`File::lock`]), so
/// that Ctrl-C is noticed while waiting. std's lock is `flock(LOCK_EX | LOCK_NB)` on Unix, the
/// lock Python's `filelock` takes on the same `.lock` file, so the two exclude each other (on
/// Windows it is `LockFileEx`). Where there is none (`Unsupported`), no lock: two downloads of
/// one blob then both run, each renaming a whole, checked file into place, so the cache stays
/// right; only the bandwidth is spent twice.
fn try_lock(file: &File) -> std::io::Result<bool> {
    match file.try_lock() {
        Ok(()) => Ok(true),
        Err(std::fs::TryLockError::WouldBlock) => Ok(false),
        Err(std::fs::TryLockError::Error(e)) => match e.kind() {
            std::io::ErrorKind::Interrupted => Ok(false),
            std::io::ErrorKind::Unsupported => Ok(true),
            _ => Err(e),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_held_lock_excludes_another_handle_until_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.lock");
        let open = || {
            OpenOptions::new()
                .create(true)
                .truncate(false)
                .write(true)
                .open(&path)
                .unwrap()
        };
        // Two opens of one file are two locks, as two processes' are.
        let (a, b) = (open(), open());
        assert!(try_lock(&a).unwrap());
        assert!(!try_lock(&b).unwrap());
        drop(a);
        assert!(try_lock(&b).unwrap());
    }
}
