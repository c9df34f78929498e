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

/// A per-backend cache of values derived from the limit tables, dropped as a
/// whole when the shared generation moves (any change to limits, plans or
/// assignments). Without shared memory there is no generation: no caching.
pub struct GenerationCache<K, V> {
    generation: u64,
    map: HashMap<K, V>,
}

const CACHE_MAX: usize = 10_000;

impl<K: std::hash::Hash + Eq, V: Copy> GenerationCache<K, V> {
    pub fn new() -> Self {
        GenerationCache {
            generation: u64::MAX,
            map: HashMap::new(),
        }
    }

    /// The cached value for `key`, if the generation did not move; never loads.
    pub fn get(cell: &'static std::thread::LocalKey<RefCell<Self>>, key: &K) -> Option<V> {
        let generation = crate::shmem::header()?.generation.load(Ordering::Acquire);
        cell.with(|c| {
            let c = c.borrow();
            if c.generation == generation {
                c.map.get(key).copied()
            } else {
                None
            }
        })
    }

    /// The cached value for `key`, or `load()` it (and cache it when the
    /// generation did not move meanwhile). `load` must read with a fresh
    /// snapshot (see `fresh_select`): a value read under a snapshot older
    /// than the generation would be cached as current. Under REPEATABLE READ
    /// or SERIALIZABLE the snapshot is the transaction's, so nothing loaded
    /// there is cached.
    pub fn get_or_load(
        cell: &'static std::thread::LocalKey<RefCell<Self>>,
        key: K,
        load: impl FnOnce() -> Result<V>,
    ) -> Result<V> {
        let Some(h) = crate::shmem::header() else {
            return load();
        };
        if unsafe { pg_sys::XactIsoLevel } >= pg_sys::XACT_REPEATABLE_READ as i32 {
            return load();
        }
        let generation = h.generation.load(Ordering::Acquire);
        let hit = cell.with(|c| {
            let mut c = c.borrow_mut();
            if c.generation != generation {
                c.generation = generation;
                c.map.clear();
            }
            c.map.get(&key).copied()
        });
        if let Some(v) = hit {
            return Ok(v);
        }
        let v = load()?;
        cell.with(|c| {
            let mut c = c.borrow_mut();
            if c.generation == generation {
                if c.map.len() >= CACHE_MAX {
                    c.map.clear();
                }
                c.map.insert(key, v);
            }
        });
        Ok(v)
    }
}

type Key = ([u8; 16], Option<[u8; 16]>);

thread_local! {
    static CACHE: RefCell<GenerationCache<Key, SlotLimits>> = RefCell::new(GenerationCache::new());
}

fn load(tenant: pgrx::Uuid, project: Option<pgrx::Uuid>) -> Result<SlotLimits> {
    // update(), not select(): SPI takes a fresh snapshot for it (READ
    // COMMITTED), so what is loaded is at least as new as the generation.
    Spi::connect_mut(|c| {
        let rows = c.update(
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

fn key(tenant: pgrx::Uuid, project: Option<pgrx::Uuid>) -> Key {
    (*tenant.as_bytes(), project.map(|p| *p.as_bytes()))
}

/// The slot limits if this backend has them cached (never runs SQL).
pub fn cached_slot_limits(tenant: pgrx::Uuid, project: Option<pgrx::Uuid>) -> Option<SlotLimits> {
    GenerationCache::get(&CACHE, &key(tenant, project))
}

pub fn slot_limits(tenant: pgrx::Uuid, project: Option<pgrx::Uuid>) -> Result<SlotLimits> {
    GenerationCache::get_or_load(&CACHE, key(tenant, project), || load(tenant, project))
}

/// Called by the triggers on limits, plans and plan assignments.
#[pg_extern(volatile, parallel_unsafe)]
fn _limits_changed() {
    if let Some(h) = crate::shmem::header() {
        h.generation.fetch_add(1, Ordering::AcqRel);
    }
    crate::xact::bump_generation_at_commit();
}

pgrx::extension_sql!(
    "REVOKE EXECUTE ON FUNCTION meshhook_limits._limits_changed() FROM PUBLIC;",
    name = "limits_changed_grants",
    requires = [_limits_changed]
);
