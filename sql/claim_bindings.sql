-- meshhook_limits: where a bound queue's jobs name their tenant, project, key and cost:
-- the binding tables, the path and key expressions, and the claim indexes
-- (claiming as a whole: sql/claim.sql).

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
--                      their jobs (issue 19, item 3);
--   <index_name>_at:   pg-boss: the queue's waiting jobs by when they are due
--                      (pg-boss 12 has no such index of its own; pgmq's vt
--                      index is one), for reading the jobs due instead of
--                      scanning the tenants while few are (issue 20).
CREATE FUNCTION meshhook_limits._create_claim_index(b meshhook_limits.queue_bindings)
RETURNS void
LANGUAGE plpgsql VOLATILE SET search_path = pg_catalog, pg_temp AS $$
DECLARE
  waiting text;   -- pg-boss: the queue's waiting jobs ...
  fetchable text; -- ... and those its fetch may take (pg-boss 12: not blocked)
BEGIN
  IF b.source = 'pgboss' THEN
    waiting := pg_catalog.format('name = %L AND state OPERATOR(pg_catalog.<) %L::pgboss.job_state', b.queue, 'active');
    fetchable := waiting || CASE WHEN meshhook_limits._pgboss_major() >= 12 THEN ' AND NOT blocked' ELSE '' END;
    EXECUTE pg_catalog.format('CREATE INDEX %I ON pgboss.job (%s, priority DESC, created_on, id, start_after) WHERE %s',
      b.index_name, meshhook_limits._claim_key_sql(b, ''), waiting);
    EXECUTE pg_catalog.format('CREATE INDEX %I ON pgboss.job (%s, start_after) WHERE %s',
      b.index_name || '_due', meshhook_limits._claim_key_sql(b, ''), fetchable);
    EXECUTE pg_catalog.format('CREATE INDEX %I ON pgboss.job (start_after) WHERE %s', b.index_name || '_at', fetchable);
  ELSE
    EXECUTE pg_catalog.format('CREATE INDEX %I ON %s (%s, msg_id, vt)', b.index_name, b.relation,
      meshhook_limits._claim_key_sql(b, ''));
    EXECUTE pg_catalog.format('CREATE INDEX %I ON %s (%s, vt)', b.index_name || '_due', b.relation,
      meshhook_limits._claim_key_sql(b, ''));
  END IF;
END
$$;
REVOKE EXECUTE ON FUNCTION meshhook_limits._create_claim_index(meshhook_limits.queue_bindings) FROM PUBLIC;
