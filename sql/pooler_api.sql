-- meshhook_limits: The connection pooler, what users call: add_pooler, drop_pooler,
-- set_pooler_sizing, pooler_health(), pooler_recommendation() (the poolers
-- and their sampling: sql/pooler.sql).

-- Name a PgBouncer to sample (superusers: the tick connects with the
-- extension owner's rights, so where it connects is a superuser's choice).
-- Runs as its caller.
CREATE FUNCTION meshhook_limits.add_pooler(name text, conninfo text, enabled boolean DEFAULT true)
RETURNS void LANGUAGE plpgsql VOLATILE SET search_path = pg_catalog, pg_temp AS $$
#variable_conflict use_variable
DECLARE ci text := conninfo;
BEGIN
  -- The caller itself (this function runs as its caller: an admin's
  -- definer function calling it is the admin), outside code a table's
  -- owner planted (which runs as that owner in any session).
  IF NOT meshhook_limits._caller_is_superuser() THEN
    RAISE EXCEPTION 'only a superuser may add a pooler' USING ERRCODE = '42501',
      HINT = 'the tick connects to it with the extension owner''s rights; ask a superuser to run add_pooler';
  END IF;
  IF meshhook_limits._dblink_schema() IS NULL THEN
    RAISE EXCEPTION 'sampling PgBouncer needs the dblink extension' USING ERRCODE = '55000',
      HINT = 'CREATE EXTENSION dblink (as a superuser), then add the pooler again';
  END IF;
  IF name IS NULL OR name !~ '^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$' THEN
    RAISE EXCEPTION 'invalid pooler name %', coalesce(quote_literal(name), 'NULL') USING ERRCODE = '22023',
      HINT = 'letters, digits, _ . and -, starting with a letter or digit, at most 63 characters';
  END IF;
  IF ci IS NULL OR btrim(ci) = '' THEN
    RAISE EXCEPTION 'conninfo must not be empty' USING ERRCODE = '22023',
      HINT = 'a libpq connection string such as ''host=/var/run/postgresql port=6432 dbname=pgbouncer user=pgbouncer'', or the name of a dblink foreign server';
  END IF;
  IF ci ~* '(^|\s)password\s*=' OR ci ~* '^postgres(ql)?://[^/@]*:[^/@]*@' OR ci ~* '[?&]password=' THEN
    RAISE EXCEPTION 'conninfo must not hold a password' USING ERRCODE = '22023',
      HINT = 'poolers is readable by monitors: put the password in a dblink foreign server''s user mapping '
             '(CREATE SERVER ... FOREIGN DATA WRAPPER dblink_fdw; CREATE USER MAPPING ...) and pass the server''s name, '
             'or in the server''s ~/.pgpass';
  END IF;
  -- A connection string (not a foreign server's name) gets a connect
  -- timeout, so that on PostgreSQL 15 (where dblink cannot be interrupted
  -- while it connects) an unreachable pooler holds the tick at most that long.
  IF ci ~* 'connect_timeout' AND ci !~* 'connect_timeout\s*=\s*''?([1-9]|10)''?(\s|&|$)' THEN
    RAISE EXCEPTION 'connect_timeout must be from 1 to 10 seconds' USING ERRCODE = '22023',
      HINT = 'the tick waits that long for an unreachable pooler on PostgreSQL 15; leave it out for 2';
  END IF;
  IF ci !~* 'connect_timeout' AND NOT EXISTS (SELECT 1 FROM pg_catalog.pg_foreign_server s WHERE s.srvname = ci::name) THEN
    IF ci ~* '^postgres(ql)?://' THEN
      ci := ci || CASE WHEN ci ~ '\?' THEN '&' ELSE '?' END || 'connect_timeout=2';
    ELSIF ci ~ '=' THEN
      ci := ci || ' connect_timeout=2';
    END IF;
  END IF;
  INSERT INTO meshhook_limits.poolers AS p (name, conninfo, enabled)
  VALUES (add_pooler.name, ci, coalesce(enabled, true))
  ON CONFLICT ON CONSTRAINT poolers_pkey DO UPDATE SET conninfo = EXCLUDED.conninfo, enabled = EXCLUDED.enabled;
END
$$;
REVOKE EXECUTE ON FUNCTION meshhook_limits.add_pooler(text, text, boolean) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION meshhook_limits.add_pooler(text, text, boolean) TO meshhook_limits_admin;

CREATE FUNCTION meshhook_limits.drop_pooler(name text) RETURNS boolean
LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
#variable_conflict use_variable
DECLARE existed boolean;
BEGIN
  PERFORM meshhook_limits.require_admin_access('drop a pooler');
  DELETE FROM meshhook_limits.poolers p WHERE p.name = drop_pooler.name;
  existed := FOUND;
  DELETE FROM meshhook_limits.pooler_samples s WHERE s.pooler = drop_pooler.name;
  DELETE FROM meshhook_limits.pooler_pool_samples s WHERE s.pooler = drop_pooler.name;
  RETURN existed;
END
$$;
REVOKE EXECUTE ON FUNCTION meshhook_limits.drop_pooler(text) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION meshhook_limits.drop_pooler(text) TO meshhook_limits_admin;

-- Pool sizing of one pooler: off, dry_run or on, within [min_pool_size,
-- max_pool_size], one change at most per resize_every. Arguments left NULL
-- keep their value.
CREATE FUNCTION meshhook_limits.set_pooler_sizing(name text, mode text, min_pool_size int DEFAULT NULL,
                                                  max_pool_size int DEFAULT NULL, resize_every interval DEFAULT NULL)
RETURNS void LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
#variable_conflict use_variable
BEGIN
  PERFORM meshhook_limits.require_admin_access('set pool sizing');
  IF mode IS NULL OR mode NOT IN ('off', 'dry_run', 'on') THEN
    RAISE EXCEPTION 'invalid sizing mode %', coalesce(quote_literal(mode), 'NULL') USING ERRCODE = '22023',
      HINT = 'off, dry_run (record what it would do) or on (apply it)';
  END IF;
  BEGIN
    UPDATE meshhook_limits.poolers p
       SET sizing = mode,
           min_pool_size = coalesce(set_pooler_sizing.min_pool_size, p.min_pool_size),
           max_pool_size = coalesce(set_pooler_sizing.max_pool_size, p.max_pool_size),
           resize_every = coalesce(set_pooler_sizing.resize_every, p.resize_every)
     WHERE p.name = set_pooler_sizing.name;
  EXCEPTION WHEN check_violation THEN
    RAISE EXCEPTION 'invalid pool sizing bounds' USING ERRCODE = '22023',
      HINT = 'min_pool_size >= 1, max_pool_size >= min_pool_size and at most 100000, resize_every from 1 second to 1 day';
  END;
  IF NOT FOUND THEN
    RAISE EXCEPTION 'no pooler named %', quote_literal(name) USING ERRCODE = '42704',
      HINT = 'add it first with meshhook_limits.add_pooler(name, conninfo)';
  END IF;
END
$$;
REVOKE EXECUTE ON FUNCTION meshhook_limits.set_pooler_sizing(text, text, int, int, interval) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION meshhook_limits.set_pooler_sizing(text, text, int, int, interval) TO meshhook_limits_admin;

-- Per pooler and pool, from the latest sample: clients, servers, pool size
-- and use, the longest wait, status (ok, warning, critical against
-- pooler_wait_warning/critical; down when the pooler did not answer), and
-- the pooler's transaction and query rates and average wait since the
-- sample before. Monitors only (others get no rows).
CREATE FUNCTION meshhook_limits.pooler_health()
RETURNS TABLE(pooler text, database text, user_name text, status text, clients_active int, clients_waiting int,
              servers_active int, servers_idle int, servers_used int, pool_size int, utilisation numeric,
              maxwait_seconds numeric, pool_mode text, transactions_per_second numeric, queries_per_second numeric,
              avg_wait_seconds numeric, sampled_at timestamptz, error text)
LANGUAGE plpgsql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
#variable_conflict use_column
BEGIN
  PERFORM meshhook_limits._require_monitor('read pooler health');
  RETURN QUERY
  WITH l AS (SELECT * FROM meshhook_limits._latest_pooler_samples() WHERE meshhook_limits.can_monitor()),
  r AS (
    SELECT l.pooler, l.sampled_at, e.seconds,
           (l.xact_count - b.xact_count) / e.seconds AS tps, (l.query_count - b.query_count) / e.seconds AS qps
      FROM l
      CROSS JOIN LATERAL (SELECT s.* FROM meshhook_limits.pooler_samples s
                           WHERE s.pooler = l.pooler AND s.up AND s.sampled_at < l.sampled_at
                           ORDER BY s.sampled_at DESC LIMIT 1) b
      CROSS JOIN LATERAL (SELECT extract(epoch FROM l.sampled_at - b.sampled_at) AS seconds) e
     WHERE l.up AND e.seconds > 0 AND l.xact_count >= b.xact_count)
  SELECT l.pooler, x.database, x.user_name, CASE WHEN l.up THEN coalesce(x.status, 'ok') ELSE 'down' END,
         x.clients_active, x.clients_waiting, x.servers_active, x.servers_idle, x.servers_used, x.pool_size,
         round((x.servers_active + x.servers_used + x.servers_idle + x.servers_tested + x.servers_login)::numeric
               / nullif(x.pool_size, 0), 4),
         x.maxwait_seconds, x.pool_mode, round(r.tps, 3), round(r.qps, 3),
         round(l.avg_wait_us / 1000000.0, 6), l.sampled_at, l.error
    FROM l
    LEFT JOIN meshhook_limits.pooler_pool_samples x ON x.pooler = l.pooler AND x.sampled_at = l.sampled_at
    LEFT JOIN r ON r.pooler = l.pooler
   ORDER BY l.pooler, x.database, x.user_name;
END
$$;

-- What sizing would do now for each pooler (whether or not it is on).
CREATE FUNCTION meshhook_limits.pooler_recommendation()
RETURNS TABLE(pooler text, sizing text, current_size int, recommended_size int, min_pool_size int, max_pool_size int,
              server_cap int, pools int, reasoning text)
LANGUAGE plpgsql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
#variable_conflict use_column
BEGIN
  PERFORM meshhook_limits._require_monitor('read pooler recommendations');
  RETURN QUERY
  SELECT p.name, p.sizing, a.current_size, a.recommended_size, p.min_pool_size, p.max_pool_size, a.server_cap, a.pools, a.reason
    FROM meshhook_limits.poolers p
    CROSS JOIN LATERAL meshhook_limits._pooler_size_advice(p, pg_catalog.now()) a
   WHERE meshhook_limits.can_monitor()
   ORDER BY p.name;
END
$$;
