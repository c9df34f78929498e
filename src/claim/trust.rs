//! Whether the claiming role may claim from a queue, and may trust its
//! owners (docs/security.md, "Queue owners").
//!
//! The worker that claims also ends the jobs with the queue system's own
//! calls (boss.complete, pgmq.archive), which run the code the queue's
//! owners attached as the worker. So it claims only from queues whose
//! table, schema, partition and child owners, whoever may create in the
//! schema (a function the worker calls), and the owners of the functions
//! in it (which they can rewrite) have its privileges anyway: a superuser,
//! itself, or a role that is a member of it. And only with the rights the
//! queue's own fetch needs (SELECT and UPDATE on the table, USAGE on the
//! schema): the statements run as the table's owner, on the caller's behalf.
//!
//! The answer depends on the catalogs only (pg_class, pg_namespace,
//! pg_inherits, pg_proc, roles and memberships), and reading them costs as
//! much as a claim, so a backend asks again only after one of them changed
//! (a catalog invalidation bumps `GENERATION`; pending ones are taken in
//! on every call) or for another user.
use crate::error::{LimitsError, Result};
use pgrx::prelude::*;
use pgrx::spi::SpiClient;
use std::cell::{Cell, RefCell};
use std::collections::HashMap;

/// `$1`: the queue table. (rights, table, untrusted owner or creator,
/// function of an untrusted owner).
const TRUST_Q: &str = "SELECT
        pg_catalog.has_table_privilege($1, 'SELECT, UPDATE')
          AND pg_catalog.has_schema_privilege((SELECT c.relnamespace FROM pg_catalog.pg_class c
                                                WHERE c.oid = $1), 'USAGE'),
        $1::pg_catalog.regclass::text,
        (SELECT CASE x.o
                  WHEN 1 THEN pg_catalog.format('queue table %s is owned by role %s', $1::pg_catalog.regclass,
                                                x.owner::regrole)
                  WHEN 2 THEN pg_catalog.format('schema %s is owned by role %s', x.rel::regnamespace, x.owner::regrole)
                  WHEN 3 THEN pg_catalog.format('%s, a partition or child of %s, is owned by role %s',
                                                x.rel::regclass, $1::pg_catalog.regclass, x.owner::regrole)
                  ELSE pg_catalog.format('role %s may create objects in schema %s',
                                         CASE WHEN x.owner = 0 THEN 'PUBLIC' ELSE x.owner::regrole::text END,
                                         x.rel::regnamespace) END
           FROM (WITH RECURSIVE kids(oid) AS (
                   SELECT i.inhrelid FROM pg_catalog.pg_inherits i WHERE i.inhparent = $1
                   UNION
                   SELECT i.inhrelid FROM pg_catalog.pg_inherits i JOIN kids k ON i.inhparent = k.oid)
                 SELECT 1 AS o, c.relowner AS owner, c.oid AS rel FROM pg_catalog.pg_class c WHERE c.oid = $1
                 UNION ALL
                 SELECT 2, n.nspowner, n.oid FROM pg_catalog.pg_class c
                   JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace WHERE c.oid = $1
                 UNION ALL
                 SELECT 3, (SELECT pc.relowner FROM pg_catalog.pg_class pc WHERE pc.oid = kids.oid), kids.oid FROM kids
                 UNION ALL
                 SELECT 4, a.grantee, n.oid FROM pg_catalog.pg_class c
                   JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace,
                   pg_catalog.aclexplode(n.nspacl) a
                  WHERE c.oid = $1 AND a.privilege_type = 'CREATE') x
          WHERE x.owner = 0 OR NOT pg_catalog.pg_has_role(x.owner, current_user, 'USAGE')
          ORDER BY x.o LIMIT 1),
        (SELECT pg_catalog.format('function %s is owned by role %s', p.oid::pg_catalog.regprocedure,
                                  p.proowner::pg_catalog.regrole)
           FROM pg_catalog.pg_proc p
          WHERE p.pronamespace = (SELECT c.relnamespace FROM pg_catalog.pg_class c WHERE c.oid = $1)
            AND NOT pg_catalog.pg_has_role(p.proowner, current_user, 'USAGE')
          LIMIT 1)";

thread_local! {
    /// Bumped by every invalidation of the catalogs the answer depends on.
    static GENERATION: Cell<u64> = const { Cell::new(1) };
    static REGISTERED: Cell<bool> = const { Cell::new(false) };
    /// (queue table, user) → the generation the claim was found allowed at.
    static ALLOWED: RefCell<HashMap<(u32, u32), u64>> = RefCell::new(HashMap::new());
}

fn bump() {
    GENERATION.with(|g| g.set(g.get().wrapping_add(1)));
}

unsafe extern "C-unwind" fn catalog_changed(
    _arg: pg_sys::Datum,
    _cache: std::ffi::c_int,
    _hash: u32,
) {
    bump();
}

unsafe extern "C-unwind" fn relation_changed(_arg: pg_sys::Datum, _rel: pg_sys::Oid) {
    bump();
}

fn register() {
    if REGISTERED.with(|r| r.replace(true)) {
        return;
    }
    use pg_sys::SysCacheIdentifier::{
        AUTHMEMMEMROLE, AUTHMEMROLEMEM, AUTHOID, NAMESPACEOID, PROCOID, RELOID,
    };
    // SAFETY: registered once per backend; the callbacks only bump a
    // counter of this thread. pg_inherits has no syscache: a new child is
    // a new pg_class row (RELOID), attaching one invalidates its parent.
    unsafe {
        for cache in [
            RELOID,
            NAMESPACEOID,
            PROCOID,
            AUTHOID,
            AUTHMEMROLEMEM,
            AUTHMEMMEMROLE,
        ] {
            pg_sys::CacheRegisterSyscacheCallback(
                cache as std::ffi::c_int,
                Some(catalog_changed),
                pg_sys::Datum::from(0),
            );
        }
        pg_sys::CacheRegisterRelcacheCallback(Some(relation_changed), pg_sys::Datum::from(0));
    }
}

/// 42501 unless the current user may claim from queue table `rel` (see the
/// module docs).
pub fn check(c: &SpiClient, rel: pg_sys::Oid, source: &str, queue: &str) -> Result<()> {
    register();
    // A backend takes in catalog changes when it next locks a relation it
    // has not locked in this transaction; a claiming transaction holds its
    // locks already. Take them in now, as a new statement over the
    // catalogs would see them.
    unsafe { pg_sys::AcceptInvalidationMessages() };
    let key = (rel.to_u32(), unsafe { pg_sys::GetUserId() }.to_u32());
    let now = GENERATION.with(Cell::get);
    if ALLOWED.with(|m| m.borrow().get(&key) == Some(&now)) {
        return Ok(());
    }
    let rows = c.select(TRUST_Q, Some(1), &[rel.into()])?;
    let r = rows.into_iter().next().ok_or(LimitsError::NotPreloaded)?;
    if r.get::<bool>(1)? != Some(true) {
        let table = r.get::<String>(2)?.unwrap_or_default();
        return Err(missing_rights(c, rel, &table));
    }
    let refuse = |why: String, hint: &str| {
        LimitsError::forbidden(
            format!(
                "claim_jobs does not claim from {source} queue \"{}\" as this role: {why}, \
                 which does not have this role's privileges",
                crate::identity::truncate(queue, 80)
            ),
            hint,
        )
    };
    if let Some(untrusted) = r.get::<String>(3)? {
        return Err(refuse(
            untrusted,
            "the worker ends claimed jobs with the queue's own calls, which run that owner's triggers \
             with the worker's rights: claim as the owner (granted meshhook_limits_admin), or GRANT the \
             claiming role TO the owner if the owner may act as it",
        ));
    }
    if let Some(function) = r.get::<String>(4)? {
        return Err(refuse(
            function,
            "workers call the functions in the queue's schema with their own rights, and a function's \
             owner can rewrite it: give the function to the queue's owner, or drop it",
        ));
    }
    // Asked again by the next transaction only if nothing changed meanwhile:
    // a change during this one bumped the generation past `now`.
    ALLOWED.with(|m| m.borrow_mut().insert(key, now));
    Ok(())
}

/// 42501 for a claiming role without the queue system's rights on its
/// table: the GRANTs that give them, for this role, schema and table.
fn missing_rights(c: &SpiClient, rel: pg_sys::Oid, table: &str) -> LimitsError {
    let names = c
        .select(
            "SELECT pg_catalog.quote_ident(current_user::text), c.relnamespace::pg_catalog.regnamespace::text
               FROM pg_catalog.pg_class c WHERE c.oid = $1",
            Some(1),
            &[rel.into()],
        )
        .ok()
        .and_then(|rows| rows.into_iter().next())
        .and_then(|r| Some((r.get::<String>(1).ok()??, r.get::<String>(2).ok()??)));
    let hint = match names {
        Some((role, schema)) => format!(
            "give the claiming role the rights the queue system's own workers have: \
             GRANT USAGE ON SCHEMA {schema} TO {role}; GRANT SELECT, UPDATE ON {table} TO {role}"
        ),
        None => "give the claiming role the rights the queue system's own workers have".to_owned(),
    };
    LimitsError::forbidden(
        format!("permission denied for table {table}: claim_jobs needs SELECT and UPDATE on it and USAGE on its schema"),
        hint,
    )
}
