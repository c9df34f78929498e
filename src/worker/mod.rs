//! The background workers. A launcher (`launcher`), started with the
//! server, keeps one worker in every database where the extension is
//! installed (found without configuration; `meshhook_limits.database` only
//! narrows it to one). Each such worker, every `meshhook_limits.sample_interval`,
//! runs `meshhook_limits.tick()` in one short transaction. It reloads the
//! configuration on SIGHUP, exits on SIGTERM, and survives any error of a
//! tick (the transaction is aborted, the error counted and logged, the next
//! tick goes on). The launcher starts a worker that exited again after 5 s;
//! `utility` stops a database's worker before DROP DATABASE and the other
//! commands that need the database to themselves.
use crate::gucs;
use pgrx::bgworkers::{BackgroundWorker, SignalWakeFlags};
use pgrx::pg_sys::panic::CaughtError;
use pgrx::prelude::*;
use std::time::{Duration, Instant};

pub mod launcher;
pub mod utility;

/// What a database's worker shows as in pg_stat_activity.backend_type.
pub const WORKER_TYPE: &str = "meshhook_limits worker";

/// From `_PG_init` while preloading: the launcher, and the hook that stops
/// a database's worker when the database must be free of sessions.
pub fn register() {
    utility::install();
    if unsafe { pg_sys::IsBinaryUpgrade } || !gucs::worker_enabled() {
        return;
    }
    launcher::register();
}

fn caught_message(e: &CaughtError) -> String {
    match e {
        CaughtError::PostgresError(r) | CaughtError::ErrorReport(r) => r.message().to_string(),
        CaughtError::RustPanic { ereport, .. } => ereport.message().to_string(),
    }
}

/// Run `body` in its own transaction; on error abort it and return the message.
pub fn in_transaction<R>(body: impl FnOnce() -> R + std::panic::UnwindSafe) -> Result<R, String> {
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

/// One tick; false when the extension is not (or no longer) installed.
fn tick_once() -> bool {
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
        Ok(present) => present,
        Err(msg) => {
            pgrx::warning!("meshhook_limits worker: tick failed: {msg}");
            let _ = in_transaction(move || {
                let _ = Spi::run_with_args(
                    "SELECT meshhook_limits._record_tick_error($1)",
                    &[msg.as_str().into()],
                );
            });
            true
        }
    }
}

/// A database's worker (started by the launcher; the database's name is
/// the worker's extra). Exits with code 0 when the extension is not
/// installed there or another worker serves the database, with code 1 on
/// SIGTERM; either way the launcher decides whether to start it again.
#[pg_guard]
#[no_mangle]
pub extern "C-unwind" fn meshhook_limits_worker_main(_arg: pg_sys::Datum) {
    BackgroundWorker::attach_signal_handlers(SignalWakeFlags::SIGHUP | SignalWakeFlags::SIGTERM);
    crate::pooler::IN_WORKER.store(true, std::sync::atomic::Ordering::Relaxed);
    let db = BackgroundWorker::get_extra().to_string();
    let role = gucs::worker_role();
    BackgroundWorker::connect_worker_to_spi(Some(&db), role.as_deref());
    let present = in_transaction(|| {
        Spi::get_one::<bool>(EXTENSION_PRESENT_SQL)
            .ok()
            .flatten()
            .unwrap_or(false)
    })
    .unwrap_or(false);
    // One worker per database: a second one (started by a launcher that
    // restarted and forgot the first) leaves at once.
    if !present || !launcher::register_worker() {
        unsafe { pg_sys::proc_exit(0) };
    }
    pgrx::log!("meshhook_limits worker started in database \"{db}\"");
    loop {
        let started = Instant::now();
        if !tick_once() {
            pgrx::log!(
                "meshhook_limits worker: the extension is gone from database \"{db}\"; exiting"
            );
            launcher::unregister_worker();
            unsafe { pg_sys::proc_exit(0) };
        }
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
    // Exit code 1: the launcher starts it again after 5 s, so a
    // pg_terminate_backend() does not stop monitoring for good. At shutdown
    // nothing is started again. To stop it, set meshhook_limits.worker = off
    // and restart the server.
    pgrx::log!("meshhook_limits worker exiting; the launcher starts it again unless the server is shutting down");
    launcher::unregister_worker();
    unsafe { pg_sys::proc_exit(1) };
}
