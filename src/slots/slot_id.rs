//! Slot ids: unguessable, with the slot's table index in their last four
//! bytes (`with_index`, read back by `Table::lookup`), and the slot a
//! caller's id names (`find`).
use super::table::{LockedTable, Slot};
use crate::error::{LimitsError, Result};
use crate::shmem;
use pgrx::datum::Uuid;
use pgrx::pg_sys;

thread_local! {
    static SLOT_ID_RNG: std::cell::RefCell<Option<rand_chacha::ChaCha20Rng>> =
        const { std::cell::RefCell::new(None) };
}

/// A version-4-shaped uuid whose first twelve bytes come from PostgreSQL's
/// cryptographically strong random source, through a per-backend ChaCha20
/// stream seeded from it (knowing any number of slot ids tells nothing of
/// the next); its last four become the table index
/// (`with_index`). Drawn before the table's lock is taken, so the lock is
/// never held while the random source works.
pub(super) fn random_slot_id() -> Result<[u8; 16]> {
    use rand_chacha::rand_core::{RngCore, SeedableRng};
    let mut id = [0u8; 16];
    SLOT_ID_RNG.with(|cell| {
        let mut rng = cell.borrow_mut();
        if rng.is_none() {
            // pg_strong_random costs microseconds a call; a ChaCha20 stream
            // keyed from it once per backend costs nanoseconds, and is just
            // as unpredictable from outside.
            let mut seed = [0u8; 32];
            if !unsafe { pg_sys::pg_strong_random(seed.as_mut_ptr().cast(), seed.len()) } {
                return Err(LimitsError::invalid(
                    "could not generate a random slot id",
                    "PostgreSQL's strong random source failed; see the server log",
                ));
            }
            *rng = Some(rand_chacha::ChaCha20Rng::from_seed(seed));
        }
        if let Some(rng) = rng.as_mut() {
            rng.fill_bytes(&mut id[..12]);
        }
        Ok(())
    })?;
    id[6] = (id[6] & 0x0f) | 0x40;
    id[8] = (id[8] & 0x3f) | 0x80;
    Ok(id)
}

pub(super) fn with_index(mut id: [u8; 16], idx: usize) -> [u8; 16] {
    id[12..16].copy_from_slice(&(idx as u32).to_be_bytes());
    id
}

pub(super) fn slot_bytes(slot_id: Option<Uuid>) -> Result<[u8; 16]> {
    slot_id.map(|s| *s.as_bytes()).ok_or_else(|| {
        LimitsError::invalid(
            "slot_id must not be NULL",
            "pass the slot_id that acquire_execution_slot returned",
        )
    })
}

/// Snapshot of a slot of this database by id, if any entry holds it.
pub(super) fn find(id: &[u8; 16]) -> Result<Option<(usize, Slot)>> {
    let mut l = LockedTable::shared().ok_or(LimitsError::NotPreloaded)?;
    Ok(l.table()
        .lookup(id)
        .map(|idx| (idx, l.table().slots[idx]))
        .filter(|(_, s)| s.database == shmem::my_database()))
}
