//! The effective limits that the slot path needs, cached per backend.
//!
//! Resolution itself is SQL (`meshhook_limits._slot_limits`, project → tenant
//! → plan → global). The cache is keyed by (tenant, project) and dropped as a
//! whole when the shared generation counter moves: any change to limits,
//! plans or plan assignments bumps it both when made and at commit.
use crate::error::Result;
use pgrx::prelude::*;
use std::cell::RefCell;
use std::collections::HashMap;
use std::sync::atomic::Ordering;

#[derive(Clone, Copy, Debug, Default)]
pub struct SlotLimits {
    pub tenant_cap: Option<i64>,
    pub project_cap: Option<i64>,
    pub exec_micros: Option<i64>,
    pub memory_bytes: Option<i64>,
}

type Key = ([u8; 16], Option<[u8; 16]>);

thread_local! {
    static CACHE: RefCell<(u64, HashMap<Key, SlotLimits>)> = RefCell::new((u64::MAX, HashMap::new()));
}

const CACHE_MAX: usize = 10_000;

fn load(tenant: pgrx::Uuid, project: Option<pgrx::Uuid>) -> Result<SlotLimits> {
    Spi::connect(|c| {
        let rows = c.select(
            "SELECT tenant_cap, project_cap, exec_micros, memory_bytes
               FROM meshhook_limits._slot_limits($1, $2)",
            Some(1),
            &[tenant.into(), project.into()],
        )?;
        let mut out = SlotLimits::default();
        if let Some(row) = rows.into_iter().next() {
            out.tenant_cap = row.get::<i64>(1)?;
            out.project_cap = row.get::<i64>(2)?;
            out.exec_micros = row.get::<i64>(3)?;
            out.memory_bytes = row.get::<i64>(4)?;
        }
        Ok(out)
    })
}

pub fn slot_limits(tenant: pgrx::Uuid, project: Option<pgrx::Uuid>) -> Result<SlotLimits> {
    let Some(h) = crate::shmem::header() else {
        return load(tenant, project);
    };
    let generation = h.generation.load(Ordering::Acquire);
    let key: Key = (*tenant.as_bytes(), project.map(|p| *p.as_bytes()));
    let hit = CACHE.with(|c| {
        let mut c = c.borrow_mut();
        if c.0 != generation {
            c.0 = generation;
            c.1.clear();
        }
        c.1.get(&key).copied()
    });
    if let Some(v) = hit {
        return Ok(v);
    }
    let v = load(tenant, project)?;
    CACHE.with(|c| {
        let mut c = c.borrow_mut();
        if c.0 == generation {
            if c.1.len() >= CACHE_MAX {
                c.1.clear();
            }
            c.1.insert(key, v);
        }
    });
    Ok(v)
}

/// Called by the triggers on limits, plans and plan assignments.
#[pg_extern(volatile, parallel_unsafe)]
fn _limits_changed() {
    if let Some(h) = crate::shmem::header() {
        h.generation.fetch_add(1, Ordering::AcqRel);
    }
    crate::xact::bump_generation_at_commit();
}
