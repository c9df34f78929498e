-- The hand-written rate-limit baseline: what a team writes without
-- meshhook_limits. A token bucket per (tenant, key) in a table, refilled and
-- spent by one UPDATE ... RETURNING inside a PL/pgSQL function. Deliberately
-- lean (no foreign key, no trigger, no RLS, no SECURITY DEFINER, rows created
-- up front so there is no INSERT ... ON CONFLICT on the hot path) so the
-- comparison flatters the baseline, not us.
DROP SCHEMA IF EXISTS handwritten_rate CASCADE;
CREATE SCHEMA handwritten_rate;

CREATE TABLE handwritten_rate.bucket (
  tenant_id uuid        NOT NULL,
  key       text        NOT NULL,
  rate      float8      NOT NULL,  -- tokens per second
  cap       float8      NOT NULL,  -- burst
  tokens    float8      NOT NULL,
  ts        timestamptz NOT NULL,  -- when tokens was last computed
  PRIMARY KEY (tenant_id, key)
);

-- Refill by the elapsed time, then spend p_cost if that many tokens are
-- there. Same shape of answer as check_rate_limit (allowed, remaining).
-- clock_timestamp(), not now(): under contention a row can carry a ts later
-- than this transaction's start, and the refill must never go negative.
CREATE FUNCTION handwritten_rate.check(p_tenant uuid, p_key text, p_cost int DEFAULT 1)
RETURNS TABLE(allowed boolean, remaining bigint)
LANGUAGE plpgsql AS $$
DECLARE
  v_left float8;
BEGIN
  UPDATE handwritten_rate.bucket b
     SET tokens = LEAST(b.cap, b.tokens + extract(epoch FROM clock_timestamp() - b.ts) * b.rate) - p_cost,
         ts     = clock_timestamp()
   WHERE b.tenant_id = p_tenant AND b.key = p_key
     AND LEAST(b.cap, b.tokens + extract(epoch FROM clock_timestamp() - b.ts) * b.rate) >= p_cost
  RETURNING b.tokens INTO v_left;
  IF FOUND THEN
    RETURN QUERY SELECT true, floor(v_left)::bigint;
  ELSE
    RETURN QUERY SELECT false, 0::bigint;
  END IF;
END
$$;

-- Keys 1..100 with the same int -> (tenant uuid, key) mapping as the pgbench
-- scripts; 1e6 tokens per second and a burst of 1e6, like the extension's
-- limit in the benchmark, so no request is ever refused.
INSERT INTO handwritten_rate.bucket (tenant_id, key, rate, cap, tokens, ts)
SELECT ('00000000-0000-0000-0000-' || lpad(n::text, 12, '0'))::uuid, 'upstream-' || n,
       1e6, 1e6, 1e6, clock_timestamp()
  FROM generate_series(1, 100) AS n;
