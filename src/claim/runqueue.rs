//! A binding's run queue, in each claiming backend: the tenants with a job
//! due, ordered by where their next claim starts on the fair-share clock
//! (`slots::fair`), so that a claim looks at the tenants it serves, not at
//! every tenant with waiting jobs.
//!
//! **Filled by the skip scan** (`queue::waiting_tenants`), which finds the
//! tenants with a job due in chunks of `queue::SCAN_CHUNK` (in the order of
//! their ids as the jobs spell them), one chunk in a call (up to three more
//! when the queue runs empty mid-pass, `claim::MORE_CHUNKS_PER_CALL`): a
//! chunk replaces what the queue held of its range of ids. A new pass first
//! tries one read of the jobs due (`queue::due_tenants`, bounded by
//! `due_read_limit`): when it finds fewer than it may read, it is the whole
//! pass, with no probe of the tenants whose jobs are all deferred. Between
//! chunks the queue is kept as the claims leave it: a tenant whose probe
//! finds nothing is removed until a chunk finds it again, as are tenants
//! whose first job arrived since. A tenant at its limit is parked: it comes
//! back when one of its slots ends (the slot table's ring of such tenants,
//! `slots::freed`, read from where this backend last looked), when a limit
//! changes anywhere, or when a chunk finds it again. The next chunk is due
//! `RESCAN_FACTOR` times as long after the last as it took, and a new pass
//! over all the tenants no sooner than `RESCAN_MIN_MICROS` after the last
//! began (or at once, mid-pass, when the queue has run empty), and no
//! sooner than the binding's shared clock allows (`pacing`): all of its
//! claiming backends together scan about a tenth of the time, a call scans
//! 16,384 tenants at most, and a tenant whose first job arrives is seen
//! within a pass (docs/claiming.md, "Cost").
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
//! tag says, until a chunk finds it again and reads its key afresh.
use super::pass::Pass;
use super::queue::{Chunk, Found, SCAN_CHUNK};
pub(super) use super::runnable::TenantKey;
use super::runnable::{Key, Runnable};
use super::Ts;
use crate::error::Result;
use crate::limits;
use crate::slots::claimed::{self as slot_claim, BLOCKED_REASONS};
use crate::slots::shares as slot_shares;
use pgrx::datum::Uuid;
use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap, HashMap, HashSet};
use std::ops::Bound;

/// Start tags read under one hold of the slot table's lock.
const STARTS_CHUNK: usize = 1024;
/// Tenants whose limits a call without a scan loads at most, in one query
/// (about 2 µs each, and 1 ms a query).
const LOAD_CHUNK: usize = 4096;
/// Tenants whose limits a pick that meets one not loaded loads at most
/// (fewer: a new backend's first claim waits for them).
const PICK_LOAD_CHUNK: usize = 1024;

#[derive(Default)]
pub(super) struct RunQueue {
    /// When it looks for tenants (`pass`).
    pub(super) pass: Pass,
    tenants: HashMap<TenantKey, Runnable>,
    /// The tenant of each spelling in the queue, in the scan's order.
    by_spelling: BTreeMap<String, TenantKey>,
    heap: BinaryHeap<Reverse<Key>>,
    /// The limits generation under which every tenant's limits were
    /// cached in this backend (`load_limits`).
    limits_loaded: Option<u64>,
    /// Tenants at their limit, out of the heap, and the limits generation
    /// and the mark in the ring of freed tenants they were parked under.
    parked: HashSet<TenantKey>,
    parked_generation: Option<u64>,
    freed_mark: u64,
}

impl RunQueue {
    pub(super) fn new(binding: i64) -> Self {
        RunQueue {
            pass: Pass::new(binding),
            ..Default::default()
        }
    }

    /// Where the next chunk of the scan starts, if one is due before this
    /// claim ('' for a new pass).
    pub(super) fn chunk_due(&self, now: i64) -> Option<String> {
        self.pass.chunk_due(now, self.heap.is_empty())
    }

    /// What a read of the due jobs found: every tenant with a job due, a
    /// whole pass.
    pub(super) fn merge_due(&mut self, found: Vec<Found>, at: i64) {
        self.put("", None, found);
        self.pass.looked("", None, None, at);
    }

    /// Put in what a chunk of the scan found, started at `at`: what the
    /// queue held of the chunk's range of spellings is replaced, and the
    /// keys of the tenants found are read afresh (start tags from the slot
    /// table, weights from this backend's cached limits, 1 until a pick or
    /// `load_limits` loads them).
    pub(super) fn merge(&mut self, chunk: Chunk, at: i64) {
        self.put(&chunk.after, chunk.last.as_ref(), chunk.found);
        self.pass
            .looked(&chunk.after, chunk.last, Some(chunk.probed), at);
    }

    /// The tenants found with a job due between `after` and `last` (None:
    /// the end), in place of what the queue held there.
    fn put(&mut self, after: &str, last: Option<&String>, found: Vec<Found>) {
        if self.pass.first() {
            self.freed_mark = slot_shares::freed_mark();
        }
        // What the range held and the chunk did not find: gone.
        let found_spellings: HashSet<&str> = found.iter().map(|f| f.spelling.as_str()).collect();
        let upper = last.map_or(Bound::Unbounded, |l| Bound::Included(l.as_str()));
        let gone: Vec<String> = self
            .by_spelling
            .range::<str, _>((Bound::Excluded(after), upper))
            .filter(|(spelling, _)| !found_spellings.contains(spelling.as_str()))
            .map(|(spelling, _)| spelling.clone())
            .collect();
        for spelling in gone {
            if let Some(tenant) = self.by_spelling.remove(&spelling) {
                self.drop_spelling(&tenant, &spelling);
            }
        }
        // What it found: new, or back with its key read afresh.
        let mut keys: Vec<TenantKey> = Vec::new();
        for f in found {
            let key = *f.id.as_bytes();
            let t = self.tenants.entry(key).or_insert_with(|| Runnable {
                id: f.id,
                spellings: Vec::new(),
                start: 0.0,
                weight: 1.0,
                served_at: None,
                version: 0,
                queued: false,
            });
            match t.spellings.iter_mut().find(|s| s.0 == f.spelling) {
                Some(s) => s.1 = f.at,
                None => t.spellings.push((f.spelling.clone(), f.at)),
            }
            self.by_spelling.insert(f.spelling, key);
            keys.push(key);
        }
        keys.sort_unstable();
        keys.dedup();
        let ids: Vec<Uuid> = keys
            .iter()
            .filter_map(|k| self.tenants.get(k))
            .map(|t| t.id)
            .collect();
        // (A chunk at a time: the slot table's lock is not held for long.)
        for part in ids.chunks(STARTS_CHUNK) {
            for (id, (start, served)) in part.iter().zip(slot_shares::starts(part)) {
                let key = *id.as_bytes();
                let Some(t) = self.tenants.get_mut(&key) else {
                    continue;
                };
                t.start = start;
                t.served_at = served_at(served);
                match limits::cached_tenant_share(id) {
                    Some(lim) => t.weight = lim.weight.unwrap_or(1.0),
                    None => self.limits_loaded = None,
                }
                t.version = t.version.wrapping_add(1);
                if !self.parked.contains(&key) {
                    t.queued = true;
                    self.heap.push(Reverse(t.key(key)));
                }
            }
        }
        self.keep_at_most(crate::gucs::claim_max_tenants());
        // The parked tenants it found (and kept) are back: their room is
        // looked at again when they are picked.
        for key in &keys {
            if self.parked.remove(key) {
                self.requeue(*key);
            }
        }
        if self.heap.len() > 2 * self.tenants.len() + SCAN_CHUNK {
            self.rebuild_heap();
        }
    }

    /// A spelling of this tenant is no longer in the queue; without any,
    /// the tenant is not either.
    fn drop_spelling(&mut self, tenant: &TenantKey, spelling: &str) {
        if let Some(t) = self.tenants.get_mut(tenant) {
            t.spellings.retain(|s| s.0 != spelling);
            if t.spellings.is_empty() {
                self.tenants.remove(tenant);
                self.parked.remove(tenant);
            }
        }
    }

    /// Full (`claim_max_tenants`): the tenants not known to be at their
    /// limit stay first (those are the ones a claim can serve: tenants at
    /// their limit with a backlog have the oldest jobs, and would otherwise
    /// hold every place), then those whose first due job has waited
    /// longest.
    fn keep_at_most(&mut self, max: usize) {
        if self.tenants.len() <= max || max == 0 {
            return;
        }
        let mut by_wait: Vec<(bool, Option<Ts>, TenantKey)> = self
            .tenants
            .iter()
            .map(|(k, t)| {
                let parked = self.parked.contains(k);
                (parked, t.spellings.iter().map(|s| s.1).min(), *k)
            })
            .collect();
        by_wait.select_nth_unstable(max - 1);
        for (_, _, k) in &by_wait[max..] {
            self.remove(k);
        }
    }

    /// The heap again from the tenants in it, without stale entries.
    fn rebuild_heap(&mut self) {
        let keys: Vec<Reverse<Key>> = self
            .tenants
            .iter()
            .filter(|(_, t)| t.queued)
            .map(|(k, t)| Reverse(t.key(*k)))
            .collect();
        self.heap = BinaryHeap::from(keys);
    }

    /// Load the limits of the tenants in the queue this backend has not
    /// cached, `LOAD_CHUNK` at a time in one query (`slot_shares::shares`),
    /// and put their weights in their keys. A call that scanned does not
    /// also load (each costs about as much), and a call loads one chunk;
    /// a pick that meets a tenant not loaded yet loads a chunk too
    /// (`load_chunk`).
    pub(super) fn load_limits(&mut self) -> Result<()> {
        let Some(generation) = limits::caching_generation() else {
            return Ok(());
        };
        if self.limits_loaded == Some(generation) {
            return Ok(());
        }
        if self.tenants.len() > limits::MAX_TENANT_SHARES {
            // More than this backend caches: a pick loads its tenant's.
            return Ok(());
        }
        if !self.load_chunk(None, LOAD_CHUNK)? {
            self.limits_loaded = Some(generation);
        }
        Ok(())
    }

    /// Load the limits of up to `most` tenants in the queue this backend
    /// has not cached, `first` first, in one query; whether more are
    /// missing. (One tenant's alone costs about as much as 500 in one
    /// query: 1.3 ms against 7.5 ms for 4,096. Loaded one at a time, eight
    /// workers claiming 8 jobs a call from 10,000 tenants spent three
    /// quarters of their time there.)
    fn load_chunk(&mut self, first: Option<TenantKey>, most: usize) -> Result<bool> {
        let mut missing: Vec<(TenantKey, Uuid)> = Vec::new();
        let mut more = false;
        if let Some(t) = first.and_then(|k| self.tenants.get(&k)) {
            missing.push((*t.id.as_bytes(), t.id));
        }
        for (k, t) in &self.tenants {
            if Some(*k) != first && limits::cached_tenant_share(&t.id).is_none() {
                if missing.len() == most {
                    more = true;
                    break;
                }
                missing.push((*k, t.id));
            }
        }
        if !missing.is_empty() {
            let ids: Vec<Uuid> = missing.iter().map(|m| m.1).collect();
            let shares = slot_shares::shares(&ids)?;
            for ((k, _), share) in missing.iter().zip(shares) {
                let Some(t) = self.tenants.get_mut(k) else {
                    continue;
                };
                if t.weight != share.weight {
                    t.weight = share.weight;
                    if t.queued {
                        t.version = t.version.wrapping_add(1);
                        self.heap.push(Reverse(t.key(*k)));
                    }
                }
            }
        }
        Ok(more)
    }

    /// The tenant to serve next: the least key among those in the queue
    /// with room under their own limit, taken out of the heap (`requeue`,
    /// `park` or `remove` it). Tenants found at their limit are parked
    /// (and counted as a blocked job).
    pub(super) fn pick(&mut self) -> Result<Option<TenantKey>> {
        while let Some(Reverse(top)) = self.heap.pop() {
            let Some(t) = self.tenants.get(&top.tenant) else {
                continue;
            };
            if !t.queued || t.version != top.version {
                continue;
            }
            // Its limits not loaded yet: with a chunk of others'.
            if limits::cached_tenant_share(&t.id).is_none()
                && limits::caching_generation().is_some()
                && self.tenants.len() <= limits::MAX_TENANT_SHARES
            {
                self.load_chunk(Some(top.tenant), PICK_LOAD_CHUNK)?;
            }
            let Some(t) = self.tenants.get_mut(&top.tenant) else {
                continue;
            };
            let (start, served) = slot_shares::starts(&[t.id])[0];
            let seen = limits::caching_generation();
            let share = slot_shares::shares(&[t.id])?.remove(0);
            t.start = start;
            t.served_at = served_at(served);
            t.weight = share.weight;
            if !share.has_room {
                // Its next job is passed over: the tenant is at its limit.
                slot_claim::count_blocked(BLOCKED_REASONS[0]);
                t.queued = false;
                self.park(top.tenant, seen);
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

    /// Out until a chunk finds it again: it has nothing runnable left (or
    /// what it has is locked by another claim).
    pub(super) fn remove(&mut self, tenant: &TenantKey) {
        if let Some(t) = self.tenants.remove(tenant) {
            for (spelling, _) in t.spellings {
                self.by_spelling.remove(&spelling);
            }
        }
        self.parked.remove(tenant);
    }

    /// Out until one of its slots ends, a limit changes, or a chunk finds
    /// it again (a picked tenant found at its limit under the limits
    /// generation `seen`, read before its room was): the parked tenants
    /// come back when the generation is no longer the oldest they were
    /// parked under.
    pub(super) fn park(&mut self, tenant: TenantKey, seen: Option<u64>) {
        if self.parked.is_empty() || seen.is_none() || seen < self.parked_generation {
            self.parked_generation = seen;
        }
        self.parked.insert(tenant);
    }

    /// Back in the heap: the parked tenants one of whose slots ended since
    /// the last look, or all of them if a limit changed (or more slots
    /// ended than the ring keeps). Each tenant still parked counts as a job
    /// passed over at its limit, as it would if this call had picked it.
    pub(super) fn unpark(&mut self) {
        let (freed, mark) = slot_shares::freed_since(self.freed_mark);
        self.freed_mark = mark;
        if self.parked.is_empty() {
            return;
        }
        let limits_changed = limits::caching_generation() != self.parked_generation
            || self.parked_generation.is_none();
        let back: Vec<TenantKey> = match freed {
            Some(freed) if !limits_changed => freed
                .into_iter()
                .filter(|t| self.parked.remove(t))
                .collect(),
            _ => self.parked.drain().collect(),
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
