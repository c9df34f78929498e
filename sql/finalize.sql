-- Internal functions are not for callers: only the definer functions use them.
REVOKE EXECUTE ON FUNCTION meshhook_limits._emit(text, uuid, text, numeric, numeric, jsonb) FROM PUBLIC;
REVOKE EXECUTE ON FUNCTION meshhook_limits._limits_changed() FROM PUBLIC;
REVOKE EXECUTE ON FUNCTION meshhook_limits._slot_limits(uuid, uuid) FROM PUBLIC;
REVOKE EXECUTE ON FUNCTION meshhook_limits._resolve(uuid, uuid) FROM PUBLIC;
REVOKE EXECUTE ON FUNCTION meshhook_limits.reap_execution_slots() FROM PUBLIC;
GRANT EXECUTE ON FUNCTION meshhook_limits.reap_execution_slots() TO meshhook_limits_admin;
REVOKE EXECUTE ON FUNCTION meshhook_limits._fallback_lock(uuid) FROM PUBLIC;
REVOKE EXECUTE ON FUNCTION meshhook_limits._fallback_reap(uuid) FROM PUBLIC;
REVOKE EXECUTE ON FUNCTION meshhook_limits._fallback_acquire(uuid, uuid, text, bigint) FROM PUBLIC;
REVOKE EXECUTE ON FUNCTION meshhook_limits._fallback_heartbeat(uuid, bigint) FROM PUBLIC;
REVOKE EXECUTE ON FUNCTION meshhook_limits._fallback_release(uuid, bigint) FROM PUBLIC;
REVOKE EXECUTE ON FUNCTION meshhook_limits._rate_rule(uuid, text) FROM PUBLIC;
REVOKE EXECUTE ON FUNCTION meshhook_limits._rate_state_lock(uuid, text, bigint) FROM PUBLIC;
REVOKE EXECUTE ON FUNCTION meshhook_limits._storage_apply(name, name, uuid, bigint) FROM PUBLIC;
REVOKE EXECUTE ON FUNCTION meshhook_limits._storage_forget(name, name, boolean) FROM PUBLIC;
REVOKE EXECUTE ON FUNCTION meshhook_limits._tracked(oid, name, name) FROM PUBLIC;
