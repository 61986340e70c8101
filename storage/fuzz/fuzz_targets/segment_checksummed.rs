//! Arbitrary bytes read as a segment file after their checksums are rewritten (so mutations
//! reach frame, block and commit record decoding): no panic, and every frame the scan accepts
//! reads back consistently.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = sluice_storage::fuzz_segment_checksummed(data);
});
