//! Session limits (sql/session.sql): what its SQL cannot tell by itself.
use pgrx::prelude::*;

/// Whether the caller is inside a transaction block (BEGIN … COMMIT). The
/// settings `apply_session_limits` makes end with the transaction: outside a
/// block, with the very statement that made them.
#[pg_extern(stable, parallel_safe)]
fn _in_transaction_block() -> bool {
    unsafe { pg_sys::IsTransactionBlock() }
}

pgrx::extension_sql!(
    "REVOKE EXECUTE ON FUNCTION meshhook_limits._in_transaction_block() FROM PUBLIC;",
    name = "session_grants",
    requires = [_in_transaction_block]
);
