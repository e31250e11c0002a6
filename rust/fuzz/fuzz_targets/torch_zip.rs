//! Any bytes as a torch.save checkpoint, through the whole converter: zip container, restricted pickle,
//! view resolution and gathering, the writer, and verification. It must return an error, or publish a
//! safetensors file that our reader accepts with one entry per converted tensor.
#![no_main]

use std::path::PathBuf;
use std::sync::OnceLock;

use fastadapter_core::convert::{convert_zip, ConvertOptions};
use fastadapter_core::reader::SafetensorsFile;
use fastadapter_core::torch_zip::TorchZip;
use fastadapter_fuzz::fuzz_limits;
use libfuzzer_sys::fuzz_target;

fn out_dir() -> &'static PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let base = std::path::Path::new("/dev/shm");
        let dir = if base.is_dir() {
            tempfile::tempdir_in(base)
        } else {
            tempfile::tempdir()
        };
        dir.expect("temp dir").keep()
    })
}

fuzz_target!(|data: &[u8]| {
    let Ok(zip) = TorchZip::from_bytes("fuzz.bin", data) else {
        return;
    };
    let dst = out_dir().join("out.safetensors");
    let options = ConvertOptions {
        verify: true,
        limits: fuzz_limits(),
        ..ConvertOptions::default()
    };
    match convert_zip(&zip, &dst, &options) {
        Ok(report) => {
            let out = SafetensorsFile::open(&dst).expect("published output must be valid");
            assert_eq!(out.entries().len(), report.tensors);
            std::fs::remove_file(&dst).unwrap();
        }
        Err(_) => assert!(!dst.exists(), "a failed conversion published its output"),
    }
});
