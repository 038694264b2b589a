//! Where an output may go, decided before any byte is written: what a destination is (a file
//! replaced whole, a stream, the process's own stdout), and that it is none of the files the run
//! reads ([`protect`]) — compared by device and inode, through symlinks and hard links — with
//! errors naming the flag that [`reserve`]d it.

use std::ffi::OsStr;
use std::io::ErrorKind;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use super::{lock, temp_in};
use crate::error::{Error, Result};

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

pub(super) fn file_id(path: &Path) -> Option<FileId> {
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
        // Deleted as it drops, here.
        drop(probe);
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
pub(super) fn param_of(dest: &Path) -> &'static str {
    lock(&RESERVED)
        .iter()
        .find(|(_, p)| p == dest)
        .map_or("out", |(param, _)| param)
}

/// What writing a destination means.
pub(super) enum Kind {
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
pub(super) fn resolve(dest: &Path) -> std::result::Result<Kind, String> {
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
pub(super) fn folder_of(path: &Path) -> &Path {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    }
}

/// [`resolve`]s `dest` and checks a file's folder and that it is no input, errors naming `param`.
pub(super) fn check(param: &'static str, dest: &Path) -> Result<Kind> {
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
