//! The parts of PgBouncer sampling (sql/pooler.sql) that SQL cannot do:
//! who may open an admin-console connection with the extension owner's
//! rights, and a deadline on a pooler that stops answering.
//!
//! **Who.** `dblink`'s named connections outlive the call that opened them,
//! in the backend, for any code that runs there later; `dblink` is usually
//! executable by PUBLIC. So the tick opens one only where no less trusted
//! code can run while it is open: in this extension's own worker, or in a
//! superuser's session, and never inside code a table's owner planted (a
//! security-restricted operation). Elsewhere (an admin's `tick()`) the
//! poolers are not sampled.
//!
//! **Deadline.** On PostgreSQL 16 and later `dblink_connect` waits on its
//! socket until an interrupt, whatever `connect_timeout` says:
//! `_pooler_connect` sets the statement timeout to the pooler's deadline
//! for the while (as owner.rs does for reads of queue tables). The commands
//! after it are sent and polled from SQL, never waited on blindly.
use crate::owner::{
    disable_timeout, enable_timeout_at, get_timeout_active, get_timeout_finish_time,
    STATEMENT_TIMEOUT,
};
use pgrx::prelude::*;
use std::sync::atomic::{AtomicBool, Ordering};

/// Set in the extension's background worker (`worker::meshhook_limits_worker_main`).
pub static IN_WORKER: AtomicBool = AtomicBool::new(false);

fn caller_is_superuser() -> bool {
    unsafe {
        !pg_sys::InSecurityRestrictedOperation() && pg_sys::superuser_arg(pg_sys::GetOuterUserId())
    }
}

/// Whether this backend may open a pooler's admin-console connection.
#[pg_extern(stable, parallel_unsafe)]
fn _pooler_may_connect() -> bool {
    let planted = unsafe { pg_sys::InSecurityRestrictedOperation() };
    !planted && (IN_WORKER.load(Ordering::Relaxed) || caller_is_superuser())
}

/// The caller (not a definer it runs under, nor code a table's owner
/// planted) is a superuser: who may name a pooler.
#[pg_extern(stable, parallel_unsafe)]
fn _caller_is_superuser() -> bool {
    caller_is_superuser()
}

/// `dblink_connect(conn, conninfo)` of the dblink in schema `dblink`,
/// given at most `ms` milliseconds: past them the statement timeout (set to
/// that deadline for the while, unless the statement's own comes sooner)
/// interrupts the wait, and the call fails with 08006. On PostgreSQL 15,
/// whose dblink cannot be interrupted while it connects, connect_timeout in
/// the conninfo bounds it; a cancel of our own left pending is dropped.
#[pg_extern(volatile, parallel_unsafe)]
fn _pooler_connect(dblink: &str, conn: &str, conninfo: &str, ms: i32) {
    let outer = unsafe { get_timeout_active(STATEMENT_TIMEOUT) }
        .then(|| unsafe { get_timeout_finish_time(STATEMENT_TIMEOUT) });
    let deadline =
        unsafe { pg_sys::GetCurrentTimestamp() }.saturating_add(i64::from(ms.max(1)) * 1000);
    let ours = outer.is_none_or(|o| deadline < o);
    if ours {
        unsafe { enable_timeout_at(STATEMENT_TIMEOUT, deadline) };
    }
    let passed = move || ours && unsafe { pg_sys::GetCurrentTimestamp() } >= deadline;
    let sql = format!(
        "SELECT {}.dblink_connect($1::text, $2::text)",
        pgrx::spi::quote_identifier(dblink)
    );
    let timed_out = pgrx::PgTryBuilder::new(std::panic::AssertUnwindSafe(|| {
        Spi::run_with_args(&sql, &[conn.into(), conninfo.into()]).map(|_| false)
    }))
    .catch_when(pgrx::PgSqlErrorCode::ERRCODE_QUERY_CANCELED, move |e| {
        if passed() {
            Ok(true)
        } else {
            e.rethrow()
        }
    })
    .finally(move || unsafe {
        match outer {
            Some(at) => enable_timeout_at(STATEMENT_TIMEOUT, at),
            None => disable_timeout(STATEMENT_TIMEOUT, false),
        }
        if passed() {
            pg_sys::QueryCancelPending = 0;
        }
    })
    .execute();
    match timed_out {
        Ok(false) => {}
        Ok(true) => {
            pgrx::ereport!(
                ERROR,
                pgrx::PgSqlErrorCode::ERRCODE_CONNECTION_FAILURE,
                format!(
                    "no answer within meshhook_limits.pooler_timeout ({ms} ms) while connecting"
                )
            );
        }
        Err(e) => {
            pgrx::ereport!(
                ERROR,
                pgrx::PgSqlErrorCode::ERRCODE_INTERNAL_ERROR,
                format!("connecting to the pooler failed: {e}")
            );
        }
    }
}

pgrx::extension_sql!(
    "REVOKE EXECUTE ON FUNCTION meshhook_limits._pooler_connect(text, text, text, integer) FROM PUBLIC;",
    name = "pooler_connect_grants",
    requires = [_pooler_connect]
);
