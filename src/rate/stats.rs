//! `rate_limit_stats`: the rate table's counters, for monitors.
use super::table::{self, BUCKETS, WAYS};
use crate::error::LimitsError;
use crate::identity;
use pgrx::prelude::*;
use std::sync::atomic::Ordering;

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
