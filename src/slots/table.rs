//! The shared execution-slot table.
//!
//! Fixed size, in shared memory when the library is preloaded (a
//! `shmem::Segment`): a header, `MAX_SLOTS` slot entries, an
//! open-addressing table of live counts per tenant and per project, the
//! waiters of `slots::wait` and the fair-share clock of `slots::fair`. All of
//! it sits behind one LWLock that is held for a few hundred nanoseconds at a
//! time (longer for the rare scans: a reap, a rebuild of the fair-share
//! map) and never across SPI.
//!
//! Shared memory does not survive a restart or a crash; `grace_end` lets the
//! slot logic refuse grants for a while afterwards (`super::grace` decides
//! how long), so holders from before the restart learn from their next
//! heartbeat that their slot is gone before anyone else is admitted in their
//! place. Claimed jobs have a durable record, their queue: `restore` rebuilds
//! their slots from it (a database at a time, marked `KIND_RESTORED`), and
//! claiming in that database resumes then, grace or not.
use crate::shmem::{self, LwLockGuard, Segment};
use pgrx::pg_sys;
use std::sync::atomic::{AtomicPtr, AtomicU64, Ordering};

pub const MAX_SLOTS: usize = crate::gucs::SLOT_TABLE_SIZE;
/// Power of two, at least twice the number of keys that can be live at once
/// (each slot counts under at most a tenant, a project and a concurrency
/// key, and all under the database's total).
const COUNTER_CAP: usize = 8 * MAX_SLOTS;
pub const RUN_ID_MAX: usize = 96;
/// Callers of acquire_execution_slot(..., wait => ...) waiting at once.
pub const MAX_WAITERS: usize = 1024;
/// A revocation nobody announced within this long may give its entry away.
const UNANNOUNCED_TOMBSTONE_MICROS: i64 = 3_600_000_000;

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
/// Not a count: present (1) when the extension was created in the database
/// after the server started, so no slot of it predates the start (`grace`).
pub const KIND_CREATED: u8 = 8;

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

/// What a new live slot is made of (`Table::put_live`).
pub struct NewSlot<'a> {
    pub id: [u8; 16],
    pub database: u32,
    pub tenant: [u8; 16],
    pub project: Option<[u8; 16]>,
    pub key: Option<[u8; 16]>,
    pub cost: u32,
    pub claim: Option<[u8; 16]>,
    pub xid: u32,
    pub now: i64,
    pub lease_micros: i64,
    /// i64::MAX: none.
    pub deadline: i64,
    /// -1: none.
    pub memory_limit: i64,
    /// At most RUN_ID_MAX bytes.
    pub run_id: &'a str,
}

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

    /// Every key a slot counts under.
    fn all_of(s: &Slot) -> impl Iterator<Item = CounterKey> {
        [
            Some(Self::tenant(s.database, &s.tenant)),
            s.has_project
                .then(|| Self::project(s.database, &s.tenant, &s.project)),
            s.has_key.then(|| Self::key(s.database, &s.tenant, &s.key)),
            Some(Self::total(s.database)),
        ]
        .into_iter()
        .flatten()
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

#[derive(Clone, Copy)]
#[repr(C)]
struct Counter {
    key: CounterKey,
    count: u32,
}

#[repr(C)]
pub struct Header {
    pub started_at: i64,
    /// No slot is granted before this: `started_at` plus the restart grace
    /// in force when the server started (never a session's setting).
    pub grace_end: i64,
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
    counters: [Counter; COUNTER_CAP],
    pub waiters: [Waiter; MAX_WAITERS],
    /// claim_jobs' fair share (`fair`): charged by each claim's grant.
    pub fair: super::fair::Clock,
    /// The tenants whose slots stopped counting, latest last (`freed`).
    pub freed: super::freed::Freed,
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
        for (k, v) in HASH_KEY.iter().zip((*table).header.hash_key) {
            k.store(v, Ordering::Relaxed);
        }
        TABLE.store(table, Ordering::Release);
        LOCK.store(
            &raw mut (*pg_sys::GetNamedLWLockTranche(TRANCHE.as_ptr())).lock,
            Ordering::Release,
        );
    }
}

/// Drop everything the table holds of the databases `gone` (sorted): their
/// slots, counts, claim maps and restored marks, and their tenants'
/// fair-share tags. The launcher calls it when a database it saw is gone.
pub fn forget_databases(gone_ones: &[u32]) {
    let Some(mut locked) = LockedTable::exclusive() else {
        return;
    };
    let t = locked.table();
    let gone = |db: u32| gone_ones.binary_search(&db).is_ok();
    for idx in 0..MAX_SLOTS {
        let s = t.slots[idx];
        if s.state == FREE || !gone(s.database) {
            continue;
        }
        if s.state == LIVE {
            t.unmap_claim(idx);
            t.count_out(&s);
        }
        t.slots[idx].state = FREE;
    }
    let stale: Vec<(CounterKey, u32)> = t
        .counters
        .iter()
        .filter(|c| c.key.kind != 0 && gone(c.key.database))
        .map(|c| (c.key, c.count))
        .collect();
    for (key, count) in stale {
        t.decr(&key, count);
    }
    t.fair.forget_databases(gone_ones);
}

/// Set when the restart grace ends. From `super::grace`'s startup only, in
/// the postmaster before any backend exists.
pub fn set_grace_end(end: i64) {
    let table = TABLE.load(Ordering::Acquire);
    if !table.is_null() {
        // SAFETY: the table lives in shared memory, and no other process
        // reads it yet.
        unsafe { (*table).header.grace_end = end };
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

/// The secret key of the open-addressing maps in shared memory (counts,
/// fair-share tags): chosen at server start, so nobody who picks tenant ids
/// (anyone who writes job data) can aim many of them at one probe chain.
static HASH_KEY: [AtomicU64; 2] = [AtomicU64::new(0), AtomicU64::new(0)];

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

impl Table {
    fn find(&self, key: &CounterKey) -> Result<usize, usize> {
        let mut i = hash(key);
        loop {
            let c = &self.counters[i];
            if c.key.kind == 0 {
                return Err(i);
            }
            if c.key == *key {
                return Ok(i);
            }
            i = (i + 1) & (COUNTER_CAP - 1);
        }
    }

    pub fn count(&self, key: &CounterKey) -> u32 {
        match self.find(key) {
            Ok(i) => self.counters[i].count,
            Err(_) => 0,
        }
    }

    fn incr(&mut self, key: &CounterKey, n: u32) {
        match self.find(key) {
            Ok(i) => self.counters[i].count += n,
            Err(i) => {
                self.counters[i] = Counter {
                    key: *key,
                    count: n,
                }
            }
        }
    }

    fn decr(&mut self, key: &CounterKey, n: u32) {
        let Ok(mut i) = self.find(key) else {
            return;
        };
        if self.counters[i].count > n {
            self.counters[i].count -= n;
            return;
        }
        // Backward-shift deletion keeps probe chains intact without tombstones.
        let mask = COUNTER_CAP - 1;
        let mut j = i;
        loop {
            self.counters[i].key.kind = 0;
            loop {
                j = (j + 1) & mask;
                if self.counters[j].key.kind == 0 {
                    return;
                }
                let home = hash(&self.counters[j].key);
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
            self.counters[i] = self.counters[j];
            i = j;
        }
    }

    /// Count a newly live slot: its cost under each of its keys.
    pub fn count_in(&mut self, s: &Slot) {
        for key in CounterKey::all_of(s) {
            self.incr(&key, s.cost);
        }
        self.header.live += 1;
    }

    /// Make entry `idx` (from `allocate`) a live slot of this backend, and
    /// count it under its keys.
    pub fn put_live(&mut self, idx: usize, n: &NewSlot) -> Slot {
        let mut run = [0u8; RUN_ID_MAX];
        let len = n.run_id.len().min(RUN_ID_MAX);
        run[..len].copy_from_slice(&n.run_id.as_bytes()[..len]);
        let slot = Slot {
            id: n.id,
            database: n.database,
            tenant: n.tenant,
            project: n.project.unwrap_or([0; 16]),
            has_project: n.project.is_some(),
            key: n.key.unwrap_or([0; 16]),
            has_key: n.key.is_some(),
            cost: n.cost,
            claim: n.claim.unwrap_or([0; 16]),
            has_claim: n.claim.is_some(),
            state: LIVE,
            reason: 0,
            notified: false,
            announcer: 0,
            pid: unsafe { pg_sys::MyProcPid },
            xid: n.xid,
            acquired_at: n.now,
            lease_micros: n.lease_micros,
            lease_expires: n.now.saturating_add(n.lease_micros).min(n.deadline),
            deadline: n.deadline,
            memory_limit: n.memory_limit,
            memory_peak: 0,
            revoked_at: 0,
            run_id_len: len as u8,
            run_id: run,
        };
        self.slots[idx] = slot;
        self.count_in(&slot);
        self.map_claim(idx);
        slot
    }

    /// Map a claimed job to its live slot (a later claim of the same job
    /// takes the mapping over).
    pub fn map_claim(&mut self, idx: usize) {
        let s = self.slots[idx];
        if !s.has_claim {
            return;
        }
        let key = CounterKey::claim(s.database, &s.claim);
        match self.find(&key) {
            Ok(i) => self.counters[i].count = idx as u32 + 1,
            Err(_) => self.incr(&key, idx as u32 + 1),
        }
    }

    /// The claimed slots of `database` have been rebuilt from its queues
    /// since the server started (`super::restore`).
    pub fn restored(&self, database: u32) -> bool {
        self.find(&CounterKey::restored(database)).is_ok()
    }

    pub fn mark_restored(&mut self, database: u32) {
        if !self.restored(database) {
            self.incr(&CounterKey::restored(database), 1);
        }
        self.set_restoring(database, None);
    }

    /// The extension was created in `database` after the server started
    /// (`super::grace`).
    pub fn created(&self, database: u32) -> bool {
        self.find(&CounterKey::created(database)).is_ok()
    }

    pub fn mark_created(&mut self, database: u32) {
        if !self.created(database) {
            self.incr(&CounterKey::created(database), 1);
        }
    }

    /// The backend rebuilding `database`'s claimed slots, if any.
    pub fn restoring(&self, database: u32) -> Option<i32> {
        let i = self.find(&CounterKey::restoring(database)).ok()?;
        Some(self.counters[i].count as i32)
    }

    pub fn set_restoring(&mut self, database: u32, pid: Option<i32>) {
        let key = CounterKey::restoring(database);
        if let Ok(i) = self.find(&key) {
            let n = self.counters[i].count;
            self.decr(&key, n);
        }
        if let Some(pid) = pid {
            self.incr(&key, pid as u32);
        }
    }

    /// The live slot of a claimed job, if any.
    pub fn claimed(&self, database: u32, digest: &[u8; 16]) -> Option<usize> {
        let i = self.find(&CounterKey::claim(database, digest)).ok()?;
        let idx = self.counters[i].count as usize - 1;
        let s = &self.slots[idx];
        (s.state == LIVE && s.has_claim && s.database == database && &s.claim == digest)
            .then_some(idx)
    }

    fn unmap_claim(&mut self, idx: usize) {
        let s = self.slots[idx];
        if !s.has_claim {
            return;
        }
        let key = CounterKey::claim(s.database, &s.claim);
        if let Ok(i) = self.find(&key) {
            let n = self.counters[i].count;
            if n as usize == idx + 1 {
                self.decr(&key, n);
            }
        }
    }

    fn count_out(&mut self, s: &Slot) {
        for key in CounterKey::all_of(s) {
            self.decr(&key, s.cost);
        }
        self.freed.add(s.database, &s.tenant);
        self.header.live = self.header.live.saturating_sub(1);
        if self.header.waiting > 0 {
            // SAFETY: initialised at startup; broadcasting only sets latches.
            unsafe { pg_sys::ConditionVariableBroadcast(&raw mut self.header.wakeup) };
        }
    }

    /// Index of the slot with this id, if any entry holds it.
    pub fn lookup(&self, id: &[u8; 16]) -> Option<usize> {
        let idx = u32::from_be_bytes([id[12], id[13], id[14], id[15]]) as usize;
        (idx < MAX_SLOTS && self.slots[idx].state != FREE && &self.slots[idx].id == id)
            .then_some(idx)
    }

    /// Free a live slot (release or rollback). Returns false if it was not live.
    pub fn free_live(&mut self, idx: usize, id: &[u8; 16]) -> bool {
        let s = self.slots[idx];
        if s.id != *id || s.state != LIVE {
            return false;
        }
        self.unmap_claim(idx);
        self.count_out(&s);
        self.slots[idx].state = FREE;
        true
    }

    /// Take the announcement of an unannounced tombstone for backend `pid`;
    /// false when it is announced or another backend is announcing it.
    pub fn claim_announcement(&mut self, idx: usize, pid: i32) -> bool {
        let s = &mut self.slots[idx];
        if s.state != REVOKED || s.notified || s.announcer != 0 {
            return false;
        }
        s.announcer = pid;
        true
    }

    /// The slot.revoked event of this tombstone was committed (`committed`),
    /// or rolled back: then another reaper may announce it.
    pub fn end_announcement(&mut self, idx: usize, id: &[u8; 16], committed: bool) {
        let s = &mut self.slots[idx];
        if s.state == REVOKED && &s.id == id {
            s.notified |= committed;
            s.announcer = 0;
        }
    }

    /// Forget a revoked tombstone (its holder has seen it).
    pub fn forget(&mut self, idx: usize) {
        if self.slots[idx].state == REVOKED {
            self.slots[idx].state = FREE;
        }
    }

    /// Revoke a live slot: it stops counting now, and stays as a tombstone so
    /// its holder learns why from its next heartbeat.
    pub fn revoke(&mut self, idx: usize, reason: RevokeReason, now: i64) {
        let s = self.slots[idx];
        if s.state != LIVE {
            return;
        }
        self.unmap_claim(idx);
        self.count_out(&s);
        let e = &mut self.slots[idx];
        e.state = REVOKED;
        e.reason = reason as u8;
        e.notified = false;
        e.announcer = 0;
        e.revoked_at = now;
        self.header.revocations_by[reason as usize].fetch_add(1, Ordering::Relaxed);
    }

    /// Live slots per tenant of one database, for metrics.
    pub fn tenant_counts(&self, database: u32) -> Vec<([u8; 16], u32)> {
        self.counters
            .iter()
            .filter(|c| c.key.kind == KIND_TENANT && c.key.database == database && c.count > 0)
            .map(|c| (c.key.tenant, c.count))
            .collect()
    }

    /// Revoke every live slot whose lease or deadline has passed (of every
    /// database: leases are time, wherever they were taken), optionally only
    /// those of one tenant of one database. Returns how many were revoked.
    pub fn reap(&mut self, now: i64, tenant: Option<(u32, &[u8; 16])>) -> usize {
        let mut n = 0;
        for idx in 0..MAX_SLOTS {
            let s = &self.slots[idx];
            if s.state != LIVE || tenant.is_some_and(|(d, t)| s.database != d || &s.tenant != t) {
                continue;
            }
            let reason = if now >= s.deadline {
                RevokeReason::DeadlineExceeded
            } else if now >= s.lease_expires {
                RevokeReason::LeaseExpired
            } else {
                continue;
            };
            self.revoke(idx, reason, now);
            n += 1;
        }
        n
    }

    /// A free entry: FREE, or the oldest tombstone that was announced (or
    /// whose announcement has waited an hour: no reaper runs in its database).
    pub fn allocate(&mut self, now: i64) -> Option<usize> {
        let start = self.header.cursor as usize % MAX_SLOTS;
        let mut oldest_tomb: Option<(usize, i64)> = None;
        for k in 0..MAX_SLOTS {
            let idx = (start + k) % MAX_SLOTS;
            let s = &self.slots[idx];
            if s.state == FREE {
                self.header.cursor = ((idx + 1) % MAX_SLOTS) as u32;
                return Some(idx);
            }
            if s.state == REVOKED
                && ((s.notified && s.announcer == 0)
                    || now - s.revoked_at > UNANNOUNCED_TOMBSTONE_MICROS)
                && oldest_tomb.is_none_or(|(_, at)| s.revoked_at < at)
            {
                oldest_tomb = Some((idx, s.revoked_at));
            }
        }
        oldest_tomb.map(|(idx, _)| idx)
    }

    /// Earliest moment a live slot matching `pred` ends by lease or deadline.
    pub fn earliest_end(&self, pred: impl Fn(&Slot) -> bool) -> Option<i64> {
        self.slots
            .iter()
            .filter(|s| s.state == LIVE && pred(s))
            .map(|s| s.lease_expires.min(s.deadline))
            .min()
    }
}
