//! How many slots count under each key: an open-addressing map, in the slot
//! table, of live counts per tenant, project, concurrency key and database
//! total (`CounterKey`), keyed with the server's secret. The same map keeps
//! a few marks that are not counts: a claimed job's slot (`KIND_CLAIM`) and
//! what a database has been through since the start (`KIND_RESTORED`,
//! `KIND_RESTORING`, `KIND_CREATED`).
//!
//! Knows nothing of slots: `table` holds the map, `entries` counts a slot in
//! and out of it.
use std::sync::atomic::{AtomicU64, Ordering};

/// Power of two, at least twice the number of keys that can be live at once
/// (each slot counts under at most a tenant, a project and a concurrency
/// key, and all under the database's total).
const COUNTER_CAP: usize = 8 * crate::gucs::SLOT_TABLE_SIZE;

pub const KIND_TENANT: u8 = 1;
pub const KIND_PROJECT: u8 = 2;
/// A tenant's concurrency key (`concurrent_executions.<key>`); the key's
/// digest takes the place of the project.
pub const KIND_KEY: u8 = 3;
/// Every slot of a database (`concurrent_executions_total`).
pub const KIND_TOTAL: u8 = 4;
/// Not a count: a claimed job's digest, mapped to its slot's index + 1.
pub const KIND_CLAIM: u8 = 5;
/// Not a count: present (1) once the claimed slots of a database have been
/// rebuilt from its bound queues since the server started (`restore`).
pub const KIND_RESTORED: u8 = 6;
/// Not a count: the pid of the backend rebuilding a database's claimed
/// slots now (`restore`).
pub const KIND_RESTORING: u8 = 7;
/// Not a count: whether the extension was created in the database after the
/// server started, so no slot of it predates the start (`grace`).
pub const KIND_CREATED: u8 = 8;
/// The count of a `KIND_CREATED` mark: created since the start, or dropped
/// since the start (a later create does not end the grace: holders of the
/// dropped extension's slots may still run).
pub const CREATED: u32 = 1;
pub const DROPPED: u32 = 2;

/// What a live count is kept for: a tenant of a database, or a project of
/// a tenant of a database (projects are counted per tenant, so a tenant
/// naming another tenant's project id counts only against itself).
#[derive(Clone, Copy, PartialEq, Eq)]
#[repr(C)]
pub struct CounterKey {
    pub database: u32,
    pub tenant: [u8; 16],
    /// All zero for a tenant's count.
    pub project: [u8; 16],
    pub kind: u8,
}

impl CounterKey {
    pub fn tenant(database: u32, tenant: &[u8; 16]) -> Self {
        CounterKey {
            database,
            tenant: *tenant,
            project: [0; 16],
            kind: KIND_TENANT,
        }
    }

    pub fn project(database: u32, tenant: &[u8; 16], project: &[u8; 16]) -> Self {
        CounterKey {
            database,
            tenant: *tenant,
            project: *project,
            kind: KIND_PROJECT,
        }
    }

    pub fn key(database: u32, tenant: &[u8; 16], key: &[u8; 16]) -> Self {
        CounterKey {
            database,
            tenant: *tenant,
            project: *key,
            kind: KIND_KEY,
        }
    }

    pub fn claim(database: u32, digest: &[u8; 16]) -> Self {
        CounterKey {
            database,
            tenant: *digest,
            project: [0; 16],
            kind: KIND_CLAIM,
        }
    }

    pub fn total(database: u32) -> Self {
        CounterKey {
            database,
            tenant: [0; 16],
            project: [0; 16],
            kind: KIND_TOTAL,
        }
    }

    pub fn restored(database: u32) -> Self {
        CounterKey {
            database,
            tenant: [0; 16],
            project: [0; 16],
            kind: KIND_RESTORED,
        }
    }

    pub fn created(database: u32) -> Self {
        CounterKey {
            database,
            tenant: [0; 16],
            project: [0; 16],
            kind: KIND_CREATED,
        }
    }

    pub fn restoring(database: u32) -> Self {
        CounterKey {
            database,
            tenant: [0; 16],
            project: [0; 16],
            kind: KIND_RESTORING,
        }
    }
}

/// The digest a claimed job's slot is found by: its binding and its job
/// (pgmq: and the read that claimed it), as the claim's run id spells them.
pub fn claim_digest(binding: i64, job: &str) -> [u8; 16] {
    key_digest(&format!("{binding}/{job}"))
}

/// The 16-byte digest a concurrency key is counted under: two FNV-1a
/// passes with different offsets. Two keys that collide share one count,
/// which can only refuse early, never admit too many.
pub fn key_digest(key: &str) -> [u8; 16] {
    let pass = |offset: u64| {
        key.bytes().fold(offset, |h, b| {
            (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
        })
    };
    let mut d = [0u8; 16];
    d[..8].copy_from_slice(&pass(0xcbf2_9ce4_8422_2325).to_le_bytes());
    d[8..].copy_from_slice(&pass(0x6c62_272e_07bb_0142).to_le_bytes());
    d
}

/// The secret key of the open-addressing maps in shared memory (counts,
/// fair-share tags): chosen at server start, so nobody who picks tenant ids
/// (anyone who writes job data) can aim many of them at one probe chain.
static HASH_KEY: [AtomicU64; 2] = [AtomicU64::new(0), AtomicU64::new(0)];

/// This process hashes with `key`, the table's (`table`'s startup hook).
pub fn use_hash_key(key: [u64; 2]) {
    for (k, v) in HASH_KEY.iter().zip(key) {
        k.store(v, Ordering::Relaxed);
    }
}

/// SipHash-1-3 under the server's secret key of a map entry's fields.
pub fn keyed_hash(kind: u8, database: u32, tenant: &[u8; 16], project: &[u8]) -> u64 {
    use std::hash::Hasher;
    let mut h = siphasher::sip::SipHasher13::new_with_keys(
        HASH_KEY[0].load(Ordering::Relaxed),
        HASH_KEY[1].load(Ordering::Relaxed),
    );
    h.write_u8(kind);
    h.write_u32(database);
    h.write(tenant);
    h.write(project);
    h.finish()
}

fn hash(key: &CounterKey) -> usize {
    (keyed_hash(key.kind, key.database, &key.tenant, &key.project) as usize) & (COUNTER_CAP - 1)
}

#[derive(Clone, Copy)]
#[repr(C)]
struct Counter {
    key: CounterKey,
    count: u32,
}

/// The map itself, in shared memory (all-zero is empty); used under the
/// slot table's lock.
#[repr(C)]
pub struct Counters {
    entries: [Counter; COUNTER_CAP],
}

impl Counters {
    fn find(&self, key: &CounterKey) -> Result<usize, usize> {
        let mut i = hash(key);
        loop {
            let c = &self.entries[i];
            if c.key.kind == 0 {
                return Err(i);
            }
            if c.key == *key {
                return Ok(i);
            }
            i = (i + 1) & (COUNTER_CAP - 1);
        }
    }

    /// The count (or mark) under `key`, if it has one.
    pub fn get(&self, key: &CounterKey) -> Option<u32> {
        self.find(key).ok().map(|i| self.entries[i].count)
    }

    pub fn count(&self, key: &CounterKey) -> u32 {
        self.get(key).unwrap_or(0)
    }

    pub fn contains(&self, key: &CounterKey) -> bool {
        self.find(key).is_ok()
    }

    pub fn incr(&mut self, key: &CounterKey, n: u32) {
        match self.find(key) {
            Ok(i) => self.entries[i].count += n,
            Err(i) => {
                self.entries[i] = Counter {
                    key: *key,
                    count: n,
                }
            }
        }
    }

    /// Put `n` under `key`, whatever was there.
    pub fn set(&mut self, key: &CounterKey, n: u32) {
        match self.find(key) {
            Ok(i) => self.entries[i].count = n,
            Err(_) => self.incr(key, n),
        }
    }

    /// Take `key` out of the map, whatever its count.
    pub fn remove(&mut self, key: &CounterKey) {
        if let Some(n) = self.get(key) {
            self.decr(key, n);
        }
    }

    pub fn decr(&mut self, key: &CounterKey, n: u32) {
        let Ok(mut i) = self.find(key) else {
            return;
        };
        if self.entries[i].count > n {
            self.entries[i].count -= n;
            return;
        }
        // Backward-shift deletion keeps probe chains intact without tombstones.
        let mask = COUNTER_CAP - 1;
        let mut j = i;
        loop {
            self.entries[i].key.kind = 0;
            loop {
                j = (j + 1) & mask;
                if self.entries[j].key.kind == 0 {
                    return;
                }
                let home = hash(&self.entries[j].key);
                // Move j back to i when its home is not cyclically in (i, j].
                let in_range = if i <= j {
                    i < home && home <= j
                } else {
                    i < home || home <= j
                };
                if !in_range {
                    break;
                }
            }
            self.entries[i] = self.entries[j];
            i = j;
        }
    }

    /// Live slots per tenant of one database, for metrics.
    pub fn tenant_counts(&self, database: u32) -> Vec<([u8; 16], u32)> {
        self.entries
            .iter()
            .filter(|c| c.key.kind == KIND_TENANT && c.key.database == database && c.count > 0)
            .map(|c| (c.key.tenant, c.count))
            .collect()
    }

    /// Drop every count and mark of the databases that are `gone`.
    pub fn forget_databases(&mut self, gone: impl Fn(u32) -> bool) {
        let stale: Vec<(CounterKey, u32)> = self
            .entries
            .iter()
            .filter(|c| c.key.kind != 0 && gone(c.key.database))
            .map(|c| (c.key, c.count))
            .collect();
        for (key, count) in stale {
            self.decr(&key, count);
        }
    }
}
