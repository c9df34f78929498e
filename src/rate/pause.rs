//! `pause_rate_limit`: refuse a key until a time an upstream named, in the
//! key's own bucket.
use super::check::validate;
use super::fallback;
use super::gcra::now_ns;
use super::rule;
use super::table::{self, with_entries};
use crate::error::{LimitsError, OrRaise, Result};
use crate::identity;
use pgrx::datum::{TimestampWithTimeZone, Uuid};
use pgrx::pg_sys;
use pgrx::prelude::*;

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
    if rule::get(tenant, key)?.key.is_none() {
        return Err(LimitsError::invalid(
            format!("key \"{}\" has no rate of its own to pause", identity::truncate(key, 64)),
            "set requests_per_second.<key> for the upstream first, e.g. set_limit('requests_per_second.stripe-api', 25)",
        ));
    }
    if table::table().is_none() {
        return fallback::pause(tenant, key, until_ns, now);
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
