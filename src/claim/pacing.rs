//! The pace of the tenant scan, shared by every backend claiming from one
//! binding: when the next chunk of the scan is due, in shared memory.
//!
//! Each backend keeps its own run queue and scans for it in chunks, the
//! next chunk due ten times as long after the last as it took
//! (`runqueue`). That bounds the scanning of one backend to a tenth of its
//! time; but workers spend most of theirs waiting (on their own client, on
//! the commit's WAL flush), so eight claiming backends each scanning a
//! tenth of the time spent most of the CPU scanning (measured: 26% of all
//! of it at 10,000 tenants, claim_jobs at 0.65 of pg-boss's fetch). With
//! the pace shared, all of a binding's backends together scan about a
//! tenth of the time, whichever backend's turn it is. Their cursors are
//! apart, so a range of tenants is rescanned about as often as by one
//! backend alone.
//!
//! A backend's own pace still applies, and the shared one does not hold
//! back a backend whose run queue is empty (`pass::Pass::chunk_due`).
//! It does hold back a new backend's first pass: exempted, eight workers
//! started together each scanned all 100,000 tenants at their own pace
//! (claim_jobs at 0.45 of pg-boss's fetch, against 0.74 paced).
//!
//! The clocks are a small open-addressed table keyed by (database,
//! binding). A clock not pushed for a minute may be taken over by another
//! binding; a binding that finds no clock keeps its own pace only (as
//! before this table).
use pgrx::pg_sys;
use std::sync::atomic::{AtomicI64, AtomicPtr, AtomicU64, Ordering};

/// Clocks (a power of two), and how far from its home a binding's clock may be.
const CLOCKS: usize = 256;
const PROBES: usize = 8;
/// A clock not pushed for this long may be taken over.
const STALE_MICROS: i64 = 60_000_000;

#[repr(C)]
struct Clock {
    /// (database << 32) | binding id's low 32 bits; 0: free.
    key: AtomicU64,
    /// When the binding's next chunk is due, for any backend (a timestamp).
    next_at: AtomicI64,
}

static CLOCKS_AT: AtomicPtr<Clock> = AtomicPtr::new(std::ptr::null_mut());

pub static SEGMENT: crate::shmem::Segment = crate::shmem::Segment { request, startup };

unsafe fn request() {
    unsafe { pg_sys::RequestAddinShmemSpace(std::mem::size_of::<[Clock; CLOCKS]>()) };
}

unsafe fn startup() {
    let (clocks, _) = unsafe {
        crate::shmem::init_struct::<[Clock; CLOCKS]>(c"meshhook_limits claim scan pacing")
    };
    CLOCKS_AT.store(clocks.cast::<Clock>(), Ordering::Release);
}

fn clocks() -> Option<&'static [Clock; CLOCKS]> {
    let p = CLOCKS_AT.load(Ordering::Acquire);
    // SAFETY: set once by the startup hook; shared memory outlives the process.
    (crate::shmem::preloaded() && !p.is_null()).then(|| unsafe { &*p.cast::<[Clock; CLOCKS]>() })
}

fn key_of(binding: i64) -> u64 {
    (u64::from(crate::shmem::my_database()) << 32) | (binding as u64 & 0xffff_ffff)
}

/// The clock of this binding in this database, taking a free or stale one
/// if it has none yet; None when every clock it may use is someone else's.
fn clock(binding: i64, now: i64) -> Option<&'static Clock> {
    let clocks = clocks()?;
    let key = key_of(binding);
    if key >> 32 == 0 {
        return None; // not connected to a database
    }
    let home = (key.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 56) as usize;
    let mut free = None;
    for i in 0..PROBES {
        let c = &clocks[(home + i) & (CLOCKS - 1)];
        let k = c.key.load(Ordering::Acquire);
        if k == key {
            return Some(c);
        }
        let stale = now.saturating_sub(c.next_at.load(Ordering::Relaxed)) > STALE_MICROS;
        if free.is_none() && (k == 0 || stale) {
            free = Some((c, k));
        }
    }
    let (c, k) = free?;
    match c
        .key
        .compare_exchange(k, key, Ordering::AcqRel, Ordering::Acquire)
    {
        Ok(_) => {
            c.next_at.store(0, Ordering::Release);
            Some(c)
        }
        // Another backend took it first: for this binding if it was ours.
        Err(now_key) => (now_key == key).then_some(c),
    }
}

/// When the binding's next chunk is due for any backend (None: no shared
/// pace, only the backend's own).
pub(super) fn next_at(binding: i64, now: i64) -> Option<i64> {
    let at = clock(binding, now)?.next_at.load(Ordering::Acquire);
    // Set before the clock moved back: not a pace.
    (at <= now.saturating_add(STALE_MICROS)).then_some(at)
}

/// A chunk was scanned: the next is due for any backend no sooner than `at`.
pub(super) fn push(binding: i64, at: i64) {
    let now = unsafe { pg_sys::GetCurrentTimestamp() };
    if let Some(c) = clock(binding, now) {
        c.next_at.fetch_max(at, Ordering::AcqRel);
    }
}

#[cfg(any(test, feature = "pg_test"))]
#[pgrx::pg_schema]
mod tests {
    use super::{clock, next_at, push, CLOCKS, STALE_MICROS};
    use pgrx::prelude::*;

    /// One test, in order: the clocks are shared by the whole server.
    #[pg_test]
    fn each_binding_has_a_clock_that_only_moves_forward_while_there_are_clocks() {
        let t = unsafe { pg_sys::GetCurrentTimestamp() };
        push(1_000_001, t + 5_000);
        push(1_000_001, t + 1_000); // an earlier push does not move it back
        assert_eq!(next_at(1_000_001, t), Some(t + 5_000));
        assert_eq!(next_at(1_000_002, t), Some(0));
        // Set before the time moved back: not a pace.
        push(1_000_003, t + 2 * STALE_MICROS);
        assert_eq!(next_at(1_000_003, t), None);
        // More bindings than clocks, all fresh: some find none (their own
        // pace only), and no clock is shared by two.
        let found = (0..2 * CLOCKS as i64)
            .filter(|b| {
                push(2_000_000 + b, t + 1_000);
                clock(2_000_000 + b, t).is_some()
            })
            .count();
        assert!(found < CLOCKS, "{found}");
        assert_eq!(next_at(1_000_001, t), Some(t + 5_000));
        // A minute later they are stale: a new binding takes one.
        assert_eq!(next_at(3_000_000, t + STALE_MICROS + 10_000), Some(0));
    }
}
