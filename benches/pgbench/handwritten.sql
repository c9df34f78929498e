-- Hand-written counter: acquire, then release, each its own autocommit
-- transaction (two statements per pgbench transaction).
-- :tenants is set with -D (100 = spread, 1 = one hot tenant).
\set n random(1, :tenants)
SELECT handwritten.acquire(('00000000-0000-0000-0000-' || lpad(:n::text, 12, '0'))::uuid) AS slot_id \gset
SELECT handwritten.release(:slot_id::uuid);
