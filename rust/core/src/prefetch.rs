//! Bringing a mapped file's pages into the process before its tensors are used: for nothing when they
//! are already there, cheaply when they are in the page cache, and at the disk's speed when they are not.
//!
//! The file's residency is asked of the kernel first (`mincore` over the whole mapping: one syscall, no
//! I/O). When every page is in the page cache, one thread maps the file in, in 4 MiB pieces in file order
//! (`MADV_POPULATE_READ`: 537 MB in 25 ms, no copy), and a caller that is done may stop it at any piece,
//! as before this module. When some page is not, the prefetch is *cold*: [`COLD_THREADS`] threads each
//! walk one consecutive stretch of the file, so that several large reads are in flight at once, and it
//! runs to the end (stopping early would leave the rest to single page faults, the slowest way to read
//! a file).
//!
//! Populating is the read (a read-ahead hint first, or `pread` into a scratch buffer, were slower), and
//! it must fill the mapping's own pages: the page cache's, mapped shared, which keeps the memory of
//! several processes loading the same adapter low. One consecutive stretch per thread, because pieces
//! handed out in turn make each thread's faults look random to read-ahead. [`COLD_THREADS`] is 2: as
//! fast as one thread on the CI VM, two reads in flight where a disk's read-ahead is small; 4 were
//! slower. The measurements are in the README (Benchmarks, cold loads).
//!
//! `mincore` reports the page cache only for files the process could write (or owns); for others it
//! reports a page as resident only once this process maps it, so a warm file of someone else's is read
//! as a cold one: correct, a few milliseconds more.

use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use crate::error::{Error, Result};

/// The unit of residency checks and of populating.
pub const PIECE: usize = 4 << 20;
/// Threads that populate a file once it is found cold (see the module's measurements).
pub const COLD_THREADS: usize = 2;

/// Shared between a running prefetch and whoever started it.
#[derive(Debug, Default)]
pub struct Prefetch {
    /// The caller is done: stop at the next piece, unless the file is being read from disk.
    pub stop: AtomicBool,
    /// Nobody will use the pages any more (the file was dropped): stop at the next piece, cold or not.
    pub abandon: AtomicBool,
    /// A piece was found not resident: the prefetch runs to the end, on [`COLD_THREADS`] threads.
    pub cold: AtomicBool,
    /// Pieces taken so far, by all threads.
    next: AtomicUsize,
    /// Do nothing when the file is in the page cache (for callers that read it with `pread`).
    only_cold: bool,
}

impl Prefetch {
    pub fn new() -> Self {
        Self::default()
    }

    /// A prefetch that reads the file only if some of it is not in the page cache, and otherwise does
    /// nothing: for callers that copy the bytes out with `pread` (no mapping to fault in) but gain from
    /// the disk reads starting early, beside their own work.
    pub fn only_cold() -> Self {
        Self {
            only_cold: true,
            ..Self::default()
        }
    }

    /// Whether the prefetch has gone cold (some of the file was not in the page cache).
    pub fn is_cold(&self) -> bool {
        self.cold.load(Ordering::Acquire)
    }

    fn should_stop(&self) -> bool {
        self.abandon.load(Ordering::Relaxed)
            || (self.stop.load(Ordering::Relaxed) && !self.is_cold())
    }
}

/// Populate `map` (a mapping of the file `path`, which names it in errors) as described in the module
/// documentation, with up to `threads` threads once cold. An error (`EFAULT`: the file shrank under the
/// mapping; `EIO`: the disk failed) is returned naming the file, where touching the page would have
/// raised SIGBUS.
pub fn prefetch(map: &[u8], path: &Path, threads: usize, state: &Prefetch) -> Result<()> {
    let pieces = map.len().div_ceil(PIECE);
    // Before the caller's stop is looked at: a stop must never hide that the file is not in memory.
    if !state.is_cold() && !resident(map).map_err(|e| Error::io(path, e))? {
        state.cold.store(true, Ordering::Release);
    }
    // Pieces `range`, in order, each counted in `state.next`.
    let walk = |range: std::ops::Range<usize>| -> Result<()> {
        for i in range {
            if state.should_stop() {
                return Ok(());
            }
            state.next.fetch_add(1, Ordering::Relaxed);
            if let Err(e) = populate(piece_of(map, i)) {
                state.abandon.store(true, Ordering::Relaxed); // no point reading the rest
                return Err(Error::io(path, e));
            }
        }
        Ok(())
    };
    if !state.is_cold() {
        return if state.only_cold {
            Ok(())
        } else {
            walk(0..pieces)
        };
    }
    // One consecutive stretch of the file per thread: each thread's faults then look sequential to the
    // kernel's read-ahead (pieces handed out in turn made every thread's reads look random, and were
    // slower than one thread).
    let per = pieces.div_ceil(threads.max(1));
    std::thread::scope(|s| {
        let helpers: Vec<_> = (1..threads.max(1))
            .map(|k| s.spawn(move || walk(k * per..((k + 1) * per).min(pieces))))
            .collect();
        let mine = walk(0..per.min(pieces));
        helpers.into_iter().fold(mine, |acc, h| {
            let theirs = h.join().unwrap_or_else(|p| std::panic::resume_unwind(p));
            acc.and(theirs)
        })
    })
}

/// Mark `state` cold when a sample of `map` is not in memory: the first page of every 4 MiB piece (one
/// `mincore` each, ~40 for 160 MB), for a caller that wants to know before the prefetch's thread starts
/// (a load keeps what it needs to undo its changes only when the file is read from disk, where that
/// cost hides). The whole mapping, page by page, costs milliseconds: the prefetch's thread asks that,
/// beside the caller's work. A file evicted in part may pass the sample; the thread still reads it.
pub fn sample_cold(map: &[u8], path: &Path, state: &Prefetch) -> Result<bool> {
    let page = page_size();
    for i in 0..map.len().div_ceil(PIECE) {
        let start = i * PIECE;
        if !resident(&map[start..(start + page).min(map.len())]).map_err(|e| Error::io(path, e))? {
            state.cold.store(true, Ordering::Release);
            break;
        }
    }
    Ok(state.is_cold())
}

/// Whether every page of `map` (a whole mapping of the file `path`) is in memory: one `mincore` over the
/// mapping, no I/O (tens of microseconds for an 8 MB adapter, a fraction of a millisecond for 268 MB).
pub fn all_resident(map: &[u8], path: &Path) -> Result<bool> {
    resident(map).map_err(|e| Error::io(path, e))
}

/// Whether the page cache holds every page of `file`'s bytes `[offset, offset + len)`, asked without
/// a mapping (`cachestat`, Linux 6.5: one syscall). None where the kernel does not answer: an older
/// kernel, or a file this process may not ask about (the rule of `mincore`, see the module's note).
#[cfg(target_os = "linux")]
pub fn page_cache_holds(file: &std::fs::File, offset: u64, len: u64) -> Option<bool> {
    use std::os::fd::AsRawFd;
    // By hand: libc 0.2 declares neither the syscall's number for x86_64 glibc nor its structs. 451
    // is cachestat's number on every architecture (the unified table).
    const SYS_CACHESTAT: libc::c_long = 451;
    #[repr(C)]
    struct Range {
        off: u64,
        len: u64,
    }
    #[repr(C)]
    #[derive(Default)]
    struct Stat {
        nr_cache: u64,
        nr_dirty: u64,
        nr_writeback: u64,
        nr_evicted: u64,
        nr_recently_evicted: u64,
    }
    if len == 0 {
        return Some(true);
    }
    let range = Range { off: offset, len };
    let mut stat = Stat::default();
    // SAFETY: both pointers are to live, properly laid out structs; flags must be 0.
    let rc = unsafe {
        libc::syscall(
            SYS_CACHESTAT,
            file.as_raw_fd(),
            &range as *const Range,
            &mut stat as *mut Stat,
            0 as libc::c_uint,
        )
    };
    if rc != 0 {
        return None;
    }
    let page = page_size() as u64;
    let pages = (offset + len - 1) / page - offset / page + 1;
    Some(stat.nr_cache >= pages)
}

#[cfg(not(target_os = "linux"))]
pub fn page_cache_holds(_file: &std::fs::File, _offset: u64, _len: u64) -> Option<bool> {
    None
}

fn piece_of(map: &[u8], i: usize) -> &[u8] {
    &map[i * PIECE..((i + 1) * PIECE).min(map.len())]
}

/// Whether every page of `piece` (page-aligned: the whole mapping, or a 4 MiB piece of it) is in memory:
/// mapped here or in the page cache. One syscall, one byte per page (65,536 for 268 MB), no I/O.
fn resident(piece: &[u8]) -> std::io::Result<bool> {
    let page = page_size();
    let mut vec = vec![0u8; piece.len().div_ceil(page)];
    // SAFETY: `piece` lies inside one live mapping and starts on a page boundary; `vec` has one byte
    // per page of it, as mincore requires.
    let rc = unsafe {
        libc::mincore(
            piece.as_ptr() as *mut _,
            piece.len(),
            vec.as_mut_ptr() as *mut _,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(vec.iter().all(|v| v & 1 == 1))
}

fn page_size() -> usize {
    // SAFETY: sysconf has no preconditions.
    match unsafe { libc::sysconf(libc::_SC_PAGESIZE) } {
        n if n > 0 => n as usize,
        _ => 4096,
    }
}

/// Map `piece`'s pages in, read-only, reading them from disk if needed. Kernels before 5.14 lack the
/// advice: then one byte per page is read instead (a page fault each, same result).
pub(crate) fn populate(piece: &[u8]) -> std::io::Result<()> {
    #[cfg(target_os = "linux")]
    {
        // SAFETY: advice on pages inside one live mapping; POPULATE_READ never changes their contents.
        let rc = unsafe {
            libc::madvise(
                piece.as_ptr() as *mut _,
                piece.len(),
                libc::MADV_POPULATE_READ,
            )
        };
        if rc == 0 {
            return Ok(());
        }
        let err = std::io::Error::last_os_error();
        if err.raw_os_error() != Some(libc::EINVAL) {
            return Err(err);
        }
    }
    let mut sum = 0u8;
    for page in piece.chunks(page_size()) {
        // SAFETY: a read of an in-bounds byte of the mapping; volatile so it is not optimised away.
        sum = sum.wrapping_add(unsafe { std::ptr::read_volatile(page.as_ptr()) });
    }
    std::hint::black_box(sum);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::reader::SafetensorsFile;
    use std::io::Write;
    use std::os::unix::io::AsRawFd;

    #[test]
    fn page_cache_holds_says_what_is_cached() {
        let (f, bytes) = file_of(1 << 20);
        let file = f.as_file();
        let len = bytes.len() as u64;
        let Some(all) = page_cache_holds(file, 0, len) else {
            return; // a kernel before 6.5: the callers take it as "don't know"
        };
        assert!(all, "a file just written is cached");
        assert_eq!(page_cache_holds(file, 5, 0), Some(true));
        evict(&f);
        assert_eq!(page_cache_holds(file, 0, len), Some(false));
        assert_eq!(page_cache_holds(file, 4096 + 100, 10), Some(false));
        assert!(std::fs::read(f.path()).unwrap() == bytes);
        assert_eq!(page_cache_holds(file, 0, len), Some(true));
    }

    /// A valid safetensors file of one U8 tensor of `n` bytes (a pattern, not zeros), flushed to disk.
    fn file_of(n: usize) -> (tempfile::NamedTempFile, Vec<u8>) {
        let json = format!(r#"{{"t":{{"dtype":"U8","shape":[{n}],"data_offsets":[0,{n}]}}}}"#);
        let mut header = json.into_bytes();
        while (8 + header.len()) % 8 != 0 {
            header.push(b' ');
        }
        let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
        bytes.extend_from_slice(&header);
        bytes.extend((0..n).map(|i| (i * 31 + 7) as u8));
        let mut f = tempfile::NamedTempFile::new().unwrap();
        f.write_all(&bytes).unwrap();
        f.as_file().sync_all().unwrap();
        (f, bytes)
    }

    /// Evict the file's pages from the page cache; whether the kernel did is for `resident` to say.
    fn evict(f: &tempfile::NamedTempFile) {
        // SAFETY: fadvise on an open descriptor.
        unsafe { libc::posix_fadvise(f.as_file().as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
    }

    fn all_resident(map: &[u8]) -> bool {
        (0..map.len().div_ceil(PIECE)).all(|i| resident(piece_of(map, i)).unwrap())
    }

    #[test]
    fn cold_file_is_read_whole_on_several_threads_and_keeps_its_bytes() {
        let (f, bytes) = file_of(3 * PIECE + 12345);
        evict(&f);
        let file = SafetensorsFile::open(f.path()).unwrap();
        let was_resident = all_resident(file.bytes());
        let state = Prefetch::new();
        prefetch(file.bytes(), f.path(), COLD_THREADS, &state).unwrap();
        // On a file system without a page cache to evict from (tmpfs), the file stays warm.
        assert_eq!(state.is_cold(), !was_resident);
        if state.is_cold() {
            assert!(all_resident(file.bytes()));
        }
        assert_eq!(file.bytes(), &bytes[..]);
    }

    #[test]
    fn once_cold_the_callers_stop_is_ignored() {
        let (f, _) = file_of(2 * PIECE);
        let file = SafetensorsFile::open(f.path()).unwrap();
        let state = Prefetch::new();
        state.cold.store(true, Ordering::Relaxed);
        state.stop.store(true, Ordering::Relaxed);
        assert!(!state.should_stop());
        prefetch(file.bytes(), f.path(), COLD_THREADS, &state).unwrap();
        assert!(all_resident(file.bytes()));
        // A stop given before the prefetch began does not hide a file that is not in memory.
        let (g, _) = file_of(2 * PIECE);
        evict(&g);
        let file = SafetensorsFile::open(g.path()).unwrap();
        let cold = !all_resident(file.bytes());
        let state = Prefetch::new();
        state.stop.store(true, Ordering::Relaxed);
        prefetch(file.bytes(), g.path(), COLD_THREADS, &state).unwrap();
        assert_eq!(state.is_cold(), cold);
        assert!(all_resident(file.bytes()));
    }

    #[test]
    fn the_sample_finds_an_evicted_file_cold_and_a_warm_one_warm() {
        let (f, _) = file_of(3 * PIECE + 100);
        let file = SafetensorsFile::open(f.path()).unwrap();
        let warm = Prefetch::new();
        assert!(!sample_cold(file.bytes(), f.path(), &warm).unwrap());
        assert!(!warm.is_cold());
        evict(&f);
        let cold = Prefetch::new();
        // On a file system without a page cache to evict from (tmpfs), the file stays warm.
        let evicted = !all_resident(file.bytes());
        assert_eq!(sample_cold(file.bytes(), f.path(), &cold).unwrap(), evicted);
        assert_eq!(cold.is_cold(), evicted);
    }

    #[test]
    fn warm_file_stays_on_one_thread_and_stops_when_told() {
        let (f, bytes) = file_of(2 * PIECE);
        let file = SafetensorsFile::open(f.path()).unwrap();
        let state = Prefetch::new();
        prefetch(file.bytes(), f.path(), COLD_THREADS, &state).unwrap();
        assert!(!state.is_cold(), "a file just written is in the page cache");
        assert!(all_resident(file.bytes()));
        let stopped = Prefetch::new();
        stopped.stop.store(true, Ordering::Relaxed);
        prefetch(file.bytes(), f.path(), COLD_THREADS, &stopped).unwrap();
        assert_eq!(
            stopped.next.load(Ordering::Relaxed),
            0,
            "stopped before the first piece"
        );
        assert_eq!(file.bytes(), &bytes[..]);
    }

    #[test]
    fn only_cold_leaves_a_warm_file_alone() {
        let (f, _) = file_of(2 * PIECE);
        let file = SafetensorsFile::open(f.path()).unwrap();
        let state = Prefetch::only_cold();
        prefetch(file.bytes(), f.path(), COLD_THREADS, &state).unwrap();
        assert!(!state.is_cold());
        assert_eq!(state.next.load(Ordering::Relaxed), 0);
        evict(&f);
        let cold = !all_resident(file.bytes());
        let state = Prefetch::only_cold();
        prefetch(file.bytes(), f.path(), COLD_THREADS, &state).unwrap();
        assert_eq!(state.is_cold(), cold);
        assert!(all_resident(file.bytes()));
    }

    #[test]
    fn abandon_stops_a_cold_prefetch() {
        let (f, _) = file_of(2 * PIECE);
        evict(&f);
        let file = SafetensorsFile::open(f.path()).unwrap();
        let state = Prefetch::new();
        state.abandon.store(true, Ordering::Relaxed);
        prefetch(file.bytes(), f.path(), COLD_THREADS, &state).unwrap();
        assert_eq!(state.next.load(Ordering::Relaxed), 0);
    }

    #[test]
    #[cfg(target_os = "linux")]
    fn file_shrunk_under_the_mapping_is_an_error_naming_it() {
        let (f, _) = file_of(2 * PIECE);
        let file = SafetensorsFile::open(f.path()).unwrap();
        f.as_file().set_len(4096).unwrap();
        let err = prefetch(file.bytes(), f.path(), COLD_THREADS, &Prefetch::new()).unwrap_err();
        assert!(
            matches!(&err, Error::Io { source, .. } if source.raw_os_error() == Some(libc::EFAULT)),
            "{err:?}"
        );
        assert!(
            err.to_string().contains(&f.path().display().to_string()),
            "{err}"
        );
    }
}
