-- The hand-written baseline: what a team writes without meshhook_limits.
-- A per-tenant counter row plus one row per held slot, kept in step by two
-- PL/pgSQL functions. Deliberately lean (no foreign key, no triggers, no RLS,
-- no SECURITY DEFINER) so the comparison flatters the baseline, not us.
DROP SCHEMA IF EXISTS handwritten CASCADE;
CREATE SCHEMA handwritten;

CREATE TABLE handwritten.quota (
  tenant_id uuid PRIMARY KEY,
  max       int  NOT NULL,
  in_use    int  NOT NULL DEFAULT 0 CHECK (in_use >= 0)
);

CREATE TABLE handwritten.slot (
  slot_id     uuid PRIMARY KEY DEFAULT gen_random_uuid(),
  tenant_id   uuid NOT NULL,
  acquired_at timestamptz NOT NULL DEFAULT now()
);

-- Take a slot: bump the counter unless it is full, then record the holder.
-- Returns NULL when the tenant is at its limit.
CREATE FUNCTION handwritten.acquire(p_tenant uuid) RETURNS uuid
LANGUAGE plpgsql AS $$
DECLARE
  v_in_use int;
  v_slot   uuid;
BEGIN
  UPDATE handwritten.quota SET in_use = in_use + 1
   WHERE tenant_id = p_tenant AND in_use < max
  RETURNING in_use INTO v_in_use;
  IF NOT FOUND THEN
    RETURN NULL;
  END IF;
  INSERT INTO handwritten.slot (tenant_id) VALUES (p_tenant) RETURNING slot_id INTO v_slot;
  RETURN v_slot;
END
$$;

-- Give a slot back: forget the holder, then decrement its tenant's counter.
CREATE FUNCTION handwritten.release(p_slot uuid) RETURNS boolean
LANGUAGE plpgsql AS $$
DECLARE
  v_tenant uuid;
BEGIN
  DELETE FROM handwritten.slot WHERE slot_id = p_slot RETURNING tenant_id INTO v_tenant;
  IF NOT FOUND THEN
    RETURN false;
  END IF;
  UPDATE handwritten.quota SET in_use = in_use - 1 WHERE tenant_id = v_tenant;
  RETURN true;
END
$$;

-- Tenants 1..100, with the same int -> uuid mapping as the pgbench scripts.
-- The limit is high enough that the benchmark never hits it.
INSERT INTO handwritten.quota (tenant_id, max)
SELECT ('00000000-0000-0000-0000-' || lpad(n::text, 12, '0'))::uuid, 1000
  FROM generate_series(1, 100) AS n;
