//! Any bytes as a safetensors file: the reader must return an error or a file whose every entry lies
//! inside it, back to back, with `numel * itemsize` bytes; header-only selection must not panic either.
#![no_main]

use fastadapter_core::reader::SafetensorsFile;
use fastadapter_core::select::KeySelector;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(file) = SafetensorsFile::from_bytes("fuzz.safetensors", data) else {
        return;
    };
    let mut next = file.header_len();
    for e in file.entries() {
        assert_eq!(e.start, next, "gap or overlap before `{}`", e.name);
        let bits = e
            .shape
            .iter()
            .fold(e.dtype.bitsize() as u128, |a, &d| a * d as u128);
        assert_eq!(8 * (e.end - e.start) as u128, bits, "size of `{}`", e.name);
        assert_eq!(file.tensor_bytes(&e.name).unwrap().len(), e.end - e.start);
        next = e.end;
    }
    assert_eq!(next, data.len(), "data does not end at the end of the file");
    let renames = [("^(.)".to_owned(), "x$1".to_owned())];
    let selector = KeySelector::new(Some("a".to_owned()), Some("[0-9]"), &renames).unwrap();
    let _ = selector.apply(file.entries());
});
