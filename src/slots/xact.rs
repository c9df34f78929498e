//! Ties slot changes to the caller's transaction.
//!
//! An acquired slot counts at once (so concurrent callers never over-admit)
//! but is freed again if the acquiring (sub)transaction rolls back. A release
//! takes effect at commit; if the releasing transaction rolls back, the slot
//! is still held. Commit and abort callbacks cannot fail: they only touch the
//! shared table under its LWLock.
use super::table::LockedTable;
use pgrx::pg_sys;
use std::cell::RefCell;

#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Op {
    Acquire,
    Release,
    /// A revocation was announced (slot.revoked) in this transaction: mark it
    /// so at commit; after a rollback the next reap announces it again.
    Announce,
}

#[derive(Clone, Copy)]
pub struct Pending {
    pub idx: usize,
    pub id: [u8; 16],
    pub op: Op,
    pub subid: pg_sys::SubTransactionId,
}

thread_local! {
    static PENDING: RefCell<Vec<Pending>> = const { RefCell::new(Vec::new()) };
}

pub fn init() {
    unsafe {
        pg_sys::RegisterXactCallback(Some(on_xact), std::ptr::null_mut());
        pg_sys::RegisterSubXactCallback(Some(on_subxact), std::ptr::null_mut());
    }
}

pub fn push(idx: usize, id: [u8; 16], op: Op) {
    let subid = unsafe { pg_sys::GetCurrentSubTransactionId() };
    PENDING.with(|p| p.borrow_mut().push(Pending { idx, id, op, subid }));
}

/// An operation on this slot is already waiting for commit in this transaction.
pub fn pending(id: &[u8; 16], op: Op) -> bool {
    PENDING.with(|p| p.borrow().iter().any(|x| x.op == op && &x.id == id))
}

fn apply(list: &[Pending], committed: bool) {
    if list.is_empty() {
        return;
    }
    if let Some(mut locked) = LockedTable::exclusive() {
        let table = locked.table();
        for p in list {
            match (p.op, committed) {
                (Op::Acquire, false) | (Op::Release, true) => {
                    table.free_live(p.idx, &p.id);
                }
                (Op::Announce, committed) => table.end_announcement(p.idx, &p.id, committed),
                _ => {}
            }
        }
    }
}

#[pgrx::pg_guard]
unsafe extern "C-unwind" fn on_xact(event: pg_sys::XactEvent::Type, _arg: *mut std::ffi::c_void) {
    use pg_sys::XactEvent::*;
    let committed = match event {
        // Slots live in this backend's memory of the transaction, which a
        // prepared transaction outlives: refuse to prepare (the only point
        // where an error still aborts cleanly) rather than guess its fate.
        XACT_EVENT_PRE_PREPARE => {
            if PENDING.with(|p| !p.borrow().is_empty()) {
                crate::error::LimitsError::PreparedTransaction.raise();
            }
            return;
        }
        XACT_EVENT_COMMIT | XACT_EVENT_PARALLEL_COMMIT => true,
        XACT_EVENT_ABORT | XACT_EVENT_PARALLEL_ABORT => false,
        _ => return,
    };
    let list = PENDING.with(|p| std::mem::take(&mut *p.borrow_mut()));
    apply(&list, committed);
}

#[pgrx::pg_guard]
unsafe extern "C-unwind" fn on_subxact(
    event: pg_sys::SubXactEvent::Type,
    my_subid: pg_sys::SubTransactionId,
    _parent: pg_sys::SubTransactionId,
    _arg: *mut std::ffi::c_void,
) {
    if event != pg_sys::SubXactEvent::SUBXACT_EVENT_ABORT_SUB {
        return;
    }
    // Subtransaction ids grow monotonically, so everything at or above the
    // aborted one belongs to it or to its children.
    let undone: Vec<Pending> = PENDING.with(|p| {
        let mut p = p.borrow_mut();
        let (gone, keep): (Vec<Pending>, Vec<Pending>) =
            p.iter().partition(|x| x.subid >= my_subid);
        *p = keep;
        gone
    });
    apply(&undone, false);
}
