//! Who is calling: the tenant (from JWT claims or the session setting) and
//! whether the caller is an administrator.
//!
//! Functions of this extension run as SECURITY DEFINER, so `current_user`
//! inside them is the owner. The caller is the *outer* user: the login role,
//! or whatever `SET [LOCAL] ROLE` chose (PostgREST's `authenticated`).
use crate::error::{LimitsError, Result};
use crate::gucs;
use pgrx::prelude::*;
use std::ffi::CStr;

fn claims_text() -> Option<String> {
    unsafe {
        let p = pg_sys::GetConfigOption(c"request.jwt.claims".as_ptr(), true, false);
        if p.is_null() {
            return None;
        }
        let s = CStr::from_ptr(p).to_string_lossy().into_owned();
        (!s.trim().is_empty()).then_some(s)
    }
}

fn parse_uuid(s: &str, origin: &str) -> Result<pgrx::Uuid> {
    let hex: String = s.chars().filter(|c| *c != '-').collect();
    if hex.len() != 32 || !hex.chars().all(|c| c.is_ascii_hexdigit()) {
        return Err(LimitsError::invalid(
            format!("{origin} is not a uuid: \"{}\"", truncate(s, 64)),
            "tenant ids are uuids such as 0b6f6c2e-0000-4000-8000-000000000001",
        ));
    }
    let mut bytes = [0u8; 16];
    for (i, b) in bytes.iter_mut().enumerate() {
        *b = u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).unwrap_or(0);
    }
    Ok(pgrx::Uuid::from_bytes(bytes))
}

pub fn truncate(s: &str, max: usize) -> String {
    if s.chars().count() <= max {
        s.to_string()
    } else {
        let mut t: String = s.chars().take(max).collect();
        t.push('…');
        t
    }
}

fn claim_at<'a>(v: &'a serde_json::Value, path: &str) -> Option<&'a serde_json::Value> {
    path.split('.')
        .filter(|p| !p.is_empty())
        .try_fold(v, |cur, key| cur.get(key))
}

/// The caller (the outer user: PostgREST's per-request role) is one of
/// `meshhook_limits.jwt_roles`, whose claims are believed.
fn claims_trusted() -> bool {
    let Some(list) = gucs::jwt_roles() else {
        return false;
    };
    let name = unsafe {
        let p = pg_sys::GetUserNameFromId(pg_sys::GetOuterUserId(), true);
        if p.is_null() {
            return false;
        }
        CStr::from_ptr(p).to_bytes().to_vec()
    };
    list.split(|b| *b == b',')
        .any(|r| r.trim_ascii() == name.as_slice())
}

/// True inside a security-restricted operation: code a table's owner
/// planted (an index expression, a trigger, a rule) running on that table
/// for someone else — our `_read_as_owner`, PostgreSQL's VACUUM, ANALYZE,
/// CREATE INDEX, REFRESH MATERIALIZED VIEW. The outer user there is whoever
/// started the operation, not whoever wrote the code, so such code has no
/// identity here: no tenant, not an admin, not a monitor.
fn in_planted_code() -> bool {
    unsafe { pg_sys::InSecurityRestrictedOperation() }
}

/// The tenant of the caller, or None when the caller carries no tenant.
///
/// Who may assert a tenant: `request.jwt.claims` counts only for the roles of
/// `meshhook_limits.jwt_roles` (PostgREST's `anon` and `authenticated`),
/// and `meshhook_limits.tenant_id` only where a superuser set it or allowed
/// it to be set (it is a superuser-only setting).
pub fn caller_tenant() -> Result<Option<pgrx::Uuid>> {
    if in_planted_code() {
        return Ok(None);
    }
    if let Some(text) = claims_text().filter(|_| claims_trusted()) {
        let v: serde_json::Value = serde_json::from_str(&text).map_err(|e| {
            LimitsError::invalid(
                format!("request.jwt.claims is not valid JSON: {e}"),
                "set request.jwt.claims to the JSON claims of the caller's JWT",
            )
        })?;
        let path = gucs::tenant_claim();
        let found = claim_at(&v, &path).or_else(|| v.get("tenant_id"));
        match found {
            Some(serde_json::Value::String(s)) if !s.is_empty() => {
                return parse_uuid(s, "the tenant claim of request.jwt.claims").map(Some)
            }
            Some(serde_json::Value::Null) | None => {}
            Some(other) => {
                return Err(LimitsError::invalid(
                    format!("the tenant claim of request.jwt.claims is not a string: {}", truncate(&other.to_string(), 64)),
                    "put the tenant id as a uuid string in the claim named by meshhook_limits.tenant_claim",
                ))
            }
        }
        // A JWT is present but names no tenant (e.g. anon): no tenant, and the
        // session setting must not be used to widen it.
        return Ok(None);
    }
    match gucs::tenant_id() {
        Some(id) if !id.is_empty() => parse_uuid(&id, "meshhook_limits.tenant_id").map(Some),
        _ => Ok(None),
    }
}

fn has_role(member: pg_sys::Oid, role: &CStr) -> bool {
    unsafe {
        let oid = pg_sys::get_role_oid(role.as_ptr(), true);
        oid != pg_sys::InvalidOid && pg_sys::has_privs_of_role(member, oid)
    }
}

/// Superuser, `service_role` (where it exists) or a member of `meshhook_limits_admin`.
pub fn caller_is_admin() -> bool {
    !in_planted_code() && role_is_admin(unsafe { pg_sys::GetOuterUserId() })
}

/// Whether `role` has an administrator's privileges (a superuser, or the
/// privileges of `service_role` or `meshhook_limits_admin`), whoever asks.
pub fn role_is_admin(role: pg_sys::Oid) -> bool {
    let superuser = unsafe { pg_sys::superuser_arg(role) };
    superuser || has_role(role, c"service_role") || has_role(role, c"meshhook_limits_admin")
}

/// Admins, and the read-only roles `meshhook_limits_monitor` and `pg_monitor`
/// (what an exporter's login role should be granted).
pub fn caller_can_monitor() -> bool {
    if in_planted_code() {
        return false;
    }
    caller_is_admin()
        || unsafe {
            let outer = pg_sys::GetOuterUserId();
            has_role(outer, c"meshhook_limits_monitor") || has_role(outer, c"pg_monitor")
        }
}

/// The caller may read `tenant`'s limits and usage: that tenant, an admin, or a monitor.
pub fn require_read_for(tenant: pgrx::Uuid) -> Result<()> {
    if caller_can_monitor() {
        return Ok(());
    }
    require_act_for(tenant)
}

/// The caller may act for `tenant`: it is that tenant, or an administrator.
pub fn require_act_for(tenant: pgrx::Uuid) -> Result<()> {
    match caller_tenant()? {
        Some(t) if t == tenant => Ok(()),
        _ if caller_is_admin() => Ok(()),
        // Never name the other tenant: its id may have come from a slot.
        Some(t) => Err(LimitsError::forbidden(
            format!("tenant {t} may not act for another tenant"),
            // Where the caller's tenant came from: its JWT, or the setting.
            if claims_text().filter(|_| claims_trusted()).is_some() {
                "call with the tenant id of your own JWT claim"
            } else {
                "call with your own tenant id: the meshhook_limits.tenant_id of this session \
                 (set for the login role with ALTER ROLE … SET)"
            },
        )),
        None => Err(LimitsError::forbidden(
            "no tenant identity to act for a tenant",
            "send a JWT whose claims carry the tenant id as one of the roles of meshhook_limits.jwt_roles, \
             have a superuser bind meshhook_limits.tenant_id to the login role, or call as an admin",
        )),
    }
}

pub fn require_admin(what: &str) -> Result<()> {
    if caller_is_admin() {
        Ok(())
    } else {
        Err(LimitsError::forbidden(
            format!("only administrators may {what}"),
            "grant the role meshhook_limits_admin to the caller, or call as service_role",
        ))
    }
}

/// The tenant of the caller (NULL when it has none). Used by RLS policies.
#[pg_extern(stable, parallel_safe)]
pub fn current_tenant() -> Option<pgrx::Uuid> {
    use crate::error::OrRaise;
    caller_tenant().or_raise()
}

/// True when the caller is an administrator of meshhook_limits.
#[pg_extern(stable, parallel_safe)]
pub fn is_admin() -> bool {
    caller_is_admin()
}

/// Raise 22023 for a NULL tenant and 42501 unless the caller may act for it.
#[pg_extern(stable, parallel_safe)]
pub fn require_tenant_access(tenant_id: Option<pgrx::Uuid>) {
    use crate::error::OrRaise;
    let r = match tenant_id {
        None => Err(LimitsError::invalid(
            "tenant_id must not be NULL",
            "pass the uuid of the tenant",
        )),
        Some(t) => require_act_for(t),
    };
    r.or_raise()
}

/// Raise 22023 for a NULL tenant and 42501 unless the caller may read it
/// (that tenant, an admin, or a monitoring role).
#[pg_extern(stable, parallel_safe)]
pub fn require_tenant_read(tenant_id: Option<pgrx::Uuid>) {
    use crate::error::OrRaise;
    let r = match tenant_id {
        None => Err(LimitsError::invalid(
            "tenant_id must not be NULL",
            "pass the uuid of the tenant",
        )),
        Some(t) => require_read_for(t),
    };
    r.or_raise()
}

/// True for admins and members of meshhook_limits_monitor or pg_monitor.
#[pg_extern(stable, parallel_safe)]
pub fn can_monitor() -> bool {
    caller_can_monitor()
}

/// 42501 unless the caller may read monitoring data (`can_monitor`).
pub fn require_monitor(what: &str) -> Result<()> {
    if caller_can_monitor() {
        Ok(())
    } else {
        Err(LimitsError::forbidden(
            format!("only monitoring roles may {what}"),
            "grant meshhook_limits_monitor (read-only) or pg_monitor to the caller, \
             or meshhook_limits_admin to change things too",
        ))
    }
}

/// Raise 42501 unless the caller may read monitoring data: the first
/// statement of every reader of health and pressure (an empty answer would
/// look like "nothing to report").
#[pg_extern(stable, parallel_safe)]
pub fn _require_monitor(what: crate::row::Utf8) {
    use crate::error::OrRaise;
    what.get("what").and_then(require_monitor).or_raise()
}

pgrx::extension_sql!(
    "REVOKE EXECUTE ON FUNCTION meshhook_limits._require_monitor(text) FROM PUBLIC;",
    name = "require_monitor_grants",
    requires = [_require_monitor]
);

/// Raise 42501 unless the caller is an administrator.
#[pg_extern(stable, parallel_safe)]
pub fn require_admin_access(action: crate::row::Utf8) {
    use crate::error::OrRaise;
    action.get("action").and_then(require_admin).or_raise()
}

/// True when the caller (the outer user) has the privileges of `role`:
/// is it, a member of it, or a superuser. For acts on another role's
/// objects, such as tracking a table (its owner must agree).
#[pg_extern(stable, parallel_safe, strict)]
pub fn _caller_has_privs_of(role: pg_sys::Oid) -> bool {
    unsafe { pg_sys::has_privs_of_role(pg_sys::GetOuterUserId(), role) }
}

/// True when the caller (the outer user) controls `role`, so code `role`
/// owns is the caller's own or a superuser's: `role` is the caller, a role
/// the caller is a member of (directly or through others), or a superuser.
/// Unlike `_caller_has_privs_of`, a superuser caller is not taken to be a
/// member of every role: bind_queue asks this of a queue's owners
/// (docs/security.md, "Queue owners").
#[pg_extern(stable, parallel_safe, strict)]
pub fn _caller_controls(role: pg_sys::Oid) -> bool {
    unsafe {
        let outer = pg_sys::GetOuterUserId();
        role == outer
            || pg_sys::superuser_arg(role)
            || pg_sys::is_member_of_role_nosuper(outer, role)
    }
}

pgrx::extension_sql!(
    "REVOKE EXECUTE ON FUNCTION meshhook_limits._caller_controls(oid) FROM PUBLIC;",
    name = "caller_controls_grants",
    requires = [_caller_controls]
);

pgrx::extension_sql!(
    "REVOKE EXECUTE ON FUNCTION meshhook_limits._caller_has_privs_of(oid) FROM PUBLIC;",
    name = "caller_has_privs_of_grants",
    requires = [_caller_has_privs_of]
);
