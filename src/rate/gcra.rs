//! The token-bucket arithmetic: one GCRA step, pure, on times in
//! nanoseconds since 2000-01-01 (PostgreSQL's epoch).
//!
//! Each (tenant, key) has a theoretical arrival time `tat`. With emission
//! interval `T = 1 / rate` and tolerance `τ = burst × T`, a request of cost c
//! is allowed when `max(tat, now) + c·T − now ≤ τ`, and then moves `tat` to
//! that sum. So `burst` requests pass at once, a stream at `rate` always
//! passes, and a refusal knows exactly when the request would pass.
use pgrx::pg_sys;

/// Now, in nanoseconds since 2000-01-01; `meshhook_limits.test_clock` (epoch
/// seconds, superuser only) replaces the real clock for tests.
pub fn now_ns() -> i64 {
    let fake = crate::gucs::test_clock();
    if fake > 0.0 {
        // 946684800 = seconds from 1970-01-01 to 2000-01-01.
        return ((fake - 946_684_800.0) * 1e9).round() as i64;
    }
    unsafe { pg_sys::GetCurrentTimestamp() }.saturating_mul(1000)
}

/// One rate: requests per second and how many may pass at once.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Bucket {
    pub rate: f64,
    pub burst: f64,
}

#[derive(Debug, PartialEq)]
pub struct Decision {
    pub allowed: bool,
    pub remaining: Option<i64>,
    pub retry_after_ns: Option<i64>,
}

/// The GCRA step on one entry's state. Pure, so it is unit-tested directly.
pub fn gcra(
    tat: i64,
    paused_until: i64,
    now: i64,
    cost: i64,
    rate: f64,
    burst: f64,
) -> (Decision, i64) {
    if paused_until > now {
        return (
            Decision {
                allowed: false,
                remaining: Some(0),
                retry_after_ns: Some(paused_until - now),
            },
            tat,
        );
    }
    if rate <= 0.0 {
        return (
            Decision {
                allowed: false,
                remaining: Some(0),
                retry_after_ns: None,
            },
            tat,
        );
    }
    let t = 1e9 / rate; // ns per token
    let tau = burst * t;
    // Work relative to now: absolute nanoseconds do not fit an f64 exactly.
    let backlog = (tat.max(now) - now) as f64;
    let debt = backlog + cost as f64 * t;
    if debt <= tau + 1.0 {
        let remaining = ((tau - debt) / t + 1e-6).floor().max(0.0) as i64;
        (
            Decision {
                allowed: true,
                remaining: Some(remaining),
                retry_after_ns: None,
            },
            now + debt.round() as i64,
        )
    } else {
        let remaining = ((tau - backlog) / t + 1e-6).floor().max(0.0) as i64;
        let retry = (debt - tau).ceil() as i64;
        (
            Decision {
                allowed: false,
                remaining: Some(remaining),
                retry_after_ns: Some(retry),
            },
            tat,
        )
    }
}

/// One GCRA step over every bucket at once: allowed only when each allows;
/// then each spends. `states` are the buckets' (tat, paused_until); returns
/// the decision and the new tats.
pub fn gcra_all(
    states: &[(i64, i64)],
    buckets: &[Bucket],
    now: i64,
    cost: i64,
) -> (Decision, Vec<i64>) {
    let steps: Vec<(Decision, i64)> = states
        .iter()
        .zip(buckets)
        .map(|(&(tat, paused), b)| gcra(tat, paused, now, cost, b.rate, b.burst))
        .collect();
    let allowed = steps.iter().all(|(d, _)| d.allowed);
    let remaining = steps.iter().filter_map(|(d, _)| d.remaining).min();
    let retry_after_ns = if allowed {
        None
    } else {
        // The latest moment every refusing bucket has room; never (None)
        // when one of them never will (a rate of 0).
        steps
            .iter()
            .filter(|(d, _)| !d.allowed)
            .map(|(d, _)| d.retry_after_ns)
            .try_fold(0i64, |acc, r| r.map(|r| acc.max(r)))
    };
    let tats = steps
        .iter()
        .zip(states)
        .map(|((_, new), &(old, _))| if allowed { *new } else { old })
        .collect();
    (
        Decision {
            allowed,
            remaining,
            retry_after_ns,
        },
        tats,
    )
}

#[cfg(test)]
mod unit {
    use super::gcra;
    const S: i64 = 1_000_000_000;

    #[test]
    fn burst_then_steady_state() {
        // 2 per second, burst 4: four at once, the fifth waits exactly 0.5 s.
        let (mut tat, now) = (0, 10 * S);
        for i in 0..4 {
            let (d, t) = gcra(tat, 0, now, 1, 2.0, 4.0);
            assert!(d.allowed, "request {i}");
            assert_eq!(d.remaining, Some(3 - i));
            tat = t;
        }
        let (d, _) = gcra(tat, 0, now, 1, 2.0, 4.0);
        assert!(!d.allowed);
        assert_eq!(d.retry_after_ns, Some(S / 2));
        let (d, _) = gcra(tat, 0, now + S / 2, 1, 2.0, 4.0);
        assert!(d.allowed);
    }

    #[test]
    fn pause_refuses_until_then_resumes() {
        let (d, _) = gcra(0, 5 * S, 4 * S, 1, 10.0, 10.0);
        assert!(!d.allowed);
        assert_eq!(d.retry_after_ns, Some(S));
        assert!(gcra(0, 5 * S, 5 * S, 1, 10.0, 10.0).0.allowed);
    }
}
