//! Checkpoint directories published atomically, rotated safely, listed without trusting leftovers.
//!
//! A checkpoint is a directory `root/checkpoint-<step>` (the name `transformers.Trainer` uses, so its
//! `get_last_checkpoint` finds ours). It is written as a hidden temp directory
//! `root/.checkpoint-<step>.tmp-<pid>-<random>` and renamed into place only when every file in it is
//! written (and fsynced, when asked): a reader never sees half a checkpoint, and a writer killed at any
//! moment leaves only a hidden temp directory that [`steps`] ignores and [`clean_stale`] removes.
//!
//! Ranks that each own a part of a checkpoint publish `checkpoint-<step>/rank-<r>-of-<n>` the same way;
//! such a step counts only when all `n` parts are there.

use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Component, Path, PathBuf};

use crate::atomic::random_u64;
use crate::error::{Error, IoContext, Result};
use crate::writer::write_image;

pub const PREFIX: &str = "checkpoint-";

/// One file of a checkpoint: a `/`-separated path relative to the checkpoint directory, and its bytes.
#[derive(Debug, Clone, Copy)]
pub struct CheckpointFile<'a> {
    pub name: &'a str,
    pub data: &'a [u8],
}

#[derive(Debug, Clone, Default)]
pub struct PublishOptions {
    /// fsync every file and directory before the rename, and the parent directory after it.
    pub fsync: bool,
    /// Write files from several threads (shards of a full model): separate files do not share an
    /// inode lock, unlike parallel writes to one file.
    pub parallel: bool,
    /// After publishing, delete all but this many complete checkpoints (the new one always stays).
    pub keep_last: Option<usize>,
    /// Publish as `checkpoint-<step>/<part>` (one rank's part) instead of `checkpoint-<step>`.
    pub part: Option<String>,
}

/// The directory of step `step` under `root`.
pub fn step_dir(root: &Path, step: u64) -> PathBuf {
    root.join(format!("{PREFIX}{step}"))
}

/// Write `files` as checkpoint `step` under `root` and publish it atomically; returns its path.
/// An existing checkpoint of the same step is replaced atomically (`RENAME_EXCHANGE`) where the file
/// system supports it.
pub fn publish(
    root: &Path,
    step: u64,
    files: &[CheckpointFile<'_>],
    options: &PublishOptions,
) -> Result<PathBuf> {
    for f in files {
        check_name(root, f.name)?;
    }
    fs::create_dir_all(root).at(root)?;
    let (parent, final_name) = match &options.part {
        None => (root.to_path_buf(), format!("{PREFIX}{step}")),
        Some(part) => {
            check_name(root, part)?;
            let parent = step_dir(root, step);
            fs::create_dir_all(&parent).at(&parent)?;
            (parent, part.clone())
        }
    };
    let staging = TempDir::create(&parent, &final_name)?;
    write_files(&staging.path, files, options)?;
    if options.fsync {
        sync_tree_dirs(&staging.path, files)?;
    }
    let target = parent.join(&final_name);
    replace_dir(&staging.path, &target)?;
    staging.published();
    if options.fsync {
        sync_dir(&parent)?;
    }
    if let Some(keep) = options.keep_last {
        rotate(root, keep, step)?;
    }
    Ok(target)
}

/// Steps of the complete checkpoints under `root`, ascending. Hidden temp directories, files, and
/// directories whose name is not `checkpoint-<digits>` are ignored; a step split into rank parts
/// counts once all of its parts are published.
pub fn steps(root: &Path) -> Result<Vec<u64>> {
    let mut out = Vec::new();
    for step in step_dirs(root)? {
        if is_complete(&step_dir(root, step))? {
            out.push(step);
        }
    }
    out.sort_unstable();
    Ok(out)
}

/// Delete complete checkpoints so that `keep` remain, oldest first, never `protect` (the one just
/// written). Each is first renamed to a hidden name, so it disappears at once instead of being seen
/// half-deleted. Returns the deleted steps.
pub fn rotate(root: &Path, keep: usize, protect: u64) -> Result<Vec<u64>> {
    let others: Vec<u64> = steps(root)?.into_iter().filter(|&s| s != protect).collect();
    let excess = others.len().saturating_sub(keep.saturating_sub(1));
    let doomed = &others[..excess];
    for &step in doomed {
        let dir = step_dir(root, step);
        let trash = root.join(format!(
            ".{PREFIX}{step}.del-{}-{:016x}",
            std::process::id(),
            random_u64()
        ));
        fs::rename(&dir, &trash).at(&dir)?;
        fs::remove_dir_all(&trash).at(&trash)?;
    }
    Ok(doomed.to_vec())
}

/// Remove the temp and trash directories that writers which no longer run left under `root` (and
/// under its step directories, for rank parts). Directories of a live process (same host) are kept:
/// it may still be writing them. Returns how many were removed.
pub fn clean_stale(root: &Path) -> Result<usize> {
    let mut removed = remove_stale_in(root)?;
    for step in step_dirs(root)? {
        removed += remove_stale_in(&step_dir(root, step))?;
    }
    Ok(removed)
}

fn remove_stale_in(dir: &Path) -> Result<usize> {
    let entries = match fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(0),
        Err(e) => return Err(Error::io(dir, e)),
    };
    let mut removed = 0;
    for entry in entries {
        let entry = entry.at(dir)?;
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(pid) = leftover_pid(&name) else {
            continue;
        };
        if pid != std::process::id() && !process_alive(pid) {
            match fs::remove_dir_all(entry.path()) {
                Ok(()) => removed += 1,
                // Another cleaner got there first.
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(Error::io(entry.path(), e)),
            }
        }
    }
    Ok(removed)
}

/// Every `checkpoint-<digits>` directory, complete or not (a file of that name is not one).
fn step_dirs(root: &Path) -> Result<Vec<u64>> {
    let entries = match fs::read_dir(root) {
        Ok(e) => e,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(Error::io(root, e)),
    };
    let mut out = Vec::new();
    for entry in entries {
        let entry = entry.at(root)?;
        if let Some(step) = parse_step(&entry.file_name().to_string_lossy()) {
            if entry.file_type().at(&entry.path())?.is_dir() {
                out.push(step);
            }
        }
    }
    Ok(out)
}

fn parse_step(name: &str) -> Option<u64> {
    let digits = name.strip_prefix(PREFIX)?;
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

/// `rank-<r>-of-<n>` → (r, n).
fn parse_part(name: &str) -> Option<(u64, u64)> {
    let rest = name.strip_prefix("rank-")?;
    let (r, n) = rest.split_once("-of-")?;
    let (r, n) = (r.parse().ok()?, n.parse().ok()?);
    (r < n).then_some((r, n))
}

/// A step directory is complete unless it holds rank parts and some are missing.
fn is_complete(dir: &Path) -> Result<bool> {
    let mut seen = std::collections::BTreeSet::new();
    let mut expected = None;
    for entry in fs::read_dir(dir).at(dir)? {
        let entry = entry.at(dir)?;
        if let Some((r, n)) = parse_part(&entry.file_name().to_string_lossy()) {
            if expected.is_some_and(|e| e != n) {
                return Ok(false); // parts of two different world sizes: not one checkpoint
            }
            expected = Some(n);
            seen.insert(r);
        }
    }
    Ok(expected.is_none_or(|n| seen.len() as u64 == n))
}

/// The pid in `.checkpoint-<step>.tmp-<pid>-<rand>` / `.del-<pid>-<rand>` / `.rank-...tmp-<pid>-<rand>`.
fn leftover_pid(name: &str) -> Option<u32> {
    if !name.starts_with('.') {
        return None;
    }
    let tail = name
        .rsplit_once(".tmp-")
        .or_else(|| name.rsplit_once(".del-"))?
        .1;
    let (pid, rand) = tail.split_once('-')?;
    (rand.len() == 16 && rand.bytes().all(|b| b.is_ascii_hexdigit())).then_some(())?;
    pid.parse().ok()
}

fn process_alive(pid: u32) -> bool {
    let Ok(pid) = i32::try_from(pid) else {
        return false;
    };
    // SAFETY: signal 0 sends nothing; it only asks whether the process exists.
    let rc = unsafe { libc::kill(pid, 0) };
    rc == 0 || io::Error::last_os_error().raw_os_error() == Some(libc::EPERM)
}

/// File names must stay inside the checkpoint: relative, no `..`, no empty or `.` components.
fn check_name(root: &Path, name: &str) -> Result<()> {
    let path = Path::new(name);
    let ok = !name.is_empty()
        && path.components().all(|c| matches!(c, Component::Normal(_)))
        && !name.ends_with('/');
    if ok {
        Ok(())
    } else {
        Err(Error::io(
            root.join(name),
            io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("checkpoint file name {name:?} must be a relative path without `..`"),
            ),
        ))
    }
}

/// A hidden staging directory that is removed unless it was published.
struct TempDir {
    path: PathBuf,
    keep: bool,
}

impl TempDir {
    fn create(parent: &Path, final_name: &str) -> Result<Self> {
        let mut last = None;
        for _ in 0..16 {
            let path = parent.join(format!(
                ".{final_name}.tmp-{}-{:016x}",
                std::process::id(),
                random_u64()
            ));
            match fs::create_dir(&path) {
                Ok(()) => return Ok(Self { path, keep: false }),
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => last = Some(e),
                Err(e) => return Err(Error::io(&path, e)),
            }
        }
        Err(Error::io(parent, last.expect("the loop ran")))
    }

    fn published(mut self) {
        self.keep = true;
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        if !self.keep {
            let _ = fs::remove_dir_all(&self.path);
        }
    }
}

fn write_files(dir: &Path, files: &[CheckpointFile<'_>], options: &PublishOptions) -> Result<()> {
    for f in files {
        if let Some(parent) = Path::new(f.name).parent() {
            if !parent.as_os_str().is_empty() {
                fs::create_dir_all(dir.join(parent)).at(&dir.join(parent))?;
            }
        }
    }
    let write_one = |f: &CheckpointFile<'_>| -> Result<()> {
        let path = dir.join(f.name);
        let file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o666)
            .open(&path)
            .at(&path)?;
        write_image(&file, f.data, options.fsync).at(&path)?;
        if options.fsync {
            file.sync_all().at(&path)?;
        }
        Ok(())
    };
    let threads = if options.parallel {
        std::thread::available_parallelism().map_or(1, |n| n.get())
    } else {
        1
    };
    let sizes: Vec<u64> = files.iter().map(|f| f.data.len() as u64).collect();
    crate::parallel::largest_first(&sizes, threads, |i| write_one(&files[i]))?;
    Ok(())
}

/// fsync the staging directory and every subdirectory the files live in, deepest first.
fn sync_tree_dirs(dir: &Path, files: &[CheckpointFile<'_>]) -> Result<()> {
    let mut dirs: Vec<PathBuf> = files
        .iter()
        .filter_map(|f| Path::new(f.name).parent())
        .filter(|p| !p.as_os_str().is_empty())
        .flat_map(|p| p.ancestors().filter(|a| !a.as_os_str().is_empty()))
        .map(|p| dir.join(p))
        .collect();
    dirs.sort_by_key(|d| std::cmp::Reverse(d.components().count()));
    dirs.dedup();
    for d in dirs {
        sync_dir(&d)?;
    }
    sync_dir(dir)
}

fn sync_dir(dir: &Path) -> Result<()> {
    File::open(dir).and_then(|d| d.sync_all()).at(dir)
}

/// Move `staging` to `target`. If `target` exists, swap the two atomically and hand the old one (now at
/// `staging`) to the release thread to delete; where the file system cannot swap, fall back to moving
/// the old one aside first, which leaves a moment with no `target` but never a mixed one.
pub(crate) fn replace_dir(staging: &Path, target: &Path) -> Result<()> {
    match fs::rename(staging, target) {
        Ok(()) => return Ok(()),
        Err(e) if matches!(e.raw_os_error(), Some(libc::ENOTEMPTY) | Some(libc::EEXIST)) => {}
        Err(e) => return Err(Error::io(target, e)),
    }
    match rustix::fs::renameat_with(
        rustix::fs::CWD,
        staging,
        rustix::fs::CWD,
        target,
        rustix::fs::RenameFlags::EXCHANGE,
    ) {
        Ok(()) => {
            // `staging` now holds the old checkpoint, under a hidden name: freeing its files takes as
            // long as writing them, so it is removed off the caller's thread (`release`).
            crate::release::remove_later(staging.to_path_buf());
            Ok(())
        }
        Err(rustix::io::Errno::INVAL | rustix::io::Errno::NOSYS) => {
            let aside =
                staging.with_extension(format!("del-{}-{:016x}", std::process::id(), random_u64()));
            fs::rename(target, &aside).at(target)?;
            fs::rename(staging, target).at(target)?;
            crate::release::remove_later(aside);
            Ok(())
        }
        Err(e) => Err(Error::io(target, e.into())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn files<'a>(data: &'a [(&'a str, Vec<u8>)]) -> Vec<CheckpointFile<'a>> {
        data.iter()
            .map(|(n, d)| CheckpointFile { name: n, data: d })
            .collect()
    }

    fn read(dir: &Path, name: &str) -> Vec<u8> {
        fs::read(dir.join(name)).unwrap()
    }

    fn hidden(root: &Path) -> Vec<String> {
        fs::read_dir(root)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.starts_with('.'))
            .collect()
    }

    #[test]
    fn publishes_all_files_and_nothing_else() {
        let root = tempfile::tempdir().unwrap();
        let data = vec![
            ("a.safetensors", vec![1u8; 3 << 20]),
            ("sub/dir/b.json", b"{}".to_vec()),
            ("c", vec![]),
        ];
        for parallel in [false, true] {
            let opts = PublishOptions {
                fsync: true,
                parallel,
                ..Default::default()
            };
            let dir = publish(root.path(), 7, &files(&data), &opts).unwrap();
            assert_eq!(dir, root.path().join("checkpoint-7"));
            for (name, bytes) in &data {
                assert_eq!(&read(&dir, name), bytes, "{name}");
            }
        }
        crate::release::wait_released(); // the replaced checkpoint is removed on the release thread
        assert!(hidden(root.path()).is_empty(), "{:?}", hidden(root.path()));
        assert_eq!(steps(root.path()).unwrap(), vec![7]);
    }

    #[test]
    fn republishing_a_step_replaces_it_whole() {
        let root = tempfile::tempdir().unwrap();
        let old = vec![("x", b"old".to_vec()), ("only-old", b"1".to_vec())];
        let new = vec![("x", b"new".to_vec())];
        let opts = PublishOptions::default();
        publish(root.path(), 1, &files(&old), &opts).unwrap();
        let dir = publish(root.path(), 1, &files(&new), &opts).unwrap();
        assert_eq!(read(&dir, "x"), b"new");
        assert!(!dir.join("only-old").exists());
        crate::release::wait_released(); // the old checkpoint, hidden, is removed on the release thread
        assert!(hidden(root.path()).is_empty());
    }

    #[test]
    fn names_that_escape_are_refused_and_nothing_is_written() {
        let root = tempfile::tempdir().unwrap();
        for bad in ["../x", "/etc/x", "", "a/../../b", "./"] {
            let data = vec![(bad, b"x".to_vec())];
            let err = publish(root.path(), 1, &files(&data), &PublishOptions::default());
            assert!(err.is_err(), "{bad:?} accepted");
        }
        assert!(steps(root.path()).unwrap().is_empty());
        assert!(fs::read_dir(root.path()).unwrap().next().is_none());
    }

    #[test]
    fn rotation_keeps_the_newest_and_always_the_one_just_written() {
        let root = tempfile::tempdir().unwrap();
        let data = vec![("f", b"x".to_vec())];
        let keep2 = PublishOptions {
            keep_last: Some(2),
            ..Default::default()
        };
        for step in [10, 20, 30, 40] {
            publish(root.path(), step, &files(&data), &keep2).unwrap();
        }
        assert_eq!(steps(root.path()).unwrap(), vec![30, 40]);
        // A restart from an earlier step: the new checkpoint stays even though its step is lowest.
        publish(root.path(), 5, &files(&data), &keep2).unwrap();
        assert_eq!(steps(root.path()).unwrap(), vec![5, 40]);
        assert!(hidden(root.path()).is_empty());
    }

    #[test]
    fn leftovers_are_ignored_and_stale_ones_cleaned() {
        let root = tempfile::tempdir().unwrap();
        let data = vec![("f", b"x".to_vec())];
        publish(root.path(), 1, &files(&data), &PublishOptions::default()).unwrap();
        // A writer that died mid-save (pid 0x7fffffff cannot exist), one that is alive (us), a file
        // and a directory that merely look like checkpoints.
        let dead = root
            .path()
            .join(format!(".checkpoint-2.tmp-2147483647-{:016x}", 1));
        let live = root.path().join(format!(
            ".checkpoint-3.tmp-{}-{:016x}",
            std::process::id(),
            2
        ));
        fs::create_dir_all(dead.join("x")).unwrap();
        fs::create_dir(&live).unwrap();
        fs::write(root.path().join("checkpoint-4"), b"file").unwrap();
        fs::create_dir(root.path().join("checkpoint-5x")).unwrap();
        assert_eq!(steps(root.path()).unwrap(), vec![1]);
        assert_eq!(clean_stale(root.path()).unwrap(), 1);
        assert!(!dead.exists());
        assert!(live.exists());
    }

    #[test]
    fn rank_parts_count_once_all_are_published() {
        let root = tempfile::tempdir().unwrap();
        let data = vec![("model.safetensors", b"x".to_vec())];
        let part = |r: u64| PublishOptions {
            part: Some(format!("rank-{r:05}-of-00002")),
            ..Default::default()
        };
        publish(root.path(), 3, &files(&data), &part(1)).unwrap();
        assert!(steps(root.path()).unwrap().is_empty());
        publish(root.path(), 3, &files(&data), &part(0)).unwrap();
        assert_eq!(steps(root.path()).unwrap(), vec![3]);
        assert_eq!(
            read(
                &step_dir(root.path(), 3),
                "rank-00000-of-00002/model.safetensors"
            ),
            b"x"
        );
    }
}
