//! Rate limits: GCRA (the generic cell rate algorithm, a token bucket kept
//! as one timestamp per key) in shared memory.
//!
//! Each (tenant, key) has a theoretical arrival time `tat`. With emission
//! interval `T = 1 / rate` and tolerance `τ = burst × T`, a request of cost c
//! is allowed when `max(tat, now) + c·T − now ≤ τ`, and then moves `tat` to
//! that sum. So `burst` requests pass at once, a stream at `rate` always
//! passes, and a refusal knows exactly when the request would pass.
//!
//! What a check spends from: the tenant's bucket, when the tenant has a
//! `requests_per_second` (it bounds the tenant across all its keys, so
//! rotating key names gains nothing), and the key's own bucket, when
//! `requests_per_second.<key>` is set. A request passes only when every
//! bucket that applies has room, and then spends from each. A pause belongs
//! to a key with a rule of its own. So a tenant has at most one entry plus
//! one per keyed rule an admin set: it cannot fill the table.
//!
//! The table is fixed: `BUCKETS` sets of `WAYS` entries, behind `PARTITIONS`
//! LWLocks. An entry lives in the set its hash (of database, tenant and key,
//! with a secret seed chosen at server start) picks. When the set is full, an
//! idle entry (tat and pause in the past: indistinguishable from a fresh key)
//! is reused first; if none is idle the entry closest to idle is evicted and
//! that key starts again with a full burst (counted in `evictions`).
//!
//! State is not transactional, like a sequence: a rolled-back transaction
//! keeps the tokens it spent.
pub mod table;

use crate::error::{LimitsError, OrRaise, Result};
use crate::identity;
use crate::limits::{GenerationCache, Mode};
use crate::row::datum;
use pgrx::datum::{Interval, TimestampWithTimeZone, Uuid};
use pgrx::pg_sys;
use pgrx::prelude::*;
use std::cell::{Cell, RefCell};
use std::sync::atomic::Ordering;
use table::{with_entries, BUCKETS, KEY_MAX, WAYS};

/// Rules `RULES` caches at most (emptied when full): one per tenant and
/// key this backend checked.
const MAX_RULES: usize = 10_000;

/// Now, in nanoseconds since 2000-01-01; `meshhook_limits.test_clock` (epoch
/// seconds, superuser only) replaces the real clock for tests.
pub fn now_ns() -> i64 {
    let fake = crate::gucs::test_clock();
    if fake > 0.0 {
        // 946684800 = seconds from 1970-01-01 to 2000-01-01.
        return ((fake - 946_684_800.0) * 1e9).round() as i64;
    }
    unsafe { pg_sys::GetCurrentTimestamp() }.saturating_mul(1000)
}

/// One rate: requests per second and how many may pass at once.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Bucket {
    pub rate: f64,
    pub burst: f64,
}

/// The buckets a check of one key spends from (see the module docs).
#[derive(Clone, Copy, Debug, PartialEq, Default)]
pub struct Rule {
    /// `requests_per_second.<key>`, when any scope sets it.
    pub key: Option<Bucket>,
    /// The tenant's `requests_per_second`, across all its keys.
    pub tenant: Option<Bucket>,
}

impl Rule {
    /// (entry key, bucket) pairs, the tenant's (empty key) first.
    fn buckets<'a>(&self, key: &'a [u8]) -> Vec<(&'a [u8], Bucket)> {
        let mut v = Vec::with_capacity(2);
        if let Some(b) = self.tenant {
            v.push((&key[..0], b));
        }
        if let Some(b) = self.key {
            v.push((key, b));
        }
        v
    }
}

#[derive(Debug, PartialEq)]
pub struct Decision {
    pub allowed: bool,
    pub remaining: Option<i64>,
    pub retry_after_ns: Option<i64>,
}

/// The GCRA step on one entry's state. Pure, so it is unit-tested directly.
pub fn gcra(
    tat: i64,
    paused_until: i64,
    now: i64,
    cost: i64,
    rate: f64,
    burst: f64,
) -> (Decision, i64) {
    if paused_until > now {
        return (
            Decision {
                allowed: false,
                remaining: Some(0),
                retry_after_ns: Some(paused_until - now),
            },
            tat,
        );
    }
    if rate <= 0.0 {
        return (
            Decision {
                allowed: false,
                remaining: Some(0),
                retry_after_ns: None,
            },
            tat,
        );
    }
    let t = 1e9 / rate; // ns per token
    let tau = burst * t;
    // Work relative to now: absolute nanoseconds do not fit an f64 exactly.
    let backlog = (tat.max(now) - now) as f64;
    let debt = backlog + cost as f64 * t;
    if debt <= tau + 1.0 {
        let remaining = ((tau - debt) / t + 1e-6).floor().max(0.0) as i64;
        (
            Decision {
                allowed: true,
                remaining: Some(remaining),
                retry_after_ns: None,
            },
            now + debt.round() as i64,
        )
    } else {
        let remaining = ((tau - backlog) / t + 1e-6).floor().max(0.0) as i64;
        let retry = (debt - tau).ceil() as i64;
        (
            Decision {
                allowed: false,
                remaining: Some(remaining),
                retry_after_ns: Some(retry),
            },
            tat,
        )
    }
}

/// One GCRA step over every bucket at once: allowed only when each allows;
/// then each spends. `states` are the buckets' (tat, paused_until); returns
/// the decision and the new tats.
pub fn gcra_all(
    states: &[(i64, i64)],
    buckets: &[Bucket],
    now: i64,
    cost: i64,
) -> (Decision, Vec<i64>) {
    let steps: Vec<(Decision, i64)> = states
        .iter()
        .zip(buckets)
        .map(|(&(tat, paused), b)| gcra(tat, paused, now, cost, b.rate, b.burst))
        .collect();
    let allowed = steps.iter().all(|(d, _)| d.allowed);
    let remaining = steps.iter().filter_map(|(d, _)| d.remaining).min();
    let retry_after_ns = if allowed {
        None
    } else {
        // The latest moment every refusing bucket has room; never (None)
        // when one of them never will (a rate of 0).
        steps
            .iter()
            .filter(|(d, _)| !d.allowed)
            .map(|(d, _)| d.retry_after_ns)
            .try_fold(0i64, |acc, r| r.map(|r| acc.max(r)))
    };
    let tats = steps
        .iter()
        .zip(states)
        .map(|((_, new), &(old, _))| if allowed { *new } else { old })
        .collect();
    (
        Decision {
            allowed,
            remaining,
            retry_after_ns,
        },
        tats,
    )
}

type Key = ([u8; 16], String);
thread_local! {
    static RULES: RefCell<GenerationCache<Key, Rule>> = RefCell::new(GenerationCache::new());
}

fn load_rule(tenant: Uuid, key: &str) -> Result<Rule> {
    // A fresh snapshot, as limits::load does (see GenerationCache::get_or_load).
    // `_rate_rules` is new in 0.2.0: passthrough makes its absence (0.1.0's
    // SQL under this library) an error that says what to do.
    crate::error::passthrough(|| {
        Spi::connect_mut(|c| {
            let rows = c.update(
            "SELECT key_rate, key_burst, tenant_rate, tenant_burst FROM meshhook_limits._rate_rules($1, $2)",
            Some(1),
            &[tenant.into(), key.into()],
        )?;
            let mut rule = Rule::default();
            if let Some(r) = rows.into_iter().next() {
                let bucket = |rate: Option<f64>, burst: Option<f64>| {
                    rate.map(|rate| Bucket {
                        rate,
                        burst: burst.unwrap_or(0.0),
                    })
                };
                rule.key = bucket(r.get::<f64>(1)?, r.get::<f64>(2)?);
                rule.tenant = bucket(r.get::<f64>(3)?, r.get::<f64>(4)?);
            }
            Ok(rule)
        })
    })
}

fn rule(tenant: Uuid, key: &str) -> Result<Rule> {
    GenerationCache::get_or_load(
        &RULES,
        MAX_RULES,
        (*tenant.as_bytes(), key.to_string()),
        || load_rule(tenant, key),
    )
}

fn validate(tenant: Option<Uuid>, key: Option<&str>) -> Result<(Uuid, &str)> {
    let tenant = tenant.ok_or_else(|| {
        LimitsError::invalid("tenant_id must not be NULL", "pass the uuid of the tenant")
    })?;
    let key = key.ok_or_else(|| {
        LimitsError::invalid(
            "key must not be NULL",
            "use 'default' for the tenant's overall rate",
        )
    })?;
    if key.is_empty() || key.len() > KEY_MAX {
        return Err(LimitsError::invalid(
            format!("key must be 1 to {KEY_MAX} bytes long, got {}", key.len()),
            "name the upstream or endpoint being limited, e.g. 'stripe-api'",
        ));
    }
    identity::require_act_for(tenant)?;
    Ok((tenant, key))
}

fn over_burst(cost: i64, burst: f64, key: &str) -> LimitsError {
    LimitsError::invalid(
        format!(
            "cost {cost} exceeds the burst {burst} of key \"{}\": it could never be allowed",
            identity::truncate(key, 64)
        ),
        "raise the burst with set_limit('requests_per_second', rate, tenant_id, burst => n) or lower the cost",
    )
}

fn ns_interval(ns: i64) -> Interval {
    // Round up to the microsecond: retrying after retry_after always passes.
    Interval::from_micros((ns + 999) / 1000)
}

type Row = (bool, Option<i64>, Option<Interval>);

/// See `limits::Mode`. The definer (`_check_rate_limit`) loads the key's
/// rule into this backend's cache, and without shared memory keeps the state
/// in a table. The fast path (no SPI, no table, so `check_rate_limit` runs as
/// SECURITY INVOKER) answers None whenever that would be needed, before
/// spending anything.
fn check(
    tenant: Option<Uuid>,
    key: Option<&str>,
    cost: Option<i32>,
    mode: Mode,
) -> Result<Option<Row>> {
    let cost = i64::from(cost.unwrap_or(1));
    if cost < 0 {
        return Err(LimitsError::invalid(
            format!("cost must be >= 0, got {cost}"),
            "cost is the number of tokens this request spends",
        ));
    }
    let (tenant, key) = validate(tenant, key)?;
    crate::error::refuse_on_standby("check_rate_limit")?;
    let rule = if mode == Mode::Definer {
        rule(tenant, key)?
    } else {
        match GenerationCache::get(&RULES, &(*tenant.as_bytes(), key.to_string())) {
            Some(rule) => rule,
            None => return Ok(None),
        }
    };
    let buckets = rule.buckets(key.as_bytes());
    if buckets.is_empty() {
        if let Some(t) = table::table() {
            t.allowed.fetch_add(1, Ordering::Relaxed);
        }
        return Ok(Some((true, None, None)));
    }
    for (_, b) in &buckets {
        if cost as f64 > b.burst && b.rate > 0.0 {
            return Err(over_burst(cost, b.burst, key));
        }
    }
    let now = now_ns();
    if table::table().is_none() {
        if mode == Mode::FastPath {
            return Ok(None);
        }
        crate::shmem::notice_table_fallback(crate::shmem::TableFallback::RateLimits);
        return check_in_table(tenant, &buckets, now, cost).map(Some);
    }
    let keys: Vec<&[u8]> = buckets.iter().map(|(k, _)| *k).collect();
    let rates: Vec<Bucket> = buckets.iter().map(|(_, b)| *b).collect();
    let d = with_entries(tenant.as_bytes(), &keys, now, |entries| {
        let states: Vec<(i64, i64)> = entries.iter().map(|e| (e.tat, e.paused_until)).collect();
        let (d, tats) = gcra_all(&states, &rates, now, cost);
        for (e, tat) in entries.iter_mut().zip(tats) {
            e.tat = tat;
        }
        d
    })
    .ok_or(LimitsError::NotPreloaded)?;
    if let Some(t) = table::table() {
        if d.allowed { &t.allowed } else { &t.denied }.fetch_add(1, Ordering::Relaxed);
    }
    Ok(Some((
        d.allowed,
        d.remaining,
        d.retry_after_ns.map(ns_interval),
    )))
}

/// Without shared memory: the same GCRA step on rows locked FOR UPDATE
/// (transactional here, unlike the shared-memory path), the tenant's row
/// (empty key) first, so two callers lock in one order.
fn check_in_table(tenant: Uuid, buckets: &[(&[u8], Bucket)], now: i64, cost: i64) -> Result<Row> {
    Spi::connect_mut(|c| {
        let mut states = Vec::with_capacity(buckets.len());
        for (key, _) in buckets {
            let key = String::from_utf8_lossy(key).into_owned();
            let rows = c.update(
                "SELECT tat, paused_until FROM meshhook_limits._rate_state_lock($1, $2, $3)",
                Some(1),
                &[tenant.into(), key.into(), now.into()],
            )?;
            let (mut tat, mut paused) = (now, 0);
            if let Some(r) = rows.into_iter().next() {
                tat = r.get::<i64>(1)?.unwrap_or(now);
                paused = r.get::<i64>(2)?.unwrap_or(0);
            }
            states.push((tat, paused));
        }
        let rates: Vec<Bucket> = buckets.iter().map(|(_, b)| *b).collect();
        let (d, tats) = gcra_all(&states, &rates, now, cost);
        for (((key, _), new_tat), (old_tat, _)) in buckets.iter().zip(tats).zip(&states) {
            if new_tat != *old_tat {
                let key = String::from_utf8_lossy(key).into_owned();
                c.update(
                    "UPDATE meshhook_limits.rate_state SET tat = $3 WHERE tenant_id = $1 AND key = $2",
                    None,
                    &[tenant.into(), key.into(), new_tat.into()],
                )?;
            }
        }
        Ok((d.allowed, d.remaining, d.retry_after_ns.map(ns_interval)))
    })
}

/// The complete check, as the extension's owner (`Mode::Definer`).
/// `check_rate_limit` calls it whenever its own fast path cannot answer.
#[pg_extern(volatile, parallel_unsafe, security_definer)]
#[search_path(pg_catalog, pg_temp)]
fn _check_rate_limit(
    tenant_id: Option<Uuid>,
    key: Option<crate::row::Utf8>,
    cost: Option<i32>,
) -> TableIterator<
    'static,
    (
        name!(allowed, bool),
        name!(remaining, Option<i64>),
        name!(retry_after, Option<Interval>),
    ),
> {
    let row = crate::row::utf8(&key, "key")
        .and_then(|key| check(tenant_id, key, cost, Mode::Definer))
        .and_then(|r| r.ok_or(LimitsError::NotPreloaded))
        .or_raise();
    TableIterator::once(row)
}

fn check_as_owner(tenant: Option<Uuid>, key: Option<&str>, cost: Option<i32>) -> Result<Row> {
    Spi::connect(|c| {
        let rows = c.select(
            "SELECT allowed, remaining, retry_after FROM meshhook_limits._check_rate_limit($1, $2, $3)",
            Some(1),
            &[tenant.into(), key.into(), cost.into()],
        )?;
        let mut out = (false, None, None);
        if let Some(r) = rows.into_iter().next() {
            out = (
                r.get::<bool>(1)?.unwrap_or(false),
                r.get::<i64>(2)?,
                r.get::<Interval>(3)?,
            );
        }
        Ok(out)
    })
}

thread_local! {
    /// The blessed row type of check_rate_limit's result.
    static ROW_DESC: Cell<pg_sys::TupleDesc> = const { Cell::new(std::ptr::null_mut()) };
}

crate::finfo_v1!(pg_finfo_meshhook_limits_check_rate_limit);

/// `check_rate_limit(tenant_id, key, cost)`: spend `cost` tokens of the
/// tenant's rate for `key`. Never raises for a refusal: allowed = false with
/// the exact retry_after. Answers its one row directly (crate::row).
#[pg_guard]
#[no_mangle]
pub extern "C-unwind" fn meshhook_limits_check_rate_limit(
    fcinfo: pg_sys::FunctionCallInfo,
) -> pg_sys::Datum {
    // SAFETY: called by the executor with the three declared arguments.
    let (tenant, key, cost) = unsafe {
        (
            pgrx::fcinfo::pg_getarg::<Uuid>(fcinfo, 0),
            crate::row::text_arg(fcinfo, 1, "key").or_raise(),
            pgrx::fcinfo::pg_getarg::<i32>(fcinfo, 2),
        )
    };
    let row = crate::limits::fast_path_or_definer(check(tenant, key, cost, Mode::FastPath), || {
        check_as_owner(tenant, key, cost)
    });
    let cols = [
        (c"allowed", pg_sys::BOOLOID),
        (c"remaining", pg_sys::INT8OID),
        (c"retry_after", pg_sys::INTERVALOID),
    ];
    let row = [datum(row.0), datum(row.1), datum(row.2)];
    // SAFETY: the declared columns, and datums of their types.
    unsafe { crate::row::answer(fcinfo, &ROW_DESC, &cols, row, "check_rate_limit") }
}

extension_sql!(
    r#"
CREATE FUNCTION meshhook_limits.check_rate_limit(tenant_id uuid, key text DEFAULT 'default', cost integer DEFAULT 1)
RETURNS TABLE(allowed boolean, remaining bigint, retry_after interval)
LANGUAGE c VOLATILE PARALLEL UNSAFE
AS 'MODULE_PATHNAME', 'meshhook_limits_check_rate_limit';
COMMENT ON FUNCTION meshhook_limits.check_rate_limit(uuid, text, integer) IS
  'Spend cost tokens of the tenant''s rate for key (GCRA). SECURITY INVOKER: the caller must be the tenant or an admin.';
"#,
    name = "check_rate_limit",
    requires = [_check_rate_limit]
);

fn pause(
    tenant: Option<Uuid>,
    key: Option<&str>,
    until: Option<TimestampWithTimeZone>,
) -> Result<()> {
    let until = until.ok_or_else(|| {
        LimitsError::invalid(
            "until must not be NULL",
            "pass the time the upstream's Retry-After names",
        )
    })?;
    let (tenant, key) = validate(tenant, key)?;
    let until_ns = pg_sys::TimestampTz::from(until).saturating_mul(1000);
    let now = now_ns();
    if until_ns > now + 7 * 86_400 * 1_000_000_000 {
        return Err(LimitsError::invalid(
            "until must be at most 7 days ahead",
            "a Retry-After longer than that is better handled by disabling the integration",
        ));
    }
    // Only a key with a rule of its own has a bucket to pause: a pause of
    // any other name would make state for nothing.
    if rule(tenant, key)?.key.is_none() {
        return Err(LimitsError::invalid(
            format!("key \"{}\" has no rate of its own to pause", identity::truncate(key, 64)),
            "set requests_per_second.<key> for the upstream first, e.g. set_limit('requests_per_second.stripe-api', 25)",
        ));
    }
    if table::table().is_none() {
        crate::shmem::notice_table_fallback(crate::shmem::TableFallback::RateLimits);
        Spi::run_with_args(
            "SELECT 1 FROM meshhook_limits._rate_state_lock($1, $2, $4);
             UPDATE meshhook_limits.rate_state SET paused_until = $3 WHERE tenant_id = $1 AND key = $2",
            &[tenant.into(), key.into(), until_ns.into(), now.into()],
        )?;
        return Ok(());
    }
    with_entries(tenant.as_bytes(), &[key.as_bytes()], now, |e| {
        e[0].paused_until = until_ns
    })
    .ok_or(LimitsError::NotPreloaded)?;
    Ok(())
}

/// Refuse `key` for the tenant until `until` (an upstream's 429 Retry-After);
/// then the normal rate resumes. A time in the past lifts the pause.
#[pg_extern(volatile, parallel_unsafe, security_definer)]
#[search_path(pg_catalog, pg_temp)]
fn pause_rate_limit(
    tenant_id: Option<Uuid>,
    key: Option<crate::row::Utf8>,
    until: Option<TimestampWithTimeZone>,
) {
    crate::row::utf8(&key, "key")
        .and_then(|key| pause(tenant_id, key, until))
        .or_raise()
}

/// Counters of the rate table since the server started.
#[pg_extern(stable, parallel_safe)]
fn rate_limit_stats() -> TableIterator<
    'static,
    (
        name!(preloaded, bool),
        name!(capacity, i64),
        name!(allowed, i64),
        name!(denied, i64),
        name!(evictions, i64),
    ),
> {
    if !identity::caller_can_monitor() {
        LimitsError::forbidden(
            "only monitors and administrators may read rate_limit_stats()",
            "grant meshhook_limits_monitor (or pg_monitor) to the caller",
        )
        .raise();
    }
    let row = match table::table() {
        Some(t) => (
            true,
            (BUCKETS * WAYS) as i64,
            t.allowed.load(Ordering::Relaxed) as i64,
            t.denied.load(Ordering::Relaxed) as i64,
            t.evictions.load(Ordering::Relaxed) as i64,
        ),
        None => (false, 0, 0, 0, 0),
    };
    TableIterator::once(row)
}

#[cfg(test)]
mod unit {
    use super::gcra;
    const S: i64 = 1_000_000_000;

    #[test]
    fn burst_then_steady_state() {
        // 2 per second, burst 4: four at once, the fifth waits exactly 0.5 s.
        let (mut tat, now) = (0, 10 * S);
        for i in 0..4 {
            let (d, t) = gcra(tat, 0, now, 1, 2.0, 4.0);
            assert!(d.allowed, "request {i}");
            assert_eq!(d.remaining, Some(3 - i));
            tat = t;
        }
        let (d, _) = gcra(tat, 0, now, 1, 2.0, 4.0);
        assert!(!d.allowed);
        assert_eq!(d.retry_after_ns, Some(S / 2));
        let (d, _) = gcra(tat, 0, now + S / 2, 1, 2.0, 4.0);
        assert!(d.allowed);
    }

    #[test]
    fn pause_refuses_until_then_resumes() {
        let (d, _) = gcra(0, 5 * S, 4 * S, 1, 10.0, 10.0);
        assert!(!d.allowed);
        assert_eq!(d.retry_after_ns, Some(S));
        assert!(gcra(0, 5 * S, 5 * S, 1, 10.0, 10.0).0.allowed);
    }
}
