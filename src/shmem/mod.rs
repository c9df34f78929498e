//! Shared memory, when the library is in `shared_preload_libraries`: the
//! postmaster's request and startup hooks, installed here once. What lives
//! in shared memory registers itself as a [`Segment`] (the slot table in
//! `slots::table`, the rate table in `rate::table`, the limits generation in
//! `limits`); this module knows none of them. Also here: a guard that holds
//! an LWLock, this backend's database, and the notice for what runs on
//! tables because the library was not preloaded.
use pgrx::pg_sys;
use std::cell::Cell;
use std::ffi::CStr;
use std::sync::atomic::{AtomicBool, Ordering};

/// One piece of shared memory. `request` asks for its space and LWLocks
/// (shmem_request hook); `startup` finds or creates it and publishes its
/// address to this process (shmem_startup hook, under AddinShmemInitLock).
/// Both run in the postmaster; forked backends inherit what they set.
pub struct Segment {
    pub request: unsafe fn(),
    pub startup: unsafe fn(),
}

static PRELOADED: AtomicBool = AtomicBool::new(false);
static mut SEGMENTS: &[&Segment] = &[];
static mut PREV_REQUEST: pg_sys::shmem_request_hook_type = None;
static mut PREV_STARTUP: pg_sys::shmem_startup_hook_type = None;

/// Install the hooks for `segments`. From `_PG_init`, while preloading only.
pub fn init(segments: &'static [&'static Segment]) {
    unsafe {
        SEGMENTS = segments;
        PREV_REQUEST = pg_sys::shmem_request_hook;
        pg_sys::shmem_request_hook = Some(shmem_request);
        PREV_STARTUP = pg_sys::shmem_startup_hook;
        pg_sys::shmem_startup_hook = Some(shmem_startup);
    }
    PRELOADED.store(true, Ordering::Relaxed);
}

/// The library was preloaded: the segments exist (each says whether it
/// was found, through its own accessor).
pub fn preloaded() -> bool {
    PRELOADED.load(Ordering::Relaxed)
}

#[pgrx::pg_guard]
unsafe extern "C-unwind" fn shmem_request() {
    unsafe {
        if let Some(prev) = PREV_REQUEST {
            prev();
        }
        for segment in SEGMENTS {
            (segment.request)();
        }
    }
}

#[pgrx::pg_guard]
unsafe extern "C-unwind" fn shmem_startup() {
    unsafe {
        if let Some(prev) = PREV_STARTUP {
            prev();
        }
        let init_lock = &raw mut (*pg_sys::MainLWLockArray.add(21)).lock; // AddinShmemInitLock
        pg_sys::LWLockAcquire(init_lock, pg_sys::LWLockMode::LW_EXCLUSIVE);
        for segment in SEGMENTS {
            (segment.startup)();
        }
        pg_sys::LWLockRelease(init_lock);
    }
}

/// Find the named struct in shared memory, or create it zeroed (all-zero
/// must be a valid value of `T`). Returns it and whether it was created.
///
/// # Safety
/// From a segment's `startup`, under AddinShmemInitLock, with the space
/// requested in its `request`.
pub unsafe fn init_struct<T>(name: &CStr) -> (*mut T, bool) {
    let mut found = false;
    let size = std::mem::size_of::<T>();
    let ptr = unsafe { pg_sys::ShmemInitStruct(name.as_ptr(), size, &mut found) }.cast::<T>();
    if !found {
        unsafe { std::ptr::write_bytes(ptr.cast::<u8>(), 0, size) };
    }
    (ptr, !found)
}

/// An LWLock, held until dropped.
pub struct LwLockGuard(*mut pg_sys::LWLock);

impl LwLockGuard {
    /// # Safety
    /// `lock` is an initialised LWLock in shared memory.
    pub unsafe fn acquire(lock: *mut pg_sys::LWLock, mode: pg_sys::LWLockMode::Type) -> Self {
        unsafe { pg_sys::LWLockAcquire(lock, mode) };
        LwLockGuard(lock)
    }
}

impl Drop for LwLockGuard {
    fn drop(&mut self) {
        unsafe { pg_sys::LWLockRelease(self.0) };
    }
}

/// This backend's database: slots and rate buckets are kept per database.
pub fn my_database() -> u32 {
    unsafe { pg_sys::MyDatabaseId }.to_u32()
}

/// What runs on a table when the library is not preloaded.
#[derive(Clone, Copy)]
pub enum TableFallback {
    Slots = 1,
    RateLimits = 2,
}

thread_local! {
    static FALLBACK_NOTICED: Cell<u8> = const { Cell::new(0) };
}

/// One NOTICE per session and feature: it runs on a table (slower) because
/// the library is not in shared_preload_libraries.
pub fn notice_table_fallback(what: TableFallback) {
    let bit = what as u8;
    if FALLBACK_NOTICED.with(|n| n.replace(n.get() | bit)) & bit == 0 {
        let name = match what {
            TableFallback::Slots => "execution slots",
            TableFallback::RateLimits => "rate limits",
        };
        pgrx::notice!(
            "meshhook_limits is not in shared_preload_libraries: {name} use a table (slower); \
             add it to shared_preload_libraries and restart for the shared-memory fast path"
        );
    }
}
