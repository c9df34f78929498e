//! The shared rate table: `BUCKETS` sets of `WAYS` entries behind
//! `PARTITIONS` LWLocks, in shared memory when the library is preloaded (a
//! `shmem::Segment`). See the parent module for what an entry is for and how
//! a full set gives an entry away, and `gcra` for what its `tat` means.
use crate::shmem::{self, LwLockGuard, Segment};
use pgrx::pg_sys;
use std::sync::atomic::{AtomicPtr, AtomicU64, Ordering};

pub const BUCKETS: usize = 4096;
pub const WAYS: usize = 8;
const PARTITIONS: usize = 16;
pub const KEY_MAX: usize = 64;
const TRANCHE: &std::ffi::CStr = c"meshhook_limits_rate";

#[derive(Clone, Copy)]
#[repr(C)]
pub struct Entry {
    used: bool,
    /// 0 for the tenant's bucket (keys are 1 to KEY_MAX bytes).
    key_len: u8,
    database: u32,
    tenant: [u8; 16],
    /// Nanoseconds since 2000-01-01 (PostgreSQL's epoch).
    pub tat: i64,
    pub paused_until: i64,
    key: [u8; KEY_MAX],
}

#[repr(C)]
pub struct RateTable {
    /// Random at server start: which set an entry lands in cannot be
    /// computed from outside, so no tenant can aim at another's set.
    seed: u64,
    pub allowed: AtomicU64,
    pub denied: AtomicU64,
    pub evictions: AtomicU64,
    sets: [[Entry; WAYS]; BUCKETS],
}

static RATE: AtomicPtr<RateTable> = AtomicPtr::new(std::ptr::null_mut());
static LOCKS: AtomicPtr<pg_sys::LWLockPadded> = AtomicPtr::new(std::ptr::null_mut());

pub static SEGMENT: Segment = Segment { request, startup };

unsafe fn request() {
    unsafe {
        pg_sys::RequestAddinShmemSpace(std::mem::size_of::<RateTable>());
        pg_sys::RequestNamedLWLockTranche(TRANCHE.as_ptr(), PARTITIONS as i32);
    }
}

unsafe fn startup() {
    unsafe {
        let (t, created) = shmem::init_struct::<RateTable>(c"meshhook_limits rate table");
        if created {
            let mut seed = [0u8; 8];
            if !pg_sys::pg_strong_random(seed.as_mut_ptr().cast(), 8) {
                seed = pg_sys::GetCurrentTimestamp().to_le_bytes();
            }
            (*t).seed = u64::from_le_bytes(seed);
        }
        RATE.store(t, Ordering::Release);
        LOCKS.store(
            pg_sys::GetNamedLWLockTranche(TRANCHE.as_ptr()),
            Ordering::Release,
        );
    }
}

pub fn table() -> Option<&'static RateTable> {
    let p = RATE.load(Ordering::Acquire);
    // SAFETY: set once by the startup hook; shared memory outlives the process.
    (!p.is_null()).then(|| unsafe { &*p })
}

/// The lock of one partition of the sets, exclusive, held until dropped.
fn lock_partition(partition: usize) -> Option<LwLockGuard> {
    let locks = LOCKS.load(Ordering::Acquire);
    if locks.is_null() || RATE.load(Ordering::Acquire).is_null() {
        return None;
    }
    // SAFETY: PARTITIONS locks were requested for this tranche.
    unsafe {
        let lock = &raw mut (*locks.add(partition % PARTITIONS)).lock;
        Some(LwLockGuard::acquire(lock, pg_sys::LWLockMode::LW_EXCLUSIVE))
    }
}

fn hash(seed: u64, database: u32, tenant: &[u8; 16], key: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325 ^ seed;
    let db = database.to_le_bytes();
    for b in db.iter().chain(tenant.iter()).chain(key.iter()) {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h ^ (h >> 29)
}

/// Find or make the entry of each `(key)` of `keys` (at most two, distinct)
/// for this database and tenant, and run `f` on them with their partitions
/// locked (in partition order, so two callers never deadlock).
pub fn with_entries<R>(
    tenant: &[u8; 16],
    keys: &[&[u8]],
    now: i64,
    f: impl FnOnce(&mut [&mut Entry]) -> R,
) -> Option<R> {
    let table = RATE.load(Ordering::Acquire);
    if table.is_null() {
        return None;
    }
    // SAFETY: set once by the startup hook; the seed never changes.
    let seed = unsafe { (*table).seed };
    let database = shmem::my_database();
    let sets: Vec<usize> = keys
        .iter()
        .map(|k| (hash(seed, database, tenant, k) as usize) % BUCKETS)
        .collect();
    let mut parts: Vec<usize> = sets.iter().map(|s| s % PARTITIONS).collect();
    parts.sort_unstable();
    parts.dedup();
    let mut guards = Vec::with_capacity(parts.len());
    for p in &parts {
        guards.push(lock_partition(*p)?);
    }
    // SAFETY: the partition locks cover these sets.
    let t = unsafe { &mut *table };
    let mut slots: Vec<(usize, usize)> = Vec::with_capacity(keys.len());
    for (key, &set_idx) in keys.iter().zip(&sets) {
        let taken: Vec<usize> = slots
            .iter()
            .filter(|(s, _)| *s == set_idx)
            .map(|(_, w)| *w)
            .collect();
        let set = &mut t.sets[set_idx];
        let found = set.iter().position(|e| {
            e.used
                && e.database == database
                && &e.tenant == tenant
                && &e.key[..e.key_len as usize] == *key
        });
        let way = match found {
            Some(i) => i,
            None => {
                let idle = |e: &Entry| !e.used || (e.tat <= now && e.paused_until <= now);
                let free = (0..WAYS).find(|i| !taken.contains(i) && idle(&set[*i]));
                let i = match free {
                    Some(i) => i,
                    None => {
                        t.evictions.fetch_add(1, Ordering::Relaxed);
                        (0..WAYS)
                            .filter(|i| !taken.contains(i))
                            .min_by_key(|&i| set[i].tat.max(set[i].paused_until))
                            .unwrap_or(0)
                    }
                };
                let mut k = [0u8; KEY_MAX];
                k[..key.len()].copy_from_slice(key);
                set[i] = Entry {
                    used: true,
                    key_len: key.len() as u8,
                    database,
                    tenant: *tenant,
                    tat: now,
                    paused_until: 0,
                    key: k,
                };
                i
            }
        };
        slots.push((set_idx, way));
    }
    let ptr: *mut RateTable = t;
    // SAFETY: distinct (set, way) pairs, so the references do not alias.
    let mut entries: Vec<&mut Entry> = slots
        .iter()
        .map(|&(s, w)| unsafe { &mut (*ptr).sets[s][w] })
        .collect();
    let r = f(&mut entries);
    drop(guards);
    Some(r)
}
