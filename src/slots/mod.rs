//! Execution slots: acquire, heartbeat and release, the caller's fast path,
//! and the slot side of claim_jobs.
//!
//! Slots live in a table in shared memory, so admission costs a lock and a
//! few comparisons and writes no WAL. The C entry points answer from shared
//! memory and cached limits; whatever needs SQL goes to the SECURITY DEFINER
//! twins (see `limits::Mode`).
//!
//! Where to look: whether a slot is granted, `acquire`; how retry_after is
//! computed, `admission`; what a restart or a crash does to slots held,
//! `grace` (and `restore` for claimed jobs' slots).
//!
//! The files, lowest first: each uses only those above it, and none in its
//! own group (the groups of `mod` lines below).
//! - `clock`: the time slots are measured in; `counters`: live counts per
//!   tenant, project, key and database, and per-database marks; `freed`:
//!   the ring of tenants whose slots stopped counting;
//! - `fair`: claim_jobs' fair-share clock;
//! - `table`: the shared-memory segment, its layout and its lock;
//! - `entries`: what happens to a slot entry (made live, freed, revoked,
//!   reused), its counts kept in step; `grace`: whether and how long slots
//!   are refused after a start;
//! - `admission`: acquire's answer, refusals, retry_after; `liveness`:
//!   heartbeat's answer and the slot.revoked event; `shares`: which tenant
//!   claim_jobs serves next (shares, start tags, ended slots); `slot_id`:
//!   slot ids, made and looked up; `xact`: slot changes tied to the
//!   caller's transaction;
//! - `ended`: the queue trigger that ends a claimed job's slot; `fallback`:
//!   slots in a table when the library is not preloaded; `wait`: waiting
//!   for room;
//! - `acquire`: whether a slot is granted, a step at a time; `heartbeat`
//!   and `release`: a held slot kept alive, given back; `listing`: what the
//!   table holds, for callers and monitors; `reap`: expired slots revoked
//!   and announced;
//! - `claimed`: a claimed job's slot (claim_jobs), ended by the tick, and
//!   the definer's half of `shares`; `definer`: the SECURITY DEFINER twins
//!   of acquire and release;
//! - `functions`: acquire_execution_slot, heartbeat_execution_slot and
//!   release_execution_slot as SQL sees them; `restore`: claimed slots
//!   rebuilt from the queues after a restart.
mod clock;
mod counters;
pub mod freed;

mod fair;

pub mod table;

pub mod entries;
pub mod grace;

mod admission;
mod liveness;
pub mod shares;
mod slot_id;
mod xact;

mod ended;
mod fallback;
mod wait;

mod acquire;
mod heartbeat;
pub mod listing;
pub mod reap;
mod release;

pub mod claimed;
mod definer;

mod functions;
pub mod restore;

/// Registers the transaction callbacks of pending slot changes. From `_PG_init`.
pub fn init() {
    xact::init();
}
