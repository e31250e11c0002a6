//! Any bytes as `data.pkl`: the restricted unpickler and the state-dict walk must return an error or a
//! list of well-formed tensor views, within the default limits, and never run or resolve anything.
#![no_main]

use std::path::Path;

use fastadapter_core::state_dict::read_state_dict;
use fastadapter_fuzz::fuzz_limits;
use libfuzzer_sys::fuzz_target;

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
