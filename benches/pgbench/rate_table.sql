-- Hand-written token bucket: one UPDATE ... RETURNING in PL/pgSQL, one
-- autocommit transaction. :keys is set with -D (100 = spread, 1 = one hot key).
\set n random(1, :keys)
SELECT * FROM handwritten_rate.check(('00000000-0000-0000-0000-' || lpad(:n::text, 12, '0'))::uuid, 'upstream-' || :n::text);
