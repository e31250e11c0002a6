//! The zip container of `torch.save` (PyTorch >= 1.6), read from a memory map.
//!
//! Only what torch writes is accepted: stored (uncompressed) entries, all under one root folder, with
//! sizes taken from the central directory because the local headers carry a data descriptor with zero
//! sizes. Torch always writes the ZIP64 end records, so those are the normal path, not an edge case.
//! Storage entries start on 64-byte boundaries of the file, so callers can borrow tensor bytes straight
//! from the mapping. Every offset read from the file is bounds-checked before use.

use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};

use memmap2::Mmap;
use rayon::prelude::*;

use crate::error::{Error, Result};

const LOCAL_SIG: u32 = 0x0403_4b50;
const CENTRAL_SIG: u32 = 0x0201_4b50;
const EOCD_SIG: u32 = 0x0605_4b50;
const EOCD64_SIG: u32 = 0x0606_4b50;
const LOCATOR64_SIG: u32 = 0x0706_4b50;
const EOCD_LEN: usize = 22;
const LOCATOR64_LEN: usize = 20;
const EOCD64_LEN: usize = 56;
const CENTRAL_LEN: usize = 46;
const LOCAL_LEN: usize = 30;
/// The EOCD record may be followed by a comment of at most this many bytes.
const MAX_COMMENT: usize = u16::MAX as usize;
/// A legacy torch.save file starts with PROTO 2, then LONG1 of the 10-byte magic 0x1950a86a20f9469cfc6c.
const LEGACY_PREFIX: [u8; 14] = [
    0x80, 0x02, 0x8a, 0x0a, 0x6c, 0xfc, 0x9c, 0x46, 0xf9, 0x20, 0x6a, 0xa8, 0x50, 0x19,
];
/// CRC-32 work unit: large storages are split so that one big tensor still uses every core.
const CRC_CHUNK: usize = 8 << 20;

/// One stored entry: where its bytes are in the file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ZipEntry {
    /// Full name in the archive, root folder included.
    pub name: String,
    pub start: usize,
    pub len: usize,
    pub crc32: u32,
}

#[derive(Debug)]
pub struct TorchZip {
    path: PathBuf,
    map: Mmap,
    root: String,
    /// Keyed by the name below the root folder (`data.pkl`, `data/0`, `byteorder`, ...).
    entries: HashMap<String, ZipEntry>,
}

impl TorchZip {
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let file = File::open(path).map_err(|e| Error::io(path, e))?;
        if file.metadata().map_err(|e| Error::io(path, e))?.is_dir() {
            // Opening a directory read-only succeeds; mapping it fails with a puzzling ENODEV.
            return Err(Error::io(path, std::io::Error::from_raw_os_error(21)));
        }
        // SAFETY: the mapping is read-only and private to this reader; a concurrent truncation of the file
        // by another process is outside what any mmap-based reader can guard against.
        let map = unsafe { Mmap::map(&file) }.map_err(|e| Error::io(path, e))?;
        Self::from_map(path, map)
    }

    /// Parse an in-memory copy of a checkpoint (fuzzing, tests); `path` only names it in errors.
    pub fn from_bytes(path: impl AsRef<Path>, bytes: &[u8]) -> Result<Self> {
        let path = path.as_ref();
        let map = crate::reader::anonymous_copy(path, bytes)?
            .make_read_only()
            .map_err(|e| Error::io(path, e))?;
        if bytes.is_empty() {
            return Err(Error::zip(
                path,
                "no zip signature at the start of the file",
            ));
        }
        Self::from_map(path, map)
    }

    fn from_map(path: &Path, map: Mmap) -> Result<Self> {
        let bytes: &[u8] = &map;
        if bytes.starts_with(&LEGACY_PREFIX) {
            return Err(Error::LegacyTorchFormat {
                path: path.to_path_buf(),
            });
        }
        if !bytes.starts_with(&LOCAL_SIG.to_le_bytes()) {
            return Err(Error::zip(
                path,
                "no zip signature at the start of the file",
            ));
        }
        let (root, entries) = read_central_directory(path, bytes)?;
        let zip = Self {
            path: path.to_path_buf(),
            map,
            root,
            entries,
        };
        zip.check_byteorder()?;
        Ok(zip)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The archive's root folder (torch names it after the file it saved to).
    pub fn root(&self) -> &str {
        &self.root
    }

    /// The whole mapped file.
    pub fn bytes(&self) -> &[u8] {
        &self.map
    }

    /// An entry by its name below the root folder, e.g. `data.pkl` or `data/0`.
    pub fn entry(&self, name: &str) -> Option<&ZipEntry> {
        self.entries.get(name)
    }

    pub fn entry_bytes(&self, entry: &ZipEntry) -> &[u8] {
        &self.map[entry.start..entry.start + entry.len]
    }

    pub fn data_pkl(&self) -> Result<&[u8]> {
        let entry = self
            .entry("data.pkl")
            .ok_or_else(|| Error::zip(&self.path, format!("no `{}/data.pkl` entry", self.root)))?;
        Ok(self.entry_bytes(entry))
    }

    /// The entry holding storage `key` (`<root>/data/<key>`).
    pub fn storage(&self, key: &str) -> Result<&ZipEntry> {
        self.entry(&format!("data/{key}")).ok_or_else(|| {
            Error::zip(
                &self.path,
                format!("storage `{key}` has no `{}/data/{key}` entry", self.root),
            )
        })
    }

    /// Check an entry's CRC-32 against the central directory, using every core for large entries.
    pub fn verify_crc(&self, entry: &ZipEntry) -> Result<()> {
        let data = self.entry_bytes(entry);
        let crc = if data.len() <= CRC_CHUNK {
            crc32fast::hash(data)
        } else {
            data.par_chunks(CRC_CHUNK)
                .map(|c| {
                    let mut h = crc32fast::Hasher::new();
                    h.update(c);
                    h
                })
                .reduce_with(|mut a, b| {
                    a.combine(&b);
                    a
                })
                .map_or(0, |h| h.finalize())
        };
        self.check_crc(entry, crc)
    }

    /// Compare a CRC-32 computed elsewhere (e.g. while copying) with the one the archive records.
    pub fn check_crc(&self, entry: &ZipEntry, crc: u32) -> Result<()> {
        if crc != entry.crc32 {
            return Err(Error::entry(
                &self.path,
                &entry.name,
                format!(
                    "CRC-32 mismatch (stored {:08x}, data {crc:08x}): the file is corrupt",
                    entry.crc32
                ),
            ));
        }
        Ok(())
    }

    fn check_byteorder(&self) -> Result<()> {
        let Some(entry) = self.entry("byteorder") else {
            return Ok(()); // Written since torch 1.11; older files are little-endian.
        };
        match self.entry_bytes(entry).trim_ascii() {
            b"little" => Ok(()),
            b"big" => Err(Error::BigEndian {
                path: self.path.clone(),
            }),
            other => Err(Error::entry(
                &self.path,
                &entry.name,
                format!("unknown byte order {:?}", String::from_utf8_lossy(other)),
            )),
        }
    }
}

/// Little-endian field reader over a bounds-checked record.
struct Record<'a>(&'a [u8]);

impl Record<'_> {
    fn u16(&self, at: usize) -> u16 {
        u16::from_le_bytes([self.0[at], self.0[at + 1]])
    }
    fn u32(&self, at: usize) -> u32 {
        u32::from_le_bytes(self.0[at..at + 4].try_into().expect("4 bytes"))
    }
    fn u64(&self, at: usize) -> u64 {
        u64::from_le_bytes(self.0[at..at + 8].try_into().expect("8 bytes"))
    }
}

/// `len` bytes at `offset`, or an error naming `what` if they are not all inside the file.
fn slice<'a>(
    path: &Path,
    bytes: &'a [u8],
    offset: u64,
    len: usize,
    what: &str,
) -> Result<Record<'a>> {
    usize::try_from(offset)
        .ok()
        .and_then(|start| Some((start, start.checked_add(len)?)))
        .filter(|&(_, end)| end <= bytes.len())
        .map(|(start, end)| Record(&bytes[start..end]))
        .ok_or_else(|| {
            Error::zip(
                path,
                format!(
                    "{what} at offset {offset} (+{len} bytes) lies outside the {}-byte file",
                    bytes.len()
                ),
            )
        })
}

/// Where the central directory is and how many entries it claims.
struct Directory {
    offset: u64,
    size: u64,
    count: u64,
}

fn find_directory(path: &Path, bytes: &[u8]) -> Result<Directory> {
    if bytes.len() < EOCD_LEN {
        return Err(Error::zip(path, "file too short for a zip archive"));
    }
    let lowest = bytes.len().saturating_sub(EOCD_LEN + MAX_COMMENT);
    let eocd = (lowest..=bytes.len().saturating_sub(EOCD_LEN))
        .rev()
        .find(|&i| bytes[i..i + 4] == EOCD_SIG.to_le_bytes())
        .ok_or_else(|| Error::zip(path, "no end-of-central-directory record (truncated file?)"))?;
    let rec = Record(&bytes[eocd..eocd + EOCD_LEN]);
    let mut dir = Directory {
        count: rec.u16(10).into(),
        size: rec.u32(12).into(),
        offset: rec.u32(16).into(),
    };
    if rec.u16(4) != 0 || rec.u16(6) != 0 {
        return Err(Error::zip(path, "multi-disk archives are not supported"));
    }
    // The ZIP64 locator sits right before the EOCD; when present its record is authoritative.
    if let Some(at) = eocd.checked_sub(LOCATOR64_LEN) {
        let loc = Record(&bytes[at..eocd]);
        if loc.u32(0) == LOCATOR64_SIG {
            let rec = slice(path, bytes, loc.u64(8), EOCD64_LEN, "ZIP64 end record")?;
            if rec.u32(0) != EOCD64_SIG {
                return Err(Error::zip(
                    path,
                    "bad ZIP64 end-of-central-directory signature",
                ));
            }
            dir = Directory {
                count: rec.u64(32),
                size: rec.u64(40),
                offset: rec.u64(48),
            };
        }
    }
    Ok(dir)
}

fn read_central_directory(
    path: &Path,
    bytes: &[u8],
) -> Result<(String, HashMap<String, ZipEntry>)> {
    let dir = find_directory(path, bytes)?;
    let size =
        usize::try_from(dir.size).map_err(|_| Error::zip(path, "central directory too large"))?;
    let cd = slice(path, bytes, dir.offset, size, "central directory")?.0;
    // Every entry takes at least CENTRAL_LEN bytes: a count beyond that is a lie, refused before allocating.
    if dir.count > (cd.len() / CENTRAL_LEN) as u64 {
        return Err(Error::zip(
            path,
            format!(
                "{} entries claimed in a {}-byte central directory",
                dir.count,
                cd.len()
            ),
        ));
    }
    let mut entries = HashMap::with_capacity(dir.count as usize);
    let mut root: Option<String> = None;
    let mut at = 0usize;
    for _ in 0..dir.count {
        let fixed = cd
            .get(at..at + CENTRAL_LEN)
            .map(Record)
            .ok_or_else(|| Error::zip(path, "central directory ends inside an entry"))?;
        if fixed.u32(0) != CENTRAL_SIG {
            return Err(Error::zip(
                path,
                format!("bad central directory signature at +{at}"),
            ));
        }
        let (name_len, extra_len, comment_len) = (
            fixed.u16(28) as usize,
            fixed.u16(30) as usize,
            fixed.u16(32) as usize,
        );
        let var_start = at + CENTRAL_LEN;
        let var = cd
            .get(var_start..var_start + name_len + extra_len + comment_len)
            .ok_or_else(|| Error::zip(path, "central directory ends inside an entry"))?;
        let name = std::str::from_utf8(&var[..name_len])
            .map_err(|_| Error::zip(path, "entry name is not UTF-8"))?
            .to_owned();
        let extra = &var[name_len..name_len + extra_len];
        at = var_start + var.len();

        check_name(path, &name)?;
        let (folder, rest) = name.split_once('/').unwrap_or(("", &name));
        let root = root.get_or_insert_with(|| folder.to_owned());
        if folder.is_empty() || folder != root.as_str() {
            return Err(Error::entry(
                path,
                &name,
                format!("outside the archive's root folder `{root}/`"),
            ));
        }
        if fixed.u16(8) & 1 != 0 {
            return Err(Error::entry(
                path,
                &name,
                "encrypted entries are not supported",
            ));
        }
        let method = fixed.u16(10);
        if method != 0 {
            return Err(Error::entry(
                path,
                &name,
                format!("compressed (method {method}); torch.save stores entries uncompressed"),
            ));
        }
        let mut sizes = [
            u64::from(fixed.u32(24)),
            u64::from(fixed.u32(20)),
            u64::from(fixed.u32(42)),
        ];
        apply_zip64_extra(path, &name, extra, &mut sizes)?;
        let [len, compressed, local] = sizes;
        if len != compressed {
            return Err(Error::entry(
                path,
                &name,
                "stored entry with differing sizes",
            ));
        }
        let local_hdr = slice(path, bytes, local, LOCAL_LEN, "local header")?;
        if local_hdr.u32(0) != LOCAL_SIG {
            return Err(Error::entry(path, &name, "bad local header signature"));
        }
        let start =
            local + LOCAL_LEN as u64 + u64::from(local_hdr.u16(26)) + u64::from(local_hdr.u16(28));
        let len = usize::try_from(len).map_err(|_| Error::entry(path, &name, "entry too large"))?;
        let data = slice(path, bytes, start, len, "entry data")
            .map_err(|e| Error::entry(path, &name, e.to_string()))?;
        let entry = ZipEntry {
            start: data.0.as_ptr() as usize - bytes.as_ptr() as usize,
            len,
            crc32: fixed.u32(16),
            name: name.clone(),
        };
        if entries.insert(rest.to_owned(), entry).is_some() {
            return Err(Error::entry(path, &name, "duplicate entry"));
        }
    }
    let root = root.ok_or_else(|| Error::zip(path, "archive has no entries"))?;
    check_disjoint(path, &entries)?;
    Ok((root, entries))
}

/// torch.save never lets two entries share bytes; overlapping entries (the "overlapped zip bomb" trick)
/// would let one stored byte range pass for several storages, so they are refused.
fn check_disjoint(path: &Path, entries: &HashMap<String, ZipEntry>) -> Result<()> {
    let mut ranges: Vec<&ZipEntry> = entries.values().filter(|e| e.len > 0).collect();
    ranges.sort_unstable_by(|a, b| (a.start, &a.name).cmp(&(b.start, &b.name)));
    for pair in ranges.windows(2) {
        let (a, b) = (pair[0], pair[1]);
        if a.start + a.len > b.start {
            return Err(Error::entry(
                path,
                &b.name,
                format!("its data overlaps entry `{}`", a.name),
            ));
        }
    }
    Ok(())
}

/// Zip-slip and friends: names that could escape a directory if anyone ever extracted the archive.
fn check_name(path: &Path, name: &str) -> Result<()> {
    let reason = if name.contains("..") {
        "contains `..`"
    } else if name.starts_with('/') || name.starts_with('\\') {
        "is absolute"
    } else if name.contains('\0') {
        "contains a NUL byte"
    } else if name.contains('\\') {
        "contains a backslash"
    } else {
        return Ok(());
    };
    Err(Error::entry(path, name, format!("unsafe name: {reason}")))
}

/// Replace the 0xFFFFFFFF placeholders in `[size, compressed size, local offset]` from the ZIP64 extra
/// field (id 1), whose values appear in that order, only for the fields that overflowed.
fn apply_zip64_extra(path: &Path, name: &str, extra: &[u8], fields: &mut [u64; 3]) -> Result<()> {
    let mut rest = extra;
    while rest.len() >= 4 {
        let id = u16::from_le_bytes([rest[0], rest[1]]);
        let len = u16::from_le_bytes([rest[2], rest[3]]) as usize;
        let body = rest
            .get(4..4 + len)
            .ok_or_else(|| Error::entry(path, name, "extra field runs past its header"))?;
        if id == 1 {
            let mut values = body
                .chunks_exact(8)
                .map(|c| u64::from_le_bytes(c.try_into().expect("8")));
            for field in fields.iter_mut().filter(|f| **f == u64::from(u32::MAX)) {
                *field = values
                    .next()
                    .ok_or_else(|| Error::entry(path, name, "ZIP64 extra field too short"))?;
            }
            return Ok(());
        }
        rest = &rest[4 + len..];
    }
    if fields.iter().any(|&f| f == u64::from(u32::MAX)) {
        return Err(Error::entry(
            path,
            name,
            "ZIP64 sizes without a ZIP64 extra field",
        ));
    }
    Ok(())
}
