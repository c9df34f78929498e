//! What happens to a slot entry: made live and counted (`put_live`),
//! freed, revoked and kept as a tombstone until announced, found by its id
//! or its claimed job, and reused (`allocate`). Every change of a slot's
//! state goes through here, so its counts (`counters`) and its claim
//! mapping never drift from the entries.
use super::counters::CounterKey;
use super::table::{
    LockedTable, RevokeReason, Slot, Table, FREE, LIVE, MAX_SLOTS, REVOKED, RUN_ID_MAX,
};
use pgrx::pg_sys;
use std::sync::atomic::Ordering;

/// A revocation nobody announced within this long may give its entry away.
const UNANNOUNCED_TOMBSTONE_MICROS: i64 = 3_600_000_000;

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

/// Every key a slot counts under.
fn keys_of(s: &Slot) -> impl Iterator<Item = CounterKey> {
    [
        Some(CounterKey::tenant(s.database, &s.tenant)),
        s.has_project
            .then(|| CounterKey::project(s.database, &s.tenant, &s.project)),
        s.has_key
            .then(|| CounterKey::key(s.database, &s.tenant, &s.key)),
        Some(CounterKey::total(s.database)),
    ]
    .into_iter()
    .flatten()
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
    t.counters.forget_databases(gone);
    t.fair.forget_databases(gone_ones);
}

impl Table {
    /// Count a newly live slot: its cost under each of its keys.
    pub fn count_in(&mut self, s: &Slot) {
        for key in keys_of(s) {
            self.counters.incr(&key, s.cost);
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
        self.counters.set(&key, idx as u32 + 1);
    }

    /// The live slot of a claimed job, if any.
    pub fn claimed(&self, database: u32, digest: &[u8; 16]) -> Option<usize> {
        let idx = self.counters.get(&CounterKey::claim(database, digest))? as usize - 1;
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
        if let Some(n) = self.counters.get(&key) {
            if n as usize == idx + 1 {
                self.counters.decr(&key, n);
            }
        }
    }

    fn count_out(&mut self, s: &Slot) {
        for key in keys_of(s) {
            self.counters.decr(&key, s.cost);
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
