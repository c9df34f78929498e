//! DROP DATABASE, CREATE DATABASE ... TEMPLATE and ALTER DATABASE ... RENAME
//! refuse to run while another session is connected to the database, and
//! a database's worker is one. So, before such a command, this hook asks
//! that database's worker to leave (SIGTERM). The command waits up to 5 s
//! for it to go; the launcher waits 5 s before it starts another
//! (`launcher::RESTART_AFTER`), and a DROP DATABASE leaves nothing to start.
//! Only for a caller who may run the command: the database's owner (or a
//! member of its role) or a superuser.
use pgrx::prelude::*;
use std::ffi::{c_char, CStr};

static mut PREV: pg_sys::ProcessUtility_hook_type = None;

/// From `_PG_init` while preloading (every backend has the hook).
pub fn install() {
    unsafe {
        PREV = pg_sys::ProcessUtility_hook;
        pg_sys::ProcessUtility_hook = Some(process_utility);
    }
}

/// The database `stmt` needs free of sessions, if any.
unsafe fn database_to_free(stmt: *mut pg_sys::Node) -> Option<String> {
    let name = |p: *const c_char| unsafe {
        (!p.is_null()).then(|| CStr::from_ptr(p).to_string_lossy().into_owned())
    };
    unsafe {
        if stmt.is_null() {
            return None;
        }
        match (*stmt).type_ {
            pg_sys::NodeTag::T_DropdbStmt => name((*stmt.cast::<pg_sys::DropdbStmt>()).dbname),
            pg_sys::NodeTag::T_RenameStmt => {
                let r = stmt.cast::<pg_sys::RenameStmt>();
                ((*r).renameType == pg_sys::ObjectType::OBJECT_DATABASE)
                    .then(|| name((*r).subname))
                    .flatten()
            }
            pg_sys::NodeTag::T_CreatedbStmt => {
                let options = (*stmt.cast::<pg_sys::CreatedbStmt>()).options;
                pgrx::PgList::<pg_sys::DefElem>::from_pg(options)
                    .iter_ptr()
                    .find(|d| name((**d).defname).as_deref() == Some("template"))
                    .and_then(|d| name(pg_sys::defGetString(d)))
            }
            _ => None,
        }
    }
}

/// SIGTERM to the workers connected to database `db`, if the caller owns it.
fn stop_workers(db: &str) {
    let pids = Spi::connect(|c| {
        c.select(
            "SELECT a.pid FROM pg_catalog.pg_stat_activity a
               JOIN pg_catalog.pg_database d ON d.oid = a.datid
              WHERE a.backend_type = $1 AND d.datname = $2
                AND pg_catalog.pg_has_role(d.datdba, 'USAGE')",
            None,
            &[super::WORKER_TYPE.into(), db.into()],
        )?
        .map(|r| r.get::<i32>(1))
        .collect::<Result<Vec<_>, _>>()
    })
    .unwrap_or_default();
    for pid in pids.into_iter().flatten() {
        unsafe { libc::kill(pid, libc::SIGTERM) };
    }
}

#[pg_guard]
#[allow(clippy::too_many_arguments)] // the hook's signature
unsafe extern "C-unwind" fn process_utility(
    pstmt: *mut pg_sys::PlannedStmt,
    query_string: *const c_char,
    read_only_tree: bool,
    context: pg_sys::ProcessUtilityContext::Type,
    params: pg_sys::ParamListInfo,
    query_env: *mut pg_sys::QueryEnvironment,
    dest: *mut pg_sys::DestReceiver,
    qc: *mut pg_sys::QueryCompletion,
) {
    unsafe {
        if let Some(db) = database_to_free((*pstmt).utilityStmt) {
            stop_workers(&db);
        }
        match PREV {
            Some(prev) => prev(
                pstmt,
                query_string,
                read_only_tree,
                context,
                params,
                query_env,
                dest,
                qc,
            ),
            None => pg_sys::standard_ProcessUtility(
                pstmt,
                query_string,
                read_only_tree,
                context,
                params,
                query_env,
                dest,
                qc,
            ),
        }
    }
}
