//! Slots without `shared_preload_libraries`: the same contract on the table
//! `meshhook_limits.fallback_slots` (see sql/slots_fallback.sql). Slower, since every
//! acquire and release writes a row, and announced once per session.
use super::admission::Admission;
use super::clock::Ts;
use super::liveness::Liveness;
use crate::error::Result;
use pgrx::datum::Uuid;
use pgrx::prelude::*;

pub fn acquire(
    tenant: Uuid,
    project: Option<Uuid>,
    run_id: &str,
    lease_micros: i64,
) -> Result<Admission> {
    crate::shmem::notice_table_fallback(crate::shmem::TableFallback::Slots);
    Spi::connect_mut(|c| {
        let rows = c.update(
            "SELECT * FROM meshhook_limits._fallback_acquire($1, $2, $3, $4)",
            Some(1),
            &[
                tenant.into(),
                project.into(),
                run_id.into(),
                lease_micros.into(),
            ],
        )?;
        match rows.into_iter().next() {
            Some(r) => Admission::from_spi(&r),
            None => Ok(Admission::default()),
        }
    })
}

pub fn heartbeat(id: [u8; 16], memory: Option<i64>) -> Result<Liveness> {
    crate::shmem::notice_table_fallback(crate::shmem::TableFallback::Slots);
    Spi::connect_mut(|c| {
        let rows = c.update(
            "SELECT * FROM meshhook_limits._fallback_heartbeat($1, $2)",
            Some(1),
            &[Uuid::from_bytes(id).into(), memory.into()],
        )?;
        match rows.into_iter().next() {
            Some(r) => Ok(Liveness {
                alive: r.get::<bool>(1)?.unwrap_or(false),
                reason: r.get::<String>(2)?,
                deadline: r.get::<Ts>(3)?,
                lease_expires_at: r.get::<Ts>(4)?,
            }),
            None => Ok(Liveness::gone("not_found", None)),
        }
    })
}

pub fn release(id: [u8; 16], memory: Option<i64>) -> Result<bool> {
    crate::shmem::notice_table_fallback(crate::shmem::TableFallback::Slots);
    Ok(Spi::get_one_with_args::<bool>(
        "SELECT meshhook_limits._fallback_release($1, $2)",
        &[Uuid::from_bytes(id).into(), memory.into()],
    )?
    .unwrap_or(false))
}

pub fn reap() -> Result<i64> {
    Ok(Spi::get_one::<i64>("SELECT meshhook_limits._fallback_reap(NULL)")?.unwrap_or(0))
}

pub fn live(tenant: Uuid) -> Result<i64> {
    Ok(Spi::get_one_with_args::<i64>(
        "SELECT count(*) FROM meshhook_limits.fallback_slots WHERE tenant_id = $1",
        &[tenant.into()],
    )?
    .unwrap_or(0))
}
