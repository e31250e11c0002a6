//! `torch.save` checkpoint -> safetensors, with the bytes going from the input mapping to the output
//! file without an intermediate copy wherever the tensor is a contiguous view of its storage.
//!
//! Memory stays bounded by the non-contiguous tensors (the only ones gathered into owned buffers):
//! everything else is borrowed from the mapping and written with positional writes by the core writer.
//! CRC-32 of each storage is checked while it is copied (see `FusedCrc`), so the data is read once.

use std::borrow::Cow;
use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::sync::{Arc, Mutex};

use crate::reader::SafetensorsFile;
use crate::writer::{write_safetensors, PieceObserver, TensorRef, WriteOptions};
use rayon::prelude::*;
use safetensors::Dtype;

use crate::error::{Error, Result};
use crate::pickle::{Limits, TensorSpec};
use crate::state_dict::{read_state_dict, Skipped, StateDict};
use crate::torch_dtype::TorchDtype;
use crate::torch_zip::{TorchZip, ZipEntry};

#[derive(Debug, Clone)]
pub struct ConvertOptions {
    /// Re-open the output and compare every tensor's bytes with the source.
    pub verify: bool,
    /// Check the CRC-32 of `data.pkl` and of every storage that is read.
    pub check_crc: bool,
    /// fsync the output before and after it is renamed into place.
    pub fsync: bool,
    pub limits: Limits,
    /// Bytes written so far (see `WriteOptions::progress`).
    pub progress: Option<std::sync::Arc<std::sync::atomic::AtomicU64>>,
}

impl Default for ConvertOptions {
    fn default() -> Self {
        Self {
            verify: false,
            check_crc: true,
            fsync: false,
            limits: Limits::default(),
            progress: None,
        }
    }
}

#[derive(Debug, Clone, Default)]
pub struct ConvertReport {
    pub tensors: usize,
    /// Tensor bytes written (header excluded).
    pub bytes: u64,
    /// Tensors that share a storage with an earlier tensor: written out as their own copy, since
    /// safetensors cannot alias.
    pub aliases_copied: usize,
    /// Non-contiguous views gathered into a buffer before writing.
    pub gathered: usize,
    /// Non-tensor entries left out.
    pub skipped: Vec<Skipped>,
}

/// What `inspect_torch` tells about one tensor, from the pickle alone.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TorchTensorInfo {
    pub name: String,
    /// Torch's dtype; `dtype.safetensors` is `None` when it cannot be converted.
    pub dtype: TorchDtype,
    pub shape: Vec<usize>,
    pub nbytes: usize,
}

/// List the tensors of a checkpoint without reading any storage.
pub fn inspect_torch(path: impl AsRef<Path>) -> Result<Vec<TorchTensorInfo>> {
    let path = path.as_ref();
    let zip = TorchZip::open(path)?;
    let sd = read_state_dict(zip.data_pkl()?, path, &Limits::default())?;
    sd.tensors
        .into_iter()
        .map(|(name, t)| {
            let nbytes = numel(&name, &t.shape)
                .and_then(|n| {
                    n.checked_mul(t.dtype.itemsize)
                        .ok_or_else(|| Error::tensor(&name, "size overflows"))
                })
                .map_err(|e| in_file(e, path))?;
            Ok(TorchTensorInfo {
                name,
                dtype: t.dtype,
                shape: t.shape,
                nbytes,
            })
        })
        .collect()
}

/// Convert `src` (a torch.save zip checkpoint) to the safetensors file `dst`, atomically.
pub fn convert_file(
    src: impl AsRef<Path>,
    dst: impl AsRef<Path>,
    options: &ConvertOptions,
) -> Result<ConvertReport> {
    convert_zip(&TorchZip::open(src)?, dst, options)
}

/// Convert an already opened checkpoint (see [`convert_file`]); errors name `zip.path()`.
pub fn convert_zip(
    zip: &TorchZip,
    dst: impl AsRef<Path>,
    options: &ConvertOptions,
) -> Result<ConvertReport> {
    let (src, dst) = (zip.path(), dst.as_ref());
    if options.check_crc {
        let pkl = zip
            .entry("data.pkl")
            .ok_or_else(|| Error::zip(src, "no data.pkl entry"))?;
        zip.verify_crc(pkl)?;
    }
    let StateDict { tensors, skipped } = read_state_dict(zip.data_pkl()?, src, &options.limits)?;

    let mut resolved: Vec<Resolved<'_>> = in_order(
        tensors
            .par_iter()
            .map(|(name, spec)| resolve(zip, name, spec).map_err(|e| in_file(e, src))),
    )?;
    // Only now, with every view's bounds checked and the total known, is anything allocated.
    check_gather_budget(zip, &resolved, &options.limits).map_err(|e| in_file(e, src))?;
    in_order(
        resolved
            .par_iter_mut()
            .map(|r| r.materialise().map_err(|e| in_file(e, src))),
    )?;

    let mut storages: Vec<&ZipEntry> = Vec::new();
    let mut unique = HashSet::new();
    for r in &resolved {
        if unique.insert(r.entry.name.as_str()) {
            storages.push(r.entry);
        }
    }
    // Every tensor beyond the first of its storage is an alias, written out as its own copy.
    let aliases_copied = resolved.len() - storages.len();

    let refs: Vec<TensorRef<'_>> = resolved
        .iter()
        .map(|r| TensorRef {
            name: r.name.clone(),
            dtype: r.dtype,
            shape: r.shape.clone(),
            data: &r.data,
        })
        .collect();
    // CRC-32 is checked while copying: a storage that is exactly one borrowed tensor is checksummed
    // piece by piece on the writer threads, just before each piece is written (the bytes are then in
    // cache, so the check costs no extra pass over memory), and the pieces' CRCs are combined. Storages
    // read differently (aliases, partial or gathered views) are checked in a pass of their own first.
    let fused = if options.check_crc {
        let fused = FusedCrc::plan(zip, &storages, &resolved);
        in_order(
            storages
                .par_iter()
                .filter(|entry| !fused.covers(entry))
                .map(|entry| zip.verify_crc(entry)),
        )?;
        Some(Arc::new(fused))
    } else {
        None
    };
    let pending = write_safetensors(
        dst,
        &refs,
        Some(HashMap::from([("format".to_owned(), "pt".to_owned())])),
        WriteOptions {
            fsync: options.fsync,
            progress: options.progress.clone(),
            observer: fused.clone().map(|f| -> PieceObserver {
                Arc::new(move |tensor, within, bytes| f.observe(tensor, within, bytes))
            }),
            // One writer: the file's inode lock serialises buffered writes anyway (see WriteOptions).
            parallel: false,
        },
    )?;
    if let Some(fused) = &fused {
        fused.check(zip, &storages)?;
    }
    // Verified while still staged: a mismatch publishes nothing and removes the temp file.
    if options.verify {
        verify(pending.temp_path(), &resolved)?;
    }
    pending.commit()?;
    Ok(ConvertReport {
        tensors: resolved.len(),
        bytes: resolved.iter().map(|r| r.data.len() as u64).sum(),
        aliases_copied,
        gathered: resolved
            .iter()
            .filter(|r| matches!(r.data, Cow::Owned(_)))
            .count(),
        skipped,
    })
}

/// A tensor located in the mapping (or gathered, when not contiguous).
/// Collect parallel results in input order and report the first failure in that order, so the message
/// does not depend on which thread lost a race.
fn in_order<T: Send>(results: impl ParallelIterator<Item = Result<T>>) -> Result<Vec<T>> {
    results.collect::<Vec<_>>().into_iter().collect()
}

/// Tensor errors name the tensor; callers of `convert_file` also need to know which file it is in.
fn in_file(err: Error, path: &Path) -> Error {
    match err {
        Error::Tensor { name, reason } => Error::Tensor {
            name,
            reason: format!("{reason} (in {})", path.display()),
        },
        other => other,
    }
}

/// CRC-32 of whole storages assembled from the pieces the writer reports.
struct FusedCrc {
    /// Input tensor index -> slot of the storage it covers exactly.
    slot_of_tensor: HashMap<usize, usize>,
    /// Storage entry name -> slot.
    slot_of_entry: HashMap<String, usize>,
    /// Per slot: (offset within the storage, length, CRC) of each piece seen.
    parts: Vec<Mutex<Vec<(usize, usize, u32)>>>,
}

impl FusedCrc {
    fn plan(zip: &TorchZip, storages: &[&ZipEntry], resolved: &[Resolved<'_>]) -> Self {
        let mut slot_of_tensor = HashMap::new();
        let mut slot_of_entry = HashMap::new();
        for entry in storages {
            let bytes = zip.entry_bytes(entry);
            // The entry itself must match, not only its bytes: two entries covering the same bytes
            // would otherwise share one tensor's pieces, and one of them would never be checked.
            let covering = resolved.iter().position(|r| {
                r.entry.name == entry.name
                    && matches!(r.data, Cow::Borrowed(d) if std::ptr::eq(d, bytes))
            });
            if let Some(tensor) = covering {
                let slot = slot_of_entry.len();
                slot_of_entry.insert(entry.name.clone(), slot);
                slot_of_tensor.insert(tensor, slot);
            }
        }
        let parts = (0..slot_of_entry.len()).map(|_| Mutex::default()).collect();
        Self {
            slot_of_tensor,
            slot_of_entry,
            parts,
        }
    }

    fn covers(&self, entry: &ZipEntry) -> bool {
        self.slot_of_entry.contains_key(&entry.name)
    }

    fn observe(&self, tensor: usize, within: usize, bytes: &[u8]) {
        if let Some(&slot) = self.slot_of_tensor.get(&tensor) {
            let crc = crc32fast::hash(bytes);
            let mut parts = self.parts[slot].lock().unwrap_or_else(|e| e.into_inner());
            parts.push((within, bytes.len(), crc));
        }
    }

    fn check(&self, zip: &TorchZip, storages: &[&ZipEntry]) -> Result<()> {
        for entry in storages {
            let Some(&slot) = self.slot_of_entry.get(&entry.name) else {
                continue;
            };
            let mut parts = self.parts[slot]
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .clone();
            parts.sort_unstable();
            let mut whole = crc32fast::Hasher::new();
            let mut next = 0;
            for (within, len, crc) in parts {
                // The writer reports every piece exactly once; anything else is a bug, not corruption.
                assert_eq!(within, next, "pieces of `{}` do not tile it", entry.name);
                whole.combine(&crc32fast::Hasher::new_with_initial_len(crc, len as u64));
                next += len;
            }
            assert_eq!(
                next, entry.len,
                "pieces of `{}` do not cover it",
                entry.name
            );
            zip.check_crc(entry, whole.finalize())?;
        }
        Ok(())
    }
}

struct Resolved<'a> {
    name: String,
    dtype: Dtype,
    shape: Vec<usize>,
    entry: &'a ZipEntry,
    /// Borrowed from the mapping, or (once materialised) the gathered copy of a non-contiguous view.
    data: Cow<'a, [u8]>,
    /// A non-contiguous view still to be gathered: its bounds are checked, nothing is allocated yet.
    gather: Option<Gather<'a>>,
}

struct Gather<'a> {
    storage: &'a [u8],
    item: usize,
    offset: usize,
    stride: Vec<usize>,
    numel: usize,
}

impl Gather<'_> {
    fn bytes(&self) -> usize {
        // Cannot overflow: `numel(..) * item` was checked when the view was resolved.
        self.numel * self.item
    }
}

impl Resolved<'_> {
    fn materialise(&mut self) -> Result<()> {
        if let Some(g) = self.gather.take() {
            let out = gather(g.storage, g.item, g.offset, &self.shape, &g.stride, g.numel)
                .ok_or_else(|| {
                    Error::tensor(
                        &self.name,
                        format!(
                            "cannot allocate {} bytes for its non-contiguous view",
                            g.bytes()
                        ),
                    )
                })?;
            self.data = Cow::Owned(out);
        }
        Ok(())
    }
}

/// Non-contiguous views are copied into memory before writing. A view that repeats storage elements
/// (stride 0, as `expand` makes) can ask for far more bytes than the file holds: a few bytes of input
/// could otherwise make the process allocate terabytes and abort. The copies together may take the
/// checkpoint's own size plus `limits.max_expanded_bytes`; the first tensor past that is refused.
fn check_gather_budget(zip: &TorchZip, resolved: &[Resolved<'_>], limits: &Limits) -> Result<()> {
    let budget = zip.bytes().len().saturating_add(limits.max_expanded_bytes);
    let mut total = 0usize;
    for r in resolved {
        let Some(g) = &r.gather else { continue };
        total = total.saturating_add(g.bytes());
        if total > budget {
            return Err(Error::tensor(
                &r.name,
                format!(
                    "non-contiguous views would need {total} bytes in memory up to this one, more than \
                     the checkpoint's {} bytes plus the {}-byte allowance for expanded (stride 0) views",
                    zip.bytes().len(),
                    limits.max_expanded_bytes
                ),
            ));
        }
    }
    Ok(())
}

fn resolve<'a>(zip: &'a TorchZip, name: &str, t: &TensorSpec) -> Result<Resolved<'a>> {
    let dtype = t.dtype.safetensors.ok_or_else(|| {
        Error::tensor(
            name,
            format!("torch.{} has no safetensors equivalent", t.dtype.name),
        )
    })?;
    let item = t.dtype.itemsize;
    let entry = zip.storage(&t.storage_key)?;
    let declared = usize::try_from(t.storage_numel)
        .ok()
        .and_then(|n| n.checked_mul(t.storage_dtype.map_or(1, |d| d.itemsize)))
        .filter(|&n| n <= entry.len)
        .ok_or_else(|| {
            Error::tensor(
                name,
                format!(
                    "storage `{}` declares {} elements but its entry `{}` holds {} bytes",
                    t.storage_key, t.storage_numel, entry.name, entry.len
                ),
            )
        })?;
    let storage = &zip.entry_bytes(entry)[..declared];
    let n = numel(name, &t.shape)?;
    n.checked_mul(item)
        .ok_or_else(|| Error::tensor(name, format!("shape {:?} overflows", t.shape)))?;
    let mut pending = None;
    let data = if n == 0 {
        Cow::Borrowed(&storage[..0])
    } else {
        let out_of_bounds = || {
            Error::tensor(
                name,
                format!(
                    "view (offset {}, shape {:?}, stride {:?}) of torch.{} reaches past storage `{}` ({} bytes)",
                    t.storage_offset, t.shape, t.stride, t.dtype.name, t.storage_key, declared
                ),
            )
        };
        let last = t
            .shape
            .iter()
            .zip(&t.stride)
            .try_fold(t.storage_offset, |acc, (&d, &s)| {
                acc.checked_add((d - 1).checked_mul(s)?)
            })
            .ok_or_else(out_of_bounds)?;
        last.checked_add(1)
            .and_then(|e| e.checked_mul(item))
            .filter(|&e| e <= storage.len())
            .ok_or_else(out_of_bounds)?;
        if is_contiguous(&t.shape, &t.stride) {
            let start = t.storage_offset * item;
            Cow::Borrowed(&storage[start..start + n * item])
        } else {
            pending = Some(Gather {
                storage,
                item,
                offset: t.storage_offset,
                stride: t.stride.clone(),
                numel: n,
            });
            Cow::Owned(Vec::new())
        }
    };
    Ok(Resolved {
        name: name.to_owned(),
        dtype,
        shape: t.shape.clone(),
        entry,
        data,
        gather: pending,
    })
}

fn numel(name: &str, shape: &[usize]) -> Result<usize> {
    shape
        .iter()
        .try_fold(1usize, |acc, &d| acc.checked_mul(d))
        .ok_or_else(|| Error::tensor(name, format!("shape {shape:?} overflows")))
}

/// Torch's rule: row-major strides, where dimensions of size 1 may have any stride.
fn is_contiguous(shape: &[usize], stride: &[usize]) -> bool {
    let mut expected = 1usize;
    for (&d, &s) in shape.iter().zip(stride).rev() {
        if d != 1 && s != expected {
            return false;
        }
        expected = expected.saturating_mul(d);
    }
    true
}

/// Copy a strided view (bounds already checked) into a row-major buffer, a run at a time when the
/// innermost dimension is dense. `None` when the buffer cannot be allocated (never an abort).
fn gather(
    src: &[u8],
    item: usize,
    offset: usize,
    shape: &[usize],
    stride: &[usize],
    n: usize,
) -> Option<Vec<u8>> {
    let dense_inner = shape.last().is_some_and(|_| stride.last() == Some(&1));
    let (outer, outer_stride, run) = if dense_inner {
        let k = shape.len() - 1;
        (&shape[..k], &stride[..k], shape[k])
    } else {
        (shape, stride, 1)
    };
    let mut out = Vec::new();
    out.try_reserve_exact(n.checked_mul(item)?).ok()?;
    let mut index = vec![0usize; outer.len()];
    let mut pos = offset;
    loop {
        out.extend_from_slice(&src[pos * item..(pos + run) * item]);
        let mut d = outer.len();
        loop {
            if d == 0 {
                return Some(out);
            }
            d -= 1;
            index[d] += 1;
            pos += outer_stride[d];
            if index[d] < outer[d] {
                break;
            }
            pos -= outer_stride[d] * outer[d];
            index[d] = 0;
        }
    }
}

fn verify(dst: &Path, resolved: &[Resolved<'_>]) -> Result<()> {
    let out = SafetensorsFile::open(dst)?;
    in_order(resolved.par_iter().map(|r| {
        let entry = out.entry(&r.name)?;
        if entry.dtype != r.dtype || entry.shape != r.shape {
            return Err(Error::tensor(
                &r.name,
                format!(
                    "written as {:?} {:?}, expected {:?} {:?}",
                    entry.dtype, entry.shape, r.dtype, r.shape
                ),
            ));
        }
        if out.tensor_bytes(&r.name)? != &r.data[..] {
            return Err(Error::tensor(
                &r.name,
                "written bytes differ from the source",
            ));
        }
        Ok(())
    }))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn contiguity_ignores_unit_dims() {
        assert!(is_contiguous(&[2, 3], &[3, 1]));
        assert!(is_contiguous(&[1, 3], &[99, 1]));
        assert!(is_contiguous(&[], &[]));
        assert!(!is_contiguous(&[3, 2], &[1, 3]));
        assert!(!is_contiguous(&[4, 3], &[0, 1]));
    }

    #[test]
    fn gathers_transposed_and_strided_views() {
        let src: Vec<u8> = (0..12).collect(); // 3x4 u8, row-major
        let g = |item, offset, shape: &[usize], stride: &[usize], n| {
            gather(&src, item, offset, shape, stride, n).unwrap()
        };
        assert_eq!(
            g(1, 0, &[4, 3], &[1, 4], 12),
            [0, 4, 8, 1, 5, 9, 2, 6, 10, 3, 7, 11]
        );
        assert_eq!(g(1, 1, &[3, 2], &[4, 1], 6), [1, 2, 5, 6, 9, 10]);
        assert_eq!(g(2, 1, &[2], &[2], 2), [2, 3, 6, 7]);
        assert_eq!(g(1, 5, &[], &[], 1), [5]);
    }

    #[test]
    fn an_impossible_gather_is_none_not_an_abort() {
        assert!(gather(&[0u8; 4], 4, 0, &[1 << 60], &[0], 1 << 60).is_none());
    }
}
