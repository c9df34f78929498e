-- meshhook_limits: The connection pooler: PgBouncer instances named by a superuser, sampled
-- by the tick through dblink on their admin console (SHOW POOLS, DATABASES,
-- TOTALS, CONFIG): the tables and the sampling. Pool sizing is in
-- pooler_sizing.sql, what users call in pooler_api.sql.
-- Everything is schema-qualified; SECURITY DEFINER functions pin search_path.

-- The poolers to sample. conninfo is a libpq connection string without a
-- password, or the name of a dblink foreign server whose user mapping holds
-- the credentials (add_pooler refuses passwords: this table is readable by
-- monitors). sizing: off, dry_run (record what it would do) or on (apply).
CREATE TABLE meshhook_limits.poolers (
  name text PRIMARY KEY CHECK (name ~ '^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$'),
  conninfo text NOT NULL,
  enabled boolean NOT NULL DEFAULT true,
  sizing text NOT NULL DEFAULT 'off' CHECK (sizing IN ('off', 'dry_run', 'on')),
  min_pool_size int NOT NULL DEFAULT 2 CHECK (min_pool_size >= 1),
  max_pool_size int NOT NULL DEFAULT 50 CHECK (max_pool_size >= min_pool_size AND max_pool_size <= 100000),
  -- The window a sizing decision looks back over, and the least time between two changes.
  resize_every interval NOT NULL DEFAULT '1 minute' CHECK (resize_every BETWEEN interval '1 second' AND interval '1 day'),
  resized_at timestamptz
);
SELECT pg_catalog.pg_extension_config_dump('meshhook_limits.poolers', '');
ALTER TABLE meshhook_limits.poolers ENABLE ROW LEVEL SECURITY;
CREATE POLICY admin_all ON meshhook_limits.poolers FOR SELECT USING ((SELECT meshhook_limits.can_monitor()));
GRANT SELECT ON meshhook_limits.poolers TO PUBLIC;

-- One row per pooler per tick: reachable or not (and why), and SHOW TOTALS'
-- counters (since the pooler started) for rates between two samples.
CREATE TABLE meshhook_limits.pooler_samples (
  pooler text NOT NULL,
  sampled_at timestamptz NOT NULL,
  up boolean NOT NULL,
  error text,
  version text,
  default_pool_size int,
  xact_count bigint,
  query_count bigint,
  wait_time_us bigint,
  avg_wait_us bigint,
  sample_ms numeric NOT NULL,
  PRIMARY KEY (pooler, sampled_at)
);
CREATE INDEX pooler_samples_sampled_at ON meshhook_limits.pooler_samples (sampled_at);
ALTER TABLE meshhook_limits.pooler_samples ENABLE ROW LEVEL SECURITY;
CREATE POLICY admin_all ON meshhook_limits.pooler_samples FOR SELECT USING ((SELECT meshhook_limits.can_monitor()));
GRANT SELECT ON meshhook_limits.pooler_samples TO PUBLIC;

-- One row per pool (database, user) of a reachable pooler per tick, from
-- SHOW POOLS, with the database's pool size from SHOW DATABASES.
CREATE TABLE meshhook_limits.pooler_pool_samples (
  pooler text NOT NULL,
  sampled_at timestamptz NOT NULL,
  database text NOT NULL,
  user_name text NOT NULL,
  pool_mode text,
  pool_size int,
  clients_active int NOT NULL,
  clients_waiting int NOT NULL,
  servers_active int NOT NULL,
  servers_idle int NOT NULL,
  servers_used int NOT NULL,
  servers_tested int NOT NULL,
  servers_login int NOT NULL,
  maxwait_seconds numeric NOT NULL,
  status text NOT NULL,
  PRIMARY KEY (pooler, sampled_at, database, user_name)
);
CREATE INDEX pooler_pool_samples_sampled_at ON meshhook_limits.pooler_pool_samples (sampled_at);
ALTER TABLE meshhook_limits.pooler_pool_samples ENABLE ROW LEVEL SECURITY;
CREATE POLICY admin_all ON meshhook_limits.pooler_pool_samples FOR SELECT USING ((SELECT meshhook_limits.can_monitor()));
GRANT SELECT ON meshhook_limits.pooler_pool_samples TO PUBLIC;

-- The Rust parts (src/pooler.rs): internal, but add_pooler (which runs as
-- its caller) asks _caller_is_superuser.
REVOKE EXECUTE ON FUNCTION meshhook_limits._pooler_may_connect() FROM PUBLIC;
REVOKE EXECUTE ON FUNCTION meshhook_limits._caller_is_superuser() FROM PUBLIC;
GRANT EXECUTE ON FUNCTION meshhook_limits._caller_is_superuser() TO meshhook_limits_admin;

-- The schema of dblink when it is installed by a superuser, else NULL. Its
-- functions are called schema-qualified with arguments of their exact types,
-- so no other function of that schema can stand in for them.
CREATE FUNCTION meshhook_limits._dblink_schema() RETURNS name
LANGUAGE sql STABLE SET search_path = pg_catalog, pg_temp AS $$
  SELECT n.nspname
    FROM pg_catalog.pg_extension e
    JOIN pg_catalog.pg_namespace n ON n.oid = e.extnamespace
    JOIN pg_catalog.pg_roles r ON r.oid = e.extowner
   WHERE e.extname = 'dblink' AND r.rolsuper
$$;
REVOKE EXECUTE ON FUNCTION meshhook_limits._dblink_schema() FROM PUBLIC;

-- The latest sample of every enabled pooler.
CREATE FUNCTION meshhook_limits._latest_pooler_samples() RETURNS SETOF meshhook_limits.pooler_samples
LANGUAGE sql STABLE SET search_path = pg_catalog, pg_temp AS $$
  SELECT l.* FROM meshhook_limits.poolers p
   CROSS JOIN LATERAL (SELECT s.* FROM meshhook_limits.pooler_samples s WHERE s.pooler = p.name
                        ORDER BY s.sampled_at DESC LIMIT 1) l
   WHERE p.enabled
$$;
REVOKE EXECUTE ON FUNCTION meshhook_limits._latest_pooler_samples() FROM PUBLIC;

-- Wait until the answer on connection p_conn can be read without blocking,
-- until p_deadline.
CREATE FUNCTION meshhook_limits._pooler_wait(p_dblink name, p_conn text, p_command text, p_deadline timestamptz)
RETURNS void LANGUAGE plpgsql VOLATILE SET search_path = pg_catalog, pg_temp AS $$
DECLARE busy int;
BEGIN
  LOOP
    EXECUTE format('SELECT %I.dblink_is_busy($1::text)', p_dblink) INTO busy USING p_conn;
    EXIT WHEN busy = 0;
    IF pg_catalog.clock_timestamp() >= p_deadline THEN
      RAISE EXCEPTION 'no answer to % within meshhook_limits.pooler_timeout (%)',
        p_command, current_setting('meshhook_limits.pooler_timeout') USING ERRCODE = '08006';
    END IF;
    PERFORM pg_catalog.pg_sleep(0.001);
  END LOOP;
END
$$;
REVOKE EXECUTE ON FUNCTION meshhook_limits._pooler_wait(name, text, text, timestamptz) FROM PUBLIC;

-- Send one admin-console command on connection p_conn and wait for its
-- answer until p_deadline; the caller then reads it with dblink_get_result.
CREATE FUNCTION meshhook_limits._pooler_send(p_dblink name, p_conn text, p_command text, p_deadline timestamptz)
RETURNS void LANGUAGE plpgsql VOLATILE SET search_path = pg_catalog, pg_temp AS $$
BEGIN
  EXECUTE format('SELECT %I.dblink_send_query($1::text, $2::text)', p_dblink) USING p_conn, p_command;
  PERFORM meshhook_limits._pooler_wait(p_dblink, p_conn, p_command, p_deadline);
END
$$;
REVOKE EXECUTE ON FUNCTION meshhook_limits._pooler_send(name, text, text, timestamptz) FROM PUBLIC;

-- What a pooler answered, made safe to keep: text valid in the database's
-- encoding (else a stand-in naming its hash) and at most p_max characters;
-- a number that is a plain non-negative integer up to p_max (else an error:
-- the pooler is recorded as down with it).
CREATE FUNCTION meshhook_limits._pooler_text(p text, p_max int DEFAULT 200) RETURNS text
LANGUAGE plpgsql IMMUTABLE STRICT SET search_path = pg_catalog, pg_temp AS $$
BEGIN
  PERFORM pg_catalog.convert_to(p, pg_catalog.getdatabaseencoding());  -- verifies the bytes
  RETURN left(p, p_max);
EXCEPTION WHEN OTHERS THEN
  RETURN '(not valid ' || pg_catalog.getdatabaseencoding() || ': ' || left(pg_catalog.md5(p), 12) || ')';
END
$$;
REVOKE EXECUTE ON FUNCTION meshhook_limits._pooler_text(text, int) FROM PUBLIC;

CREATE FUNCTION meshhook_limits._pooler_number(p text, p_max bigint) RETURNS bigint
LANGUAGE plpgsql IMMUTABLE SET search_path = pg_catalog, pg_temp AS $$
BEGIN
  IF meshhook_limits._pooler_text(p, 20) ~ '^[0-9]{1,18}$' AND p::bigint <= p_max THEN
    RETURN p::bigint;
  END IF;
  RAISE EXCEPTION 'the pooler answered % where a number from 0 to % belongs',
    coalesce(quote_literal(meshhook_limits._pooler_text(p, 40)), 'NULL'), p_max USING ERRCODE = '22003';
END
$$;
REVOKE EXECUTE ON FUNCTION meshhook_limits._pooler_number(text, bigint) FROM PUBLIC;

-- Rows of one admin-console command as text columns c1..cN (N = p_columns,
-- the command's layout in this PgBouncer version).
CREATE FUNCTION meshhook_limits._pooler_show(p_dblink name, p_conn text, p_command text, p_columns int,
                                             p_deadline timestamptz)
RETURNS SETOF text[] LANGUAGE plpgsql VOLATILE SET search_path = pg_catalog, pg_temp AS $$
DECLARE cols text := (SELECT string_agg(format('c%s text', i), ', ' ORDER BY i) FROM generate_series(1, p_columns) i);
        arr text := (SELECT string_agg(format('c%s', i), ', ' ORDER BY i) FROM generate_series(1, p_columns) i);
BEGIN
  PERFORM meshhook_limits._pooler_send(p_dblink, p_conn, p_command, p_deadline);
  -- At most 10,000 rows are looked at (pools are kept 500 at most).
  RETURN QUERY EXECUTE format('SELECT ARRAY[%s] FROM %I.dblink_get_result($1::text) AS t(%s) LIMIT 10000',
                              arr, p_dblink, cols)
    USING p_conn;
  -- The end of the command's results (dblink needs it read before the
  -- next), once it has come: a pooler that never ends its answer must not
  -- hold the tick in a read that waits for it.
  PERFORM meshhook_limits._pooler_wait(p_dblink, p_conn, p_command, p_deadline);
  EXECUTE format('SELECT count(*) FROM %I.dblink_get_result($1::text) AS t(c1 text)', p_dblink) USING p_conn;
END
$$;
REVOKE EXECUTE ON FUNCTION meshhook_limits._pooler_show(name, text, text, int, timestamptz) FROM PUBLIC;

-- Sample one pooler: a row in pooler_samples (up or down, with why) and one
-- per pool in pooler_pool_samples (the 500 with the most clients waiting,
-- then active); pool.pooler_down / pool.pooler_up on a change; then pool
-- sizing. A pooler that refuses, fails, answers what is not a count where
-- one belongs, or takes longer than pooler_timeout in all is recorded as
-- down; the tick goes on. One that timed out is tried again 10 s later, not
-- at every tick.
--
-- The dblink connection is opened and closed within this call, which runs
-- no code of anyone else's in between (_sample_poolers says where it may
-- run at all, src/pooler.rs).
CREATE FUNCTION meshhook_limits._sample_pooler(p_pooler meshhook_limits.poolers, p_at timestamptz) RETURNS void
LANGUAGE plpgsql VOLATILE SET search_path = pg_catalog, pg_temp AS $$
DECLARE
  db name := meshhook_limits._dblink_schema();
  conn text := 'meshhook_limits_pooler_' || pg_catalog.md5(p_pooler.name);
  t_start timestamptz := pg_catalog.clock_timestamp();
  deadline timestamptz := pg_catalog.clock_timestamp() + current_setting('meshhook_limits.pooler_timeout')::interval;
  last record;
  v text; vnum int; pool_cols int; db_cols int;
  pools jsonb; sizes jsonb; totals jsonb; dflt int; ev jsonb; err text; detail text; state text;
BEGIN
  SELECT s.up, s.sampled_at, s.sample_ms INTO last FROM meshhook_limits.pooler_samples s
   WHERE s.pooler = p_pooler.name ORDER BY s.sampled_at DESC LIMIT 1;
  IF last.up = false AND last.sample_ms > 100 AND p_at < last.sampled_at + interval '10 seconds' THEN
    RETURN;
  END IF;
  BEGIN
    IF db IS NULL THEN
      RAISE EXCEPTION 'extension dblink is not installed (by a superuser)' USING ERRCODE = '55000';
    END IF;
    -- dblink takes a conninfo that names a foreign server (its first 63
    -- bytes) as that server: only a superuser's dblink_fdw server counts.
    IF EXISTS (SELECT 1 FROM pg_catalog.pg_foreign_server fs
                WHERE fs.srvname = p_pooler.conninfo::name
                  AND NOT ((SELECT r.rolsuper FROM pg_catalog.pg_roles r WHERE r.oid = fs.srvowner)
                           AND fs.srvfdw = (SELECT w.oid FROM pg_catalog.pg_foreign_data_wrapper w WHERE w.fdwname = 'dblink_fdw'))) THEN
      RAISE EXCEPTION 'foreign server % (named like this pooler''s conninfo) is not a superuser''s dblink_fdw server; not connecting',
        quote_ident(p_pooler.conninfo::name) USING ERRCODE = '42501';
    END IF;
    PERFORM meshhook_limits._pooler_disconnect(db, conn);
    PERFORM meshhook_limits._pooler_connect(db, conn, p_pooler.conninfo,
      GREATEST(ceil(extract(epoch FROM deadline - pg_catalog.clock_timestamp()) * 1000)::int, 1));
    SELECT meshhook_limits._pooler_text(r[1]) INTO v
      FROM meshhook_limits._pooler_show(db, conn, 'SHOW VERSION', 1, deadline) r;
    vnum := (SELECT m[1]::int * 100 + m[2]::int FROM regexp_match(v, '^PgBouncer (\d{1,3})\.(\d{1,3})') m);
    IF vnum IS NULL OR vnum < 118 THEN
      RAISE EXCEPTION '% is not PgBouncer 1.18 or newer', coalesce(quote_literal(v), 'the server') USING ERRCODE = '0A000';
    END IF;
    -- The layouts of SHOW POOLS and SHOW DATABASES by version (columns are
    -- only ever added; the ones read keep their places).
    pool_cols := CASE WHEN vnum >= 124 THEN 17 ELSE 16 END;
    db_cols := CASE WHEN vnum >= 124 THEN 17 WHEN vnum = 123 THEN 14 ELSE 13 END;
    -- SHOW POOLS by column: 1 database, 2 user, 3 cl_active, 4 cl_waiting,
    -- 7 sv_active, 10 sv_idle, 11 sv_used, 12 sv_tested, 13 sv_login,
    -- 14 maxwait, 15 maxwait_us, 16 pool_mode. The admin console's own
    -- pseudo-pool (database pgbouncer) is not a pool.
    SELECT jsonb_agg(y.a) INTO pools FROM (SELECT x.a FROM (
      SELECT jsonb_build_array(meshhook_limits._pooler_text(r[1], 63), meshhook_limits._pooler_text(r[2], 63),
               meshhook_limits._pooler_number(r[3], 1000000), meshhook_limits._pooler_number(r[4], 1000000),
               meshhook_limits._pooler_number(r[7], 1000000), meshhook_limits._pooler_number(r[10], 1000000),
               meshhook_limits._pooler_number(r[11], 1000000), meshhook_limits._pooler_number(r[12], 1000000),
               meshhook_limits._pooler_number(r[13], 1000000),
               meshhook_limits._pooler_number(r[14], 1000000000) + meshhook_limits._pooler_number(r[15], 999999) / 1000000.0,
               meshhook_limits._pooler_text(r[16], 20)) AS a
        FROM meshhook_limits._pooler_show(db, conn, 'SHOW POOLS', pool_cols, deadline) r
       WHERE r[1] IS DISTINCT FROM 'pgbouncer') x
     ORDER BY (x.a->>3)::bigint DESC, (x.a->>2)::bigint DESC, x.a->>0, x.a->>1
     LIMIT 500) y;
    SELECT jsonb_object_agg(meshhook_limits._pooler_text(r[1], 63), meshhook_limits._pooler_number(r[6], 100000)) INTO sizes
      FROM meshhook_limits._pooler_show(db, conn, 'SHOW DATABASES', db_cols, deadline) r;
    SELECT jsonb_object_agg(meshhook_limits._pooler_text(r[1], 63), r[2]) INTO totals
      FROM meshhook_limits._pooler_show(db, conn, 'SHOW TOTALS', 2, deadline) r;
    SELECT meshhook_limits._pooler_number(r[2], 100000) INTO dflt
      FROM meshhook_limits._pooler_show(db, conn, 'SHOW CONFIG', 4, deadline) r
     WHERE r[1] = 'default_pool_size';
    INSERT INTO meshhook_limits.pooler_samples
    VALUES (p_pooler.name, p_at, true, NULL, v, dflt,
            meshhook_limits._pooler_number(totals->>'total_xact_count', 1000000000000000000),
            meshhook_limits._pooler_number(totals->>'total_query_count', 1000000000000000000),
            meshhook_limits._pooler_number(totals->>'total_wait_time', 1000000000000000000),
            meshhook_limits._pooler_number(totals->>'avg_wait_time', 1000000000000000000),
            round(extract(epoch FROM pg_catalog.clock_timestamp() - t_start) * 1000, 3))
    ON CONFLICT DO NOTHING;
    INSERT INTO meshhook_limits.pooler_pool_samples
    SELECT p_pooler.name, p_at, a->>0, a->>1, a->>10, (sizes->>(a->>0))::int,
           (a->>2)::int, (a->>3)::int, (a->>4)::int, (a->>5)::int, (a->>6)::int, (a->>7)::int, (a->>8)::int,
           round((a->>9)::numeric, 6),
           CASE WHEN (a->>9)::numeric * 1000 >= meshhook_limits._setting_ms('meshhook_limits.pooler_wait_critical') THEN 'critical'
                WHEN (a->>9)::numeric * 1000 >= meshhook_limits._setting_ms('meshhook_limits.pooler_wait_warning') THEN 'warning'
                ELSE 'ok' END
      FROM jsonb_array_elements(coalesce(pools, '[]')) a
    ON CONFLICT DO NOTHING;
    -- Sizing on its own: a pooler that refuses SET (a stats_users login,
    -- not admin_users) is still up; the failure is an event, once per
    -- resize_every.
    BEGIN
      ev := meshhook_limits._size_pooler(p_pooler, p_at, db, conn, deadline);
    EXCEPTION WHEN OTHERS THEN
      GET STACKED DIAGNOSTICS err = MESSAGE_TEXT;
      UPDATE meshhook_limits.poolers p SET resized_at = p_at WHERE p.name = p_pooler.name;
      ev := jsonb_build_object('event', 'pool.resize_failed', 'payload',
                               jsonb_build_object('pooler', p_pooler.name, 'mode', p_pooler.sizing,
                                                  'error', meshhook_limits._pooler_text(err, 500)));
    END;
    PERFORM meshhook_limits._pooler_disconnect(db, conn);
    -- Events once the connection is closed (sending one may run Realtime's code).
    IF last.up = false THEN
      PERFORM meshhook_limits._emit('pool.pooler_up', NULL, p_pooler.name, NULL, NULL,
                                    jsonb_build_object('pooler', p_pooler.name, 'version', v, 'down_since',
                                      (SELECT min(s.sampled_at) FROM meshhook_limits.pooler_samples s
                                        WHERE s.pooler = p_pooler.name AND NOT s.up
                                          AND s.sampled_at > coalesce((SELECT max(u.sampled_at) FROM meshhook_limits.pooler_samples u
                                                                        WHERE u.pooler = p_pooler.name AND u.up AND u.sampled_at < p_at),
                                                                      '-infinity'))));
    END IF;
    IF ev IS NOT NULL THEN
      PERFORM meshhook_limits._emit(ev->>'event', NULL, p_pooler.name, (ev->>'value')::numeric, (ev->>'limit')::numeric,
                                    ev->'payload');
    END IF;
  EXCEPTION WHEN OTHERS OR query_canceled THEN
    GET STACKED DIAGNOSTICS err = MESSAGE_TEXT, detail = PG_EXCEPTION_DETAIL, state = RETURNED_SQLSTATE;
    PERFORM meshhook_limits._pooler_disconnect(db, conn);
    IF state = '57014' THEN
      RAISE;  -- a cancel of the tick itself (the pooler's deadline is 08006)
    END IF;
    err := err || coalesce(': ' || nullif(regexp_replace(meshhook_limits._pooler_text(detail, 500), '\s+', ' ', 'g'), ''), '');
    INSERT INTO meshhook_limits.pooler_samples (pooler, sampled_at, up, error, sample_ms)
    VALUES (p_pooler.name, p_at, false, meshhook_limits._pooler_text(err, 1000),
            round(extract(epoch FROM pg_catalog.clock_timestamp() - t_start) * 1000, 3))
    ON CONFLICT DO NOTHING;
    IF last.up IS DISTINCT FROM false THEN
      PERFORM meshhook_limits._emit('pool.pooler_down', NULL, p_pooler.name, NULL, NULL,
                                    jsonb_build_object('pooler', p_pooler.name, 'error', meshhook_limits._pooler_text(err, 500)));
    END IF;
  END;
END
$$;
REVOKE EXECUTE ON FUNCTION meshhook_limits._sample_pooler(meshhook_limits.poolers, timestamptz) FROM PUBLIC;

-- A setting with a time unit, in milliseconds.
CREATE FUNCTION meshhook_limits._setting_ms(p_name text) RETURNS numeric
LANGUAGE sql STABLE SET search_path = pg_catalog, pg_temp AS $$
  SELECT extract(epoch FROM current_setting(p_name)::interval) * 1000
$$;
REVOKE EXECUTE ON FUNCTION meshhook_limits._setting_ms(text) FROM PUBLIC;

-- Every enabled pooler, each on its own (a failing one never stops the others).
CREATE FUNCTION meshhook_limits._sample_poolers(p_at timestamptz) RETURNS void
LANGUAGE plpgsql VOLATILE SET search_path = pg_catalog, pg_temp AS $$
DECLARE p meshhook_limits.poolers;
BEGIN
  -- Only in the extension's worker or a superuser's own session (not an
  -- admin's tick(), not code a table's owner planted): a connection opened
  -- here has the extension owner's rights (src/pooler.rs).
  IF NOT meshhook_limits._pooler_may_connect() THEN
    RETURN;
  END IF;
  FOR p IN SELECT * FROM meshhook_limits.poolers x WHERE x.enabled ORDER BY x.name LOOP
    BEGIN
      PERFORM meshhook_limits._sample_pooler(p, p_at);
    EXCEPTION WHEN OTHERS THEN
      RAISE WARNING 'meshhook_limits: sampling pooler % failed: %', quote_literal(p.name), SQLERRM;
    END;
  END LOOP;
END
$$;
REVOKE EXECUTE ON FUNCTION meshhook_limits._sample_poolers(timestamptz) FROM PUBLIC;
