//! The launcher: one background worker per database where the extension is
//! installed, found without configuration.
//!
//! Started with the server (and again 5 s after it exits), connected to no
//! database, it lists the databases that accept connections every second
//! (templates are left alone: a session in one would make CREATE DATABASE
//! fail) and keeps a worker (`super::meshhook_limits_worker_main`) in each.
//! A worker that finds no extension leaves at once, and is tried again a
//! minute later; the extension's install script wakes the launcher when it
//! commits (`_serve_database`), so a new `CREATE EXTENSION` is served at
//! once. A worker that served and exited is started again after 5 s.
//! Each worker registers itself in shared memory (`register_worker`): one per
//! database, and the pid `utility` stops before DROP DATABASE. The launcher
//! also drops what shared memory holds of a database it saw and no longer
//! sees (`slots::entries::forget_databases`). Each worker is a dynamic
//! background worker: it takes one of `max_worker_processes`.
use super::{in_transaction, WORKER_TYPE};
use crate::gucs;
use pgrx::bgworkers::{
    BackgroundWorker, BackgroundWorkerBuilder, BackgroundWorkerStatus, BgWorkerStartTime,
    DynamicBackgroundWorker, SignalWakeFlags,
};
use pgrx::prelude::*;
use std::collections::HashMap;
use std::sync::atomic::{AtomicPtr, AtomicU32, Ordering};
use std::time::{Duration, Instant};

/// How long a database's worker that exited waits before it is started again.
const RESTART_AFTER: Duration = Duration::from_secs(5);
/// How often a database where no worker stayed (no extension there) is
/// tried again; CREATE EXTENSION wakes the launcher sooner (`_serve_database`).
const PROBE_EVERY: Duration = Duration::from_secs(60);

/// Databases served at once, at most.
const MAX_SERVED: usize = 256;

/// A database's worker, as it registered itself (`register_worker`).
#[derive(Clone, Copy)]
#[repr(C)]
struct Serving {
    database: u32,
    pid: i32,
}

/// In shared memory: the launcher's latch, a database to serve at once, and
/// the worker serving each database (under `LOCK`).
#[repr(C)]
struct Shared {
    latch: AtomicPtr<pg_sys::Latch>,
    wake: AtomicU32,
    serving: [Serving; MAX_SERVED],
}

static SHARED: AtomicPtr<Shared> = AtomicPtr::new(std::ptr::null_mut());
static LOCK: AtomicPtr<pg_sys::LWLock> = AtomicPtr::new(std::ptr::null_mut());
const TRANCHE: &std::ffi::CStr = c"meshhook_limits launcher";

pub static SEGMENT: crate::shmem::Segment = crate::shmem::Segment { request, startup };

unsafe fn request() {
    unsafe {
        pg_sys::RequestAddinShmemSpace(std::mem::size_of::<Shared>());
        pg_sys::RequestNamedLWLockTranche(TRANCHE.as_ptr(), 1);
    }
}

unsafe fn startup() {
    unsafe {
        let (shared, _) = crate::shmem::init_struct::<Shared>(c"meshhook_limits launcher");
        SHARED.store(shared, Ordering::Release);
        LOCK.store(
            &raw mut (*pg_sys::GetNamedLWLockTranche(TRANCHE.as_ptr())).lock,
            Ordering::Release,
        );
    }
}

/// The registry of serving workers, under its lock.
fn with_serving<R>(f: impl FnOnce(&mut [Serving; MAX_SERVED]) -> R) -> Option<R> {
    let (shared, lock) = (SHARED.load(Ordering::Acquire), LOCK.load(Ordering::Acquire));
    if !crate::shmem::preloaded() || shared.is_null() || lock.is_null() {
        return None;
    }
    // SAFETY: both set by the startup hook; the lock guards `serving`.
    let _guard =
        unsafe { crate::shmem::LwLockGuard::acquire(lock, pg_sys::LWLockMode::LW_EXCLUSIVE) };
    Some(f(unsafe { &mut (*shared).serving }))
}

/// `pid` is a live backend connected to `database` (a pid of a worker that
/// is gone may have been given to another process).
fn serves(pid: i32, database: u32) -> bool {
    if pid == 0 {
        return false;
    }
    let proc_ = unsafe { pg_sys::BackendPidGetProc(pid) };
    !proc_.is_null() && unsafe { (*proc_).databaseId }.to_u32() == database
}

/// This process becomes the worker of its database; false when another live
/// worker serves it already (or the registry is full).
pub fn register_worker() -> bool {
    let (db, me) = (crate::shmem::my_database(), unsafe { pg_sys::MyProcPid });
    // Who is registered, first (liveness is checked outside our lock: it
    // takes the proc array's).
    let current = with_serving(|s| s.iter().find(|w| w.database == db).map(|w| w.pid)).flatten();
    if current.is_some_and(|pid| pid != me && serves(pid, db)) {
        return false;
    }
    with_serving(|s| {
        if let Some(w) = s.iter_mut().find(|w| w.database == db) {
            if w.pid != current.unwrap_or(w.pid) {
                return false; // another worker registered meanwhile
            }
            w.pid = me;
            return true;
        }
        match s.iter_mut().find(|w| w.database == 0) {
            Some(w) => {
                *w = Serving {
                    database: db,
                    pid: me,
                };
                true
            }
            None => false,
        }
    })
    .unwrap_or(false)
}

/// This process no longer serves its database.
pub fn unregister_worker() {
    let (db, me) = (crate::shmem::my_database(), unsafe { pg_sys::MyProcPid });
    with_serving(|s| {
        for w in s.iter_mut().filter(|w| w.database == db && w.pid == me) {
            *w = Serving {
                database: 0,
                pid: 0,
            };
        }
    });
}

/// The pid of the worker serving `database`, if it is alive.
pub fn worker_of(database: u32) -> Option<i32> {
    let pid =
        with_serving(|s| s.iter().find(|w| w.database == database).map(|w| w.pid)).flatten()?;
    serves(pid, database).then_some(pid)
}

/// Forget the registrations of the databases `gone` (sorted).
fn forget_databases(gone: &[u32]) {
    with_serving(|s| {
        for w in s
            .iter_mut()
            .filter(|w| w.database != 0 && gone.binary_search(&w.database).is_ok())
        {
            *w = Serving {
                database: 0,
                pid: 0,
            };
        }
    });
}

fn shared() -> Option<&'static Shared> {
    let p = SHARED.load(Ordering::Acquire);
    // SAFETY: set once by the startup hook; shared memory outlives the process.
    (crate::shmem::preloaded() && !p.is_null()).then(|| unsafe { &*p })
}

pub fn register() {
    BackgroundWorkerBuilder::new("meshhook_limits launcher")
        .set_type("meshhook_limits launcher")
        .set_library("meshhook_limits")
        .set_function("meshhook_limits_launcher_main")
        .enable_spi_access()
        .set_start_time(BgWorkerStartTime::RecoveryFinished)
        .set_restart_time(Some(RESTART_AFTER))
        .load();
}

/// A database as pg_database has it.
struct Database {
    oid: u32,
    name: String,
    /// Accepts connections and is not a template: a worker may serve it.
    servable: bool,
}

/// Every database, by a heap scan of pg_database: all a process connected
/// to no database can read (as the autovacuum launcher lists databases).
fn databases() -> Vec<Database> {
    in_transaction(|| unsafe {
        let rel = pg_sys::table_open(pg_sys::DatabaseRelationId, pg_sys::AccessShareLock as i32);
        let scan = pg_sys::table_beginscan_catalog(rel, 0, std::ptr::null_mut());
        let mut out = Vec::new();
        loop {
            let tuple = pg_sys::heap_getnext(scan, pg_sys::ScanDirection::ForwardScanDirection);
            if tuple.is_null() {
                break;
            }
            let header = (*tuple).t_data;
            let row = header
                .cast::<u8>()
                .add(usize::from((*header).t_hoff))
                .cast::<pg_sys::FormData_pg_database>();
            let name = std::ffi::CStr::from_ptr((*row).datname.data.as_ptr())
                .to_string_lossy()
                .into_owned();
            out.push(Database {
                oid: (*row).oid.to_u32(),
                name,
                // datconnlimit -2: a DROP DATABASE was interrupted.
                servable: (*row).datallowconn && !(*row).datistemplate && (*row).datconnlimit != -2,
            });
        }
        pg_sys::table_endscan(scan);
        pg_sys::table_close(rel, pg_sys::AccessShareLock as i32);
        out
    })
    .unwrap_or_default()
}

/// The role the workers connect as exists (or none is set).
fn role_exists(role: &str) -> bool {
    let role = role.to_string();
    in_transaction(move || {
        let c = std::ffi::CString::new(role).unwrap_or_default();
        unsafe { pg_sys::get_role_oid(c.as_ptr(), true) != pg_sys::InvalidOid }
    })
    .unwrap_or(false)
}

struct Served {
    worker: Option<DynamicBackgroundWorker>,
    next_start: Instant,
    warned: bool,
    /// Its worker registered as serving the database (the extension is there).
    served: bool,
    /// A CREATE EXTENSION committed since its last start.
    woken: bool,
}

fn running(w: &DynamicBackgroundWorker) -> bool {
    matches!(w.pid(), Ok(_) | Err(BackgroundWorkerStatus::NotYetStarted))
}

fn start(db: &Database) -> Option<DynamicBackgroundWorker> {
    BackgroundWorkerBuilder::new(&format!("{WORKER_TYPE} {}", db.oid))
        .set_type(WORKER_TYPE)
        .set_library("meshhook_limits")
        .set_function("meshhook_limits_worker_main")
        .enable_spi_access()
        .set_start_time(BgWorkerStartTime::RecoveryFinished)
        .set_restart_time(None)
        .set_extra(&db.name)
        .set_notify_pid(unsafe { pg_sys::MyProcPid })
        .load_dynamic()
        .ok()
}

#[pg_guard]
#[no_mangle]
pub extern "C-unwind" fn meshhook_limits_launcher_main(_arg: pg_sys::Datum) {
    BackgroundWorker::attach_signal_handlers(SignalWakeFlags::SIGHUP | SignalWakeFlags::SIGTERM);
    BackgroundWorker::connect_worker_to_spi(None, None);
    if let Some(s) = shared() {
        s.latch.store(
            unsafe { &raw mut (*pg_sys::MyProc).procLatch },
            Ordering::Release,
        );
    }
    pgrx::log!("meshhook_limits launcher started");
    let mut served: HashMap<u32, Served> = HashMap::new();
    let mut known: Vec<u32> = Vec::new();
    let mut warned_role = false;
    loop {
        let now = Instant::now();
        let all = databases();
        // What shared memory holds of a database that is gone goes with it.
        let mut oids: Vec<u32> = all.iter().map(|d| d.oid).collect();
        oids.sort_unstable();
        // Only databases this launcher saw and no longer sees: one created
        // after the scan is never taken for gone.
        if oids != known {
            let gone: Vec<u32> = known
                .iter()
                .copied()
                .filter(|d| oids.binary_search(d).is_err())
                .collect();
            if !gone.is_empty() && !all.is_empty() {
                crate::slots::entries::forget_databases(&gone);
                forget_databases(&gone);
            }
            known = oids;
        }
        let only = gucs::worker_database();
        let role_ok = match gucs::worker_role() {
            Some(r) if !role_exists(&r) => {
                if !warned_role {
                    pgrx::log!("meshhook_limits launcher: role \"{r}\" (meshhook_limits.worker_role) does not exist; waiting for it");
                    warned_role = true;
                }
                false
            }
            _ => {
                warned_role = false;
                true
            }
        };
        // A CREATE EXTENSION committed somewhere: every database without a
        // worker is tried now (one wake can stand for several databases),
        // or as soon as its probe in flight ends (it may have looked before
        // the commit).
        if shared().is_some_and(|s| s.wake.swap(0, Ordering::AcqRel) != 0) {
            for entry in served.values_mut() {
                entry.woken = true;
            }
        }
        served.retain(|oid, _| all.iter().any(|d| d.oid == *oid && d.servable));
        for db in all
            .iter()
            .filter(|d| d.servable && (only.is_empty() || d.name == only))
        {
            let entry = served.entry(db.oid).or_insert(Served {
                worker: None,
                next_start: now,
                warned: false,
                served: false,
                woken: false,
            });
            if entry.worker.as_ref().is_some_and(running) {
                entry.served |= worker_of(db.oid).is_some();
                continue;
            }
            if entry.worker.take().is_some() {
                // A worker that served (and was stopped, or crashed) comes
                // back after 5 s, wake or not; a probe that found no
                // extension, a minute later, or at once after a wake.
                if entry.served {
                    entry.next_start = now + RESTART_AFTER;
                    entry.woken = false;
                } else {
                    entry.next_start = now + PROBE_EVERY;
                }
                entry.served = false;
            }
            if entry.woken {
                entry.next_start = entry.next_start.min(now);
            }
            if !role_ok || now < entry.next_start {
                continue;
            }
            entry.woken = false;
            entry.next_start = now + PROBE_EVERY;
            entry.worker = start(db);
            if entry.worker.is_none() {
                // No background worker slot free now: again in 5 s.
                entry.next_start = now + RESTART_AFTER;
            }
            if entry.worker.is_none() && !entry.warned {
                pgrx::warning!(
                    "meshhook_limits launcher: no background worker slot for database \"{}\"; raise max_worker_processes",
                    db.name
                );
            }
            entry.warned = entry.worker.is_none();
        }
        if !BackgroundWorker::wait_latch(Some(Duration::from_secs(1))) {
            break;
        }
        if BackgroundWorker::sighup_received() {
            unsafe { pg_sys::ProcessConfigFile(pg_sys::GucContext::PGC_SIGHUP) };
        }
    }
    // Its workers go on; a launcher started again finds them serving (a
    // second worker in a database leaves at once).
    pgrx::log!("meshhook_limits launcher exiting");
    unsafe { pg_sys::proc_exit(1) };
}

/// Wake the launcher to serve this database now (when this transaction
/// commits): CREATE EXTENSION calls it.
#[pg_extern(volatile, parallel_unsafe)]
fn _serve_database() {
    let db = crate::shmem::my_database();
    pgrx::register_xact_callback(pgrx::PgXactCallbackEvent::Commit, move || {
        if let Some(s) = shared() {
            s.wake.store(db, Ordering::Release);
            let latch = s.latch.load(Ordering::Acquire);
            if !latch.is_null() {
                unsafe { pg_sys::SetLatch(latch) };
            }
        }
    });
}

pgrx::extension_sql!(
    r#"
REVOKE EXECUTE ON FUNCTION meshhook_limits._serve_database() FROM PUBLIC;
SELECT meshhook_limits._serve_database();
"#,
    name = "serve_database",
    requires = [_serve_database, "metrics_sql"]
);
