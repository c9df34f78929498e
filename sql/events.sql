-- meshhook_limits: Events: the log of every notification, and how one is sent (NOTIFY on
-- channel meshhook_limits, and Supabase Realtime when it is the real one).
-- Everything is schema-qualified; SECURITY DEFINER functions pin search_path.

-- Every event that was NOTIFYed, since LISTEN does not survive transaction pooling.
CREATE TABLE meshhook_limits.events (
  id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
  tenant_id uuid,
  event text NOT NULL,
  resource text,
  payload jsonb NOT NULL,
  created_at timestamptz NOT NULL DEFAULT pg_catalog.now()
);
CREATE INDEX events_tenant ON meshhook_limits.events (tenant_id, id);
-- Events too (a restored database keeps what it sent, and its ids go on);
-- slots, rate buckets, samples and worker state describe a running server
-- and are not dumped.
SELECT pg_catalog.pg_extension_config_dump('meshhook_limits.events', '');
SELECT pg_catalog.pg_extension_config_dump('meshhook_limits.events_id_seq', '');
ALTER TABLE meshhook_limits.events ENABLE ROW LEVEL SECURITY;
CREATE POLICY admin_all ON meshhook_limits.events FOR SELECT USING ((SELECT meshhook_limits.can_monitor()));
CREATE POLICY own_rows ON meshhook_limits.events FOR SELECT USING (tenant_id = (SELECT meshhook_limits.current_tenant()));
GRANT SELECT ON meshhook_limits.events TO PUBLIC;

-- Supabase Realtime's realtime.send(jsonb, text, text, boolean), when it is
-- the real one: the function and its schema belong to a superuser or to
-- supabase_realtime_admin (who installs Realtime on Supabase), and no other
-- function named send sits beside it. A send created by anyone else (a role
-- with CREATE on the database, on a server without Realtime) is never
-- called: it would run as the definer of _emit.
CREATE FUNCTION meshhook_limits._realtime_send_trusted() RETURNS boolean
LANGUAGE sql STABLE SET search_path = pg_catalog, pg_temp AS $$
  SELECT count(*) = 1 AND bool_and(
           p.oid = pg_catalog.to_regprocedure('realtime.send(jsonb,text,text,boolean)')
           AND (fo.rolsuper OR fo.rolname = 'supabase_realtime_admin')
           AND (so.rolsuper OR so.rolname = 'supabase_realtime_admin'))
    FROM pg_catalog.pg_proc p
    JOIN pg_catalog.pg_namespace n ON n.oid = p.pronamespace
    JOIN pg_catalog.pg_roles fo ON fo.oid = p.proowner
    JOIN pg_catalog.pg_roles so ON so.oid = n.nspowner
   WHERE n.nspname = 'realtime' AND p.proname = 'send'
$$;
REVOKE EXECUTE ON FUNCTION meshhook_limits._realtime_send_trusted() FROM PUBLIC;

-- Record an event: keep it, NOTIFY it, and send it to Supabase Realtime where present.
CREATE FUNCTION meshhook_limits._emit(p_event text, p_tenant uuid, p_resource text, p_value numeric,
                                      p_limit numeric, p_extra jsonb DEFAULT NULL)
RETURNS void LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
#variable_conflict use_column
DECLARE
  payload jsonb;
  event_id bigint;
  channel text := coalesce(nullif(current_setting('meshhook_limits.notify_channel', true), ''), 'meshhook_limits');
BEGIN
  -- At most 100 events per tenant per minute: one tenant's churn cannot
  -- flood the events table or the listeners. More are dropped.
  IF p_tenant IS NOT NULL AND (SELECT e.created_at > pg_catalog.now() - interval '1 minute'
                                 FROM meshhook_limits.events e WHERE e.tenant_id = p_tenant
                                ORDER BY e.id DESC OFFSET 99 LIMIT 1) THEN
    RETURN;
  END IF;
  payload := jsonb_build_object('event', p_event, 'tenant_id', p_tenant, 'resource', p_resource,
                                'value', p_value, 'limit', p_limit, 'at', pg_catalog.now());
  IF p_extra IS NOT NULL AND octet_length((payload || p_extra)::text) < 7900 THEN
    payload := p_extra || payload;
  END IF;
  -- NOTIFY takes at most 8000 bytes; an event never fails on its size.
  IF octet_length(payload::text) >= 7900 THEN
    payload := jsonb_build_object('event', p_event, 'tenant_id', p_tenant, 'resource', left(p_resource, 63),
                                  'at', pg_catalog.now(), 'truncated', true);
  END IF;
  INSERT INTO meshhook_limits.events (tenant_id, event, resource, payload)
  VALUES (p_tenant, p_event, p_resource, payload) RETURNING id INTO event_id;
  -- What is sent carries the id of its events row: anyone may pg_notify on
  -- the channel, but only a real event has that row (with that payload).
  payload := payload || jsonb_build_object('event_id', event_id);
  PERFORM pg_catalog.pg_notify(channel, payload::text);
  IF meshhook_limits._realtime_send_trusted() THEN
    EXECUTE 'SELECT realtime.send($1::jsonb, $2::text, $3::text, $4::boolean)'
      USING payload, p_event, 'meshhook_limits:' || coalesce(p_tenant::text, 'admin'), true;
  END IF;
END
$$;
REVOKE EXECUTE ON FUNCTION meshhook_limits._emit(text, uuid, text, numeric, numeric, jsonb) FROM PUBLIC;

-- Supabase Realtime authorises private topics by row-level security on
-- realtime.messages. This policy lets a tenant (authenticated, with its
-- tenant claim) receive meshhook_limits:<its tenant> and nothing else.
-- Run once where Realtime is installed (admin); false when it is not.
CREATE FUNCTION meshhook_limits.install_realtime_policy() RETURNS boolean
LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
BEGIN
  PERFORM meshhook_limits.require_admin_access('install the Realtime policy');
  IF NOT meshhook_limits._realtime_send_trusted()
     OR pg_catalog.to_regclass('realtime.messages') IS NULL
     OR pg_catalog.to_regprocedure('realtime.topic()') IS NULL THEN
    RETURN false;
  END IF;
  IF NOT EXISTS (SELECT 1 FROM pg_catalog.pg_policy p
                  WHERE p.polrelid = 'realtime.messages'::regclass AND p.polname = 'meshhook_limits_own_topic') THEN
    EXECUTE $p$CREATE POLICY meshhook_limits_own_topic ON realtime.messages FOR SELECT TO authenticated
      USING (realtime.topic() = 'meshhook_limits:' || (SELECT meshhook_limits.current_tenant())::text)$p$;
  END IF;
  RETURN true;
END
$$;
