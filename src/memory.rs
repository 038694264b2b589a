//! Memory a run may use, checked before allocating: an allocation the machine cannot serve
//! aborts the process (`memory allocation of N bytes failed`), so a run whose weights, KV cache or
//! attention would not fit is refused first, with the number of bytes it needs.

use crate::error::{Error, Result};

/// Bytes this process may still allocate: Linux's `MemAvailable`, lowered to the cgroup's limit
/// (containers) and to what the address-space limit (`ulimit -v`) leaves, when there are ones;
/// `None` where none can be read (the check is then skipped).
pub fn available() -> Option<u64> {
    let meminfo = std::fs::read_to_string("/proc/meminfo").ok()?;
    let kib = |key: &str| -> Option<u64> {
        let line = meminfo.lines().find(|l| l.starts_with(key))?;
        line.split_whitespace().nth(1)?.parse::<u64>().ok()
    };
    let mut bytes = kib("MemAvailable:")?.checked_mul(1024)?;
    // cgroup v2: memory.max ("max" or bytes) minus what the group uses now.
    let read = |p: &str| std::fs::read_to_string(p).ok();
    if let (Some(max), Some(current)) = (
        read("/sys/fs/cgroup/memory.max"),
        read("/sys/fs/cgroup/memory.current"),
    ) {
        if let (Ok(max), Ok(current)) = (max.trim().parse::<u64>(), current.trim().parse::<u64>()) {
            bytes = bytes.min(max.saturating_sub(current));
        }
    }
    if let Some(left) = address_space_left() {
        bytes = bytes.min(left);
    }
    Some(bytes)
}

/// What `RLIMIT_AS` (`ulimit -v`) leaves of the address space: past it every allocation fails,
/// and a failed allocation aborts. `None` without a limit.
#[cfg(unix)]
fn address_space_left() -> Option<u64> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes the struct it is given, nothing else.
    if unsafe { libc::getrlimit(libc::RLIMIT_AS, &mut lim) } != 0
        || lim.rlim_cur == libc::RLIM_INFINITY
    {
        return None;
    }
    // VmSize: the address space mapped now (kB).
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmSize:"))?;
    let kib = line.split_whitespace().nth(1)?.parse::<u64>().ok()?;
    // `rlim_t` is u64 on Linux, not on every unix.
    #[allow(clippy::useless_conversion)]
    let limit = u64::try_from(lim.rlim_cur).ok()?;
    Some(limit.saturating_sub(kib.saturating_mul(1024)))
}

#[cfg(not(unix))]
fn address_space_left() -> Option<u64> {
    None
}

/// `Ok` when `needed` bytes fit in what is [`available`], else [`Error::OutOfMemory`] about
/// `what` (computed only then).
pub fn check(needed: u128, what: impl FnOnce() -> String) -> Result<()> {
    check_or(needed, what, "")
}

/// [`check`], whose error ends with `hint`: what to do instead (`"use a shorter prompt"`).
pub fn check_or(needed: u128, what: impl FnOnce() -> String, hint: &str) -> Result<()> {
    match available() {
        Some(free) if needed > u128::from(free) => Err(Error::OutOfMemory {
            what: what(),
            needed,
            available: free.into(),
            hint: hint.to_string(),
        }),
        _ => Ok(()),
    }
}

/// All of `r` (a prompt file, standard input: `name` in errors) as UTF-8 text, refused with its
/// size instead of aborting when it cannot fit: a file's `len`, when known, is checked before
/// reading, and the reading stops at what memory has room for.
pub fn read_text(
    r: impl std::io::Read,
    len: Option<u64>,
    name: &std::path::Path,
) -> Result<String> {
    use std::io::Read;
    let what = || format!("reading {}", name.display());
    let hint = "split it into smaller files";
    if let Some(len) = len {
        check_or(len.into(), what, hint)?;
    }
    let room = available().unwrap_or(u64::MAX);
    let mut bytes = Vec::new();
    r.take(room.saturating_add(1))
        .read_to_end(&mut bytes)
        .map_err(|e| Error::io(name, e))?;
    if bytes.len() as u64 > room {
        check_or(u128::MAX, what, hint)?;
    }
    String::from_utf8(bytes).map_err(|e| {
        Error::io(
            name,
            std::io::Error::new(std::io::ErrorKind::InvalidData, e.utf8_error()),
        )
    })
}

/// `a · b · ...` in u128, saturating: sizes of hostile layouts do not wrap.
pub fn product(factors: &[usize]) -> u128 {
    factors
        .iter()
        .try_fold(1u128, |acc, &f| acc.checked_mul(f as u128))
        .unwrap_or(u128::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_huge_request_is_refused_with_its_size() {
        if available().is_none() {
            return; // not Linux: nothing to check against
        }
        let err = check(u128::MAX / 2, || "a test".into()).err();
        let msg = err.map(|e| e.to_string()).unwrap_or_default();
        assert!(msg.starts_with("a test needs "), "{msg}");
        assert!(msg.ends_with(" of memory available"), "{msg}");
        let err = check_or(u128::MAX / 2, || "a test".into(), "try less").err();
        let msg = err.map(|e| e.to_string()).unwrap_or_default();
        assert!(msg.ends_with(" of memory available: try less"), "{msg}");
        assert!(check(1024, || unreachable!()).is_ok());
        assert_eq!(product(&[1 << 40, 1 << 40, 1 << 40, 1 << 40]), u128::MAX);
        assert_eq!(product(&[3, 4]), 12);
    }
}
