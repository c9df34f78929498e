//! The one error type of the crate, mapped once to SQLSTATE, message and hint.
use pgrx::pg_sys::panic::ErrorReport;
use pgrx::{PgLogLevel, PgSqlErrorCode};

#[derive(Debug, thiserror::Error)]
pub enum LimitsError {
    /// 22023: an argument is missing or out of range.
    #[error("{msg}")]
    InvalidParameter { msg: String, hint: String },
    /// 42501: the caller may not act for this tenant or change configuration.
    #[error("{msg}")]
    Forbidden { msg: String, hint: String },
    /// 55000: the library is not in shared_preload_libraries.
    #[error("meshhook_limits is not loaded through shared_preload_libraries")]
    NotPreloaded,
    /// 53400: the shared slot table is full.
    #[error("the shared execution-slot table is full ({0} slots)")]
    SlotTableFull(usize),
    /// 25006: a hot standby keeps no slots and spends no rate: its counts
    /// would be its own, apart from the primary's.
    #[error("{0} is not available on a hot standby")]
    Standby(&'static str),
    /// 0A000: slots were acquired or released in a transaction being prepared.
    #[error("execution slots and limits cannot be changed in a transaction that is prepared (two-phase commit)")]
    PreparedTransaction,
    /// 54000: a read as another table's owner ran past
    /// meshhook_limits.queue_read_timeout.
    #[error("{msg}")]
    TooSlow { msg: String, hint: String },
    /// XX000: an internal query failed.
    #[error("internal query failed: {0}")]
    Spi(#[from] pgrx::spi::SpiError),
}

pub type Result<T> = std::result::Result<T, LimitsError>;

impl LimitsError {
    pub fn invalid(msg: impl Into<String>, hint: impl Into<String>) -> Self {
        LimitsError::InvalidParameter {
            msg: msg.into(),
            hint: hint.into(),
        }
    }

    pub fn forbidden(msg: impl Into<String>, hint: impl Into<String>) -> Self {
        LimitsError::Forbidden {
            msg: msg.into(),
            hint: hint.into(),
        }
    }

    fn code(&self) -> PgSqlErrorCode {
        match self {
            LimitsError::InvalidParameter { .. } => PgSqlErrorCode::ERRCODE_INVALID_PARAMETER_VALUE,
            LimitsError::Forbidden { .. } => PgSqlErrorCode::ERRCODE_INSUFFICIENT_PRIVILEGE,
            LimitsError::NotPreloaded => PgSqlErrorCode::ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
            LimitsError::SlotTableFull(_) => PgSqlErrorCode::ERRCODE_CONFIGURATION_LIMIT_EXCEEDED,
            LimitsError::PreparedTransaction => PgSqlErrorCode::ERRCODE_FEATURE_NOT_SUPPORTED,
            LimitsError::Standby(_) => PgSqlErrorCode::ERRCODE_READ_ONLY_SQL_TRANSACTION,
            LimitsError::TooSlow { .. } => PgSqlErrorCode::ERRCODE_PROGRAM_LIMIT_EXCEEDED,
            LimitsError::Spi(_) => PgSqlErrorCode::ERRCODE_INTERNAL_ERROR,
        }
    }

    fn hint(&self) -> Option<String> {
        match self {
            LimitsError::InvalidParameter { hint, .. }
            | LimitsError::Forbidden { hint, .. }
            | LimitsError::TooSlow { hint, .. } => {
                (!hint.is_empty()).then(|| hint.clone())
            }
            LimitsError::NotPreloaded => Some(
                "add meshhook_limits to shared_preload_libraries in postgresql.conf and restart the server"
                    .into(),
            ),
            LimitsError::SlotTableFull(_) => {
                Some("release finished slots, or lower the lease so abandoned slots are reclaimed sooner".into())
            }
            LimitsError::Standby(_) => {
                Some("call it on the primary: limits are counted there, once for the cluster".into())
            }
            LimitsError::PreparedTransaction => Some(
                "acquire and release slots in their own transaction, outside PREPARE TRANSACTION".into(),
            ),
            LimitsError::Spi(_) => None,
        }
    }

    /// Report as a PostgreSQL WARNING (its SQLSTATE, message and hint), and
    /// go on.
    pub fn warn(&self) {
        let mut report = ErrorReport::new(self.code(), self.to_string(), "meshhook_limits");
        if let Some(h) = self.hint() {
            report = report.set_hint(h);
        }
        report.report(PgLogLevel::WARNING);
    }

    /// Raise as a PostgreSQL ERROR. Does not return.
    pub fn raise(self) -> ! {
        let hint = self.hint();
        raise_report(self.code(), self.to_string(), None, hint)
    }
}

/// Raise an ERROR with this SQLSTATE, message, detail and hint.
fn raise_report(
    code: PgSqlErrorCode,
    message: String,
    detail: Option<String>,
    hint: Option<String>,
) -> ! {
    let mut report = ErrorReport::new(code, message, "meshhook_limits");
    if let Some(d) = detail {
        report = report.set_detail(d);
    }
    if let Some(h) = hint {
        report = report.set_hint(h);
    }
    report.report(PgLogLevel::ERROR);
    unreachable!("ERROR does not return")
}

/// Unwrap a result at the SQL boundary, raising the error with its SQLSTATE.
pub trait OrRaise<T> {
    fn or_raise(self) -> T;
}

impl<T> OrRaise<T> for Result<T> {
    fn or_raise(self) -> T {
        match self {
            Ok(v) => v,
            Err(e) => e.raise(),
        }
    }
}

/// pgrx puts a Rust backtrace into the DETAIL of every error that crosses
/// one of its guards when the server's environment asks for backtraces
/// (`RUST_BACKTRACE`, as a developer's shell often sets). Callers get
/// PostgreSQL errors, never Rust backtraces: unless `RUST_LIB_BACKTRACE` is
/// set explicitly (a developer debugging the library), switch them off.
/// Called from `_PG_init`, while the process is single-threaded.
pub fn no_backtraces_for_callers() {
    if std::env::var_os("RUST_LIB_BACKTRACE").is_none() {
        std::env::set_var("RUST_LIB_BACKTRACE", "0");
    }
}

/// Run `f` (a call into SQL that may raise, such as a definer slow path
/// reached through SPI) and re-raise any error it raises as it was: same
/// SQLSTATE, message, detail and hint.
///
/// One error is made clearer: a function or table of the extension that does
/// not exist. That happens between installing a new library and `ALTER
/// EXTENSION meshhook_limits UPDATE`, when this library calls SQL that only
/// its own version installs.
pub fn passthrough<T>(f: impl FnOnce() -> T) -> T {
    use pgrx::pg_sys::panic::CaughtError;
    pgrx::PgTryBuilder::new(std::panic::AssertUnwindSafe(f))
        .catch_others(|e| match e {
            CaughtError::PostgresError(r) => {
                let missing = matches!(
                    r.sql_error_code(),
                    PgSqlErrorCode::ERRCODE_UNDEFINED_FUNCTION
                        | PgSqlErrorCode::ERRCODE_UNDEFINED_TABLE
                        | PgSqlErrorCode::ERRCODE_UNDEFINED_COLUMN
                ) && r.message().contains("meshhook_limits.");
                if missing {
                    raise_report(
                        PgSqlErrorCode::ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
                        format!(
                            "the meshhook_limits library ({}) is newer than this database's extension: {}",
                            env!("CARGO_PKG_VERSION"),
                            r.message()
                        ),
                        None,
                        Some("Run ALTER EXTENSION meshhook_limits UPDATE in this database.".into()),
                    )
                }
                raise_report(
                    r.sql_error_code(),
                    r.message().to_string(),
                    r.detail().map(str::to_string),
                    r.hint().map(str::to_string),
                )
            }
            other => other.rethrow(),
        })
        .execute()
}

/// 25006 on a hot standby (see `LimitsError::Standby`).
pub fn refuse_on_standby(what: &'static str) -> Result<()> {
    if unsafe { pgrx::pg_sys::RecoveryInProgress() } {
        return Err(LimitsError::Standby(what));
    }
    Ok(())
}
