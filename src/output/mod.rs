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

mod destination;

use destination::{check, folder_of, param_of, Kind};
pub use destination::{is_stream, protect, reserve};

/// Temporary files not yet committed, for [`remove_temporaries`].
static TEMPORARIES: Mutex<Vec<PathBuf>> = Mutex::new(Vec::new());

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
