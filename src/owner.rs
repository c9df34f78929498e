//! Reading other roles' tables without running their code as ours.
//!
//! The worker runs as the bootstrap superuser and `tick()`, `track_storage`
//! and the storage recount are `SECURITY DEFINER`. The tables they read (the
//! pg-boss and pgmq queue tables, tracked tables) belong to other roles, who
//! can make a read run their code: a `_RETURN` rule turns a table into a
//! view, an `IMMUTABLE` function in an index predicate or expression is
//! evaluated by the planner, a domain check runs on a cast. So every such
//! read runs as the table's owner, in a security-restricted operation, the
//! way PostgreSQL's own VACUUM, ANALYZE and REFRESH MATERIALIZED VIEW run
//! index functions: whatever code the owner planted runs with the owner's
//! rights, which the owner had anyway.
use crate::error::{LimitsError, OrRaise, Result};
use crate::row::RawJsonb;
use pgrx::datum::{Interval, TimestampWithTimeZone};
use pgrx::prelude::*;

/// The owner of `rel` when it is a table (plain or partitioned), and
/// whether it is a queue table (in schema pgboss or pgmq); an error for
/// anything else (a view, a foreign table, a missing relation).
fn table_owner(rel: pg_sys::Oid) -> Result<(pg_sys::Oid, bool, String)> {
    let row = Spi::connect(|c| {
        let rows = c.select(
            "SELECT c.relkind::text, c.relowner, n.nspname IN ('pgboss', 'pgmq'), c.oid::pg_catalog.regclass::text
               FROM pg_catalog.pg_class c JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
              WHERE c.oid = $1",
            Some(1),
            &[rel.into()],
        )?;
        match rows.into_iter().next() {
            Some(r) => Ok::<_, pgrx::spi::SpiError>(Some((
                r.get::<String>(1)?.unwrap_or_default(),
                (
                    r.get::<pg_sys::Oid>(2)?.unwrap_or(pg_sys::InvalidOid),
                    r.get::<bool>(3)?.unwrap_or(false),
                    r.get::<String>(4)?.unwrap_or_default(),
                ),
            ))),
            None => Ok(None),
        }
    })?;
    match row {
        Some((kind, owner)) if kind == "r" || kind == "p" => Ok(owner),
        Some(_) => Err(LimitsError::invalid(
            format!("relation {} is not a table", rel.to_u32()),
            "meshhook_limits reads plain and partitioned tables only",
        )),
        None => Err(LimitsError::invalid(
            format!("relation {} does not exist", rel.to_u32()),
            "",
        )),
    }
}

/// Run `f` as `owner`, in a security-restricted operation: code the owner
/// attached to what `f` reads or writes runs with the owner's rights and no
/// meshhook_limits identity (`identity::in_planted_code`), cannot change
/// the role, and the settings it changes are undone on the way out.
pub fn as_owner<R>(owner: pg_sys::Oid, f: impl FnOnce() -> R) -> R {
    let (mut saved_user, mut saved_context) = (pg_sys::InvalidOid, 0i32);
    unsafe {
        pg_sys::GetUserIdAndSecContext(&mut saved_user, &mut saved_context);
        pg_sys::SetUserIdAndSecContext(
            owner,
            saved_context
                | pg_sys::SECURITY_LOCAL_USERID_CHANGE as i32
                | pg_sys::SECURITY_RESTRICTED_OPERATION as i32,
        );
    }
    let nest = unsafe { pg_sys::NewGUCNestLevel() };
    pgrx::PgTryBuilder::new(std::panic::AssertUnwindSafe(f))
        .finally(|| unsafe {
            pg_sys::AtEOXact_GUC(false, nest);
            pg_sys::SetUserIdAndSecContext(saved_user, saved_context);
        })
        .execute()
}

// PostgreSQL's timeouts (utils/timeout.h), which pgrx does not bind (also
// used by pooler.rs). STATEMENT_TIMEOUT is the fourth TimeoutId in
// PostgreSQL 15 to 18.
pub(crate) const STATEMENT_TIMEOUT: std::ffi::c_int = 3;
extern "C-unwind" {
    pub(crate) fn enable_timeout_at(id: std::ffi::c_int, fin_time: pg_sys::TimestampTz);
    pub(crate) fn disable_timeout(id: std::ffi::c_int, keep_indicator: bool);
    pub(crate) fn get_timeout_active(id: std::ffi::c_int) -> bool;
    pub(crate) fn get_timeout_finish_time(id: std::ffi::c_int) -> pg_sys::TimestampTz;
}

/// Run `f` with the statement timeout due within `ms` milliseconds (or
/// sooner, if the statement's own is): the owner's code in a read (a
/// policy that sleeps) cannot hold the tick, and its snapshot, for longer.
/// Our deadline passing is an error of its own (54000), which the tick's
/// and explain_queues' handlers catch; any other cancel is raised as it is.
fn within<R>(ms: i32, what: &str, f: impl FnOnce() -> Result<R>) -> Result<R> {
    if ms <= 0 {
        return f();
    }
    let outer = unsafe { get_timeout_active(STATEMENT_TIMEOUT) }
        .then(|| unsafe { get_timeout_finish_time(STATEMENT_TIMEOUT) });
    let deadline = unsafe { pg_sys::GetCurrentTimestamp() }.saturating_add(i64::from(ms) * 1000);
    let ours = outer.is_none_or(|o| deadline < o);
    if ours {
        unsafe { enable_timeout_at(STATEMENT_TIMEOUT, deadline) };
    }
    let timed_out = move || {
        Err(LimitsError::TooSlow {
            msg: format!("reading {what} as its owner took longer than meshhook_limits.queue_read_timeout ({ms} ms)"),
            hint: "the table's owner attached slow code to it (a policy, an index function), or the read is larger than the setting allows".into(),
        })
    };
    pgrx::PgTryBuilder::new(std::panic::AssertUnwindSafe(f))
        .catch_when(pgrx::PgSqlErrorCode::ERRCODE_QUERY_CANCELED, move |e| {
            if ours && unsafe { pg_sys::GetCurrentTimestamp() } >= deadline {
                timed_out()
            } else {
                e.rethrow()
            }
        })
        .finally(move || unsafe {
            // Only a timer we replaced is put back: re-arming the
            // statement's own after it fired would cancel again at once.
            if ours {
                match outer {
                    Some(at) => enable_timeout_at(STATEMENT_TIMEOUT, at),
                    None => disable_timeout(STATEMENT_TIMEOUT, false),
                }
            }
        })
        .execute()
}

/// Why the tick does not read queue table `rel`, if it does not: a role
/// that owns it or one of its partitions or inheritance children (whose
/// code a read of it runs), owns its schema or may create in it (and so
/// add to what the tick's queries name: pg-boss 10's `pgboss.archive`) is
/// not an administrator (`identity::role_is_admin`).
///
/// The timeout (`within`) bounds only code that lets the cancel through:
/// code that catches query_canceled (a PL/pgSQL handler naming it, in a
/// loop) outlasts any timeout, and would hold the tick, and with it the
/// reaping, claim ending and alerts of the whole database. Only roles that
/// could stop those anyway (administrators: pause, set limits) are trusted
/// with that.
fn untrusted_owner(rel: pg_sys::Oid) -> Result<Option<String>> {
    let owners = Spi::connect(|c| {
        c.select(
            "WITH RECURSIVE t(oid) AS (
               SELECT $1::oid
               UNION SELECT i.inhrelid FROM pg_catalog.pg_inherits i JOIN t ON i.inhparent = t.oid)
             SELECT pg_catalog.format('table %s is owned by role %s', c.oid::pg_catalog.regclass,
                                      c.relowner::pg_catalog.regrole), c.relowner
               FROM t JOIN pg_catalog.pg_class c ON c.oid = t.oid
             UNION ALL
             SELECT pg_catalog.format('its schema %s is owned by role %s', n.oid::pg_catalog.regnamespace,
                                      n.nspowner::pg_catalog.regrole), n.nspowner
               FROM pg_catalog.pg_class c JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
              WHERE c.oid = $1
             UNION ALL
             SELECT pg_catalog.format('role %s may create objects in its schema %s',
                                      CASE WHEN a.grantee = 0 THEN 'PUBLIC' ELSE a.grantee::pg_catalog.regrole::text END,
                                      n.oid::pg_catalog.regnamespace), a.grantee
               FROM pg_catalog.pg_class c JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace,
                    pg_catalog.aclexplode(n.nspacl) a
              WHERE c.oid = $1 AND a.privilege_type = 'CREATE'",
            None,
            &[rel.into()],
        )?
        .map(|r| {
            Ok::<_, pgrx::spi::SpiError>((
                r.get::<String>(1)?.unwrap_or_default(),
                r.get::<pg_sys::Oid>(2)?.unwrap_or(pg_sys::InvalidOid),
            ))
        })
        .collect::<std::result::Result<Vec<_>, _>>()
    })?;
    let mut trusted = std::collections::HashMap::new();
    for (why, role) in owners {
        // (PUBLIC, grantee 0, is no administrator.)
        let admin = *trusted
            .entry(role)
            .or_insert_with(|| role != pg_sys::InvalidOid && crate::identity::role_is_admin(role));
        if !admin {
            return Ok(Some(why));
        }
    }
    Ok(None)
}

fn not_read(why: &str) -> LimitsError {
    LimitsError::forbidden(
        format!("the meshhook_limits tick does not read this queue: {why}, which is not an administrator"),
        "the tick reads queue tables as their owners, and would wait on any code an owner attached to them (queue_health, claimed jobs); \
         GRANT meshhook_limits_admin to that role, or have an administrator's role own the queue's schema and tables \
         (and create in the schema)",
    )
}

thread_local! {
    /// Queue tables `_tick_reads` said no to in this process, with why.
    static WARNED: std::cell::RefCell<std::collections::HashSet<(u32, String)>> = Default::default();
}

/// `_tick_reads(rel)`: whether the tick reads queue table `rel`
/// (`untrusted_owner`). When it does not, a warning says why, once per
/// process and reason: the worker asks every second.
#[pg_extern(volatile, parallel_unsafe, strict)]
#[search_path(pg_catalog, pg_temp)]
fn _tick_reads(rel: pg_sys::Oid) -> bool {
    match untrusted_owner(rel).or_raise() {
        None => true,
        Some(why) => {
            if WARNED.with(|w| w.borrow_mut().insert((rel.to_u32(), why.clone()))) {
                not_read(&why).warn();
            }
            false
        }
    }
}

thread_local! {
    /// Queues the tick could not sample in this process, with why
    /// (SQLSTATE), until it reads them again.
    static SKIPPED: std::cell::RefCell<std::collections::HashSet<(String, String)>> = Default::default();
}

/// `_queue_skip_is_new(queue_key, sqlstate)`: true the first time in this
/// process that the tick skips this queue for this cause (the worker tries
/// every second; the warning is said once). `queue_key` is a digest of
/// source and name (ASCII whatever the database's encoding).
#[pg_extern(volatile, parallel_unsafe, strict)]
fn _queue_skip_is_new(queue_key: &str, sqlstate: &str) -> bool {
    SKIPPED.with(|s| {
        s.borrow_mut()
            .insert((queue_key.to_owned(), sqlstate.to_owned()))
    })
}

/// `_queue_read(queue_key)`: the tick sampled the queue; a later failure is
/// said again.
#[pg_extern(volatile, parallel_unsafe, strict)]
fn _queue_read(queue_key: &str) {
    SKIPPED.with(|s| {
        let mut s = s.borrow_mut();
        if !s.is_empty() {
            s.retain(|(q, _)| q != queue_key);
        }
    });
}

pgrx::extension_sql!(
    "REVOKE EXECUTE ON FUNCTION meshhook_limits._queue_skip_is_new(text, text) FROM PUBLIC;\n\
     REVOKE EXECUTE ON FUNCTION meshhook_limits._queue_read(text) FROM PUBLIC;",
    name = "queue_skipped_grants",
    requires = [_queue_skip_is_new, _queue_read]
);

pgrx::extension_sql!(
    "REVOKE EXECUTE ON FUNCTION meshhook_limits._tick_reads(oid) FROM PUBLIC;",
    name = "tick_reads_grants",
    requires = [_tick_reads]
);

/// Run `query` (one row, one jsonb column; `$1` timestamptz and `$2`
/// interval) as the owner of table `rel`, in a security-restricted
/// operation (`as_owner`), within `meshhook_limits.queue_read_timeout` for
/// a queue table, and return its value.
pub fn read_as_owner(
    rel: pg_sys::Oid,
    query: &str,
    at: Option<TimestampWithTimeZone>,
    window: Option<Interval>,
) -> Result<Option<RawJsonb>> {
    let (owner, queue, name) = table_owner(rel)?;
    let what = format!("table {name}");
    // Queue tables: the tick reads them (those of administrators' roles:
    // `_tick_reads`), whoever made them. (Tracked tables are counted at
    // their owner's own request.)
    let limit = if queue {
        crate::gucs::queue_read_timeout_ms()
    } else {
        0
    };
    // The answer is copied into the caller's memory, out of SPI's.
    let cx = unsafe { pg_sys::CurrentMemoryContext };
    within(limit, &what, || {
        as_owner(owner, || {
            Spi::connect(|c| {
                let rows = c
                    .select(query, Some(1), &[at.into(), window.into()])?
                    .first();
                if rows.is_empty() {
                    return Ok(None);
                }
                RawJsonb::copy(&rows, 1, cx)
            })
        })
        .map_err(LimitsError::from)
    })
}

/// `_read_as_owner(rel, query, at, window)`: `query` run as the owner of
/// table `rel` in a security-restricted operation (see the module docs).
/// Raises 22023 when `rel` is not a plain or partitioned table. Only for the
/// extension's own definer code: EXECUTE is revoked from PUBLIC, and the
/// current user must be a superuser (the extension's owner), since the
/// function becomes any table's owner.
#[pg_extern(volatile, parallel_unsafe)]
#[search_path(pg_catalog, pg_temp)]
fn _read_as_owner(
    rel: Option<pg_sys::Oid>,
    query: Option<&str>,
    at: default!(Option<TimestampWithTimeZone>, "NULL"),
    window: default!(Option<Interval>, "NULL"),
) -> Option<RawJsonb> {
    if !unsafe { pg_sys::superuser() } {
        LimitsError::forbidden(
            "_read_as_owner is internal to meshhook_limits",
            "it runs only inside the extension's own SECURITY DEFINER functions",
        )
        .raise();
    }
    let (Some(rel), Some(query)) = (rel, query) else {
        LimitsError::invalid("rel and query must not be NULL", "pass a table and a query").raise();
    };
    read_as_owner(rel, query, at, window).or_raise()
}

pgrx::extension_sql!(
    "REVOKE EXECUTE ON FUNCTION meshhook_limits._read_as_owner(oid, text, timestamptz, interval) FROM PUBLIC;",
    name = "read_as_owner_grants",
    requires = [_read_as_owner]
);
