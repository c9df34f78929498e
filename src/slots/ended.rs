//! The end of a claimed job, seen by the queue itself: the row trigger
//! bind_queue puts on a bound queue's table releases the job's slot in the
//! transaction that ends the job. The tick (`_end_claims`) catches what no
//! trigger sees: a pgmq message whose visibility timeout passed.
use super::counters;
use super::table::{self, LockedTable};
use super::xact::{self, Op};
use crate::shmem;
use pgrx::datum::Uuid;
use pgrx::prelude::*;

/// The job whose end fired `_claim_ended`, as its claim's run id spells it
/// after the binding: the pg-boss job id, or the pgmq `msg_id/read_ct`.
fn ended_job(trigger: &PgTrigger, pgmq: bool) -> Option<String> {
    let old = trigger.old()?;
    if pgmq {
        let msg = old.get_by_name::<i64>("msg_id").ok()??;
        let read = old.get_by_name::<i32>("read_ct").ok()??;
        Some(format!("{msg}/{read}"))
    } else {
        Some(old.get_by_name::<Uuid>("id").ok()??.to_string())
    }
}

/// The row trigger bind_queue puts on a bound queue's table: a claimed job
/// that ends (pg-boss: an active job updated to another state, or deleted,
/// as fail and expiry do; pgmq: a message deleted or archived) releases its
/// slot when the transaction that ended it commits. Arguments: the binding
/// id and the source. Shared memory only: no SQL runs in the queue's
/// statement. EXECUTE is revoked from PUBLIC, so only the extension's owner
/// can attach it (bind_queue); it also checks the table's schema.
#[pg_trigger]
fn _claim_ended<'a>(
    trigger: &'a PgTrigger<'a>,
) -> std::result::Result<
    Option<PgHeapTuple<'a, pgrx::AllocatedByPostgres>>,
    pgrx::heap_tuple::PgHeapTupleError,
> {
    let args = trigger.extra_args().unwrap_or_default();
    let (Some(binding), Some(source)) = (
        args.first().and_then(|b| b.parse::<i64>().ok()),
        args.get(1),
    ) else {
        return Ok(None);
    };
    let pgmq = source == "pgmq";
    let schema_ok = trigger
        .table_schema()
        .is_ok_and(|s| s == if pgmq { "pgmq" } else { "pgboss" });
    let job = ended_job(trigger, pgmq);
    let (true, Some(job), true) = (schema_ok, job, table::available()) else {
        return Ok(None);
    };
    let digest = counters::claim_digest(binding, &job);
    let found = LockedTable::shared().and_then(|mut l| {
        let idx = l.table().claimed(shmem::my_database(), &digest)?;
        Some((idx, l.table().slots[idx].id))
    });
    if let Some((idx, id)) = found {
        if !xact::pending(&id, Op::Release) {
            xact::push(idx, id, Op::Release);
        }
    }
    Ok(None)
}

pgrx::extension_sql!(
    "REVOKE EXECUTE ON FUNCTION meshhook_limits._claim_ended() FROM PUBLIC;",
    name = "claim_ended_grants",
    requires = [_claim_ended]
);
