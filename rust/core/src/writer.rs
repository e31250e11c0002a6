//! Writes a safetensors file from caller-owned buffers: the layout is planned first (so the header is
//! final before any data moves), the temp file is sized up front, and the tensor bytes go straight from
//! the caller's memory to the file with positional vectored writes (`pwritev`) of about 8 MiB, from the
//! calling thread or (`WriteOptions::parallel`) from rayon's pool. Nothing is copied into an
//! intermediate buffer. Writeback is left to the kernel unless an fsync follows.

use std::collections::HashMap;
use std::fs::File;
use std::io::{self, IoSlice};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use rayon::prelude::*;
use safetensors::Dtype;

use crate::atomic::PendingFile;
use crate::error::{Error, Result};
use crate::layout::{plan, Layout, TensorMeta};

/// One tensor to write: its bytes stay where the caller has them.
#[derive(Debug, Clone)]
pub struct TensorRef<'a> {
    pub name: String,
    pub dtype: Dtype,
    pub shape: Vec<usize>,
    pub data: &'a [u8],
}

impl TensorRef<'_> {
    /// What the layout needs to know of this tensor.
    pub fn meta(&self) -> TensorMeta {
        TensorMeta {
            name: self.name.clone(),
            dtype: self.dtype,
            shape: self.shape.clone(),
            nbytes: self.data.len(),
        }
    }
}

/// Called with (tensor index in the input, byte offset within that tensor, bytes) for every piece,
/// on the thread that writes it, just before it is written: the bytes are then hot in cache, which makes
/// checksumming while copying nearly free.
pub type PieceObserver = Arc<dyn Fn(usize, usize, &[u8]) + Send + Sync>;

#[derive(Clone, Default)]
pub struct WriteOptions {
    /// fsync the file before it is renamed into place and the directory after.
    pub fsync: bool,
    /// Incremented by the number of bytes written as the writes complete, so that another thread can
    /// show progress while this one holds no lock anyone waits on.
    pub progress: Option<Arc<AtomicU64>>,
    pub observer: Option<PieceObserver>,
    /// Write batches from rayon's pool instead of the calling thread. Off by default: Linux file systems
    /// (ext4, xfs, btrfs) serialise buffered writes to one file on its inode lock, so a second writer
    /// only spins; measured on ext4 (2 cores, 160 MB adapter, rounds interleaved with other writers),
    /// one thread took 64-82 ms per save and two took ~200 ms. Worth it where writes do not share a lock.
    pub parallel: bool,
}

impl std::fmt::Debug for WriteOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WriteOptions")
            .field("fsync", &self.fsync)
            .field("progress", &self.progress)
            .field("observer", &self.observer.is_some())
            .field("parallel", &self.parallel)
            .finish()
    }
}

/// Bytes one `pwritev` call carries at most (and the unit of writeback and of parallel work): 1 MiB,
/// the size safetensors' own writer uses. Measured on our ext4 VM (2048 x 256 KiB tensors, interleaved
/// with other writers): 8 MiB batches had recurring rounds 3-4x slower than the rest, 1 MiB none
/// (214-282 ms against PEFT's ~437 ms). The likely cause is the kernel allocating larger page-cache
/// folios for larger writes and stalling on them; we did not prove it.
const BATCH_BYTES: usize = 1 << 20;
/// Linux's IOV_MAX.
const MAX_IOVECS: usize = 1024;
/// Below this, thread hand-off costs more than it saves.
const PARALLEL_MIN_BYTES: u64 = 4 << 20;

/// Plan, write and stage `tensors` as the new content of `target`. The caller publishes the result with
/// [`PendingFile::commit`] (or drops it to discard).
pub fn write_safetensors(
    target: &Path,
    tensors: &[TensorRef<'_>],
    metadata: Option<HashMap<String, String>>,
    options: WriteOptions,
) -> Result<PendingFile> {
    let metas: Vec<TensorMeta> = tensors.iter().map(TensorRef::meta).collect();
    let layout = plan(&metas, metadata)?;
    let pending = PendingFile::create(target, options.fsync)?;
    write_layout(pending.file(), &layout, tensors, &options).map_err(|e| Error::io(target, e))?;
    Ok(pending)
}

/// One file for [`write_safetensors_files`].
#[derive(Debug, Clone)]
pub struct NewFile<'a> {
    pub target: std::path::PathBuf,
    pub tensors: Vec<TensorRef<'a>>,
    pub metadata: Option<HashMap<String, String>>,
}

/// [`write_safetensors`] for several files, up to `threads` of them at once, largest first: separate
/// files do not share an inode lock, so the shards of a model are written in parallel where the writes
/// into one file would take turns. Every file is staged, or none: after a failure the files already
/// staged are discarded. The caller commits them.
pub fn write_safetensors_files(
    files: &[NewFile<'_>],
    options: &WriteOptions,
    threads: usize,
) -> Result<Vec<PendingFile>> {
    let sizes: Vec<u64> = files
        .iter()
        .map(|f| f.tensors.iter().map(|t| t.data.len() as u64).sum())
        .collect();
    crate::parallel::largest_first(&sizes, threads, |i| {
        let f = &files[i];
        write_safetensors(&f.target, &f.tensors, f.metadata.clone(), options.clone())
    })
}

/// Plan, write and publish in one call.
pub fn save_safetensors(
    target: &Path,
    tensors: &[TensorRef<'_>],
    metadata: Option<HashMap<String, String>>,
    options: WriteOptions,
) -> Result<()> {
    write_safetensors(target, tensors, metadata, options)?.commit()
}

fn write_layout(
    file: &File,
    layout: &Layout,
    tensors: &[TensorRef<'_>],
    options: &WriteOptions,
) -> io::Result<()> {
    preallocate(file, layout.total_len)?;

    let batches = batch(&pieces(layout, tensors));

    let write = |b: &Batch<'_>| {
        if let Some(observe) = &options.observer {
            for (slice, source) in b.slices.iter().zip(&b.sources) {
                if let Some((tensor, within)) = *source {
                    observe(tensor, within, slice);
                }
            }
        }
        write_batch(file, b)?;
        if options.fsync {
            start_writeback(file, b);
        }
        if let Some(counter) = &options.progress {
            counter.fetch_add(
                b.slices.iter().map(|s| s.len() as u64).sum(),
                Ordering::Relaxed,
            );
        }
        Ok(())
    };
    if !options.parallel || layout.total_len < PARALLEL_MIN_BYTES {
        batches.iter().try_for_each(write)
    } else {
        batches.par_iter().try_for_each(write)
    }
}

/// The header and every tensor's bytes at their file offsets, in file order, cut at every multiple of
/// `BATCH_BYTES` in the file (so that each batch fills whole page-cache folios, see `batch`; this also
/// spreads one big tensor over all threads).
fn pieces<'a>(layout: &'a Layout, tensors: &[TensorRef<'a>]) -> Vec<Piece<'a>> {
    let mut pieces: Vec<Piece<'_>> = Vec::with_capacity(tensors.len() + 1);
    pieces.push(Piece {
        offset: 0,
        data: &layout.header,
        source: None,
    });
    for &i in &layout.order {
        let (start, data) = (layout.offsets[i], tensors[i].data);
        let mut within = 0;
        while within < data.len() {
            let offset = start + within as u64;
            let room = BATCH_BYTES - (offset % BATCH_BYTES as u64) as usize;
            let end = data.len().min(within + room);
            pieces.push(Piece {
                offset,
                data: &data[within..end],
                source: Some((i, within)),
            });
            within = end;
        }
    }
    pieces
}

/// Write `data` as the whole content of `file` (a file image already laid out in memory, e.g. a
/// checkpoint snapshot) in the same 1 MiB `pwritev` batches. `writeback`: start each batch's
/// writeback at once, worth it only when an fsync follows (it then overlaps the copying); otherwise
/// the data is left to the page cache, which is as fast as a write can be.
pub fn write_image(file: &File, data: &[u8], writeback: bool) -> io::Result<()> {
    preallocate(file, data.len() as u64)?;
    for (k, chunk) in data.chunks(BATCH_BYTES).enumerate() {
        let b = Batch {
            offset: (k * BATCH_BYTES) as u64,
            slices: vec![chunk],
            sources: vec![None],
        };
        write_batch(file, &b)?;
        if writeback {
            start_writeback(file, &b);
        }
    }
    Ok(())
}

/// Size the file up front (so the parallel writes land in a file of its final length) without
/// reserving blocks. `fallocate` would reserve them and write faster, but on ext4 a file whose blocks
/// are allocated before the data is written is not flushed when it is renamed over an old one (the
/// `auto_da_alloc` replace-via-rename rule covers only delayed allocation): after a power cut the new
/// name could hold a file of zeros. With delayed allocation we keep what PEFT's plain writes get: the
/// old file or the new one. `fsync=True` makes the save durable either way.
fn preallocate(file: &File, len: u64) -> io::Result<()> {
    file.set_len(len)
}

/// A contiguous run of bytes at a file offset, and which input tensor (and where in it) it comes from.
#[derive(Clone, Copy)]
struct Piece<'a> {
    offset: u64,
    data: &'a [u8],
    source: Option<(usize, usize)>,
}

/// A run of pieces that are adjacent in the file, written by one `pwritev`.
struct Batch<'a> {
    offset: u64,
    slices: Vec<&'a [u8]>,
    sources: Vec<Option<(usize, usize)>>,
}

/// Group file-adjacent pieces (tensors are stored back to back) into batches: each batch is the part of
/// one `BATCH_BYTES`-aligned block of the file that the pieces cover (no piece crosses such a boundary).
/// The file's data starts after the header, at no particular alignment; batches of `BATCH_BYTES` cut
/// from there end inside a page-cache folio, which the kernel zero-fills beyond the write (a new file's
/// pages hold no data) before the next batch overwrites it. Measured on ext4 with large folios (an
/// adapter of 112 tensors behind a 13 KB header): cut from the data start, the batches took longer than
/// one `write()` of the same bytes; cut at the file's boundaries, no longer.
fn batch<'a>(pieces: &[Piece<'a>]) -> Vec<Batch<'a>> {
    let mut out: Vec<Batch<'a>> = Vec::new();
    let mut end = u64::MAX;
    for &Piece {
        offset,
        data,
        source,
    } in pieces
    {
        if data.is_empty() {
            continue;
        }
        let block = BATCH_BYTES as u64;
        let extend = match out.last() {
            Some(b) => {
                offset == end && offset / block == b.offset / block && b.slices.len() < MAX_IOVECS
            }
            None => false,
        };
        if extend {
            let last = out.last_mut().expect("checked above");
            last.slices.push(data);
            last.sources.push(source);
        } else {
            out.push(Batch {
                offset,
                slices: vec![data],
                sources: vec![source],
            });
        }
        end = offset + data.len() as u64;
    }
    out
}

/// Before an fsync: ask the kernel to start writing this batch to disk now, without waiting, so that
/// the I/O overlaps the copying of the next batches instead of all of it waiting in the fsync.
/// Without an fsync the writeback is left to the kernel, as a plain `write()` leaves it: starting it
/// batch by batch made a save into a new directory up to 2x slower than one `write()` of the same bytes
/// (block allocation and I/O submission on the writing thread). Replacing a file needs no early start
/// for its safety either: ext4's `auto_da_alloc` orders the new file's data before the rename's commit.
/// Advisory: failures are ignored, the data is still in the file.
#[cfg(target_os = "linux")]
fn start_writeback(file: &File, batch: &Batch<'_>) {
    use std::os::fd::AsRawFd;
    let len: usize = batch.slices.iter().map(|s| s.len()).sum();
    // SAFETY: a plain syscall on a file descriptor we own; no memory is passed.
    unsafe {
        libc::sync_file_range(
            file.as_raw_fd(),
            batch.offset as libc::off64_t,
            len as libc::off64_t,
            libc::SYNC_FILE_RANGE_WRITE,
        );
    }
}

#[cfg(not(target_os = "linux"))]
fn start_writeback(_file: &File, _batch: &Batch<'_>) {}

fn write_batch(file: &File, batch: &Batch<'_>) -> io::Result<()> {
    let mut iovecs: Vec<IoSlice<'_>> = batch.slices.iter().map(|s| IoSlice::new(s)).collect();
    let mut slices: &mut [IoSlice<'_>] = &mut iovecs;
    let mut offset = batch.offset;
    while !slices.is_empty() {
        match rustix::io::pwritev(file, slices, offset) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => {
                offset += n as u64;
                IoSlice::advance_slices(&mut slices, n);
            }
            Err(rustix::io::Errno::INTR) => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bytes(n: usize, seed: u8) -> Vec<u8> {
        (0..n)
            .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
            .collect()
    }

    fn oracle(tensors: &[TensorRef<'_>], md: Option<HashMap<String, String>>) -> Vec<u8> {
        let views: Vec<_> = tensors
            .iter()
            .map(|t| {
                (
                    t.name.clone(),
                    safetensors::tensor::TensorView::new(t.dtype, t.shape.clone(), t.data).unwrap(),
                )
            })
            .collect();
        safetensors::serialize(views, md).unwrap()
    }

    #[test]
    fn file_is_byte_identical_to_the_safetensors_crate() {
        // Sizes that cross the batch size, many small tensors that get coalesced, and empty ones.
        let big = bytes(BATCH_BYTES * 2 + 12, 1);
        let small: Vec<Vec<u8>> = (0..1500).map(|i| bytes(64, i as u8)).collect();
        let mut tensors = vec![
            TensorRef {
                name: "big".into(),
                dtype: Dtype::F32,
                shape: vec![big.len() / 4],
                data: &big,
            },
            TensorRef {
                name: "empty".into(),
                dtype: Dtype::BF16,
                shape: vec![0, 3],
                data: &[],
            },
        ];
        for (i, s) in small.iter().enumerate() {
            tensors.push(TensorRef {
                name: format!("layer.{i}.w"),
                dtype: if i % 3 == 0 { Dtype::BF16 } else { Dtype::F32 },
                shape: vec![if i % 3 == 0 { 32 } else { 16 }],
                data: s,
            });
        }
        let md: HashMap<String, String> = [("format".to_string(), "pt".to_string())].into();
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("m.safetensors");
        let progress = Arc::new(AtomicU64::new(0));
        let observed = Arc::new(std::sync::Mutex::new(Vec::new()));
        let seen = observed.clone();
        save_safetensors(
            &target,
            &tensors,
            Some(md.clone()),
            WriteOptions {
                fsync: true,
                parallel: true,
                progress: Some(progress.clone()),
                observer: Some(Arc::new(move |i, within, bytes: &[u8]| {
                    seen.lock().unwrap().push((i, within, bytes.len()));
                })),
            },
        )
        .unwrap();
        let written = std::fs::read(&target).unwrap();
        assert!(written == oracle(&tensors, Some(md.clone())));
        assert_eq!(progress.load(Ordering::Relaxed), written.len() as u64);
        // Leaving the writeback to the kernel (no fsync) changes when the bytes reach the disk, not which.
        let lazy = dir.path().join("lazy.safetensors");
        save_safetensors(&lazy, &tensors, Some(md), WriteOptions::default()).unwrap();
        assert!(std::fs::read(&lazy).unwrap() == written);
        // The observer saw every tensor byte exactly once, in pieces that tile each tensor.
        let mut observed = observed.lock().unwrap().clone();
        observed.sort_unstable();
        for (i, t) in tensors.iter().enumerate() {
            let mut next = 0;
            for &(_, within, len) in observed.iter().filter(|o| o.0 == i) {
                assert_eq!(within, next, "tensor {i}");
                next += len;
            }
            assert_eq!(next, t.data.len(), "tensor {i}");
        }
    }

    #[test]
    fn overwrite_keeps_old_file_until_commit_and_failure_leaves_it() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("m.safetensors");
        let a = bytes(16, 0);
        let t = |data| TensorRef {
            name: "a".into(),
            dtype: Dtype::U8,
            shape: vec![16],
            data,
        };
        save_safetensors(&target, &[t(&a)], None, WriteOptions::default()).unwrap();
        let before = std::fs::read(&target).unwrap();

        let b = bytes(16, 9);
        let pending = write_safetensors(&target, &[t(&b)], None, WriteOptions::default()).unwrap();
        assert_eq!(std::fs::read(&target).unwrap(), before);
        pending.commit().unwrap();
        assert_ne!(std::fs::read(&target).unwrap(), before);

        // A tensor whose size does not fit its shape: refused before anything is created.
        let after = std::fs::read(&target).unwrap();
        let wrong = TensorRef {
            name: "bad".into(),
            dtype: Dtype::F32,
            shape: vec![3],
            data: &b,
        };
        let err = save_safetensors(&target, &[wrong], None, WriteOptions::default()).unwrap_err();
        assert!(err.to_string().contains("tensor `bad`"), "{err}");
        assert_eq!(std::fs::read(&target).unwrap(), after);
        let leftovers = std::fs::read_dir(dir.path()).unwrap().count();
        assert_eq!(leftovers, 1);
    }

    #[test]
    fn several_files_at_once_are_each_the_crates_bytes_or_none_is_staged() {
        let data: Vec<Vec<u8>> = (0..5)
            .map(|i| bytes(BATCH_BYTES + i * 4096, i as u8))
            .collect();
        let dir = tempfile::tempdir().unwrap();
        let file = |i: usize, dtype: Dtype| NewFile {
            target: dir.path().join(format!("shard-{i}.safetensors")),
            tensors: vec![TensorRef {
                name: format!("w{i}"),
                dtype,
                shape: vec![data[i].len()],
                data: &data[i],
            }],
            metadata: None,
        };
        let files: Vec<NewFile<'_>> = (0..5).map(|i| file(i, Dtype::U8)).collect();
        for threads in [1, 3] {
            let staged =
                write_safetensors_files(&files, &WriteOptions::default(), threads).unwrap();
            assert_eq!(staged.len(), files.len());
            for (pending, f) in staged.into_iter().zip(&files) {
                assert_eq!(pending.target(), f.target);
                pending.commit().unwrap();
                let written = std::fs::read(&f.target).unwrap();
                assert!(
                    written == oracle(&f.tensors, None),
                    "{}",
                    f.target.display()
                );
            }
        }
        let before: Vec<Vec<u8>> = files
            .iter()
            .map(|f| std::fs::read(&f.target).unwrap())
            .collect();
        // One file whose tensor does not fit its dtype: nothing is staged, no temp file is left.
        let mut bad = files.clone();
        bad[3] = file(3, Dtype::F64);
        bad[3].tensors[0].shape = vec![3];
        let err = write_safetensors_files(&bad, &WriteOptions::default(), 3).unwrap_err();
        assert!(err.to_string().contains("tensor `w3`"), "{err}");
        for (f, old) in files.iter().zip(&before) {
            assert!(std::fs::read(&f.target).unwrap() == *old);
        }
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), files.len());
    }

    #[test]
    fn each_batch_lies_in_one_aligned_block_of_the_file_and_they_tile_it() {
        // Odd sizes behind a header of odd length: no tensor starts at a block boundary.
        let data: Vec<Vec<u8>> = (0..7)
            .map(|i| bytes(BATCH_BYTES / 3 + 4096 * i + 12, i as u8))
            .collect();
        let tensors: Vec<TensorRef<'_>> = data
            .iter()
            .enumerate()
            .map(|(i, d)| TensorRef {
                name: format!("t{i}"),
                dtype: Dtype::U8,
                shape: vec![d.len()],
                data: d,
            })
            .collect();
        let metas: Vec<TensorMeta> = tensors.iter().map(TensorRef::meta).collect();
        let layout = plan(&metas, None).unwrap();
        let batches = batch(&pieces(&layout, &tensors));
        let block = BATCH_BYTES as u64;
        let mut next = 0u64;
        for b in &batches {
            let len: u64 = b.slices.iter().map(|s| s.len() as u64).sum();
            assert_eq!(b.offset, next);
            assert_eq!(
                b.offset / block,
                (b.offset + len - 1) / block,
                "{}",
                b.offset
            );
            next += len;
        }
        assert_eq!(next, layout.total_len);
        assert_eq!(batches.len() as u64, layout.total_len.div_ceil(block));
    }

    #[test]
    fn batches_cover_every_byte_once_in_order() {
        let data: Vec<Vec<u8>> = (0..10).map(|i| bytes(i * 1000, i as u8)).collect();
        let mut pieces = Vec::new();
        let mut off = 0u64;
        for d in &data {
            pieces.push(Piece {
                offset: off,
                data: d.as_slice(),
                source: None,
            });
            off += d.len() as u64;
        }
        let batches = batch(&pieces);
        let mut next = 0u64;
        for b in &batches {
            assert_eq!(b.offset, next);
            next += b.slices.iter().map(|s| s.len() as u64).sum::<u64>();
        }
        assert_eq!(next, off);
    }
}
