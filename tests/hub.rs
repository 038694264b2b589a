//! `gpt2 generate --model ORG/NAME` end to end: the real binary downloads from a small Hugging Face
//! Hub served on 127.0.0.1 by the test itself, into the cache layout Python's `huggingface_hub`
//! uses, and then runs from that cache with no network at all.
//!
//! Each test has its own `HF_HOME` under cargo's scratch directory and its own server, so the
//! tests run in parallel. The server speaks just enough HTTP/1.1 for a Hub client: GET and HEAD
//! on `/{org}/{name}/resolve/{revision}/{file}`, byte ranges, `x-repo-commit` and `etag`, 404 for
//! unknown repos, revisions and files, and, like the real Hub, a redirect to a "CDN" URL
//! (`/cdn/{sha256}`) for LFS files (`*.safetensors`, `*.bin`), whose etag is their sha256. It logs
//! every request, so tests can check what was and was not fetched, and with which headers.
//!
//! It can also misbehave on purpose ([`Fault`]): error statuses, a connection that drops or
//! stalls mid-file, a body longer, shorter or other than announced, a slow body. Each connection
//! has its own thread, so two clients can download at once.

use std::collections::{BTreeMap, HashMap};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use serde_json::Value;
use sha2::{Digest, Sha256};

mod common;
use common::{entries, fixture, stderr};

/// The commit every served repo is at.
const COMMIT: &str = "0123456789abcdef0123456789abcdef01234567";
/// The repo served from `tests/fixtures/tiny`.
const TINY: &str = "test-org/tiny-gpt2";
/// The repo served from `tests/fixtures/tiny-b`, which has no `tokenizer.json`.
const TINY_B: &str = "test-org/tiny-b";
/// How long a stalled or silent connection stays silent (or until the server is dropped):
/// longer than any run may take ([`HANG`]), so only a client's own timeout ends such a run, and
/// a client without one fails the test at that deadline instead of getting an answer late.
const STALL: Duration = Duration::from_secs(600);
/// How long a `gpt2` run may take before the test calls it hung: generous, so that it only
/// catches hangs, never a slow machine.
const HANG: Duration = Duration::from_secs(180);

// ---------------------------------------------------------------------------------------------
// A small Hub.

/// A repo's files: name -> contents.
type Files = BTreeMap<String, Vec<u8>>;

/// One request the server received.
#[derive(Clone, Debug)]
struct Request {
    method: String,
    path: String,
    /// Header names lowercased.
    headers: Vec<(String, String)>,
}

impl Request {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }
}

/// A way for the server to misbehave. "The download of `file`" is a GET for its bytes (not the
/// `Range: bytes=0-0` a client asks for its metadata): at its resolve URL, or at the "CDN" for an
/// LFS file.
#[derive(Clone, Debug)]
enum Fault {
    /// The next `times` requests, whatever they ask, are answered `status`, with `Retry-After`
    /// when set.
    Status {
        status: &'static str,
        retry_after: Option<u64>,
        times: usize,
    },
    /// Every request is read and never answered: the connection stays open and silent.
    Silent,
    /// The download of `file` announces its whole length, sends its first `keep` bytes, and closes.
    Drop { file: &'static str, keep: usize },
    /// The download of `file` sends its headers and first `keep` bytes, then nothing.
    Stall { file: &'static str, keep: usize },
    /// The download of `file` sends `body` instead: with a Content-Length if `framed`, else ended
    /// by closing the connection.
    Body {
        file: &'static str,
        body: Vec<u8>,
        framed: bool,
    },
    /// The download of `file` trickles: `chunk` bytes every `every`.
    Slow {
        file: &'static str,
        chunk: usize,
        every: Duration,
    },
}

/// What a [`Server`] serves.
struct Hub {
    /// Repo id -> files.
    repos: HashMap<String, Files>,
    /// When set, every repo is gated: `resolve` needs `Authorization: Bearer <token>`.
    token: Option<String>,
    /// The "CDN" LFS files redirect to: the server's own URL, the same server under another
    /// host name, or a `Location` prefix as given (see [`Cdn`]).
    cdn: String,
    /// Renamed repos: old id -> where its files are now, a `Location` prefix
    /// (`/{org}/{name}` or `//{host}:{port}/{org}/{name}`) that `/resolve/{revision}/{file}` ends.
    renames: Mutex<HashMap<String, String>>,
    /// How it misbehaves, until [`Server::heal`].
    faults: Mutex<Vec<Fault>>,
    /// Set when the server is dropped: stalled connections end.
    stop: AtomicBool,
}

impl Hub {
    /// The fault that applies to `request`, if any (a [`Fault::Status`] counts down).
    fn fault(&self, request: &Request) -> Option<Fault> {
        let mut faults = self.faults.lock().unwrap();
        let download = self.download_of(request);
        for fault in faults.iter_mut() {
            match fault {
                Fault::Status { times, .. } if *times > 0 => {
                    *times -= 1;
                    return Some(fault.clone());
                }
                Fault::Status { .. } => {}
                Fault::Silent => return Some(fault.clone()),
                Fault::Drop { file, .. }
                | Fault::Stall { file, .. }
                | Fault::Body { file, .. }
                | Fault::Slow { file, .. } => {
                    if download.as_deref() == Some(*file) {
                        return Some(fault.clone());
                    }
                }
            }
        }
        None
    }

    /// The file whose bytes `request` downloads, if it does.
    fn download_of(&self, request: &Request) -> Option<String> {
        if request.method != "GET" || request.header("range") == Some("bytes=0-0") {
            return None;
        }
        if let Some(tag) = request.path.strip_prefix("/cdn/") {
            return self
                .repos
                .values()
                .flat_map(|f| f.iter())
                .find(|(_, d)| lfs_etag(d) == tag)
                .map(|(name, _)| name.clone());
        }
        let parts: Vec<&str> = request.path.splitn(6, '/').collect();
        match parts[..] {
            ["", _, _, "resolve", _, file] => Some(file.to_string()),
            _ => None,
        }
    }

    /// Sleeps `d`, or less if the server is dropped meanwhile.
    fn nap(&self, d: Duration) {
        let end = Instant::now() + d;
        while Instant::now() < end && !self.stop.load(Ordering::SeqCst) {
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// Where a [`Server`]'s LFS files redirect to.
enum Cdn<'a> {
    /// The server itself: `http://127.0.0.1:<port>`.
    Here,
    /// The server itself under another host name: `http://<host>:<port>`.
    Host(&'a str),
    /// This `Location` prefix, as it is (`//127.0.0.1:<port>`, a scheme-relative URL, say).
    At(String),
}

/// A Hub on 127.0.0.1 serving `repos` at [`COMMIT`]. Dropping it closes its port.
struct Server {
    addr: SocketAddr,
    hub: Arc<Hub>,
    log: Arc<Mutex<Vec<Request>>>,
    thread: Option<JoinHandle<()>>,
}

impl Server {
    fn start(repos: Vec<(&str, Files)>) -> Server {
        Self::start_with(repos, None, Vec::new())
    }

    /// A server whose repos are all gated behind `token`.
    fn start_gated(repos: Vec<(&str, Files)>, token: &str) -> Server {
        Self::start_with(repos, Some(token.to_string()), Vec::new())
    }

    /// A server with `faults`, until [`Server::heal`].
    fn start_faulty(repos: Vec<(&str, Files)>, faults: Vec<Fault>) -> Server {
        Self::start_with(repos, None, faults)
    }

    /// A gated server whose LFS redirects go to `localhost` rather than `127.0.0.1`: another
    /// host, as the real CDN is, though the same server.
    fn start_gated_with_cdn_elsewhere(repos: Vec<(&str, Files)>, token: &str) -> Server {
        Self::start_on(
            repos,
            Some(token.to_string()),
            Vec::new(),
            Cdn::Host("localhost"),
        )
    }

    fn start_with(repos: Vec<(&str, Files)>, token: Option<String>, faults: Vec<Fault>) -> Server {
        Self::start_on(repos, token, faults, Cdn::Here)
    }

    fn start_on(
        repos: Vec<(&str, Files)>,
        token: Option<String>,
        faults: Vec<Fault>,
        cdn: Cdn,
    ) -> Server {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
        let addr = listener.local_addr().unwrap();
        let cdn = match cdn {
            Cdn::Here => format!("http://{addr}"),
            Cdn::Host(host) => format!("http://{host}:{}", addr.port()),
            Cdn::At(prefix) => prefix,
        };
        let hub = Arc::new(Hub {
            repos: repos
                .into_iter()
                .map(|(id, f)| (id.to_string(), f))
                .collect(),
            token,
            cdn,
            renames: Mutex::new(HashMap::new()),
            faults: Mutex::new(faults),
            stop: AtomicBool::new(false),
        });
        let log = Arc::new(Mutex::new(Vec::new()));
        let thread = {
            let (hub, log) = (hub.clone(), log.clone());
            std::thread::spawn(move || {
                // A thread per connection: two clients may download at once, and a stalled
                // connection must not hold up the others. Every response closes its connection.
                for conn in listener.incoming() {
                    if hub.stop.load(Ordering::SeqCst) {
                        break;
                    }
                    if let Ok(stream) = conn {
                        let (hub, log) = (hub.clone(), log.clone());
                        std::thread::spawn(move || serve(stream, &hub, &log));
                    }
                }
            })
        };
        Server {
            addr,
            hub,
            log,
            thread: Some(thread),
        }
    }

    /// The endpoint, for `HF_ENDPOINT`.
    fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// From now on, answers for the repo `old` with a redirect to `to` (a `Location` prefix, see
    /// [`Hub::renames`]), as the Hub does for a renamed repo.
    fn rename(&self, old: &str, to: String) {
        self.hub.renames.lock().unwrap().insert(old.to_string(), to);
    }

    /// From now on, misbehaves with `faults` (only).
    fn set_faults(&self, faults: Vec<Fault>) {
        *self.hub.faults.lock().unwrap() = faults;
    }

    /// From now on, serves correctly.
    fn heal(&self) {
        self.set_faults(Vec::new());
    }

    /// Every request so far.
    fn log(&self) -> Vec<Request> {
        self.log.lock().unwrap().clone()
    }

    /// How many requests there were for `path` (e.g. `/org/name/resolve/main/config.json`).
    fn requests(&self, path: &str) -> usize {
        self.log().iter().filter(|r| r.path == path).count()
    }

    /// How many requests there were for `file` of `repo` at `main`.
    fn file_requests(&self, repo: &str, file: &str) -> usize {
        self.requests(&format!("/{repo}/resolve/main/{file}"))
    }

    /// The `Range` headers of the requests for `path` that had one.
    fn ranges(&self, path: &str) -> Vec<String> {
        self.log()
            .iter()
            .filter(|r| r.path == path)
            .filter_map(|r| r.header("range").map(String::from))
            .collect()
    }

    fn total(&self) -> usize {
        self.log.lock().unwrap().len()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.hub.stop.store(true, Ordering::SeqCst);
        // Wake the blocking accept; the loop then sees the flag and ends, dropping the listener.
        let _ = TcpStream::connect_timeout(&self.addr, Duration::from_secs(1));
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Reads one request from `stream`, logs it, and answers it (or misbehaves, as told).
fn serve(mut stream: TcpStream, hub: &Hub, log: &Mutex<Vec<Request>>) {
    let _ = stream.set_read_timeout(Some(Duration::from_secs(5)));
    let _ = stream.set_write_timeout(Some(Duration::from_secs(5)));
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
        match stream.read(&mut chunk) {
            Ok(0) | Err(_) => return, // The wake-up connection from Drop, or a client gone.
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
        if buf.len() > 64 * 1024 {
            return;
        }
    }
    let Some(request) = parse_request(&buf) else {
        return;
    };
    // Logged before answering, so a client that got its answer finds its request in the log.
    log.lock().unwrap().push(request.clone());
    let fault = hub.fault(&request);
    let (status, mut headers, body) = match &fault {
        Some(Fault::Silent) => return hub.nap(STALL),
        Some(Fault::Status {
            status,
            retry_after,
            ..
        }) => {
            let mut headers = vec![("x-error-code".to_string(), "Fault".to_string())];
            if let Some(secs) = retry_after {
                headers.push(("Retry-After".into(), secs.to_string()));
            }
            (*status, headers, format!("{status}\n").into_bytes())
        }
        _ => respond(&request, hub),
    };
    let body = if request.method == "HEAD" {
        headers.push(("Content-Length".into(), body.len().to_string()));
        Vec::new()
    } else {
        match &fault {
            Some(Fault::Body { body, framed, .. }) => {
                if *framed {
                    headers.push(("Content-Length".into(), body.len().to_string()));
                }
                body.clone()
            }
            _ => {
                headers.push(("Content-Length".into(), body.len().to_string()));
                body
            }
        }
    };
    headers.push(("Connection".into(), "close".into()));
    let mut head = format!("HTTP/1.1 {status}\r\n");
    for (name, value) in &headers {
        head.push_str(&format!("{name}: {value}\r\n"));
    }
    head.push_str("\r\n");
    if stream.write_all(head.as_bytes()).is_err() {
        return;
    }
    match fault {
        Some(Fault::Drop { keep, .. }) => {
            let _ = stream.write_all(&body[..keep.min(body.len())]);
        }
        Some(Fault::Stall { keep, .. }) => {
            let _ = stream.write_all(&body[..keep.min(body.len())]);
            let _ = stream.flush();
            hub.nap(STALL);
        }
        Some(Fault::Slow { chunk, every, .. }) => {
            for part in body.chunks(chunk) {
                if stream
                    .write_all(part)
                    .and_then(|()| stream.flush())
                    .is_err()
                {
                    return;
                }
                hub.nap(every);
            }
        }
        _ => {
            let _ = stream.write_all(&body);
        }
    }
    let _ = stream.flush();
    let _ = stream.shutdown(std::net::Shutdown::Write);
}

fn parse_request(raw: &[u8]) -> Option<Request> {
    let text = String::from_utf8_lossy(raw);
    let mut lines = text.split("\r\n");
    let mut first = lines.next()?.split(' ');
    let method = first.next()?.to_string();
    let target = first.next()?;
    let path = target.split('?').next()?.to_string();
    let headers = lines
        .take_while(|l| !l.is_empty())
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    Some(Request {
        method,
        path,
        headers,
    })
}

type Response = (&'static str, Vec<(String, String)>, Vec<u8>);

/// The answer to `request`.
fn respond(request: &Request, hub: &Hub) -> Response {
    let error = |status, code: &str| {
        let headers = vec![("x-error-code".to_string(), code.to_string())];
        (status, headers, format!("{code}\n").into_bytes())
    };
    if request.method != "GET" && request.method != "HEAD" {
        return error("405 Method Not Allowed", "MethodNotAllowed");
    }
    if let Some(tag) = request.path.strip_prefix("/cdn/") {
        let blob = hub
            .repos
            .values()
            .flat_map(|f| f.values())
            .find(|d| lfs_etag(d) == tag);
        return match blob {
            Some(data) => send_bytes(request, data, Vec::new()),
            None => error("404 Not Found", "NoSuchKey"),
        };
    }
    // /{org}/{name}/resolve/{revision}/{file}
    let parts: Vec<&str> = request
        .path
        .trim_start_matches('/')
        .splitn(5, '/')
        .collect();
    let [org, name, "resolve", revision, file] = parts[..] else {
        return error("404 Not Found", "RepoNotFound");
    };
    if let Some(to) = hub.renames.lock().unwrap().get(&format!("{org}/{name}")) {
        let location = format!("{to}/resolve/{revision}/{file}");
        return (
            "307 Temporary Redirect",
            vec![("Location".to_string(), location)],
            Vec::new(),
        );
    }
    let Some(files) = hub.repos.get(&format!("{org}/{name}")) else {
        return error("404 Not Found", "RepoNotFound");
    };
    if let Some(token) = &hub.token {
        if request.header("authorization") != Some(format!("Bearer {token}").as_str()) {
            return error("401 Unauthorized", "GatedRepo");
        }
    }
    if revision != "main" && revision != COMMIT {
        return error("404 Not Found", "RevisionNotFound");
    }
    let Some(data) = files.get(file) else {
        let (status, mut headers, body) = error("404 Not Found", "EntryNotFound");
        headers.push(("x-repo-commit".into(), COMMIT.into()));
        return (status, headers, body);
    };
    if is_lfs(file) {
        // As the real Hub does for LFS files: a redirect to a "CDN" URL on an absolute URL, with
        // the blob's etag (its sha256) and size in x-linked-* headers.
        let headers = vec![
            ("x-repo-commit".to_string(), COMMIT.to_string()),
            (
                "x-linked-etag".to_string(),
                format!("\"{}\"", lfs_etag(data)),
            ),
            ("x-linked-size".to_string(), data.len().to_string()),
            (
                "Location".to_string(),
                format!("{}/cdn/{}", hub.cdn, lfs_etag(data)),
            ),
        ];
        return ("302 Found", headers, Vec::new());
    }
    let headers = vec![
        ("x-repo-commit".to_string(), COMMIT.to_string()),
        ("etag".to_string(), format!("\"{}\"", etag(data))),
    ];
    send_bytes(request, data, headers)
}

/// Whether the Hub stores `file` with LFS (and so answers for it with a redirect).
fn is_lfs(file: &str) -> bool {
    file.ends_with(".safetensors") || file.ends_with(".bin")
}

/// `data`, whole or the requested byte range of it.
fn send_bytes(request: &Request, data: &[u8], mut headers: Vec<(String, String)>) -> Response {
    let len = data.len();
    headers.push(("Accept-Ranges".to_string(), "bytes".to_string()));
    headers.push((
        "Content-Type".to_string(),
        "application/octet-stream".to_string(),
    ));
    match request.header("range") {
        None => ("200 OK", headers, data.to_vec()),
        Some(range) => match parse_range(range, len) {
            Some((start, end)) => {
                headers.push(("Content-Range".into(), format!("bytes {start}-{end}/{len}")));
                ("206 Partial Content", headers, data[start..=end].to_vec())
            }
            None => {
                headers.push(("Content-Range".into(), format!("bytes */{len}")));
                ("416 Range Not Satisfiable", headers, Vec::new())
            }
        },
    }
}

/// `bytes=a-b` or `bytes=a-` as an inclusive range within `len` bytes; `None` if unsatisfiable.
fn parse_range(range: &str, len: usize) -> Option<(usize, usize)> {
    let (start, end) = range.trim().strip_prefix("bytes=")?.split_once('-')?;
    let start: usize = start.trim().parse().ok()?;
    let end = match end.trim() {
        "" => len.checked_sub(1)?,
        e => e.parse::<usize>().ok()?.min(len.checked_sub(1)?),
    };
    (start <= end).then_some((start, end))
}

/// A regular (non-LFS) file's etag, and so its blob name in the cache: FNV-1a of its bytes, in
/// hex. Like the real Hub's git sha1 it is not a sha256, so a client cannot check a body by it.
fn etag(data: &[u8]) -> String {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in data {
        hash ^= u64::from(b);
        hash = hash.wrapping_mul(0x0100_0000_01b3);
    }
    format!("{hash:016x}{:08x}", data.len())
}

/// An LFS file's etag, as on the real Hub: the sha256 of its bytes, in hex.
fn lfs_etag(data: &[u8]) -> String {
    Sha256::digest(data)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// The blob name of `file` in the cache: its etag.
fn blob_name(file: &str, data: &[u8]) -> String {
    if is_lfs(file) {
        lfs_etag(data)
    } else {
        etag(data)
    }
}

// ---------------------------------------------------------------------------------------------
// Fixtures, runs and checks.

/// `names` read from the fixture folder `dir`.
fn files(dir: &str, names: &[&str]) -> Files {
    names
        .iter()
        .map(|n| {
            let path = fixture(dir).join(n);
            let data = std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            (n.to_string(), data)
        })
        .collect()
}

fn tiny_files() -> Files {
    files(
        "tiny",
        &["config.json", "model.safetensors", "tokenizer.json"],
    )
}

fn tiny_b_files() -> Files {
    files(
        "tiny-b",
        &[
            "config.json",
            "model.safetensors",
            "vocab.json",
            "merges.txt",
        ],
    )
}

struct Golden {
    prompt: String,
    ids: Vec<u64>,
}

fn golden(dir: &str) -> Golden {
    let json = common::fixture_json(dir, "goldens.json").unwrap();
    Golden {
        prompt: json["prompt_text"].as_str().unwrap().to_string(),
        ids: json["greedy_ids"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap())
            .collect(),
    }
}

/// An endpoint nobody listens on.
fn closed_endpoint() -> String {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    drop(listener);
    format!("http://{addr}")
}

/// Runs the `gpt2` binary with `args`. The child gets none of the Hub or proxy variables of the
/// test's own environment, only those in `env`, which must set `HF_HOME` (so no test touches the
/// user's cache); `HF_ENDPOINT` defaults to a closed port, so no test ever reaches the real Hub.
fn run(args: &[&str], env: &[(&str, &str)]) -> Output {
    spawn(args, env).wait()
}

/// A `gpt2` process started by [`spawn`], its pipes drained on their own threads so it never
/// blocks on a full pipe.
struct Running {
    child: Child,
    args: Vec<String>,
    stdout: JoinHandle<Vec<u8>>,
    stderr: JoinHandle<Vec<u8>>,
}

impl Running {
    /// Its exit status and output, once it ends (a panic if that takes over [`HANG`]).
    fn wait(mut self) -> Output {
        let deadline = Instant::now() + HANG;
        let status = loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                break status;
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                let _ = self.child.wait();
                panic!("gpt2 {:?} did not finish in {HANG:?}", self.args);
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        Output {
            status,
            stdout: self.stdout.join().unwrap(),
            stderr: self.stderr.join().unwrap(),
        }
    }
}

/// Starts what [`run`] runs, without waiting for it.
fn spawn(args: &[&str], env: &[(&str, &str)]) -> Running {
    assert!(
        env.iter().any(|(k, _)| *k == "HF_HOME"),
        "every run needs its own HF_HOME"
    );
    let mut cmd = Command::new(common::BIN);
    cmd.args(args);
    for var in [
        "HF_HOME",
        "HF_HUB_CACHE",
        "HF_ENDPOINT",
        "HF_TOKEN",
        "HF_TOKEN_PATH",
        "HF_HUB_OFFLINE",
        "HF_HUB_ETAG_TIMEOUT",
        "HF_HUB_DOWNLOAD_TIMEOUT",
    ]
    .into_iter()
    .chain(common::PROXY_VARS)
    {
        cmd.env_remove(var);
    }
    if !env.iter().any(|(k, _)| *k == "HF_ENDPOINT") {
        cmd.env("HF_ENDPOINT", closed_endpoint());
    }
    cmd.envs(env.iter().copied());
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().expect("spawn gpt2");
    let drain = |mut r: Box<dyn Read + Send>| {
        std::thread::spawn(move || {
            let mut buf = Vec::new();
            let _ = r.read_to_end(&mut buf);
            buf
        })
    };
    let stdout = drain(Box::new(child.stdout.take().unwrap()));
    let stderr = drain(Box::new(child.stderr.take().unwrap()));
    Running {
        child,
        args: args.iter().map(|a| a.to_string()).collect(),
        stdout,
        stderr,
    }
}

/// The arguments of `gpt2 generate` greedy, 20 tokens, JSON, of `repo` (extra options after).
fn generate_args<'a>(repo: &'a str, prompt: &'a str, extra: &[&'a str]) -> Vec<&'a str> {
    let mut args = vec![
        "generate",
        "--model",
        repo,
        "--prompt",
        prompt,
        "-n",
        "20",
        "--temperature",
        "0",
        "--json",
        "--device",
        "cpu",
    ];
    args.extend_from_slice(extra);
    args
}

/// `gpt2 generate` greedy, 20 tokens, JSON, of `repo` (extra options after).
fn generate(repo: &str, prompt: &str, extra: &[&str], env: &[(&str, &str)]) -> Output {
    run(&generate_args(repo, prompt, extra), env)
}

/// The JSON line of a successful run.
fn json(out: &Output) -> Value {
    assert!(
        out.status.success(),
        "gpt2 failed ({}): {}",
        out.status,
        stderr(out)
    );
    let stdout = String::from_utf8(out.stdout.clone()).unwrap();
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines.len(), 1, "expected one JSON line, got: {stdout}");
    serde_json::from_str(lines[0]).unwrap_or_else(|e| panic!("{e}: {stdout}"))
}

fn completion_ids(out: &Output) -> Vec<u64> {
    json(out)["completion_token_ids"]
        .as_array()
        .expect("completion_token_ids")
        .iter()
        .map(|v| v.as_u64().unwrap())
        .collect()
}

/// The error line of a failed run: a non-zero exit, exactly one line on stderr, no panic.
fn error_line(out: &Output) -> String {
    let err = stderr(out);
    assert!(
        !out.status.success(),
        "gpt2 succeeded but should have failed; stdout: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    assert_ne!(out.status.code(), Some(0));
    assert!(out.status.code().is_some(), "killed by a signal: {err}");
    assert!(!err.contains("panicked"), "gpt2 panicked: {err}");
    let lines: Vec<&str> = err.trim_end().lines().collect();
    assert_eq!(lines.len(), 1, "stderr is not one line: {err}");
    lines[0].to_string()
}

fn repo_folder(repo: &str) -> String {
    format!("models--{}", repo.replace('/', "--"))
}

// ---------------------------------------------------------------------------------------------
// Tests.

#[test]
fn first_run_downloads_into_the_python_cache_layout_then_runs_without_the_server() {
    let dir = common::scratch("hub", "first_run");
    let home = dir.join("hf-home");
    let home_s = home.to_str().unwrap();
    let golden = golden("tiny");
    let server = Server::start(vec![(TINY, tiny_files())]);
    let url = server.url();
    let env = [("HF_HOME", home_s), ("HF_ENDPOINT", url.as_str())];

    let first = generate(TINY, &golden.prompt, &[], &env);
    assert_eq!(completion_ids(&first), golden.ids);
    assert_eq!(json(&first)["model"], TINY);
    for file in ["config.json", "model.safetensors", "tokenizer.json"] {
        assert!(
            server.file_requests(TINY, file) > 0,
            "{file} was not requested: {:?}",
            server.log()
        );
    }
    for file in [
        "vocab.json",
        "merges.txt",
        "model.safetensors.index.json",
        "pytorch_model.bin",
    ] {
        assert_eq!(server.file_requests(TINY, file), 0, "{file} was requested");
    }
    // model.safetensors came through the redirect to the "CDN", as from the real Hub.
    let blob = lfs_etag(&tiny_files()["model.safetensors"]);
    assert!(
        server.requests(&format!("/cdn/{blob}")) > 0,
        "{:?}",
        server.log()
    );
    for r in server.log() {
        assert_eq!(r.method, "GET", "{r:?}");
        assert_eq!(
            r.header("authorization"),
            None,
            "no token, no header: {r:?}"
        );
    }

    // The layout of Python's huggingface_hub.
    let repo_dir = home.join("hub").join(repo_folder(TINY));
    let main_ref = std::fs::read_to_string(repo_dir.join("refs/main")).unwrap();
    assert_eq!(main_ref.trim(), COMMIT);
    let snapshot = repo_dir.join("snapshots").join(COMMIT);
    for (name, data) in tiny_files() {
        let path = snapshot.join(&name);
        assert_eq!(std::fs::read(&path).unwrap(), data, "{}", path.display());
        let blob = repo_dir.join("blobs").join(blob_name(&name, &data));
        assert_eq!(std::fs::read(&blob).unwrap(), data, "{}", blob.display());
        #[cfg(unix)]
        {
            // A relative symlink into blobs/, as huggingface_hub makes them.
            let link = std::fs::read_link(&path).expect("snapshot files are symlinks");
            assert!(link.is_relative(), "{}", link.display());
            assert_eq!(
                std::fs::canonicalize(&path).unwrap(),
                std::fs::canonicalize(&blob).unwrap()
            );
        }
    }

    // The server gone (its port closed), the cache alone is enough, and gives the same output.
    drop(server);
    let second = generate(TINY, &golden.prompt, &[], &env);
    let (a, b) = (json(&first), json(&second));
    assert_eq!(a["completion_token_ids"], b["completion_token_ids"]);
    assert_eq!(a["completion"], b["completion"]);
    assert_eq!(a["prompt_token_ids"], b["prompt_token_ids"]);
}

#[test]
fn offline_with_a_cache_makes_no_request() {
    let dir = common::scratch("hub", "offline_cached");
    let home = dir.join("hf-home");
    let home_s = home.to_str().unwrap();
    let golden = golden("tiny");
    let server = Server::start(vec![(TINY, tiny_files())]);
    let url = server.url();
    let online = [("HF_HOME", home_s), ("HF_ENDPOINT", url.as_str())];
    assert_eq!(
        completion_ids(&generate(TINY, &golden.prompt, &[], &online)),
        golden.ids
    );

    let before = server.total();
    assert!(before > 0);
    for value in ["1", "true", "YES", "on"] {
        let offline = [
            ("HF_HOME", home_s),
            ("HF_ENDPOINT", url.as_str()),
            ("HF_HUB_OFFLINE", value),
        ];
        let out = generate(TINY, &golden.prompt, &[], &offline);
        assert_eq!(completion_ids(&out), golden.ids, "HF_HUB_OFFLINE={value}");
    }
    assert_eq!(server.total(), before, "offline runs made requests");
}

#[test]
fn offline_without_a_cache_fails_in_one_line_and_makes_no_request() {
    let dir = common::scratch("hub", "offline_empty");
    let home = dir.join("hf-home");
    let server = Server::start(vec![(TINY, tiny_files())]);
    let url = server.url();
    let env = [
        ("HF_HOME", home.to_str().unwrap()),
        ("HF_ENDPOINT", url.as_str()),
        ("HF_HUB_OFFLINE", "1"),
    ];
    let line = error_line(&generate(TINY, "Hello", &[], &env));
    assert!(line.contains(TINY), "{line}");
    assert!(line.contains("--model-dir"), "{line}");
    assert!(line.contains("HF_HUB_OFFLINE"), "{line}");
    assert_eq!(
        server.total(),
        0,
        "offline run made requests: {:?}",
        server.log()
    );

    // HF_HUB_OFFLINE=0 is online.
    let golden = golden("tiny");
    let env = [
        ("HF_HOME", home.to_str().unwrap()),
        ("HF_ENDPOINT", url.as_str()),
        ("HF_HUB_OFFLINE", "0"),
    ];
    assert_eq!(
        completion_ids(&generate(TINY, &golden.prompt, &[], &env)),
        golden.ids
    );
    assert!(server.file_requests(TINY, "config.json") > 0);
}

#[test]
fn no_network_and_no_cache_fails_in_one_line() {
    let dir = common::scratch("hub", "no_network");
    let home = dir.join("hf-home");
    let endpoint = closed_endpoint();
    let env = [
        ("HF_HOME", home.to_str().unwrap()),
        ("HF_ENDPOINT", endpoint.as_str()),
    ];
    let line = error_line(&generate(TINY, "Hello", &[], &env));
    assert!(line.contains(TINY), "{line}");
    assert!(line.contains("--model-dir"), "{line}");
    // Nothing is cached: HF_HUB_OFFLINE cannot help, random weights can.
    assert!(!line.contains("HF_HUB_OFFLINE"), "{line}");
    assert!(line.contains("--config configs/gpt2.json"), "{line}");
    // Nothing half-downloaded was left looking like a usable snapshot.
    let snapshots = home.join("hub").join(repo_folder(TINY)).join("snapshots");
    assert!(!snapshots.exists(), "{}", snapshots.display());
}

#[test]
fn hf_hub_cache_is_where_files_land() {
    let dir = common::scratch("hub", "hub_cache");
    let home = dir.join("hf-home");
    let cache = dir.join("elsewhere");
    let golden = golden("tiny");
    let server = Server::start(vec![(TINY, tiny_files())]);
    let url = server.url();
    let env = [
        ("HF_HOME", home.to_str().unwrap()),
        ("HF_HUB_CACHE", cache.to_str().unwrap()),
        ("HF_ENDPOINT", url.as_str()),
    ];
    assert_eq!(
        completion_ids(&generate(TINY, &golden.prompt, &[], &env)),
        golden.ids
    );
    let repo_dir = cache.join(repo_folder(TINY));
    assert_eq!(
        std::fs::read_to_string(repo_dir.join("refs/main"))
            .unwrap()
            .trim(),
        COMMIT
    );
    for name in tiny_files().keys() {
        assert!(repo_dir.join("snapshots").join(COMMIT).join(name).is_file());
    }
    assert!(!home.join("hub").exists(), "files landed under HF_HOME");

    // And that cache is the one read back, offline.
    let before = server.total();
    let offline = [
        ("HF_HOME", home.to_str().unwrap()),
        ("HF_HUB_CACHE", cache.to_str().unwrap()),
        ("HF_ENDPOINT", url.as_str()),
        ("HF_HUB_OFFLINE", "1"),
    ];
    assert_eq!(
        completion_ids(&generate(TINY, &golden.prompt, &[], &offline)),
        golden.ids
    );
    assert_eq!(server.total(), before);
}

#[test]
fn without_tokenizer_json_the_tokenizer_is_vocab_and_merges() {
    let dir = common::scratch("hub", "tiny_b");
    let home = dir.join("hf-home");
    let home_s = home.to_str().unwrap();
    let golden = golden("tiny-b");
    let server = Server::start(vec![(TINY_B, tiny_b_files())]);
    let url = server.url();
    let env = [("HF_HOME", home_s), ("HF_ENDPOINT", url.as_str())];
    assert_eq!(
        completion_ids(&generate(TINY_B, &golden.prompt, &[], &env)),
        golden.ids
    );
    // tokenizer.json was asked for (a 404), then vocab.json and merges.txt.
    for file in ["tokenizer.json", "vocab.json", "merges.txt"] {
        assert!(
            server.file_requests(TINY_B, file) > 0,
            "{file} not requested"
        );
    }
    let snapshot = home
        .join("hub")
        .join(repo_folder(TINY_B))
        .join("snapshots")
        .join(COMMIT);
    assert!(snapshot.join("vocab.json").is_file());
    assert!(snapshot.join("merges.txt").is_file());
    assert!(!snapshot.join("tokenizer.json").exists());

    // Offline, the cached vocab.json + merges.txt are enough.
    let before = server.total();
    let offline = [
        ("HF_HOME", home_s),
        ("HF_ENDPOINT", url.as_str()),
        ("HF_HUB_OFFLINE", "1"),
    ];
    assert_eq!(
        completion_ids(&generate(TINY_B, &golden.prompt, &[], &offline)),
        golden.ids
    );
    assert_eq!(server.total(), before);
}

#[test]
fn a_repo_without_safetensors_fails_in_one_line() {
    let dir = common::scratch("hub", "pickle_only");
    let home = dir.join("hf-home");
    let repo = "test-org/pickle-only";
    let mut repo_files = files("tiny", &["config.json", "tokenizer.json"]);
    repo_files.insert(
        "pytorch_model.bin".into(),
        b"PK\x03\x04 not really a pickle".to_vec(),
    );
    let server = Server::start(vec![(repo, repo_files)]);
    let url = server.url();
    let env = [
        ("HF_HOME", home.to_str().unwrap()),
        ("HF_ENDPOINT", url.as_str()),
    ];
    let line = error_line(&generate(repo, "Hello", &[], &env));
    assert!(line.contains("safetensors"), "{line}");
    assert!(line.contains(repo), "{line}");
    assert!(server.file_requests(repo, "model.safetensors") > 0);
    assert_eq!(
        server.file_requests(repo, "pytorch_model.bin"),
        0,
        "the pickle file was downloaded"
    );
}

#[test]
fn an_unknown_repo_fails_in_one_line() {
    let dir = common::scratch("hub", "unknown_repo");
    let home = dir.join("hf-home");
    let server = Server::start(vec![(TINY, tiny_files())]);
    let url = server.url();
    let env = [
        ("HF_HOME", home.to_str().unwrap()),
        ("HF_ENDPOINT", url.as_str()),
    ];
    let line = error_line(&generate("test-org/nope", "Hello", &[], &env));
    assert!(line.contains("test-org/nope"), "{line}");
    // A 404 is an answer, not a failure to retry.
    assert_eq!(server.total(), 1, "{:?}", server.log());
}

/// Writes a snapshot of `files` at `commit` into the cache `hub` the way Python's huggingface_hub
/// does: blobs named by etag, and snapshot entries that are relative symlinks to them (or, with
/// `copy`, plain files, as on Windows without developer mode).
fn python_snapshot(hub: &Path, repo: &str, commit: &str, files: &Files, copy: bool) {
    let repo_dir = hub.join(repo_folder(repo));
    let snapshot = repo_dir.join("snapshots").join(commit);
    std::fs::create_dir_all(repo_dir.join("blobs")).unwrap();
    std::fs::create_dir_all(&snapshot).unwrap();
    for (name, data) in files {
        let blob = repo_dir.join("blobs").join(blob_name(name, data));
        std::fs::write(&blob, data).unwrap();
        let entry = snapshot.join(name);
        if copy {
            std::fs::write(&entry, data).unwrap();
        } else {
            #[cfg(unix)]
            std::os::unix::fs::symlink(
                Path::new("../../blobs").join(blob_name(name, data)),
                &entry,
            )
            .unwrap();
            #[cfg(not(unix))]
            std::fs::write(&entry, data).unwrap();
        }
    }
}

#[test]
fn a_cache_written_by_python_is_used_offline() {
    let dir = common::scratch("hub", "python_cache");
    let home = dir.join("hf-home");
    let home_s = home.to_str().unwrap();
    let hub = home.join("hub");
    // `main` -> a snapshot of tiny; another commit, with no ref, holds tiny-b's files.
    let other = "fedcba9876543210fedcba9876543210fedcba98";
    python_snapshot(&hub, TINY, COMMIT, &tiny_files(), false);
    python_snapshot(&hub, TINY, other, &tiny_b_files(), true);
    let refs = hub.join(repo_folder(TINY)).join("refs");
    std::fs::create_dir_all(&refs).unwrap();
    // huggingface_hub writes refs without a trailing newline.
    std::fs::write(refs.join("main"), COMMIT).unwrap();

    let server = Server::start(vec![(TINY, tiny_files())]);
    let url = server.url();
    let env = [
        ("HF_HOME", home_s),
        ("HF_ENDPOINT", url.as_str()),
        ("HF_HUB_OFFLINE", "1"),
    ];
    let (tiny, tiny_b) = (golden("tiny"), golden("tiny-b"));
    assert_eq!(
        completion_ids(&generate(TINY, &tiny.prompt, &[], &env)),
        tiny.ids
    );
    // A commit hash needs no ref: its snapshot folder is found directly.
    let out = generate(TINY, &tiny_b.prompt, &["--revision", other], &env);
    assert_eq!(completion_ids(&out), tiny_b.ids);
    let out = generate(TINY, &tiny.prompt, &["--revision", COMMIT], &env);
    assert_eq!(completion_ids(&out), tiny.ids);
    assert_eq!(
        server.total(),
        0,
        "offline runs made requests: {:?}",
        server.log()
    );

    // A commit that is not in the cache fails in one line, still without a request.
    let missing = "1111111111111111111111111111111111111111";
    let line = error_line(&generate(TINY, "Hello", &["--revision", missing], &env));
    assert!(line.contains(TINY) && line.contains(missing), "{line}");
    assert_eq!(server.total(), 0);
}

#[test]
fn hf_token_is_sent_as_a_bearer_token() {
    let dir = common::scratch("hub", "token");
    let home = dir.join("hf-home");
    let golden = golden("tiny");
    let server = Server::start(vec![(TINY, tiny_files())]);
    let url = server.url();
    let env = [
        ("HF_HOME", home.to_str().unwrap()),
        ("HF_ENDPOINT", url.as_str()),
        ("HF_TOKEN", "secret"),
    ];
    assert_eq!(
        completion_ids(&generate(TINY, &golden.prompt, &[], &env)),
        golden.ids
    );
    let log = server.log();
    assert!(!log.is_empty());
    for r in &log {
        assert_eq!(r.header("authorization"), Some("Bearer secret"), "{r:?}");
    }
}

#[test]
fn the_token_file_in_hf_home_is_used_without_hf_token() {
    let dir = common::scratch("hub", "token_file");
    let home = dir.join("hf-home");
    std::fs::create_dir_all(&home).unwrap();
    std::fs::write(home.join("token"), "from-file\n").unwrap();
    let golden = golden("tiny");
    let server = Server::start(vec![(TINY, tiny_files())]);
    let url = server.url();
    let env = [
        ("HF_HOME", home.to_str().unwrap()),
        ("HF_ENDPOINT", url.as_str()),
    ];
    assert_eq!(
        completion_ids(&generate(TINY, &golden.prompt, &[], &env)),
        golden.ids
    );
    for r in &server.log() {
        assert_eq!(r.header("authorization"), Some("Bearer from-file"), "{r:?}");
    }
}

#[test]
fn the_token_is_not_sent_to_a_cdn_on_another_host() {
    let dir = common::scratch("hub", "token_cdn");
    let home = dir.join("hf-home");
    let golden = golden("tiny");
    let server = Server::start_gated_with_cdn_elsewhere(vec![(TINY, tiny_files())], "secret");
    let url = server.url();
    let env = [
        ("HF_HOME", home.to_str().unwrap()),
        ("HF_ENDPOINT", url.as_str()),
        ("HF_TOKEN", "secret"),
    ];
    assert_eq!(
        completion_ids(&generate(TINY, &golden.prompt, &[], &env)),
        golden.ids
    );
    let log = server.log();
    let (cdn, hub): (Vec<&Request>, Vec<&Request>) =
        log.iter().partition(|r| r.path.starts_with("/cdn/"));
    assert!(!cdn.is_empty() && !hub.is_empty(), "{log:?}");
    for r in cdn {
        assert_eq!(
            r.header("host").map(|h| h.starts_with("localhost")),
            Some(true)
        );
        assert_eq!(r.header("authorization"), None, "{r:?}");
    }
    for r in hub {
        assert_eq!(r.header("authorization"), Some("Bearer secret"), "{r:?}");
    }
}

/// Issue 28: `//host:port/...` (a URL without a scheme) names another host, not a path on this
/// one. An LFS redirect written so must not take the token to that host.
#[test]
fn the_token_is_not_sent_to_a_cdn_named_without_a_scheme() {
    let dir = common::scratch("hub", "token_cdn_no_scheme");
    let home = dir.join("hf-home");
    let golden = golden("tiny");
    // The "CDN": another server, on another port, with the same blobs.
    let cdn = Server::start(vec![(TINY, tiny_files())]);
    let hub = Server::start_on(
        vec![(TINY, tiny_files())],
        Some("secret".to_string()),
        Vec::new(),
        Cdn::At(format!("//{}", cdn.addr)),
    );
    let url = hub.url();
    let env = [
        ("HF_HOME", home.to_str().unwrap()),
        ("HF_ENDPOINT", url.as_str()),
        ("HF_TOKEN", "secret"),
    ];
    let out = generate(TINY, &golden.prompt, &[], &env);
    for r in &cdn.log() {
        assert_eq!(
            r.header("authorization"),
            None,
            "the CDN got the token: {r:?}"
        );
    }
    assert_eq!(completion_ids(&out), golden.ids);
    assert!(cdn.log().iter().any(|r| r.path.starts_with("/cdn/")));
    for r in &hub.log() {
        assert_eq!(r.header("authorization"), Some("Bearer secret"), "{r:?}");
    }
}

/// A renamed repo answers with a redirect on the Hub itself: followed, with the token, whether
/// the `Location` is a path or names the same origin without a scheme.
#[test]
fn a_renamed_repo_is_followed_on_the_hub_with_the_token() {
    let dir = common::scratch("hub", "renamed");
    let home = dir.join("hf-home");
    let golden = golden("tiny");
    let server = Server::start_gated(vec![(TINY, tiny_files())], "secret");
    server.rename("test-org/moved", format!("/{TINY}"));
    server.rename("test-org/moved-too", format!("//{}/{TINY}", server.addr));
    let url = server.url();
    let env = [
        ("HF_HOME", home.to_str().unwrap()),
        ("HF_ENDPOINT", url.as_str()),
        ("HF_TOKEN", "secret"),
    ];
    for repo in ["test-org/moved", "test-org/moved-too"] {
        assert_eq!(
            completion_ids(&generate(repo, &golden.prompt, &[], &env)),
            golden.ids,
            "{repo}"
        );
        assert!(server.file_requests(repo, "config.json") > 0);
    }
    for r in &server.log() {
        assert_eq!(r.header("authorization"), Some("Bearer secret"), "{r:?}");
    }
}

/// Issue 28: a Hub redirect to `//127.0.0.1:<another port>/...` is another origin: the token
/// never goes there (and such a redirect is not taken for the Hub's own, as `huggingface_hub`
/// takes none but relative ones).
#[test]
fn a_hub_redirect_to_another_port_named_without_a_scheme_gets_no_token() {
    let dir = common::scratch("hub", "renamed_elsewhere");
    let home = dir.join("hf-home");
    let golden = golden("tiny");
    let other = Server::start(vec![(TINY, tiny_files())]);
    let hub = Server::start_gated(vec![(TINY, tiny_files())], "secret");
    hub.rename("test-org/moved", format!("//{}/{TINY}", other.addr));
    let url = hub.url();
    let env = [
        ("HF_HOME", home.to_str().unwrap()),
        ("HF_ENDPOINT", url.as_str()),
        ("HF_TOKEN", "secret"),
    ];
    let out = generate("test-org/moved", &golden.prompt, &[], &env);
    for r in &other.log() {
        assert_eq!(
            r.header("authorization"),
            None,
            "the other port got the token: {r:?}"
        );
    }
    let line = error_line(&out);
    assert!(line.contains("test-org/moved"), "{line}");
    assert!(hub.total() > 0);
}

/// Issue 28: `HF_ENDPOINT=https://user:password@host` may carry credentials; no message shows
/// them, whether the endpoint cannot be reached or answers something unusable.
#[test]
fn credentials_in_hf_endpoint_are_never_shown() {
    let dir = common::scratch("hub", "endpoint_credentials");
    let home = dir.join("hf-home");
    let home_s = home.to_str().unwrap();
    let with_credentials =
        |endpoint: &str| endpoint.replacen("http://", "http://alice:hunter2-pass@", 1);
    // Answers 200 to everything, without the Hub's headers.
    let server = Server::start_faulty(
        vec![(TINY, tiny_files())],
        vec![Fault::Status {
            status: "200 OK",
            retry_after: None,
            times: usize::MAX,
        }],
    );
    for endpoint in [closed_endpoint(), server.url()] {
        let endpoint = with_credentials(&endpoint);
        let env = [("HF_HOME", home_s), ("HF_ENDPOINT", endpoint.as_str())];
        let out = generate(TINY, "Hello", &[], &env);
        let line = error_line(&out);
        assert!(!stderr(&out).contains("hunter2"), "{line}");
        assert!(!stderr(&out).contains("alice"), "{line}");
        assert!(line.contains(TINY), "{line}");
    }
    assert!(server.total() > 0);
}

#[test]
fn a_gated_repo_needs_hf_token() {
    let dir = common::scratch("hub", "gated");
    let home = dir.join("hf-home");
    let golden = golden("tiny");
    let server = Server::start_gated(vec![(TINY, tiny_files())], "secret");
    let url = server.url();
    let home_s = home.to_str().unwrap();
    let env = [("HF_HOME", home_s), ("HF_ENDPOINT", url.as_str())];
    let line = error_line(&generate(TINY, &golden.prompt, &[], &env));
    assert!(line.contains(TINY) && line.contains("HF_TOKEN"), "{line}");

    let env = [
        ("HF_HOME", home_s),
        ("HF_ENDPOINT", url.as_str()),
        ("HF_TOKEN", "secret"),
    ];
    assert_eq!(
        completion_ids(&generate(TINY, &golden.prompt, &[], &env)),
        golden.ids
    );
}

#[test]
fn an_alias_names_its_hub_repo() {
    let dir = common::scratch("hub", "alias");
    let home = dir.join("hf-home");
    let repo = "openai-community/gpt2";
    let golden = golden("tiny");
    let server = Server::start(vec![(repo, tiny_files())]);
    let url = server.url();
    let env = [
        ("HF_HOME", home.to_str().unwrap()),
        ("HF_ENDPOINT", url.as_str()),
    ];
    let out = generate("gpt2", &golden.prompt, &[], &env);
    assert_eq!(completion_ids(&out), golden.ids);
    assert_eq!(json(&out)["model"], repo);
    assert!(server.file_requests(repo, "config.json") > 0);
    assert!(home
        .join("hub")
        .join(repo_folder(repo))
        .join("refs/main")
        .is_file());
}

#[test]
fn an_interrupted_download_is_resumed() {
    let dir = common::scratch("hub", "resume");
    let home = dir.join("hf-home");
    let golden = golden("tiny");
    let weights = tiny_files()["model.safetensors"].clone();
    let blob = lfs_etag(&weights);
    // What an interrupted download leaves: part of the blob, in blobs/<etag>.part.
    let blobs = home.join("hub").join(repo_folder(TINY)).join("blobs");
    std::fs::create_dir_all(&blobs).unwrap();
    let done = weights.len() / 3;
    std::fs::write(blobs.join(format!("{blob}.part")), &weights[..done]).unwrap();

    let server = Server::start(vec![(TINY, tiny_files())]);
    let url = server.url();
    let env = [
        ("HF_HOME", home.to_str().unwrap()),
        ("HF_ENDPOINT", url.as_str()),
    ];
    assert_eq!(
        completion_ids(&generate(TINY, &golden.prompt, &[], &env)),
        golden.ids
    );
    let ranges: Vec<String> = server
        .log()
        .iter()
        .filter(|r| r.path == format!("/cdn/{blob}"))
        .filter_map(|r| r.header("range").map(String::from))
        .collect();
    assert!(ranges.contains(&format!("bytes={done}-")), "{ranges:?}");
    assert_eq!(std::fs::read(blobs.join(&blob)).unwrap(), weights);
    assert!(!blobs.join(format!("{blob}.part")).exists());
}

// Bugs found in the Hub lookup, fixed: each test failed before its fix.

#[test]
fn an_empty_hf_token_is_no_token() {
    let dir = common::scratch("hub", "empty_token");
    let home = dir.join("hf-home");
    std::fs::create_dir_all(&home).unwrap();
    std::fs::write(home.join("token"), "from-file\n").unwrap();
    let golden = golden("tiny");
    let server = Server::start(vec![(TINY, tiny_files())]);
    let url = server.url();
    let env = [
        ("HF_HOME", home.to_str().unwrap()),
        ("HF_ENDPOINT", url.as_str()),
        ("HF_TOKEN", ""),
    ];
    assert_eq!(
        completion_ids(&generate(TINY, &golden.prompt, &[], &env)),
        golden.ids
    );
    for r in &server.log() {
        assert_eq!(r.header("authorization"), Some("Bearer from-file"), "{r:?}");
    }
}

#[test]

fn the_token_file_in_hf_home_is_used_with_hf_hub_cache() {
    let dir = common::scratch("hub", "token_file_hub_cache");
    let home = dir.join("hf-home");
    std::fs::create_dir_all(&home).unwrap();
    std::fs::write(home.join("token"), "from-file\n").unwrap();
    let cache = dir.join("elsewhere").join("cache");
    let golden = golden("tiny");
    let server = Server::start(vec![(TINY, tiny_files())]);
    let url = server.url();
    let env = [
        ("HF_HOME", home.to_str().unwrap()),
        ("HF_HUB_CACHE", cache.to_str().unwrap()),
        ("HF_ENDPOINT", url.as_str()),
    ];
    assert_eq!(
        completion_ids(&generate(TINY, &golden.prompt, &[], &env)),
        golden.ids
    );
    for r in &server.log() {
        assert_eq!(r.header("authorization"), Some("Bearer from-file"), "{r:?}");
    }
}

// ---------------------------------------------------------------------------------------------
// A Hub that misbehaves: whatever happens, nothing that is not the file's true bytes ends up
// looking complete in the cache, the error is one line that says what happened, and the next
// healthy run finishes the job.

/// `blobs/` of `repo` in the cache under `home`.
fn blobs(home: &Path, repo: &str) -> PathBuf {
    home.join("hub").join(repo_folder(repo)).join("blobs")
}

/// The snapshot entry of `file` of `repo` at [`COMMIT`] in the cache under `home`.
fn snapshot_entry(home: &Path, repo: &str, file: &str) -> PathBuf {
    home.join("hub")
        .join(repo_folder(repo))
        .join("snapshots")
        .join(COMMIT)
        .join(file)
}

/// Whether anything (even a dangling symlink) is at `path`.
fn present(path: &Path) -> bool {
    std::fs::symlink_metadata(path).is_ok()
}

/// Neither a blob nor a snapshot entry of `file` (with `data` its true bytes) is in the cache.
fn assert_not_cached(home: &Path, repo: &str, file: &str, data: &[u8]) {
    let blob = blobs(home, repo).join(blob_name(file, data));
    assert!(!present(&blob), "{} exists", blob.display());
    let entry = snapshot_entry(home, repo, file);
    assert!(!present(&entry), "{} exists", entry.display());
}

/// A healthy run now gives the golden output, and leaves `file` in the cache with its true
/// bytes, its blob named by its etag, and no temporary beside it.
fn assert_healthy_run_fixes(home: &Path, url: &str, file: &str) {
    let golden = golden("tiny");
    let env = [("HF_HOME", home.to_str().unwrap()), ("HF_ENDPOINT", url)];
    assert_eq!(
        completion_ids(&generate(TINY, &golden.prompt, &[], &env)),
        golden.ids
    );
    let data = &tiny_files()[file];
    let entry = snapshot_entry(home, TINY, file);
    assert_eq!(&std::fs::read(&entry).unwrap(), data, "{}", entry.display());
    let blob = blobs(home, TINY).join(blob_name(file, data));
    assert_eq!(&std::fs::read(&blob).unwrap(), data, "{}", blob.display());
    if is_lfs(file) {
        assert_eq!(lfs_etag(&std::fs::read(&entry).unwrap()), lfs_etag(data));
    }
    for name in entries(&blobs(home, TINY)) {
        assert!(
            !name.ends_with(".incomplete") && !name.ends_with(".part"),
            "{name} left in blobs/"
        );
    }
}

#[test]
fn a_connection_dropped_mid_file_is_an_error_and_the_next_run_resumes_it() {
    let dir = common::scratch("hub", "dropped");
    let home = dir.join("hf-home");
    let weights = tiny_files()["model.safetensors"].clone();
    let (half, len) = (weights.len() / 2, weights.len());
    let server = Server::start_faulty(
        vec![(TINY, tiny_files())],
        vec![Fault::Drop {
            file: "model.safetensors",
            keep: half,
        }],
    );
    let url = server.url();
    let env = [
        ("HF_HOME", home.to_str().unwrap()),
        ("HF_ENDPOINT", url.as_str()),
    ];
    let out = generate(TINY, "Hello", &[], &env);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    let line = error_line(&out);
    assert!(line.starts_with("error: "), "{line}");
    assert!(line.contains("model.safetensors"), "{line}");
    assert!(line.contains(&format!("{half} of {len} bytes")), "{line}");
    assert!(line.contains("run again to resume"), "{line}");
    assert_not_cached(&home, TINY, "model.safetensors", &weights);
    // What is kept is only what huggingface_hub would resume from too.
    let incomplete = blobs(&home, TINY).join(format!("{}.incomplete", lfs_etag(&weights)));
    assert_eq!(
        std::fs::metadata(&incomplete).map(|m| m.len()).ok(),
        Some(half as u64),
        "{}",
        incomplete.display()
    );

    server.heal();
    assert_healthy_run_fixes(&home, &url, "model.safetensors");
    let ranges = server.ranges(&format!("/cdn/{}", lfs_etag(&weights)));
    assert!(ranges.contains(&format!("bytes={half}-")), "{ranges:?}");
}

#[test]
fn a_body_longer_or_shorter_than_announced_is_never_cached() {
    let dir = common::scratch("hub", "wrong_length");
    let home = dir.join("hf-home");
    let config = tiny_files()["config.json"].clone();
    let mut longer = config.clone();
    longer.extend_from_slice(b"\n\n\n\n");
    let shorter = config[..config.len() / 2].to_vec();
    let server = Server::start(vec![(TINY, tiny_files())]);
    let url = server.url();
    let env = [
        ("HF_HOME", home.to_str().unwrap()),
        ("HF_ENDPOINT", url.as_str()),
    ];
    // config.json is not an LFS file: its etag is no sha256, so its length is all there is to
    // check. Longer, ended by the connection's close; longer, with a Content-Length that says
    // so; shorter, ended by the connection's close.
    for (body, framed, says) in [
        (longer.clone(), false, "more than"),
        (longer, true, "announced"),
        (shorter, false, "of"),
    ] {
        server.set_faults(vec![Fault::Body {
            file: "config.json",
            body,
            framed,
        }]);
        let out = generate(TINY, "Hello", &[], &env);
        assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
        let line = error_line(&out);
        assert!(
            line.contains("config.json") && line.contains(says),
            "{line}"
        );
        assert!(
            line.contains(&format!("{} bytes", config.len())),
            "the announced size is named: {line}"
        );
        assert_not_cached(&home, TINY, "config.json", &config);
    }
    server.heal();
    assert_healthy_run_fixes(&home, &url, "config.json");
}

#[test]
fn a_download_whose_sha256_is_not_its_etag_is_deleted_and_never_used() {
    let dir = common::scratch("hub", "corrupted");
    let home = dir.join("hf-home");
    let weights = tiny_files()["model.safetensors"].clone();
    let mut corrupted = weights.clone();
    *corrupted.last_mut().unwrap() ^= 0x01;
    let server = Server::start_faulty(
        vec![(TINY, tiny_files())],
        vec![Fault::Body {
            file: "model.safetensors",
            body: corrupted,
            framed: true,
        }],
    );
    let url = server.url();
    let env = [
        ("HF_HOME", home.to_str().unwrap()),
        ("HF_ENDPOINT", url.as_str()),
    ];
    let out = generate(TINY, "Hello", &[], &env);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    let line = error_line(&out);
    assert!(line.contains("model.safetensors"), "{line}");
    assert!(line.contains("corrupted"), "{line}");
    assert!(line.contains(&lfs_etag(&weights)), "{line}");
    assert_not_cached(&home, TINY, "model.safetensors", &weights);
    let blob_dir = blobs(&home, TINY);
    assert!(
        entries(&blob_dir)
            .iter()
            .all(|n| !n.ends_with(".incomplete")),
        "a corrupted download is not kept to be resumed: {:?}",
        entries(&blob_dir)
    );

    server.heal();
    assert_healthy_run_fixes(&home, &url, "model.safetensors");
}

#[test]
fn a_429_is_retried_after_its_retry_after() {
    let dir = common::scratch("hub", "retry_429");
    let home = dir.join("hf-home");
    let golden = golden("tiny");
    let server = Server::start_faulty(
        vec![(TINY, tiny_files())],
        vec![Fault::Status {
            status: "429 Too Many Requests",
            retry_after: Some(0),
            times: 2,
        }],
    );
    let url = server.url();
    let env = [
        ("HF_HOME", home.to_str().unwrap()),
        ("HF_ENDPOINT", url.as_str()),
    ];
    assert_eq!(
        completion_ids(&generate(TINY, &golden.prompt, &[], &env)),
        golden.ids
    );
    // The first request (config.json's metadata) got the two 429s, and was asked a third time.
    assert!(
        server.file_requests(TINY, "config.json") >= 3,
        "{:?}",
        server.log()
    );
}

#[test]
fn a_503_forever_is_retried_a_bounded_number_of_times_then_one_error() {
    let dir = common::scratch("hub", "retry_503");
    let home = dir.join("hf-home");
    let server = Server::start_faulty(
        vec![(TINY, tiny_files())],
        vec![Fault::Status {
            status: "503 Service Unavailable",
            retry_after: None,
            times: usize::MAX,
        }],
    );
    let url = server.url();
    let env = [
        ("HF_HOME", home.to_str().unwrap()),
        ("HF_ENDPOINT", url.as_str()),
    ];
    let out = generate(TINY, "Hello", &[], &env);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    let line = error_line(&out);
    assert!(
        line.contains("503") && line.contains("config.json"),
        "{line}"
    );
    // The backoff is bounded: 1, 2 and 4 s, as the client counts its waits (not wall time,
    // which a loaded machine stretches).
    assert!(line.contains(" 4 times in 7 s"), "{line}");
    // One try and three retries, then nothing more.
    assert_eq!(server.total(), 4, "{:?}", server.log());
    assert_eq!(server.file_requests(TINY, "config.json"), 4);
}

#[test]
fn a_stalled_download_times_out_with_hf_hub_download_timeout() {
    let dir = common::scratch("hub", "stalled");
    let home = dir.join("hf-home");
    let weights = tiny_files()["model.safetensors"].clone();
    let server = Server::start_faulty(
        vec![(TINY, tiny_files())],
        vec![Fault::Stall {
            file: "model.safetensors",
            keep: 4096,
        }],
    );
    let url = server.url();
    let env = [
        ("HF_HOME", home.to_str().unwrap()),
        ("HF_ENDPOINT", url.as_str()),
        ("HF_HUB_DOWNLOAD_TIMEOUT", "1"),
    ];
    // The server never sends the rest, so the run ends (before `HANG`) only by a timeout: the
    // one set here, 1 s, not the 10 s default.
    let out = generate(TINY, "Hello", &[], &env);
    let line = error_line(&out);
    assert!(line.contains("timed out"), "{line}");
    assert!(line.contains("model.safetensors"), "{line}");
    assert!(line.contains(" 1 s (HF_HUB_DOWNLOAD_TIMEOUT)"), "{line}");
    assert_not_cached(&home, TINY, "model.safetensors", &weights);

    server.heal();
    assert_healthy_run_fixes(&home, &url, "model.safetensors");
}

#[test]
fn a_silent_hub_times_out_with_hf_hub_etag_timeout() {
    let dir = common::scratch("hub", "silent");
    let home = dir.join("hf-home");
    let server = Server::start_faulty(vec![(TINY, tiny_files())], vec![Fault::Silent]);
    let url = server.url();
    let env = [
        ("HF_HOME", home.to_str().unwrap()),
        ("HF_ENDPOINT", url.as_str()),
        ("HF_HUB_ETAG_TIMEOUT", "1"),
    ];
    // The server never answers, so the run ends (before `HANG`) only by a timeout: the one set
    // here, 1 s, not the 10 s default.
    let out = generate(TINY, "Hello", &[], &env);
    let line = error_line(&out);
    assert!(line.contains("timed out"), "{line}");
    assert!(line.contains("config.json"), "{line}");
    assert!(line.contains(" 1 s (HF_HUB_ETAG_TIMEOUT)"), "{line}");
}

#[test]
fn two_processes_downloading_the_same_model_at_once_both_succeed_with_one_copy() {
    let dir = common::scratch("hub", "two_at_once");
    let home = dir.join("hf-home");
    let golden = golden("tiny");
    let weights = tiny_files()["model.safetensors"].clone();
    // Slow enough (~6.5 s) that the second process waits for the first one's download.
    let server = Server::start_faulty(
        vec![(TINY, tiny_files())],
        vec![Fault::Slow {
            file: "model.safetensors",
            chunk: 32 * 1024,
            every: Duration::from_millis(300),
        }],
    );
    let url = server.url();
    let env = [
        ("HF_HOME", home.to_str().unwrap()),
        ("HF_ENDPOINT", url.as_str()),
    ];
    let args = generate_args(TINY, &golden.prompt, &[]);
    let (a, b) = (spawn(&args, &env), spawn(&args, &env));
    let (a, b) = (a.wait(), b.wait());
    assert_eq!(completion_ids(&a), golden.ids, "{}", stderr(&a));
    assert_eq!(completion_ids(&b), golden.ids, "{}", stderr(&b));
    let (a, b) = (json(&a), json(&b));
    for key in ["completion", "completion_token_ids", "prompt_token_ids"] {
        assert_eq!(a[key], b[key], "{key}");
    }

    // One copy, downloaded once; nothing half-done left beside it.
    let sha = lfs_etag(&weights);
    let blob_names = entries(&blobs(&home, TINY));
    // Beside the blob, at most the lock file the hf-hub crate's convention leaves (harmless).
    let of_weights: Vec<&String> = blob_names
        .iter()
        .filter(|n| n.starts_with(&sha) && !n.ends_with(".lock"))
        .collect();
    assert_eq!(of_weights, vec![&sha], "{blob_names:?}");
    for name in &blob_names {
        assert!(
            !name.ends_with(".incomplete") && !name.ends_with(".part"),
            "{blob_names:?}"
        );
    }
    assert_eq!(
        lfs_etag(&std::fs::read(blobs(&home, TINY).join(&sha)).unwrap()),
        sha
    );
    assert_eq!(
        server.requests(&format!("/cdn/{sha}")),
        1,
        "{:?}",
        server.log()
    );
}

#[cfg(unix)]
#[test]
fn ctrl_c_mid_download_leaves_only_a_resumable_incomplete() {
    let dir = common::scratch("hub", "ctrl_c");
    let home = dir.join("hf-home");
    let weights = tiny_files()["model.safetensors"].clone();
    let sha = lfs_etag(&weights);
    let server = Server::start_faulty(
        vec![(TINY, tiny_files())],
        vec![Fault::Slow {
            file: "model.safetensors",
            chunk: 16 * 1024,
            every: Duration::from_millis(200),
        }],
    );
    let url = server.url();
    let env = [
        ("HF_HOME", home.to_str().unwrap()),
        ("HF_ENDPOINT", url.as_str()),
    ];
    let running = spawn(&generate_args(TINY, "Hello", &[]), &env);
    let cdn = format!("/cdn/{sha}");
    let incomplete = blobs(&home, TINY).join(format!("{sha}.incomplete"));
    // Interrupted once some bytes are on disk (the whole file takes ~9 s to trickle in).
    let deadline = Instant::now() + HANG;
    while std::fs::metadata(&incomplete).map_or(0, |m| m.len()) == 0 {
        assert!(
            Instant::now() < deadline,
            "no bytes in {} after {HANG:?}; requests: {:?}",
            incomplete.display(),
            server.log()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let pid = running.child.id().to_string();
    assert!(Command::new("kill")
        .args(["-INT", &pid])
        .status()
        .unwrap()
        .success());
    let out = running.wait();
    assert_eq!(out.status.code(), Some(130), "{}", stderr(&out));
    assert_not_cached(&home, TINY, "model.safetensors", &weights);
    let kept = std::fs::metadata(&incomplete)
        .map(|m| m.len())
        .unwrap_or_else(|e| panic!("{}: {e}", incomplete.display()));
    assert!(kept > 0 && kept < weights.len() as u64, "{kept}");

    server.heal();
    assert_healthy_run_fixes(&home, &url, "model.safetensors");
    assert!(
        server.ranges(&cdn).contains(&format!("bytes={kept}-")),
        "{:?}",
        server.ranges(&cdn)
    );
}
