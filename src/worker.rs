//! The background worker: every `meshhook_limits.sample_interval` it runs
//! `meshhook_limits.tick()` in the database named by `meshhook_limits.database`,
//! in one short transaction. It waits for the extension to be created,
//! reloads the configuration on SIGHUP, exits on SIGTERM, and survives any
//! error of a tick (the transaction is aborted, the error counted and logged,
//! the next tick goes on). The postmaster restarts it 5 s after it exits for
//! any reason but server shutdown.
use crate::gucs;
use pgrx::bgworkers::{BackgroundWorker, BackgroundWorkerBuilder, SignalWakeFlags};
use pgrx::pg_sys::panic::CaughtError;
use pgrx::prelude::*;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

pub fn register() {
    if unsafe { pg_sys::IsBinaryUpgrade } || !gucs::worker_enabled() {
        return;
    }
    BackgroundWorkerBuilder::new("meshhook_limits worker")
        .set_type("meshhook_limits worker")
        .set_library("meshhook_limits")
        .set_function("meshhook_limits_worker_main")
        .enable_spi_access()
        .set_start_time(pgrx::bgworkers::BgWorkerStartTime::RecoveryFinished)
        .set_restart_time(Some(Duration::from_secs(5)))
        .load();
}

fn caught_message(e: &CaughtError) -> String {
    match e {
        CaughtError::PostgresError(r) | CaughtError::ErrorReport(r) => r.message().to_string(),
        CaughtError::RustPanic { ereport, .. } => ereport.message().to_string(),
    }
}

/// Run `body` in its own transaction; on error abort it and return the message.
fn in_transaction<R>(body: impl FnOnce() -> R + std::panic::UnwindSafe) -> Result<R, String> {
    unsafe {
        pg_sys::SetCurrentStatementStartTimestamp();
        pg_sys::StartTransactionCommand();
        pg_sys::PushActiveSnapshot(pg_sys::GetTransactionSnapshot());
    }
    let out = PgTryBuilder::new(move || Ok(body()))
        .catch_others(|e| Err(caught_message(&e)))
        .execute();
    unsafe {
        match out {
            Ok(_) => {
                pg_sys::PopActiveSnapshot();
                pg_sys::CommitTransactionCommand();
            }
            Err(_) => pg_sys::AbortCurrentTransaction(),
        }
    }
    out
}

const EXTENSION_PRESENT_SQL: &str =
    "SELECT EXISTS (SELECT 1 FROM pg_catalog.pg_extension WHERE extname = 'meshhook_limits')";

fn tick_once(warned_missing: &mut bool) {
    let result = in_transaction(|| -> bool {
        let present = Spi::get_one::<bool>(EXTENSION_PRESENT_SQL)
            .ok()
            .flatten()
            .unwrap_or(false);
        if present {
            if let Err(e) = Spi::run("SELECT meshhook_limits.tick()") {
                pgrx::error!("tick failed: {e}");
            }
        }
        present
    });
    match result {
        Ok(true) => *warned_missing = false,
        Ok(false) => {
            if !*warned_missing {
                pgrx::log!("meshhook_limits worker: waiting for CREATE EXTENSION meshhook_limits");
                *warned_missing = true;
            }
        }
        Err(msg) => {
            pgrx::warning!("meshhook_limits worker: tick failed: {msg}");
            let _ = in_transaction(move || {
                let _ = Spi::run_with_args(
                    "SELECT meshhook_limits._record_tick_error($1)",
                    &[msg.as_str().into()],
                );
            });
        }
    }
}

/// Whether a row named `name` is in shared catalog `catalog` (pg_database or
/// pg_authid), whose rows start with an oid and a name: a heap scan, which is
/// all a process connected to no database can do (as the autovacuum
/// launcher lists databases).
fn shared_catalog_has(catalog: pg_sys::Oid, name: &str) -> bool {
    let name = name.as_bytes().to_vec();
    in_transaction(move || unsafe {
        let rel = pg_sys::table_open(catalog, pg_sys::AccessShareLock as i32);
        let scan = pg_sys::table_beginscan_catalog(rel, 0, std::ptr::null_mut());
        let mut found = false;
        loop {
            let tuple = pg_sys::heap_getnext(scan, pg_sys::ScanDirection::ForwardScanDirection);
            if tuple.is_null() {
                break;
            }
            let header = (*tuple).t_data;
            // Both catalogs begin (oid oid, name name).
            let row = header
                .cast::<u8>()
                .add(usize::from((*header).t_hoff))
                .cast::<pg_sys::FormData_pg_database>();
            if std::ffi::CStr::from_ptr((*row).datname.data.as_ptr()).to_bytes() == name.as_slice()
            {
                found = true;
                break;
            }
        }
        pg_sys::table_endscan(scan);
        pg_sys::table_close(rel, pg_sys::AccessShareLock as i32);
        found
    })
    .unwrap_or(false)
}

/// The database exists, and so does the role (when one is set).
fn can_connect(db: &str, role: Option<&str>) -> bool {
    shared_catalog_has(pg_sys::DatabaseRelationId, db)
        && role.is_none_or(|r| shared_catalog_has(pg_sys::AuthIdRelationId, r))
}

/// Wait quietly (one log line) until `db` (and `role`) exist or the server
/// stops, connected to no database (only the shared catalogs).
fn wait_for_database(db: &str, role: Option<&str>) {
    BackgroundWorker::connect_worker_to_spi(None, None);
    if can_connect(db, role) {
        return;
    }
    let what = match role {
        Some(r) => format!(
            "database \"{db}\" (meshhook_limits.database) or role \"{r}\" (meshhook_limits.worker_role)"
        ),
        None => format!("database \"{db}\" (meshhook_limits.database)"),
    };
    pgrx::log!("meshhook_limits worker: {what} does not exist; waiting for it");
    loop {
        if !BackgroundWorker::wait_latch(Some(Duration::from_secs(1))) {
            unsafe { pg_sys::proc_exit(0) };
        }
        if BackgroundWorker::sighup_received() {
            unsafe { pg_sys::ProcessConfigFile(pg_sys::GucContext::PGC_SIGHUP) };
        }
        if can_connect(db, role) {
            pgrx::log!("meshhook_limits worker: database \"{db}\" exists now; starting again to connect to it");
            return;
        }
    }
}

#[pg_guard]
#[no_mangle]
pub extern "C-unwind" fn meshhook_limits_worker_main(_arg: pg_sys::Datum) {
    BackgroundWorker::attach_signal_handlers(SignalWakeFlags::SIGHUP | SignalWakeFlags::SIGTERM);
    let db = gucs::worker_database();
    // A process connects to one database for life, and connecting to one that
    // does not exist ends it with FATAL (the postmaster would then start it
    // again every 5 s). So a start after a failed connection first waits,
    // connected to no database, until the database exists.
    let role = gucs::worker_role();
    let connecting = crate::slots::table::header().map(|h| &h.worker_connecting);
    if connecting.is_some_and(|c| c.load(Ordering::Relaxed)) {
        wait_for_database(&db, role.as_deref());
        if let Some(c) = connecting {
            c.store(false, Ordering::Relaxed);
        }
        // Exit code 1: the postmaster starts the worker again in 5 s.
        unsafe { pg_sys::proc_exit(1) };
    }
    if let Some(c) = connecting {
        c.store(true, Ordering::Relaxed);
    }
    BackgroundWorker::connect_worker_to_spi(Some(&db), role.as_deref());
    if let Some(c) = connecting {
        c.store(false, Ordering::Relaxed);
    }
    pgrx::log!("meshhook_limits worker started in database \"{db}\"");
    let mut warned_missing = false;
    loop {
        let started = Instant::now();
        tick_once(&mut warned_missing);
        let interval = gucs::sample_interval();
        let wait = interval
            .saturating_sub(started.elapsed())
            .max(Duration::from_millis(10));
        if !BackgroundWorker::wait_latch(Some(wait)) {
            break;
        }
        if BackgroundWorker::sighup_received() {
            unsafe { pg_sys::ProcessConfigFile(pg_sys::GucContext::PGC_SIGHUP) };
        }
    }
    // Exit code 1: the postmaster starts the worker again after 5 s, so a
    // pg_terminate_backend() or DROP DATABASE ... FORCE does not stop
    // monitoring for good. At shutdown nothing is restarted. To stop it, set
    // meshhook_limits.worker = off and restart the server.
    pgrx::log!("meshhook_limits worker exiting; the postmaster restarts it unless the server is shutting down");
    unsafe { pg_sys::proc_exit(1) };
}
