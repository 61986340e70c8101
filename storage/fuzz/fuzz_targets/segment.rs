//! Arbitrary bytes read as a segment file: recovery's scan, block validation and record access
//! never panic, whatever the bytes.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = sluice_storage::fuzz_segment(data);
});
