//! claim_jobs' fair share: start-time fair queuing over claimed cost
//! (docs/claiming.md, "Fairness").
//!
//! Per database, a virtual time `V`; per tenant, a finish tag `F`. A claim
//! of cost `c` by a tenant of `fair_share_weight` `w` starts at
//! `S = max(F, V)` and moves `F` to `S + c / w`; `V` becomes `max(V, S)`.
//! claim_jobs serves the tenant with the least start tag first. A tenant
//! that was idle, new, or held back by its own limit starts at `V`: it
//! gets its turn at once but no credit for the time it did not claim.
//!
//! The clock lives in the slot table, under its lock, and is charged by the
//! grant itself (`slots::acquire`), so concurrent claimers can pick the same
//! tenant but never charge a claim twice or lose one: what one of them
//! over-serves, the tags take back on the next picks. `V` moves only to the
//! start the claimer saw when it picked: a burst of concurrent claims of one
//! tenant moves its tag on, but not `V` past the tenants still behind it
//! (which would take their credit; with weights 1 : 4 that favoured the
//! light tenant, whose tag moves on in larger steps).
//!
//! Tags are an open-addressing map without deletion; when it is half full,
//! `compact` rebuilds it without the tags that no longer matter (at or
//! behind their database's `V`).

/// Entries of the map (a power of two; it holds at most half as many):
/// 131,072 tenants (10 MB). With fewer entries, the tags of the tenants
/// claiming at once did not fit (2,048 kept by `compact`): the others were
/// back at `V` after each rebuild, tied there with every tenant not served
/// yet, and a tenant whose first job had just arrived lost every tie on
/// its wait (measured: not served in 30,000 claims among 10,000 tenants).
pub const CAP: usize = 1 << 18;
/// Past this, a database's clock is moved back to 0 (and its tags with it),
/// so that `c / w` down to 1e-6 (cost 1, weight 1,000,000) still counts.
const REBASE_AT: f64 = 1_048_576.0;

const EMPTY: u8 = 0;
/// `find` found neither the entry nor a free one.
const FULL: usize = usize::MAX;
const TENANT: u8 = 1;
/// The database's virtual time `V` (its tenant field is all zero).
const CLOCK: u8 = 2;

#[derive(Clone, Copy)]
#[repr(C)]
struct Tag {
    kind: u8,
    database: u32,
    tenant: [u8; 16],
    value: f64,
    /// When the tenant's last claim was charged (a timestamp; 0: never).
    charged_at: i64,
}

/// The fair-share clock. All-zero is an empty one.
#[repr(C)]
pub struct Clock<const N: usize = CAP> {
    used: u32,
    tags: [Tag; N],
}

/// Keyed with the server's secret (`counters::keyed_hash`): tenant ids come
/// from job data, and must not be able to build long probe chains.
fn hash<const N: usize>(kind: u8, database: u32, tenant: &[u8; 16]) -> usize {
    (super::counters::keyed_hash(kind, database, tenant, &[]) as usize) & (N - 1)
}

impl<const N: usize> Clock<N> {
    /// Ok(index) of the entry, or Err(index) of the free entry it would
    /// take (Err(FULL) if there is none: `set` keeps the map at most half
    /// full, so that is a bug, never a hang under the lock).
    fn find(&self, kind: u8, database: u32, tenant: &[u8; 16]) -> Result<usize, usize> {
        let mut i = hash::<N>(kind, database, tenant);
        for _ in 0..N {
            let t = &self.tags[i];
            if t.kind == EMPTY {
                return Err(i);
            }
            if t.kind == kind && t.database == database && &t.tenant == tenant {
                return Ok(i);
            }
            i = (i + 1) & (N - 1);
        }
        Err(FULL)
    }

    /// The free entry a new tag would take (None if it is there, or the map
    /// is full).
    fn free_entry(&self, kind: u8, database: u32, tenant: &[u8; 16]) -> Option<usize> {
        self.find(kind, database, tenant)
            .err()
            .filter(|&i| i != FULL)
    }

    fn get(&self, kind: u8, database: u32, tenant: &[u8; 16]) -> Option<f64> {
        self.find(kind, database, tenant)
            .ok()
            .map(|i| self.tags[i].value)
    }

    fn set(&mut self, kind: u8, database: u32, tenant: &[u8; 16], value: f64, at: i64) {
        if let Ok(i) = self.find(kind, database, tenant) {
            self.tags[i].value = value;
            self.tags[i].charged_at = at;
            return;
        }
        if self.used as usize >= N / 2 {
            self.compact();
        }
        if let Some(i) = self.free_entry(kind, database, tenant) {
            self.tags[i] = Tag {
                kind,
                database,
                tenant: *tenant,
                value,
                charged_at: at,
            };
            self.used += 1;
        }
    }

    /// The database's virtual time.
    fn now(&self, database: u32) -> f64 {
        self.get(CLOCK, database, &[0; 16]).unwrap_or(0.0)
    }

    /// The tag the tenant's next claim starts at (claim_jobs serves the
    /// least first).
    pub fn start(&self, database: u32, tenant: &[u8; 16]) -> f64 {
        self.start_after(self.now(database), database, tenant).0
    }

    /// `start` given the database's clock `v`, with when the tenant's last
    /// claim was charged (0: none its tag remembers).
    fn start_after(&self, v: f64, database: u32, tenant: &[u8; 16]) -> (f64, i64) {
        match self.find(TENANT, database, tenant) {
            Ok(i) => (self.tags[i].value.max(v), self.tags[i].charged_at),
            Err(_) => (v, 0),
        }
    }

    /// `start_after` the clock, for each of these tenants of one database.
    pub fn starts<'a>(
        &self,
        database: u32,
        tenants: impl Iterator<Item = &'a [u8; 16]>,
    ) -> Vec<(f64, i64)> {
        let v = self.now(database);
        tenants.map(|t| self.start_after(v, database, t)).collect()
    }

    /// Charge a claim of `cost` to the tenant: its tag moves on by
    /// `cost / weight`, and the database's clock to where the claim started,
    /// or to `picked_at` (the start the claimer saw) if that is earlier.
    /// `now`: the time of the claim.
    pub fn charge(
        &mut self,
        database: u32,
        tenant: &[u8; 16],
        cost: u32,
        weight: f64,
        picked_at: Option<f64>,
        now: i64,
    ) {
        let weight = if weight.is_finite() && weight > 0.0 {
            weight
        } else {
            1.0
        };
        let start = self.start(database, tenant);
        let finish = start + f64::from(cost) / weight;
        self.set(TENANT, database, tenant, finish, now);
        let clock = picked_at.map_or(start, |p| p.min(start));
        if clock > self.now(database) {
            self.set(CLOCK, database, &[0; 16], clock, 0);
        }
        let v = self.now(database);
        if v > REBASE_AT {
            self.rebase(database, v);
        }
    }

    /// Move a database's clock and tags back by `by`, its clock (order and
    /// gaps kept; tags behind the clock are at it anyway).
    fn rebase(&mut self, database: u32, by: f64) {
        for t in self.tags.iter_mut() {
            if t.kind != EMPTY && t.database == database {
                t.value = (t.value - by).max(0.0);
            }
        }
    }

    /// Drop the clocks and tags of the databases `gone` (sorted).
    pub fn forget_databases(&mut self, gone: &[u32]) {
        let keep: Vec<Tag> = self
            .tags
            .iter()
            .filter(|t| t.kind != EMPTY && gone.binary_search(&t.database).is_err())
            .copied()
            .collect();
        if keep.len() == self.used as usize {
            return;
        }
        self.refill(keep);
    }

    /// The map emptied, then `tags` put in.
    fn refill(&mut self, tags: Vec<Tag>) {
        for t in self.tags.iter_mut() {
            t.kind = EMPTY;
        }
        self.used = 0;
        for t in tags {
            if let Some(i) = self.free_entry(t.kind, t.database, &t.tenant) {
                self.tags[i] = t;
                self.used += 1;
            }
        }
    }

    /// Rebuild the map with the tags still ahead of their database's clock,
    /// furthest ahead first, and the clocks of their databases, in a quarter
    /// of it at most. The tags left out lose a lead of less than those kept
    /// (they are served that much sooner once); a database left without
    /// tags ahead loses its clock too (its tenants all start at 0 again, as
    /// after a restart).
    fn compact(&mut self) {
        let mut ahead: Vec<(f64, Tag)> = self
            .tags
            .iter()
            .filter(|t| t.kind == TENANT)
            .map(|t| (t.value - self.now(t.database), *t))
            .filter(|(lead, _)| *lead > 0.0)
            .collect();
        ahead.sort_by(|a, b| b.0.total_cmp(&a.0));
        let mut databases = std::collections::HashSet::new();
        let mut kept = Vec::new();
        for (_, t) in ahead {
            let clock = usize::from(!databases.contains(&t.database));
            if kept.len() + databases.len() + 1 + clock > N / 4 {
                break;
            }
            databases.insert(t.database);
            kept.push(t);
        }
        kept.extend(
            self.tags
                .iter()
                .filter(|t| t.kind == CLOCK && databases.contains(&t.database))
                .copied(),
        );
        self.refill(kept);
    }
}

#[cfg(any(test, feature = "pg_test"))]
#[pgrx::pg_schema]
mod tests {
    use super::{Clock, REBASE_AT};
    use pgrx::prelude::*;

    /// The map's behaviour at any size, on a small one (the server's takes
    /// minutes to fill in a debug build).
    const CAP: usize = 8192;

    fn empty() -> Box<Clock<CAP>> {
        let layout = std::alloc::Layout::new::<Clock<CAP>>();
        // SAFETY: all-zero is an empty clock (as in shared memory).
        unsafe { Box::from_raw(std::alloc::alloc_zeroed(layout).cast::<Clock<CAP>>()) }
    }

    fn tenant(n: u32) -> [u8; 16] {
        let mut t = [7u8; 16];
        t[..4].copy_from_slice(&n.to_le_bytes());
        t
    }

    /// claim_jobs' rule: the least start tag, then the heavier.
    fn pick(c: &Clock<CAP>, db: u32, tenants: &[([u8; 16], f64)]) -> usize {
        (0..tenants.len())
            .min_by(|&x, &y| {
                c.start(db, &tenants[x].0)
                    .total_cmp(&c.start(db, &tenants[y].0))
                    .then_with(|| tenants[y].1.total_cmp(&tenants[x].1))
            })
            .expect("tenants")
    }

    #[pg_test]
    fn saturated_tenants_get_claimed_cost_in_proportion_to_weight() {
        let mut c = empty();
        let ts = [(tenant(1), 1.0), (tenant(2), 2.0), (tenant(3), 4.0)];
        let mut claimed = [0u32; 3];
        for n in 1..=700 {
            let i = pick(&c, 5, &ts);
            c.charge(5, &ts[i].0, 1, ts[i].1, None, 0);
            claimed[i] += 1;
            // Never more than a job from its share at any point.
            for (k, (_, w)) in ts.iter().enumerate() {
                let share = f64::from(n) * w / 7.0;
                assert!(
                    (f64::from(claimed[k]) - share).abs() <= 1.0,
                    "{n}: {claimed:?}"
                );
            }
        }
        assert_eq!(claimed, [100, 200, 400]);
    }

    #[pg_test]
    fn costs_count_as_cost_over_weight() {
        let mut c = empty();
        let (heavy, light) = (tenant(1), tenant(2));
        // heavy's jobs cost 3, light's 1, same weight: 1 job of heavy per 3.
        let mut cost = [0u32; 2];
        for _ in 0..400 {
            let i = usize::from(c.start(1, &light) < c.start(1, &heavy));
            let (t, units) = if i == 0 { (heavy, 3) } else { (light, 1) };
            c.charge(1, &t, units, 1.0, None, 0);
            cost[i] += units;
        }
        assert!(cost[0].abs_diff(cost[1]) <= 3, "{cost:?}");
    }

    #[pg_test]
    fn an_idle_or_new_tenant_starts_at_the_clock_with_no_credit() {
        let mut c = empty();
        let (busy, late) = (tenant(1), tenant(2));
        for _ in 0..100 {
            c.charge(9, &busy, 1, 1.0, None, 0);
        }
        // busy ran alone: it is one job ahead, not 100.
        assert_eq!(c.start(9, &late), 99.0);
        assert_eq!(c.start(9, &busy), 100.0);
        c.charge(9, &late, 1, 1.0, None, 0);
        assert_eq!(c.start(9, &late), 100.0);
        // Other databases keep their own clocks.
        assert_eq!(c.start(10, &busy), 0.0);
    }

    #[pg_test]
    fn concurrent_claims_of_one_tenant_take_no_credit_from_the_others() {
        let mut c = empty();
        let (light, heavy) = (tenant(1), tenant(2));
        c.charge(2, &light, 1, 1.0, Some(0.0), 0);
        for _ in 0..4 {
            c.charge(2, &heavy, 1, 4.0, Some(c.start(2, &heavy)), 0);
        }
        // Both at 1. Three claimers pick light at once (they all saw 1).
        let seen = c.start(2, &light);
        for _ in 0..3 {
            c.charge(2, &light, 1, 1.0, Some(seen), 0);
        }
        assert_eq!(c.start(2, &light), 4.0);
        // heavy keeps its place: served next, four times, before light.
        assert_eq!(c.start(2, &heavy), 1.0);
        assert_eq!(c.now(2), 1.0);
    }

    #[pg_test]
    fn a_full_map_keeps_the_tenants_ahead_of_the_clock() {
        let mut c = empty();
        // A tenant far ahead, then more tenants than the map holds, each
        // one claim ahead.
        c.charge(1, &tenant(0), 1000, 1.0, None, 0);
        for n in 1..(CAP as u32 * 2) {
            c.charge(1, &tenant(n), 1, 1.0, None, 0);
        }
        assert!(c.used as usize <= CAP / 2);
        assert_eq!(c.start(1, &tenant(0)), 1000.0);
    }

    #[pg_test]
    fn many_databases_never_fill_the_map() {
        let mut c = empty();
        // Each database's clock is an entry too: 3 * CAP databases, each
        // with a tenant charged twice (a clock and a tag ahead of it).
        for db in 1..=(3 * CAP as u32) {
            c.charge(db, &tenant(1), 1, 1.0, None, 0);
            c.charge(db, &tenant(1), 1, 1.0, None, 0);
            assert!(c.used as usize <= CAP / 2, "{db}");
        }
        // The newest database still keeps its tag and clock.
        let db = 3 * CAP as u32;
        assert_eq!(c.start(db, &tenant(1)), 2.0);
        assert_eq!(c.now(db), 1.0);
    }

    #[pg_test]
    fn the_clock_moves_back_keeping_the_gaps() {
        let mut c = empty();
        let (a, b) = (tenant(1), tenant(2));
        c.charge(3, &a, 1_000_000, 0.001, None, 0); // 1e9 ahead
                                                    // b's claims start at 0, 1e6 and 2e6: the last, past REBASE_AT,
                                                    // moves the clock and the tags back by 2e6.
        for _ in 0..3 {
            c.charge(3, &b, 1000, 0.001, None, 0);
        }
        assert!(c.now(3) < REBASE_AT);
        assert_eq!(c.start(3, &b), 1e6);
        assert_eq!(c.start(3, &a) - c.start(3, &b), 1e9 - 3e6);
    }
}
