-- Internal functions are not for callers: only the definer functions use them.
REVOKE EXECUTE ON FUNCTION meshhook_limits._emit(text, uuid, text, numeric, numeric, jsonb) FROM PUBLIC;
REVOKE EXECUTE ON FUNCTION meshhook_limits._limits_changed() FROM PUBLIC;
REVOKE EXECUTE ON FUNCTION meshhook_limits._slot_limits(uuid, uuid) FROM PUBLIC;
REVOKE EXECUTE ON FUNCTION meshhook_limits._resolve(uuid, uuid) FROM PUBLIC;
REVOKE EXECUTE ON FUNCTION meshhook_limits.reap_execution_slots() FROM PUBLIC;
GRANT EXECUTE ON FUNCTION meshhook_limits.reap_execution_slots() TO meshhook_limits_admin;
