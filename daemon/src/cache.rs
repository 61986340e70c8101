//! In-process cache of recent query answers, keyed by the normalised query (bytes written by
//! the handler, see `SeriesQuery::key` in http.rs). An entry carries
//! the version of the data it was computed from (the points of the series it covers, or the
//! store generation for device listings); a lookup with another version is a miss and drops the
//! entry, so a commit to a series invalidates exactly the answers that cover it.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use bytes::Bytes;

/// Total bytes of cached bodies: hot dashboards and scrapes fit, a bulk export does not evict
/// everything else (an answer larger than [`ENTRY_BYTES_MAX`] is never cached).
pub const CACHE_BYTES_MAX: usize = 64 << 20;
/// Largest body kept: a quarter of the cache, so a fleet-wide `/v1/latest` or `/v1/devices` of
/// about 250,000 devices (64 bytes each) is answered from memory until the next commit, and
/// four such answers still fit beside each other.
pub const ENTRY_BYTES_MAX: usize = CACHE_BYTES_MAX / 4;
/// Entries kept, whatever their size (bounds the key table).
pub const CACHE_ENTRIES_MAX: usize = 16_384;

/// A cached answer.
#[derive(Clone)]
pub struct Answer {
    pub content_type: &'static str,
    pub body: Bytes,
    /// The `Link: <...>; rel="next"` target of a page, if there is a next page.
    pub next: Option<String>,
    /// `body` gzip-compressed, once a client that accepts gzip asked for it.
    pub gzip: Option<Bytes>,
}

impl Answer {
    /// Bytes the answer holds (its body, and its compressed body if made).
    pub fn bytes(&self) -> usize {
        self.body.len() + self.gzip.as_ref().map_or(0, Bytes::len)
    }
}

struct Entry {
    version: u64,
    answer: Answer,
    /// Insertion stamp, to tell a live entry from a stale slot in the eviction queue.
    stamp: u64,
}

#[derive(Default)]
struct Inner {
    /// Keys come from requests: the hasher is seeded at random.
    entries: HashMap<Box<[u8]>, Entry, ahash::RandomState>,
    /// Keys in insertion order with their stamps; the oldest is evicted first.
    order: VecDeque<(Box<[u8]>, u64)>,
    bytes: usize,
    next_stamp: u64,
}

impl Inner {
    /// Drops the oldest entries until the bounds hold. Stale slots (replaced or dropped
    /// entries) are skipped; the queue holds at most one live slot per entry plus stale ones,
    /// and is trimmed whenever it outgrows the table.
    fn evict(&mut self) {
        while self.bytes > CACHE_BYTES_MAX
            || self.entries.len() > CACHE_ENTRIES_MAX
            || self.order.len() > 2 * CACHE_ENTRIES_MAX
        {
            let Some((key, stamp)) = self.order.pop_front() else {
                break;
            };
            if self.entries.get(&key).is_some_and(|e| e.stamp == stamp) {
                let evicted = self.entries.remove(&key).expect("entry just seen");
                self.bytes -= evicted.answer.bytes();
            }
        }
    }
}

#[derive(Default)]
pub struct QueryCache {
    inner: Mutex<Inner>,
    hits: AtomicU64,
    misses: AtomicU64,
}

impl QueryCache {
    pub fn get(&self, key: &[u8], version: u64) -> Option<Answer> {
        let mut inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        let found = match inner.entries.get(key) {
            Some(entry) if entry.version == version => Some(entry.answer.clone()),
            Some(_) => {
                let stale = inner.entries.remove(key).expect("entry just seen");
                inner.bytes -= stale.answer.bytes();
                None
            }
            None => None,
        };
        drop(inner);
        let counter = if found.is_some() {
            &self.hits
        } else {
            &self.misses
        };
        counter.fetch_add(1, Ordering::Relaxed);
        found
    }

    pub fn insert(&self, key: Vec<u8>, version: u64, mut answer: Answer) {
        if answer.body.len() > ENTRY_BYTES_MAX {
            return;
        }
        if answer.bytes() > ENTRY_BYTES_MAX {
            answer.gzip = None;
        }
        let key = key.into_boxed_slice();
        let mut inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        let stamp = inner.next_stamp;
        inner.next_stamp += 1;
        inner.bytes += answer.bytes();
        inner.order.push_back((key.clone(), stamp));
        let entry = Entry {
            version,
            answer,
            stamp,
        };
        if let Some(old) = inner.entries.insert(key, entry) {
            inner.bytes -= old.answer.bytes();
        }
        inner.evict();
    }

    /// Keeps `gzip` beside the entry of `key` if it is still the one of `version`.
    pub fn insert_gzip(&self, key: &[u8], version: u64, gzip: Bytes) {
        let mut inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        let Some(entry) = inner.entries.get_mut(key) else {
            return;
        };
        if entry.version != version
            || entry.answer.gzip.is_some()
            || entry.answer.body.len() + gzip.len() > ENTRY_BYTES_MAX
        {
            return;
        }
        let added = gzip.len();
        entry.answer.gzip = Some(gzip);
        inner.bytes += added;
        inner.evict();
    }

    /// (hits, misses, entries, bytes)
    pub fn stats(&self) -> (u64, u64, usize, usize) {
        let inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        (
            self.hits.load(Ordering::Relaxed),
            self.misses.load(Ordering::Relaxed),
            inner.entries.len(),
            inner.bytes,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn answer(len: usize) -> Answer {
        Answer {
            content_type: "application/json",
            body: Bytes::from(vec![b'x'; len]),
            next: None,
            gzip: None,
        }
    }

    #[test]
    fn a_new_version_misses_and_drops_the_entry() {
        let cache = QueryCache::default();
        assert!(cache.get(b"q", 1).is_none());
        cache.insert(b"q".to_vec(), 1, answer(10));
        assert!(cache.get(b"q", 1).is_some());
        assert!(cache.get(b"q", 2).is_none());
        assert!(cache.get(b"q", 1).is_none());
        assert_eq!(cache.stats(), (1, 3, 0, 0));
    }

    #[test]
    fn bytes_and_entries_stay_bounded() {
        let cache = QueryCache::default();
        for i in 0..(CACHE_BYTES_MAX / ENTRY_BYTES_MAX + 10) {
            cache.insert(format!("big-{i}").into_bytes(), 0, answer(ENTRY_BYTES_MAX));
        }
        assert!(cache.stats().3 <= CACHE_BYTES_MAX);
        assert!(cache.get(b"big-0", 0).is_none(), "the oldest was evicted");
        for i in 0..(CACHE_ENTRIES_MAX + 100) {
            cache.insert(format!("small-{i}").into_bytes(), 0, answer(1));
            cache.insert(b"same".to_vec(), i as u64, answer(1));
        }
        let (_, _, entries, _) = cache.stats();
        assert!(entries <= CACHE_ENTRIES_MAX);
        assert!(cache.inner.lock().unwrap().order.len() <= 2 * CACHE_ENTRIES_MAX + 1);
        cache.insert(b"huge".to_vec(), 0, answer(ENTRY_BYTES_MAX + 1));
        assert!(cache.get(b"huge", 0).is_none());
    }

    #[test]
    fn a_compressed_body_joins_its_entry_and_counts_in_its_bytes() {
        let cache = QueryCache::default();
        cache.insert(b"q".to_vec(), 1, answer(100));
        cache.insert_gzip(b"q", 2, Bytes::from_static(b"old version"));
        cache.insert_gzip(b"other", 1, Bytes::from_static(b"no such entry"));
        assert!(cache.get(b"q", 1).unwrap().gzip.is_none());
        cache.insert_gzip(b"q", 1, Bytes::from_static(b"gz"));
        assert_eq!(
            cache.get(b"q", 1).unwrap().gzip.as_deref(),
            Some(&b"gz"[..])
        );
        assert_eq!(cache.stats().3, 102);
        // A new version drops both.
        assert!(cache.get(b"q", 2).is_none());
        assert_eq!(cache.stats().3, 0);
        // Eviction counts the compressed bytes too.
        cache.insert(b"a".to_vec(), 0, answer(ENTRY_BYTES_MAX / 2));
        cache.insert_gzip(b"a", 0, Bytes::from(vec![0; ENTRY_BYTES_MAX / 2]));
        for i in 0..4 {
            cache.insert(format!("b{i}").into_bytes(), 0, answer(ENTRY_BYTES_MAX));
        }
        assert!(cache.stats().3 <= CACHE_BYTES_MAX);
        assert!(cache.get(b"a", 0).is_none(), "the oldest was evicted");
    }
}
