//! Writing pieces of tensors straight into their final place in files that several processes share.
//!
//! A distributed checkpoint is planned before any byte moves: the coordinator lays out each file (the
//! header bytes and every tensor's offset, see [`crate::layout`]), and every rank then writes the
//! chunks it holds to their offsets. A chunk (a block of a tensor: `sizes` starting at `offsets` in a
//! tensor of `shape`, row-major) lands in the file as runs: one run when it spans whole rows of every
//! trailing dimension (a `Shard(0)` slice), otherwise one run per row of its last partial dimension
//! (`Shard(1)`: strided runs). Files are opened without truncation, because other processes write the
//! other runs of the same files at the same time. Reading a block back ([`read_chunks`]) uses the same
//! runs, with positional reads into the caller's buffer.

use std::fs::{File, OpenOptions};
use std::io::{self, IoSliceMut};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use crate::error::{Error, IoContext, Result};

/// Bytes one `pwrite` carries at most: the writer's batch size (see [`crate::writer`]).
const PIECE_BYTES: usize = 1 << 20;

/// Bytes one `pread` of [`read_chunks`] asks for at most, the threads reading at once, and the size
/// from which it uses them.
const READ_PIECE: usize = 4 << 20;
const READ_THREADS: usize = 4;
const PARALLEL_FROM: usize = 8 << 20;
/// Buffers one `preadv` takes at most (the kernel's `IOV_MAX`).
const MAX_IOVECS: usize = 1024;

/// One chunk of one tensor, with its bytes where the caller has them (C-contiguous, `sizes` shaped).
#[derive(Debug, Clone)]
pub struct Chunk<'a> {
    /// The tensor's name, for errors.
    pub name: &'a str,
    pub data: &'a [u8],
    /// Absolute file offset of the whole tensor's first byte.
    pub tensor_offset: u64,
    pub itemsize: usize,
    /// The whole tensor's shape, and where this chunk sits in it.
    pub shape: &'a [usize],
    pub offsets: &'a [usize],
    pub sizes: &'a [usize],
}

/// What one process writes into one file: optionally the header (the coordinator's part), and chunks.
#[derive(Debug, Clone)]
pub struct FileWrites<'a> {
    pub path: &'a Path,
    pub header: Option<&'a [u8]>,
    pub chunks: Vec<Chunk<'a>>,
}

/// A contiguous run: `len` bytes from `src` in the chunk's data to `dst` in the file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Run {
    pub dst: u64,
    pub src: usize,
    pub len: usize,
}

/// Where a chunk sits: the same description for a chunk written from a buffer and one read into it.
#[derive(Debug, Clone, Copy)]
struct Geometry<'a> {
    name: &'a str,
    tensor_offset: u64,
    itemsize: usize,
    shape: &'a [usize],
    offsets: &'a [usize],
    sizes: &'a [usize],
    /// The caller's buffer length, which must be the chunk's size exactly.
    len: usize,
}

/// The runs that place `chunk` in its file, in file order; the chunk's geometry is checked first
/// (inside the tensor, data of the right size), so a bad plan is an error, never a stray write.
pub fn runs(chunk: &Chunk<'_>) -> Result<Vec<Run>> {
    runs_of(Geometry {
        name: chunk.name,
        tensor_offset: chunk.tensor_offset,
        itemsize: chunk.itemsize,
        shape: chunk.shape,
        offsets: chunk.offsets,
        sizes: chunk.sizes,
        len: chunk.data.len(),
    })
}

fn runs_of(g: Geometry<'_>) -> Result<Vec<Run>> {
    let Geometry {
        name,
        shape,
        offsets,
        sizes,
        itemsize,
        ..
    } = g;
    let bad = |reason: String| Error::tensor(name, reason);
    if offsets.len() != shape.len() || sizes.len() != shape.len() {
        return Err(bad(format!(
            "chunk offsets {offsets:?} / sizes {sizes:?} do not match the shape {shape:?}"
        )));
    }
    for d in 0..shape.len() {
        if offsets[d]
            .checked_add(sizes[d])
            .is_none_or(|end| end > shape[d])
        {
            return Err(bad(format!(
                "chunk at {offsets:?} of size {sizes:?} is outside the shape {shape:?}"
            )));
        }
    }
    let numel = sizes
        .iter()
        .try_fold(1usize, |a, &s| a.checked_mul(s))
        .and_then(|n| n.checked_mul(itemsize))
        .ok_or_else(|| bad(format!("chunk size {sizes:?} overflows")))?;
    if numel != g.len {
        return Err(bad(format!(
            "chunk of size {sizes:?} needs {numel} bytes, {} given",
            g.len
        )));
    }
    if numel == 0 {
        return Ok(Vec::new());
    }
    // Element strides of the whole tensor (row-major). The product cannot overflow: the whole tensor
    // was laid out in a file already.
    let mut stride = vec![1usize; shape.len()];
    for d in (0..shape.len().saturating_sub(1)).rev() {
        stride[d] = stride[d + 1] * shape[d + 1];
    }
    // `k`: the outermost dimension from which the chunk is one contiguous block of the tensor (every
    // dimension after it whole). The chunk is then `prod(sizes[..k])` runs of `sizes[k] * stride[k]`.
    let mut k = shape.len();
    while k > 0 && (k == shape.len() || sizes[k] == shape[k]) {
        k -= 1;
    }
    if shape.is_empty() {
        return Ok(vec![Run {
            dst: g.tensor_offset,
            src: 0,
            len: itemsize,
        }]);
    }
    let run_len = sizes[k] * stride[k] * itemsize;
    let count: usize = sizes[..k].iter().product();
    let mut out = Vec::with_capacity(count);
    let mut index = vec![0usize; k];
    for r in 0..count {
        let element: usize = (0..k)
            .map(|d| (offsets[d] + index[d]) * stride[d])
            .sum::<usize>()
            + offsets[k] * stride[k];
        out.push(Run {
            dst: g.tensor_offset + (element * itemsize) as u64,
            src: r * run_len,
            len: run_len,
        });
        // Next index, last dimension fastest.
        for d in (0..k).rev() {
            index[d] += 1;
            if index[d] < sizes[d] {
                break;
            }
            index[d] = 0;
        }
    }
    Ok(out)
}

/// Write every file's header and chunks, files in parallel (one thread each: writes to one file
/// share its inode lock), each file opened without truncation. `fsync`: the file's data is durable
/// when this returns. Returns the bytes written.
pub fn write_files(files: &[FileWrites<'_>], fsync: bool) -> Result<u64> {
    // Plan everything before the first byte moves: a bad chunk anywhere writes nothing.
    let planned: Vec<Vec<(Run, &[u8])>> = files
        .iter()
        .map(|f| {
            let mut all = Vec::new();
            if let Some(h) = f.header {
                all.push((
                    Run {
                        dst: 0,
                        src: 0,
                        len: h.len(),
                    },
                    h,
                ));
            }
            for c in &f.chunks {
                all.extend(runs(c)?.into_iter().map(|r| (r, c.data)));
            }
            Ok(all)
        })
        .collect::<Result<_>>()?;
    let write_one = |(f, runs): (&FileWrites<'_>, &Vec<(Run, &[u8])>)| -> Result<u64> {
        let file = open_shared(f.path)?;
        let mut total = 0u64;
        for (run, data) in runs {
            write_run(&file, &data[run.src..run.src + run.len], run.dst).at(f.path)?;
            total += run.len as u64;
        }
        if fsync {
            file.sync_all().at(f.path)?;
        }
        Ok(total)
    };
    let jobs: Vec<_> = files.iter().zip(&planned).collect();
    if jobs.len() < 2 {
        return jobs.into_iter().map(write_one).sum();
    }
    std::thread::scope(|s| {
        let handles: Vec<_> = jobs
            .into_iter()
            .map(|job| s.spawn(move || write_one(job)))
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().unwrap_or_else(|p| std::panic::resume_unwind(p)))
            .sum()
    })
}

/// A block of a tensor stored in a file, to be read into the caller's buffer (C-contiguous, `sizes`
/// shaped): the reading twin of [`Chunk`]; `shape` is the stored tensor's.
#[derive(Debug)]
pub struct ReadChunk<'a> {
    pub name: &'a str,
    pub data: &'a mut [u8],
    pub tensor_offset: u64,
    pub itemsize: usize,
    pub shape: &'a [usize],
    pub offsets: &'a [usize],
    pub sizes: &'a [usize],
}

/// Read every chunk's block of `path` straight into its buffer with positional reads: one copy, from
/// the page cache into memory the caller already holds (no mapping to fault in). Every geometry is
/// checked before the first read; a file shorter than a run is an `UnexpectedEof` error naming it.
///
/// The runs are put in file order and file-adjacent ones grouped into `preadv` batches of at most
/// [`READ_PIECE`] bytes. From [`PARALLEL_FROM`] bytes on, what the page cache holds is read on the
/// calling thread without waiting for the disk, and the rest is split into [`READ_THREADS`]
/// consecutive stretches of about equal bytes, one reader each: on a file that is not in the page
/// cache that is several large requests in flight at once (4 buffered readers of separate ranges are
/// the fastest plain read of a cold file measured here, see [`crate::prefetch`]).
///
/// `replace_pages`: destinations that are views of a privately mapped file (weights loaded without a
/// copy, then swapped in place) have the pages the reads cover whole handed back to the kernel first
/// (`MADV_DONTNEED`), so that each is written as a fresh page instead of taking a copy-on-write fault
/// that unmaps it (3x faster on the swap measured in the README). Other memory is written in place.
pub fn read_chunks(path: &Path, chunks: &mut [ReadChunk<'_>], replace_pages: bool) -> Result<u64> {
    let planned: Vec<Vec<Run>> = chunks
        .iter()
        .map(|c| {
            runs_of(Geometry {
                name: c.name,
                tensor_offset: c.tensor_offset,
                itemsize: c.itemsize,
                shape: c.shape,
                offsets: c.offsets,
                sizes: c.sizes,
                len: c.data.len(),
            })
        })
        .collect::<Result<_>>()?;
    let file = File::open(path).at(path)?;
    let pagemap = if replace_pages {
        File::open("/proc/self/pagemap").ok()
    } else {
        None
    };
    // (file offset, destination): runs are consecutive slices of their chunk's buffer, in order.
    let mut pieces: Vec<(u64, &mut [u8])> = Vec::new();
    for (chunk, runs) in chunks.iter_mut().zip(&planned) {
        let mut rest: &mut [u8] = &mut *chunk.data;
        for run in runs {
            let (head, tail) = std::mem::take(&mut rest).split_at_mut(run.len);
            rest = tail;
            if replace_pages {
                discard_file_pages(head, pagemap.as_ref());
            }
            for (k, piece) in head.chunks_mut(READ_PIECE).enumerate() {
                pieces.push((run.dst + (k * READ_PIECE) as u64, piece));
            }
        }
    }
    let total: usize = pieces.iter().map(|p| p.1.len()).sum();
    pieces.sort_unstable_by_key(|p| p.0);
    let mut batches = read_batches(pieces);
    let read_all = |stretch: &mut [ReadBatch<'_>]| -> Result<()> {
        for batch in stretch {
            read_batch(&file, batch, false).at(path)?;
        }
        Ok(())
    };
    if total < PARALLEL_FROM {
        read_all(&mut batches)?;
        return Ok(total as u64);
    }
    // What the page cache holds is read here, without waiting on the disk (RWF_NOWAIT): a warm file
    // costs no thread (spawning them, on a cached 8 MiB file, took longer than the copy), and the
    // first read that would wait hands the rest to the parallel readers. RWF_NOWAIT also stops at a
    // cached page marked for read-ahead (a file read before has them): so on a stall the page cache is
    // asked whether it holds the rest, and if it does the rest is read here too.
    let end = batches.last().map_or(0, |b| b.offset + b.len() as u64);
    let mut warm = 0;
    while warm < batches.len() && read_batch(&file, &mut batches[warm], true).at(path)? {
        warm += 1;
    }
    if let Some(stalled) = batches.get(warm) {
        let from = stalled.offset;
        if crate::prefetch::page_cache_holds(&file, from, end - from) == Some(true) {
            read_all(&mut batches[warm..])?;
            return Ok(total as u64);
        }
    }
    let rest = &mut batches[warm..];
    let left: usize = rest.iter().map(ReadBatch::len).sum();
    let share = left.div_ceil(READ_THREADS).max(1);
    let mut stretches: Vec<&mut [ReadBatch<'_>]> = Vec::with_capacity(READ_THREADS);
    let mut rest: &mut [ReadBatch<'_>] = rest;
    while !rest.is_empty() {
        let mut bytes = 0;
        let cut = rest
            .iter()
            .position(|b| {
                bytes += b.len();
                bytes >= share
            })
            .map_or(rest.len(), |i| i + 1);
        let (head, tail) = std::mem::take(&mut rest).split_at_mut(cut);
        stretches.push(head);
        rest = tail;
    }
    std::thread::scope(|s| {
        let handles: Vec<_> = stretches
            .into_iter()
            .map(|stretch| s.spawn(|| read_all(stretch)))
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().unwrap_or_else(|p| std::panic::resume_unwind(p)))
            .collect::<Result<Vec<()>>>()
    })?;
    Ok(total as u64)
}

/// Destinations of file-adjacent bytes, read with one `preadv`: tensors lie back to back in a file,
/// so a swap's many small weights take a few syscalls instead of one each.
struct ReadBatch<'a> {
    offset: u64,
    bufs: Vec<IoSliceMut<'a>>,
}

impl ReadBatch<'_> {
    fn len(&self) -> usize {
        self.bufs.iter().map(|b| b.len()).sum()
    }
}

/// Pieces in file order grouped into batches of at most [`READ_PIECE`] bytes and [`MAX_IOVECS`] buffers.
fn read_batches(pieces: Vec<(u64, &mut [u8])>) -> Vec<ReadBatch<'_>> {
    let mut out: Vec<ReadBatch<'_>> = Vec::new();
    let (mut end, mut bytes) = (u64::MAX, 0usize);
    for (offset, data) in pieces {
        if data.is_empty() {
            continue;
        }
        let len = data.len();
        match out.last_mut() {
            Some(b) if offset == end && bytes + len <= READ_PIECE && b.bufs.len() < MAX_IOVECS => {
                b.bufs.push(IoSliceMut::new(data));
                bytes += len;
            }
            _ => {
                out.push(ReadBatch {
                    offset,
                    bufs: vec![IoSliceMut::new(data)],
                });
                bytes = len;
            }
        }
        end = offset + len as u64;
    }
    out
}

/// Read `batch` whole; with `nowait`, only as far as the page cache holds it (`RWF_NOWAIT`). Returns
/// whether it is whole; what was read is taken off the batch. A kernel without the flag reads nothing.
fn read_batch(file: &File, batch: &mut ReadBatch<'_>, nowait: bool) -> io::Result<bool> {
    let mut first = 0;
    let whole = loop {
        let bufs = &mut batch.bufs[first..];
        if bufs.is_empty() {
            break true;
        }
        let read = if nowait {
            rustix::io::preadv2(file, bufs, batch.offset, rustix::io::ReadWriteFlags::NOWAIT)
        } else {
            rustix::io::preadv(file, bufs, batch.offset)
        };
        match read {
            Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
            Ok(n) => {
                batch.offset += n as u64;
                let count = batch.bufs.len();
                let mut rest = &mut batch.bufs[first..];
                IoSliceMut::advance_slices(&mut rest, n);
                first = count - rest.len();
            }
            Err(rustix::io::Errno::INTR) => {}
            Err(_) if nowait => break false, // EAGAIN: not cached; EOPNOTSUPP / EINVAL: no flag
            Err(e) => return Err(e.into()),
        }
    };
    batch.bufs.drain(..first);
    Ok(whole)
}

/// Give the kernel back the pages lying wholly inside `data` (their content is about to be overwritten)
/// when they are pages of a file mapped privately (weights loaded without a copy): the next write to
/// each then maps a fresh page instead of copying the old one. Anonymous memory is left alone: its
/// pages are written in place, and discarding them would make each write fault. The kind is read from `/proc/self/pagemap` for the first whole page (one 8-byte
/// read). Advisory: memory the kernel will not discard (locked pages) is left as it is.
#[cfg(target_os = "linux")]
fn discard_file_pages(data: &mut [u8], pagemap: Option<&File>) {
    // SAFETY: sysconf has no preconditions.
    let page = match unsafe { libc::sysconf(libc::_SC_PAGESIZE) } {
        n if n > 0 => n as usize,
        _ => return,
    };
    let start = data.as_ptr() as usize;
    let first = start.div_ceil(page) * page;
    let end = (start + data.len()) / page * page;
    if end <= first || !maps_a_file_page(pagemap, first / page) {
        return;
    }
    // SAFETY: [first, end) lies inside `data`, which we hold exclusively and overwrite whole before
    // anyone reads it; discarding changes only what those bytes read as until then.
    unsafe {
        libc::madvise(first as *mut libc::c_void, end - first, libc::MADV_DONTNEED);
    }
}

/// Whether virtual page `index` of this process is present and holds a file's page (pagemap bits 63
/// and 61; see the kernel's admin-guide/mm/pagemap).
#[cfg(target_os = "linux")]
fn maps_a_file_page(pagemap: Option<&File>, index: usize) -> bool {
    let Some(pagemap) = pagemap else {
        return false;
    };
    let mut entry = [0u8; 8];
    match rustix::io::pread(pagemap, &mut entry, (index * 8) as u64) {
        Ok(8) => {
            let bits = u64::from_ne_bytes(entry);
            bits & (1 << 63) != 0 && bits & (1 << 61) != 0
        }
        _ => false,
    }
}

#[cfg(not(target_os = "linux"))]
fn discard_file_pages(_data: &mut [u8], _pagemap: Option<&File>) {}

/// Open (creating it if needed, never truncating) a file that other processes write at the same time.
fn open_shared(path: &Path) -> Result<File> {
    OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o666)
        .open(path)
        .at(path)
}

fn write_run(file: &File, data: &[u8], offset: u64) -> io::Result<()> {
    for (k, piece) in data.chunks(PIECE_BYTES).enumerate() {
        let mut done = 0;
        let at = offset + (k * PIECE_BYTES) as u64;
        while done < piece.len() {
            match rustix::io::pwrite(file, &piece[done..], at + done as u64) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => done += n,
                Err(rustix::io::Errno::INTR) => {}
                Err(e) => return Err(e.into()),
            }
        }
    }
    Ok(())
}

/// Publish a written checkpoint directory: `staging` becomes `target` in one rename, swapping out a
/// previous `target` atomically where the file system can (see [`crate::checkpoint`]). `fsync`: the
/// staged files and directory are flushed first, and the parent after the rename.
pub fn publish_dir(staging: &Path, target: &Path, fsync: bool) -> Result<PathBuf> {
    if fsync {
        for entry in std::fs::read_dir(staging).at(staging)? {
            let path = entry.at(staging)?.path();
            if path.is_file() {
                File::open(&path).and_then(|f| f.sync_all()).at(&path)?;
            }
        }
        File::open(staging).and_then(|d| d.sync_all()).at(staging)?;
    }
    crate::checkpoint::replace_dir(staging, target)?;
    if fsync {
        crate::atomic::sync_parent_dir(target)?;
    }
    Ok(target.to_path_buf())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Write every chunk of a tensor cut into blocks, check the file holds the tensor's bytes.
    fn assemble(shape: &[usize], cuts: &[Vec<(usize, usize)>], itemsize: usize) {
        let numel: usize = shape.iter().product();
        let whole: Vec<u8> = (0..numel * itemsize).map(|i| (i * 7 + 3) as u8).collect();
        let header = b"HEADER..".to_vec();
        let mut stride = vec![1usize; shape.len()];
        for d in (0..shape.len().saturating_sub(1)).rev() {
            stride[d] = stride[d + 1] * shape[d + 1];
        }
        // The chunk's own bytes, gathered element by element from the whole tensor (the oracle).
        let mut datas = Vec::new();
        let mut geoms = Vec::new();
        for cut in cuts {
            let offsets: Vec<usize> = cut.iter().map(|c| c.0).collect();
            let sizes: Vec<usize> = cut.iter().map(|c| c.1).collect();
            let n: usize = sizes.iter().product();
            let mut data = Vec::with_capacity(n * itemsize);
            for e in 0..n {
                let mut rem = e;
                let mut at = 0;
                for d in (0..sizes.len()).rev() {
                    at += (offsets[d] + rem % sizes[d]) * stride[d];
                    rem /= sizes[d];
                }
                data.extend_from_slice(&whole[at * itemsize..(at + 1) * itemsize]);
            }
            datas.push(data);
            geoms.push((offsets, sizes));
        }
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        // One "rank" per chunk, the first also writing the header, like the plugin does.
        for (i, (data, (offsets, sizes))) in datas.iter().zip(&geoms).enumerate() {
            let files = [FileWrites {
                path: &path,
                header: (i == 0).then_some(header.as_slice()),
                chunks: vec![Chunk {
                    name: "t",
                    data,
                    tensor_offset: header.len() as u64,
                    itemsize,
                    shape,
                    offsets,
                    sizes,
                }],
            }];
            write_files(&files, false).unwrap();
        }
        let got = std::fs::read(&path).unwrap();
        assert_eq!(&got[..header.len()], header.as_slice());
        assert!(
            got[header.len()..] == whole[..],
            "shape {shape:?} cuts {cuts:?}"
        );
        // Reading each block back gives the chunk's own bytes.
        for (data, (offsets, sizes)) in datas.iter().zip(&geoms) {
            let mut back = vec![0u8; data.len()];
            let mut chunks = [ReadChunk {
                name: "t",
                data: &mut back,
                tensor_offset: header.len() as u64,
                itemsize,
                shape,
                offsets,
                sizes,
            }];
            read_chunks(&path, &mut chunks, false).unwrap();
            assert!(back == *data, "read back {offsets:?} {sizes:?}");
        }
    }

    #[test]
    fn large_reads_give_the_same_bytes_from_the_cache_from_disk_and_from_both() {
        // Cached: read on the calling thread; evicted: by the parallel readers; evicted from the
        // middle on: the cached part here (a batch cut where the cache ends), the rest in parallel.
        large_reads(false, None);
        large_reads(false, Some(0));
        large_reads(false, Some((6 << 20) + 4096 * 3));
    }

    #[test]
    fn a_cached_file_read_before_by_read_ahead_gives_the_same_bytes() {
        // Its pages carry read-ahead marks, where RWF_NOWAIT stops although they are cached: the rest
        // is found cached and read on the calling thread.
        large_reads_after(false, Some(0), true);
    }

    #[test]
    fn reads_into_discarded_pages_give_the_same_bytes() {
        // Destinations full of other bytes: the pages discarded first are all rewritten.
        large_reads(true, None);
        large_reads(true, Some(0));
    }

    fn large_reads(replace_pages: bool, evict_from: Option<usize>) {
        large_reads_after(replace_pages, evict_from, false);
    }

    /// Drop the page cache of `path` from `from` on (written back first, so the pages can go).
    fn evict(path: &Path, from: usize) {
        use std::os::fd::AsRawFd;
        let file = File::open(path).unwrap();
        file.sync_all().unwrap();
        // SAFETY: a plain syscall on a descriptor we own.
        let rc = unsafe {
            libc::posix_fadvise(
                file.as_raw_fd(),
                from as libc::off_t,
                0,
                libc::POSIX_FADV_DONTNEED,
            )
        };
        assert_eq!(rc, 0);
    }

    #[test]
    fn reads_into_a_private_file_mapping_replace_its_pages_and_leave_the_file() {
        // Weights loaded without a copy: the destination is a private mapping of another file, its
        // pages read (mapped). The whole pages are discarded and rewritten; the partial first and last
        // ones take the copy-on-write path; the mapped file never changes.
        let len = 5 * 4096 + 100;
        let old: Vec<u8> = (0..len).map(|i| (i % 251) as u8).collect();
        let new: Vec<u8> = (0..len + 16).map(|i| (i % 241) as u8 ^ 0x5a).collect();
        let dir = tempfile::tempdir().unwrap();
        let (old_path, new_path) = (dir.path().join("old"), dir.path().join("new"));
        std::fs::write(&old_path, &old).unwrap();
        std::fs::write(&new_path, &new).unwrap();
        let file = File::open(&old_path).unwrap();
        // SAFETY: a private mapping of a file this test alone uses.
        let mut map = unsafe { memmap2::MmapOptions::new().map_copy(&file).unwrap() };
        assert!(map[..] == old[..]); // reads every page: all mapped
        let (shape, at0) = ([len - 60], [0]);
        let mut chunks = [ReadChunk {
            name: "t",
            data: &mut map[50..len - 10],
            tensor_offset: 16,
            itemsize: 1,
            shape: &shape,
            offsets: &at0,
            sizes: &shape,
        }];
        read_chunks(&new_path, &mut chunks, true).unwrap();
        assert!(map[..50] == old[..50]);
        assert!(map[50..len - 10] == new[16..16 + len - 60]);
        assert!(map[len - 10..] == old[len - 10..]);
        assert_eq!(std::fs::read(&old_path).unwrap(), old);
    }

    fn large_reads_after(replace_pages: bool, evict_from: Option<usize>, read_first: bool) {
        // 3 tensors in one file: a 10 MiB one (pieces of 4 MiB), 64 small ones, a column block of a
        // third (strided runs); destinations given out of file order. Over PARALLEL_FROM in all.
        let big = 10 << 20;
        let small = 64 * 1024;
        let (rows, cols) = (512usize, 1024usize);
        let len = 16 + big + 64 * small + rows * cols;
        let whole: Vec<u8> = (0..len).map(|i| (i * 13 + i / 4099) as u8).collect();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        std::fs::write(&path, &whole).unwrap();
        if let Some(from) = evict_from {
            evict(&path, from);
        }
        if read_first {
            assert!(std::fs::read(&path).unwrap() == whole);
        }
        let mut big_buf = vec![0xABu8; big];
        let mut small_bufs = vec![vec![0xABu8; small]; 64];
        let mut block = vec![0xABu8; rows * 100];
        let strided_at = 16 + big + 64 * small;
        let (shape, at0, at300, at924, block_sizes) =
            ([rows, cols], [0, 0], [0, 300], [0, 924], [rows, 100]);
        let (small_shape, big_shape) = ([small / 4], [big / 2]);
        let mut chunks = vec![ReadChunk {
            name: "block",
            data: &mut block,
            tensor_offset: strided_at as u64,
            itemsize: 1,
            shape: &shape,
            offsets: &at300,
            sizes: &block_sizes,
        }];
        for (i, buf) in small_bufs.iter_mut().enumerate().rev() {
            chunks.push(ReadChunk {
                name: "small",
                data: buf,
                tensor_offset: (16 + big + i * small) as u64,
                itemsize: 4,
                shape: &small_shape,
                offsets: &at0[..1],
                sizes: &small_shape,
            });
        }
        chunks.push(ReadChunk {
            name: "big",
            data: &mut big_buf,
            tensor_offset: 16,
            itemsize: 2,
            shape: &big_shape,
            offsets: &at0[..1],
            sizes: &big_shape,
        });
        assert_eq!(
            read_chunks(&path, &mut chunks, replace_pages).unwrap(),
            (len - 16 - rows * 924) as u64
        );
        drop(chunks);
        assert!(big_buf[..] == whole[16..16 + big]);
        for (i, buf) in small_bufs.iter().enumerate() {
            let at = 16 + big + i * small;
            assert!(buf[..] == whole[at..at + small], "small {i}");
        }
        for r in 0..rows {
            let at = strided_at + r * cols + 300;
            assert!(
                block[r * 100..(r + 1) * 100] == whole[at..at + 100],
                "row {r}"
            );
        }
        // The same reads from a file cut short: an error naming the file, from whichever reader met it.
        std::fs::write(&path, &whole[..len - 1]).unwrap();
        let mut again = vec![0u8; big];
        let mut tail = vec![0u8; rows * 100];
        let mut chunks = [
            ReadChunk {
                name: "big",
                data: &mut again,
                tensor_offset: 16,
                itemsize: 2,
                shape: &big_shape,
                offsets: &at0[..1],
                sizes: &big_shape,
            },
            ReadChunk {
                name: "block",
                data: &mut tail,
                tensor_offset: strided_at as u64,
                itemsize: 1,
                shape: &shape,
                offsets: &at924,
                sizes: &block_sizes,
            },
        ];
        let err = read_chunks(&path, &mut chunks, false).unwrap_err();
        assert!(
            matches!(&err, Error::Io { source, .. } if source.kind() == io::ErrorKind::UnexpectedEof),
            "{err:?}"
        );
        assert!(err.to_string().contains(&path.display().to_string()));
    }

    #[test]
    fn row_slices_column_slices_and_blocks_assemble_the_tensor() {
        assemble(&[6, 4], &[vec![(0, 3), (0, 4)], vec![(3, 3), (0, 4)]], 4);
        assemble(&[6, 4], &[vec![(0, 6), (0, 1)], vec![(0, 6), (1, 3)]], 2);
        assemble(
            &[4, 6],
            &[
                vec![(0, 2), (0, 3)],
                vec![(0, 2), (3, 3)],
                vec![(2, 2), (0, 3)],
                vec![(2, 2), (3, 3)],
            ],
            1,
        );
        // 3-d, split in the middle dimension; uneven rows with an empty chunk; 1-d; 0-d.
        assemble(
            &[2, 5, 3],
            &[vec![(0, 2), (0, 2), (0, 3)], vec![(0, 2), (2, 3), (0, 3)]],
            4,
        );
        assemble(
            &[3, 2],
            &[
                vec![(0, 2), (0, 2)],
                vec![(2, 1), (0, 2)],
                vec![(3, 0), (0, 2)],
            ],
            8,
        );
        assemble(&[5], &[vec![(0, 2)], vec![(2, 3)]], 2);
        assemble(&[], &[vec![]], 4);
    }

    #[test]
    fn a_chunk_outside_its_tensor_or_of_the_wrong_size_writes_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        let data = [0u8; 16];
        let chunk = |offsets: &'static [usize], sizes: &'static [usize]| Chunk {
            name: "w",
            data: &data,
            tensor_offset: 8,
            itemsize: 4,
            shape: &[4],
            offsets,
            sizes,
        };
        for (offsets, sizes) in [(&[1usize][..], &[4usize][..]), (&[0][..], &[3][..])] {
            let files = [FileWrites {
                path: &path,
                header: Some(b"x"),
                chunks: vec![chunk(offsets, sizes)],
            }];
            let err = write_files(&files, false).unwrap_err();
            assert!(err.to_string().contains("tensor `w`"), "{err}");
            assert!(!path.exists());
        }
    }

    #[test]
    fn column_chunks_are_strided_runs() {
        let data = [0u8; 6 * 2 * 4];
        let c = Chunk {
            name: "t",
            data: &data,
            tensor_offset: 100,
            itemsize: 4,
            shape: &[6, 4],
            offsets: &[0, 2],
            sizes: &[6, 2],
        };
        let r = runs(&c).unwrap();
        assert_eq!(r.len(), 6);
        assert_eq!(
            r[1],
            Run {
                dst: 100 + (4 + 2) * 4,
                src: 8,
                len: 8
            }
        );
    }
}
