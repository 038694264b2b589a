//! Writing results so that a file appears whole or not at all, and never in place of a file the
//! run reads.
//!
//! Every file the tool writes goes through [`PendingFile::create`], which first resolves the
//! destination ([`reserve`] does the same before any work, naming the flag the user typed):
//! - A regular file (or a new one) is written to a temporary file beside it (same folder, so the
//!   final `rename` is atomic) and renamed into place only by [`PendingFile::commit`]; on an
//!   error, a drop, or a second Ctrl-C ([`remove_temporaries`]) the temporary is deleted. A new
//!   file gets `0666 & !umask`, as `File::create` gives; a replaced file keeps its mode.
//! - A symlink is written through: its target is replaced and the link stays (a dangling link's
//!   target is created, as the shell's `>` does).
//! - What is not a regular file (`/dev/null`, `/dev/full`, a FIFO, a socket) is written in place,
//!   errors included: there is nothing to replace. `/dev/stdout`, `/dev/stderr` and links to
//!   `/proc/self/fd/{1,2}` write to the process's own stream, wherever it goes.
//! - A file the run reads ([`protect`]: the model's files, the prompt file) is never a
//!   destination, compared by device and inode (through symlinks and hard links).
//!
//! Files that belong together (an npy array and its tokens file) are renamed together under a
//! lock on their folder ([`commit_together`]), so two runs writing the same pair at once leave
//! one run's pair. Standard output whose reader went away (`gpt2 ... | head`) gives
//! [`Error::StdoutClosed`], which the binary ends on quietly.

use std::ffi::{OsStr, OsString};
use std::fmt;
use std::fs::File;
use std::io::{BufWriter, ErrorKind, Write};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use serde::Serialize;

use crate::error::{Error, Result};

/// Temporary files not yet committed, for [`remove_temporaries`].
static TEMPORARIES: Mutex<Vec<PathBuf>> = Mutex::new(Vec::new());

/// Files the run reads ([`protect`]), which no output may replace.
static INPUTS: Mutex<Vec<Input>> = Mutex::new(Vec::new());

/// Destinations checked by [`reserve`], with the parameter (flag) that named them.
static RESERVED: Mutex<Vec<(&'static str, PathBuf)>> = Mutex::new(Vec::new());

struct Input {
    id: FileId,
    path: PathBuf,
    /// What it is to the run, as the error says it: "one of the model's own files".
    what: &'static str,
}

/// The identity of a regular file: equal for two paths to the same file, through symlinks and
/// hard links.
#[cfg(unix)]
type FileId = (u64, u64);
#[cfg(not(unix))]
type FileId = PathBuf;

fn file_id(path: &Path) -> Option<FileId> {
    let m = std::fs::metadata(path).ok()?;
    if !m.is_file() {
        return None;
    }
    #[cfg(unix)]
    {
        use std::os::unix::fs::MetadataExt;
        Some((m.dev(), m.ino()))
    }
    #[cfg(not(unix))]
    {
        path.canonicalize().ok()
    }
}

/// Whether `input`'s path still leads to the file it was: one deleted since (its inode free for
/// a new file) is no longer an input.
fn live(input: &Input) -> bool {
    file_id(&input.path).as_ref() == Some(&input.id)
}

fn lock<T>(m: &'static Mutex<T>) -> std::sync::MutexGuard<'static, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Deletes every temporary file not yet committed: for a process about to exit without
/// unwinding (the binary's second Ctrl-C).
pub fn remove_temporaries() {
    let temps = lock(&TEMPORARIES);
    for path in temps.iter() {
        let _ = std::fs::remove_file(path);
    }
}

/// The run reads `path` (`what` it is, for the error: "one of the model's own files", "the
/// prompt file"): from now on no output may replace it. An error if a destination already
/// [`reserve`]d is that file. What is not a regular file (a pipe, `/dev/stdin`) is not replaced
/// by writing to it and is not recorded.
pub fn protect(path: &Path, what: &'static str) -> Result<()> {
    let Some(id) = file_id(path) else {
        return Ok(());
    };
    {
        let mut inputs = lock(&INPUTS);
        if !inputs.iter().any(|i| i.id == id && live(i)) {
            inputs.push(Input {
                id,
                path: path.to_path_buf(),
                what,
            });
        }
    }
    let reserved = lock(&RESERVED).clone();
    for (param, dest) in reserved {
        if let Ok(Kind::File { path, .. }) = resolve(&dest) {
            refuse_input(param, &dest, &path)?;
        }
    }
    Ok(())
}

/// Checks, before any work, that `dest` can be written as `param` (the flag the user typed)
/// names it: its folder exists and takes a new file of its name, it is not a folder, and it is
/// not a file the run reads, now or once [`protect`]ed later (a model downloaded meanwhile).
pub fn reserve(param: &'static str, dest: &Path) -> Result<()> {
    if let Kind::File { path, .. } = check(param, dest)? {
        // A file created and deleted: the folder's permissions and the name's length are the
        // file system's to judge.
        let dir = folder_of(&path);
        let probe = temp_in(dir, &path).map_err(|e| {
            Error::param(
                param,
                format!(
                    "{}: cannot create a file in {}: {e}",
                    dest.display(),
                    dir.display()
                ),
            )
        })?;
        // Deleted on drop; meanwhile a second Ctrl-C deletes it too.
        lock(&TEMPORARIES).push(probe.path().to_path_buf());
        forget_temporary(probe.path());
    }
    lock(&RESERVED).push((param, dest.to_path_buf()));
    Ok(())
}

/// Whether `dest` is written as a stream (a device, a FIFO, standard output) rather than as a
/// file replaced whole: nothing can be put beside it.
pub fn is_stream(dest: &Path) -> bool {
    !matches!(resolve(dest), Ok(Kind::File { .. }) | Err(_))
}

/// The flag that [`reserve`]d `dest`, for errors found later; `out` otherwise.
fn param_of(dest: &Path) -> &'static str {
    lock(&RESERVED)
        .iter()
        .find(|(_, p)| p == dest)
        .map_or("out", |(param, _)| param)
}

/// What writing a destination means.
enum Kind {
    /// A regular file at `path` (symlinks followed), or a new one: replaced by a rename.
    /// `mode`: the existing file's, kept.
    File {
        path: PathBuf,
        mode: Option<std::fs::Permissions>,
    },
    /// The process's own standard output (1) or error (2).
    #[cfg(unix)]
    Fd(i32),
    /// A device, a FIFO, a socket: opened and written in place.
    Stream(PathBuf),
}

/// Follows `dest`'s symlinks to what writing it means. An error (as a message) for a folder or
/// a path that cannot be looked up.
fn resolve(dest: &Path) -> std::result::Result<Kind, String> {
    let mut path = dest.to_path_buf();
    for _ in 0..40 {
        let meta = match std::fs::symlink_metadata(&path) {
            Ok(m) => m,
            Err(e) if e.kind() == ErrorKind::NotFound => {
                if path.file_name().is_none() {
                    return Err(format!("`{}` is not a file name", dest.display()));
                }
                return Ok(Kind::File { path, mode: None });
            }
            Err(e) => return Err(format!("{}: {e}", dest.display())),
        };
        if meta.file_type().is_symlink() {
            if let Some(kind) = proc_fd(&path) {
                return Ok(kind);
            }
            if !may_follow(&path, &meta) {
                return Err(format!(
                    "{}: {} is another user's symlink in a shared folder (sticky, writable by all); not followed",
                    dest.display(),
                    path.display()
                ));
            }
            let to = std::fs::read_link(&path).map_err(|e| format!("{}: {e}", dest.display()))?;
            path = folder_of(&path).join(to);
        } else if meta.is_dir() {
            return Err(format!("{} is a folder, not a file", dest.display()));
        } else if meta.is_file() {
            let mode = Some(meta.permissions());
            return Ok(Kind::File { path, mode });
        } else {
            return Ok(Kind::Stream(path));
        }
    }
    Err(format!(
        "{}: too many levels of symbolic links",
        dest.display()
    ))
}

/// A link in `/proc` (`/dev/stdout` leads to `/proc/self/fd/1`): a stream, never a file to
/// replace, even when the descriptor is a regular file. Our own 1 and 2 are written through the
/// descriptor itself (a reopened path would start at offset 0, and a socket cannot be reopened).
#[cfg(unix)]
fn proc_fd(link: &Path) -> Option<Kind> {
    let folder = folder_of(link).canonicalize().ok()?;
    if !folder.starts_with("/proc") {
        return None;
    }
    let ours = folder.starts_with(format!("/proc/{}", std::process::id()))
        && folder.file_name().is_some_and(|n| n == "fd");
    match link.file_name().and_then(OsStr::to_str).map(str::parse) {
        Some(Ok(fd @ (1 | 2))) if ours => Some(Kind::Fd(fd)),
        _ => Some(Kind::Stream(link.to_path_buf())),
    }
}

#[cfg(not(unix))]
fn proc_fd(_link: &Path) -> Option<Kind> {
    None
}

/// Whether to follow the symlink `link`: as Linux's `fs.protected_symlinks` decides for an open,
/// which reading the link ourselves would bypass. In a sticky folder writable by all (`/tmp`),
/// only a link of ours or of the folder's owner is followed: another user's link there could
/// point our output at any file we may replace.
#[cfg(unix)]
fn may_follow(link: &Path, meta: &std::fs::Metadata) -> bool {
    use std::os::unix::fs::MetadataExt;
    let Ok(dir) = std::fs::metadata(folder_of(link)) else {
        return true;
    };
    // SAFETY: geteuid has no preconditions and cannot fail.
    let me = unsafe { libc::geteuid() };
    dir.mode() & 0o1002 != 0o1002 || meta.uid() == me || meta.uid() == dir.uid()
}

#[cfg(not(unix))]
fn may_follow(_link: &Path, _meta: &std::fs::Metadata) -> bool {
    true
}

/// The folder holding `path` (`.` for a bare name).
fn folder_of(path: &Path) -> &Path {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    }
}

/// [`resolve`]s `dest` and checks a file's folder and that it is no input, errors naming `param`.
fn check(param: &'static str, dest: &Path) -> Result<Kind> {
    let kind = resolve(dest).map_err(|msg| Error::param(param, msg))?;
    if let Kind::File { path, .. } = &kind {
        let dir = folder_of(path);
        match std::fs::metadata(dir) {
            Ok(m) if m.is_dir() => {}
            Ok(_) => {
                return Err(Error::param(
                    param,
                    format!("{}: {} is not a folder", dest.display(), dir.display()),
                ))
            }
            Err(_) => {
                return Err(Error::param(
                    param,
                    format!("{}: no folder {}", dest.display(), dir.display()),
                ))
            }
        }
        refuse_input(param, dest, path)?;
    }
    Ok(kind)
}

/// An error if `path` (what `dest` leads to) is a file the run reads.
fn refuse_input(param: &'static str, dest: &Path, path: &Path) -> Result<()> {
    let Some(id) = file_id(path) else {
        return Ok(()); // does not exist yet: cannot be an input
    };
    let inputs = lock(&INPUTS);
    let input = inputs.iter().find(|i| i.id == id && live(i));
    match input {
        Some(input) => {
            let which = if input.path == dest {
                String::new()
            } else {
                format!(" ({})", input.path.display())
            };
            Err(Error::param(
                param,
                format!(
                    "{} is {}{which}; choose another path",
                    dest.display(),
                    input.what
                ),
            ))
        }
        None => Ok(()),
    }
}

/// The longest file name most file systems take (`NAME_MAX`).
const NAME_MAX: usize = 255;

/// A temporary file in `dir` for the final `path`: `.NAME.XXXXXX.tmp`, with NAME shortened so
/// that a final name that fits (255 bytes) gives a temporary name that fits too. Created
/// `0666 & !umask` (the OS applies the umask at creation), as `File::create` would.
fn temp_in(dir: &Path, path: &Path) -> std::io::Result<tempfile::NamedTempFile> {
    let name = path.file_name().unwrap_or(OsStr::new("out"));
    const EXTRA: usize = ".".len() + ".".len() + 6 + ".tmp".len();
    let stem = shorten(name, NAME_MAX.saturating_sub(EXTRA));
    // Too long already: left long, so that creating it fails as the final name would.
    let stem = if name.len() > NAME_MAX {
        name.to_owned()
    } else {
        stem
    };
    let mut prefix = OsString::from(".");
    prefix.push(&stem);
    prefix.push(".");
    let mut b = tempfile::Builder::new();
    b.prefix(&prefix).suffix(".tmp").rand_bytes(6);
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        b.permissions(std::fs::Permissions::from_mode(0o666));
    }
    b.tempfile_in(dir)
}

/// `name`'s first `max` bytes (on a character boundary where names are text).
fn shorten(name: &OsStr, max: usize) -> OsString {
    #[cfg(unix)]
    {
        use std::os::unix::ffi::OsStrExt;
        let b = name.as_bytes();
        OsStr::from_bytes(&b[..b.len().min(max)]).to_owned()
    }
    #[cfg(not(unix))]
    {
        let s = name.to_string_lossy();
        let mut end = s.len().min(max);
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        OsString::from(&s[..end])
    }
}

/// A file being written: a temporary beside its target until committed.
pub struct PendingFile {
    /// `None` when `dest` is not a regular file and is written directly.
    temp: Option<tempfile::NamedTempFile>,
    direct: Option<File>,
    /// The path as given, for messages.
    dest: PathBuf,
    /// What the temporary replaces: `dest` with its symlinks followed.
    target: PathBuf,
    /// Standard output itself: a closed pipe ends the run quietly.
    stdout: bool,
}

impl PendingFile {
    /// Starts writing `dest` (see the module's doc for what each kind of path means). A folder,
    /// a path in a folder that does not exist, or a file the run reads is an error here, before
    /// any work.
    pub fn create(dest: &Path) -> Result<Self> {
        let param = param_of(dest);
        let (temp, direct, target, stdout) = match check(param, dest)? {
            Kind::File { path, mode } => {
                let temp = temp_in(folder_of(&path), &path).map_err(|e| Error::io(dest, e))?;
                if let Some(mode) = mode {
                    keep_mode(temp.as_file(), mode).map_err(|e| Error::io(dest, e))?;
                }
                lock(&TEMPORARIES).push(temp.path().to_path_buf());
                (Some(temp), None, path, false)
            }
            #[cfg(unix)]
            Kind::Fd(fd) => (
                None,
                Some(dup_std(fd).map_err(|e| Error::io(dest, e))?),
                dest.to_path_buf(),
                fd == 1,
            ),
            Kind::Stream(path) => {
                let file = std::fs::OpenOptions::new()
                    .write(true)
                    .open(&path)
                    .map_err(|e| Error::io(dest, e))?;
                (None, Some(file), path, false)
            }
        };
        Ok(Self {
            temp,
            direct,
            dest: dest.to_path_buf(),
            target,
            stdout,
        })
    }

    /// The final path.
    pub fn path(&self) -> &Path {
        &self.dest
    }

    /// The file to write (the temporary, or the device).
    pub fn file(&mut self) -> &mut File {
        match (&mut self.temp, &mut self.direct) {
            (Some(t), _) => t.as_file_mut(),
            (None, Some(f)) => f,
            (None, None) => unreachable!("a PendingFile always has a file"),
        }
    }

    /// An error writing this file: [`Error::StdoutClosed`] for a broken pipe on standard output.
    pub fn write_error(&self, e: std::io::Error) -> Error {
        if self.stdout && e.kind() == ErrorKind::BrokenPipe {
            Error::StdoutClosed
        } else {
            Error::io(&self.dest, e)
        }
    }

    /// Moves the finished file into place.
    pub fn commit(mut self) -> Result<()> {
        match self.temp.take() {
            Some(temp) => {
                let path = temp.path().to_path_buf();
                let result = temp.persist(&self.target).map(|_| ()).map_err(|e| {
                    // `e` gives the temporary back; dropping it deletes it.
                    Error::io(&self.dest, e.error)
                });
                forget_temporary(&path);
                result
            }
            None => match self.direct.take() {
                Some(mut f) => f.flush().map_err(|e| self.write_error(e)),
                None => Ok(()),
            },
        }
    }
}

/// Commits `files` in order under an exclusive lock on each of their folders, so that two runs
/// writing the same files at once leave all of one run's: a pair is one unit.
pub fn commit_together(files: Vec<PendingFile>) -> Result<()> {
    let mut folders: Vec<PathBuf> = files
        .iter()
        .filter(|f| f.temp.is_some())
        .filter_map(|f| folder_of(&f.target).canonicalize().ok())
        .collect();
    // One order for every process: no two runs wait for each other.
    folders.sort();
    folders.dedup();
    let _held: Vec<File> = folders.iter().filter_map(|d| lock_folder(d)).collect();
    files.into_iter().try_for_each(PendingFile::commit)
}

/// `flock` on the folder itself (no lock file left behind), released when the file closes; where
/// a folder cannot be opened as a file (not unix), no lock.
fn lock_folder(dir: &Path) -> Option<File> {
    let f = File::open(dir).ok()?;
    f.lock().ok()?;
    Some(f)
}

/// Gives the temporary the mode of the file it replaces (permission bits only).
fn keep_mode(file: &File, mode: std::fs::Permissions) -> std::io::Result<()> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        file.set_permissions(std::fs::Permissions::from_mode(mode.mode() & 0o777))
    }
    #[cfg(not(unix))]
    {
        file.set_permissions(mode)
    }
}

/// A descriptor of our own standard output (1) or error (2), written after what the process has
/// printed so far.
#[cfg(unix)]
fn dup_std(fd: i32) -> std::io::Result<File> {
    use std::os::fd::AsFd;
    let owned = if fd == 1 {
        std::io::stdout().flush()?;
        std::io::stdout().as_fd().try_clone_to_owned()?
    } else {
        std::io::stderr().as_fd().try_clone_to_owned()?
    };
    Ok(File::from(owned))
}

impl Drop for PendingFile {
    fn drop(&mut self) {
        if let Some(temp) = self.temp.take() {
            forget_temporary(temp.path());
            // Dropping the NamedTempFile deletes it.
        }
    }
}

fn forget_temporary(path: &Path) {
    lock(&TEMPORARIES).retain(|p| p != path);
}

/// Where one output goes.
enum Dest {
    Stdout(std::io::Stdout),
    File(PendingFile),
}

impl Dest {
    fn error(&self, e: std::io::Error) -> Error {
        match self {
            Self::Stdout(_) => write_error(Path::new("<stdout>"), e),
            Self::File(f) => f.write_error(e),
        }
    }
}

impl Write for Dest {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match self {
            Self::Stdout(s) => s.write(buf),
            Self::File(f) => f.file().write(buf),
        }
    }

    fn flush(&mut self) -> std::io::Result<()> {
        match self {
            Self::Stdout(s) => s.flush(),
            Self::File(f) => f.file().flush(),
        }
    }
}

/// A buffered output (a file written atomically, or standard output) whose errors name it.
pub struct Out {
    inner: BufWriter<Dest>,
    name: PathBuf,
}

impl Out {
    /// Standard output (`None`) or a file.
    pub fn open(path: Option<&Path>) -> Result<Self> {
        let (dest, name) = match path {
            Some(p) => (Dest::File(PendingFile::create(p)?), p.to_path_buf()),
            None => (Dest::Stdout(std::io::stdout()), "<stdout>".into()),
        };
        Ok(Self {
            inner: BufWriter::with_capacity(1 << 20, dest),
            name,
        })
    }

    /// The path written to, or `<stdout>`.
    pub fn path(&self) -> &Path {
        &self.name
    }

    fn err(&self, e: std::io::Error) -> Error {
        self.inner.get_ref().error(e)
    }

    /// Writes raw bytes.
    pub fn bytes(&mut self, b: &[u8]) -> Result<()> {
        self.inner.write_all(b).map_err(|e| self.err(e))
    }

    /// Writes formatted text.
    pub fn text(&mut self, args: fmt::Arguments<'_>) -> Result<()> {
        self.inner.write_fmt(args).map_err(|e| self.err(e))
    }

    /// Writes `value` as compact JSON.
    pub fn json<T: Serialize + ?Sized>(&mut self, value: &T) -> Result<()> {
        serde_json::to_writer(&mut self.inner, value).map_err(|e| self.err(e.into()))
    }

    /// Flushes everything and, for a file, moves it into place.
    pub fn finish(mut self) -> Result<()> {
        self.inner.flush().map_err(|e| self.err(e))?;
        match self.inner.into_inner() {
            Ok(Dest::Stdout(_)) => Ok(()), // flushed above
            Ok(Dest::File(f)) => f.commit(),
            Err(e) => Err(write_error(&self.name, e.into_error())),
        }
    }
}

impl Write for Out {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.inner.write(buf)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

/// An error writing `name`: [`Error::StdoutClosed`] for a broken pipe on standard output.
pub fn write_error(name: &Path, e: std::io::Error) -> Error {
    if e.kind() == ErrorKind::BrokenPipe && name == Path::new("<stdout>") {
        Error::StdoutClosed
    } else {
        Error::io(name, e)
    }
}

/// Writes `text` to standard output and flushes it: [`Error::StdoutClosed`] if its reader went
/// away, an I/O error (a full disk) otherwise.
pub fn print(text: fmt::Arguments<'_>) -> Result<()> {
    let mut out = std::io::stdout().lock();
    out.write_fmt(text)
        .and_then(|_| out.flush())
        .map_err(|e| write_error(Path::new("<stdout>"), e))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dir(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("gpt2-output-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        let _ = std::fs::create_dir_all(&d);
        d
    }

    fn entries(d: &Path) -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(d)
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    }

    #[test]
    fn a_file_appears_only_when_finished() -> Result<()> {
        let d = dir("atomic");
        let path = d.join("a.json");
        let mut out = Out::open(Some(&path))?;
        out.bytes(b"{\"a\": 1}")?;
        out.inner.flush().map_err(|e| Error::io(&path, e))?;
        let names = entries(&d);
        assert_eq!(names.len(), 1, "{names:?}");
        assert!(names[0].starts_with(".a.json.") && names[0].ends_with(".tmp"));
        out.finish()?;
        assert_eq!(entries(&d), ["a.json"]);
        assert_eq!(
            std::fs::read_to_string(&path).map_err(|e| Error::io(&path, e))?,
            "{\"a\": 1}"
        );
        // Dropped unfinished: nothing is left, and the old file stays as it was.
        let mut out = Out::open(Some(&path))?;
        out.bytes(b"half")?;
        drop(out);
        assert_eq!(entries(&d), ["a.json"]);
        // (Other tests' temporaries may be there meanwhile.)
        assert!(!lock(&TEMPORARIES).iter().any(|p| p.starts_with(&d)));
        let _ = std::fs::remove_dir_all(&d);
        Ok(())
    }

    #[test]
    fn folders_are_refused_and_devices_written_directly() -> Result<()> {
        let d = dir("folders");
        let err = Out::open(Some(&d)).err();
        assert!(err.is_some_and(|e| e.to_string().contains("is a folder")));
        let err = Out::open(Some(&d.join("no/such/x.json"))).err();
        assert!(err.is_some());
        let mut out = Out::open(Some(Path::new("/dev/full")))?;
        out.bytes(&[0; 100])?; // buffered
        let err = out.finish().err();
        assert!(err.is_some_and(|e| e.to_string().contains("/dev/full")));
        let _ = std::fs::remove_dir_all(&d);
        Ok(())
    }

    #[test]
    fn inputs_are_not_outputs() -> Result<()> {
        let d = dir("inputs");
        let input = d.join("model.safetensors");
        std::fs::write(&input, b"x").map_err(|e| Error::io(&input, e))?;
        protect(&input, "one of the model's own files")?;
        let refused = |p: &Path| {
            PendingFile::create(p)
                .err()
                .is_some_and(|e| e.to_string().contains("one of the model's own files"))
        };
        assert!(refused(&input));
        #[cfg(unix)]
        {
            let link = d.join("link.safetensors");
            std::os::unix::fs::symlink(&input, &link).map_err(|e| Error::io(&link, e))?;
            assert!(refused(&link));
            let hard = d.join("hard.safetensors");
            std::fs::hard_link(&input, &hard).map_err(|e| Error::io(&hard, e))?;
            assert!(refused(&hard));
        }
        assert!(PendingFile::create(&d.join("new.npy")).is_ok());
        // A destination reserved first is refused when the run then reads it.
        let later = d.join("later.json");
        std::fs::write(&later, b"{}").map_err(|e| Error::io(&later, e))?;
        reserve("attention_out", &later)?;
        let e = protect(&later, "the prompt file")
            .err()
            .map(|e| e.to_string());
        assert!(
            e.as_deref()
                .is_some_and(|e| e.starts_with("attention_out ") && e.contains("the prompt file")),
            "{e:?}"
        );
        assert_eq!(
            std::fs::read(&later).map_err(|e| Error::io(&later, e))?,
            b"{}"
        );
        let _ = std::fs::remove_dir_all(&d);
        Ok(())
    }

    #[cfg(unix)]
    #[test]
    fn another_users_link_in_a_shared_folder_is_not_followed() -> Result<()> {
        use std::os::unix::fs::PermissionsExt;
        let d = dir("sticky");
        let io = |e| Error::io(&d, e);
        let target = d.join("precious");
        std::fs::write(&target, b"keep").map_err(io)?;
        let shared = d.join("shared");
        std::fs::create_dir(&shared).map_err(io)?;
        std::fs::set_permissions(&shared, std::fs::Permissions::from_mode(0o1777)).map_err(io)?;
        let link = shared.join("out.json");
        std::os::unix::fs::symlink(&target, &link).map_err(io)?;
        // Our own link there is followed.
        assert!(!is_stream(&link) && PendingFile::create(&link).is_ok());
        // Another user's needs root to make.
        if std::os::unix::fs::lchown(&link, Some(65534), None).is_err() {
            println!("SKIPPED: changing a link's owner needs root");
            let _ = std::fs::remove_dir_all(&d);
            return Ok(());
        }
        let e = PendingFile::create(&link).err().map(|e| e.to_string());
        assert!(
            e.as_deref().is_some_and(|e| e.contains("not followed")),
            "{e:?}"
        );
        assert_eq!(std::fs::read(&target).map_err(io)?, b"keep");
        let _ = std::fs::remove_dir_all(&d);
        Ok(())
    }

    #[test]
    fn temporary_names_fit_when_the_final_name_does() -> Result<()> {
        let d = dir("names");
        for len in [1, 243, 244, 250, 255] {
            let path = d.join("n".repeat(len));
            let mut f = PendingFile::create(&path)?;
            f.file().write_all(b"x").map_err(|e| Error::io(&path, e))?;
            f.commit()?;
            assert!(path.is_file(), "{len}");
        }
        assert!(PendingFile::create(&d.join("n".repeat(256))).is_err());
        assert_eq!(entries(&d).len(), 5);
        let _ = std::fs::remove_dir_all(&d);
        Ok(())
    }

    #[test]
    fn pairs_written_at_once_stay_pairs() -> Result<()> {
        let d = dir("pairs");
        let (a, b) = (d.join("r.npy"), d.join("r.npy.json"));
        let threads: Vec<_> = (0..8)
            .map(|i| {
                let (a, b) = (a.clone(), b.clone());
                std::thread::spawn(move || -> Result<()> {
                    for j in 0..50 {
                        let text = format!("{i}-{j}");
                        let mut files = Vec::new();
                        for p in [&a, &b] {
                            let mut f = PendingFile::create(p)?;
                            f.file()
                                .write_all(text.as_bytes())
                                .map_err(|e| Error::io(p, e))?;
                            files.push(f);
                        }
                        commit_together(files)?;
                    }
                    Ok(())
                })
            })
            .collect();
        for t in threads {
            t.join()
                .map_err(|_| Error::Internal("a writer panicked".into()))??;
        }
        let read = |p: &Path| std::fs::read_to_string(p).map_err(|e| Error::io(p, e));
        assert_eq!(read(&a)?, read(&b)?);
        assert_eq!(entries(&d), ["r.npy", "r.npy.json"]);
        let _ = std::fs::remove_dir_all(&d);
        Ok(())
    }
}
