//! The shared execution-slot table: its segment, its layout and its lock.
//!
//! Fixed size, in shared memory when the library is preloaded (a
//! `shmem::Segment`): a header, `MAX_SLOTS` slot entries, the live counts
//! (`counters`), the waiters of `slots::wait`, the fair-share clock of
//! `slots::fair` and the ring of `slots::freed`. All of it sits behind one
//! LWLock that is held for a few hundred nanoseconds at a time (longer for
//! the rare scans: a reap, a rebuild of the fair-share map) and never across
//! SPI. What happens to an entry (taken, freed, revoked, reused) is
//! `entries`.
//!
//! Shared memory does not survive a restart or a crash; `grace_end` lets the
//! slot logic refuse grants for a while afterwards (`super::grace` decides
//! how long), so holders from before the restart learn from their next
//! heartbeat that their slot is gone before anyone else is admitted in their
//! place. Claimed jobs have a durable record, their queue: `restore` rebuilds
//! their slots from it (a database at a time, marked `KIND_RESTORED`), and
//! claiming in that database resumes then, grace or not.
use super::counters::{self, CounterKey, Counters, CREATED, DROPPED};
use super::fair::Clock;
use super::freed::Freed;
use crate::shmem::{self, LwLockGuard, Segment};
use pgrx::pg_sys;
use std::sync::atomic::{AtomicPtr, AtomicU64, Ordering};

pub const MAX_SLOTS: usize = crate::gucs::SLOT_TABLE_SIZE;
pub const RUN_ID_MAX: usize = 96;
/// Callers of acquire_execution_slot(..., wait => ...) waiting at once.
pub const MAX_WAITERS: usize = 1024;

pub const REFUSAL_REASONS: [&str; 5] = [
    "tenant_limit",
    "project_limit",
    "key_limit",
    "total_limit",
    "recovering",
];

pub const FREE: u8 = 0;
pub const LIVE: u8 = 1;
pub const REVOKED: u8 = 2;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum RevokeReason {
    None = 0,
    LeaseExpired = 1,
    DeadlineExceeded = 2,
    MemoryExceeded = 3,
}

impl RevokeReason {
    pub fn from_u8(v: u8) -> Self {
        match v {
            1 => RevokeReason::LeaseExpired,
            2 => RevokeReason::DeadlineExceeded,
            3 => RevokeReason::MemoryExceeded,
            _ => RevokeReason::None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            RevokeReason::None => "revoked",
            RevokeReason::LeaseExpired => "lease_expired",
            RevokeReason::DeadlineExceeded => "deadline_exceeded",
            RevokeReason::MemoryExceeded => "memory_exceeded",
        }
    }
}

#[derive(Clone, Copy)]
#[repr(C)]
pub struct Slot {
    pub id: [u8; 16],
    /// The database the slot was taken in: tenants are per database, so
    /// every count and listing is too.
    pub database: u32,
    pub tenant: [u8; 16],
    pub project: [u8; 16],
    pub has_project: bool,
    /// The digest of the concurrency key (`key_digest`), when it has one.
    pub key: [u8; 16],
    pub has_key: bool,
    /// Units the slot counts for under each of its keys (a claimed job's
    /// cost; 1 for acquire_execution_slot).
    pub cost: u32,
    /// A claimed job's digest (`claim_digest`): the slot can be found from
    /// its job when the job ends (`Table::claimed`).
    pub claim: [u8; 16],
    pub has_claim: bool,
    pub state: u8,
    pub reason: u8,
    /// The revocation has been announced (slot.revoked event).
    pub notified: bool,
    /// The pid of the backend announcing the revocation in its open
    /// transaction (0: none), so two reapers never announce it twice.
    pub announcer: i32,
    pub pid: i32,
    /// The top transaction that took the slot, if it had an id by then
    /// (claim_jobs makes sure it has: the tick leaves a claim alone until
    /// its transaction has ended).
    pub xid: u32,
    pub acquired_at: i64,
    pub lease_micros: i64,
    pub lease_expires: i64,
    /// i64::MAX when there is no execution_seconds limit.
    pub deadline: i64,
    /// -1 when there is no memory_bytes limit.
    pub memory_limit: i64,
    pub memory_peak: i64,
    pub revoked_at: i64,
    pub run_id_len: u8,
    pub run_id: [u8; RUN_ID_MAX],
}

#[repr(C)]
pub struct Header {
    pub started_at: i64,
    /// No slot is granted before this: `started_at` plus the restart grace
    /// in force when the server started (never a session's setting).
    pub grace_end: i64,
    /// The server started as a standby: the first acquire after its
    /// promotion starts a grace of this many microseconds (`super::grace`;
    /// the server's setting at its start, never a session's), as the old
    /// primary's holders may still run. 0: none.
    pub promotion_grace: i64,
    pub grants: AtomicU64,
    /// Refusals by reason (REFUSAL_REASONS); the total is their sum.
    pub refusals_by: [AtomicU64; 5],
    /// Jobs claimed by claim_jobs, and their cost.
    pub claims: AtomicU64,
    pub claimed_cost: AtomicU64,
    /// Jobs claim_jobs passed over, by reason (claimed::BLOCKED_REASONS).
    pub claim_blocked_by: [AtomicU64; 6],
    /// Revocations by RevokeReason (index = reason code); the total is their sum.
    pub revocations_by: [AtomicU64; 4],
    pub cursor: u32,
    pub live: u32,
    /// Waiters sleep on it; a slot that stops counting wakes them.
    pub wakeup: pg_sys::ConditionVariable,
    /// Entries in use in `waiters`, and the next waiter's ticket.
    pub waiting: u32,
    pub next_ticket: u64,
    /// The key of `keyed_hash`, from pg_strong_random at server start.
    pub hash_key: [u64; 2],
}

/// A caller waiting for room (see `slots::wait`). Free when `pid` is 0.
#[derive(Clone, Copy)]
#[repr(C)]
pub struct Waiter {
    pub pid: i32,
    pub database: u32,
    pub tenant: [u8; 16],
    /// Order of arrival.
    pub ticket: u64,
    /// Why its last try was refused: 1 + the index in REFUSAL_REASONS, 0
    /// before its first try.
    pub last_refusal: u8,
}

#[repr(C)]
pub struct Table {
    pub header: Header,
    pub slots: [Slot; MAX_SLOTS],
    /// Live counts per key, and per-database marks (`counters`).
    pub(super) counters: Counters,
    pub waiters: [Waiter; MAX_WAITERS],
    /// claim_jobs' fair share (`fair`): charged by each claim's grant.
    pub fair: Clock,
    /// The tenants whose slots stopped counting, latest last (`freed`).
    pub freed: Freed,
}

// Set once per process by the startup hook (inherited by forked backends).
static TABLE: AtomicPtr<Table> = AtomicPtr::new(std::ptr::null_mut());
static LOCK: AtomicPtr<pg_sys::LWLock> = AtomicPtr::new(std::ptr::null_mut());
const TRANCHE: &std::ffi::CStr = c"meshhook_limits";

pub static SEGMENT: Segment = Segment { request, startup };

unsafe fn request() {
    unsafe {
        pg_sys::RequestAddinShmemSpace(std::mem::size_of::<Table>());
        pg_sys::RequestNamedLWLockTranche(TRANCHE.as_ptr(), 1);
    }
}

unsafe fn startup() {
    unsafe {
        let (table, created) = shmem::init_struct::<Table>(c"meshhook_limits slot table");
        if created {
            // All-zero is an empty table; the start time goes in now, the
            // grace's end right after (`super::grace`).
            let now = pg_sys::GetCurrentTimestamp();
            (*table).header.started_at = now;
            pg_sys::ConditionVariableInit(&raw mut (*table).header.wakeup);
            let mut key = [0u8; 16];
            if !pg_sys::pg_strong_random(key.as_mut_ptr().cast(), key.len()) {
                key[..8].copy_from_slice(&now.to_le_bytes());
            }
            (*table).header.hash_key = [
                u64::from_le_bytes(key[..8].try_into().unwrap_or_default()),
                u64::from_le_bytes(key[8..].try_into().unwrap_or_default()),
            ];
        }
        counters::use_hash_key((*table).header.hash_key);
        TABLE.store(table, Ordering::Release);
        LOCK.store(
            &raw mut (*pg_sys::GetNamedLWLockTranche(TRANCHE.as_ptr())).lock,
            Ordering::Release,
        );
    }
}

/// Set when the restart grace ends. From `super::grace`'s startup only, in
/// the postmaster before any backend exists.
pub fn set_grace_end(end: i64, promotion_grace: i64) {
    let table = TABLE.load(Ordering::Acquire);
    if !table.is_null() {
        // SAFETY: the table lives in shared memory, and no other process
        // reads it yet.
        unsafe {
            (*table).header.grace_end = end;
            (*table).header.promotion_grace = promotion_grace;
        }
    }
}

/// The live slots, counted by the postmaster as it exits, when every other
/// process has exited: without the lock, which the postmaster cannot take.
/// None when there is no table.
pub fn live_slots_at_exit() -> Option<usize> {
    let table = TABLE.load(Ordering::Acquire);
    if table.is_null() {
        return None;
    }
    // SAFETY: the table lives in shared memory, and nobody else is left to
    // change it.
    let slots = unsafe { &(*table).slots };
    Some(slots.iter().filter(|s| s.state == LIVE).count())
}

/// True when the library was preloaded and the table exists in this process.
pub fn available() -> bool {
    shmem::preloaded() && !TABLE.load(Ordering::Acquire).is_null()
}

pub fn header() -> Option<&'static Header> {
    if !available() {
        return None;
    }
    // SAFETY: the table lives in shared memory for the life of the process.
    unsafe { Some(&(*TABLE.load(Ordering::Acquire)).header) }
}

/// The condition variable waiters sleep on (see `slots::wait`).
pub fn wakeup() -> Option<*mut pg_sys::ConditionVariable> {
    if !available() {
        return None;
    }
    // SAFETY: the table lives in shared memory for the life of the process;
    // a condition variable is used through its own spinlock.
    unsafe { Some(&raw mut (*TABLE.load(Ordering::Acquire)).header.wakeup) }
}

/// The table under its lock (exclusive or shared); released when dropped.
pub struct LockedTable {
    table: *mut Table,
    _lock: LwLockGuard,
}

impl LockedTable {
    pub fn exclusive() -> Option<LockedTable> {
        Self::acquire(pg_sys::LWLockMode::LW_EXCLUSIVE)
    }

    pub fn shared() -> Option<LockedTable> {
        Self::acquire(pg_sys::LWLockMode::LW_SHARED)
    }

    fn acquire(mode: pg_sys::LWLockMode::Type) -> Option<LockedTable> {
        if !available() {
            return None;
        }
        let (table, lock) = (TABLE.load(Ordering::Acquire), LOCK.load(Ordering::Acquire));
        // SAFETY: both were set by the startup hook before any backend forked.
        let lock = unsafe { LwLockGuard::acquire(lock, mode) };
        Some(LockedTable { table, _lock: lock })
    }

    pub fn table(&mut self) -> &mut Table {
        // SAFETY: the lock is held for as long as self lives.
        unsafe { &mut *self.table }
    }
}

impl Header {
    pub fn refusals(&self) -> u64 {
        self.refusals_by
            .iter()
            .map(|c| c.load(Ordering::Relaxed))
            .sum()
    }

    pub fn revocations(&self) -> u64 {
        self.revocations_by
            .iter()
            .map(|c| c.load(Ordering::Relaxed))
            .sum()
    }
}

/// The live counts, and what the table knows of each database since the
/// start (`counters` keeps them).
impl Table {
    pub fn count(&self, key: &CounterKey) -> u32 {
        self.counters.count(key)
    }

    /// Live slots per tenant of one database, for metrics.
    pub fn tenant_counts(&self, database: u32) -> Vec<([u8; 16], u32)> {
        self.counters.tenant_counts(database)
    }

    /// The claimed slots of `database` have been rebuilt from its queues
    /// since the server started (`super::restore`).
    pub fn restored(&self, database: u32) -> bool {
        self.counters.contains(&CounterKey::restored(database))
    }

    pub fn mark_restored(&mut self, database: u32) {
        if !self.restored(database) {
            self.counters.incr(&CounterKey::restored(database), 1);
        }
        self.set_restoring(database, None);
    }

    /// The extension was created in `database` after the server started
    /// (`super::grace`).
    pub fn created(&self, database: u32) -> bool {
        self.counters.get(&CounterKey::created(database)) == Some(CREATED)
    }

    /// Created since the start, unless it was dropped since the start.
    pub fn mark_created(&mut self, database: u32) {
        if self.counters.get(&CounterKey::created(database)).is_none() {
            self.counters.incr(&CounterKey::created(database), CREATED);
        }
    }

    /// Dropped since the start: no later create ends the grace.
    pub fn mark_dropped(&mut self, database: u32) {
        let key = CounterKey::created(database);
        let now = self.counters.get(&key).unwrap_or(0);
        if now < DROPPED {
            self.counters.incr(&key, DROPPED - now);
        }
    }

    /// The backend rebuilding `database`'s claimed slots, if any.
    pub fn restoring(&self, database: u32) -> Option<i32> {
        let pid = self.counters.get(&CounterKey::restoring(database))?;
        Some(pid as i32)
    }

    pub fn set_restoring(&mut self, database: u32, pid: Option<i32>) {
        let key = CounterKey::restoring(database);
        self.counters.remove(&key);
        if let Some(pid) = pid {
            self.counters.incr(&key, pid as u32);
        }
    }
}
