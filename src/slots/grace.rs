//! The restart grace: whether slots are refused for a while after the
//! server starts, and for how long.
//!
//! Execution slots live in shared memory, which a restart or a crash
//! empties, while their holders are worker processes outside PostgreSQL
//! that go on running. Granting their room to others at once would
//! over-admit, so after a start every database refuses new slots (reason
//! `recovering`) until `meshhook_limits.restart_grace` has passed: holders
//! learn from their next heartbeat that their slot is gone. Claimed jobs are
//! rebuilt from their queues sooner (`restore`).
//!
//! There is no grace when no slot can be held from before the start:
//! - the server shut down cleanly with no live slot. The postmaster records
//!   it as it exits (a file in the data directory naming the shutdown
//!   checkpoint; not in pg_upgrade's binary-upgrade runs), and the next
//!   start trusts the record only when `global/pg_control` still says "shut
//!   down" at that same checkpoint, then removes it: a crash, an immediate
//!   stop or a run in between all fail that test and get the grace. (A
//!   file-level copy taken while the server was stopped passes it: whoever
//!   restores one removes the record, docs/operations.md.)
//! - the extension was created in the database after the server started (a
//!   first start after `initdb`, a new database, a restore), and not dropped
//!   since: its install script calls `_extension_created()`, which marks the
//!   database when the transaction commits; a DROP EXTENSION (the object
//!   access hook) marks it for good as "dropped".
//!
//! A crash of one backend restarts shared memory without the postmaster
//! exiting: that is always a grace. A standby promoted to primary starts a
//! grace at its first acquire after the promotion: the old primary's holders
//! may still run.
use super::table::{self, LockedTable};
use crate::error::LimitsError;
use crate::shmem;
use pgrx::prelude::*;
use std::io::Write;
use std::sync::atomic::{AtomicBool, Ordering};

/// In the data directory: written by the postmaster when it exits after a
/// clean shutdown with no live slot.
const RECORD: &str = "meshhook_limits.clean_shutdown";

/// The shared memory of this postmaster has been set up before (a crash
/// restart sets it up again).
static STARTED_BEFORE: AtomicBool = AtomicBool::new(false);

pub static SEGMENT: shmem::Segment = shmem::Segment {
    request: request_nothing,
    startup,
};

unsafe fn request_nothing() {}

/// After the slot table's own startup (see `lib.rs`'s segment order): set
/// when the grace of this start ends, and have the postmaster record its
/// shutdown.
unsafe fn startup() {
    let now = unsafe { pg_sys::GetCurrentTimestamp() };
    let crash_restart = STARTED_BEFORE.swap(true, Ordering::Relaxed);
    let grace = crate::gucs::restart_grace_micros();
    let clean = !crash_restart && clean_shutdown_recorded();
    // Trusted once: the record never outlives the start it was for.
    if clean && remove_durably(RECORD).is_err() {
        pgrx::warning!("meshhook_limits: could not remove {RECORD} from the data directory");
    }
    let standby = std::path::Path::new("standby.signal").exists();
    table::set_grace_end(
        if clean {
            now
        } else {
            now.saturating_add(grace)
        },
        if standby { grace } else { 0 },
    );
    if clean {
        pgrx::log!("meshhook_limits: no restart grace: the server shut down cleanly with no execution slot held");
    }
    // Registered at every start: a crash restart runs (and empties) the
    // postmaster's exit callbacks.
    let postmaster = unsafe { pg_sys::IsPostmasterEnvironment && !pg_sys::IsUnderPostmaster };
    if postmaster {
        unsafe { pg_sys::before_shmem_exit(Some(at_postmaster_exit), pg_sys::Datum::from(0)) };
    }
}

/// Under the table's lock, at an acquire: the end of the grace in force.
/// On a promoted standby the first acquire starts a grace of its own.
pub fn grace_end(t: &mut super::table::Table, now: i64) -> i64 {
    if t.header.promotion_grace > 0 && !unsafe { pg_sys::RecoveryInProgress() } {
        t.header.grace_end = now.saturating_add(t.header.promotion_grace);
        t.header.promotion_grace = 0;
    }
    t.header.grace_end
}

/// The postmaster exits (every other process has): record a clean shutdown
/// if no slot is live, else remove an older record.
#[pg_guard]
unsafe extern "C-unwind" fn at_postmaster_exit(code: i32, _arg: pg_sys::Datum) {
    let held = table::live_slots_at_exit();
    let checkpoint = read_control_file().filter(|c| c.shut_down);
    // pg_upgrade's runs of a cluster are no evidence about the holders of
    // the cluster it replaces.
    let upgrade = unsafe { pg_sys::IsBinaryUpgrade };
    match checkpoint {
        Some(c) if code == 0 && held == Some(0) && !upgrade => {
            let body = format!("{} {}\n", c.system_identifier, c.checkpoint);
            let _ = write_durably(RECORD, body.as_bytes());
        }
        _ => {
            let _ = std::fs::remove_file(RECORD);
        }
    }
}

/// What the start needs of `global/pg_control`.
struct ControlFile {
    system_identifier: u64,
    shut_down: bool,
    checkpoint: u64,
}

/// The first fields of ControlFileData, the same in PostgreSQL 15 to 18:
/// system_identifier (u64), pg_control_version (u32), catalog_version_no
/// (u32), state (DBState, 4 bytes), padding, time (i64), checkPoint (u64).
fn read_control_file() -> Option<ControlFile> {
    let bytes = std::fs::read("global/pg_control").ok()?;
    let u64_at = |at: usize| Some(u64::from_ne_bytes(bytes.get(at..at + 8)?.try_into().ok()?));
    let u32_at = |at: usize| Some(u32::from_ne_bytes(bytes.get(at..at + 4)?.try_into().ok()?));
    Some(ControlFile {
        system_identifier: u64_at(0)?,
        shut_down: u32_at(16)? == pg_sys::DBState::DB_SHUTDOWNED,
        checkpoint: u64_at(32)?,
    })
}

/// The last exit recorded a clean shutdown with no live slot, and nothing
/// has run since: pg_control is still at that shutdown's checkpoint.
fn clean_shutdown_recorded() -> bool {
    let Ok(record) = std::fs::read_to_string(RECORD) else {
        return false;
    };
    let Some(control) = read_control_file() else {
        return false;
    };
    control.shut_down
        && record.trim() == format!("{} {}", control.system_identifier, control.checkpoint)
}

fn remove_durably(path: &str) -> std::io::Result<()> {
    std::fs::remove_file(path)?;
    std::fs::File::open(".")?.sync_all()
}

fn write_durably(path: &str, body: &[u8]) -> std::io::Result<()> {
    let tmp = format!("{path}.tmp");
    let mut f = std::fs::File::create(&tmp)?;
    f.write_all(body)?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)?;
    std::fs::File::open(".")?.sync_all()
}

/// The refusal of a slot during the grace: a NOTICE that says why and when
/// it ends, next to `reason = 'recovering'` and `retry_after`.
pub fn notice_refused(grace_end: i64, now: i64) {
    let secs = (grace_end.saturating_sub(now) as f64 / 1e6).max(0.01);
    pgrx::pg_sys::panic::ErrorReport::new(
        PgSqlErrorCode::ERRCODE_SUCCESSFUL_COMPLETION,
        format!("execution slots are refused for {secs:.1} s more: the server restarted and slots from before it may still be held"),
        "meshhook_limits",
    )
    .set_hint(
        "retry after retry_after; holders from before the restart learn from their next heartbeat that their slot is gone. \
         The wait is meshhook_limits.restart_grace (none after a clean shutdown with no slot held)",
    )
    .report(PgLogLevel::NOTICE);
}

/// Called by the install script: the extension is new in this database, so
/// none of its slots can predate the server's start. Does nothing outside
/// `CREATE EXTENSION meshhook_limits`.
#[pg_extern(volatile)]
fn _extension_created() {
    let ours = unsafe {
        pg_sys::creating_extension
            && pg_sys::CurrentExtensionObject
                == pg_sys::get_extension_oid(c"meshhook_limits".as_ptr(), true)
    };
    if !ours {
        LimitsError::forbidden(
            "_extension_created() is called by CREATE EXTENSION meshhook_limits only",
            "",
        )
        .raise();
    }
    // At commit: a CREATE EXTENSION rolled back (say after a DROP in the
    // same transaction) changes nothing.
    let db = shmem::my_database();
    pgrx::register_xact_callback(pgrx::PgXactCallbackEvent::Commit, move || {
        if let Some(mut locked) = LockedTable::exclusive() {
            locked.table().mark_created(db);
        }
    });
}

static mut PREV_OBJECT_ACCESS: pg_sys::object_access_hook_type = None;

/// From `_PG_init` while preloading: watch for DROP EXTENSION
/// meshhook_limits, after which no CREATE EXTENSION ends this start's grace
/// in that database (holders of the dropped extension's slots may still
/// run).
pub fn init() {
    unsafe {
        PREV_OBJECT_ACCESS = pg_sys::object_access_hook;
        pg_sys::object_access_hook = Some(object_access);
    }
}

#[pg_guard]
unsafe extern "C-unwind" fn object_access(
    access: pg_sys::ObjectAccessType::Type,
    class_id: pg_sys::Oid,
    object_id: pg_sys::Oid,
    sub_id: i32,
    arg: *mut std::ffi::c_void,
) {
    unsafe {
        if let Some(prev) = PREV_OBJECT_ACCESS {
            prev(access, class_id, object_id, sub_id, arg);
        }
        if access == pg_sys::ObjectAccessType::OAT_DROP
            && class_id == pg_sys::ExtensionRelationId
            && object_id == pg_sys::get_extension_oid(c"meshhook_limits".as_ptr(), true)
        {
            // At once, not at commit: a drop rolled back only costs a grace.
            if let Some(mut locked) = LockedTable::exclusive() {
                locked.table().mark_dropped(shmem::my_database());
            }
        }
    }
}

pgrx::extension_sql!(
    "REVOKE EXECUTE ON FUNCTION meshhook_limits._extension_created() FROM PUBLIC;\n\
     SELECT meshhook_limits._extension_created();",
    name = "extension_created",
    requires = [_extension_created]
);
