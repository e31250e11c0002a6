//! What the fuzz targets share.

use fastadapter_core::pickle::Limits;

/// The default limits scaled down: a bomb is stopped by the same checks, after less work, so the
/// fuzzer spends its time on new inputs instead of walking 2^22 shared references each time.
pub fn fuzz_limits() -> Limits {
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
