//! Rate limits: GCRA (the generic cell rate algorithm, a token bucket kept
//! as one timestamp per key) in shared memory.
//!
//! What a check spends from: the tenant's bucket, when the tenant has a
//! `requests_per_second` (it bounds the tenant across all its keys, so
//! rotating key names gains nothing), and the key's own bucket, when
//! `requests_per_second.<key>` is set. A request passes only when every
//! bucket that applies has room, and then spends from each. A pause belongs
//! to a key with a rule of its own. So a tenant has at most one entry plus
//! one per keyed rule an admin set: it cannot fill the table.
//!
//! The table is fixed: `BUCKETS` sets of `WAYS` entries, behind `PARTITIONS`
//! LWLocks. An entry lives in the set its hash (of database, tenant and key,
//! with a secret seed chosen at server start) picks. When the set is full, an
//! idle entry (tat and pause in the past: indistinguishable from a fresh key)
//! is reused first; if none is idle the entry closest to idle is evicted and
//! that key starts again with a full burst (counted in `evictions`).
//!
//! State is not transactional, like a sequence: a rolled-back transaction
//! keeps the tokens it spent.
//!
//! The files, lowest first (each uses only those above it):
//! - `gcra`: the arithmetic of one step, and the clock it reads;
//! - `rule`: which buckets a (tenant, key) spends from, cached per backend;
//! - `table`: the shared-memory table of entries;
//! - `fallback`: the same steps on `meshhook_limits.rate_state` without
//!   shared memory;
//! - `check`: `check_rate_limit` and its definer half;
//! - `pause`: `pause_rate_limit`;
//! - `stats`: `rate_limit_stats`.
mod gcra;
mod rule;
pub mod table;

mod fallback;

mod check;
mod pause;
mod stats;
