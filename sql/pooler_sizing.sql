-- meshhook_limits: Pool sizing that acts (opt-in, set_pooler_sizing): the advice from a
-- pooler's samples, and acting on it (the poolers: sql/pooler.sql).

-- The pool size to run with, from both sides over the pooler's last
-- resize_every: raise when clients kept waiting (in at least half the
-- samples, or the longest wait reached pooler_wait_warning) by the p95 of
-- waiting clients of the busiest pool; lower when no client waited and the
-- busiest pool used at most half its servers (p95), to that p95 plus 25%.
-- Between the two nothing changes (hysteresis). Always within the pooler's
-- min/max_pool_size, and within what the server has room for (which wins
-- over min_pool_size): max_connections minus superuser_reserved_connections
-- and reserved_connections, minus the pools of the other poolers, this
-- pooler's pools of their own size and the sessions no pooler opened,
-- shared by the pools that follow default_pool_size.
CREATE FUNCTION meshhook_limits._pooler_size_advice(p_pooler meshhook_limits.poolers, p_at timestamptz)
RETURNS TABLE(current_size int, recommended_size int, server_cap int, pools int, reason text)
LANGUAGE plpgsql STABLE SET search_path = pg_catalog, pg_temp AS $$
#variable_conflict use_column
DECLARE
  cur int; n bigint; fixed bigint; others bigint; pooled bigint; direct bigint; cap bigint; usable bigint;
  w record; target int; why text;
BEGIN
  SELECT s.default_pool_size INTO cur FROM meshhook_limits.pooler_samples s
   WHERE s.pooler = p_pooler.name AND s.up AND s.sampled_at <= p_at ORDER BY s.sampled_at DESC LIMIT 1;
  IF cur IS NULL THEN
    RETURN;
  END IF;
  -- The pools of the latest sample: those on the default size, and the rest.
  SELECT count(*) FILTER (WHERE x.pool_size = cur), coalesce(sum(x.pool_size) FILTER (WHERE x.pool_size <> cur), 0)
    INTO n, fixed
    FROM meshhook_limits.pooler_pool_samples x
   WHERE x.pooler = p_pooler.name
     AND x.sampled_at = (SELECT max(y.sampled_at) FROM meshhook_limits.pooler_pool_samples y
                          WHERE y.pooler = p_pooler.name AND y.sampled_at <= p_at);
  n := GREATEST(n, 1);
  -- The latest pools of every pooler sampled in the last 5 minutes: the
  -- other poolers' pool sizes, and the server connections all of them use.
  SELECT coalesce(sum(x.pool_size) FILTER (WHERE x.pooler <> p_pooler.name), 0),
         coalesce(sum(x.servers_active + x.servers_idle + x.servers_used + x.servers_tested + x.servers_login), 0)
    INTO others, pooled
    FROM meshhook_limits.pooler_pool_samples x
    JOIN (SELECT y.pooler, max(y.sampled_at) AS at FROM meshhook_limits.pooler_pool_samples y
           WHERE y.sampled_at > p_at - interval '5 minutes' AND y.sampled_at <= p_at GROUP BY y.pooler) l
      ON l.pooler = x.pooler AND l.at = x.sampled_at;
  -- Sessions on the server that no pooler opened (clients connected
  -- directly, the worker), from the server's own sample of this tick.
  direct := GREATEST(coalesce((SELECT p.total FROM meshhook_limits.pool_samples p
                                WHERE p.sampled_at <= p_at ORDER BY p.sampled_at DESC LIMIT 1), 0) - pooled, 0);
  usable := current_setting('max_connections')::int - current_setting('superuser_reserved_connections')::int
            - coalesce(nullif(current_setting('reserved_connections', true), '')::int, 0);
  cap := GREATEST((usable - others - fixed - direct) / n, 1);
  SELECT count(DISTINCT x.sampled_at) AS samples,
         count(DISTINCT x.sampled_at) FILTER (WHERE x.clients_waiting > 0) AS waited,
         max(x.maxwait_seconds) AS maxwait,
         min(x.sampled_at) AS first_at
    INTO w
    FROM meshhook_limits.pooler_pool_samples x
   WHERE x.pooler = p_pooler.name AND x.sampled_at > p_at - p_pooler.resize_every AND x.sampled_at <= p_at
     AND x.pool_size = cur;
  IF w.samples < 2 OR NOT EXISTS (SELECT 1 FROM meshhook_limits.pooler_samples s
                                    WHERE s.pooler = p_pooler.name AND s.sampled_at <= p_at - p_pooler.resize_every) THEN
    RETURN QUERY SELECT cur, cur, LEAST(cap, 2147483647)::int, LEAST(n, 2147483647)::int,
                        format('not enough samples yet: sizing looks back over %s', p_pooler.resize_every);
    RETURN;
  END IF;
  IF w.waited * 2 >= w.samples OR w.maxwait * 1000 >= meshhook_limits._setting_ms('meshhook_limits.pooler_wait_warning') THEN
    SELECT cur + GREATEST(ceil(percentile_cont(0.95) WITHIN GROUP (ORDER BY b.waiting))::int, 1) INTO target
      FROM (SELECT max(x.clients_waiting) AS waiting FROM meshhook_limits.pooler_pool_samples x
             WHERE x.pooler = p_pooler.name AND x.sampled_at > p_at - p_pooler.resize_every AND x.sampled_at <= p_at
               AND x.pool_size = cur
             GROUP BY x.sampled_at) b;
    why := format('clients waited in %s of %s samples over %s (longest wait %s s): raise by the p95 of waiting clients',
                  w.waited, w.samples, p_pooler.resize_every, round(w.maxwait, 3));
  ELSIF w.waited = 0 THEN
    SELECT percentile_cont(0.95) WITHIN GROUP (ORDER BY b.busy) INTO w.maxwait
      FROM (SELECT max(x.servers_active) AS busy FROM meshhook_limits.pooler_pool_samples x
             WHERE x.pooler = p_pooler.name AND x.sampled_at > p_at - p_pooler.resize_every AND x.sampled_at <= p_at
               AND x.pool_size = cur
             GROUP BY x.sampled_at) b;
    IF w.maxwait * 2 <= cur THEN
      target := ceil(w.maxwait * 1.25)::int;
      why := format('no client waited over %s and the busiest pool used at most %s servers (p95) of %s: '
                    'lower to that plus 25%%', p_pooler.resize_every, w.maxwait, cur);
    ELSE
      target := cur;
      why := format('no client waited over %s; the busiest pool used %s servers (p95) of %s: keep',
                    p_pooler.resize_every, w.maxwait, cur);
    END IF;
  ELSE
    target := cur;
    why := format('clients waited in %s of %s samples over %s: keep', w.waited, w.samples, p_pooler.resize_every);
  END IF;
  -- Within [min_pool_size, max_pool_size], and never above the server's
  -- room, which wins over min_pool_size: bounds are an admin's, the room
  -- is every database's.
  target := LEAST(GREATEST(target, p_pooler.min_pool_size), p_pooler.max_pool_size);
  IF target > cap THEN
    why := why || format('; capped at %s: the server''s %s usable connections, less %s held by other pools and %s '
                         'sessions no pooler opened, over %s pools', cap, usable, others + fixed, direct, n);
    target := cap;
  END IF;
  RETURN QUERY SELECT cur, target, LEAST(cap, 2147483647)::int, LEAST(n, 2147483647)::int, why;
END
$$;
REVOKE EXECUTE ON FUNCTION meshhook_limits._pooler_size_advice(meshhook_limits.poolers, timestamptz) FROM PUBLIC;

-- Act on the advice when sizing is on (SET default_pool_size on the admin
-- console) or record it when dry_run: at most once per resize_every. Returns
-- the event to send (pool.resized, pool.resize_proposed, with before, after
-- and why), which the caller sends once the connection is closed.
CREATE FUNCTION meshhook_limits._size_pooler(p_pooler meshhook_limits.poolers, p_at timestamptz, p_dblink name,
                                             p_conn text, p_deadline timestamptz)
RETURNS jsonb LANGUAGE plpgsql VOLATILE SET search_path = pg_catalog, pg_temp AS $$
DECLARE a record;
BEGIN
  IF p_pooler.sizing = 'off' OR p_at < p_pooler.resized_at + p_pooler.resize_every THEN
    RETURN NULL;
  END IF;
  SELECT * INTO a FROM meshhook_limits._pooler_size_advice(p_pooler, p_at);
  IF a.recommended_size IS NULL OR a.recommended_size = a.current_size THEN
    RETURN NULL;
  END IF;
  IF p_pooler.sizing = 'on' THEN
    PERFORM meshhook_limits._pooler_send(p_dblink, p_conn, format('SET default_pool_size = %s', a.recommended_size::int),
                                         p_deadline);
    EXECUTE format('SELECT count(*) FROM %I.dblink_get_result($1::text, true) AS t(c1 text)', p_dblink) USING p_conn;
    PERFORM meshhook_limits._pooler_wait(p_dblink, p_conn, 'SET default_pool_size', p_deadline);
    EXECUTE format('SELECT count(*) FROM %I.dblink_get_result($1::text) AS t(c1 text)', p_dblink) USING p_conn;
  END IF;
  UPDATE meshhook_limits.poolers p SET resized_at = p_at WHERE p.name = p_pooler.name;
  RETURN jsonb_build_object(
    'event', CASE p_pooler.sizing WHEN 'on' THEN 'pool.resized' ELSE 'pool.resize_proposed' END,
    'value', a.recommended_size, 'limit', a.current_size,
    'payload', jsonb_build_object('pooler', p_pooler.name, 'before', a.current_size,
                                  'after', a.recommended_size, 'why', a.reason,
                                  'mode', p_pooler.sizing, 'min_pool_size', p_pooler.min_pool_size,
                                  'max_pool_size', p_pooler.max_pool_size, 'server_cap', a.server_cap,
                                  'pools', a.pools));
END
$$;
REVOKE EXECUTE ON FUNCTION meshhook_limits._size_pooler(meshhook_limits.poolers, timestamptz, name, text, timestamptz) FROM PUBLIC;
