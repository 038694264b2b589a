//! Helpers shared by the integration tests (`mod common;` in each): fixtures and goldens, the
//! binary, scratch paths, comparisons, and skips that are seen and counted.

// Each test binary compiles this module on its own and uses only part of it.
#![allow(dead_code)]

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use gpt2::{Device, Tensor};
use serde_json::Value;

pub type Result<T = ()> = std::result::Result<T, Box<dyn std::error::Error>>;

/// The `gpt2` binary cargo built for these tests.
pub const BIN: &str = env!("CARGO_BIN_EXE_gpt2");

// ---------------------------------------------------------------------------------------------
// Fixtures and goldens

/// The committed fixture folder `tests/fixtures/{name}`.
pub fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

/// The JSON file `file` of the fixture `name`.
pub fn fixture_json(name: &str, file: &str) -> Result<Value> {
    Ok(serde_json::from_str(&std::fs::read_to_string(
        fixture(name).join(file),
    )?)?)
}

/// The tensors in the safetensors file `file` of the fixture `name`.
pub fn fixture_tensors(name: &str, file: &str) -> Result<HashMap<String, Tensor>> {
    Ok(candle_core::safetensors::load(
        fixture(name).join(file),
        &Device::Cpu,
    )?)
}

/// The goldens `{stem}.safetensors` and `{stem}.json` of the fixture `name` (`goldens` from
/// `scripts/make_fixtures.py`, `analysis` from `scripts/make_analysis_goldens.py`).
pub fn goldens(name: &str, stem: &str) -> Result<(HashMap<String, Tensor>, Value)> {
    Ok((
        fixture_tensors(name, &format!("{stem}.safetensors"))?,
        fixture_json(name, &format!("{stem}.json"))?,
    ))
}

/// The token ids in the JSON array `v`.
pub fn ids(v: &Value) -> Vec<u32> {
    v.as_array()
        .into_iter()
        .flatten()
        .filter_map(|x| x.as_u64().and_then(|x| u32::try_from(x).ok()))
        .collect()
}

// ---------------------------------------------------------------------------------------------
// Scratch paths

/// `name` under cargo's scratch directory for these tests (nothing is created).
pub fn tmp(name: &str) -> PathBuf {
    Path::new(env!("CARGO_TARGET_TMPDIR")).join(name)
}

/// A fresh, empty folder `{group}/{name}` under cargo's scratch directory.
pub fn scratch(group: &str, name: &str) -> PathBuf {
    let dir = tmp(group).join(name);
    // Not there yet is fine; any other failure to clear or make it is a broken setup.
    if let Err(e) = std::fs::remove_dir_all(&dir) {
        assert_eq!(
            e.kind(),
            std::io::ErrorKind::NotFound,
            "{}: {e}",
            dir.display()
        );
    }
    std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
    dir
}

/// The names in the folder `dir`, sorted (none if it cannot be read).
pub fn entries(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

// ---------------------------------------------------------------------------------------------
// The binary

/// `gpt2 args`, offline (no test reaches the real Hub), with backtraces on, so a panic shows
/// where and an error is checked to stay one line even so.
pub fn gpt2_command(args: &[&str]) -> Command {
    let mut cmd = Command::new(BIN);
    cmd.args(args)
        .env("HF_HUB_OFFLINE", "1")
        .env("RUST_BACKTRACE", "1");
    // The machine's proxy would stand between a test and its 127.0.0.1 servers.
    for var in PROXY_VARS {
        cmd.env_remove(var);
    }
    cmd
}

/// The proxy variables ureq reads (`try_proxy_from_env`).
pub const PROXY_VARS: [&str; 6] = [
    "ALL_PROXY",
    "all_proxy",
    "HTTPS_PROXY",
    "https_proxy",
    "HTTP_PROXY",
    "http_proxy",
];

/// Runs [`gpt2_command`] with nothing on stdin.
pub fn gpt2(args: &[&str]) -> Result<Output> {
    output_within(&mut gpt2_command(args), None)
}

/// Runs [`gpt2_command`] with `input` on stdin.
pub fn gpt2_with_stdin(args: &[&str], input: &str) -> Result<Output> {
    output_within(&mut gpt2_command(args), Some(input.as_bytes().to_vec()))
}

/// How long a run may take before a test calls it hung: generous, so that only a hang (never a
/// slow, loaded machine) reaches it.
pub const HANG: std::time::Duration = std::time::Duration::from_secs(300);

/// Runs `cmd` to its end, its stdout and stderr captured (drained on their own threads, so a
/// full pipe never blocks it) and `input` written to its stdin, like `Command::output`, but
/// killed and reported after [`HANG`].
pub fn output_within(cmd: &mut Command, input: Option<Vec<u8>>) -> Result<Output> {
    use std::io::Read;
    use std::time::Instant;
    // Nothing on stdin unless `input` (as `Command::output` does).
    cmd.stdin(if input.is_some() {
        Stdio::piped()
    } else {
        Stdio::null()
    });
    let mut child = cmd.stdout(Stdio::piped()).stderr(Stdio::piped()).spawn()?;
    let drain = |pipe: Option<Box<dyn Read + Send>>| {
        std::thread::spawn(move || {
            let mut bytes = Vec::new();
            if let Some(mut p) = pipe {
                let _ = p.read_to_end(&mut bytes);
            }
            bytes
        })
    };
    let stdout = drain(
        child
            .stdout
            .take()
            .map(|p| Box::new(p) as Box<dyn Read + Send>),
    );
    let stderr = drain(
        child
            .stderr
            .take()
            .map(|p| Box::new(p) as Box<dyn Read + Send>),
    );
    if let (Some(bytes), Some(mut pipe)) = (input, child.stdin.take()) {
        // A writer thread, so a child that never reads cannot block the test either.
        std::thread::spawn(move || {
            let _ = pipe.write_all(&bytes);
        });
    }
    let deadline = Instant::now() + HANG;
    let status = loop {
        if let Some(status) = child.try_wait()? {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            return Err(format!("{cmd:?} did not finish in {HANG:?}").into());
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    };
    Ok(Output {
        status,
        stdout: stdout.join().map_err(|_| "stdout reader panicked")?,
        stderr: stderr.join().map_err(|_| "stderr reader panicked")?,
    })
}

/// Runs `gpt2 args` as [`gpt2`] does, under bash with its address space limited to `kib` KiB
/// (`ulimit -v`), as a small machine or container would leave it: an allocation past the limit
/// fails, as one past the machine's memory would.
pub fn gpt2_with_memory_limit(kib: u64, args: &[&str]) -> Result<Output> {
    let quoted: Vec<String> = args
        .iter()
        .map(|a| format!("'{}'", a.replace('\'', "'\\''")))
        .collect();
    let script = format!("ulimit -v {kib}; exec '{BIN}' {}", quoted.join(" "));
    Ok(Command::new("bash")
        .args(["-c", &script])
        .env("HF_HUB_OFFLINE", "1")
        .env("RUST_BACKTRACE", "1")
        .stdin(Stdio::null())
        .output()?)
}

/// Runs `generate --json` on the model folder `model` (expecting success); the JSON object of
/// each sample.
pub fn generate_json(model: &Path, extra: &[&str]) -> Result<Vec<Value>> {
    let dir = model.to_str().ok_or("path")?;
    let mut args = vec!["generate", "--model-dir", dir, "--json"];
    args.extend_from_slice(extra);
    let out = gpt2(&args)?;
    assert!(out.status.success(), "{args:?} failed: {}", stderr(&out));
    Ok(String::from_utf8(out.stdout)?
        .lines()
        .map(serde_json::from_str)
        .collect::<std::result::Result<_, _>>()?)
}

pub fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Exit code `code`, and stderr one `error:` line (after the random-weights warning a layout
/// file gives, the only other line allowed) containing every needle; no panic, no backtrace.
pub fn assert_error(out: &Output, code: i32, needles: &[&str]) {
    let err = stderr(out);
    assert_eq!(out.status.code(), Some(code), "exit code: {err}");
    let lines: Vec<&str> = err
        .trim_end()
        .lines()
        .filter(|l| !(l.starts_with("warning: ") && l.contains("random weights")))
        .collect();
    assert_eq!(lines.len(), 1, "not one line: {err}");
    assert!(lines[0].starts_with("error: "), "{err}");
    for needle in needles {
        assert!(err.contains(needle), "`{needle}` not in: {err}");
    }
    assert!(
        !err.contains("panicked") && !err.contains("backtrace"),
        "{err}"
    );
}

/// A failed run whose stderr is one line containing `needle`, without a panic.
pub fn assert_one_line_error(out: &Output, needle: &str) {
    let stderr = stderr(out);
    assert!(!out.status.success(), "should fail: {stderr}");
    assert_eq!(
        stderr.trim_end().lines().count(),
        1,
        "not one line: {stderr}"
    );
    assert!(stderr.contains(needle), "`{needle}` not in: {stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
}

// ---------------------------------------------------------------------------------------------
// Numbers

pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> Result<f32> {
    assert_eq!(a.dims(), b.dims());
    Ok((a - b)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?)
}

/// Reads a little-endian f32 `.npy` (as `inspect-heads` and `--attention-out` write it): its
/// shape and data.
pub fn read_npy(path: &Path) -> Result<(Vec<usize>, Vec<f32>)> {
    let bytes = std::fs::read(path)?;
    let shape = npy_shape(&bytes)?;
    let len = u16::from_le_bytes([bytes[8], bytes[9]]) as usize;
    let header = std::str::from_utf8(&bytes[10..10 + len])?;
    assert!(header.contains("'descr': '<f4'") && header.contains("'fortran_order': False"));
    let data: Vec<f32> = bytes[10 + len..]
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect();
    assert_eq!(data.len(), shape.iter().product::<usize>());
    Ok((shape, data))
}

/// The shape in an npy file's (version 1) header.
pub fn npy_shape(bytes: &[u8]) -> Result<Vec<usize>> {
    assert_eq!(&bytes[..8], b"\x93NUMPY\x01\x00");
    let len = u16::from_le_bytes([bytes[8], bytes[9]]) as usize;
    let header = std::str::from_utf8(&bytes[10..10 + len])?;
    Ok(header
        .split("'shape': (")
        .nth(1)
        .and_then(|s| s.split(')').next())
        .ok_or("shape")?
        .split(',')
        .filter(|s| !s.trim().is_empty())
        .map(|s| s.trim().parse())
        .collect::<std::result::Result<_, _>>()?)
}

// ---------------------------------------------------------------------------------------------
// Outside tools, and skipping without them

/// `chromium` or `chromium-browser` on PATH, if any.
pub fn chromium() -> Option<&'static str> {
    ["chromium", "chromium-browser"].into_iter().find(|c| {
        Command::new(c)
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success())
    })
}

/// Whether `CI` is set: there `.ci/run` installs every tool, so a missing one is a failure.
pub fn in_ci() -> bool {
    std::env::var_os("CI").is_some_and(|v| !v.is_empty())
}

/// Where [`skip`] counts skips, one line each (`time  file::test  reason`), for a summary.
pub fn skip_log() -> PathBuf {
    tmp("skipped-tests.txt")
}

/// `test` (in the caller's file) cannot run (part of) itself because `reason`: a failure in CI;
/// elsewhere one line on the real stderr and one in [`skip_log`], and the caller returns.
///
/// Written to the stderr handle, not with `eprintln!`: libtest captures the print macros and
/// shows them only when a test fails, so a skip would pass unseen.
#[track_caller]
pub fn skip(test: &str, reason: &str) {
    let file = std::panic::Location::caller().file();
    if in_ci() {
        panic!("CI is set but {file}::{test} cannot run: {reason}");
    }
    let line = format!("SKIPPED {file}::{test}: {reason} [set CI=1 to make this a failure]\n");
    // Best effort: a test that cannot report its skip still skips.
    let _ = std::io::stderr().lock().write_all(line.as_bytes());
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let record = format!("{secs}\t{file}::{test}\t{reason}\n");
    let logged = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(skip_log())
        .and_then(|mut f| f.write_all(record.as_bytes()));
    if let Err(e) = logged {
        let _ = writeln!(
            std::io::stderr().lock(),
            "(could not count the skip in {}: {e})",
            skip_log().display()
        );
    }
}

/// Waits until process `pid` has used `cpu` of CPU time (user + system, from
/// `/proc/PID/stat`): work done, whatever else the machine is doing. A deadline of two minutes
/// only catches a process that never gets there.
pub fn wait_for_cpu_time(pid: u32, cpu: std::time::Duration) -> Result<()> {
    use std::time::{Duration, Instant};
    // Clock ticks per second: 100 on every Linux this runs on (USER_HZ).
    let ticks = (cpu.as_secs_f64() * 100.0).ceil() as u64;
    let start = Instant::now();
    loop {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
        // Fields after the command name (which may hold spaces, inside parentheses): utime and
        // stime are the 12th and 13th.
        let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
        let f: Vec<u64> = rest
            .split_whitespace()
            .skip(11)
            .take(2)
            .filter_map(|v| v.parse().ok())
            .collect();
        if f.iter().sum::<u64>() >= ticks {
            return Ok(());
        }
        if start.elapsed() > Duration::from_secs(120) {
            return Err(format!("process {pid} used under {cpu:?} of CPU in 2 minutes").into());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Runs headless chromium on `url` with `args` (`--dump-dom`, `--screenshot=...`), its timers
/// run to the end on a virtual clock; stdout and the log.
pub fn chromium_run(
    browser: &str,
    profile: &Path,
    url: &str,
    args: &[&str],
) -> Result<(String, String)> {
    let mut cmd = Command::new(browser);
    cmd.args([
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
        "--hide-scrollbars",
        &format!("--user-data-dir={}", profile.display()),
        "--enable-logging=stderr",
        "--v=0",
        "--virtual-time-budget=10000",
        "--window-size=1000,1400",
    ])
    .args(args)
    .arg(url);
    let out = output_within(&mut cmd, None)?;
    let log = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "chromium failed: {log}");
    Ok((String::from_utf8(out.stdout)?, log))
}

// ---------------------------------------------------------------------------------------------
// `gpt2 serve`

/// A `gpt2 serve` on a port the OS picked, killed when dropped. Its stderr is drained on a
/// thread into [`Server::log`].
pub struct Server {
    pub child: std::process::Child,
    /// `http://127.0.0.1:PORT`
    pub url: String,
    pub addr: String,
    log: std::sync::Arc<std::sync::Mutex<String>>,
}

impl Server {
    /// Starts `gpt2 serve --model-dir FIXTURE --port 0 args...` and waits (up to [`HANG`]) for
    /// its `listening on http://HOST:PORT` line.
    pub fn start(fixture_name: &str, args: &[&str]) -> Result<Server> {
        Self::start_with_env(fixture_name, args, &[])
    }

    pub fn start_with_env(
        fixture_name: &str,
        args: &[&str],
        env: &[(&str, &str)],
    ) -> Result<Server> {
        let dir = fixture(fixture_name);
        let mut all = vec!["--model-dir", dir.to_str().ok_or("fixture path")?];
        all.extend_from_slice(args);
        Self::spawn(&all, env)
    }

    /// A server of the layout `configs/{name}.json` (seeded random weights): gpt2's sizes make
    /// each decode step take long enough for a test to watch a request while it runs.
    pub fn start_layout(name: &str, args: &[&str]) -> Result<Server> {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join(format!("configs/{name}.json"));
        let mut all = vec!["--config", path.to_str().ok_or("layout path")?];
        all.extend_from_slice(args);
        Self::spawn(&all, &[])
    }

    fn spawn(args: &[&str], env: &[(&str, &str)]) -> Result<Server> {
        use std::io::BufRead;
        let mut all = vec!["serve", "--port", "0"];
        all.extend_from_slice(args);
        let mut cmd = gpt2_command(&all);
        cmd.env_remove("GPT2_API_KEY");
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()?;
        let stderr = child.stderr.take().ok_or("stderr")?;
        let log = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
        let (tx, rx) = std::sync::mpsc::channel();
        {
            let log = log.clone();
            std::thread::spawn(move || {
                for line in std::io::BufReader::new(stderr)
                    .lines()
                    .map_while(|l| l.ok())
                {
                    if let Some(addr) = line.strip_prefix("listening on http://") {
                        let _ = tx.send(addr.to_string());
                    }
                    if let Ok(mut log) = log.lock() {
                        log.push_str(&line);
                        log.push('\n');
                    }
                }
            });
        }
        let addr = match rx.recv_timeout(HANG) {
            Ok(addr) => addr,
            Err(_) => {
                let _ = child.kill();
                let _ = child.wait();
                let log = log.lock().map(|l| l.clone()).unwrap_or_default();
                return Err(format!("gpt2 serve never listened: {log}").into());
            }
        };
        Ok(Server {
            child,
            url: format!("http://{addr}"),
            addr,
            log,
        })
    }

    /// What the server wrote on stderr so far.
    pub fn log(&self) -> String {
        self.log.lock().map(|l| l.clone()).unwrap_or_default()
    }

    fn agent() -> ureq::Agent {
        ureq::AgentBuilder::new().timeout(HANG).build()
    }

    /// `method path` with `body` (JSON text) and `headers`: the status and the body's text.
    pub fn request(
        &self,
        method: &str,
        path: &str,
        body: Option<&str>,
        headers: &[(&str, &str)],
    ) -> Result<(u16, String)> {
        let mut req = Self::agent().request(method, &format!("{}{path}", self.url));
        for (k, v) in headers {
            req = req.set(k, v);
        }
        let resp = match body {
            Some(b) => req.set("Content-Type", "application/json").send_string(b),
            None => req.call(),
        };
        match resp {
            Ok(r) => Ok((r.status(), r.into_string()?)),
            Err(ureq::Error::Status(code, r)) => Ok((code, r.into_string()?)),
            Err(e) => Err(e.into()),
        }
    }

    /// POSTs `body` to `path`: the status and the JSON answer.
    pub fn post(&self, path: &str, body: &Value) -> Result<(u16, Value)> {
        let (status, text) = self.request("POST", path, Some(&body.to_string()), &[])?;
        Ok((
            status,
            serde_json::from_str(&text).map_err(|e| format!("{e}: {text}"))?,
        ))
    }

    /// GETs `path`: the status and the text.
    pub fn get(&self, path: &str) -> Result<(u16, String)> {
        self.request("GET", path, None, &[])
    }

    /// A streamed completion: every `data:` payload in order (`[DONE]` included as a string).
    pub fn stream(&self, path: &str, body: &Value) -> Result<Vec<Value>> {
        use std::io::BufRead;
        let r = Self::agent()
            .post(&format!("{}{path}", self.url))
            .set("Content-Type", "application/json")
            .send_string(&body.to_string())?;
        assert_eq!(r.header("content-type"), Some("text/event-stream"));
        let mut out = Vec::new();
        for line in std::io::BufReader::new(r.into_reader()).lines() {
            let line = line?;
            if let Some(data) = line.strip_prefix("data: ") {
                out.push(if data == "[DONE]" {
                    Value::String(data.into())
                } else {
                    serde_json::from_str(data)?
                });
            } else {
                assert!(line.is_empty(), "not SSE: {line:?}");
            }
        }
        Ok(out)
    }

    /// The value of the Prometheus metric `name` (its first sample line).
    pub fn metric(&self, name: &str) -> Result<f64> {
        let (_, text) = self.get("/metrics")?;
        text.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
            .ok_or_else(|| format!("no {name} in {text}").into())
    }

    /// Sends SIGTERM.
    pub fn signal_term(&self) -> Result {
        let status = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()?;
        assert!(status.success());
        Ok(())
    }

    /// Sends SIGTERM and waits (up to [`HANG`]) for the exit status.
    pub fn terminate(&mut self) -> Result<std::process::ExitStatus> {
        self.signal_term()?;
        self.wait()
    }

    /// Waits (up to [`HANG`]) for the exit status.
    pub fn wait(&mut self) -> Result<std::process::ExitStatus> {
        let deadline = std::time::Instant::now() + HANG;
        loop {
            if let Some(s) = self.child.try_wait()? {
                return Ok(s);
            }
            if std::time::Instant::now() > deadline {
                return Err("the server did not exit after SIGTERM".into());
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The completion texts of a streamed response, by choice index (chunks' `text` joined).
pub fn streamed_texts(chunks: &[Value], n: usize) -> Vec<String> {
    let mut texts = vec![String::new(); n];
    for c in chunks {
        for choice in c["choices"].as_array().into_iter().flatten() {
            if let (Some(i), Some(t)) = (choice["index"].as_u64(), choice["text"].as_str()) {
                texts[i as usize].push_str(t);
            }
        }
    }
    texts
}
