//! Whether one request passes: `check_rate_limit(tenant_id, key, cost)`,
//! answered by the caller's own backend when it can (the fast path), else
//! by `_check_rate_limit` as the extension's owner.
use super::fallback;
use super::gcra::{gcra_all, now_ns, Bucket};
use super::rule;
use super::table::{self, with_entries, KEY_MAX};
use crate::error::{LimitsError, OrRaise, Result};
use crate::identity;
use crate::limits::Mode;
use crate::row::datum;
use pgrx::datum::{Interval, Uuid};
use pgrx::pg_sys;
use pgrx::prelude::*;
use std::cell::Cell;
use std::sync::atomic::Ordering;

/// The tenant and key every rate function takes: both given, the key 1 to
/// `KEY_MAX` bytes, and the caller allowed to act for the tenant.
pub fn validate(tenant: Option<Uuid>, key: Option<&str>) -> Result<(Uuid, &str)> {
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
        rule::get(tenant, key)?
    } else {
        match rule::cached(tenant, key) {
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
        let d = fallback::check(tenant, &buckets, now, cost)?;
        return Ok(Some((
            d.allowed,
            d.remaining,
            d.retry_after_ns.map(ns_interval),
        )));
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
