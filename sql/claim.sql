-- meshhook_limits: claiming jobs from pg-boss and pgmq with their slots, fairly.
--
-- bind_queue says where a queue's jobs name their tenant, project,
-- concurrency key and cost, and adds an index on the queue table that
-- orders each tenant's waiting jobs as the queue's own fetch does.
-- claim_jobs walks that index one tenant at a time (a skip scan: its cost
-- follows the tenants with waiting jobs, not the backlog), serves the tenant
-- furthest below its fair_share_weight's share of claimed cost first
-- (start-time fair queuing, src/slots/fair.rs), takes each job's
-- slot (_claim_slot: tenant, project, key and total limits at once) and
-- marks the job taken exactly as boss.fetch() or pgmq.read() would. Jobs
-- whose limits have no room are not touched. The slot's run id is
-- claim/<binding id>/<job id>[/<read_ct>]; a trigger on the queue table
-- ends it in the transaction that ends the job (_claim_ended), and the
-- tick ends what no trigger sees (_end_claims). docs/claiming.md has the
-- algorithm and its bounds.

CREATE TABLE meshhook_limits.queue_bindings (
  id bigint GENERATED ALWAYS AS IDENTITY UNIQUE,
  source text NOT NULL CHECK (source IN ('pgboss', 'pgmq')),
  queue text NOT NULL,
  -- Paths into the job's JSON (pg-boss data, pgmq message), as text[] for #>>.
  tenant_path text[] NOT NULL,
  project_path text[],
  key_path text[],
  cost_path text[],
  -- The queue table and the index bind_queue created on it.
  relation regclass NOT NULL,
  index_name name NOT NULL,
  created_at timestamptz NOT NULL DEFAULT pg_catalog.now(),
  -- pgmq: a message's tenant is its sender's, written by a trigger
  -- (bind_queue's sender_tenant, _stamp_sender_tenant).
  sender_tenant boolean NOT NULL DEFAULT false,
  PRIMARY KEY (source, queue)
);
SELECT pg_catalog.pg_extension_config_dump('meshhook_limits.queue_bindings', '');
ALTER TABLE meshhook_limits.queue_bindings ENABLE ROW LEVEL SECURITY;
CREATE POLICY admin_all ON meshhook_limits.queue_bindings FOR SELECT USING ((SELECT meshhook_limits.can_monitor()));
GRANT SELECT ON meshhook_limits.queue_bindings TO PUBLIC;

-- Bindings that were unbound (or replaced by bind_queue) while jobs claimed
-- through them still ran: the tick keeps following those jobs and ends
-- their slots when they end, as for a bound queue, then forgets the
-- binding (_end_claims). Not dumped: after a restore there are no slots.
CREATE TABLE meshhook_limits.retired_bindings (
  LIKE meshhook_limits.queue_bindings,
  retired_at timestamptz NOT NULL DEFAULT pg_catalog.now(),
  PRIMARY KEY (id)
);
ALTER TABLE meshhook_limits.retired_bindings ENABLE ROW LEVEL SECURITY;
CREATE POLICY admin_all ON meshhook_limits.retired_bindings FOR SELECT USING ((SELECT meshhook_limits.can_monitor()));
GRANT SELECT ON meshhook_limits.retired_bindings TO PUBLIC;

-- 'a.b.c' -> '{a,b,c}'; 22023 for anything else.
CREATE FUNCTION meshhook_limits._json_path(p_path text, p_what text) RETURNS text[]
LANGUAGE plpgsql IMMUTABLE SET search_path = pg_catalog, pg_temp AS $$
BEGIN
  IF p_path IS NULL THEN
    RETURN NULL;
  END IF;
  IF p_path !~ '^[A-Za-z0-9_-]{1,63}(\.[A-Za-z0-9_-]{1,63}){0,7}$' THEN
    RAISE EXCEPTION 'invalid % %', p_what, quote_literal(left(p_path, 80))
      USING ERRCODE = '22023',
            HINT = 'a path is up to 8 dot-separated keys of letters, digits, _ and -, e.g. ''tenant_id'' or ''meta.tenant''';
  END IF;
  RETURN pg_catalog.string_to_array(p_path, '.');
END
$$;
REVOKE EXECUTE ON FUNCTION meshhook_limits._json_path(text, text) FROM PUBLIC;

-- The table of a queue, checked: a plain or partitioned table whose JSON
-- column is jsonb (never a view or a type of someone else's). 22023 when
-- the queue system or the queue does not exist.
CREATE FUNCTION meshhook_limits._queue_relation(p_source text, p_queue text) RETURNS regclass
LANGUAGE plpgsql STABLE SET search_path = pg_catalog, pg_temp AS $$
DECLARE
  rel regclass;
  col text := CASE p_source WHEN 'pgboss' THEN 'data' ELSE 'message' END;
BEGIN
  IF p_source IS NULL OR p_source NOT IN ('pgboss', 'pgmq') THEN
    RAISE EXCEPTION 'unknown queue source %', coalesce(quote_literal(left(p_source, 40)), 'NULL')
      USING ERRCODE = '22023', HINT = 'source is ''pgboss'' or ''pgmq''';
  END IF;
  IF p_queue IS NULL OR p_queue = '' OR length(p_queue) > 200 THEN
    RAISE EXCEPTION 'queue must be a queue name' USING ERRCODE = '22023',
      HINT = 'pass the name the queue was created with (1 to 200 characters)';
  END IF;
  IF p_source = 'pgboss' THEN
    rel := pg_catalog.to_regclass('pgboss.job');
    IF rel IS NULL OR pg_catalog.to_regclass('pgboss.queue') IS NULL THEN
      RAISE EXCEPTION 'pg-boss is not installed in this database' USING ERRCODE = '22023',
        HINT = 'start pg-boss (version 11) against this database first';
    END IF;
    -- pgboss.queue is read as its owner: it is another role's table.
    IF NOT (meshhook_limits._read_as_owner(pg_catalog.to_regclass('pgboss.queue'),
              pg_catalog.format('SELECT pg_catalog.to_jsonb(EXISTS (SELECT 1 FROM pgboss.queue q WHERE q.name = %L))',
                                p_queue)))::text::boolean THEN
      RAISE EXCEPTION 'unknown pg-boss queue %', quote_literal(left(p_queue, 80)) USING ERRCODE = '22023',
        HINT = 'create it with boss.createQueue(name) first';
    END IF;
  ELSE
    IF pg_catalog.to_regclass('pgmq.meta') IS NULL THEN
      RAISE EXCEPTION 'pgmq is not installed in this database' USING ERRCODE = '22023',
        HINT = 'install pgmq (CREATE EXTENSION pgmq, or its SQL) and create the queue first';
    END IF;
    IF NOT (meshhook_limits._read_as_owner(pg_catalog.to_regclass('pgmq.meta'),
              pg_catalog.format('SELECT pg_catalog.to_jsonb(EXISTS (SELECT 1 FROM pgmq.meta m WHERE m.queue_name = %L))',
                                p_queue)))::text::boolean THEN
      RAISE EXCEPTION 'unknown pgmq queue %', quote_literal(left(p_queue, 80)) USING ERRCODE = '22023',
        HINT = 'create it with pgmq.create(name) first';
    END IF;
    rel := pg_catalog.to_regclass(pg_catalog.format('pgmq.%I', 'q_' || pg_catalog.lower(p_queue)));
    IF rel IS NULL THEN
      RAISE EXCEPTION 'pgmq queue % has no table', quote_literal(left(p_queue, 80)) USING ERRCODE = '22023';
    END IF;
  END IF;
  IF NOT EXISTS (SELECT 1 FROM pg_catalog.pg_class c
                   JOIN pg_catalog.pg_attribute a ON a.attrelid = c.oid AND a.attname = col AND NOT a.attisdropped
                  WHERE c.oid = rel AND c.relkind IN ('r', 'p') AND a.atttypid = 'pg_catalog.jsonb'::pg_catalog.regtype) THEN
    RAISE EXCEPTION '% is not a queue table meshhook_limits can claim from', rel USING ERRCODE = '22023',
      HINT = 'it must be a table with a jsonb column ' || col;
  END IF;
  RETURN rel;
END
$$;
REVOKE EXECUTE ON FUNCTION meshhook_limits._queue_relation(text, text) FROM PUBLIC;

-- Every table below a queue table, partitions and plain inheritance
-- children alike, at any depth: statements on the queue table reach them
-- and fire their triggers.
CREATE FUNCTION meshhook_limits._queue_descendants(p_rel regclass) RETURNS TABLE(oid oid)
LANGUAGE sql STABLE SET search_path = pg_catalog, pg_temp AS $$
  WITH RECURSIVE kids(oid) AS (
    SELECT i.inhrelid FROM pg_catalog.pg_inherits i WHERE i.inhparent = p_rel
    UNION
    SELECT i.inhrelid FROM pg_catalog.pg_inherits i JOIN kids k ON i.inhparent = k.oid)
  SELECT kids.oid FROM kids
$$;
REVOKE EXECUTE ON FUNCTION meshhook_limits._queue_descendants(regclass) FROM PUBLIC;

-- Why bind_queue must not bind a queue table, as (problem, hint) rows,
-- none when it may: against squatting, its schema, the table, its
-- partitions and the functions in the schema (which workers call) must each
-- be owned by a role the caller of bind_queue controls
-- (_caller_controls: itself, a role it is a member of, or a superuser). A
-- schema someone else made before the queue system was installed (CREATE
-- SCHEMA IF NOT EXISTS keeps it) lets its owner replace the queue's
-- objects; a table someone else owns is theirs to read and rewrite.
-- (claim_jobs checks the claiming role's own trust in the owners on every
-- call: src/claim/mod.rs.)
CREATE FUNCTION meshhook_limits._queue_distrust(p_rel regclass)
RETURNS TABLE(problem text, hint text)
LANGUAGE sql STABLE SET search_path = pg_catalog, pg_temp AS $$
  WITH t AS (
    SELECT c.oid, c.relowner, n.oid AS nsp, n.nspname, n.nspowner
      FROM pg_catalog.pg_class c JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
     WHERE c.oid = p_rel),
  parts AS (
    SELECT d.oid FROM meshhook_limits._queue_descendants(p_rel) d UNION SELECT p_rel::oid)
  SELECT pg_catalog.format('schema %I is owned by role %I, which the role binding the queue does not control',
                           t.nspname, t.nspowner::regrole::text),
         pg_catalog.format('if %1$s is meant to own the queue, GRANT %1$s TO the binding role; otherwise the schema was '
                           'made by someone else before the queue system was installed: drop it and install again',
                           t.nspowner::regrole::text)
    FROM t WHERE NOT meshhook_limits._caller_controls(t.nspowner)
  UNION ALL
  SELECT pg_catalog.format('queue table %s is owned by role %I, which the role binding the queue does not control',
                           c.oid::regclass, c.relowner::regrole::text),
         pg_catalog.format('if %1$s is meant to own the queue, GRANT %1$s TO the binding role; otherwise create the '
                           'queue again as a role you control', c.relowner::regrole::text)
    FROM parts JOIN pg_catalog.pg_class c ON c.oid = parts.oid
   WHERE NOT meshhook_limits._caller_controls(c.relowner)
  UNION ALL
  -- The workers call the queue system's functions (pgmq.archive): their
  -- owners can rewrite them.
  SELECT pg_catalog.format('function %s is owned by role %I, which the role binding the queue does not control',
                           p.oid::regprocedure, p.proowner::regrole::text),
         pg_catalog.format('workers call the functions in schema %1$I: if %2$s is meant to own %3$s, GRANT %2$s TO the '
                           'binding role; otherwise drop the function or give it to the schema''s owner',
                           t.nspname, p.proowner::regrole::text, p.oid::regprocedure)
    FROM t JOIN pg_catalog.pg_proc p ON p.pronamespace = t.nsp
   WHERE NOT meshhook_limits._caller_controls(p.proowner)
$$;
REVOKE EXECUTE ON FUNCTION meshhook_limits._queue_distrust(regclass) FROM PUBLIC;

-- The JSON text at a path of a job, as SQL (over the alias j, or none for
-- the index): the index expression and every query that must use the
-- index spell it the same way.
CREATE FUNCTION meshhook_limits._path_sql(p_source text, p_path text[], p_alias text DEFAULT 'j.') RETURNS text
LANGUAGE sql IMMUTABLE SET search_path = pg_catalog, pg_temp AS $$
  SELECT CASE WHEN p_path IS NULL THEN 'NULL::text'
    ELSE pg_catalog.format('(%s%I OPERATOR(pg_catalog.#>>) %L::text[])', p_alias,
                           CASE p_source WHEN 'pgboss' THEN 'data' ELSE 'message' END, p_path) END
$$;
REVOKE EXECUTE ON FUNCTION meshhook_limits._path_sql(text, text[], text) FROM PUBLIC;

-- The tenant of a job as the claim index holds it: the text at the tenant
-- path, NULL when longer than 64 bytes (no tenant id is; and an index entry
-- has a size limit a job must not be able to break), in the "C" collation
-- (byte order: the database's own collation costs a strcoll per comparison
-- in every probe).
CREATE FUNCTION meshhook_limits._tenant_sql(p_source text, p_path text[], p_alias text DEFAULT 'j.') RETURNS text
LANGUAGE sql IMMUTABLE SET search_path = pg_catalog, pg_temp AS $$
  SELECT pg_catalog.format('((CASE WHEN pg_catalog.octet_length(%1$s) OPERATOR(pg_catalog.<=) 64 THEN %1$s END) COLLATE pg_catalog."C")',
                           meshhook_limits._path_sql(p_source, p_path, p_alias))
$$;
REVOKE EXECUTE ON FUNCTION meshhook_limits._tenant_sql(text, text[], text) FROM PUBLIC;

-- The key of a job in the claim index: its tenant (_tenant_sql), or NULL
-- when the job can never be claimed: a tenant or project that is not a
-- uuid (so values anyone who may enqueue writes, junk or not, add no
-- tenants for the skip scan to visit; issue 19), an empty
-- or over-long (200 bytes) concurrency key, a cost that is not a whole
-- number from 1 to 1,000,000 (as claim_jobs parses them, src/claim/mod.rs).
-- Such a job is out of its tenant's range, so it never stands in front of
-- the tenant's claimable jobs, and is left as it is (counted as invalid).
-- The checks are one C function (_claim_key, src/claim/key.rs): both claim
-- indexes compute the key on every send, and regular expressions here made
-- sends into a bound queue twice as dear.
CREATE FUNCTION meshhook_limits._claim_key_sql(b meshhook_limits.queue_bindings, p_alias text DEFAULT 'j.')
RETURNS text
LANGUAGE sql IMMUTABLE SET search_path = pg_catalog, pg_temp AS $$
  SELECT pg_catalog.format('(meshhook_limits._claim_key(%s, %s, %s, %s) COLLATE pg_catalog."C")',
    meshhook_limits._path_sql(b.source, b.tenant_path, p_alias),
    meshhook_limits._path_sql(b.source, b.project_path, p_alias),
    meshhook_limits._path_sql(b.source, b.key_path, p_alias),
    meshhook_limits._path_sql(b.source, b.cost_path, p_alias))
$$;
REVOKE EXECUTE ON FUNCTION meshhook_limits._claim_key_sql(meshhook_limits.queue_bindings, text) FROM PUBLIC;

-- The claim indexes of a binding, built in the caller's transaction
-- (writers of the queue wait meanwhile):
--   <index_name>:      each tenant's waiting jobs in the queue's own order
--                      (the head of a tenant's jobs, what claim_jobs takes),
--                      with when each is due last, so the head statement
--                      passes deferred jobs on the index alone, never
--                      reading them from the table;
--   <index_name>_due:  each tenant's waiting jobs by when they are due
--                      (pg-boss start_after, pgmq vt; pg-boss 12: not held
--                      by a flow), for the skip scan over the tenants: its
--                      first entry per tenant says whether the tenant has a
--                      job due at all, so tenants whose jobs are all
--                      deferred cost one probe a scan, never a walk through
--                      their jobs (issue 19, item 3).
CREATE FUNCTION meshhook_limits._create_claim_index(b meshhook_limits.queue_bindings)
RETURNS void
LANGUAGE plpgsql VOLATILE SET search_path = pg_catalog, pg_temp AS $$
BEGIN
  IF b.source = 'pgboss' THEN
    EXECUTE pg_catalog.format(
      'CREATE INDEX %I ON pgboss.job (%s, priority DESC, created_on, id, start_after) WHERE name = %L AND state OPERATOR(pg_catalog.<) %L::pgboss.job_state',
      b.index_name, meshhook_limits._claim_key_sql(b, ''), b.queue, 'active');
    EXECUTE pg_catalog.format(
      'CREATE INDEX %I ON pgboss.job (%s, start_after) WHERE name = %L AND state OPERATOR(pg_catalog.<) %L::pgboss.job_state%s',
      b.index_name || '_due', meshhook_limits._claim_key_sql(b, ''), b.queue, 'active',
      CASE WHEN meshhook_limits._pgboss_major() >= 12 THEN ' AND NOT blocked' ELSE '' END);
  ELSE
    EXECUTE pg_catalog.format('CREATE INDEX %I ON %s (%s, msg_id, vt)', b.index_name, b.relation,
      meshhook_limits._claim_key_sql(b, ''));
    EXECUTE pg_catalog.format('CREATE INDEX %I ON %s (%s, vt)', b.index_name || '_due', b.relation,
      meshhook_limits._claim_key_sql(b, ''));
  END IF;
END
$$;
REVOKE EXECUTE ON FUNCTION meshhook_limits._create_claim_index(meshhook_limits.queue_bindings) FROM PUBLIC;

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
            WHERE i.indrelid = b.relation AND c.relname IN (b.index_name, b.index_name || '_due') LOOP
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

-- The statements claim_jobs (src/claim/mod.rs) runs for a binding, built once
-- per backend and binding and kept as prepared plans:
--   tenants: a skip scan over the _due index, one index probe per tenant
--            with waiting jobs, in chunks ($1 text: the tenants after this
--            one, '' from the first; $2 integer: at most so many): (tenant
--            text, when its first job is due, whether that is now); and,
--            in the first chunk, a row with a NULL tenant when jobs name no
--            tenant;
--   head:    a tenant's next job in the queue's own order, locked,
--            skipping the jobs this call passed over or claimed ($1 tenant
--            text, $2 text[] job ids): (id, data, project, key, cost, gen,
--            queued at, whether its queue's policy allows one active job per
--            key, retry count);
--   take:    what the queue's own fetch does to the jobs it takes, for the
--            call's claimed jobs at once (a job of a one-active policy at
--            once, so the next head sees it active) ($1 text[] job ids;
--            pgmq: $2 the visibility timeout).
-- Every path expression is spelt as in the index (_path_sql), so the planner
-- uses it.
CREATE FUNCTION meshhook_limits._claim_queries(p_binding bigint)
RETURNS TABLE(tenants_q text, head_q text, take_q text)
LANGUAGE plpgsql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
  b meshhook_limits.queue_bindings;
  t_sql text; p_sql text; k_sql text; c_sql text;
  waiting text;   -- the queue's waiting jobs, as in the index predicate
  rel text;
  v12 boolean;
  conds text;     -- pg-boss: what else the queue's fetch asks of a job it takes
  cols text;      -- the head statements' columns
BEGIN
  PERFORM meshhook_limits.require_admin_access('claim jobs');
  SELECT * INTO STRICT b FROM meshhook_limits.queue_bindings qb WHERE qb.id = p_binding;
  t_sql := meshhook_limits._claim_key_sql(b);
  p_sql := meshhook_limits._path_sql(b.source, b.project_path);
  k_sql := meshhook_limits._path_sql(b.source, b.key_path);
  c_sql := meshhook_limits._path_sql(b.source, b.cost_path);
  IF b.source = 'pgboss' THEN
    rel := 'pgboss.job';
    waiting := pg_catalog.format('j.name = %L AND j.state < %L', b.queue, 'active');
  ELSE
    rel := b.relation::text;
    waiting := 'true';
  END IF;
  -- Over the _due index: per tenant, when its first job is due, and
  -- whether that is now (a tenant whose jobs are all deferred is left out
  -- by claim_jobs, without a probe of its jobs). A chunk of a scan: at most
  -- $2 tenants, from the first after $1 ('' for the first chunk, which also
  -- tells whether jobs without a tenant wait).
  tenants_q := pg_catalog.format($q$
    WITH RECURSIVE t(tenant, at, n) AS (
      (SELECT %1$s, %4$s, 1 FROM %2$s j WHERE %3$s AND %1$s > $1 ORDER BY %1$s, %4$s LIMIT 1)
      UNION ALL
      SELECT x.tenant, x.at, t.n + 1 FROM t, LATERAL (
        SELECT %1$s AS tenant, %4$s AS at FROM %2$s j WHERE %3$s AND %1$s > t.tenant ORDER BY %1$s, %4$s LIMIT 1) x
       WHERE t.n < $2)
    SELECT tenant, at, at %5$s FROM t
    UNION ALL
    (SELECT NULL, NULL, true FROM %2$s j WHERE $1 = '' AND %3$s AND %1$s IS NULL LIMIT 1) $q$,
    t_sql, rel,
    CASE WHEN b.source = 'pgboss' AND meshhook_limits._pgboss_major() >= 12 THEN waiting || ' AND NOT j.blocked'
         ELSE waiting END,
    CASE b.source WHEN 'pgboss' THEN 'j.start_after' ELSE 'j.vt' END,
    CASE WHEN b.source = 'pgmq' THEN '<= pg_catalog.clock_timestamp()'
         WHEN meshhook_limits._pgboss_major() >= 12 THEN '<= pg_catalog.now()'
         ELSE '< pg_catalog.now()' END);
  IF b.source = 'pgboss' THEN
    v12 := meshhook_limits._pgboss_major() >= 12;
    -- Queues whose policy allows one active job per singleton key (pg-boss's
    -- unique indexes job_i2, job_i3, job_i6): a job whose key has one
    -- active is not taken, as boss.fetch() could not take it. pg-boss 12
    -- also: never a job blocked by its dependencies (boss.flow), start_after
    -- due as 12 spells it (<=, 11: <), and for key_strict_fifo only the head
    -- of its key (a retry first, then the oldest), when no job of the key is
    -- active, retried or failed (pg-boss's strict_fifo_heads, and its unique
    -- index job_i8): taken at once, so the next head statement sees it.
    -- The head: the tenant's next job in the queue's order, locked. Its
    -- start_after test is on the claim index's last column: deferred jobs
    -- at the front of the tenant's range are passed over on the index.
    conds := pg_catalog.format($q$
         AND j.start_after %1$s pg_catalog.now()
         AND (j.policy IS NULL OR j.policy NOT IN ('singleton', 'stately', 'exclusive')
              OR NOT EXISTS (SELECT 1 FROM pgboss.job a
                              WHERE a.name = j.name AND a.state = 'active' AND a.policy = j.policy
                                AND coalesce(a.singleton_key, '') = coalesce(j.singleton_key, ''))) %2$s $q$,
      CASE WHEN v12 THEN '<=' ELSE '<' END,
      CASE WHEN v12 THEN $v12$
         AND NOT j.blocked
         AND (j.policy IS DISTINCT FROM 'key_strict_fifo'
              OR (NOT EXISTS (SELECT 1 FROM pgboss.job b
                               WHERE b.name = j.name AND b.singleton_key = j.singleton_key AND b.id <> j.id
                                 AND b.state IN ('active', 'retry', 'failed') AND b.policy = 'key_strict_fifo')
                  AND NOT EXISTS (SELECT 1 FROM pgboss.job h
                               WHERE h.name = j.name AND h.singleton_key = j.singleton_key AND h.id <> j.id
                                 AND h.state < 'active' AND NOT h.blocked AND h.policy = 'key_strict_fifo'
                                 AND h.start_after <= pg_catalog.now()
                                 AND (h.state > j.state OR (h.state = j.state AND (h.created_on, h.id) < (j.created_on, j.id))))))
        $v12$ ELSE '' END);
    cols := pg_catalog.format($q$
      SELECT j.id::text AS id, j.data AS data, %1$s AS project, %2$s AS key, %3$s AS cost, NULL::text AS gen,
             j.created_on AS at,
             coalesce(j.policy IN ('singleton', 'stately', 'exclusive', 'key_strict_fifo'), false) AS one_active,
             CASE WHEN j.started_on IS NOT NULL THEN j.retry_count + 1 ELSE j.retry_count END AS retry_count $q$,
      p_sql, k_sql, c_sql);
    head_q := pg_catalog.format($q$ %1$s
        FROM pgboss.job j
       WHERE %2$s AND %3$s = $1 AND j.id::text <> ALL ($2) %4$s
       ORDER BY %5$s, j.priority DESC, j.created_on, j.id LIMIT 1 FOR UPDATE OF j SKIP LOCKED $q$,
      cols, waiting, t_sql, conds, t_sql);
    -- What boss.fetch() does to a job it takes (12 also starts its
    -- heartbeat clock, which 12's supervisor fails a silent job by).
    take_q := pg_catalog.format($q$
      UPDATE pgboss.job j SET state = 'active', started_on = pg_catalog.now(), %s
             retry_count = CASE WHEN j.started_on IS NOT NULL THEN j.retry_count + 1 ELSE j.retry_count END
       WHERE j.name = %L AND j.id = ANY ($1::uuid[]) $q$,
      CASE WHEN v12 THEN 'heartbeat_on = pg_catalog.now(),' ELSE '' END, b.queue);
  ELSE
    -- retry_count: the reads before this one (read_ct after it, less one).
    -- The tenant as a range (>= and <=, not =): with =, the planner may
    -- walk the queue's primary key in msg_id order instead (the tenant is
    -- then a constant of the order), past every other tenant's messages.
    -- Visible as of the transaction's start (now(), unlike
    -- clock_timestamp(), is a condition on the claim index's vt column, so
    -- messages not visible yet are passed over on the index).
    cols := pg_catalog.format($q$
      SELECT j.msg_id::text AS id, j.message AS data, %1$s AS project, %2$s AS key, %3$s AS cost,
             (j.read_ct + 1)::text AS gen, j.enqueued_at AS at, false AS one_active, j.read_ct AS retry_count $q$,
      p_sql, k_sql, c_sql);
    head_q := pg_catalog.format($q$ %1$s
        FROM %2$s j
       WHERE %3$s >= $1 AND %3$s <= $1 AND j.vt <= pg_catalog.now() AND j.msg_id::text <> ALL ($2)
       ORDER BY %3$s, j.msg_id LIMIT 1 FOR UPDATE OF j SKIP LOCKED $q$,
      cols, rel, t_sql);
    -- What pgmq.read(queue, vt, qty) does to the messages it returns.
    take_q := pg_catalog.format($q$
      UPDATE %s j SET vt = pg_catalog.clock_timestamp() + $2, read_ct = j.read_ct + 1,
             last_read_at = pg_catalog.clock_timestamp()
       WHERE j.msg_id = ANY ($1::bigint[]) $q$, rel);
  END IF;
  RETURN NEXT;
END
$$;

-- The tick's part: end the slots of claimed jobs that have ended, and keep
-- the others' leases. pg-boss: the job is no longer active, or was fetched
-- again after the claim (completed, failed, cancelled, expired by pg-boss's
-- maintenance, retried, deleted). pgmq: the message is gone (archived,
-- deleted), visible again (vt passed: the worker crashed or overran) or read
-- again. The queue tables are read as their owner (_read_as_owner).
CREATE FUNCTION meshhook_limits._end_claims() RETURNS integer
LANGUAGE plpgsql VOLATILE SET search_path = pg_catalog, pg_temp AS $$
DECLARE
  c record;
  b meshhook_limits.queue_bindings;
  alive jsonb;
  ended int := 0;
BEGIN
  FOR c IN SELECT s.binding_id,
                  pg_catalog.jsonb_agg(pg_catalog.jsonb_build_object(
                    'slot', s.slot_id, 'job', pg_catalog.split_part(s.job_id, '/', 1),
                    'gen', NULLIF(pg_catalog.split_part(s.job_id, '/', 2), ''),
                    'at', s.acquired_at)) AS claimed
             FROM meshhook_limits._claimed_slots() s GROUP BY s.binding_id LOOP
    SELECT * INTO b FROM meshhook_limits.queue_bindings qb WHERE qb.id = c.binding_id;
    IF NOT FOUND THEN
      -- Unbound since: its jobs are followed the same way.
      SELECT r.id, r.source, r.queue, r.tenant_path, r.project_path, r.key_path, r.cost_path, r.relation,
             r.index_name, r.created_at, r.sender_tenant
        INTO b FROM meshhook_limits.retired_bindings r WHERE r.id = c.binding_id;
      -- Neither (the extension was created again): they end with their leases.
      CONTINUE WHEN NOT FOUND;
    END IF;
    -- A dropped queue's jobs are gone: so are their claims.
    IF NOT EXISTS (SELECT 1 FROM pg_catalog.pg_class r WHERE r.oid = b.relation) THEN
      PERFORM meshhook_limits.release_execution_slot((e->>'slot')::uuid)
         FROM pg_catalog.jsonb_array_elements(c.claimed) e;
      ended := ended + pg_catalog.jsonb_array_length(c.claimed);
      CONTINUE;
    END IF;
    -- A queue whose owner is no longer trusted (_tick_reads; claim_jobs
    -- refuses it too) is not read: its claims end with their leases.
    CONTINUE WHEN NOT meshhook_limits._tick_reads(b.relation);
    BEGIN
      IF b.source = 'pgboss' THEN
        alive := meshhook_limits._read_as_owner(b.relation, pg_catalog.format($q$
          SELECT coalesce(pg_catalog.jsonb_agg(c.slot), '[]')
            FROM pg_catalog.jsonb_to_recordset(%L::jsonb) c(slot uuid, job text, at timestamptz)
            JOIN pgboss.job j ON j.name = %L
             AND j.id = CASE WHEN c.job ~ '^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$' THEN c.job::uuid END
           WHERE j.state = 'active' AND j.started_on <= c.at $q$, c.claimed, b.queue));
      ELSE
        alive := meshhook_limits._read_as_owner(b.relation, pg_catalog.format($q$
          SELECT coalesce(pg_catalog.jsonb_agg(c.slot), '[]')
            FROM pg_catalog.jsonb_to_recordset(%L::jsonb) c(slot uuid, job text, gen text)
            JOIN %s j ON j.msg_id = CASE WHEN c.job ~ '^[0-9]{1,18}$' THEN c.job::bigint END
           WHERE j.read_ct = CASE WHEN c.gen ~ '^[0-9]{1,9}$' THEN c.gen::int END
             AND j.vt > pg_catalog.clock_timestamp() $q$, c.claimed, b.relation));
      END IF;
    EXCEPTION WHEN OTHERS THEN
      RAISE WARNING 'meshhook_limits: checking claimed jobs of % queue % failed: %', b.source, b.queue, SQLERRM;
      CONTINUE;
    END;
    PERFORM meshhook_limits._renew_slots(ARRAY(SELECT x::uuid FROM pg_catalog.jsonb_array_elements_text(alive) x));
    PERFORM meshhook_limits.release_execution_slot((e->>'slot')::uuid)
       FROM pg_catalog.jsonb_array_elements(c.claimed) e
      WHERE NOT alive @> pg_catalog.jsonb_build_array(e->'slot');
    ended := ended + pg_catalog.jsonb_array_length(c.claimed) - pg_catalog.jsonb_array_length(alive);
  END LOOP;
  -- Retired bindings whose jobs have all ended.
  DELETE FROM meshhook_limits.retired_bindings r
   WHERE NOT EXISTS (SELECT 1 FROM meshhook_limits._claimed_slots() s WHERE s.binding_id = r.id);
  RETURN ended;
END
$$;
REVOKE EXECUTE ON FUNCTION meshhook_limits._end_claims() FROM PUBLIC;

-- After a restart: the jobs workers still run in every bound queue, for
-- _restore_claims (src/claim/restore.rs) to give each its claimed slot
-- again. pg-boss: jobs in state active; pgmq: messages read and still
-- invisible (read_ct > 0 and vt in the future; a message sent with a delay
-- was never read). The job id is spelt as in a claim's run id; the lease is
-- what is left of pgmq's visibility timeout (NULL for pg-boss: the default
-- lease, renewed by the tick while the job stays active). The queue tables
-- are read as their owners (_read_as_owner). A queue that cannot be read
-- fails the whole rebuild: claiming must not resume without its jobs (a
-- queue of an owner the tick does not trust is not read at all).
CREATE FUNCTION meshhook_limits._claims_to_restore()
RETURNS TABLE(binding_id bigint, job_id text, tenant text, project text, key text, cost text, lease_micros bigint)
LANGUAGE plpgsql VOLATILE SET search_path = pg_catalog, pg_temp AS $$
#variable_conflict use_column
DECLARE
  b meshhook_limits.queue_bindings;
  running jsonb;
  row_sql text;
BEGIN
  FOR b IN SELECT * FROM (
              SELECT * FROM meshhook_limits.queue_bindings
              UNION ALL
              -- A retired binding's jobs, unless its queue is bound again
              -- (the new binding restores them).
              SELECT r.id, r.source, r.queue, r.tenant_path, r.project_path, r.key_path, r.cost_path, r.relation,
                     r.index_name, r.created_at, r.sender_tenant
                FROM meshhook_limits.retired_bindings r
               WHERE NOT EXISTS (SELECT 1 FROM meshhook_limits.queue_bindings qb
                                  WHERE qb.source = r.source AND qb.queue = r.queue)) qb
            WHERE EXISTS (SELECT 1 FROM pg_catalog.pg_class r WHERE r.oid = qb.relation)
            ORDER BY qb.id LOOP
    -- A queue whose owner the tick does not trust (_tick_reads) is not read:
    -- claim_jobs refuses it too, so its jobs were claimed, if at all, before
    -- its owner changed, and end with their leases.
    CONTINUE WHEN NOT meshhook_limits._tick_reads(b.relation);
    row_sql := pg_catalog.format('%s, %s, %s, %s',
      meshhook_limits._tenant_sql(b.source, b.tenant_path), meshhook_limits._path_sql(b.source, b.project_path),
      meshhook_limits._path_sql(b.source, b.key_path), meshhook_limits._path_sql(b.source, b.cost_path));
    BEGIN
      IF b.source = 'pgboss' THEN
        running := meshhook_limits._read_as_owner(b.relation, pg_catalog.format($q$
          SELECT coalesce(pg_catalog.jsonb_agg(pg_catalog.jsonb_build_array(j.id::text, %s, NULL)), '[]')
            FROM pgboss.job j WHERE j.name = %L AND j.state = 'active' $q$, row_sql, b.queue));
      ELSE
        running := meshhook_limits._read_as_owner(b.relation, pg_catalog.format($q$
          SELECT coalesce(pg_catalog.jsonb_agg(pg_catalog.jsonb_build_array(j.msg_id::text || '/' || j.read_ct::text, %s,
                   -- A day at most: an infinite or far vt (anyone who may
                   -- send may write one) neither fails nor overflows.
                   (extract(epoch FROM LEAST(j.vt, pg_catalog.clock_timestamp() + interval '1 day')
                                       - pg_catalog.clock_timestamp()) * 1000000)::bigint)), '[]')
            FROM %s j WHERE j.read_ct > 0 AND j.vt > pg_catalog.clock_timestamp() $q$, row_sql, b.relation));
      END IF;
    EXCEPTION WHEN OTHERS THEN
      RAISE EXCEPTION 'meshhook_limits: cannot rebuild the claimed slots of % queue % after the restart: %',
        b.source, b.queue, SQLERRM
        USING ERRCODE = '55000',
              HINT = 'claiming in this database resumes once the queue table can be read by its owner (see the error), or once the queue is unbound';
    END;
    RETURN QUERY SELECT b.id, x->>0, x->>1, x->>2, x->>3, x->>4, (x->>5)::bigint
                   FROM pg_catalog.jsonb_array_elements(running) x;
  END LOOP;
END
$$;
REVOKE EXECUTE ON FUNCTION meshhook_limits._claims_to_restore() FROM PUBLIC;

CREATE FUNCTION meshhook_limits.explain_admission(tenant_id uuid, project_id uuid DEFAULT NULL,
    concurrency_key text DEFAULT NULL)
RETURNS TABLE(resource text, scope text, limit_value numeric, in_use bigint, source text, blocking boolean)
LANGUAGE plpgsql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
#variable_conflict use_column
DECLARE
  u record;
  lim numeric;
  src text;
  ceiling numeric := current_setting('meshhook_limits.tenant_slot_ceiling')::numeric;
BEGIN
  PERFORM meshhook_limits.require_tenant_read(explain_admission.tenant_id);
  IF pg_catalog.octet_length(explain_admission.concurrency_key) NOT BETWEEN 1 AND 200 THEN
    RAISE EXCEPTION 'a concurrency key must be 1 to 200 bytes long' USING ERRCODE = '22023',
      HINT = 'pass the key as jobs name it, or NULL';
  END IF;
  SELECT * INTO u FROM meshhook_limits._slot_counts(explain_admission.tenant_id, explain_admission.project_id,
                                                    explain_admission.concurrency_key);
  SELECT r.limit_value, r.source INTO lim, src FROM meshhook_limits._resolve(explain_admission.tenant_id, NULL) r
   WHERE r.resource = 'concurrent_executions';
  IF lim IS NULL OR lim > ceiling THEN
    lim := ceiling; src := 'server';   -- meshhook_limits.tenant_slot_ceiling
  END IF;
  RETURN QUERY SELECT 'concurrent_executions', 'tenant', lim, u.tenant_in_use, src, u.tenant_in_use + 1 > lim;
  IF explain_admission.project_id IS NOT NULL THEN
    SELECT l.limit_value INTO lim FROM meshhook_limits.limits l
     WHERE l.resource = 'concurrent_executions' AND l.tenant_id = explain_admission.tenant_id
       AND l.project_id = explain_admission.project_id;
    RETURN QUERY SELECT 'concurrent_executions', 'project', lim, u.project_in_use,
                        CASE WHEN lim IS NOT NULL THEN 'project' END, coalesce(u.project_in_use + 1 > lim, false);
  END IF;
  IF explain_admission.concurrency_key IS NOT NULL THEN
    lim := NULL; src := NULL;
    SELECT r.limit_value, r.source INTO lim, src
      FROM meshhook_limits._resolve(explain_admission.tenant_id, explain_admission.project_id) r
     WHERE r.resource = 'concurrent_executions.' || explain_admission.concurrency_key;
    RETURN QUERY SELECT 'concurrent_executions.' || explain_admission.concurrency_key, 'key', lim, u.key_in_use,
                        src, coalesce(u.key_in_use + 1 > lim, false);
  END IF;
  SELECT l.limit_value INTO lim FROM meshhook_limits.limits l
   WHERE l.resource = 'concurrent_executions_total' AND l.tenant_id IS NULL AND l.plan IS NULL;
  -- Every tenant's running slots together: for monitors; a tenant learns
  -- only whether the total blocks it.
  RETURN QUERY SELECT 'concurrent_executions_total', 'total', lim,
                      CASE WHEN meshhook_limits.can_monitor() THEN u.total_in_use END,
                      CASE WHEN lim IS NOT NULL THEN 'global' END, coalesce(u.total_in_use + 1 > lim, false);
  lim := 1; src := 'default';
  SELECT r.limit_value, r.source INTO lim, src FROM meshhook_limits._resolve(explain_admission.tenant_id, NULL) r
   WHERE r.resource = 'fair_share_weight';
  RETURN QUERY SELECT 'fair_share_weight', 'tenant', coalesce(lim, 1), NULL::bigint, coalesce(src, 'default'), false;
END
$$;
COMMENT ON FUNCTION meshhook_limits.explain_admission(uuid, uuid, text) IS
  'Every limit a slot of this tenant (project, key) is admitted under, what is in use, where the limit comes from, and which blocks a job of cost 1 now.';

-- Per bound queue and tenant (however its jobs spell its id): what
-- claim_jobs would do with its waiting jobs now. waiting = deferred (not due
-- yet, or held by a pg-boss 12 flow's dependencies) + invalid (a project,
-- key or cost claim_jobs never accepts) + blocked (held back by a limit:
-- the tenant's, the total, or their concurrency key's) + runnable; running
-- = the cost of its claimed jobs. blocked_by names the limit. Admins and
-- monitors see every tenant; a tenant sees its own rows.
CREATE FUNCTION meshhook_limits.explain_queues(tenant uuid DEFAULT NULL)
RETURNS TABLE(source text, queue text, tenant_id uuid, waiting bigint, running bigint, runnable bigint,
              blocked bigint, blocked_by text, deferred bigint, invalid bigint)
LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
#variable_conflict use_column
DECLARE
  me uuid := meshhook_limits.current_tenant();
  v_only uuid := explain_queues.tenant;
  b meshhook_limits.queue_bindings;
  t_sql text; p_sql text; k_sql text; c_sql text;
  not_due text;
  w jsonb;
  r record;
  k record;
  why text;
  key_blocked bigint;
  -- As claim_jobs parses ids (src/claim/mod.rs parse_uuid).
  uuid_re constant text := '^([0-9a-fA-F]{32}|[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12})$';
BEGIN
  IF NOT meshhook_limits.can_monitor() THEN
    IF me IS NULL THEN
      RAISE EXCEPTION 'no tenant identity to explain queues for' USING ERRCODE = '42501',
        HINT = 'call with a JWT whose claims carry the tenant id, or as an admin';
    END IF;
    IF v_only IS NOT NULL AND v_only <> me THEN
      RAISE EXCEPTION 'a tenant may explain only its own jobs' USING ERRCODE = '42501',
        HINT = 'call with the tenant id of your own JWT claim, or NULL';
    END IF;
    v_only := me;
  END IF;
  FOR b IN SELECT * FROM meshhook_limits.queue_bindings qb
            WHERE EXISTS (SELECT 1 FROM pg_catalog.pg_class r WHERE r.oid = qb.relation)
            ORDER BY qb.source, qb.queue LOOP
    t_sql := meshhook_limits._tenant_sql(b.source, b.tenant_path);
    p_sql := meshhook_limits._path_sql(b.source, b.project_path);
    k_sql := meshhook_limits._path_sql(b.source, b.key_path);
    c_sql := meshhook_limits._path_sql(b.source, b.cost_path);
    not_due := CASE WHEN b.source = 'pgmq' THEN 'false'
                    WHEN meshhook_limits._pgboss_major() >= 12 THEN '(j.blocked OR j.start_after > pg_catalog.now())'
                    ELSE 'j.start_after >= pg_catalog.now()' END;
    BEGIN
      w := meshhook_limits._read_as_owner(b.relation, pg_catalog.format($q$
        SELECT coalesce(pg_catalog.jsonb_agg(x), '[]') FROM (
          SELECT tenant, key, count(*) AS waiting,
                 count(*) FILTER (WHERE not_due) AS deferred,
                 count(*) FILTER (WHERE NOT not_due AND NOT valid) AS invalid
            FROM (SELECT %1$s AS tenant, %2$s AS key, %7$s AS not_due,
                         meshhook_limits._claim_key(%1$s, %3$s, %2$s, %4$s) IS NOT NULL AS valid
                    FROM %5$s j WHERE %6$s AND %1$s ~ %8$L) y
           WHERE %9$s
           GROUP BY tenant, key) x $q$,
        t_sql, k_sql, p_sql, c_sql,
        CASE b.source WHEN 'pgboss' THEN 'pgboss.job' ELSE b.relation::text END,
        CASE b.source WHEN 'pgboss' THEN pg_catalog.format('j.name = %L AND j.state < ''active''', b.queue)
                      ELSE 'j.vt <= pg_catalog.clock_timestamp()' END,
        not_due, uuid_re,
        CASE WHEN v_only IS NOT NULL
             THEN pg_catalog.format('pg_catalog.lower(pg_catalog.replace(tenant, ''-'', '''')) = %L',
                                    pg_catalog.replace(v_only::text, '-', ''))
             ELSE 'true' END));
    EXCEPTION WHEN OTHERS THEN
      RAISE WARNING 'meshhook_limits: reading % queue % failed: %', b.source, b.queue, SQLERRM;
      CONTINUE;
    END;
    -- Tenants with waiting jobs, and tenants with claimed jobs running.
    FOR r IN SELECT coalesce(w.tenant_id, c.tenant_id) AS tenant, coalesce(w.waiting, 0) AS waiting,
                    coalesce(w.deferred, 0) AS deferred, coalesce(w.invalid, 0) AS invalid,
                    coalesce(c.running, 0) AS running
               FROM (SELECT x.tenant::uuid AS tenant_id, sum(x.waiting)::bigint AS waiting,
                            sum(x.deferred)::bigint AS deferred, sum(x.invalid)::bigint AS invalid
                       FROM pg_catalog.jsonb_to_recordset(w) x(tenant text, key text, waiting bigint,
                                                                deferred bigint, invalid bigint)
                      GROUP BY 1) w
               FULL JOIN (SELECT s.tenant_id, sum(s.cost)::bigint AS running
                            FROM meshhook_limits._claimed_slots() s
                           WHERE s.binding_id = b.id AND (v_only IS NULL OR s.tenant_id = v_only)
                           GROUP BY s.tenant_id) c ON c.tenant_id = w.tenant_id
              ORDER BY 2 DESC, 1 LOOP
      SELECT e.resource INTO why FROM meshhook_limits.explain_admission(r.tenant) e
       WHERE e.blocking ORDER BY e.scope = 'total' LIMIT 1;
      source := b.source; queue := b.queue; tenant_id := r.tenant; waiting := r.waiting;
      running := r.running; deferred := r.deferred; invalid := r.invalid;
      blocked := 0;
      IF why IS NULL THEN
        -- The tenant has room: its jobs under a full concurrency key wait.
        FOR k IN SELECT x.key, sum(x.waiting - x.deferred - x.invalid)::bigint AS ready
                   FROM pg_catalog.jsonb_to_recordset(w) x(tenant text, key text, waiting bigint,
                                                            deferred bigint, invalid bigint)
                  WHERE x.key IS NOT NULL AND pg_catalog.octet_length(x.key) BETWEEN 1 AND 200
                    AND x.tenant::uuid = r.tenant
                  GROUP BY x.key HAVING sum(x.waiting - x.deferred - x.invalid) > 0 LOOP
          IF EXISTS (SELECT 1 FROM meshhook_limits.explain_admission(r.tenant, NULL, k.key) e
                      WHERE e.scope = 'key' AND e.blocking) THEN
            blocked := blocked + k.ready;
            why := coalesce(why, 'concurrent_executions.' || k.key);
          END IF;
        END LOOP;
      ELSE
        blocked := r.waiting - r.deferred - r.invalid;
      END IF;
      runnable := r.waiting - r.deferred - r.invalid - blocked;
      blocked_by := why;
      RETURN NEXT;
      why := NULL;
    END LOOP;
  END LOOP;
END
$$;
COMMENT ON FUNCTION meshhook_limits.explain_queues(uuid) IS
  'Per bound queue and tenant: waiting (= deferred + invalid + blocked + runnable), running (claimed), and the limit that blocks. Admins see all tenants, a tenant its own.';
