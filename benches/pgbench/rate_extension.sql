-- meshhook_limits: one check_rate_limit call (GCRA in shared memory), one
-- autocommit transaction. :keys is set with -D (100 = spread, 1 = one hot key).
\set n random(1, :keys)
SELECT * FROM meshhook_limits.check_rate_limit(('00000000-0000-0000-0000-' || lpad(:n::text, 12, '0'))::uuid, 'upstream-' || :n::text);
