//! Any bytes as `data.pkl`: the restricted unpickler and the state-dict walk must return an error or a
//! list of well-formed tensor views, within the default limits, and never run or resolve anything.
#![no_main]

use std::path::Path;

use fastadapter_core::pickle::Limits;
use fastadapter_core::state_dict::read_state_dict;
use libfuzzer_sys::fuzz_target;

/// The default limits scaled down: a bomb is stopped by the same checks, after less work, so the
/// fuzzer spends its time on new inputs instead of walking 2^22 shared references each time.
fn fuzz_limits() -> Limits {
    Limits {
        max_depth: 1_000,
        max_values: 1 << 16,
        max_memo: 1 << 16,
        max_items: 1 << 16,
        max_visits: 1 << 12,
        max_name_bytes: 1 << 20,
        max_expanded_bytes: 1 << 24,
    }
}

fuzz_target!(|data: &[u8]| {
    let Ok(sd) = read_state_dict(data, Path::new("fuzz.bin"), &fuzz_limits()) else {
        return;
    };
    for (name, t) in &sd.tensors {
        assert_eq!(
            t.shape.len(),
            t.stride.len(),
            "`{name}`: size and stride lengths"
        );
    }
});
