//! Writing results so that a file appears whole or not at all.
//!
//! A regular file is written to a temporary file beside it (same folder, so the final `rename` is
//! atomic) and renamed into place only by [`PendingFile::commit`]; on an error, a drop, or a
//! second Ctrl-C ([`remove_temporaries`]) the temporary is deleted. What is not a regular file
//! (`/dev/stdout`, `/dev/full`, a pipe) is written directly, errors included. Standard output
//! whose reader went away (`gpt2 ... | head`) gives [`Error::StdoutClosed`], which the binary
//! ends on quietly.

use std::fmt;
use std::fs::File;
use std::io::{BufWriter, ErrorKind, Write};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use serde::Serialize;

use crate::error::{Error, Result};

/// Temporary files not yet committed, for [`remove_temporaries`].
static TEMPORARIES: Mutex<Vec<PathBuf>> = Mutex::new(Vec::new());

/// Deletes every temporary file not yet committed: for a process about to exit without
/// unwinding (the binary's second Ctrl-C).
pub fn remove_temporaries() {
    let temps = TEMPORARIES.lock().unwrap_or_else(|e| e.into_inner());
    for path in temps.iter() {
        let _ = std::fs::remove_file(path);
    }
}

/// Refuses to write over a file the run reads: `path` (if it exists) must not be, or link to,
/// any of `inputs` (a model's own `model.safetensors`, a Hub cache blob).
pub fn refuse_inputs(path: &Path, inputs: &[PathBuf]) -> Result<()> {
    let Ok(out) = path.canonicalize() else {
        return Ok(()); // does not exist yet: cannot be an input
    };
    for input in inputs {
        if input.canonicalize().is_ok_and(|i| i == out) {
            return Err(Error::param(
                "out",
                format!(
                    "{} is one of the model's own files ({}); choose another path",
                    path.display(),
                    input.display()
                ),
            ));
        }
    }
    Ok(())
}

/// A file being written: a temporary beside `dest` until committed.
pub struct PendingFile {
    /// `None` when `dest` is not a regular file and is written directly.
    temp: Option<tempfile::NamedTempFile>,
    direct: Option<File>,
    dest: PathBuf,
}

impl PendingFile {
    /// Starts writing `dest`. A folder, or a path in a folder that does not exist, is an error
    /// here, before any work.
    pub fn create(dest: &Path) -> Result<Self> {
        match std::fs::metadata(dest) {
            Ok(m) if m.is_dir() => {
                return Err(Error::param(
                    "out",
                    format!("{} is a folder, not a file", dest.display()),
                ))
            }
            Ok(m) if !m.is_file() => {
                // A device or a pipe: there is nothing to replace atomically.
                let file = std::fs::OpenOptions::new()
                    .write(true)
                    .open(dest)
                    .map_err(|e| Error::io(dest, e))?;
                return Ok(Self {
                    temp: None,
                    direct: Some(file),
                    dest: dest.to_path_buf(),
                });
            }
            _ => {}
        }
        let dir = match dest.parent() {
            Some(p) if !p.as_os_str().is_empty() => p,
            _ => Path::new("."),
        };
        let name = dest
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .ok_or_else(|| Error::param("out", format!("{}: not a file name", dest.display())))?;
        let temp = tempfile::Builder::new()
            .prefix(&format!(".{name}."))
            .suffix(".tmp")
            .tempfile_in(dir)
            .map_err(|e| Error::io(dest, e))?;
        lock_temporaries().push(temp.path().to_path_buf());
        Ok(Self {
            temp: Some(temp),
            direct: None,
            dest: dest.to_path_buf(),
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

    /// Moves the finished file into place.
    pub fn commit(mut self) -> Result<()> {
        let dest = self.dest.clone();
        match self.temp.take() {
            Some(temp) => {
                let path = temp.path().to_path_buf();
                let result = temp.persist(&dest).map(|_| ()).map_err(|e| {
                    // `e` gives the temporary back; dropping it deletes it.
                    Error::io(&dest, e.error)
                });
                forget_temporary(&path);
                result
            }
            None => self
                .direct
                .take()
                .map_or(Ok(()), |mut f| f.flush().map_err(|e| Error::io(&dest, e))),
        }
    }
}

impl Drop for PendingFile {
    fn drop(&mut self) {
        if let Some(temp) = self.temp.take() {
            forget_temporary(temp.path());
            // Dropping the NamedTempFile deletes it.
        }
    }
}

fn lock_temporaries() -> std::sync::MutexGuard<'static, Vec<PathBuf>> {
    TEMPORARIES.lock().unwrap_or_else(|e| e.into_inner())
}

fn forget_temporary(path: &Path) {
    lock_temporaries().retain(|p| p != path);
}

/// Where one output goes.
enum Dest {
    Stdout(std::io::Stdout),
    File(PendingFile),
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
        write_error(&self.name, e)
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
    pub fn finish(self) -> Result<()> {
        let name = self.name.clone();
        let dest = self
            .inner
            .into_inner()
            .map_err(|e| write_error(&name, e.into_error()))?;
        match dest {
            Dest::Stdout(mut s) => s.flush().map_err(|e| write_error(&name, e)),
            Dest::File(f) => f.commit(),
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
        assert!(lock_temporaries().is_empty());
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
        let link = d.join("link.safetensors");
        #[cfg(unix)]
        std::os::unix::fs::symlink(&input, &link).map_err(|e| Error::io(&link, e))?;
        assert!(refuse_inputs(&input, std::slice::from_ref(&input)).is_err());
        #[cfg(unix)]
        assert!(refuse_inputs(&input, std::slice::from_ref(&link)).is_err());
        assert!(refuse_inputs(&d.join("new.npy"), &[input]).is_ok());
        let _ = std::fs::remove_dir_all(&d);
        Ok(())
    }
}
