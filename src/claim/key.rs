//! The key of a job in the claim index (`_claim_key_sql` in sql/claim_bindings.sql).
//!
//! Both claim indexes of a binding, and so every send into a bound queue,
//! compute it for every job: it must cost next to nothing. A job's key is
//! its tenant as written when every field is one claim_jobs accepts (the
//! tenant and project uuids, the concurrency key 1 to 200 bytes, the cost a
//! whole number from 1 to 1,000,000: `parse_uuid` and `parse_cost` in
//! `super`; the key in UTF-8, as slots take keys, whatever the database's
//! encoding), and NULL otherwise, so a job that can never be claimed is out
//! of its tenant's range and values an enqueuer writes add no tenants for
//! the skip scan to visit (issue 19). It works on the bytes: no regular
//! expression, no allocation, no error for any input (a SQL_ASCII database
//! stores any bytes, and an error here would refuse the send).
use crate::slots::claimed::{KEY_MAX, MAX_COST};
use pgrx::datum::Uuid;
use pgrx::pg_sys;

/// A tenant or project id as PostgreSQL's uuid input takes it in the common
/// forms (hyphenated or not, any case); None for anything else, which is
/// never claimed.
pub(super) fn parse_uuid(s: &str) -> Option<Uuid> {
    let hex: String = s.chars().filter(|c| *c != '-').collect();
    let hyphens_ok = s.len() == 32
        || (s.len() == 36 && [8, 13, 18, 23].iter().all(|&i| s.as_bytes()[i] == b'-'));
    if hex.len() != 32 || !hyphens_ok || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    let mut bytes = [0u8; 16];
    for (i, byte) in bytes.iter_mut().enumerate() {
        *byte = u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).ok()?;
    }
    Some(Uuid::from_bytes(bytes))
}

/// A cost as the job's JSON gives it: missing is 1; a whole number from 1
/// to 1,000,000 is itself; anything else is not valid.
pub(super) fn parse_cost(s: Option<&str>) -> Option<i32> {
    match s {
        None => Some(1),
        Some(s) if s.len() <= 7 && !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()) => {
            s.parse::<i32>().ok().filter(|c| (1..=MAX_COST).contains(c))
        }
        Some(_) => None,
    }
}

crate::finfo_v1!(pg_finfo_meshhook_limits_claim_key);

/// `_claim_key(tenant, project, key, cost text) → text`: see the module
/// docs. Immutable: it reads its arguments only.
#[pgrx::pg_guard]
#[no_mangle]
pub extern "C-unwind" fn meshhook_limits_claim_key(
    fcinfo: pg_sys::FunctionCallInfo,
) -> pg_sys::Datum {
    // SAFETY: called by the executor with four text arguments.
    unsafe {
        let args = (*fcinfo).args.as_slice(4);
        let bytes = |i: usize| -> Option<&[u8]> {
            let arg = args[i];
            (!arg.isnull).then(|| {
                let v = pg_sys::pg_detoast_datum_packed(arg.value.cast_mut_ptr());
                pgrx::varlena::varlena_to_byte_slice(v)
            })
        };
        if claimable(bytes(0), bytes(1), bytes(2), bytes(3)) {
            return args[0].value;
        }
        (*fcinfo).isnull = true;
        pg_sys::Datum::from(0)
    }
}

/// Whether claim_jobs can ever claim a job with these fields.
fn claimable(
    tenant: Option<&[u8]>,
    project: Option<&[u8]>,
    key: Option<&[u8]>,
    cost: Option<&[u8]>,
) -> bool {
    tenant.is_some_and(is_uuid)
        && project.is_none_or(is_uuid)
        && key.is_none_or(|k| !k.is_empty() && k.len() <= KEY_MAX && std::str::from_utf8(k).is_ok())
        && cost.is_none_or(is_cost)
}

/// A uuid as `parse_uuid` takes it: 32 hex digits, bare or hyphenated 8-4-4-4-12.
fn is_uuid(s: &[u8]) -> bool {
    match s.len() {
        32 => s.iter().all(u8::is_ascii_hexdigit),
        36 => s.iter().enumerate().all(|(i, b)| match i {
            8 | 13 | 18 | 23 => *b == b'-',
            _ => b.is_ascii_hexdigit(),
        }),
        _ => false,
    }
}

/// A cost as `parse_cost` takes it: a whole number from 1 to MAX_COST in at
/// most 7 digits.
fn is_cost(s: &[u8]) -> bool {
    (1..=7).contains(&s.len())
        && s.iter().all(u8::is_ascii_digit)
        && (1..=i64::from(MAX_COST))
            .contains(&s.iter().fold(0i64, |n, d| n * 10 + i64::from(d - b'0')))
}

pgrx::extension_sql!(
    r#"
CREATE FUNCTION meshhook_limits._claim_key(tenant text, project text, key text, cost text) RETURNS text
LANGUAGE c IMMUTABLE PARALLEL SAFE
AS 'MODULE_PATHNAME', 'meshhook_limits_claim_key';
COMMENT ON FUNCTION meshhook_limits._claim_key(text, text, text, text) IS
  'The key of a job in a claim index: its tenant when claim_jobs can claim it, else NULL.';
"#,
    name = "claim_key"
);

#[cfg(any(test, feature = "pg_test"))]
#[pgrx::pg_schema]
mod tests {
    use super::{claimable, is_cost, is_uuid, parse_cost, parse_uuid};
    use pgrx::prelude::*;

    fn b(s: &str) -> Option<&[u8]> {
        Some(s.as_bytes())
    }

    #[pg_test]
    fn agrees_with_what_claim_jobs_parses() {
        let t = b("a0000000-0000-4000-8000-000000000001");
        assert!(claimable(t, None, None, None));
        assert!(claimable(
            b("A0000000000040008000000000000001"),
            t,
            b("k"),
            b("1000000")
        ));
        assert!(!claimable(None, None, None, None));
        assert!(!claimable(b("junk"), None, None, None));
        assert!(!claimable(
            t,
            b("a0000000-0000-4000-8000-00000000000"),
            None,
            None
        ));
        assert!(!claimable(t, None, b(""), None));
        assert!(!claimable(t, None, b(&"k".repeat(201)), None));
        assert!(claimable(t, None, b(&"k".repeat(200)), None));
        assert!(claimable(t, None, b("café"), None));
        assert!(!claimable(t, None, Some(&b"caf\xe9"[..]), None)); // LATIN1 bytes
        for bad in ["0", "1000001", "-1", "1.5", "", "00000000", " 1"] {
            assert!(!is_cost(bad.as_bytes()), "{bad:?}");
        }
        assert!(is_cost(b"0000001"));
        assert!(!is_uuid(b"a0000000-0000-4000-8000-00000000000g"));
        assert!(!is_uuid(b"a00000000000-4000-8000-0000-00000001"));
    }

    #[pg_test]
    fn tenant_ids_parse_as_postgresql_reads_them_or_not_at_all() {
        let canonical = parse_uuid("a0000000-0000-4000-8000-000000000001").expect("hyphenated");
        assert_eq!(
            parse_uuid(
                "A00000000000400080000000000000 01"
                    .replace(' ', "")
                    .as_str()
            ),
            Some(canonical)
        );
        assert_eq!(
            parse_uuid("A0000000-0000-4000-8000-000000000001"),
            Some(canonical)
        );
        for bad in [
            "",
            "bogus",
            "a0000000-0000-4000-8000-00000000000",
            "a0000000_0000_4000_8000_000000000001",
            "a0000000-0000-4000-8000-00000000000g",
            "{a0000000-0000-4000-8000-000000000001}",
            "a000000-00000-4000-8000-000000000001",
            "ä0000000-0000-4000-8000-00000000000",
        ] {
            assert_eq!(parse_uuid(bad), None, "{bad}");
        }
    }

    #[pg_test]
    fn costs_are_whole_numbers_from_1_to_a_million() {
        assert_eq!(parse_cost(None), Some(1));
        assert_eq!(parse_cost(Some("1")), Some(1));
        assert_eq!(parse_cost(Some("1000000")), Some(1_000_000));
        for bad in [
            "0", "-1", "1.5", "1e3", "", " 1", "1000001", "9999999", "x", "NaN",
        ] {
            assert_eq!(parse_cost(Some(bad)), None, "{bad}");
        }
    }
}
