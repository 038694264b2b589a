//! The transfer of one Hub file into the shared cache, done here rather than by the hf-hub
//! crate's `download`, which checks neither the length nor the sha256 of what it received, sets
//! no timeouts (a stalled server hangs it for ever), retries nothing by default (or, with
//! `with_retries`, everything at once, 404s included), and gives up on another process's lock
//! after 5 s.
//!
//! The requests are the ones the Hub expects and hf-hub and `huggingface_hub` make: a
//! `Range: bytes=0-0` GET on `/{repo}/resolve/{revision}/{file}` for the metadata (`x-repo-commit`,
//! `x-linked-etag` or `etag`, the size), relative redirects followed on the Hub, any other taken
//! as the CDN holding an LFS file's bytes, and the token sent only to the endpoint's own origin
//! (scheme, host and port), as `huggingface_hub` and browsers send credentials. No URL is shown
//! with the user, password or query it may carry ([`super::shown`]).
//! The cache is `huggingface_hub`'s: the bytes arrive in `blobs/<etag>.incomplete` (kept, and
//! resumed with a `Range` request, when a transfer is cut short), under the lock
//! `huggingface_hub` takes (`.locks/<repo folder>/<etag>.lock`), and are renamed to
//! `blobs/<etag>` only once complete: exactly the announced size and, for an LFS file (whose etag
//! is its sha256), the right sha256.
//!
//! What can go wrong is bounded: connect and read timeouts (`HF_HUB_ETAG_TIMEOUT` for the
//! metadata, `HF_HUB_DOWNLOAD_TIMEOUT` for the transfer, 10 s each by default), a few retries with
//! exponential backoff for 429 and 5xx (honouring a `Retry-After` in seconds, capped), none for
//! other errors, and Ctrl-C checked between chunks.

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressStyle};
use sha2::{Digest, Sha256};
use url::Url;

use super::answer::{
    content_range, is_file_name, is_sha256, is_timeout, normalize_etag, redirect, retry_after,
    same_origin, seconds, status_failure, total_size, transfer, transport_failure, Failure,
};
use super::lock::Lock;
use super::{shown, shown_unparsed};
use crate::error::Error;

/// How many times a 429 or 5xx answer is asked again before it is an error.
const RETRIES: u32 = 3;
/// The longest wait before a retry, whatever `Retry-After` asks for: a user is waiting.
const MAX_WAIT: Duration = Duration::from_secs(20);
/// Relative redirects followed on the Hub (a renamed repo answers with one).
const MAX_REDIRECTS: usize = 5;
/// Bytes read (and checked for Ctrl-C) at a time.
const CHUNK: usize = 256 * 1024;

/// What the Hub says of a file before its bytes are asked for.
#[derive(Debug)]
pub(super) struct Metadata {
    /// The commit the revision is at (`x-repo-commit`): the snapshot folder's name.
    pub(super) commit: String,
    /// The blob's name: `x-linked-etag` for an LFS file (its sha256), else `etag`.
    pub(super) etag: String,
    /// The file's length in bytes.
    pub(super) size: u64,
    /// Where its bytes are: the resolve URL (after relative redirects) or the CDN's.
    location: String,
    /// Whether the token goes along to `location`: only on the endpoint's own origin (a CDN URL
    /// is signed; the token is not the CDN's business). Nothing after `location` can add it back:
    /// no redirect from there is followed.
    auth: bool,
}

/// An HTTP client for the Hub, with `huggingface_hub`'s timeouts.
pub(super) struct Client {
    /// For the metadata requests: connect and read time out after `etag_timeout`.
    meta: ureq::Agent,
    /// For the transfers: connect and each read time out after `download_timeout`.
    data: ureq::Agent,
    etag_timeout: Duration,
    download_timeout: Duration,
    token: Option<String>,
    /// Whether to draw a progress bar (and say when waiting for another process) on stderr.
    progress: bool,
}

impl Client {
    pub(super) fn new(
        token: Option<String>,
        etag_timeout: Duration,
        download_timeout: Duration,
        progress: bool,
    ) -> Self {
        let agent = |timeout: Duration| {
            ureq::AgentBuilder::new()
                .try_proxy_from_env(true)
                // Redirects are followed by hand: which ones, and where the token goes, matters.
                .redirects(0)
                .timeout_connect(timeout)
                .timeout_read(timeout)
                .timeout_write(timeout)
                .user_agent(concat!("gpt2/", env!("CARGO_PKG_VERSION"), "; rust"))
                .build()
        };
        Self {
            meta: agent(etag_timeout),
            data: agent(download_timeout),
            etag_timeout,
            download_timeout,
            token,
            progress,
        }
    }

    /// The token, for [`super::redact`].
    pub(super) fn token(&self) -> Option<&str> {
        self.token.as_deref()
    }

    fn get(&self, agent: &ureq::Agent, url: &str, auth: bool) -> ureq::Request {
        // Identity: a compressed body's length is not the file's, and the size is checked.
        let request = agent.get(url).set("Accept-Encoding", "identity");
        match (&self.token, auth) {
            (Some(token), true) => request.set("Authorization", &format!("Bearer {token}")),
            _ => request,
        }
    }

    /// `request()` sent, and sent again after a wait while the answer is 429 or 5xx, at most
    /// [`RETRIES`] times. Any other answer, error statuses included, is returned as it is: a 404
    /// or a 401 will not change by asking again.
    fn send(
        &self,
        request: impl Fn() -> ureq::Request,
        timeout: (Duration, &'static str),
        hub: bool,
    ) -> Result<ureq::Response, Failure> {
        let mut waited = Duration::ZERO;
        let mut attempt = 0;
        loop {
            crate::interrupt::check()?;
            let response = match request().call() {
                Ok(response) | Err(ureq::Error::Status(_, response)) => response,
                Err(ureq::Error::Transport(e)) => return Err(transport_failure(&e, timeout)),
            };
            let code = response.status();
            if code != 429 && !(500..600).contains(&code) {
                return Ok(response);
            }
            attempt += 1;
            if attempt > RETRIES {
                return Err(status_failure(&response, attempt, waited, hub));
            }
            let wait = retry_after(&response)
                .unwrap_or(Duration::from_secs(1 << (attempt - 1)))
                .min(MAX_WAIT);
            drop(response);
            sleep(wait)?;
            waited += wait;
        }
    }

    /// The metadata of the file at `url` (a resolve URL).
    pub(super) fn metadata(&self, url: &str) -> Result<Metadata, Failure> {
        let timeout = (self.etag_timeout, "HF_HUB_ETAG_TIMEOUT");
        let endpoint = Url::parse(url).map_err(|e| {
            transfer(format!(
                "{} is not a URL ({e}); check HF_ENDPOINT",
                shown_unparsed(url)
            ))
        })?;
        let mut here = endpoint.clone();
        let mut redirects = 0;
        let response = loop {
            let response = self.send(
                || {
                    self.get(&self.meta, here.as_str(), same_origin(&endpoint, &here))
                        .set("Range", "bytes=0-0")
                },
                timeout,
                true,
            )?;
            if !(300..400).contains(&response.status()) {
                break response;
            }
            let Some(location) = response.header("Location") else {
                break response;
            };
            let (next, on_hub) = redirect(&endpoint, &here, location).map_err(|e| {
                transfer(format!(
                    "{} redirected to {location:?}, not a URL ({e})",
                    shown(&here)
                ))
            })?;
            if !on_hub {
                break response; // the CDN: taken below, with this answer's x-linked-* headers
            }
            if redirects == MAX_REDIRECTS {
                return Err(transfer(format!(
                    "{} redirected more than {MAX_REDIRECTS} times",
                    shown(&endpoint)
                )));
            }
            here = next;
            redirects += 1;
        };
        let status = response.status();
        // 416: a zero-length file has no byte 0; its Content-Range still gives its size.
        if status >= 400 && status != 416 {
            return Err(status_failure(&response, 1, Duration::ZERO, true));
        }
        let commit = response
            .header("x-repo-commit")
            .map(str::trim)
            .filter(|c| !c.is_empty() && c.bytes().all(|b| b.is_ascii_alphanumeric()))
            .ok_or_else(|| {
                transfer(format!(
                    "{} answered without a usable x-repo-commit header: is HF_ENDPOINT a \
                     Hugging Face Hub?",
                    shown(&here)
                ))
            })?
            .to_string();
        let etag = response
            .header("x-linked-etag")
            .or_else(|| response.header("etag"))
            .map(normalize_etag)
            .filter(|e| is_file_name(e))
            .ok_or_else(|| {
                transfer(format!(
                    "{} answered without a usable etag (the file's id in the cache)",
                    shown(&here)
                ))
            })?;
        let linked_size = response
            .header("x-linked-size")
            .and_then(|s| s.trim().parse::<u64>().ok());
        if !(300..400).contains(&status) {
            let size = match linked_size {
                Some(size) => size,
                None => total_size(&response).ok_or_else(|| {
                    transfer(format!("{} did not say how long the file is", shown(&here)))
                })?,
            };
            return Ok(Metadata {
                commit,
                etag,
                size,
                location: here.to_string(),
                auth: same_origin(&endpoint, &here),
            });
        }
        let location = response
            .header("Location")
            .and_then(|l| redirect(&endpoint, &here, l).ok())
            .map(|(location, _)| location)
            .ok_or_else(|| {
                transfer(format!(
                    "{} redirected without a usable Location",
                    shown(&here)
                ))
            })?;
        // Not to a CDN, nor from https to http on the same host.
        let auth = same_origin(&endpoint, &location);
        let size = match linked_size {
            Some(size) => size,
            // No x-linked-size (a mirror, say): ask the CDN, as hf-hub does.
            None => {
                let response = self.send(
                    || {
                        self.get(&self.meta, location.as_str(), auth)
                            .set("Range", "bytes=0-0")
                    },
                    timeout,
                    false,
                )?;
                if response.status() >= 400 && response.status() != 416 {
                    return Err(status_failure(&response, 1, Duration::ZERO, false));
                }
                total_size(&response).ok_or_else(|| {
                    transfer(format!(
                        "{} did not say how long the file is",
                        shown(&location)
                    ))
                })?
            }
        };
        Ok(Metadata {
            commit,
            etag,
            size,
            location: location.to_string(),
            auth,
        })
    }

    /// Makes `blob` the file `meta` describes: already there with its size (another process may
    /// have just finished it), or downloaded into `<blob>.incomplete` (resuming what an earlier
    /// run left there), checked, and renamed into place. It holds `locks` meanwhile, waiting for
    /// any other process that holds them, and returns them still held so that the caller can
    /// link the snapshot entry before another process looks.
    pub(super) fn fetch_blob(
        &self,
        meta: &Metadata,
        blob: &Path,
        locks: &[PathBuf],
        name: &str,
    ) -> Result<Vec<Lock>, Failure> {
        if let Some(dir) = blob.parent() {
            std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        }
        let held = locks
            .iter()
            .map(|path| Lock::acquire(path, name, self.progress))
            .collect::<Result<Vec<_>, _>>()?;
        if std::fs::metadata(blob).is_ok_and(|m| m.is_file() && m.len() == meta.size) {
            return Ok(held);
        }
        let incomplete = with_suffix(blob, ".incomplete");
        // What an interrupted hf-hub download left (`<etag>.part`) is resumed just the same.
        let mut part = blob.to_path_buf();
        part.set_extension("part");
        if !incomplete.exists() && part.is_file() {
            std::fs::rename(&part, &incomplete).map_err(|e| Error::io(&part, e))?;
        }
        self.transfer(meta, &incomplete, name)?;
        std::fs::rename(&incomplete, blob).map_err(|e| Error::io(blob, e))?;
        Ok(held)
    }

    /// Fills `incomplete` with the file's bytes, from what it already holds on, and checks them.
    fn transfer(&self, meta: &Metadata, incomplete: &Path, name: &str) -> Result<(), Failure> {
        let io = |e| Failure::Local(Error::io(incomplete, e));
        let size = meta.size;
        let sha256 = is_sha256(&meta.etag).then_some(meta.etag.as_str());
        let mut hasher = sha256.map(|_| Sha256::new());
        let have = match std::fs::metadata(incomplete) {
            Ok(m) if m.len() <= size => m.len(),
            _ => 0, // none, or longer than the file: not a start of it
        };
        let open = || {
            OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(false)
                .open(incomplete)
                .map_err(io)
        };
        let file = if have == size {
            // An earlier run got every byte but stopped before the rename.
            let mut file = open()?;
            if let Some(hasher) = hasher.as_mut() {
                hash_prefix(&mut file, size, hasher).map_err(io)?;
            }
            file
        } else {
            let range = format!("bytes={have}-");
            let response = self.send(
                || {
                    let request = self.get(&self.data, &meta.location, meta.auth);
                    if have > 0 {
                        request.set("Range", &range)
                    } else {
                        request
                    }
                },
                (self.download_timeout, "HF_HUB_DOWNLOAD_TIMEOUT"),
                false,
            )?;
            let start = match response.status() {
                200 => 0, // the whole file: a server that ignores Range answers so
                206 => match content_range(&response) {
                    Some((start, total)) if start == have && total.is_none_or(|t| t == size) => {
                        start
                    }
                    _ => {
                        return Err(transfer(format!(
                            "asked for bytes {have}- of {size}, the server sent {}; run again",
                            response
                                .header("Content-Range")
                                .unwrap_or("no Content-Range")
                        )))
                    }
                },
                416 => {
                    // It lacks bytes the part we hold says it has: start afresh next time.
                    let _ = std::fs::remove_file(incomplete);
                    return Err(transfer(format!(
                        "the server refused to resume at byte {have} of {size}; the partial \
                         download was deleted, run again"
                    )));
                }
                _ => return Err(status_failure(&response, 1, Duration::ZERO, false)),
            };
            let identity = response
                .header("Content-Encoding")
                .is_none_or(|e| e.trim().eq_ignore_ascii_case("identity"));
            if let Some(len) = response
                .header("Content-Length")
                .and_then(|l| l.trim().parse::<u64>().ok())
            {
                if identity && start.checked_add(len) != Some(size) {
                    return Err(transfer(format!(
                        "the server announced {} bytes where the Hub announced {size} bytes; \
                         nothing was kept, run again",
                        start.saturating_add(len)
                    )));
                }
            }
            let mut file = open()?;
            file.set_len(start).map_err(io)?;
            if let Some(hasher) = hasher.as_mut() {
                // The part from an earlier run is hashed as it is on disk.
                hash_prefix(&mut file, start, hasher).map_err(io)?;
            }
            file.seek(SeekFrom::Start(start)).map_err(io)?;
            let mut have = start;
            let bar = Bar::new(self.progress, name, size, have);
            let mut reader = response.into_reader();
            let mut buf = vec![0u8; CHUNK];
            loop {
                // On Ctrl-C the bytes so far stay in `.incomplete`, for the next run to resume.
                crate::interrupt::check()?;
                let n = match reader.read(&mut buf) {
                    Ok(0) => break,
                    Ok(n) => n,
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                    Err(e) if is_timeout(&e) => {
                        return Err(transfer(format!(
                            "timed out: no data for {} (HF_HUB_DOWNLOAD_TIMEOUT) after {have} of \
                             {size} bytes; run again to resume",
                            seconds(self.download_timeout)
                        )))
                    }
                    Err(e) => {
                        return Err(transfer(format!(
                            "the connection dropped after {have} of {size} bytes ({e}); run \
                             again to resume"
                        )))
                    }
                };
                if have + n as u64 > size {
                    drop(file);
                    let _ = std::fs::remove_file(incomplete);
                    return Err(transfer(format!(
                        "the server sent more than the {size} bytes the Hub announced; nothing \
                         was kept, run again"
                    )));
                }
                file.write_all(&buf[..n]).map_err(io)?;
                if let Some(hasher) = hasher.as_mut() {
                    hasher.update(&buf[..n]);
                }
                have += n as u64;
                bar.set(have);
            }
            if have < size {
                return Err(transfer(format!(
                    "the download ended after {have} of {size} bytes; run again to resume"
                )));
            }
            bar.done();
            file
        };
        if let (Some(expected), Some(hasher)) = (sha256, hasher) {
            let got: String = hasher
                .finalize()
                .iter()
                .map(|b| format!("{b:02x}"))
                .collect();
            if got != expected {
                drop(file);
                let _ = std::fs::remove_file(incomplete);
                return Err(transfer(format!(
                    "the download was corrupted: its sha256 is {got}, not the {expected} the Hub \
                     announced; it was deleted, run again"
                )));
            }
        }
        // On disk before it is renamed into place: a blob in the cache is always whole.
        file.sync_all().map_err(io)?;
        Ok(())
    }
}

/// Feeds the first `len` bytes of `file` to `hasher`.
fn hash_prefix(file: &mut File, len: u64, hasher: &mut Sha256) -> std::io::Result<()> {
    file.seek(SeekFrom::Start(0))?;
    let copied = std::io::copy(&mut Read::by_ref(file).take(len), hasher)?;
    if copied == len {
        Ok(())
    } else {
        Err(std::io::Error::new(
            std::io::ErrorKind::UnexpectedEof,
            format!("holds {copied} bytes, not {len}"),
        ))
    }
}

/// A progress bar on stderr, or nothing; cleared if dropped before [`Bar::done`], so that an
/// error line stands alone.
struct Bar(Option<ProgressBar>);

impl Bar {
    fn new(show: bool, name: &str, size: u64, at: u64) -> Self {
        if !show {
            return Self(None);
        }
        let bar = ProgressBar::new(size);
        if let Ok(style) = ProgressStyle::with_template(
            "{msg} [{elapsed_precise}] [{wide_bar}] {bytes}/{total_bytes} {bytes_per_sec} ({eta})",
        ) {
            bar.set_style(style);
        }
        bar.set_message(name.to_string());
        bar.set_position(at);
        Self(Some(bar))
    }

    fn set(&self, at: u64) {
        if let Some(bar) = &self.0 {
            bar.set_position(at);
        }
    }

    fn done(&self) {
        if let Some(bar) = &self.0 {
            bar.finish();
        }
    }
}

impl Drop for Bar {
    fn drop(&mut self) {
        if let Some(bar) = &self.0 {
            if !bar.is_finished() {
                bar.finish_and_clear();
            }
        }
    }
}

/// Sleeps `d`, checking for Ctrl-C meanwhile.
fn sleep(d: Duration) -> Result<(), Failure> {
    let end = Instant::now() + d;
    loop {
        crate::interrupt::check()?;
        let now = Instant::now();
        if now >= end {
            return Ok(());
        }
        std::thread::sleep((end - now).min(Duration::from_millis(50)));
    }
}

/// `path` with `suffix` added to its name (`<etag>.incomplete`, whatever dots the etag has).
fn with_suffix(path: &Path, suffix: &str) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(suffix);
    PathBuf::from(name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn suffixes_keep_the_whole_name() {
        assert_eq!(
            with_suffix(Path::new("/c/blobs/abc.def"), ".incomplete"),
            PathBuf::from("/c/blobs/abc.def.incomplete")
        );
    }

    #[test]
    fn timeouts_are_found_under_other_errors() {
        let timed_out = std::io::Error::new(std::io::ErrorKind::TimedOut, "slow");
        assert!(is_timeout(&timed_out));
        let wrapped = std::io::Error::other(timed_out);
        assert!(is_timeout(&wrapped));
        let refused = std::io::Error::from(std::io::ErrorKind::ConnectionRefused);
        assert!(!is_timeout(&refused));
    }
}
