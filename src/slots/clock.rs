//! The time slots are measured in: PostgreSQL's clock (`TimestampTz`,
//! microseconds), and the timestamps the SQL functions answer.
use pgrx::prelude::*;

pub(super) type Ts = TimestampWithTimeZone;

pub(super) fn now() -> i64 {
    unsafe { pg_sys::GetCurrentTimestamp() }
}

/// A time of the table as SQL answers it; None for i64::MAX (no deadline).
pub(super) fn ts(micros: i64) -> Option<Ts> {
    if micros == i64::MAX {
        None
    } else {
        Ts::try_from(micros).ok()
    }
}
