//! One-row answers of hot set-returning functions, without the SRF protocol.
//!
//! The contract declares `check_rate_limit` and `acquire_execution_slot` as
//! `RETURNS TABLE(...)`: set-returning functions. pgrx's `TableIterator`
//! answers through the value-per-call protocol, which costs every call a
//! memory context, a result-type lookup from `pg_proc` and a `BlessTupleDesc`.
//! A set-returning function may also answer a single row and say so
//! (`isDone = ExprSingleResult`); the executor then stores that row and stops.
//! These helpers do that with a row type built and blessed once per backend.
use pgrx::pg_sys;
use std::cell::Cell;
use std::ffi::CStr;
use std::thread::LocalKey;

/// A per-backend blessed tuple descriptor, built on first use.
pub type DescCell = LocalKey<Cell<pg_sys::TupleDesc>>;

fn desc(cell: &'static DescCell, cols: &[(&CStr, pg_sys::Oid)]) -> pg_sys::TupleDesc {
    cell.with(|d| {
        if d.get().is_null() {
            // SAFETY: built in TopMemoryContext, so it lives as long as the
            // backend; BlessTupleDesc registers it as a transient record type.
            unsafe {
                let old = pg_sys::MemoryContextSwitchTo(pg_sys::TopMemoryContext);
                let desc = pg_sys::CreateTemplateTupleDesc(cols.len() as i32);
                for (i, (name, oid)) in cols.iter().enumerate() {
                    pg_sys::TupleDescInitEntry(desc, (i + 1) as i16, name.as_ptr(), *oid, -1, 0);
                }
                pg_sys::BlessTupleDesc(desc);
                pg_sys::MemoryContextSwitchTo(old);
                d.set(desc);
            }
        }
        d.get()
    })
}

/// Answer `row` (from `datum`) as the one row of a set-returning function
/// whose result columns are `cols` (their row type built once per backend in
/// `cell`). Raises when the caller cannot take a set.
///
/// # Safety
/// `fcinfo` is the call's; each datum of `row` is of its column's type.
pub unsafe fn answer<const N: usize>(
    fcinfo: pg_sys::FunctionCallInfo,
    cell: &'static DescCell,
    cols: &[(&CStr, pg_sys::Oid); N],
    row: [(pg_sys::Datum, bool); N],
    function: &str,
) -> pg_sys::Datum {
    let desc = desc(cell, cols);
    let mut values = row.map(|c| c.0);
    let mut nulls = row.map(|c| c.1);
    unsafe {
        let rsinfo = (*fcinfo).resultinfo.cast::<pg_sys::ReturnSetInfo>();
        if rsinfo.is_null() || (*rsinfo).type_ != pg_sys::NodeTag::T_ReturnSetInfo {
            crate::error::LimitsError::invalid(
                format!("{function} was called in a context that cannot accept a set"),
                format!("call it as SELECT * FROM meshhook_limits.{function}(...)"),
            )
            .raise();
        }
        (*rsinfo).isDone = pg_sys::ExprDoneCond::ExprSingleResult;
        let tuple = pg_sys::heap_form_tuple(desc, values.as_mut_ptr(), nulls.as_mut_ptr());
        pg_sys::Datum::from((*tuple).t_data)
    }
}

/// A datum and its null flag, for `one_row`.
pub fn datum<T: pgrx::IntoDatum>(v: T) -> (pg_sys::Datum, bool) {
    match v.into_datum() {
        Some(d) => (d, false),
        None => (pg_sys::Datum::from(0), true),
    }
}

/// Declares the V1 calling convention of a hand-written C function.
#[macro_export]
macro_rules! finfo_v1 {
    ($finfo:ident) => {
        #[no_mangle]
        #[doc(hidden)]
        pub extern "C" fn $finfo() -> &'static pgrx::pg_sys::Pg_finfo_record {
            const V1_API: pgrx::pg_sys::Pg_finfo_record =
                pgrx::pg_sys::Pg_finfo_record { api_version: 1 };
            &V1_API
        }
    };
}

/// Text argument `n` of a hand-written C function as UTF-8: None for NULL,
/// 22023 for bytes that are not UTF-8 (a SQL_ASCII database stores any), never
/// a panic.
///
/// # Safety
/// `fcinfo` is the call's and argument `n` is of type text.
pub unsafe fn text_arg<'a>(
    fcinfo: pg_sys::FunctionCallInfo,
    n: usize,
    name: &str,
) -> crate::error::Result<Option<&'a str>> {
    unsafe {
        let arg = (*fcinfo).args.as_slice(n + 1)[n];
        if arg.isnull {
            return Ok(None);
        }
        <Utf8 as pgrx::FromDatum>::from_polymorphic_datum(arg.value, false, pg_sys::InvalidOid)
            .map(|text| text.get(name))
            .transpose()
    }
}

/// A `text` argument of a `#[pg_extern]` function, read without pgrx's
/// `&str` conversion, which panics (XX000) on bytes that are not UTF-8 (a
/// SQL_ASCII or LATIN1 database takes them). `get` turns them into 22023.
pub struct Utf8<'a>(Option<&'a str>);

impl<'a> Utf8<'a> {
    /// The text, or 22023 naming the argument when it is not UTF-8.
    pub fn get(&self, name: &str) -> crate::error::Result<&'a str> {
        self.0.ok_or_else(|| {
            crate::error::LimitsError::invalid(
                format!("{name} is not valid UTF-8"),
                "pass text in UTF-8 (the database's encoding may take any bytes; this argument may not)",
            )
        })
    }
}

/// `Option<Utf8>` as `Option<&str>`, or 22023.
pub fn utf8<'a>(arg: &Option<Utf8<'a>>, name: &str) -> crate::error::Result<Option<&'a str>> {
    arg.as_ref().map(|a| a.get(name)).transpose()
}

impl pgrx::FromDatum for Utf8<'_> {
    unsafe fn from_polymorphic_datum(
        datum: pg_sys::Datum,
        is_null: bool,
        _typoid: pg_sys::Oid,
    ) -> Option<Self> {
        if is_null {
            return None;
        }
        unsafe {
            let v = pg_sys::pg_detoast_datum_packed(datum.cast_mut_ptr());
            Some(Utf8(pgrx::varlena::text_to_rust_str(v).ok()))
        }
    }
}

unsafe impl<'fcx> pgrx::callconv::ArgAbi<'fcx> for Utf8<'fcx> {
    unsafe fn unbox_arg_unchecked(arg: pgrx::callconv::Arg<'_, 'fcx>) -> Self {
        let index = arg.index();
        unsafe {
            arg.unbox_arg_using_from_datum()
                .unwrap_or_else(|| panic!("argument {index} must not be null"))
        }
    }

    unsafe fn unbox_nullable_arg(
        arg: pgrx::callconv::Arg<'_, 'fcx>,
    ) -> pgrx::nullable::Nullable<Self> {
        unsafe { arg.unbox_arg_using_from_datum().into() }
    }
}

pgrx::impl_sql_translatable!(Utf8<'_>, arg_only = "TEXT");

/// A `jsonb` value read through SPI and answered as it is, never converted
/// to Rust: pgrx's `JsonB` goes through UTF-8 text, which fails (XX000) on
/// any non-ASCII text in a database whose encoding is not UTF-8 (LATIN1,
/// SQL_ASCII). claim_jobs returns each job's data this way, and
/// `_read_as_owner` its reads of queue tables: data an enqueuer wrote must
/// not break the claims, or the health, of a whole queue.
pub struct RawJsonb(pg_sys::Datum);

impl RawJsonb {
    /// Column `n` (a jsonb column) of the current row of an SPI result,
    /// None for NULL: copied, detoasted, into memory context `cx`, which
    /// must outlive the answer (the calling function's: SPI's own memory
    /// is gone once SPI is left, and the transaction's lasts too long for a
    /// worker that claims in a loop).
    pub fn copy(
        rows: &pgrx::spi::SpiTupleTable,
        n: usize,
        cx: pg_sys::MemoryContext,
    ) -> Result<Option<Self>, pgrx::spi::SpiError> {
        let oid = rows.column_type_oid(n)?.value();
        if oid != pg_sys::JSONBOID {
            return Err(pgrx::spi::SpiError::DatumError(
                pgrx::datum::TryFromDatumError::IncompatibleTypes {
                    rust_type: "RawJsonb",
                    rust_oid: pg_sys::JSONBOID,
                    datum_type: format!("{oid:?}"),
                    datum_oid: oid,
                },
            ));
        }
        Ok(rows.get_datum_by_ordinal(n)?.map(|d| {
            // SAFETY: a non-null jsonb datum of the current row; `cx` is
            // a live memory context (the caller's).
            let copy = unsafe {
                let old = pg_sys::MemoryContextSwitchTo(cx);
                let copy = pg_sys::pg_detoast_datum_copy(d.cast_mut_ptr());
                pg_sys::MemoryContextSwitchTo(old);
                copy
            };
            RawJsonb(pg_sys::Datum::from(copy))
        }))
    }
}

impl pgrx::IntoDatum for RawJsonb {
    fn into_datum(self) -> Option<pg_sys::Datum> {
        Some(self.0)
    }

    fn type_oid() -> pg_sys::Oid {
        pg_sys::JSONBOID
    }
}

// SAFETY: the datum is a jsonb value in a context that outlives the call.
unsafe impl pgrx::callconv::BoxRet for RawJsonb {
    unsafe fn box_into<'fcx>(
        self,
        fcinfo: &mut pgrx::callconv::FcInfo<'fcx>,
    ) -> pgrx::datum::Datum<'fcx> {
        unsafe { fcinfo.return_raw_datum(self.0) }
    }
}

pgrx::impl_sql_translatable!(RawJsonb, "jsonb");
