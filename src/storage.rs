//! The size of a row, as storage quotas count it.
//!
//! A row's size is the sum of its values' sizes: fixed-length values by their
//! length, variable-length values by their uncompressed length without the
//! length word (what `octet_length` gives for text and bytea), whether they
//! are stored inline, compressed or TOASTed. It depends on the values only:
//! not on session settings (`bytea_output`, `DateStyle`, `extra_float_digits`,
//! `TimeZone`…), and no type's output function, cast or operator runs, so a
//! table's owner cannot make the definer code that counts it run their code.
use pgrx::pg_sys;

crate::finfo_v1!(pg_finfo_meshhook_limits_row_bytes);

/// `_row_bytes(record) → bigint`: see the module docs. NULL for NULL.
#[pgrx::pg_guard]
#[no_mangle]
pub extern "C-unwind" fn meshhook_limits_row_bytes(
    fcinfo: pg_sys::FunctionCallInfo,
) -> pg_sys::Datum {
    // SAFETY: called by the executor with one argument of a composite type.
    unsafe {
        let arg = *(*fcinfo).args.as_slice(1).first().expect("one argument");
        if arg.isnull {
            (*fcinfo).isnull = true;
            return pg_sys::Datum::from(0);
        }
        let header = pg_sys::pg_detoast_datum(arg.value.cast_mut_ptr())
            .cast::<pg_sys::HeapTupleHeaderData>();
        let datum = (*header).t_choice.t_datum;
        let desc = pg_sys::lookup_rowtype_tupdesc(datum.datum_typeid, datum.datum_typmod);
        // Released (DecrTupleDescRefCount) when dropped; `get` reads the
        // attribute array whose layout differs by PostgreSQL version.
        let desc = pgrx::PgTupleDesc::from_pg(desc);
        let natts = desc.len();
        let mut tuple = pg_sys::HeapTupleData {
            t_len: (datum.datum_len_ as u32 >> 2) & 0x3FFF_FFFF,
            t_self: pg_sys::ItemPointerData::default(),
            t_tableOid: pg_sys::InvalidOid,
            t_data: header,
        };
        let mut values = vec![pg_sys::Datum::from(0); natts];
        let mut nulls = vec![false; natts];
        pg_sys::heap_deform_tuple(
            &mut tuple,
            desc.as_ptr(),
            values.as_mut_ptr(),
            nulls.as_mut_ptr(),
        );
        let mut bytes: i64 = 0;
        for i in 0..natts {
            let att = desc.get(i).expect("attribute of the row type");
            if att.attisdropped || nulls[i] {
                continue;
            }
            bytes += match att.attlen {
                len if len > 0 => i64::from(len),
                -1 => pg_sys::toast_raw_datum_size(values[i]) as i64 - pg_sys::VARHDRSZ as i64,
                _ => std::ffi::CStr::from_ptr(values[i].cast_mut_ptr())
                    .to_bytes()
                    .len() as i64,
            };
        }
        pg_sys::Datum::from(bytes)
    }
}

pgrx::extension_sql!(
    r#"
CREATE FUNCTION meshhook_limits._row_bytes(record) RETURNS bigint
LANGUAGE c IMMUTABLE STRICT PARALLEL SAFE
AS 'MODULE_PATHNAME', 'meshhook_limits_row_bytes';
COMMENT ON FUNCTION meshhook_limits._row_bytes(record) IS
  'Bytes a row counts for storage quotas: the sum of its values'' uncompressed sizes, independent of session settings.';
"#,
    name = "row_bytes"
);
