//! A memory-mapped, validated safetensors file.
//!
//! The header is checked by the `safetensors` crate's own `read_metadata` (header size limit, UTF-8,
//! JSON, contiguous non-overlapping offsets, `numel * itemsize`, data ending exactly at end of file), so
//! our rules are the reference implementation's rules. Tensor data is never read here: callers get
//! offsets and borrowed slices of the mapping.

use std::collections::HashMap;
use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use memmap2::{MmapMut, MmapOptions};
use safetensors::{Dtype, SafeTensorError, SafeTensors};

use crate::error::{Error, IoContext, Result};
use crate::prefetch::{all_resident, prefetch, sample_cold, Prefetch, COLD_THREADS};

/// One tensor of a file: where its bytes are, as absolute offsets into the file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorEntry {
    pub name: String,
    pub dtype: Dtype,
    pub shape: Vec<usize>,
    pub start: usize,
    pub end: usize,
}

#[derive(Debug)]
pub struct SafetensorsFile {
    path: PathBuf,
    // A private (copy-on-write) mapping: consumers may build writable tensors on it, and a write to one
    // never reaches the file on disk.
    map: MmapMut,
    // (device, inode) of the file mapped, for `map_onto` to map the same file again; None for a copy.
    identity: Option<(u64, u64)>,
    header_len: usize,
    metadata: Option<HashMap<String, String>>,
    entries: Vec<TensorEntry>,
    index: HashMap<String, usize>,
}

impl SafetensorsFile {
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let file = File::open(path).at(path)?;
        let stat = file.metadata().at(path)?;
        let len = stat.len();
        // Checked before mapping: an empty file cannot be mapped, and a short one is not a safetensors file.
        if len < 8 {
            return Err(Error::Format {
                path: path.to_path_buf(),
                source: SafeTensorError::HeaderTooSmall,
            });
        }
        // SAFETY: a private mapping of a file we opened read-only. If another process truncates the file
        // while it is mapped, touching the lost pages raises SIGBUS; that is the documented limit of
        // every mmap-based reader (safetensors, numpy.memmap) and is why the size is validated here.
        let map = unsafe { MmapOptions::new().map_copy(&file) }.at(path)?;
        let mut out = Self::from_map(path, map)?;
        out.identity = Some((stat.dev(), stat.ino()));
        Ok(out)
    }

    /// Validate an in-memory copy of a file (fuzzing, tests); `path` only names it in errors.
    pub fn from_bytes(path: impl AsRef<Path>, bytes: &[u8]) -> Result<Self> {
        let path = path.as_ref();
        let map = anonymous_copy(path, bytes)?;
        if bytes.len() < 8 {
            return Err(Error::Format {
                path: path.to_path_buf(),
                source: SafeTensorError::HeaderTooSmall,
            });
        }
        Self::from_map(path, map)
    }

    fn from_map(path: &Path, map: MmapMut) -> Result<Self> {
        let (n, metadata) = SafeTensors::read_metadata(&map).map_err(|source| Error::Format {
            path: path.to_path_buf(),
            source,
        })?;
        let header_len = 8 + n;
        if let Some(key) = first_duplicate_key(&map[8..header_len]) {
            return Err(Error::Header {
                path: path.to_path_buf(),
                reason: format!(
                    "key `{key}` appears twice in the header (JSON readers disagree on which one counts)"
                ),
            });
        }
        let entries = metadata
            .offset_keys()
            .into_iter()
            .map(|name| {
                let info = metadata
                    .info(&name)
                    .expect("offset_keys come from the same metadata");
                TensorEntry {
                    dtype: info.dtype,
                    shape: info.shape.clone(),
                    start: header_len + info.data_offsets.0,
                    end: header_len + info.data_offsets.1,
                    name,
                }
            })
            .collect::<Vec<TensorEntry>>();
        let index = entries
            .iter()
            .enumerate()
            .map(|(i, e)| (e.name.clone(), i))
            .collect();
        Ok(Self {
            path: path.to_path_buf(),
            index,
            header_len,
            metadata: metadata.metadata().clone(),
            entries,
            map,
            identity: None,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Tensors in file (data offset) order.
    pub fn entries(&self) -> &[TensorEntry] {
        &self.entries
    }

    /// The `__metadata__` map, if the file has one.
    pub fn metadata(&self) -> Option<&HashMap<String, String>> {
        self.metadata.as_ref()
    }

    /// Bytes before the first tensor (length prefix, JSON, padding).
    pub fn header_len(&self) -> usize {
        self.header_len
    }

    /// The whole mapped file.
    pub fn bytes(&self) -> &[u8] {
        &self.map
    }

    /// The header as stored: its 8-byte length and JSON.
    pub fn header_bytes(&self) -> &[u8] {
        &self.map[..self.header_len]
    }

    /// Base address and length of the private mapping, for exporting it as a writable buffer.
    pub fn raw_parts(&mut self) -> (*mut u8, usize) {
        (self.map.as_mut_ptr(), self.map.len())
    }

    /// Bring the file's pages into this process before the tensors are used: see [`crate::prefetch`]
    /// (one thread while they are in the page cache, `threads` reading at once when they are not).
    pub fn prefetch(&self, threads: usize, state: &Prefetch) -> Result<()> {
        prefetch(&self.map, &self.path, threads, state)
    }

    /// Map this file over `len` bytes at `base`, privately and writable, as [`SafetensorsFile::open`] maps
    /// it, in place of what was mapped there, and bring its pages in (`MADV_POPULATE_READ`): from then on
    /// that memory reads this file, at the same addresses. This is how a hotswap replaces an adapter whose
    /// weights are views of another file's mapping, laid out the same, without copying a byte. The file
    /// is opened again by path and must be the same file (device, inode, length) as the one validated
    /// here; otherwise nothing is mapped and the error names it.
    ///
    /// # Safety
    /// `base..base + len` must be one private mapping that the caller owns and unmaps itself, page
    /// aligned, that nothing borrows as a Rust reference during the call; `len` must be this file's length.
    pub unsafe fn map_onto(&self, base: *mut u8, len: usize) -> Result<()> {
        if len != self.map.len() {
            return Err(changed(
                &self.path,
                "not the length of the mapping it would replace",
            ));
        }
        let identity = self
            .identity
            .ok_or_else(|| changed(&self.path, "an in-memory copy cannot be mapped again"))?;
        let file = File::open(&self.path).at(&self.path)?;
        let stat = file.metadata().at(&self.path)?;
        if (stat.dev(), stat.ino()) != identity || stat.len() != len as u64 {
            return Err(changed(
                &self.path,
                "the file was replaced or resized after it was validated",
            ));
        }
        // SAFETY: forwarded from the caller.
        unsafe { map_fixed(&file, &self.path, base, len) }
    }

    /// Whether every page of the file is in memory (page cache or mapped here): see [`all_resident`].
    pub fn all_resident(&self) -> Result<bool> {
        all_resident(&self.map, &self.path)
    }

    /// Whether a sample of the file is not in memory (marking `state` cold): see [`sample_cold`].
    pub fn sample_cold(&self, state: &Prefetch) -> Result<bool> {
        sample_cold(&self.map, &self.path, state)
    }

    pub fn entry(&self, name: &str) -> Result<&TensorEntry> {
        self.index
            .get(name)
            .map(|&i| &self.entries[i])
            .ok_or_else(|| Error::tensor(name, format!("not found in {}", self.path.display())))
    }

    /// The bytes of one tensor, borrowed from the mapping.
    pub fn tensor_bytes(&self, name: &str) -> Result<&[u8]> {
        let e = self.entry(name)?;
        Ok(&self.map[e.start..e.end])
    }
}

/// The first top-level key of the header JSON that appears twice. serde_json (and so the `safetensors`
/// crate) silently keeps the last one; another reader may keep the first, so one file could show two
/// different tensors to two tools (e.g. a scanner and a loader). Run on headers already validated.
fn first_duplicate_key(header: &[u8]) -> Option<String> {
    use serde::de::{Deserializer, IgnoredAny, MapAccess, Visitor};

    struct Keys;
    impl<'de> Visitor<'de> for Keys {
        type Value = Option<String>;
        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            f.write_str("a JSON object")
        }
        fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
            let mut seen = std::collections::HashSet::new();
            while let Some(key) = map.next_key::<String>()? {
                map.next_value::<IgnoredAny>()?;
                if !seen.insert(key.clone()) {
                    return Ok(Some(key));
                }
            }
            Ok(None)
        }
    }
    serde_json::Deserializer::from_slice(header)
        .deserialize_map(Keys)
        .ok()
        .flatten()
}

/// [`SafetensorsFile::map_onto`] for a file not opened here: `path` is mapped when its length is `len` and
/// its header is `header`, byte for byte (the stored length and JSON, as [`SafetensorsFile::header_bytes`]
/// gives them for a file validated before: the same header and length pass the same validation). Saves
/// a hotswap of a file laid out like the last one the header parse. Errors name `path`; then nothing
/// is mapped.
///
/// # Safety
/// As for [`SafetensorsFile::map_onto`].
pub unsafe fn map_file_onto(path: &Path, header: &[u8], base: *mut u8, len: usize) -> Result<()> {
    let file = File::open(path).at(path)?;
    if file.metadata().at(path)?.len() != len as u64 {
        return Err(changed(
            path,
            "not the length of the mapping it would replace",
        ));
    }
    let mut stored = vec![0u8; header.len()];
    rustix::io::pread(&file, &mut stored, 0)
        .map_err(|e| Error::io(path, e.into()))
        .and_then(|n| match n == header.len() && stored == header {
            true => Ok(()),
            false => Err(changed(path, "its header is not the one planned for")),
        })?;
    // SAFETY: forwarded from the caller.
    unsafe { map_fixed(&file, path, base, len) }
}

fn changed(path: &Path, reason: &str) -> Error {
    Error::Header {
        path: path.to_path_buf(),
        reason: reason.to_owned(),
    }
}

/// Map `file` (`len` bytes) over `base..base + len` in place, then bring its pages in: a file the page
/// cache holds on this thread, one it does not as a cold prefetch does ([`COLD_THREADS`] stretches at
/// once; populating a cold 268 MB adapter on this thread alone took 2-4x the fastest read in most
/// rounds of the cold benchmark).
///
/// # Safety
/// As for [`SafetensorsFile::map_onto`].
unsafe fn map_fixed(file: &File, path: &Path, base: *mut u8, len: usize) -> Result<()> {
    // SAFETY: the caller guarantees [base, base + len) is a private mapping it owns; MAP_FIXED replaces
    // its pages with this file's, so the range stays mapped and its owner's unmapping still covers it.
    // A failed MAP_FIXED leaves the old mapping in place on Linux 6.12 and later (the unmapping is undone).
    let mapped = unsafe {
        libc::mmap(
            base.cast(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_FIXED,
            file.as_raw_fd(),
            0,
        )
    };
    if mapped == libc::MAP_FAILED {
        return Err(Error::io(path, std::io::Error::last_os_error()));
    }
    // SAFETY: the range was just mapped, `len` bytes, and nothing else borrows it (caller's contract).
    let pages = unsafe { std::slice::from_raw_parts(base, len) };
    let state = Prefetch::new();
    if sample_cold(pages, path, &state)? {
        return prefetch(pages, path, COLD_THREADS, &state);
    }
    crate::prefetch::populate(pages).map_err(|e| Error::io(path, e))
}

/// `bytes` copied into an anonymous mapping, so that in-memory input (fuzzing, tests) goes through the
/// same mapping-based readers as files. An anonymous mapping cannot be empty: one spare byte is mapped
/// and callers look only at `bytes.len()` of it. `path` only names the input in errors.
pub(crate) fn anonymous_copy(path: &Path, bytes: &[u8]) -> Result<MmapMut> {
    let mut map = MmapOptions::new()
        .len(bytes.len().max(1))
        .map_anon()
        .at(path)?;
    map[..bytes.len()].copy_from_slice(bytes);
    Ok(map)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    /// A file from explicit header JSON and data length, bypassing every writer-side check.
    fn raw_file(json: &str, data_len: usize) -> tempfile::NamedTempFile {
        let mut f = tempfile::NamedTempFile::new().unwrap();
        f.write_all(&(json.len() as u64).to_le_bytes()).unwrap();
        f.write_all(json.as_bytes()).unwrap();
        f.write_all(&vec![0u8; data_len]).unwrap();
        f
    }

    fn open_err(json: &str, data_len: usize) -> String {
        let f = raw_file(json, data_len);
        let err = SafetensorsFile::open(f.path()).unwrap_err();
        assert!(matches!(err, Error::Format { .. }), "{err:?}");
        let msg = err.to_string();
        assert!(msg.contains(&f.path().display().to_string()), "{msg}");
        msg
    }

    fn filled(json: &str, byte: u8, data_len: usize) -> tempfile::NamedTempFile {
        let mut f = tempfile::NamedTempFile::new().unwrap();
        f.write_all(&(json.len() as u64).to_le_bytes()).unwrap();
        f.write_all(json.as_bytes()).unwrap();
        f.write_all(&vec![byte; data_len]).unwrap();
        f
    }

    #[test]
    fn a_file_mapped_over_from_disk_is_read_whole() {
        // Evicted first: its pages come in through the cold prefetch's stretches, every one of them.
        let n = 3 * crate::prefetch::PIECE + 12_345;
        let json = format!(r#"{{"a":{{"dtype":"U8","shape":[{n}],"data_offsets":[0,{n}]}}}}"#);
        let (old, new) = (filled(&json, 1, n), filled(&json, 7, n));
        new.as_file().sync_all().unwrap();
        let mut held = SafetensorsFile::open(old.path()).unwrap();
        let (base, len) = held.raw_parts();
        let header = SafetensorsFile::open(new.path())
            .unwrap()
            .header_bytes()
            .to_vec();
        // SAFETY: fadvise on an open descriptor (advice only); the file was synced, its pages can go.
        unsafe { libc::posix_fadvise(new.as_file().as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
        // SAFETY: `held`'s own private mapping, not borrowed during the call.
        unsafe { map_file_onto(new.path(), &header, base, len) }.unwrap();
        assert!(held.tensor_bytes("a").unwrap().iter().all(|&b| b == 7));
    }

    #[test]
    fn map_onto_replaces_another_mapping_in_place_and_refuses_what_does_not_fit() {
        let json = r#"{"a":{"dtype":"U8","shape":[10000],"data_offsets":[0,10000]}}"#;
        let (old, new) = (filled(json, 1, 10_000), filled(json, 7, 10_000));
        let mut held = SafetensorsFile::open(old.path()).unwrap();
        let incoming = SafetensorsFile::open(new.path()).unwrap();
        let (base, len) = held.raw_parts();
        // SAFETY: `held`'s own private mapping, not borrowed during the call.
        unsafe { incoming.map_onto(base, len) }.unwrap();
        assert_eq!(held.tensor_bytes("a").unwrap(), &[7u8; 10_000][..]);
        // Private: a write to the replaced memory reaches neither file.
        // SAFETY: in bounds of the mapping, which nothing else borrows.
        unsafe { *base.add(len - 1) = 9 };
        assert_eq!(std::fs::read(new.path()).unwrap()[len - 1], 7);

        let short = filled(
            r#"{"a":{"dtype":"U8","shape":[10],"data_offsets":[0,10]}}"#,
            3,
            10,
        );
        let other = SafetensorsFile::open(short.path()).unwrap();
        // SAFETY: as above; refused before anything is mapped.
        let err = unsafe { other.map_onto(base, len) }
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("length") && err.contains(&short.path().display().to_string()),
            "{err}"
        );

        let replaced = SafetensorsFile::open(new.path()).unwrap();
        let newer = filled(json, 5, 10_000);
        std::fs::rename(newer.path(), new.path()).unwrap(); // same path and length, another inode
                                                            // SAFETY: as above; refused before anything is mapped.
        let err = unsafe { replaced.map_onto(base, len) }
            .unwrap_err()
            .to_string();
        assert!(err.contains("replaced or resized"), "{err}");
        assert_eq!(held.tensor_bytes("a").unwrap()[0], 7);

        // By path, against a header validated before: mapped when it is the same, refused otherwise.
        let header = incoming.header_bytes().to_vec();
        // SAFETY: as above.
        unsafe { map_file_onto(new.path(), &header, base, len) }.unwrap();
        assert_eq!(held.tensor_bytes("a").unwrap()[0], 5);
        let mut other_header = header.clone();
        *other_header.last_mut().unwrap() ^= 1;
        // SAFETY: as above; refused before anything is mapped.
        let err = unsafe { map_file_onto(old.path(), &other_header, base, len) }.unwrap_err();
        assert!(err.to_string().contains("header"), "{err}");
        assert_eq!(held.tensor_bytes("a").unwrap()[0], 5);
    }

    #[test]
    fn lists_entries_in_offset_order_with_absolute_offsets() {
        let json = r#"{"__metadata__":{"format":"pt"},"b":{"dtype":"F32","shape":[2],"data_offsets":[4,12]},"a":{"dtype":"BF16","shape":[2],"data_offsets":[0,4]}}"#;
        let f = raw_file(json, 12);
        let st = SafetensorsFile::open(f.path()).unwrap();
        let names: Vec<_> = st.entries().iter().map(|e| e.name.as_str()).collect();
        assert_eq!(names, ["a", "b"]);
        let base = 8 + json.len();
        assert_eq!(
            (st.entries()[1].start, st.entries()[1].end),
            (base + 4, base + 12)
        );
        assert_eq!(st.metadata().unwrap()["format"], "pt");
        assert_eq!(st.tensor_bytes("b").unwrap().len(), 8);
        assert!(st
            .tensor_bytes("zz")
            .unwrap_err()
            .to_string()
            .contains("tensor `zz`"));
    }

    #[test]
    fn refuses_empty_and_short_files() {
        for len in [0usize, 7] {
            let mut f = tempfile::NamedTempFile::new().unwrap();
            f.write_all(&vec![0u8; len]).unwrap();
            let err = SafetensorsFile::open(f.path()).unwrap_err().to_string();
            assert!(err.contains("header too small"), "{err}");
        }
    }

    #[test]
    fn refuses_header_larger_than_limit() {
        let mut f = tempfile::NamedTempFile::new().unwrap();
        f.write_all(&(100_000_001u64).to_le_bytes()).unwrap();
        f.write_all(b"{}").unwrap();
        let err = SafetensorsFile::open(f.path()).unwrap_err().to_string();
        assert!(err.contains("header too large"), "{err}");
    }

    #[test]
    fn refuses_header_longer_than_file() {
        let mut f = tempfile::NamedTempFile::new().unwrap();
        f.write_all(&(1000u64).to_le_bytes()).unwrap();
        f.write_all(b"{}").unwrap();
        let err = SafetensorsFile::open(f.path()).unwrap_err().to_string();
        assert!(err.contains("invalid header length"), "{err}");
    }

    #[test]
    fn refuses_invalid_utf8_and_invalid_json() {
        let mut f = tempfile::NamedTempFile::new().unwrap();
        f.write_all(&(2u64).to_le_bytes()).unwrap();
        f.write_all(&[0xff, 0xfe]).unwrap();
        let err = SafetensorsFile::open(f.path()).unwrap_err().to_string();
        assert!(err.contains("invalid UTF-8"), "{err}");
        assert!(open_err("{not json", 0).contains("invalid JSON"));
        assert!(open_err(
            r#"{"a":{"dtype":"F128","shape":[1],"data_offsets":[0,16]}}"#,
            16
        )
        .contains("invalid JSON"));
    }

    #[test]
    fn refuses_gaps_overlaps_and_wrong_sizes() {
        let gap = r#"{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},"b":{"dtype":"F32","shape":[1],"data_offsets":[8,12]}}"#;
        assert!(open_err(gap, 12).contains("invalid offset"));
        let overlap = r#"{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"b":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}}"#;
        assert!(open_err(overlap, 8).contains("invalid offset"));
        let not_at_zero = r#"{"a":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}}"#;
        assert!(open_err(not_at_zero, 8).contains("invalid offset"));
        let reversed = r#"{"a":{"dtype":"F32","shape":[0],"data_offsets":[4,0]}}"#;
        assert!(open_err(reversed, 4).contains("invalid offset"));
        let wrong_size = r#"{"a":{"dtype":"F32","shape":[3],"data_offsets":[0,8]}}"#;
        assert!(open_err(wrong_size, 8).contains("invalid shape"));
    }

    #[test]
    fn refuses_duplicate_names() {
        // JSON objects keep the last duplicate, which leaves the first tensor's bytes uncovered.
        let dup = r#"{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},"a":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}}"#;
        assert!(open_err(dup, 8).contains("invalid offset"));
    }

    #[test]
    fn refuses_keys_listed_twice_even_when_identical() {
        let entry = r#"{"dtype":"F32","shape":[1],"data_offsets":[0,4]}"#;
        let dup = format!(r#"{{"a":{entry},"a":{entry}}}"#);
        let f = raw_file(&dup, 4);
        let err = SafetensorsFile::open(f.path()).unwrap_err();
        assert!(matches!(err, Error::Header { .. }), "{err:?}");
        let msg = err.to_string();
        assert!(msg.contains("key `a` appears twice"), "{msg}");
        assert!(msg.contains(&f.path().display().to_string()), "{msg}");
        let meta = format!(r#"{{"__metadata__":{{}},"a":{entry},"__metadata__":{{"x":"y"}}}}"#);
        let f = raw_file(&meta, 4);
        let msg = SafetensorsFile::open(f.path()).unwrap_err().to_string();
        assert!(msg.contains("duplicate field `__metadata__`"), "{msg}"); // the crate's own rule
                                                                          // Same names one level down are not duplicates.
        let nested =
            format!(r#"{{"a":{entry},"b":{{"dtype":"F32","shape":[0],"data_offsets":[4,4]}}}}"#);
        assert!(SafetensorsFile::open(raw_file(&nested, 4).path()).is_ok());
    }

    #[test]
    fn refuses_shape_overflow() {
        let json = format!(
            r#"{{"a":{{"dtype":"F32","shape":[{},{}],"data_offsets":[0,8]}}}}"#,
            usize::MAX,
            4
        );
        assert!(open_err(&json, 8).contains("overflow"));
    }

    #[test]
    fn refuses_data_not_ending_at_end_of_file() {
        let json = r#"{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}"#;
        assert!(open_err(json, 8).contains("not fully covered"));
        let f = raw_file(json, 2);
        assert!(SafetensorsFile::open(f.path()).is_err());
    }

    #[test]
    fn from_bytes_agrees_with_open() {
        let json = r#"{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}"#;
        let f = raw_file(json, 8);
        let bytes = std::fs::read(f.path()).unwrap();
        let opened = SafetensorsFile::open(f.path()).unwrap();
        let copied = SafetensorsFile::from_bytes(f.path(), &bytes).unwrap();
        assert_eq!(opened.entries(), copied.entries());
        assert_eq!(opened.bytes(), copied.bytes());
        for cut in [0, 7, bytes.len() - 1] {
            let a = SafetensorsFile::open({
                std::fs::write(f.path(), &bytes[..cut]).unwrap();
                f.path()
            })
            .unwrap_err();
            let b = SafetensorsFile::from_bytes(f.path(), &bytes[..cut]).unwrap_err();
            assert_eq!(a.to_string(), b.to_string(), "prefix {cut}");
        }
    }

    #[test]
    fn missing_file_is_an_io_error_naming_it() {
        let err = SafetensorsFile::open("/definitely/not/here.safetensors").unwrap_err();
        assert!(
            matches!(&err, Error::Io { source, .. } if source.kind() == std::io::ErrorKind::NotFound)
        );
        assert!(err.to_string().contains("/definitely/not/here.safetensors"));
    }
}
