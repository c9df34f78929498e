//! The effective limits that the slot path needs, cached per backend, and
//! how every such cache learns that limits changed.
//!
//! Resolution itself is SQL (`meshhook_limits._slot_limits`, project → tenant
//! → plan → global). The cache is keyed by (tenant, project) and dropped as a
//! whole when the shared generation counter moves: any change to limits,
//! plans or plan assignments bumps it both when made and when its
//! transaction ends (`_limits_changed`, called by triggers on those tables).
//! The rate limiter's rule cache is a `GenerationCache` too.
//!
//! Why a counter rather than a relcache invalidation callback: the callback
//! fires in each backend only when it next processes invalidations, while a
//! shared counter is read by the very next call, and a load reads with a
//! fresh snapshot, so nothing older than the counter is cached under it
//! (see `GenerationCache::get_or_load`).
use crate::error::Result;
use pgrx::prelude::*;
use std::cell::Cell;
use std::cell::RefCell;
use std::collections::HashMap;
use std::sync::atomic::{AtomicPtr, AtomicU64, Ordering};

/// The generation, in shared memory (a `shmem::Segment`).
static GENERATION: AtomicPtr<AtomicU64> = AtomicPtr::new(std::ptr::null_mut());

pub static SEGMENT: crate::shmem::Segment = crate::shmem::Segment { request, startup };

unsafe fn request() {
    unsafe { pg_sys::RequestAddinShmemSpace(std::mem::size_of::<AtomicU64>()) };
}

unsafe fn startup() {
    let (generation, _) =
        unsafe { crate::shmem::init_struct::<AtomicU64>(c"meshhook_limits limits generation") };
    GENERATION.store(generation, Ordering::Release);
}

/// The shared generation; None without the preload (then nothing is cached).
fn generation() -> Option<&'static AtomicU64> {
    let p = GENERATION.load(Ordering::Acquire);
    // SAFETY: set once by the startup hook; shared memory outlives the process.
    (crate::shmem::preloaded() && !p.is_null()).then(|| unsafe { &*p })
}

thread_local! {
    /// Limits changed in this transaction: bump again when it ends.
    static BUMP_AT_END: Cell<bool> = const { Cell::new(false) };
}

/// Registers the transaction callback that bumps the generation when a
/// transaction that changed limits ends. From `_PG_init`.
pub fn init() {
    unsafe {
        pg_sys::RegisterXactCallback(Some(on_xact), std::ptr::null_mut());
        pg_sys::RegisterSubXactCallback(Some(on_subxact), std::ptr::null_mut());
    }
}

/// A savepoint rolled back (or a PL/pgSQL exception block left) in a
/// transaction that changed limits may have undone the change: this
/// backend's caches may hold what it loaded in between, so they go.
/// (Other backends never saw the change: it was not committed.)
#[pgrx::pg_guard]
unsafe extern "C-unwind" fn on_subxact(
    event: pg_sys::SubXactEvent::Type,
    _sub: pg_sys::SubTransactionId,
    _parent: pg_sys::SubTransactionId,
    _arg: *mut std::ffi::c_void,
) {
    if event == pg_sys::SubXactEvent::SUBXACT_EVENT_ABORT_SUB && BUMP_AT_END.with(|b| b.get()) {
        if let Some(g) = generation() {
            g.fetch_add(1, Ordering::AcqRel);
        }
    }
}

#[pgrx::pg_guard]
unsafe extern "C-unwind" fn on_xact(event: pg_sys::XactEvent::Type, _arg: *mut std::ffi::c_void) {
    use pg_sys::XactEvent::*;
    match event {
        // Backends drop their caches when the change's transaction ends,
        // which a prepared transaction does only later: refuse to prepare
        // (the only point where an error still aborts cleanly).
        XACT_EVENT_PRE_PREPARE if BUMP_AT_END.with(|b| b.get()) => {
            crate::error::LimitsError::PreparedTransaction.raise();
        }
        // At the end either way: the transaction may have cached what it
        // changed, and after a rollback that is stale too.
        XACT_EVENT_COMMIT
        | XACT_EVENT_PARALLEL_COMMIT
        | XACT_EVENT_ABORT
        | XACT_EVENT_PARALLEL_ABORT
            if BUMP_AT_END.with(|b| b.replace(false)) =>
        {
            if let Some(g) = generation() {
                g.fetch_add(1, Ordering::AcqRel);
            }
        }
        _ => {}
    }
}

/// How an entry point of the slot and rate paths runs.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// The caller's own SECURITY INVOKER path: shared memory and limits
    /// cached in this backend only. It answers None whenever SQL would be
    /// needed, before changing anything, and the definer twin takes over.
    FastPath,
    /// The SECURITY DEFINER twin (`_acquire_execution_slot`,
    /// `_release_execution_slot`, `_check_rate_limit`): free to run SQL.
    Definer,
}

/// What every C entry point of the slot and rate paths answers: the fast
/// path's answer, or, when it needs SQL, the definer twin's, whose errors are
/// re-raised as they were (SQLSTATE, message, hint).
pub fn fast_path_or_definer<T>(fast: Result<Option<T>>, definer: impl FnOnce() -> Result<T>) -> T {
    use crate::error::OrRaise;
    match fast.or_raise() {
        Some(answer) => answer,
        None => crate::error::passthrough(definer).or_raise(),
    }
}

#[derive(Clone, Copy, Debug, Default)]
pub struct SlotLimits {
    pub tenant_cap: Option<i64>,
    pub project_cap: Option<i64>,
    /// `concurrent_executions.<key>` of the key asked for (per tenant).
    pub key_cap: Option<i64>,
    /// `concurrent_executions_total`: every slot of the database.
    pub total_cap: Option<i64>,
    /// The tenant's `fair_share_weight` (claim_jobs' shares).
    pub weight: Option<f64>,
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

impl<K: std::hash::Hash + Eq, V: Copy> GenerationCache<K, V> {
    pub fn new() -> Self {
        GenerationCache {
            generation: u64::MAX,
            map: HashMap::new(),
        }
    }

    /// The cached value for `key`, if the generation did not move; never loads.
    pub fn get(cell: &'static std::thread::LocalKey<RefCell<Self>>, key: &K) -> Option<V> {
        let generation = generation()?.load(Ordering::Acquire);
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
        max: usize,
        key: K,
        load: impl FnOnce() -> Result<V>,
    ) -> Result<V> {
        let Some(generation) = Self::current(cell) else {
            return load();
        };
        if let Some(v) = cell.with(|c| c.borrow().map.get(&key).copied()) {
            return Ok(v);
        }
        let v = load()?;
        Self::store(cell, generation, max, [(key, v)]);
        Ok(v)
    }

    /// The generation that values loaded from now on may be cached under,
    /// with the cache emptied if it moved; None when nothing may be cached
    /// (no shared memory; REPEATABLE READ or SERIALIZABLE).
    fn current(cell: &'static std::thread::LocalKey<RefCell<Self>>) -> Option<u64> {
        let generation = caching_generation()?;
        cell.with(|c| {
            let mut c = c.borrow_mut();
            if c.generation != generation {
                c.generation = generation;
                c.map.clear();
            }
        });
        Some(generation)
    }

    /// Cache values loaded (with a fresh snapshot) after `current` answered
    /// `generation`, unless it moved since; emptied first when full (at
    /// `max` entries).
    fn store(
        cell: &'static std::thread::LocalKey<RefCell<Self>>,
        generation: u64,
        max: usize,
        values: impl IntoIterator<Item = (K, V)>,
    ) {
        cell.with(|c| {
            let mut c = c.borrow_mut();
            if c.generation != generation {
                return;
            }
            for (k, v) in values {
                if c.map.len() >= max {
                    c.map.clear();
                }
                c.map.insert(k, v);
            }
        });
    }
}

type Key = ([u8; 16], Option<[u8; 16]>, Option<String>);

/// Entries `CACHE` holds at most (emptied when full): one per tenant,
/// project and key acquired for, and one per tenant claim_jobs met (about
/// 150 bytes each, in the backends that claim or acquire for that many).
const MAX_SLOT_LIMITS: usize = 200_000;

thread_local! {
    static CACHE: RefCell<GenerationCache<Key, SlotLimits>> = RefCell::new(GenerationCache::new());
}

fn load(
    tenant: pgrx::Uuid,
    project: Option<pgrx::Uuid>,
    concurrency_key: Option<&str>,
) -> Result<SlotLimits> {
    // update(), not select(): SPI takes a fresh snapshot for it (READ
    // COMMITTED), so what is loaded is at least as new as the generation.
    Spi::connect_mut(|c| {
        // Without a key, the two-argument call: 0.1.0's SQL has it too (four
        // columns), so acquires keep working between installing this
        // library and ALTER EXTENSION UPDATE.
        let rows = match concurrency_key {
            None => c.update(
                "SELECT * FROM meshhook_limits._slot_limits($1, $2)",
                Some(1),
                &[tenant.into(), project.into()],
            )?,
            Some(k) => c.update(
                "SELECT * FROM meshhook_limits._slot_limits($1, $2, $3)",
                Some(1),
                &[tenant.into(), project.into(), k.into()],
            )?,
        };
        let mut out = SlotLimits::default();
        if let Some(row) = rows.into_iter().next() {
            out.tenant_cap = row.get::<i64>(1)?;
            out.project_cap = row.get::<i64>(2)?;
            out.exec_micros = row.get::<i64>(3)?;
            out.memory_bytes = row.get::<i64>(4)?;
            if row.columns() >= 7 {
                out.key_cap = row.get::<i64>(5)?;
                out.total_cap = row.get::<i64>(6)?;
                out.weight = row.get::<f64>(7)?;
            }
        }
        Ok(out)
    })
}

fn key(tenant: pgrx::Uuid, project: Option<pgrx::Uuid>, concurrency_key: Option<&str>) -> Key {
    (
        *tenant.as_bytes(),
        project.map(|p| *p.as_bytes()),
        concurrency_key.map(str::to_owned),
    )
}

/// The slot limits if this backend has them cached (never runs SQL).
pub fn cached_slot_limits(
    tenant: pgrx::Uuid,
    project: Option<pgrx::Uuid>,
    concurrency_key: Option<&str>,
) -> Option<SlotLimits> {
    GenerationCache::get(&CACHE, &key(tenant, project, concurrency_key))
}

pub fn slot_limits(
    tenant: pgrx::Uuid,
    project: Option<pgrx::Uuid>,
    concurrency_key: Option<&str>,
) -> Result<SlotLimits> {
    GenerationCache::get_or_load(
        &CACHE,
        MAX_SLOT_LIMITS,
        key(tenant, project, concurrency_key),
        || load(tenant, project, concurrency_key),
    )
}

/// Called by the triggers on limits, plans and plan assignments.
#[pg_extern(volatile, parallel_unsafe)]
fn _limits_changed() {
    if let Some(g) = generation() {
        g.fetch_add(1, Ordering::AcqRel);
    }
    BUMP_AT_END.with(|b| b.set(true));
}

pgrx::extension_sql!(
    "REVOKE EXECUTE ON FUNCTION meshhook_limits._limits_changed() FROM PUBLIC;",
    name = "limits_changed_grants",
    requires = [_limits_changed]
);

/// What claim_jobs needs of each tenant it finds waiting: its
/// concurrent_executions and its fair_share_weight (no project, no key).
#[derive(Clone, Copy, Debug, Default)]
pub struct TenantShareLimits {
    pub tenant_cap: Option<i64>,
    pub weight: Option<f64>,
}

/// Tenants `TENANT_SHARES` holds at most: claim_jobs meets every tenant with
/// waiting jobs on every scan, and a cache smaller than their number would
/// be emptied and reloaded on every scan. About 50 bytes each, in the
/// claiming backends only.
pub const MAX_TENANT_SHARES: usize = 200_000;

thread_local! {
    static TENANT_SHARES: RefCell<GenerationCache<[u8; 16], TenantShareLimits>> =
        RefCell::new(GenerationCache::new());
}

/// The cached share limits of these tenants, if this backend has them all
/// (never runs SQL).
pub fn cached_tenant_shares(tenants: &[pgrx::Uuid]) -> Option<Vec<TenantShareLimits>> {
    tenants
        .iter()
        .map(|t| GenerationCache::get(&TENANT_SHARES, t.as_bytes()))
        .collect()
}

/// The generation limits loaded now are cached under; None when nothing
/// loaded is cached (no shared memory; REPEATABLE READ or SERIALIZABLE).
pub fn caching_generation() -> Option<u64> {
    let shared = generation()?;
    if unsafe { pg_sys::XactIsoLevel } >= pg_sys::XACT_REPEATABLE_READ as i32 {
        return None;
    }
    Some(shared.load(Ordering::Acquire))
}

/// The cached share limits of one tenant, if this backend has them.
pub fn cached_tenant_share(tenant: &pgrx::Uuid) -> Option<TenantShareLimits> {
    GenerationCache::get(&TENANT_SHARES, tenant.as_bytes())
}

/// The share limits of these tenants, in their order: those this backend
/// lacks loaded in one query (`_slot_limits_of`), however many.
pub fn tenant_shares(tenants: &[pgrx::Uuid]) -> Result<Vec<TenantShareLimits>> {
    let generation = GenerationCache::current(&TENANT_SHARES);
    let mut out: Vec<Option<TenantShareLimits>> = tenants
        .iter()
        .map(|t| {
            generation
                .and_then(|_| TENANT_SHARES.with(|c| c.borrow().map.get(t.as_bytes()).copied()))
        })
        .collect();
    let missing: Vec<pgrx::Uuid> = tenants
        .iter()
        .zip(&out)
        .filter(|(_, l)| l.is_none())
        .map(|(t, _)| *t)
        .collect();
    if missing.is_empty() {
        return Ok(out.into_iter().flatten().collect());
    }
    // update(), not select(): a fresh snapshot (see `load`). The rows are
    // `_slot_limits(tenant, NULL)`'s, so the slot limits of a job without a
    // project or key are cached too (take_slot needs no query of its own).
    let slot_generation = GenerationCache::current(&CACHE);
    let rows: Vec<([u8; 16], SlotLimits)> = Spi::connect_mut(|c| {
        c.update(
            "SELECT tenant_id, tenant_cap, project_cap, exec_micros, memory_bytes, key_cap, total_cap, weight
               FROM meshhook_limits._slot_limits_of($1)",
            None,
            &[missing.into()],
        )?
        .map(|r| {
            Ok::<_, pgrx::spi::SpiError>((
                r.get::<pgrx::Uuid>(1)?
                    .map(|t| *t.as_bytes())
                    .unwrap_or([0; 16]),
                SlotLimits {
                    tenant_cap: r.get::<i64>(2)?,
                    project_cap: r.get::<i64>(3)?,
                    exec_micros: r.get::<i64>(4)?,
                    memory_bytes: r.get::<i64>(5)?,
                    key_cap: r.get::<i64>(6)?,
                    total_cap: r.get::<i64>(7)?,
                    weight: r.get::<f64>(8)?,
                },
            ))
        })
        .collect::<std::result::Result<Vec<_>, _>>()
    })?;
    if let Some(generation) = slot_generation {
        let slot_rows = rows.iter().map(|(t, l)| ((*t, None, None), *l));
        GenerationCache::store(&CACHE, generation, MAX_SLOT_LIMITS, slot_rows);
    }
    let loaded: HashMap<[u8; 16], TenantShareLimits> = rows
        .into_iter()
        .map(|(t, l)| {
            let share = TenantShareLimits {
                tenant_cap: l.tenant_cap,
                weight: l.weight,
            };
            (t, share)
        })
        .collect();
    for (slot, t) in out.iter_mut().zip(tenants) {
        if slot.is_none() {
            *slot = Some(loaded.get(t.as_bytes()).copied().unwrap_or_default());
        }
    }
    if let Some(generation) = generation {
        GenerationCache::store(&TENANT_SHARES, generation, MAX_TENANT_SHARES, loaded);
    }
    Ok(out.into_iter().flatten().collect())
}
