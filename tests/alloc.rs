//! No allocation per datagram in steady state: a counting global allocator around the shard's
//! per-datagram path (`benches/common/shard_path.rs`: `Endpoint::handle`, then the store's check
//! and append of every reading and the exchange record, as `daemon/src/shard.rs` does), for plain
//! CoAP CON and NON SenML JSON, CON SenML CBOR and a CON rkyv batch of 64 records. Group commits
//! run between batches as in the daemon; their allocations (per commit, not per datagram) are
//! not counted.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::time::Instant;

use sluice_protocol::EndpointConfig;

#[allow(dead_code)]
#[path = "../benches/common/shard_path.rs"]
mod shard_path;

use shard_path::{open_store, template, Shard, DATAGRAMS_PER_BATCH, DEVICES};

struct Counting;

thread_local! {
    /// Per thread: tests run in parallel, each counts its own allocations only.
    static COUNTING: Cell<bool> = const { Cell::new(false) };
    static ALLOCATIONS: Cell<u64> = const { Cell::new(0) };
}

fn count() {
    if COUNTING.with(Cell::get) {
        ALLOCATIONS.with(|n| n.set(n.get() + 1));
    }
}

fn allocations() -> u64 {
    ALLOCATIONS.with(Cell::get)
}

// SAFETY: forwards to the system allocator; only counts.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        count();
        unsafe { System.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        count();
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        count();
        unsafe { System.realloc(ptr, layout, new_size) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

/// The dedup table's bound in this test: small, so that warm-up fills it and the measured
/// datagrams run at the bound (each evicts the oldest entry), as a busy shard does.
const DEDUP_ENTRIES_MAX: usize = 1024;
const WARM_UP_DATAGRAMS: usize = 8 * DEDUP_ENTRIES_MAX;
const MEASURED_DATAGRAMS: usize = 4 * DEDUP_ENTRIES_MAX;

/// Allocations during the measured datagrams' per-datagram path.
fn allocations_per_datagram_path(scenario: &str) -> u64 {
    let templates: Vec<Vec<u8>> = (0..DEVICES).map(|d| template(scenario, d)).collect();
    let dir = tempfile::Builder::new()
        .prefix("sluice-alloc-")
        .tempdir()
        .expect("tempdir");
    let (_store, writer) = open_store(dir.path());
    let config = EndpointConfig {
        dedup_entries_max: DEDUP_ENTRIES_MAX,
        ..EndpointConfig::default()
    };
    let mut shard = Shard::new(config, writer);
    let now = Instant::now();
    let mut buffer = Vec::with_capacity(65_536);
    let mut counted = 0;
    for i in 0..WARM_UP_DATAGRAMS + MEASURED_DATAGRAMS {
        let measured = i >= WARM_UP_DATAGRAMS;
        let before = allocations();
        COUNTING.with(|c| c.set(true));
        shard.request(now, &templates, &mut buffer, i);
        COUNTING.with(|c| c.set(false));
        if measured {
            counted += allocations() - before;
        }
        if (i + 1) % DATAGRAMS_PER_BATCH == 0 {
            shard.commit();
        }
    }
    assert!(shard.endpoint.dedup_len() <= DEDUP_ENTRIES_MAX);
    assert!(
        shard.endpoint.counters().dedup_evictions > 0,
        "not at the bound"
    );
    counted
}

#[test]
fn the_counting_allocator_counts() {
    let before = allocations();
    COUNTING.with(|c| c.set(true));
    let boxed = std::hint::black_box(Box::new(7u64));
    COUNTING.with(|c| c.set(false));
    drop(boxed);
    assert_eq!(allocations() - before, 1);
}

#[test]
fn con_senml_json_allocates_nothing_per_datagram() {
    assert_eq!(allocations_per_datagram_path("con-json"), 0);
}

#[test]
fn non_senml_json_allocates_nothing_per_datagram() {
    assert_eq!(allocations_per_datagram_path("non-json"), 0);
}

#[test]
fn con_senml_cbor_allocates_nothing_per_datagram() {
    assert_eq!(allocations_per_datagram_path("con-cbor"), 0);
}

#[test]
fn rkyv_batch_of_64_allocates_nothing_per_datagram() {
    assert_eq!(allocations_per_datagram_path("rkyv-64"), 0);
}
