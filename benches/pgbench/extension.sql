-- meshhook_limits: acquire, then release, each its own autocommit
-- transaction (two statements per pgbench transaction).
-- :tenants is set with -D (100 = spread, 1 = one hot tenant).
-- A refused acquire leaves slot_id NULL/empty; the release then raises, so a
-- refusal shows up as a pgbench error rather than passing silently.
\set n random(1, :tenants)
SELECT slot_id FROM meshhook_limits.acquire_execution_slot(('00000000-0000-0000-0000-' || lpad(:n::text, 12, '0'))::uuid) \gset
SELECT meshhook_limits.release_execution_slot(:slot_id::uuid);
