//! Which tenants got room back: a ring, in the slot table, of the tenants
//! whose slots stopped counting (released, ended with their job, expired,
//! revoked). claim_jobs parks a tenant at its limit (`claim::runqueue`) and
//! brings it back when the ring shows one of its slots ended, reading only
//! what was added since its last look: a claim costs the same however many
//! tenants are parked.

/// Entries the ring keeps (a power of two). A reader that falls further
/// behind than this looks at every tenant it parked instead.
const RING: usize = 4096;

#[derive(Clone, Copy)]
#[repr(C)]
struct Entry {
    database: u32,
    tenant: [u8; 16],
}

/// All-zero is an empty ring.
#[repr(C)]
pub struct Freed {
    /// How many entries were ever added (the next one's sequence number).
    added: u64,
    entries: [Entry; RING],
}

impl Freed {
    /// A slot of this tenant stopped counting (under the table's exclusive
    /// lock).
    pub fn add(&mut self, database: u32, tenant: &[u8; 16]) {
        self.entries[(self.added as usize) & (RING - 1)] = Entry {
            database,
            tenant: *tenant,
        };
        self.added = self.added.wrapping_add(1);
    }

    /// Where the ring is now: pass it to the next `since`.
    pub fn now(&self) -> u64 {
        self.added
    }

    /// The tenants of `database` whose slots stopped counting since `seen`
    /// (what `now` or `since` answered), and the new mark; None when more
    /// were added than the ring keeps (any tenant may have room).
    pub fn since(&self, seen: u64, database: u32) -> (Option<Vec<[u8; 16]>>, u64) {
        let added = self.added.wrapping_sub(seen);
        if added > RING as u64 {
            return (None, self.added);
        }
        let tenants = (seen..self.added)
            .map(|i| &self.entries[(i as usize) & (RING - 1)])
            .filter(|e| e.database == database)
            .map(|e| e.tenant)
            .collect();
        (Some(tenants), self.added)
    }
}

#[cfg(any(test, feature = "pg_test"))]
#[pgrx::pg_schema]
mod tests {
    use super::{Freed, RING};
    use pgrx::prelude::*;

    fn empty() -> Box<Freed> {
        // SAFETY: all-zero is an empty ring (as in shared memory).
        unsafe { Box::new(std::mem::zeroed()) }
    }

    #[pg_test]
    fn a_reader_sees_what_was_added_since_its_mark_in_its_database() {
        let mut f = empty();
        f.add(1, &[1; 16]);
        let mark = f.now();
        f.add(1, &[2; 16]);
        f.add(2, &[3; 16]);
        f.add(1, &[4; 16]);
        let (tenants, next) = f.since(mark, 1);
        assert_eq!(tenants, Some(vec![[2; 16], [4; 16]]));
        assert_eq!(f.since(next, 1).0, Some(vec![]));
    }

    #[pg_test]
    fn a_reader_too_far_behind_is_told_to_look_at_everything() {
        let mut f = empty();
        let mark = f.now();
        for i in 0..=RING {
            f.add(1, &[(i % 251) as u8; 16]);
        }
        assert_eq!(f.since(mark, 1).0, None);
        let (all, next) = f.since(f.now() - RING as u64, 1);
        assert_eq!(all.map(|t| t.len()), Some(RING));
        assert_eq!(next, f.now());
    }
}
