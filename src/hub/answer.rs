//! What the Hub's HTTP answers mean: sizes and ranges, etags, where a redirect leads and whether
//! the token may follow it, and how a failed request is told ([`Failure`]).

use std::time::Duration;

use url::Url;

use super::shown;
use crate::error::Error;

/// The wait a 429 or 503 asks for, when it gives one in seconds (the HTTP-date form is rare
/// enough to get the backoff instead).
pub(super) fn retry_after(response: &ureq::Response) -> Option<Duration> {
    let secs: u64 = response.header("Retry-After")?.trim().parse().ok()?;
    Some(Duration::from_secs(secs))
}

/// The size of the whole file from an answer to a range request: `Content-Range: bytes a-b/N`
/// (or `bytes */N`), else the `Content-Length` of a 200 (a server that ignored the range).
pub(super) fn total_size(response: &ureq::Response) -> Option<u64> {
    if let Some(range) = response.header("Content-Range") {
        return range.rsplit('/').next()?.trim().parse().ok();
    }
    if response.status() == 200 {
        return response.header("Content-Length")?.trim().parse().ok();
    }
    None
}

/// `(a, Some(N))` of `Content-Range: bytes a-b/N` (`None` for a total of `*`).
pub(super) fn content_range(response: &ureq::Response) -> Option<(u64, Option<u64>)> {
    parse_content_range(response.header("Content-Range")?)
}

pub(super) fn parse_content_range(value: &str) -> Option<(u64, Option<u64>)> {
    let (range, total) = value.trim().strip_prefix("bytes ")?.split_once('/')?;
    let (start, end) = range.split_once('-')?;
    let (start, end): (u64, u64) = (start.trim().parse().ok()?, end.trim().parse().ok()?);
    if end < start {
        return None;
    }
    let total = match total.trim() {
        "*" => None,
        t => Some(t.parse().ok()?),
    };
    Some((start, total))
}

/// An ETag as a blob name: without `W/` and quotes, as `huggingface_hub` does.
pub(super) fn normalize_etag(raw: &str) -> String {
    let raw = raw.trim();
    raw.strip_prefix("W/")
        .unwrap_or(raw)
        .trim_matches('"')
        .to_string()
}

/// Whether a server-given name can be a file in `blobs/`: no path, no hidden or odd name.
pub(super) fn is_file_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 200
        && !name.starts_with('.')
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
}

/// Whether an etag is a sha256 (an LFS file's), as `huggingface_hub` tells them apart from git's
/// sha1s.
pub(super) fn is_sha256(etag: &str) -> bool {
    etag.len() == 64 && etag.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

/// Whether `a` and `b` have one origin (scheme, host and port), as browsers and
/// `huggingface_hub` judge where credentials may go.
pub(super) fn same_origin(a: &Url, b: &Url) -> bool {
    a.origin() == b.origin()
}

/// Where an answer to `here` with `Location: location` leads, resolved as a browser resolves it
/// (`//host:port/x` names another host, not a path), and whether that is still the Hub: a
/// relative `Location` on the endpoint's own origin (a renamed repo). Any other is where the
/// bytes are (the CDN).
pub(super) fn redirect(
    endpoint: &Url,
    here: &Url,
    location: &str,
) -> Result<(Url, bool), url::ParseError> {
    let to = here.join(location)?;
    let relative = matches!(
        Url::parse(location),
        Err(url::ParseError::RelativeUrlWithoutBase)
    );
    let on_hub = relative && same_origin(endpoint, &to);
    Ok((to, on_hub))
}

/// Why a file could not be had. [`super::Hub`] words it, with the file, repo and revision.
#[derive(Debug)]
pub(super) enum Failure {
    /// An HTTP error status, after the retries it deserved.
    Status {
        code: u16,
        text: String,
        /// The Hub's `x-error-code` (`RepoNotFound`, `RevisionNotFound`, `EntryNotFound`, ...).
        error_code: Option<String>,
        /// How many times it was asked, and how long it waited between.
        attempts: u32,
        waited: Duration,
        /// Whether the Hub itself answered (rather than the CDN holding an LFS file's bytes).
        hub: bool,
    },
    /// The transfer failed; `msg` says how, and what the user can do.
    Transfer {
        msg: String,
        /// Whether it may be the network (then the cache or a local folder are the way out).
        network: bool,
    },
    /// A local failure (a file of the cache) or an interrupt, passed on as it is.
    Local(Error),
}

impl From<Error> for Failure {
    fn from(e: Error) -> Self {
        Self::Local(e)
    }
}

pub(super) fn transfer(msg: String) -> Failure {
    Failure::Transfer {
        msg,
        network: false,
    }
}

pub(super) fn status_failure(
    response: &ureq::Response,
    attempts: u32,
    waited: Duration,
    hub: bool,
) -> Failure {
    Failure::Status {
        code: response.status(),
        text: response.status_text().to_string(),
        error_code: response.header("x-error-code").map(String::from),
        attempts,
        waited,
        hub,
    }
}

pub(super) fn transport_failure(
    e: &ureq::Transport,
    (timeout, var): (Duration, &'static str),
) -> Failure {
    let msg = if is_timeout(e) {
        format!("timed out: no answer within {} ({var})", seconds(timeout))
    } else {
        // ureq's words start with the URL, as it is.
        let msg = e.to_string();
        match e.url() {
            Some(url) => msg.replacen(url.as_str(), &shown(url), 1),
            None => msg,
        }
    };
    Failure::Transfer { msg, network: true }
}

/// Whether `e`, or an error under it, is a socket timeout (which a read timeout shows as
/// `WouldBlock` on unix).
pub(super) fn is_timeout(e: &(dyn std::error::Error + 'static)) -> bool {
    if let Some(io) = e.downcast_ref::<std::io::Error>() {
        if matches!(
            io.kind(),
            std::io::ErrorKind::TimedOut | std::io::ErrorKind::WouldBlock
        ) {
            return true;
        }
        // An io::Error's `source` skips the error it wraps.
        if let Some(inner) = io.get_ref() {
            if is_timeout(inner) {
                return true;
            }
        }
    }
    e.source().is_some_and(is_timeout)
}

/// `1 s`, `2.5 s`.
pub(super) fn seconds(d: Duration) -> String {
    format!("{} s", d.as_secs_f64())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn content_ranges() {
        assert_eq!(parse_content_range("bytes 0-0/42"), Some((0, Some(42))));
        assert_eq!(parse_content_range("bytes 10-41/42"), Some((10, Some(42))));
        assert_eq!(parse_content_range("bytes 10-41/*"), Some((10, None)));
        assert_eq!(parse_content_range("bytes */42"), None);
        assert_eq!(parse_content_range("bytes 5-4/42"), None);
        assert_eq!(parse_content_range("items 0-1/2"), None);
    }

    #[test]
    fn etags() {
        assert_eq!(normalize_etag("\"abc\""), "abc");
        assert_eq!(normalize_etag("W/\"abc\""), "abc");
        assert!(is_file_name("0123abcd"));
        assert!(is_file_name("abc-3.x_y"));
        for bad in ["", "..", ".hidden", "../x", "a/b", "a\\b", "a b", "a\0b"] {
            assert!(!is_file_name(bad), "{bad:?}");
        }
        let sha = "a".repeat(64);
        assert!(is_sha256(&sha));
        assert!(!is_sha256(&"A".repeat(64)));
        assert!(!is_sha256(&"a".repeat(40)));
    }

    #[test]
    fn the_token_stays_on_its_origin() {
        let hub = Url::parse("https://huggingface.co/org/name/resolve/main/x").unwrap();
        let same = Url::parse("https://huggingface.co:443/other").unwrap();
        let cdn = Url::parse("https://cdn-lfs.hf.co/repos/x").unwrap();
        let port = Url::parse("https://huggingface.co:8443/x").unwrap();
        let tricky = Url::parse("https://huggingface.co@evil.example/x").unwrap();
        let plain = Url::parse("http://huggingface.co/x").unwrap();
        assert!(same_origin(&hub, &same));
        assert!(!same_origin(&hub, &cdn));
        assert!(!same_origin(&hub, &port));
        assert!(!same_origin(&hub, &tricky));
        // https to http on the same host (and the same explicit port) is another origin.
        assert!(!same_origin(&hub, &plain));
        let a = Url::parse("https://mirror.example:8080/x").unwrap();
        let b = Url::parse("http://mirror.example:8080/x").unwrap();
        assert!(!same_origin(&a, &b));
    }

    #[test]
    fn redirects_are_resolved_as_browsers_do_and_followed_only_on_the_hub() {
        let endpoint = Url::parse("http://127.0.0.1:1000/o/n/resolve/main/x").unwrap();
        let here = endpoint.clone();
        let go = |location: &str| {
            let (to, on_hub) = redirect(&endpoint, &here, location).unwrap();
            (to.to_string(), on_hub)
        };
        assert_eq!(
            go("/o/m/resolve/main/x"),
            ("http://127.0.0.1:1000/o/m/resolve/main/x".into(), true)
        );
        assert_eq!(
            go("../../m/x"),
            ("http://127.0.0.1:1000/o/n/m/x".into(), true)
        );
        // Without a scheme, but the same origin: still the Hub.
        assert_eq!(
            go("//127.0.0.1:1000/o/m/x"),
            ("http://127.0.0.1:1000/o/m/x".into(), true)
        );
        // Without a scheme, another port or host: not a path on this one.
        assert_eq!(
            go("//127.0.0.1:2000/cdn/x"),
            ("http://127.0.0.1:2000/cdn/x".into(), false)
        );
        assert_eq!(
            go("\\\\evil.example/x"),
            ("http://evil.example/x".into(), false)
        );
        // Absolute: the CDN, even on the same origin (a mirror serving its own LFS files).
        assert_eq!(
            go("http://127.0.0.1:1000/lfs/x"),
            ("http://127.0.0.1:1000/lfs/x".into(), false)
        );
        assert_eq!(
            go("https://127.0.0.1:1000/x"),
            ("https://127.0.0.1:1000/x".into(), false)
        );
        assert!(redirect(&endpoint, &here, "http://[::1").is_err());
    }
}
