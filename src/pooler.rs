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

/// The outer user (whoever called the tick, which runs as its definer) is a
/// superuser, outside code a table's owner planted.
fn outer_is_superuser() -> bool {
    unsafe {
        !pg_sys::InSecurityRestrictedOperation() && pg_sys::superuser_arg(pg_sys::GetOuterUserId())
    }
}

/// Whether this backend may open a pooler's admin-console connection.
#[pg_extern(stable, parallel_unsafe)]
fn _pooler_may_connect() -> bool {
    let planted = unsafe { pg_sys::InSecurityRestrictedOperation() };
    !planted && (IN_WORKER.load(Ordering::Relaxed) || outer_is_superuser())
}

/// The current user is a superuser, outside code a table's owner planted:
/// who may name a pooler (add_pooler runs as its caller, so an admin's
/// definer function that a superuser calls is the admin here).
#[pg_extern(stable, parallel_unsafe)]
fn _caller_is_superuser() -> bool {
    unsafe { !pg_sys::InSecurityRestrictedOperation() && pg_sys::superuser() }
}

/// Close named dblink connection `conn` if it is open, with interrupts held
/// so that no cancel can leave it open halfway (a connection left in the
/// backend could be used by any code that runs there later).
#[pg_extern(volatile, parallel_unsafe)]
fn _pooler_disconnect(dblink: Option<&str>, conn: &str) {
    let Some(dblink) = dblink else { return };
    let schema = pgrx::spi::quote_identifier(dblink);
    unsafe { pg_sys::InterruptHoldoffCount += 1 };
    let open = Spi::get_one_with_args::<bool>(
        &format!("SELECT $1 = ANY (coalesce({schema}.dblink_get_connections(), '{{}}'))"),
        &[conn.into()],
    );
    if let Ok(Some(true)) = open {
        let _ = Spi::run_with_args(
            &format!("SELECT {schema}.dblink_disconnect($1::text)"),
            &[conn.into()],
        );
    }
    // (An error above resets the holdoff count to 0 itself.)
    unsafe { pg_sys::InterruptHoldoffCount -= 1 };
}

/// Close every pooler connection left open in this backend (the tick runs
/// this first, before anyone else's code can run in it).
#[pg_extern(volatile, parallel_unsafe)]
fn _pooler_close_all() {
    let Ok(Some(dblink)) = Spi::get_one::<String>("SELECT meshhook_limits._dblink_schema()::text")
    else {
        return;
    };
    let schema = pgrx::spi::quote_identifier(&dblink);
    let left = Spi::get_one::<Vec<Option<String>>>(&format!(
        "SELECT array_agg(c) FROM unnest({schema}.dblink_get_connections()) c \
          WHERE c LIKE 'meshhook\\_limits\\_pooler\\_%'"
    ));
    for conn in left
        .ok()
        .flatten()
        .unwrap_or_default()
        .into_iter()
        .flatten()
    {
        _pooler_disconnect(Some(&dblink), &conn);
    }
}

/// `dblink_connect(conn, conninfo)` of the dblink in schema `dblink`,
/// given at most `ms` milliseconds: past them the statement timeout (set to
/// that deadline for the while, unless the statement's own comes sooner)
/// interrupts the wait, and the call fails with 08006. On PostgreSQL 15,
/// whose dblink cannot be interrupted while it connects, connect_timeout in
/// the conninfo bounds it; a cancel of our own left pending is dropped.
/// Not bounded on any version: a name lookup (DNS), and the client encoding
/// query dblink sends after login when the pooler reports another encoding
/// (docs/operations.md, "Connection pooling").
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
        // Only what we replaced is put back, and only a cancel of our own
        // timer's (its indicator set) is dropped: a user's is not.
        if ours {
            let fired = get_timeout_indicator(STATEMENT_TIMEOUT, true);
            match outer {
                Some(at) => enable_timeout_at(STATEMENT_TIMEOUT, at),
                None => disable_timeout(STATEMENT_TIMEOUT, false),
            }
            if fired {
                pg_sys::QueryCancelPending = 0;
            }
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

extern "C-unwind" {
    fn get_timeout_indicator(id: std::ffi::c_int, reset_indicator: bool) -> bool;
}

pgrx::extension_sql!(
    "REVOKE EXECUTE ON FUNCTION meshhook_limits._pooler_connect(text, text, text, integer) FROM PUBLIC;
     REVOKE EXECUTE ON FUNCTION meshhook_limits._pooler_disconnect(text, text) FROM PUBLIC;
     REVOKE EXECUTE ON FUNCTION meshhook_limits._pooler_close_all() FROM PUBLIC;",
    name = "pooler_connect_grants",
    requires = [_pooler_connect, _pooler_disconnect, _pooler_close_all]
);
