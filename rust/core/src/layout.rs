//! The on-disk layout of a safetensors file, computed before any byte is written.
//!
//! Byte identity with `safetensors` 0.8 comes from using its own pieces: tensors are ordered the way its
//! `prepare()` orders them (descending `Dtype`, whose declaration order is ascending alignment, then by
//! name as raw bytes), the header JSON is produced by serialising its `Metadata` with `serde_json`, and
//! the header is padded with spaces to a multiple of 8.

use std::collections::{HashMap, HashSet};

use safetensors::tensor::{Metadata, TensorInfo};
use safetensors::Dtype;

use crate::error::{Error, Result};

/// Largest header the readers accept (the `safetensors` crate's `MAX_HEADER_SIZE`).
pub const MAX_HEADER_SIZE: usize = 100_000_000;
const N_LEN: usize = std::mem::size_of::<u64>();

/// What the layout needs to know about one tensor: no data.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorMeta {
    pub name: String,
    pub dtype: Dtype,
    pub shape: Vec<usize>,
    pub nbytes: usize,
}

/// The planned file: header bytes (length prefix included) and where each input tensor goes.
#[derive(Debug, Clone)]
pub struct Layout {
    /// The first `header.len()` bytes of the file: u64 LE length, JSON, space padding.
    pub header: Vec<u8>,
    /// Indices into the input slice, in the order the tensors are stored in the file.
    pub order: Vec<usize>,
    /// Absolute file offset of each input tensor (indexed like the input, not like `order`).
    pub offsets: Vec<u64>,
    /// Total file length.
    pub total_len: u64,
}

/// Parse a safetensors dtype name such as `"BF16"`.
pub fn parse_dtype(name: &str) -> Option<Dtype> {
    serde_json::from_value(serde_json::Value::String(name.to_owned())).ok()
}

/// Bytes needed for `shape` elements of `dtype`, or why they cannot be stored.
pub fn expected_nbytes(dtype: Dtype, shape: &[usize]) -> std::result::Result<usize, String> {
    let numel = shape
        .iter()
        .try_fold(1usize, |acc, &d| acc.checked_mul(d))
        .ok_or_else(|| format!("shape {shape:?} overflows"))?;
    let bits = numel
        .checked_mul(dtype.bitsize())
        .ok_or_else(|| format!("shape {shape:?} overflows"))?;
    if bits % 8 != 0 {
        return Err(format!(
            "{numel} elements of {dtype} do not fill a whole number of bytes"
        ));
    }
    Ok(bits / 8)
}

/// Plan the file for `tensors` with optional `__metadata__`.
pub fn plan(tensors: &[TensorMeta], metadata: Option<HashMap<String, String>>) -> Result<Layout> {
    let mut seen = HashSet::with_capacity(tensors.len());
    for t in tensors {
        if !seen.insert(t.name.as_str()) {
            return Err(Error::DuplicateName(t.name.clone()));
        }
        let want = expected_nbytes(t.dtype, &t.shape).map_err(|r| Error::tensor(&t.name, r))?;
        if want != t.nbytes {
            return Err(Error::tensor(
                &t.name,
                format!(
                    "{} bytes given, but {} {:?} needs {want}",
                    t.nbytes, t.dtype, t.shape
                ),
            ));
        }
    }

    let mut order: Vec<usize> = (0..tensors.len()).collect();
    order.sort_by(|&l, &r| {
        let (l, r) = (&tensors[l], &tensors[r]);
        r.dtype.cmp(&l.dtype).then_with(|| l.name.cmp(&r.name))
    });

    let mut relative = vec![0usize; tensors.len()];
    let mut infos = Vec::with_capacity(tensors.len());
    let mut offset = 0usize;
    for &i in &order {
        let t = &tensors[i];
        relative[i] = offset;
        let end = offset + t.nbytes;
        infos.push((
            t.name.clone(),
            TensorInfo {
                dtype: t.dtype,
                shape: t.shape.clone(),
                data_offsets: (offset, end),
            },
        ));
        offset = end;
    }

    let json = if infos.is_empty() && metadata.as_ref().is_some_and(|m| m.is_empty()) {
        // safetensors 0.8 serialises this one case as `{},"__metadata__":{}}`, which no reader (its own
        // included) accepts. Byte identity is not worth an unreadable file: write what it meant.
        br#"{"__metadata__":{}}"#.to_vec()
    } else {
        let meta =
            Metadata::new(metadata, infos).map_err(|e| Error::tensor("<header>", e.to_string()))?;
        serde_json::to_vec(&meta).map_err(|e| Error::tensor("<header>", e.to_string()))?
    };
    let padded = json.len().next_multiple_of(N_LEN);
    if padded > MAX_HEADER_SIZE {
        return Err(Error::tensor(
            "<header>",
            format!(
                "header of {padded} bytes exceeds the {MAX_HEADER_SIZE}-byte limit readers enforce"
            ),
        ));
    }
    let mut header = Vec::with_capacity(N_LEN + padded);
    header.extend_from_slice(&(padded as u64).to_le_bytes());
    header.extend_from_slice(&json);
    header.resize(N_LEN + padded, b' ');

    let base = header.len() as u64;
    Ok(Layout {
        offsets: relative.iter().map(|&r| base + r as u64).collect(),
        total_len: base + offset as u64,
        header,
        order,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn no_tensors_and_empty_metadata_is_a_readable_file() {
        use safetensors::SafeTensors;
        let layout = plan(&[], Some(HashMap::new())).unwrap();
        let (n, meta) = SafeTensors::read_metadata(&layout.header).unwrap();
        assert_eq!(n + 8, layout.header.len());
        assert_eq!(meta.metadata().as_ref().map(|m| m.len()), Some(0));
    }

    fn meta(name: &str, dtype: Dtype, shape: &[usize]) -> TensorMeta {
        let nbytes = expected_nbytes(dtype, shape).unwrap();
        TensorMeta {
            name: name.into(),
            dtype,
            shape: shape.to_vec(),
            nbytes,
        }
    }

    fn header_json(layout: &Layout) -> String {
        String::from_utf8(layout.header[8..].to_vec())
            .unwrap()
            .trim_end()
            .to_owned()
    }

    #[test]
    fn orders_by_descending_alignment_then_raw_name_bytes() {
        let tensors = [
            meta("b.2", Dtype::F32, &[1]),
            meta("b.10", Dtype::F32, &[1]),
            meta("a", Dtype::BF16, &[2]),
            meta("z", Dtype::I64, &[1]),
            meta("m", Dtype::U8, &[3]),
            meta("B", Dtype::F32, &[1]),
        ];
        let layout = plan(&tensors, None).unwrap();
        let names: Vec<_> = layout
            .order
            .iter()
            .map(|&i| tensors[i].name.as_str())
            .collect();
        assert_eq!(names, ["z", "B", "b.10", "b.2", "a", "m"]);
    }

    #[test]
    fn header_bytes_match_the_safetensors_crate() {
        // The crate's own serializer is the oracle: same inputs, same bytes.
        let tensors = [
            meta("w.lora_B.weight", Dtype::F32, &[8, 2]),
            meta("w.lora_A.weight", Dtype::F32, &[2, 4]),
            meta("e", Dtype::BF16, &[3]),
        ];
        let md: HashMap<String, String> = [("format".to_string(), "pt".to_string())].into();
        let layout = plan(&tensors, Some(md.clone())).unwrap();
        let data: Vec<Vec<u8>> = tensors.iter().map(|t| vec![7u8; t.nbytes]).collect();
        let views: Vec<(String, safetensors::tensor::TensorView)> = tensors
            .iter()
            .zip(&data)
            .map(|(t, d)| {
                (
                    t.name.clone(),
                    safetensors::tensor::TensorView::new(t.dtype, t.shape.clone(), d).unwrap(),
                )
            })
            .collect();
        let expected = safetensors::serialize(views, Some(md)).unwrap();
        assert_eq!(&expected[..layout.header.len()], &layout.header[..]);
        assert_eq!(expected.len() as u64, layout.total_len);
    }

    #[test]
    fn header_is_padded_with_spaces_to_eight_bytes() {
        for n in 1..20 {
            let name = "x".repeat(n);
            let layout = plan(&[meta(&name, Dtype::F32, &[1])], None).unwrap();
            assert_eq!(layout.header.len() % 8, 0);
            let len = u64::from_le_bytes(layout.header[..8].try_into().unwrap()) as usize;
            assert_eq!(len + 8, layout.header.len());
            let json = header_json(&layout);
            assert!(layout.header[8 + json.len()..].iter().all(|&b| b == b' '));
        }
    }

    #[test]
    fn metadata_comes_first_and_offsets_are_absolute() {
        let tensors = [meta("a", Dtype::F32, &[2]), meta("b", Dtype::F32, &[3])];
        let md: HashMap<String, String> = [("format".to_string(), "pt".to_string())].into();
        let layout = plan(&tensors, Some(md)).unwrap();
        assert!(header_json(&layout).starts_with(r#"{"__metadata__":{"format":"pt"},"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}"#));
        let base = layout.header.len() as u64;
        assert_eq!(layout.offsets, [base, base + 8]);
        assert_eq!(layout.total_len, base + 20);
    }

    #[test]
    fn empty_file_is_just_a_header() {
        let layout = plan(&[], None).unwrap();
        assert_eq!(&layout.header[8..10], b"{}");
        assert_eq!(layout.total_len, 16);
    }

    #[test]
    fn refuses_duplicates_and_wrong_sizes() {
        let dup = [meta("a", Dtype::F32, &[1]), meta("a", Dtype::F16, &[2])];
        assert!(matches!(plan(&dup, None), Err(Error::DuplicateName(n)) if n == "a"));

        let mut bad = meta("w", Dtype::F32, &[2, 3]);
        bad.nbytes = 23;
        let err = plan(&[bad], None).unwrap_err().to_string();
        assert!(
            err.contains("tensor `w`") && err.contains("needs 24"),
            "{err}"
        );

        let overflow = TensorMeta {
            name: "o".into(),
            dtype: Dtype::F32,
            shape: vec![usize::MAX, 2],
            nbytes: 0,
        };
        assert!(plan(&[overflow], None)
            .unwrap_err()
            .to_string()
            .contains("overflows"));
    }

    #[test]
    fn parses_every_dtype_name() {
        for name in [
            "F64", "F32", "F16", "BF16", "I64", "I32", "I16", "I8", "U8", "BOOL", "F8_E4M3",
            "F8_E5M2", "U64", "U32", "U16", "C64",
        ] {
            assert!(parse_dtype(name).is_some(), "{name}");
        }
        assert!(parse_dtype("F128").is_none());
    }
}
