//! Memory a run may use, checked before allocating: an allocation the machine cannot serve
//! aborts the process (`memory allocation of N bytes failed`), so a run whose weights, KV cache or
//! attention would not fit is refused first, with the number of bytes it needs.

use crate::error::{Error, Result};

/// Bytes this process may still allocate: Linux's `MemAvailable`, lowered to the cgroup's limit
/// (containers) when there is one; `None` where neither can be read (the check is then skipped).
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
    Some(bytes)
}

/// `Ok` when `needed` bytes fit in what is [`available`], else [`Error::OutOfMemory`] about
/// `what` (computed only then).
pub fn check(needed: u128, what: impl FnOnce() -> String) -> Result<()> {
    match available() {
        Some(free) if needed > u128::from(free) => Err(Error::OutOfMemory {
            what: what(),
            needed,
            available: free.into(),
        }),
        _ => Ok(()),
    }
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
        assert!(check(1024, || unreachable!()).is_ok());
        assert_eq!(product(&[1 << 40, 1 << 40, 1 << 40, 1 << 40]), u128::MAX);
        assert_eq!(product(&[3, 4]), 12);
    }
}
