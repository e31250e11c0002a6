//! torch itself is the oracle: `tests/gen_fixtures.py` saved each fixture with `torch.save` and dumped
//! what `torch.load(weights_only=True)` returns (dtype, shape, sha256 of the contiguous bytes). Hostile
//! fixtures must be refused with an error that names the problem, quickly.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use fastadapter_core::convert::convert_zip;
use fastadapter_core::torch_zip::TorchZip;
use fastadapter_core::{convert_file, inspect_torch, ConvertOptions, ConvertReport, Error};
use safetensors::SafeTensors;
use sha2::{Digest, Sha256};

const NORMAL: &[&str] = &[
    "every_dtype",
    "views",
    "shared",
    "params_nested",
    "gpt2",
    "linear_metadata",
    "renamed_root_x",
];

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

#[derive(Debug, PartialEq)]
struct Ref {
    dtype: String,
    shape: Vec<usize>,
    sha256: String,
    nbytes: usize,
}

fn reference(name: &str) -> BTreeMap<String, Ref> {
    let text = std::fs::read_to_string(fixture(&format!("{name}.json"))).unwrap();
    let json: serde_json::Value = serde_json::from_str(&text).unwrap();
    json.as_object()
        .unwrap()
        .iter()
        .map(|(k, v)| {
            let r = Ref {
                dtype: v["dtype"].as_str().unwrap().to_owned(),
                shape: v["shape"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|d| d.as_u64().unwrap() as usize)
                    .collect(),
                sha256: v["sha256"].as_str().unwrap().to_owned(),
                nbytes: v["nbytes"].as_u64().unwrap() as usize,
            };
            (k.clone(), r)
        })
        .collect()
}

fn convert(name: &str, dir: &Path) -> (ConvertReport, Vec<u8>) {
    let dst = dir.join(format!("{name}.safetensors"));
    let options = ConvertOptions {
        verify: true,
        ..Default::default()
    };
    let report = convert_file(fixture(&format!("{name}.bin")), &dst, &options)
        .unwrap_or_else(|e| panic!("{name}: {e}"));
    (report, std::fs::read(dst).unwrap())
}

#[test]
fn inspect_matches_torch() {
    for name in NORMAL {
        let want = reference(name);
        let got: BTreeMap<String, (String, Vec<usize>, usize)> =
            inspect_torch(fixture(&format!("{name}.bin")))
                .unwrap()
                .into_iter()
                .map(|t| {
                    let dtype = format!("{:?}", t.dtype.safetensors.unwrap());
                    (t.name, (dtype, t.shape, t.nbytes))
                })
                .collect();
        let want: BTreeMap<String, (String, Vec<usize>, usize)> = want
            .into_iter()
            .map(|(k, r)| (k, (r.dtype, r.shape, r.nbytes)))
            .collect();
        assert_eq!(got, want, "{name}");
    }
}

#[test]
fn conversion_matches_torch_bytes() {
    let dir = tempfile::tempdir().unwrap();
    for name in NORMAL {
        let want = reference(name);
        let (report, bytes) = convert(name, dir.path());
        let st = SafeTensors::deserialize(&bytes).unwrap();
        let (_, meta) = SafeTensors::read_metadata(&bytes).unwrap();
        assert_eq!(meta.metadata().as_ref().unwrap()["format"], "pt");
        let mut got = BTreeMap::new();
        for (k, view) in st.tensors() {
            let r = Ref {
                dtype: format!("{:?}", view.dtype()),
                shape: view.shape().to_vec(),
                sha256: hex::encode(Sha256::digest(view.data())),
                nbytes: view.data().len(),
            };
            got.insert(k, r);
        }
        assert_eq!(got, want, "{name}");
        assert_eq!(report.tensors, want.len(), "{name}");
        assert_eq!(
            report.bytes,
            want.values().map(|r| r.nbytes as u64).sum::<u64>()
        );
    }
}

#[test]
fn reports_aliases_views_and_skipped_entries() {
    let dir = tempfile::tempdir().unwrap();
    let (shared, _) = convert("shared", dir.path());
    assert_eq!(shared.aliases_copied, 3); // b.weight, first_half and t all view a.weight's storage
    assert_eq!(shared.gathered, 1); // t

    let (views, _) = convert("views", dir.path());
    assert_eq!(views.gathered, 4, "col_slice, step, transposed, expanded");

    let (nested, _) = convert("params_nested", dir.path());
    let skipped: Vec<(&str, &str)> = nested
        .skipped
        .iter()
        .map(|s| (s.name.as_str(), s.kind))
        .collect();
    for want in [
        ("model._metadata", "dict"),
        ("nested.step", "int"),
        ("nested.name", "str"),
        ("nested.none", "None"),
        ("epoch", "int"),
    ] {
        assert!(skipped.contains(&want), "{want:?} not in {skipped:?}");
    }

    let (gpt2, _) = convert("gpt2", dir.path());
    assert!(gpt2.skipped.iter().any(|s| s.name == "_metadata"));
    assert!(gpt2.aliases_copied >= 1, "lm_head.weight ties wte.weight");
}

#[test]
fn requires_grad_and_storage_offsets_are_read() {
    let path = fixture("params_nested.bin");
    let pkl = fastadapter_core::torch_zip::TorchZip::open(&path).unwrap();
    let sd = fastadapter_core::state_dict::read_state_dict(
        pkl.data_pkl().unwrap(),
        &path,
        &Default::default(),
    )
    .unwrap();
    let get = |n: &str| &sd.tensors.iter().find(|(k, _)| k == n).unwrap().1;
    assert!(get("param").requires_grad);
    assert!(!get("frozen").requires_grad);
    assert!(!get("nested.inner.v").requires_grad);

    let path = fixture("views.bin");
    let zip = fastadapter_core::torch_zip::TorchZip::open(&path).unwrap();
    let sd = fastadapter_core::state_dict::read_state_dict(
        zip.data_pkl().unwrap(),
        &path,
        &Default::default(),
    )
    .unwrap();
    let row = &sd.tensors.iter().find(|(k, _)| k == "row_slice").unwrap().1;
    assert_eq!(
        (row.storage_offset, row.shape.clone(), row.stride.clone()),
        (20, vec![2, 10], vec![10, 1])
    );
    assert_eq!(zip.root(), "views");
    for (_, t) in &sd.tensors {
        assert_eq!(
            zip.storage(&t.storage_key).unwrap().start % 64,
            0,
            "storages are 64-byte aligned"
        );
    }
}

/// Every hostile fixture, the error it must produce, and text its message must contain.
#[test]
fn hostile_fixtures_are_refused() {
    type Check = fn(&Error) -> bool;
    let unsafe_pickle: Check = |e| matches!(e, Error::UnsafePickle { .. });
    let pickle: Check = |e| matches!(e, Error::Pickle { .. });
    let zip_entry: Check = |e| matches!(e, Error::TorchZipEntry { .. });
    let zip: Check = |e| matches!(e, Error::TorchZip { .. });
    let cases: &[(&str, Check, &str)] = &[
        ("global_os_system", unsafe_pickle, "refused GLOBAL os.system: module `os` is blocked"),
        ("global_posix_system", unsafe_pickle, "refused GLOBAL posix.system"),
        ("global_builtins_eval", unsafe_pickle, "refused GLOBAL builtins.eval: not in"),
        ("global_builtins_exec", unsafe_pickle, "refused GLOBAL builtins.exec"),
        ("global_subprocess_Popen", unsafe_pickle, "refused GLOBAL subprocess.Popen"),
        ("reduce_class", unsafe_pickle, "refused GLOBAL posix.system"),
        ("inst_opcode", unsafe_pickle, "refused opcode INST (0x69)"),
        ("huge_binbytes", unsafe_pickle, "refused opcode BINBYTES (0x42)"),
        ("huge_unicode", pickle, "truncated: BINUNICODE needs 4294967280 bytes, 4 left"),
        ("truncated_pickle", pickle, "truncated"),
        ("stack_underflow", pickle, "SETITEMS without a MARK"),
        ("not_dict", pickle, "top-level object is a int, not a dict"),
        ("memo_bomb", pickle, "(shared-reference bomb?)"),
        ("deep_mark", pickle, "more than 1000 nested MARKs"),
        ("deep_list", pickle, "nesting deeper than 1000"),
        ("zip_slip", zip_entry, "zip entry `archive/../evil`: unsafe name: contains `..`"),
        ("other_root", zip_entry, "outside the archive's root folder `archive/`"),
        ("deflated", zip_entry, "zip entry `archive/data.pkl`: compressed (method 8)"),
        ("crc_flip", zip_entry, "zip entry `views/data/0`: CRC-32 mismatch"),
        ("truncated", zip, "no end-of-central-directory record"),
        ("missing_storage", zip, "storage `0` has no `archive/data/0` entry"),
        ("big_endian", |e| matches!(e, Error::BigEndian { .. }), "saved big-endian"),
        ("legacy", |e| matches!(e, Error::LegacyTorchFormat { .. }), "torch.save(torch.load(f, weights_only=True), f)"),
        ("oob_view", |e| matches!(e, Error::Tensor { .. }), "tensor `w`: view (offset 2, shape [4], stride [1]) of torch.float32 reaches past storage `0` (16 bytes)"),
        // Found by the torch_zip fuzz target: two storage entries on the same bytes tripped an assertion
        // in the CRC-while-copying bookkeeping.
        ("overlapping_entries", zip_entry, "zip entry `every_dtype/data/15`: its data overlaps entry `every_dtype/data/14`"),
        // Gathering this view used to abort the process on a 4 TiB allocation (issue #6).
        ("expand_bomb", |e| matches!(e, Error::Tensor { .. }), "tensor `w`: non-contiguous views would need 4398046511104 bytes in memory"),
    ];
    let dir = tempfile::tempdir().unwrap();
    for (name, check, text) in cases {
        let dst = dir.path().join(format!("{name}.safetensors"));
        let start = Instant::now();
        let err = convert_file(
            fixture(&format!("hostile/{name}.bin")),
            &dst,
            &ConvertOptions::default(),
        )
        .expect_err(name);
        let msg = err.to_string();
        assert!(
            start.elapsed() < Duration::from_secs(2),
            "{name} took {:?}",
            start.elapsed()
        );
        assert!(check(&err), "{name}: wrong kind: {err:?}");
        assert!(msg.contains(text), "{name}: `{msg}` lacks `{text}`");
        assert!(
            msg.contains(&format!("{name}.bin")),
            "{name}: `{msg}` names no file"
        );
        assert!(!dst.exists(), "{name}: output published");
    }
    let leftovers: Vec<_> = std::fs::read_dir(dir.path()).unwrap().collect();
    assert!(
        leftovers.is_empty(),
        "temp files left behind: {leftovers:?}"
    );
}

/// Every prefix of a real checkpoint is refused cleanly (no panic, no output), with the same message
/// whether it is read from a file or from memory (the fuzz targets read from memory).
#[test]
fn every_truncation_is_an_error() {
    let data = std::fs::read(fixture("views.bin")).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("cut.bin");
    let dst = dir.path().join("cut.safetensors");
    for len in (0..data.len()).step_by(7) {
        std::fs::write(&src, &data[..len]).unwrap();
        let from_file = convert_file(&src, &dst, &ConvertOptions::default()).expect_err("prefix");
        let from_bytes = TorchZip::from_bytes(&src, &data[..len])
            .and_then(|zip| convert_zip(&zip, &dst, &ConvertOptions::default()))
            .expect_err("prefix");
        assert_eq!(
            from_file.to_string(),
            from_bytes.to_string(),
            "prefix {len}"
        );
        assert!(!dst.exists());
    }
}

/// Every single-byte corruption of data.pkl is either refused or read (never a panic); with the CRC
/// check on, all are refused.
#[test]
fn pickle_corruption_never_panics() {
    let path = fixture("gpt2.bin");
    let zip = fastadapter_core::torch_zip::TorchZip::open(&path).unwrap();
    let pkl = zip.data_pkl().unwrap().to_vec();
    for i in 0..pkl.len() {
        for flip in [0x01u8, 0x80, 0xff] {
            let mut bad = pkl.clone();
            bad[i] ^= flip;
            let _ = fastadapter_core::state_dict::read_state_dict(&bad, &path, &Default::default());
        }
    }
}
