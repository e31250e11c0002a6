//! Atomic file replacement: write everything to a temp file beside the target, then `rename(2)` it over
//! the target. Until [`PendingFile::commit`] the old file is untouched; dropping a `PendingFile` without
//! committing deletes the temp file, so a failed save leaves nothing behind.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use tempfile::{NamedTempFile, TempPath};

use crate::error::{Error, IoContext, Result};

/// A fully or partly written temp file that becomes `target` on commit.
#[derive(Debug)]
pub struct PendingFile {
    temp: NamedTempFile,
    target: PathBuf,
    fsync: bool,
}

impl PendingFile {
    /// Create a hidden temp file in the target's directory (a rename is only atomic within one file
    /// system). It is created with mode 0666 minus the umask, so the published file gets the usual
    /// permissions instead of the 0600 that temp files usually have.
    pub fn create(target: &Path, fsync: bool) -> Result<Self> {
        let name = target
            .file_name()
            .ok_or_else(|| Error::io(target, std::io::Error::other("path has no file name")))?;
        if name.len() > NAME_MAX {
            // Refused before any data is written, rather than by the rename at the very end.
            let too_long = std::io::Error::from_raw_os_error(libc::ENAMETOOLONG);
            return Err(Error::io(target, too_long));
        }
        let dir = match target.parent() {
            Some(p) if !p.as_os_str().is_empty() => p,
            _ => Path::new("."),
        };
        let temp = create_temp(dir, &name.to_string_lossy()).at(target)?;
        Ok(Self {
            temp,
            target: target.to_path_buf(),
            fsync,
        })
    }

    pub fn file(&self) -> &File {
        self.temp.as_file()
    }

    pub fn temp_path(&self) -> &Path {
        self.temp.path()
    }

    pub fn target(&self) -> &Path {
        &self.target
    }

    /// Publish the temp file under the target name (fsyncing file and directory first when asked).
    pub fn commit(self) -> Result<()> {
        let Self {
            temp,
            target,
            fsync,
        } = self;
        if fsync {
            temp.as_file().sync_all().at(&target)?;
        }
        // Held across the rename so that freeing the replaced file happens on the release thread.
        let replaced = open_replaced(&target);
        temp.persist(&target)
            .map_err(|e| Error::io(&target, e.error))?;
        if let Some(old) = replaced {
            crate::release::close_later(old);
        }
        if fsync {
            sync_parent_dir(&target)?;
        }
        Ok(())
    }
}

/// Stage `target` as a file at `temp`, a path the caller chose (created here, exclusively), holding
/// `head` at its start and `len` bytes in all. The rest is written by other processes before
/// [`PendingFile::commit`]: the ranks of a distributed save each write their own slices of it (see
/// [`crate::positioned`]), and the file is sized up front so that no write has to extend it.
pub fn stage_sized(
    target: &Path,
    temp: &Path,
    head: &[u8],
    len: u64,
    fsync: bool,
) -> Result<PendingFile> {
    let file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o666)
        .open(temp)
        .at(temp)?;
    let temp = match TempPath::try_from_path(temp) {
        Ok(path) => NamedTempFile::from_parts(file, path),
        Err(e) => {
            let _ = std::fs::remove_file(temp);
            return Err(Error::io(temp, e));
        }
    };
    // On an error `temp` is dropped, which removes the file.
    temp.as_file().set_len(len).at(target)?;
    temp.as_file().write_all_at(head, 0).at(target)?;
    Ok(PendingFile {
        temp,
        target: target.to_path_buf(),
        fsync,
    })
}

/// The regular file at `target` if it is big enough to be worth releasing later (see [`crate::release`]).
/// Best effort: a file we cannot open is simply freed by the rename, as without this.
fn open_replaced(target: &Path) -> Option<File> {
    let meta = std::fs::symlink_metadata(target).ok()?;
    if !meta.is_file() || meta.len() < crate::release::DEFER_MIN_BYTES {
        return None;
    }
    OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(target)
        .ok()
}

/// Create `dir/.<name>.<random>.tmp` exclusively. Done by hand rather than with `tempfile::Builder`
/// because tempfile wraps OS errors in a type that hides the errno, and callers (Python's OSError
/// subclasses) need it.
fn create_temp(dir: &Path, name: &str) -> std::io::Result<NamedTempFile> {
    let name = temp_stem(name);
    let mut last = None;
    for _ in 0..16 {
        let path = dir.join(format!(".{name}.{:016x}.tmp", random_u64()));
        match OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o666)
            .open(&path)
        {
            Ok(file) => {
                // An absolute path, so a later chdir cannot make the cleanup miss the file.
                return match TempPath::try_from_path(&path) {
                    Ok(temp_path) => Ok(NamedTempFile::from_parts(file, temp_path)),
                    Err(e) => {
                        let _ = std::fs::remove_file(&path);
                        Err(e)
                    }
                };
            }
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => last = Some(e),
            Err(e) => return Err(e),
        }
    }
    Err(last.expect("the loop ran"))
}

/// Longest file name Linux file systems take (NAME_MAX).
const NAME_MAX: usize = 255;
/// What `.<stem>.<16 hex digits>.tmp` adds to the stem.
const TEMP_DECORATION: usize = 1 + 1 + 16 + 4;

/// The target's name, cut (on a character boundary) so that the temp name stays within NAME_MAX: a
/// target name of up to 255 bytes is legal, and must not fail because its temp name would be longer.
fn temp_stem(name: &str) -> &str {
    let mut end = name.len().min(NAME_MAX - TEMP_DECORATION);
    while !name.is_char_boundary(end) {
        end -= 1;
    }
    &name[..end]
}

pub(crate) fn random_u64() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    // RandomState is seeded per instance from the OS; mixing in time and pid keeps names apart
    // across processes and calls without a dependency on a random-number crate.
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u32(std::process::id());
    if let Ok(t) = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH) {
        h.write_u128(t.as_nanos());
    }
    h.finish()
}

/// fsync the directory holding `path`, so that a rename into it survives a power cut.
pub fn sync_parent_dir(path: &Path) -> Result<()> {
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    File::open(dir).and_then(|d| d.sync_all()).at(dir)
}

/// Stage `bytes` as the new content of `target` (small files: configs, model cards).
pub fn stage_bytes(target: &Path, bytes: &[u8], fsync: bool) -> Result<PendingFile> {
    let mut pending = PendingFile::create(target, fsync)?;
    pending.temp.write_all(bytes).at(target)?;
    Ok(pending)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp_files(dir: &Path) -> Vec<String> {
        std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.ends_with(".tmp"))
            .collect()
    }

    #[test]
    fn old_content_survives_until_commit() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("a.txt");
        std::fs::write(&target, b"old").unwrap();
        let pending = stage_bytes(&target, b"new", true).unwrap();
        assert_eq!(std::fs::read(&target).unwrap(), b"old");
        assert_eq!(temp_files(dir.path()).len(), 1);
        pending.commit().unwrap();
        assert_eq!(std::fs::read(&target).unwrap(), b"new");
        assert!(temp_files(dir.path()).is_empty());
    }

    #[test]
    fn replacing_a_large_file_publishes_the_new_content_and_releases_the_old() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("big.bin");
        let old = vec![1u8; crate::release::DEFER_MIN_BYTES as usize];
        std::fs::write(&target, &old).unwrap();
        use std::os::unix::fs::MetadataExt;
        let old_inode = std::fs::metadata(&target).unwrap().ino();
        stage_bytes(&target, b"new", false)
            .unwrap()
            .commit()
            .unwrap();
        assert_eq!(std::fs::read(&target).unwrap(), b"new");
        crate::release::wait_released();
        let still_open = std::fs::read_dir("/proc/self/fd")
            .unwrap()
            .filter_map(|e| std::fs::metadata(e.unwrap().path()).ok())
            .any(|m| m.ino() == old_inode && m.nlink() == 0);
        assert!(!still_open, "the replaced file is still held open");
    }

    #[test]
    fn a_sized_stage_holds_its_head_and_length_and_publishes_what_others_wrote() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("w.safetensors");
        std::fs::write(&target, b"old").unwrap();
        let temp = dir.path().join(".w.safetensors.tmp-1-0123456789abcdef");
        let pending = stage_sized(&target, &temp, b"HEAD", 10, false).unwrap();
        assert_eq!(std::fs::read(&temp).unwrap(), b"HEAD\0\0\0\0\0\0");
        // Another writer fills the rest, as a rank would.
        let other = OpenOptions::new().write(true).open(&temp).unwrap();
        other.write_all_at(b"abcdef", 4).unwrap();
        assert!(
            stage_sized(&target, &temp, b"x", 1, false).is_err(),
            "an existing temp is refused"
        );
        assert_eq!(std::fs::read(&target).unwrap(), b"old");
        pending.commit().unwrap();
        assert_eq!(std::fs::read(&target).unwrap(), b"HEADabcdef");
        assert!(!temp.exists());
    }

    #[test]
    fn a_sized_stage_dropped_removes_its_temp_and_keeps_the_target() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("w.safetensors");
        std::fs::write(&target, b"old").unwrap();
        let temp = dir.path().join(".w.safetensors.tmp-1-0123456789abcdef");
        drop(stage_sized(&target, &temp, b"HEAD", 8, false).unwrap());
        assert!(!temp.exists());
        assert_eq!(std::fs::read(&target).unwrap(), b"old");
    }

    #[test]
    fn dropping_discards_the_temp_file() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("a.txt");
        std::fs::write(&target, b"old").unwrap();
        drop(stage_bytes(&target, b"new", false).unwrap());
        assert_eq!(std::fs::read(&target).unwrap(), b"old");
        assert!(temp_files(dir.path()).is_empty());
    }

    #[test]
    fn published_file_gets_umask_permissions_not_0600() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("perm.bin");
        stage_bytes(&target, b"x", false).unwrap().commit().unwrap();
        let mode = std::fs::metadata(&target).unwrap().permissions().mode() & 0o777;
        let umask = current_umask();
        assert_eq!(mode, 0o666 & !umask, "mode {mode:o}, umask {umask:o}");
    }

    #[test]
    fn missing_directory_names_the_target() {
        let err = stage_bytes(Path::new("/nonexistent-dir-xyz/f.bin"), b"x", false).unwrap_err();
        assert!(
            err.to_string().contains("/nonexistent-dir-xyz/f.bin"),
            "{err}"
        );
        assert!(
            matches!(err, Error::Io { ref source, .. } if source.kind() == std::io::ErrorKind::NotFound)
        );
    }

    #[test]
    fn names_up_to_name_max_can_be_published() {
        let dir = tempfile::tempdir().unwrap();
        for name in [
            "a".repeat(255),
            "é".repeat(127),
            format!("{}.safetensors", "b".repeat(240)),
        ] {
            let target = dir.path().join(&name);
            stage_bytes(&target, b"x", false).unwrap().commit().unwrap();
            assert_eq!(std::fs::read(&target).unwrap(), b"x", "{name}");
        }
        assert!(temp_files(dir.path()).is_empty());
        let err = stage_bytes(&dir.path().join("c".repeat(256)), b"x", false).unwrap_err();
        assert!(err.to_string().contains(&"c".repeat(256)), "{err}");
        assert!(
            matches!(&err, Error::Io { source, .. } if source.raw_os_error() == Some(libc::ENAMETOOLONG)),
            "{err:?}"
        );
    }

    fn current_umask() -> u32 {
        // /proc/self/status reports it without changing it (umask(2) can only be read by setting it).
        let status = std::fs::read_to_string("/proc/self/status").unwrap();
        let line = status.lines().find(|l| l.starts_with("Umask:")).unwrap();
        u32::from_str_radix(line.split_whitespace().nth(1).unwrap(), 8).unwrap()
    }
}
