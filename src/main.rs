//! The `gpt2` command: a shim that turns command-line options ([`cli`]) into library calls and
//! their results into text, and errors into one `error:` line and an exit code:
//! 0 success, 1 runtime error, 2 usage error, 130 interrupted (`serve`, whose way out is the
//! interrupt, exits 0 once it has stopped).

mod cli;

use std::io::Write;
use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    // candle counts CPU threads by reading /proc/cpuinfo on every matmul unless RAYON_NUM_THREADS
    // is set, a cost on every generated token. Count once, before any thread starts.
    // candle's count is the physical cores, which ignores cgroup quotas and `taskset`.
    if std::env::var_os("RAYON_NUM_THREADS").is_none() {
        let allowed = std::thread::available_parallelism().map_or(1, |n| n.get());
        let threads = candle_core::utils::get_num_threads().min(allowed);
        std::env::set_var("RAYON_NUM_THREADS", threads.to_string());
    }
    // A panic is a bug, but still one line, never a backtrace (even with RUST_BACKTRACE=1);
    // one the library catches (a dependency's, on a hostile file) comes back as its error.
    std::panic::set_hook(Box::new(|info| {
        if gpt2::panic_is_caught() {
            return;
        }
        let msg = info
            .payload()
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| info.payload().downcast_ref::<String>().cloned())
            .unwrap_or_default();
        let at = info
            .location()
            .map(|l| format!(" at {l}"))
            .unwrap_or_default();
        let _ = writeln!(
            std::io::stderr(),
            "error: internal error (a bug in gpt2, please report it): {}{at}",
            msg.lines().next().unwrap_or("")
        );
    }));
    on_sigbus();
    // First Ctrl-C: stop at the next safe point (generation prints what it has). Second, or the
    // first while a prompt is read from a pipe that stays open (no check would ever come):
    // remove unfinished output files and leave at once. Requested before the read is looked at:
    // see `reading_input`.
    let _ = ctrlc::set_handler(|| {
        let again = gpt2::interrupt::requested();
        gpt2::interrupt::request();
        if again || gpt2::interrupt::is_reading_input() {
            gpt2::output::remove_temporaries();
            std::process::exit(130);
        }
    });

    let args = match cli::Cli::try_parse() {
        Ok(args) => args,
        Err(e) if !e.use_stderr() => {
            // --help and --version.
            let _ = e.print();
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            let _ = writeln!(std::io::stderr(), "{} (see --help)", usage_line(&e));
            return ExitCode::from(2);
        }
    };
    let stops_on_interrupt = args.stops_on_interrupt();
    let result = std::panic::catch_unwind(|| cli::run(args));
    match result {
        Ok(Ok(())) if gpt2::interrupt::requested() && !stops_on_interrupt => ExitCode::from(130),
        Ok(Ok(())) => ExitCode::SUCCESS,
        Ok(Err(e)) => report(&e),
        Err(_) => ExitCode::FAILURE, // the hook has said it
    }
}

/// The f32 weights are read in place from their memory-mapped file: if another program
/// truncates or rewrites it while gpt2 runs, the next read of a page past the new end faults
/// with SIGBUS, which would kill the process without a word. Say what happened, and the way
/// out, in one line. A signal handler may only call async-signal-safe functions: write(2) and
/// _exit(2). Linux only: elsewhere (macOS) a stack overflow is a SIGBUS too, and Rust's own
/// handler must report it.
#[cfg(target_os = "linux")]
fn on_sigbus() {
    extern "C" fn handler(_: libc::c_int) {
        const MSG: &[u8] = b"error: a model file changed size while gpt2 was reading it in place \
            (memory-mapped): rerun when nothing rewrites it, or with --no-mmap to copy the weights \
            into memory at load\n";
        // SAFETY: write(2) and _exit(2) are async-signal-safe; MSG is a static buffer.
        unsafe {
            libc::write(2, MSG.as_ptr().cast(), MSG.len());
            libc::_exit(1);
        }
    }
    // SAFETY: a zeroed sigaction is a valid "no flags, empty mask" value; the handler only
    // calls async-signal-safe functions.
    unsafe {
        let mut action: libc::sigaction = std::mem::zeroed();
        action.sa_sigaction = handler as extern "C" fn(libc::c_int) as libc::sighandler_t;
        libc::sigemptyset(&mut action.sa_mask);
        libc::sigaction(libc::SIGBUS, &action, std::ptr::null_mut());
    }
}

#[cfg(not(target_os = "linux"))]
fn on_sigbus() {}

/// clap's message as one line: what is wrong, with the lines that name it (the missing
/// arguments, a tip), without the usage that follows (one --help away).
fn usage_line(e: &clap::Error) -> String {
    if e.kind() == clap::error::ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand {
        // Bare `gpt2`: clap would print the whole help, on stderr, as if it were an error.
        let names: Vec<String> = <cli::Cli as clap::CommandFactory>::command()
            .get_subcommands()
            .map(|c| c.get_name().to_string())
            .collect();
        return format!(
            "error: no command given: gpt2 COMMAND, one of {}",
            names.join(", ")
        );
    }
    let msg = e.to_string();
    let mut line = String::new();
    for part in msg
        .lines()
        .map(str::trim)
        .take_while(|l| !l.starts_with("Usage:") && !l.starts_with("For more information"))
        .filter(|l| !l.is_empty())
    {
        if !line.is_empty() {
            line.push_str(if line.ends_with(':') { " " } else { "; " });
        }
        line.push_str(part);
    }
    if line.starts_with("error:") {
        line
    } else {
        format!("error: {line}")
    }
}

/// Prints `e` as one line and picks the exit code.
fn report(e: &anyhow::Error) -> ExitCode {
    use gpt2::Error;
    let lib = || e.chain().filter_map(|c| c.downcast_ref::<Error>());
    if lib().any(|e| matches!(e, Error::StdoutClosed)) {
        return ExitCode::SUCCESS; // `gpt2 ... | head`: the reader has what it wanted
    }
    if lib().any(|e| matches!(e, Error::Interrupted)) {
        return ExitCode::from(130);
    }
    let parts: Vec<String> = e
        .chain()
        .map(|c| match c.downcast_ref::<Error>() {
            Some(Error::Param { param, msg }) => format!("{} {msg}", cli::flag(param)),
            _ => c.to_string(),
        })
        .collect();
    let line = parts.join(": ").replace('\n', " ");
    let _ = writeln!(std::io::stderr(), "error: {line}");
    if lib().any(|e| matches!(e, Error::Param { .. })) {
        ExitCode::from(2)
    } else {
        ExitCode::FAILURE
    }
}
