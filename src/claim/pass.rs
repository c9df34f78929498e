//! When a backend looks for the tenants with a job due, for one binding's
//! run queue (`runqueue`): the passes of the skip scan over the tenants, a
//! chunk at a time, and the reads of the due jobs that can stand for a
//! whole pass.
//!
//! The next chunk is due `RESCAN_FACTOR` times as long after the last as it
//! took, and a new pass no sooner than `RESCAN_MIN_MICROS` after the last
//! began (or at once, mid-pass, when the run queue has run empty), and no
//! sooner than the binding's shared clock allows (`pacing`): all of its
//! claiming backends together scan about a tenth of the time.
//!
//! A new pass first reads the jobs due, from an index on when jobs are due
//! (`queue::due_tenants`), at most half as many as the last pass probed
//! tenants (`DUE_READ_MIN` to `SCAN_CHUNK`; none when it probed fewer than
//! `DUE_READ_MIN`: scanning them is cheaper): with fewer due, that read is
//! the whole pass, and tenants whose jobs are all deferred cost nothing. A
//! read that found as many as it might is followed by a scan, and the next
//! read waits 1, 3, 7 … 63 passes (`DUE_READ_MAX_BACKOFF`).
use super::pacing;
use super::queue::SCAN_CHUNK;

/// A pass of the scan starts this long after the last one at the soonest.
const RESCAN_MIN_MICROS: i64 = 100_000;
/// The next chunk of the scan is due this many times as long after the
/// last one as it took.
const RESCAN_FACTOR: i64 = 10;
/// Due jobs a read of them may read at the least, and the most passes
/// (2^n - 1) it waits after reading as many as it might.
const DUE_READ_MIN: usize = 256;
const DUE_READ_MAX_BACKOFF: u32 = 6;

#[derive(Default)]
pub(super) struct Pass {
    /// The binding it is for (the scan's shared pace, `pacing`).
    binding: i64,
    /// Where the next chunk starts (after this spelling); None: a new pass.
    cursor: Option<String>,
    /// When the current pass began, and when the next chunk is due
    /// (timestamps; None: no chunk yet).
    started_at: i64,
    next_chunk_at: Option<i64>,
    /// Tenants the current pass has probed, and the last whole pass that
    /// scanned (None: none yet).
    probed: usize,
    last_probed: Option<usize>,
    /// Reads of the due jobs that found as many as they might, in a row,
    /// and the passes still to go before the next is tried.
    due_misses: u32,
    due_skips: u32,
}

impl Pass {
    pub(super) fn new(binding: i64) -> Self {
        Pass {
            binding,
            ..Default::default()
        }
    }

    /// Nothing looked for yet.
    pub(super) fn first(&self) -> bool {
        self.next_chunk_at.is_none()
    }

    /// Where the next chunk of the scan starts, if one is due before this
    /// claim ('' for a new pass); `empty`: the run queue has no tenant to
    /// serve.
    pub(super) fn chunk_due(&self, now: i64, empty: bool) -> Option<String> {
        let after = || Some(self.cursor.clone().unwrap_or_default());
        let Some(next) = self.next_chunk_at else {
            return after();
        };
        let mid_pass = self.cursor.is_some();
        if now < self.started_at // the clock moved back
            || (empty && (mid_pass || now.saturating_sub(self.started_at) >= RESCAN_MIN_MICROS))
        {
            return after();
        }
        // Its own pace, and the binding's (all its claiming backends
        // together, `pacing`).
        if now >= next && pacing::next_at(self.binding, now).is_none_or(|at| now >= at) {
            return after();
        }
        None
    }

    /// Where the next chunk of the current pass starts, if a pass is under
    /// way.
    pub(super) fn mid_pass(&self) -> Option<String> {
        self.cursor.clone()
    }

    /// How many due jobs a new pass may read instead of scanning (None:
    /// scan this pass). Not when the last pass probed fewer tenants than
    /// the least read would read jobs: scanning them costs less.
    pub(super) fn due_read_limit(&mut self) -> Option<i32> {
        if self.due_skips > 0 {
            self.due_skips -= 1;
            return None;
        }
        if self.last_probed.is_some_and(|p| p < DUE_READ_MIN) {
            return None;
        }
        let probed = self.last_probed.unwrap_or(SCAN_CHUNK);
        Some((probed / 2).clamp(DUE_READ_MIN, SCAN_CHUNK) as i32)
    }

    /// A read of the due jobs found as many as it might: more may be due,
    /// and this pass scans.
    pub(super) fn due_read_missed(&mut self) {
        self.due_misses = (self.due_misses + 1).min(DUE_READ_MAX_BACKOFF);
        self.due_skips = (1 << self.due_misses) - 1;
    }

    /// What was looked at, begun at `at`: a chunk of the scan from `after`
    /// ('' for a new pass) to `last` (None: to the end) that probed
    /// `probed` tenants, or a read of the due jobs (`probed` None), a whole
    /// pass. The next chunk is due after it.
    pub(super) fn looked(
        &mut self,
        after: &str,
        last: Option<String>,
        probed: Option<usize>,
        at: i64,
    ) {
        if after.is_empty() {
            self.started_at = at;
            self.probed = 0;
        }
        match probed {
            Some(n) => {
                self.probed += n;
                if last.is_none() {
                    self.last_probed = Some(self.probed);
                }
            }
            None => self.due_misses = 0,
        }
        let took = unsafe { pgrx::pg_sys::GetCurrentTimestamp() }
            .saturating_sub(at)
            .max(0);
        let mut next = at.saturating_add(took.saturating_mul(RESCAN_FACTOR));
        pacing::push(self.binding, next);
        if last.is_none() {
            next = next.max(self.started_at.saturating_add(RESCAN_MIN_MICROS));
        }
        self.cursor = last;
        self.next_chunk_at = Some(next);
    }
}

#[cfg(any(test, feature = "pg_test"))]
#[pgrx::pg_schema]
mod tests {
    use super::{Pass, DUE_READ_MIN, SCAN_CHUNK};
    use pgrx::prelude::*;

    /// How much a read of the due jobs may read, and when after a miss.
    #[pg_test]
    fn a_due_read_is_sized_by_the_last_scan_and_backs_off_after_misses() {
        let mut p = Pass::new(-1);
        assert_eq!(p.due_read_limit(), Some((SCAN_CHUNK / 2) as i32));
        // Misses in a row: the next read 1, 3, 7 ... passes later.
        for skipped in [1, 3, 7] {
            p.due_read_missed();
            for _ in 0..skipped {
                assert_eq!(p.due_read_limit(), None);
            }
            assert!(p.due_read_limit().is_some());
        }
        for _ in 0..10 {
            p.due_read_missed();
        }
        assert_eq!((0..63).filter(|_| p.due_read_limit().is_none()).count(), 63);
        assert!(p.due_read_limit().is_some());
        // A read that found every due job: the next miss backs off one pass.
        let t = unsafe { pg_sys::GetCurrentTimestamp() };
        p.looked("", None, None, t);
        p.due_read_missed();
        assert_eq!(p.due_read_limit(), None);
        assert!(p.due_read_limit().is_some());
        // Half what the last whole scan probed, within bounds; a chunk
        // mid-pass does not count as a whole pass.
        p.looked("", None, Some(100_000), t);
        assert_eq!(p.due_read_limit(), Some(SCAN_CHUNK as i32));
        p.looked("", Some("m".into()), Some(10), t);
        assert_eq!(p.due_read_limit(), Some(SCAN_CHUNK as i32));
        p.looked("m", None, Some(300), t);
        assert_eq!(p.due_read_limit(), Some(DUE_READ_MIN as i32));
        assert!(p.mid_pass().is_none());
        // Fewer tenants than the least read reads jobs: scanned.
        p.looked("", None, Some(DUE_READ_MIN - 1), t);
        assert_eq!(p.due_read_limit(), None);
        p.looked("", None, Some(DUE_READ_MIN), t);
        assert_eq!(p.due_read_limit(), Some(DUE_READ_MIN as i32));
    }
}
