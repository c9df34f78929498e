//! Waiting for room: `acquire_execution_slot(..., wait => interval)`.
//!
//! A waiter takes an entry in the slot table's `waiters` (its tenant and a
//! ticket in order of arrival) and retries `acquire` whenever a slot stops
//! counting (the table's condition variable; `Table::count_out` broadcasts),
//! or when the earliest slot in its way ends by lease or deadline, never
//! spinning. Between tries it holds no lock of ours; its sleep is
//! interrupted by statement_timeout and pg_cancel_backend like any wait.
//!
//! Order among waiters (`defer`, under the table's lock):
//! - within a tenant, first come first served: a waiter lets an earlier
//!   waiter of its tenant go first, unless that one is held by its own
//!   project or key limit;
//! - across tenants, when they compete for `concurrent_executions_total`:
//!   the waiter whose tenant runs fewest slots goes first, then the earlier.
//!
//! A call without `wait` is not a waiter and takes any room it finds.
use super::admission::{count_refusal, Admission};
use super::clock::now;
use super::counters::CounterKey;
use super::table::{self, LockedTable, Table, Waiter};
use crate::error::{LimitsError, Result};
use crate::shmem;
use pgrx::datum::Interval;
use pgrx::pg_sys;
use std::cell::Cell;

/// The longest wait one call may ask for.
pub const MAX_WAIT_MICROS: i64 = 3_600_000_000;
/// A waiter retries at least this often (slots can also end by lease).
const MAX_SLEEP_MILLIS: i64 = 250;

thread_local! {
    /// The waiters entry of this backend while it waits.
    static CURRENT: Cell<Option<usize>> = const { Cell::new(None) };
    static EXIT_HOOK: Cell<bool> = const { Cell::new(false) };
}

/// This backend's waiters entry, while `acquire_waiting` runs.
pub(super) fn current() -> Option<usize> {
    CURRENT.with(|c| c.get())
}

fn reason_code(reason: &str) -> u8 {
    table::REFUSAL_REASONS
        .iter()
        .position(|r| *r == reason)
        .map_or(0, |i| i as u8 + 1)
}

/// Under the table's lock, with room for waiter `w`: the reason to let
/// another waiter go first, if any (see the module docs).
pub(super) fn defer(t: &Table, w: usize, total_capped: bool) -> Option<&'static str> {
    let me = t.waiters[w];
    let (tenant_full, total_full) = (reason_code("tenant_limit"), reason_code("total_limit"));
    let recovering = reason_code("recovering");
    let runs = |tenant: &[u8; 16]| t.count(&CounterKey::tenant(me.database, tenant));
    let mine = runs(&me.tenant);
    for o in t
        .waiters
        .iter()
        .filter(|o| o.pid != 0 && o.database == me.database)
    {
        if o.ticket == me.ticket {
            continue;
        }
        if o.tenant == me.tenant
            && o.ticket < me.ticket
            && [0, tenant_full, total_full, recovering].contains(&o.last_refusal)
        {
            return Some("tenant_limit");
        }
        if total_capped
            && o.tenant != me.tenant
            && o.last_refusal == total_full
            && (runs(&o.tenant), o.ticket) < (mine, me.ticket)
        {
            return Some("total_limit");
        }
    }
    None
}

/// Under the table's lock: waiter `w` was refused for `reason`.
pub(super) fn note_refusal(t: &mut Table, w: usize, reason: &str) {
    t.waiters[w].last_refusal = reason_code(reason);
}

#[pgrx::pg_guard]
unsafe extern "C-unwind" fn on_exit(_code: i32, _arg: pg_sys::Datum) {
    if let Some(w) = current() {
        unregister(w);
    }
}

fn register(tenant: &pgrx::Uuid) -> Option<usize> {
    if !EXIT_HOOK.with(|h| h.replace(true)) {
        // A backend terminated while waiting leaves no entry behind.
        unsafe { pg_sys::before_shmem_exit(Some(on_exit), pg_sys::Datum::from(0)) };
    }
    let (db, cap) = (shmem::my_database(), crate::gucs::tenant_waiters());
    let mut l = LockedTable::exclusive()?;
    let t = l.table();
    // No tenant takes every entry: past its share, its call tries once.
    let its = t
        .waiters
        .iter()
        .filter(|w| w.pid != 0 && w.database == db && w.tenant == *tenant.as_bytes())
        .count();
    if its >= cap {
        return None;
    }
    let w = t.waiters.iter().position(|w| w.pid == 0)?;
    t.header.next_ticket += 1;
    t.waiters[w] = Waiter {
        pid: unsafe { pg_sys::MyProcPid },
        database: db,
        tenant: *tenant.as_bytes(),
        ticket: t.header.next_ticket,
        last_refusal: 0,
    };
    t.header.waiting += 1;
    Some(w)
}

fn unregister(w: usize) {
    CURRENT.with(|c| c.set(None));
    if let Some(mut l) = LockedTable::exclusive() {
        let t = l.table();
        if t.waiters[w].pid == unsafe { pg_sys::MyProcPid } {
            t.waiters[w].pid = 0;
            t.header.waiting = t.header.waiting.saturating_sub(1);
            // The next in line may be able to go now.
            unsafe { pg_sys::ConditionVariableBroadcast(&raw mut t.header.wakeup) };
        }
    }
}

/// The wait a caller asked for, in microseconds (22023 outside 0..1 hour).
pub fn wait_micros(wait: &Interval) -> Result<i64> {
    let m = i64::try_from(wait.as_micros()).unwrap_or(i64::MAX);
    if !(0..=MAX_WAIT_MICROS).contains(&m) {
        return Err(LimitsError::invalid(
            "wait must be between 0 and 1 hour",
            "pass how long to wait for room, e.g. wait => '5 seconds'",
        ));
    }
    Ok(m)
}

/// Try `attempt` until it grants or `wait_micros` have passed, sleeping on
/// the slot table's condition variable in between. Returns the last answer.
pub fn acquire_waiting(
    tenant: &pgrx::Uuid,
    wait_micros: i64,
    attempt: impl Fn() -> Admission,
) -> Admission {
    let deadline = now().saturating_add(wait_micros);
    let Some(w) = (wait_micros > 0 && table::available())
        .then(|| register(tenant))
        .flatten()
    else {
        // No wait asked for, no shared memory, or every entry taken: one try.
        return attempt();
    };
    CURRENT.with(|c| c.set(Some(w)));
    let attempt = std::panic::AssertUnwindSafe(attempt);
    let answer = pgrx::PgTryBuilder::new(|| loop {
        let f = &attempt;
        let answer = (f.0)();
        let now = now();
        if answer.granted || now >= deadline {
            return answer;
        }
        let until_retry = answer
            .retry_after
            .as_ref()
            .map_or(MAX_SLEEP_MILLIS, |r| r.as_micros() as i64 / 1000);
        let sleep = ((deadline - now) / 1000)
            .min(until_retry)
            .clamp(1, MAX_SLEEP_MILLIS);
        if let Some(cv) = table::wakeup() {
            // SAFETY: the table's condition variable lives in shared memory;
            // the sleep checks for interrupts (statement_timeout, cancel).
            unsafe {
                pg_sys::ConditionVariableTimedSleep(cv, sleep, pg_sys::PG_WAIT_EXTENSION);
            }
        }
    })
    .finally(|| {
        unsafe { pg_sys::ConditionVariableCancelSleep() };
        unregister(w);
    })
    .execute();
    if !answer.granted {
        // Only the final refusal counts, not every try in between.
        count_refusal(answer.reason.as_deref().unwrap_or(""));
    }
    answer
}
