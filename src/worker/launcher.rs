//! The launcher: one background worker per database where the extension is
//! installed, found without configuration.
//!
//! Started with the server (and again 5 s after it exits), connected to no
//! database, it lists the databases that accept connections every second
//! (templates are left alone: a session in one would make CREATE DATABASE
//! fail) and keeps a worker (`super::meshhook_limits_worker_main`) in each.
//! A worker that finds no extension leaves at once, and is tried again 5 s
//! later, so a new `CREATE EXTENSION` is served within seconds; sooner,
//! since the extension's install script wakes the launcher when it commits
//! (`_serve_database`). The launcher also drops what shared memory holds of
//! databases that no longer exist (`slots::table::Table::forget_databases`).
//! Each worker is a dynamic background worker: it takes one of
//! `max_worker_processes`.
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

/// How long a database's worker that exited (or found no extension) waits
/// before it is started again.
const RESTART_AFTER: Duration = Duration::from_secs(5);

/// In shared memory: the launcher's latch, and a database to serve at once.
#[repr(C)]
struct Shared {
    latch: AtomicPtr<pg_sys::Latch>,
    wake: AtomicU32,
}

static SHARED: AtomicPtr<Shared> = AtomicPtr::new(std::ptr::null_mut());

pub static SEGMENT: crate::shmem::Segment = crate::shmem::Segment { request, startup };

unsafe fn request() {
    unsafe { pg_sys::RequestAddinShmemSpace(std::mem::size_of::<Shared>()) };
}

unsafe fn startup() {
    let (shared, _) = unsafe { crate::shmem::init_struct::<Shared>(c"meshhook_limits launcher") };
    SHARED.store(shared, Ordering::Release);
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
        if oids != known {
            if !all.is_empty() {
                crate::slots::table::forget_databases(&oids);
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
        let woken = shared().map_or(0, |s| s.wake.swap(0, Ordering::AcqRel));
        served.retain(|oid, _| all.iter().any(|d| d.oid == *oid && d.servable));
        for db in all
            .iter()
            .filter(|d| d.servable && (only.is_empty() || d.name == only))
        {
            let entry = served.entry(db.oid).or_insert(Served {
                worker: None,
                next_start: now,
                warned: false,
            });
            if entry.worker.as_ref().is_some_and(running) {
                continue;
            }
            if entry.worker.take().is_some() {
                entry.next_start = now + RESTART_AFTER;
            }
            if !role_ok || (now < entry.next_start && woken != db.oid) {
                continue;
            }
            entry.next_start = now + RESTART_AFTER;
            entry.worker = start(db);
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
