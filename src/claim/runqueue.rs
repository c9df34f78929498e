//! A binding's run queue, in each claiming backend: the tenants with a job
//! due, ordered by where their next claim starts on the fair-share clock
//! (`slots::fair`), so that a claim looks at the tenants it serves, not at
//! every tenant with waiting jobs.
//!
//! **Filled by the skip scan** (`queue::waiting_tenants`), which finds every
//! tenant with a job due. Between scans the queue is kept as the claims leave
//! it: a tenant whose probe finds nothing is removed until the next scan
//! finds it again, as are tenants whose first job arrived since. A tenant
//! at its limit is parked: it comes back when one of its slots ends (the
//! slot table's ring of such tenants, `slots::freed`, read from where this
//! backend last looked), when a limit changes anywhere, or with the next
//! scan. A backend scans again when its last scan is
//! `RESCAN_MIN_MICROS` old and its queue has run empty, and otherwise when
//! the last scan is `RESCAN_FACTOR` times as old as it took (at least
//! `RESCAN_MIN_MICROS`): scanning stays a tenth of the claiming time at any
//! number of tenants, and a new tenant is seen within that interval
//! (docs/claiming.md, "Cost").
//!
//! **The order** is a binary heap of keys: the start tag, then the heavier
//! weight, then the longer wait (claim_jobs' pick). Start tags only move
//! forward (a claim moves its tenant's on, and the clock `V` moves forward),
//! so a key in the heap is at most the tenant's true key: the top is read
//! again from the slot table and, if it is still no later than the next
//! key, it is the least of all; otherwise it goes back with its true key.
//! Each tenant is read about once per turn, so a pick costs O(log n) in the
//! number of tenants. Where tags move back (the clock's rebase, the tag map's
//! compaction) or a weight is raised, a tenant can be served later than its
//! tag says, until the next scan, which reads every key afresh.
use super::queue::Found;
use super::Ts;
use crate::error::Result;
use crate::limits;
use crate::slots::claimed::{self as slot_claim, BLOCKED_REASONS};
use pgrx::datum::Uuid;
use std::cmp::{Ordering, Reverse};
use std::collections::{BinaryHeap, HashMap};

/// A scan is reused at least this long (and a tenant whose first job arrives
/// waits at least this long to be seen).
const RESCAN_MIN_MICROS: i64 = 100_000;
/// A scan is reused this many times as long as it took.
const RESCAN_FACTOR: i64 = 10;
/// Start tags read under one hold of the slot table's lock.
const STARTS_CHUNK: usize = 1024;

pub(super) type TenantKey = [u8; 16];

/// A tenant in the run queue.
pub(super) struct Runnable {
    pub(super) id: Uuid,
    /// The ways its jobs spell its id (what the index holds), each with
    /// since when its first job has been due as the skip scan found it, or
    /// the queue time of the last job claimed under it.
    pub(super) spellings: Vec<(String, Ts)>,
    /// Its start tag as last read (never more than the true one).
    pub(super) start: f64,
    weight: f64,
    /// When its last claim was made (any claimer's; `slots::fair`).
    served_at: Option<Ts>,
    /// The heap entry of this version is its live one; others are stale.
    version: u32,
    /// In the heap (not parked, and not picked by the call in progress).
    queued: bool,
}

impl Runnable {
    /// Since when it has waited, the last tie-break: since its next job was
    /// queued, or since it was last served, if later.
    fn waiting_since(&self) -> Option<Ts> {
        let next = self.spellings.iter().map(|s| s.1).min();
        next.max(self.served_at)
    }

    fn key(&self, tenant: TenantKey) -> Key {
        Key {
            start: self.start,
            weight: self.weight,
            since: self.waiting_since(),
            tenant,
            version: self.version,
        }
    }
}

/// Where a tenant stands in the pick: the least first.
#[derive(Clone, Copy)]
struct Key {
    start: f64,
    weight: f64,
    since: Option<Ts>,
    tenant: TenantKey,
    version: u32,
}

impl Ord for Key {
    fn cmp(&self, other: &Self) -> Ordering {
        self.start
            .total_cmp(&other.start)
            .then_with(|| other.weight.total_cmp(&self.weight))
            .then_with(|| self.since.cmp(&other.since))
            .then_with(|| self.tenant.cmp(&other.tenant))
            .then_with(|| self.version.cmp(&other.version))
    }
}

impl PartialOrd for Key {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl PartialEq for Key {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other) == Ordering::Equal
    }
}

impl Eq for Key {}

#[derive(Default)]
pub(super) struct RunQueue {
    tenants: HashMap<TenantKey, Runnable>,
    heap: BinaryHeap<Reverse<Key>>,
    /// When the last scan started (a timestamp; None: never), and how long
    /// it took, in microseconds.
    scanned_at: Option<i64>,
    scan_took: i64,
    /// The limits generation under which every tenant's limits were
    /// cached in this backend (`load_limits`).
    limits_loaded: Option<u64>,
    /// Tenants at their limit, out of the heap, and the limits generation
    /// and the mark in the ring of freed tenants they were parked under.
    parked: Vec<TenantKey>,
    parked_generation: Option<u64>,
    freed_mark: u64,
}

impl RunQueue {
    /// Whether the tenants should be scanned again before this claim.
    pub(super) fn stale(&self, now: i64) -> bool {
        let Some(at) = self.scanned_at else {
            return true;
        };
        let age = now.saturating_sub(at);
        if age < 0 {
            // The clock moved back.
            return true;
        }
        let reuse = RESCAN_MIN_MICROS.max(self.scan_took.saturating_mul(RESCAN_FACTOR));
        age >= reuse || (age >= RESCAN_MIN_MICROS && self.heap.is_empty())
    }

    /// Replace the queue with what a scan found: every key read afresh
    /// (start tags from the slot table, weights from this backend's cached
    /// limits, 1 until a pick loads them).
    pub(super) fn refill(&mut self, found: Vec<Found>) {
        let generation = limits::caching_generation();
        let mut all_cached = true;
        self.parked.clear();
        self.freed_mark = slot_claim::freed_mark();
        let mut tenants: HashMap<TenantKey, Runnable> = HashMap::with_capacity(found.len());
        for f in found {
            let key = *f.id.as_bytes();
            let version = self
                .tenants
                .get(&key)
                .map_or(0, |t| t.version.wrapping_add(1));
            tenants
                .entry(key)
                .or_insert_with(|| Runnable {
                    id: f.id,
                    spellings: Vec::new(),
                    start: 0.0,
                    weight: 1.0,
                    served_at: None,
                    version,
                    queued: true,
                })
                .spellings
                .push((f.spelling, f.at));
        }
        let max = crate::gucs::claim_max_tenants();
        if tenants.len() > max {
            // Full: the tenants whose first due job has waited longest.
            let mut by_wait: Vec<(Option<Ts>, TenantKey)> = tenants
                .iter()
                .map(|(k, t)| (t.spellings.iter().map(|s| s.1).min(), *k))
                .collect();
            by_wait.select_nth_unstable(max - 1);
            for (_, k) in &by_wait[max..] {
                tenants.remove(k);
            }
        }
        let ids: Vec<Uuid> = tenants.values().map(|t| t.id).collect();
        // (A chunk at a time: the slot table's lock is not held for long.)
        for chunk in ids.chunks(STARTS_CHUNK) {
            for (id, (start, served)) in chunk.iter().zip(slot_claim::starts(chunk)) {
                if let Some(t) = tenants.get_mut(id.as_bytes()) {
                    t.start = start;
                    t.served_at = served_at(served);
                    match limits::cached_tenant_share(id) {
                        Some(lim) => t.weight = lim.weight.unwrap_or(1.0),
                        None => all_cached = false,
                    }
                }
            }
        }
        let keys: Vec<Reverse<Key>> = tenants.iter().map(|(k, t)| Reverse(t.key(*k))).collect();
        self.heap = BinaryHeap::from(keys);
        self.tenants = tenants;
        self.limits_loaded = generation.filter(|_| all_cached);
    }

    /// The scan and refill started at `at` and took `took` microseconds.
    pub(super) fn scanned(&mut self, at: i64, took: i64) {
        self.scanned_at = Some(at);
        self.scan_took = took.max(0);
    }

    /// Load the limits of every tenant in the queue this backend has not
    /// cached, in one query (`slot_claim::shares`), and put the weights in
    /// the keys. A call that scanned does not also load (each costs about
    /// as much): until the next call, a pick loads its tenant's alone.
    pub(super) fn load_limits(&mut self) -> Result<()> {
        let Some(generation) = limits::caching_generation() else {
            return Ok(());
        };
        if self.limits_loaded == Some(generation) {
            return Ok(());
        }
        let missing: Vec<Uuid> = self
            .tenants
            .values()
            .filter(|t| limits::cached_tenant_share(&t.id).is_none())
            .map(|t| t.id)
            .collect();
        if !missing.is_empty() {
            slot_claim::shares(&missing)?;
            for t in self.tenants.values_mut() {
                if let Some(lim) = limits::cached_tenant_share(&t.id) {
                    t.weight = lim.weight.unwrap_or(1.0);
                }
            }
            let keys: Vec<Reverse<Key>> = self
                .tenants
                .iter_mut()
                .filter(|(_, t)| t.queued)
                .map(|(k, t)| {
                    t.version = t.version.wrapping_add(1);
                    Reverse(t.key(*k))
                })
                .collect();
            self.heap = BinaryHeap::from(keys);
        }
        self.limits_loaded = Some(generation);
        Ok(())
    }

    /// The tenant to serve next: the least key among those in the queue
    /// with room under their own limit, taken out of the heap (`requeue`,
    /// `park` or `remove` it). Tenants found at their limit are parked
    /// (and counted as a blocked job).
    pub(super) fn pick(&mut self) -> Result<Option<TenantKey>> {
        while let Some(Reverse(top)) = self.heap.pop() {
            let Some(t) = self.tenants.get_mut(&top.tenant) else {
                continue;
            };
            if !t.queued || t.version != top.version {
                continue;
            }
            let (start, served) = slot_claim::starts(&[t.id])[0];
            let share = slot_claim::shares(&[t.id])?.remove(0);
            t.start = start;
            t.served_at = served_at(served);
            t.weight = share.weight;
            if !share.has_room {
                // Its next job is passed over: the tenant is at its limit.
                slot_claim::count_blocked(BLOCKED_REASONS[0]);
                t.queued = false;
                self.park(top.tenant);
                continue;
            }
            let now = t.key(top.tenant);
            match self.heap.peek() {
                Some(Reverse(next)) if *next < now => {
                    t.version = t.version.wrapping_add(1);
                    self.heap.push(Reverse(t.key(top.tenant)));
                }
                _ => {
                    t.queued = false;
                    return Ok(Some(top.tenant));
                }
            }
        }
        Ok(None)
    }

    pub(super) fn get_mut(&mut self, tenant: &TenantKey) -> Option<&mut Runnable> {
        self.tenants.get_mut(tenant)
    }

    /// Back in the heap, at the start it was picked at (a lower bound: a
    /// claim moved it on, which the next pick reads).
    pub(super) fn requeue(&mut self, tenant: TenantKey) {
        if let Some(t) = self.tenants.get_mut(&tenant) {
            if !t.queued {
                t.queued = true;
                t.version = t.version.wrapping_add(1);
                self.heap.push(Reverse(t.key(tenant)));
            }
        }
    }

    /// Out until the next scan: it has nothing runnable left (or what it
    /// has is locked by another claim).
    pub(super) fn remove(&mut self, tenant: &TenantKey) {
        self.tenants.remove(tenant);
    }

    /// Out until one of its slots ends, a limit changes, or the next scan
    /// (a picked tenant found at its limit).
    pub(super) fn park(&mut self, tenant: TenantKey) {
        if self.parked.is_empty() {
            self.parked_generation = limits::caching_generation();
        }
        self.parked.push(tenant);
    }

    /// Back in the heap: the parked tenants one of whose slots ended since
    /// the last look, or all of them if a limit changed (or more slots
    /// ended than the ring keeps). Each tenant still parked counts as a job
    /// passed over at its limit, as it would if this call had picked it.
    pub(super) fn unpark(&mut self) {
        let (freed, mark) = slot_claim::freed_since(self.freed_mark);
        self.freed_mark = mark;
        if self.parked.is_empty() {
            return;
        }
        let limits_changed = limits::caching_generation() != self.parked_generation
            || self.parked_generation.is_none();
        let back: Vec<TenantKey> = match freed {
            Some(freed) if !limits_changed => {
                let freed: std::collections::HashSet<TenantKey> = freed.into_iter().collect();
                let (back, still) = self.parked.iter().partition(|t| freed.contains(*t));
                self.parked = still;
                back
            }
            _ => std::mem::take(&mut self.parked),
        };
        for tenant in back {
            self.requeue(tenant);
        }
        slot_claim::count_blocked_jobs(BLOCKED_REASONS[0], self.parked.len() as u64);
    }
}

fn served_at(charged: i64) -> Option<Ts> {
    (charged != 0).then(|| Ts::try_from(charged).ok()).flatten()
}
