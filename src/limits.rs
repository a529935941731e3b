//! Counted places per key (sessions per bench, startups per source address), freed on drop.

use std::collections::HashMap;
use std::hash::Hash;
use std::sync::{Arc, Mutex, MutexGuard};

/// At most `max` places per key at once.
#[derive(Debug)]
pub struct Quota<K: Hash + Eq> {
    max: u32,
    open: Arc<Mutex<HashMap<K, u32>>>,
}

/// One place in a [`Quota`], given back when dropped.
#[derive(Debug)]
pub struct Place<K: Hash + Eq> {
    key: K,
    open: Arc<Mutex<HashMap<K, u32>>>,
}

fn lock<K>(open: &Mutex<HashMap<K, u32>>) -> MutexGuard<'_, HashMap<K, u32>> {
    open.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl<K: Hash + Eq + Clone> Quota<K> {
    /// A quota of `max` places per key.
    pub fn new(max: u32) -> Self {
        Self {
            max,
            open: Arc::default(),
        }
    }

    /// A place for `key`, unless it has `max` already.
    pub fn claim(&self, key: &K) -> Option<Place<K>> {
        let mut open = lock(&self.open);
        let count = open.entry(key.clone()).or_insert(0);
        if *count >= self.max {
            return None;
        }
        *count += 1;
        Some(Place {
            key: key.clone(),
            open: self.open.clone(),
        })
    }

    /// Places taken for `key` now.
    pub fn taken(&self, key: &K) -> u32 {
        lock(&self.open).get(key).copied().unwrap_or(0)
    }
}

impl<K: Hash + Eq> Drop for Place<K> {
    fn drop(&mut self) {
        let mut open = lock(&self.open);
        if let Some(count) = open.get_mut(&self.key) {
            *count -= 1;
            if *count == 0 {
                open.remove(&self.key);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn places_are_counted_per_key_and_freed_on_drop() {
        let quota = Quota::new(2);
        let a1 = quota.claim(&"a").expect("first");
        let _a2 = quota.claim(&"a").expect("second");
        assert!(quota.claim(&"a").is_none());
        let _b = quota.claim(&"b").expect("other key");
        drop(a1);
        assert_eq!(quota.taken(&"a"), 1);
        assert!(quota.claim(&"a").is_some());
    }
}
