//! Rate limits without `shared_preload_libraries`: the same GCRA steps on
//! rows of `meshhook_limits.rate_state` (see sql/rate.sql), locked FOR UPDATE
//! and so transactional here, unlike the shared-memory path. Announced once
//! per session.
use super::gcra::{gcra_all, Bucket, Decision};
use crate::error::Result;
use pgrx::datum::Uuid;
use pgrx::prelude::*;

/// One check: the tenant's row (empty key) first, so two callers lock in
/// one order.
pub fn check(tenant: Uuid, buckets: &[(&[u8], Bucket)], now: i64, cost: i64) -> Result<Decision> {
    crate::shmem::notice_table_fallback(crate::shmem::TableFallback::RateLimits);
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
        Ok(d)
    })
}

/// Pause `key` until `until_ns`.
pub fn pause(tenant: Uuid, key: &str, until_ns: i64, now: i64) -> Result<()> {
    crate::shmem::notice_table_fallback(crate::shmem::TableFallback::RateLimits);
    Spi::run_with_args(
        "SELECT 1 FROM meshhook_limits._rate_state_lock($1, $2, $4);
             UPDATE meshhook_limits.rate_state SET paused_until = $3 WHERE tenant_id = $1 AND key = $2",
        &[tenant.into(), key.into(), until_ns.into(), now.into()],
    )?;
    Ok(())
}
