-- meshhook_limits: binding a queue for claim_jobs: bind_queue and unbind_queue, the
-- sender-tenant trigger, and the binding as claim_jobs reads it (claiming
-- as a whole: sql/claim.sql).

-- The trigger bind_queue(..., sender_tenant => true) puts on a pgmq queue
-- table, BEFORE INSERT OR UPDATE OF message: the tenant of a message is the
-- sender's, whatever the sender wrote (issue 19, item 4). TG_ARGV[0] is the
-- binding's tenant path (text[]).
--   - A sender that carries a tenant (JWT claims of meshhook_limits.jwt_roles,
--     or meshhook_limits.tenant_id): its tenant is written at the path.
--   - An admin (superuser, service_role, meshhook_limits_admin): as written.
--   - A request with JWT claims but no tenant (anon), or a session with
--     meshhook_limits.tenant_id set whose tenant does not count here (code
--     run for someone else: CREATE INDEX, ANALYZE): refused, 42501.
--   - Any other role (the application's backend, granted INSERT by the
--     operator): as written; it is trusted with the tenant, as pg-boss's
--     senders are.
-- A message must be a JSON object (22023): its tenant is written into it.
CREATE FUNCTION meshhook_limits._stamp_sender_tenant() RETURNS trigger
LANGUAGE plpgsql VOLATILE SET search_path = pg_catalog, pg_temp AS $$
DECLARE
  path text[] := TG_ARGV[0]::text[];
  me uuid := meshhook_limits.current_tenant();
BEGIN
  IF me IS NULL THEN
    IF meshhook_limits.is_admin()
       OR (coalesce(pg_catalog.current_setting('request.jwt.claims', true), '') = ''
           AND coalesce(pg_catalog.current_setting('meshhook_limits.tenant_id', true), '') = '') THEN
      RETURN NEW;
    END IF;
    RAISE EXCEPTION 'a request without a tenant may not send to %', TG_TABLE_NAME USING ERRCODE = '42501',
      HINT = 'send with a JWT whose claims carry the tenant id (meshhook_limits.tenant_claim)';
  END IF;
  IF pg_catalog.jsonb_typeof(NEW.message) IS DISTINCT FROM 'object' THEN
    RAISE EXCEPTION 'messages of % must be JSON objects', TG_TABLE_NAME USING ERRCODE = '22023',
      HINT = 'the sender''s tenant is written into the message at the queue''s tenant path';
  END IF;
  FOR i IN 1 .. pg_catalog.array_length(path, 1) - 1 LOOP
    IF pg_catalog.jsonb_typeof(NEW.message OPERATOR(pg_catalog.#>) path[1:i]) IS DISTINCT FROM 'object' THEN
      NEW.message := pg_catalog.jsonb_set(NEW.message, path[1:i], '{}'::jsonb, true);
    END IF;
  END LOOP;
  NEW.message := pg_catalog.jsonb_set(NEW.message, path, pg_catalog.to_jsonb(me::text), true);
  RETURN NEW;
END
$$;
REVOKE EXECUTE ON FUNCTION meshhook_limits._stamp_sender_tenant() FROM PUBLIC;

CREATE FUNCTION meshhook_limits.bind_queue(source text, queue text, tenant_path text DEFAULT 'tenant_id',
    project_path text DEFAULT NULL, key_path text DEFAULT NULL, cost_path text DEFAULT NULL,
    sender_tenant boolean DEFAULT false)
RETURNS void LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
#variable_conflict use_column
DECLARE
  rel regclass;
  tp text[]; pp text[]; kp text[]; cp text[];
  b meshhook_limits.queue_bindings;
  idx name;
  why text; why_hint text;
BEGIN
  PERFORM meshhook_limits.require_admin_access('bind queues');
  rel := meshhook_limits._queue_relation(bind_queue.source, bind_queue.queue);
  -- Owned by roles the binder controls (_queue_distrust).
  SELECT d.problem, d.hint INTO why, why_hint FROM meshhook_limits._queue_distrust(rel) d LIMIT 1;
  IF FOUND THEN
    RAISE EXCEPTION 'cannot bind % queue %: %', bind_queue.source, quote_literal(left(bind_queue.queue, 80)), why
      USING ERRCODE = '42501', HINT = why_hint;
  END IF;
  IF bind_queue.tenant_path IS NULL THEN
    RAISE EXCEPTION 'tenant_path must not be NULL' USING ERRCODE = '22023';
  END IF;
  IF bind_queue.sender_tenant IS NULL OR (bind_queue.sender_tenant AND bind_queue.source <> 'pgmq') THEN
    RAISE EXCEPTION 'sender_tenant is true or false, and true only for pgmq' USING ERRCODE = '22023',
      HINT = 'pg-boss jobs are sent by the application''s own backend, which names their tenant (docs/security.md)';
  END IF;
  tp := meshhook_limits._json_path(bind_queue.tenant_path, 'tenant_path');
  pp := meshhook_limits._json_path(bind_queue.project_path, 'project_path');
  kp := meshhook_limits._json_path(bind_queue.key_path, 'key_path');
  cp := meshhook_limits._json_path(bind_queue.cost_path, 'cost_path');
  SELECT * INTO b FROM meshhook_limits.queue_bindings qb
   WHERE qb.source = bind_queue.source AND qb.queue = bind_queue.queue FOR UPDATE;
  IF FOUND THEN
    IF b.tenant_path = tp AND b.relation = rel AND b.project_path IS NOT DISTINCT FROM pp
       AND b.key_path IS NOT DISTINCT FROM kp AND b.cost_path IS NOT DISTINCT FROM cp
       AND b.sender_tenant = bind_queue.sender_tenant THEN
      RETURN;
    END IF;
    -- Other paths, another index: bound again (its claimed jobs are followed
    -- through the retired binding).
    PERFORM meshhook_limits.unbind_queue(bind_queue.source, bind_queue.queue);
  END IF;
  INSERT INTO meshhook_limits.queue_bindings (source, queue, tenant_path, project_path, key_path, cost_path,
                                              relation, index_name, sender_tenant)
  VALUES (bind_queue.source, bind_queue.queue, tp, pp, kp, cp, rel, '-', bind_queue.sender_tenant)
  RETURNING * INTO b;
  idx := 'meshhook_claim_' || b.id;
  UPDATE meshhook_limits.queue_bindings qb SET index_name = idx WHERE qb.id = b.id
  RETURNING * INTO b;
  PERFORM meshhook_limits._create_claim_index(b);
  -- The triggers end a claimed job's slot in the transaction that ends the
  -- job (_claim_ended: shared memory only, no SQL in the queue's statements).
  IF bind_queue.source = 'pgboss' THEN
    EXECUTE pg_catalog.format(
      'CREATE TRIGGER %I AFTER UPDATE ON pgboss.job FOR EACH ROW WHEN (OLD.name OPERATOR(pg_catalog.=) %L '
      'AND OLD.state OPERATOR(pg_catalog.=) %L::pgboss.job_state AND NEW.state OPERATOR(pg_catalog.<>) %L::pgboss.job_state) '
      'EXECUTE FUNCTION meshhook_limits._claim_ended(%L, %L)',
      idx || '_ended', bind_queue.queue, 'active', 'active', b.id, 'pgboss');
    EXECUTE pg_catalog.format(
      'CREATE TRIGGER %I AFTER DELETE ON pgboss.job FOR EACH ROW WHEN (OLD.name OPERATOR(pg_catalog.=) %L '
      'AND OLD.state OPERATOR(pg_catalog.=) %L::pgboss.job_state) '
      'EXECUTE FUNCTION meshhook_limits._claim_ended(%L, %L)',
      idx || '_deleted', bind_queue.queue, 'active', b.id, 'pgboss');
  ELSE
    EXECUTE pg_catalog.format(
      'CREATE TRIGGER %I AFTER DELETE ON %s FOR EACH ROW EXECUTE FUNCTION meshhook_limits._claim_ended(%L, %L)',
      idx || '_deleted', rel, b.id, 'pgmq');
    -- A message's tenant is its sender's (_stamp_sender_tenant), before any
    -- other trigger of ours sees it.
    IF bind_queue.sender_tenant THEN
      EXECUTE pg_catalog.format(
        'CREATE TRIGGER %I BEFORE INSERT OR UPDATE OF message ON %s FOR EACH ROW '
        'EXECUTE FUNCTION meshhook_limits._stamp_sender_tenant(%L)', idx || '_sender', rel, tp::text);
    END IF;
  END IF;
END
$$;
COMMENT ON FUNCTION meshhook_limits.bind_queue(text, text, text, text, text, text, boolean) IS
  'Admin: where a pg-boss or pgmq queue''s jobs name their tenant, project, concurrency key and cost; adds the claim index; sender_tenant (pgmq): each message''s tenant is its sender''s. See docs/claiming.md.';

CREATE FUNCTION meshhook_limits.unbind_queue(source text, queue text)
RETURNS boolean LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
#variable_conflict use_column
DECLARE
  b meshhook_limits.queue_bindings;
  t name;
BEGIN
  PERFORM meshhook_limits.require_admin_access('unbind queues');
  DELETE FROM meshhook_limits.queue_bindings qb
   WHERE qb.source = unbind_queue.source AND qb.queue = unbind_queue.queue
  RETURNING * INTO b;
  IF NOT FOUND THEN
    RETURN false;
  END IF;
  -- Its claimed jobs that still run keep their slots until they end: the
  -- tick follows them through the retired binding.
  INSERT INTO meshhook_limits.retired_bindings (id, source, queue, tenant_path, project_path, key_path, cost_path,
                                                relation, index_name, created_at, sender_tenant)
  VALUES (b.id, b.source, b.queue, b.tenant_path, b.project_path, b.key_path, b.cost_path, b.relation,
          b.index_name, b.created_at, b.sender_tenant)
  ON CONFLICT (id) DO NOTHING;
  -- Only the index and triggers bind_queue made: on the queue table.
  FOR t IN SELECT c.relname FROM pg_catalog.pg_index i JOIN pg_catalog.pg_class c ON c.oid = i.indexrelid
            WHERE i.indrelid = b.relation AND c.relname IN (b.index_name, b.index_name || '_due', b.index_name || '_at') LOOP
    EXECUTE pg_catalog.format('DROP INDEX %I.%I',
      (SELECT n.nspname FROM pg_catalog.pg_class c JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
        WHERE c.oid = b.relation), t);
  END LOOP;
  FOR t IN SELECT tg.tgname FROM pg_catalog.pg_trigger tg
            WHERE tg.tgrelid = b.relation AND NOT tg.tgisinternal
              AND tg.tgname IN (b.index_name || '_ended', b.index_name || '_deleted', b.index_name || '_sender') LOOP
    EXECUTE pg_catalog.format('DROP TRIGGER %I ON %s', t, b.relation);
  END LOOP;
  RETURN true;
END
$$;
COMMENT ON FUNCTION meshhook_limits.unbind_queue(text, text) IS
  'Admin: forget a queue binding and drop its claim index. Claimed jobs keep their slots until they end (the tick follows them).';

-- The binding, for claim_jobs (which runs as its caller, an admin).
-- EXECUTE stays with PUBLIC, as for _claim_queries, _claim_slot and
-- _claim_shares: claim_jobs calls them as its caller, and each refuses any
-- caller but an admin.
CREATE FUNCTION meshhook_limits._queue_binding(p_source text, p_queue text)
RETURNS meshhook_limits.queue_bindings
LANGUAGE plpgsql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
  b meshhook_limits.queue_bindings;
BEGIN
  PERFORM meshhook_limits.require_admin_access('claim jobs');
  SELECT * INTO b FROM meshhook_limits.queue_bindings qb WHERE qb.source = p_source AND qb.queue = p_queue;
  IF NOT FOUND THEN
    RAISE EXCEPTION 'queue % of % is not bound', coalesce(quote_literal(left(p_queue, 80)), 'NULL'),
      coalesce(quote_literal(left(p_source, 40)), 'NULL')
      USING ERRCODE = '22023', HINT = 'an admin binds it with meshhook_limits.bind_queue(source, queue, tenant_path)';
  END IF;
  -- A queue dropped (and perhaps created again) after it was bound: its
  -- table, index and triggers are gone.
  IF NOT EXISTS (SELECT 1 FROM pg_catalog.pg_class c WHERE c.oid = b.relation) THEN
    RAISE EXCEPTION 'queue % of % was dropped after it was bound', quote_literal(left(p_queue, 80)),
      quote_literal(p_source)
      USING ERRCODE = '55000', HINT = 'bind it again with meshhook_limits.bind_queue (or unbind it)';
  END IF;
  -- The claim statements name pg-boss's table: it must still be this one.
  IF b.source = 'pgboss' AND pg_catalog.to_regclass('pgboss.job') IS DISTINCT FROM b.relation THEN
    RAISE EXCEPTION 'pgboss.job is no longer the table queue % was bound on', quote_literal(left(p_queue, 80))
      USING ERRCODE = '55000', HINT = 'bind it again with meshhook_limits.bind_queue (or unbind it)';
  END IF;
  RETURN b;
END
$$;

-- The major version of pg-boss in this database, from its schema: 12 has
-- columns 11 has not (blocked, heartbeat_on); NULL without pg-boss.
CREATE FUNCTION meshhook_limits._pgboss_major() RETURNS integer
LANGUAGE sql STABLE SET search_path = pg_catalog, pg_temp AS $$
  SELECT CASE WHEN pg_catalog.to_regclass('pgboss.job') IS NULL THEN NULL
              WHEN EXISTS (SELECT 1 FROM pg_catalog.pg_attribute a
                            WHERE a.attrelid = pg_catalog.to_regclass('pgboss.job') AND a.attname = 'blocked'
                              AND NOT a.attisdropped) THEN 12
              ELSE 11 END
$$;
REVOKE EXECUTE ON FUNCTION meshhook_limits._pgboss_major() FROM PUBLIC;
