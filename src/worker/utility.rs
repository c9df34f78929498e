//! DROP DATABASE, CREATE DATABASE ... TEMPLATE, ALTER DATABASE ... RENAME
//! and ALTER DATABASE ... SET TABLESPACE refuse to run while another session
//! is connected to the database, and a database's worker is one. So, before
//! such a command, this hook asks that database's worker to leave
//! (SIGTERM). The command waits up to 5 s for it to go; the launcher waits
//! 5 s before it starts another (`launcher::RESTART_AFTER`), and a DROP
//! DATABASE leaves nothing to start. Only for a caller who may run the
//! command (the database's owner, a member of its role, or a superuser),
//! and only our worker, as it registered itself in shared memory
//! (`launcher::worker_of`): no SQL runs here, so nothing of the caller's
//! (operators, search_path) takes part.
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

/// The name of the database `stmt` needs free of sessions, if any.
unsafe fn database_to_free(stmt: *mut pg_sys::Node) -> Option<*const c_char> {
    let name = |p: *const c_char| (!p.is_null()).then_some(p);
    unsafe {
        if stmt.is_null() {
            return None;
        }
        let option = |options: *mut pg_sys::List, wanted: &CStr| {
            pgrx::PgList::<pg_sys::DefElem>::from_pg(options)
                .iter_ptr()
                .find(|d| !(**d).defname.is_null() && CStr::from_ptr((**d).defname) == wanted)
        };
        match (*stmt).type_ {
            pg_sys::NodeTag::T_DropdbStmt => name((*stmt.cast::<pg_sys::DropdbStmt>()).dbname),
            pg_sys::NodeTag::T_RenameStmt => {
                let r = stmt.cast::<pg_sys::RenameStmt>();
                ((*r).renameType == pg_sys::ObjectType::OBJECT_DATABASE)
                    .then(|| name((*r).subname))
                    .flatten()
            }
            pg_sys::NodeTag::T_AlterDatabaseStmt => {
                let a = stmt.cast::<pg_sys::AlterDatabaseStmt>();
                option((*a).options, c"tablespace").and_then(|_| name((*a).dbname))
            }
            pg_sys::NodeTag::T_CreatedbStmt => {
                // TEMPLATE name; TEMPLATE DEFAULT has no argument (template1,
                // which is never served).
                let options = (*stmt.cast::<pg_sys::CreatedbStmt>()).options;
                option(options, c"template")
                    .filter(|d| !(**d).arg.is_null())
                    .and_then(|d| name(pg_sys::defGetString(d)))
            }
            _ => None,
        }
    }
}

/// SIGTERM to the worker of database `name`, if the caller owns it.
unsafe fn stop_worker(name: *const c_char) {
    unsafe {
        let db = pg_sys::get_database_oid(name, true);
        if db == pg_sys::InvalidOid {
            return;
        }
        #[cfg(feature = "pg15")]
        let owner = pg_sys::pg_database_ownercheck(db, pg_sys::GetUserId());
        #[cfg(not(feature = "pg15"))]
        let owner = pg_sys::object_ownercheck(pg_sys::DatabaseRelationId, db, pg_sys::GetUserId());
        if !owner {
            return;
        }
        if let Some(pid) = super::launcher::worker_of(db.to_u32()) {
            libc::kill(pid, libc::SIGTERM);
        }
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
            stop_worker(db);
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
