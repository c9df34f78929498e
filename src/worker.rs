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
use std::time::{Duration, Instant};

pub fn register() {
    if unsafe { pg_sys::IsBinaryUpgrade } || !gucs::WORKER_ENABLED.get() {
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

const TICK_SQL: &str =
    "SELECT EXISTS (SELECT 1 FROM pg_catalog.pg_extension WHERE extname = 'meshhook_limits')";

fn tick_once(warned_missing: &mut bool) {
    let result = in_transaction(|| -> bool {
        let present = Spi::get_one::<bool>(TICK_SQL)
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
                    "UPDATE meshhook_limits.worker_state SET errors = errors + 1, last_error = $1",
                    &[msg.as_str().into()],
                );
            });
        }
    }
}

#[pg_guard]
#[no_mangle]
pub extern "C-unwind" fn meshhook_limits_worker_main(_arg: pg_sys::Datum) {
    BackgroundWorker::attach_signal_handlers(SignalWakeFlags::SIGHUP | SignalWakeFlags::SIGTERM);
    let db = gucs::DATABASE
        .get()
        .map(|c| c.to_string_lossy().into_owned())
        .unwrap_or_else(|| "postgres".into());
    BackgroundWorker::connect_worker_to_spi(Some(&db), None);
    pgrx::log!("meshhook_limits worker started in database \"{db}\"");
    let mut warned_missing = false;
    loop {
        let started = Instant::now();
        tick_once(&mut warned_missing);
        let interval =
            Duration::from_millis(u64::try_from(gucs::SAMPLE_INTERVAL.get()).unwrap_or(1000));
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
