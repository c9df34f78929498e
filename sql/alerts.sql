-- meshhook_limits: Alerts: rules (built-in and user), their states, and evaluation: pending →
-- firing after for_duration, resolved past resolve_threshold, one event per
-- transition.
-- Everything is schema-qualified; SECURITY DEFINER functions pin search_path.

-- Empty by default: without a matching row the column defaults above apply.

-- Alert rules. metric: queue.queued, queue.oldest_age_seconds,
-- queue.error_rate, queue.failed_recent, pool.utilisation,
-- pool.idle_in_transaction, pool.waiting, tenant.usage_ratio, and of
-- each PgBouncer (sql/pooler.sql): pooler.up, and per pool
-- pooler.clients_waiting, pooler.maxwait_seconds, pooler.utilisation.
CREATE TABLE meshhook_limits.alert_rules (
  name text PRIMARY KEY CHECK (name ~ '^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$'),
  metric text NOT NULL CHECK (metric IN ('queue.queued', 'queue.oldest_age_seconds', 'queue.error_rate',
      'queue.failed_recent', 'pool.utilisation', 'pool.idle_in_transaction', 'pool.waiting', 'tenant.usage_ratio',
      'pooler.up', 'pooler.clients_waiting', 'pooler.maxwait_seconds', 'pooler.utilisation')),
  comparison text NOT NULL DEFAULT '>' CHECK (comparison IN ('>', '>=', '<', '<=')),
  threshold numeric NOT NULL,
  -- Hysteresis: a firing alert resolves only once the value is back past this
  -- (NULL = the threshold itself).
  resolve_threshold numeric,
  for_duration interval NOT NULL DEFAULT '0' CHECK (for_duration >= interval '0'),
  severity text NOT NULL DEFAULT 'warning' CHECK (severity IN ('info', 'warning', 'critical')),
  labels jsonb NOT NULL DEFAULT '{}' CHECK (jsonb_typeof(labels) = 'object'),
  enabled boolean NOT NULL DEFAULT true,
  description text
);
-- Built-in rules ship with the extension; a row of the same name in
-- alert_rules overrides one (enabled = false switches it off). Only
-- alert_rules is dumped, so pg_dump/restore never collides with them.
CREATE TABLE meshhook_limits.builtin_alert_rules (LIKE meshhook_limits.alert_rules INCLUDING DEFAULTS INCLUDING CONSTRAINTS);
ALTER TABLE meshhook_limits.builtin_alert_rules ADD PRIMARY KEY (name);
INSERT INTO meshhook_limits.builtin_alert_rules (name, metric, threshold, resolve_threshold, for_duration, severity, description) VALUES
  ('queue_backlog', 'queue.queued', 1000, 800, '2 minutes', 'warning', 'a queue has more than 1000 jobs waiting'),
  ('queue_oldest_age', 'queue.oldest_age_seconds', 300, 240, '1 minute', 'warning', 'the oldest waiting job is older than 5 minutes'),
  ('queue_error_rate', 'queue.error_rate', 0.2, 0.1, '5 minutes', 'critical', 'more than 20% of recent jobs failed'),
  ('pool_utilisation', 'pool.utilisation', 0.9, 0.85, '5 minutes', 'critical', 'connections above 90% of max_connections'),
  ('tenant_near_limit', 'tenant.usage_ratio', 0.9, 0.8, '0', 'warning', 'a tenant uses more than 90% of a limit'),
  ('pooler_wait', 'pooler.maxwait_seconds', 1, 0.2, '30 seconds', 'warning',
   'a client has waited more than 1 s for a server connection in a PgBouncer pool'),
  ('pooler_saturation', 'pooler.clients_waiting', 4, 0, '1 minute', 'critical',
   'more than 4 clients kept waiting for a server connection in a PgBouncer pool');

CREATE TABLE meshhook_limits.alert_states (
  rule text NOT NULL,
  series text NOT NULL,
  labels jsonb NOT NULL,
  tenant_id uuid,
  state text NOT NULL CHECK (state IN ('pending', 'firing')),
  value numeric,
  since timestamptz NOT NULL,
  fired_at timestamptz,
  PRIMARY KEY (rule, series)
);
SELECT pg_catalog.pg_extension_config_dump('meshhook_limits.alert_rules', '');
-- So that a restored database does not send a firing alert's alert.firing again.
SELECT pg_catalog.pg_extension_config_dump('meshhook_limits.alert_states', '');
ALTER TABLE meshhook_limits.alert_rules ENABLE ROW LEVEL SECURITY;
ALTER TABLE meshhook_limits.builtin_alert_rules ENABLE ROW LEVEL SECURITY;
CREATE POLICY admin_all ON meshhook_limits.builtin_alert_rules FOR SELECT USING ((SELECT meshhook_limits.can_monitor()));
ALTER TABLE meshhook_limits.alert_states ENABLE ROW LEVEL SECURITY;
CREATE POLICY admin_all ON meshhook_limits.alert_rules FOR SELECT USING ((SELECT meshhook_limits.can_monitor()));
CREATE POLICY admin_all ON meshhook_limits.alert_states FOR SELECT USING ((SELECT meshhook_limits.can_monitor()));
CREATE POLICY own_rows ON meshhook_limits.alert_states FOR SELECT USING (tenant_id = (SELECT meshhook_limits.current_tenant()));
GRANT SELECT ON meshhook_limits.builtin_alert_rules TO PUBLIC;
GRANT SELECT ON meshhook_limits.alert_rules TO PUBLIC;
GRANT SELECT ON meshhook_limits.alert_states TO PUBLIC;

-- The rules in force: user rules, and built-in rules not overridden by name.
-- security_invoker: the caller's row-level security applies (tenants see none).
CREATE VIEW meshhook_limits.effective_alert_rules WITH (security_invoker = true) AS
  SELECT u.*, 'user'::text AS origin FROM meshhook_limits.alert_rules u
  UNION ALL
  SELECT b.*, 'builtin' FROM meshhook_limits.builtin_alert_rules b
   WHERE NOT EXISTS (SELECT 1 FROM meshhook_limits.alert_rules u WHERE u.name = b.name);
GRANT SELECT ON meshhook_limits.effective_alert_rules TO PUBLIC;

-- Current value of every series of a metric, with its labels.
CREATE FUNCTION meshhook_limits._series(p_metric text)
RETURNS TABLE(series text, labels jsonb, tenant_id uuid, value numeric)
LANGUAGE plpgsql STABLE SET search_path = pg_catalog, pg_temp AS $$
#variable_conflict use_column
DECLARE tenants uuid[];
BEGIN
  IF p_metric LIKE 'queue.%' THEN
    RETURN QUERY
      SELECT h.source || ':' || h.queue, jsonb_build_object('source', h.source, 'queue', h.queue), NULL::uuid,
             CASE p_metric WHEN 'queue.queued' THEN h.queued::numeric
                           WHEN 'queue.oldest_age_seconds' THEN coalesce(extract(epoch FROM h.oldest_age), 0)
                           WHEN 'queue.error_rate' THEN h.error_rate
                           ELSE h.failed_recent::numeric END
        FROM meshhook_limits._latest_queue_samples() h;
  ELSIF p_metric LIKE 'pool.%' THEN
    RETURN QUERY
      SELECT 'pool', '{}'::jsonb, NULL::uuid,
             CASE p_metric WHEN 'pool.utilisation' THEN p.utilisation
                           WHEN 'pool.idle_in_transaction' THEN p.idle_in_transaction::numeric
                           ELSE p.waiting::numeric END
        FROM meshhook_limits.pool_samples p ORDER BY p.sampled_at DESC LIMIT 1;
  ELSIF p_metric = 'pooler.up' THEN
    RETURN QUERY
      SELECT 'pooler:' || l.pooler, jsonb_build_object('pooler', l.pooler), NULL::uuid, l.up::int::numeric
        FROM meshhook_limits._latest_pooler_samples() l;
  ELSIF p_metric LIKE 'pooler.%' THEN
    RETURN QUERY
      SELECT 'pooler:' || x.pooler || ':' || x.database || ':' || x.user_name,
             jsonb_build_object('pooler', x.pooler, 'database', x.database, 'user', x.user_name), NULL::uuid,
             CASE p_metric WHEN 'pooler.clients_waiting' THEN x.clients_waiting::numeric
                           WHEN 'pooler.maxwait_seconds' THEN x.maxwait_seconds
                           ELSE round((x.servers_active + x.servers_idle + x.servers_used + x.servers_tested
                                       + x.servers_login)::numeric / nullif(x.pool_size, 0), 4) END
        FROM meshhook_limits._latest_pooler_samples() l
        JOIN meshhook_limits.pooler_pool_samples x ON x.pooler = l.pooler AND x.sampled_at = l.sampled_at
       WHERE l.up;
  ELSIF p_metric = 'tenant.usage_ratio' THEN
    -- Every tenant metered in the last day, with live slots, or storing data
    -- (none: skip planning the usage query at all, every tick).
    tenants := meshhook_limits._active_tenants(NULL);
    IF cardinality(tenants) = 0 THEN
      RETURN;
    END IF;
    RETURN QUERY
      SELECT u.tenant_id::text || ':' || u.resource, jsonb_build_object('tenant_id', u.tenant_id, 'resource', u.resource),
             u.tenant_id, round(u.used / u.limit_value, 6)
        FROM meshhook_limits._usage_ratios(tenants) u
       WHERE u.used IS NOT NULL AND u.limit_value > 0;
  END IF;
END
$$;
REVOKE EXECUTE ON FUNCTION meshhook_limits._series(text) FROM PUBLIC;

-- alert.firing / alert.resolved of one series of a rule.
CREATE FUNCTION meshhook_limits._emit_alert(p_event text, p_rule text, p_metric text, p_severity text,
                                            p_threshold numeric, p_tenant uuid, p_value numeric,
                                            p_labels jsonb, p_since timestamptz)
RETURNS void LANGUAGE sql VOLATILE SET search_path = pg_catalog, pg_temp AS $$
  SELECT meshhook_limits._emit(p_event, p_tenant, p_metric, p_value, p_threshold,
    jsonb_build_object('rule', p_rule, 'severity', p_severity, 'labels', p_labels, 'since', p_since))
$$;
REVOKE EXECUTE ON FUNCTION meshhook_limits._emit_alert(text, text, text, text, numeric, uuid, numeric, jsonb, timestamptz) FROM PUBLIC;

CREATE FUNCTION meshhook_limits._compare(p_value numeric, p_op text, p_threshold numeric) RETURNS boolean
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
  SELECT CASE p_op WHEN '>' THEN p_value > p_threshold WHEN '>=' THEN p_value >= p_threshold
                   WHEN '<' THEN p_value < p_threshold ELSE p_value <= p_threshold END
$$;
REVOKE EXECUTE ON FUNCTION meshhook_limits._compare(numeric, text, numeric) FROM PUBLIC;

-- pending → firing after for_duration (alert.firing), firing → resolved once
-- the value is back past resolve_threshold (alert.resolved). A series that
-- disappears resolves too. One event per transition: no storms.
CREATE FUNCTION meshhook_limits._evaluate_alerts(p_at timestamptz) RETURNS bigint
LANGUAGE plpgsql VOLATILE SET search_path = pg_catalog, pg_temp AS $$
#variable_conflict use_column
DECLARE rule record; s record; st record; n bigint := 0; active boolean; clear_thr numeric;
  v_series text[]; v_labels jsonb[]; v_tenants uuid[]; v_values numeric[];
BEGIN
  FOR rule IN SELECT * FROM meshhook_limits.effective_alert_rules r WHERE r.enabled ORDER BY r.name LOOP
  -- Each rule on its own: one that fails (a bad series value, say) is
  -- logged and counted in worker_state.errors; the others are evaluated.
  BEGIN
    clear_thr := coalesce(rule.resolve_threshold, rule.threshold);
    -- The rule's series, read once into arrays (unnest zips them back).
    SELECT coalesce(array_agg(x.series), '{}'), coalesce(array_agg(x.labels), '{}'),
           coalesce(array_agg(x.tenant_id), '{}'), coalesce(array_agg(x.value), '{}')
      INTO v_series, v_labels, v_tenants, v_values
      FROM meshhook_limits._series(rule.metric) x WHERE x.labels @> rule.labels;
    -- Set-based first: only series that change state go through the loop —
    -- new past the threshold, pending that clears or is due, firing that is
    -- back past resolve_threshold. With 1,000 quiet or steadily alerting
    -- queues, none do.
    FOR s IN SELECT c.series, c.labels, c.tenant_id, c.value
               FROM unnest(v_series, v_labels, v_tenants, v_values) AS c(series, labels, tenant_id, value)
               LEFT JOIN meshhook_limits.alert_states a ON a.rule = rule.name AND a.series = c.series
              WHERE (a.rule IS NULL AND c.value IS NOT NULL
                     AND meshhook_limits._compare(c.value, rule.comparison, rule.threshold))
                 OR (a.state = 'pending' AND (c.value IS NULL
                     OR NOT meshhook_limits._compare(c.value, rule.comparison, rule.threshold)
                     OR p_at - a.since >= rule.for_duration))
                 OR (a.state = 'firing' AND (c.value IS NULL
                     OR NOT meshhook_limits._compare(c.value, rule.comparison, clear_thr))) LOOP
      SELECT * INTO st FROM meshhook_limits.alert_states a WHERE a.rule = rule.name AND a.series = s.series;
      active := s.value IS NOT NULL AND meshhook_limits._compare(s.value, rule.comparison, rule.threshold);
      IF st IS NULL OR st.rule IS NULL THEN
        IF active THEN
          INSERT INTO meshhook_limits.alert_states VALUES (rule.name, s.series, s.labels, s.tenant_id, 'pending', s.value, p_at, NULL);
          SELECT * INTO st FROM meshhook_limits.alert_states a WHERE a.rule = rule.name AND a.series = s.series;
        ELSE
          CONTINUE;
        END IF;
      END IF;
      IF st.state = 'pending' THEN
        IF NOT active THEN
          DELETE FROM meshhook_limits.alert_states a WHERE a.rule = rule.name AND a.series = s.series;
        ELSIF p_at - st.since >= rule.for_duration THEN
          UPDATE meshhook_limits.alert_states a SET state = 'firing', fired_at = p_at, value = s.value
           WHERE a.rule = rule.name AND a.series = s.series;
          PERFORM meshhook_limits._emit_alert('alert.firing', rule.name, rule.metric, rule.severity, rule.threshold,
                                              s.tenant_id, s.value, s.labels, st.since);
          n := n + 1;
        ELSE
          UPDATE meshhook_limits.alert_states a SET value = s.value WHERE a.rule = rule.name AND a.series = s.series;
        END IF;
      ELSIF st.state = 'firing' THEN
        IF s.value IS NULL OR NOT meshhook_limits._compare(s.value, rule.comparison, clear_thr) THEN
          DELETE FROM meshhook_limits.alert_states a WHERE a.rule = rule.name AND a.series = s.series;
          PERFORM meshhook_limits._emit_alert('alert.resolved', rule.name, rule.metric, rule.severity, rule.threshold,
                                              s.tenant_id, s.value, s.labels, st.since);
          n := n + 1;
        ELSE
          UPDATE meshhook_limits.alert_states a SET value = s.value WHERE a.rule = rule.name AND a.series = s.series;
        END IF;
      END IF;
    END LOOP;
    -- Series that stay pending or firing: their current value, in one statement.
    UPDATE meshhook_limits.alert_states a SET value = c.value
      FROM unnest(v_series, v_values) AS c(series, value)
     WHERE a.rule = rule.name AND a.series = c.series AND a.value IS DISTINCT FROM c.value;
    -- Series that are gone (a queue dropped, a tenant idle): resolve or forget.
    FOR st IN DELETE FROM meshhook_limits.alert_states a
               WHERE a.rule = rule.name
                 AND NOT EXISTS (SELECT 1 FROM unnest(v_series) AS c(series) WHERE c.series = a.series)
               RETURNING a.* LOOP
      IF st.state = 'firing' THEN
        PERFORM meshhook_limits._emit_alert('alert.resolved', rule.name, rule.metric, rule.severity, rule.threshold,
                                            st.tenant_id, NULL, st.labels, st.since);
        n := n + 1;
      END IF;
    END LOOP;
  EXCEPTION WHEN OTHERS THEN
    RAISE WARNING 'meshhook_limits: alert rule % failed: %', quote_literal(rule.name), SQLERRM;
    UPDATE meshhook_limits.worker_state
       SET errors = errors + 1, last_error = format('alert rule %s: %s', rule.name, SQLERRM);
  END;
  END LOOP;
  -- Rules that were disabled or deleted stop quietly.
  DELETE FROM meshhook_limits.alert_states a
   WHERE NOT EXISTS (SELECT 1 FROM meshhook_limits.effective_alert_rules r WHERE r.name = a.rule AND r.enabled);
  RETURN n;
END
$$;
REVOKE EXECUTE ON FUNCTION meshhook_limits._evaluate_alerts(timestamptz) FROM PUBLIC;

-- Alert rules: admins manage them with plain DML through this function.
-- Arguments left out (or NULL) keep the rule's current values (a built-in
-- one's as shipped); a new rule needs a metric and a threshold.
CREATE FUNCTION meshhook_limits.set_alert_rule(name text, metric text DEFAULT NULL, threshold numeric DEFAULT NULL,
    comparison text DEFAULT NULL, for_duration interval DEFAULT NULL, severity text DEFAULT NULL,
    labels jsonb DEFAULT NULL, resolve_threshold numeric DEFAULT NULL, enabled boolean DEFAULT NULL,
    description text DEFAULT NULL)
RETURNS void LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
#variable_conflict use_column
DECLARE
  -- The metrics of alert_rules' CHECK, named in messages of their own.
  known_metrics constant text[] := ARRAY['queue.queued', 'queue.oldest_age_seconds', 'queue.error_rate',
    'queue.failed_recent', 'pool.utilisation', 'pool.idle_in_transaction', 'pool.waiting', 'tenant.usage_ratio',
    'pooler.up', 'pooler.clients_waiting', 'pooler.maxwait_seconds', 'pooler.utilisation'];
  r record;
BEGIN
  PERFORM meshhook_limits.require_admin_access('manage alert rules');
  IF set_alert_rule.name IS NULL THEN
    RAISE EXCEPTION 'name must not be NULL' USING ERRCODE = '22023', HINT = 'name the rule to create or change';
  END IF;
  SELECT e.metric, e.comparison, e.threshold, e.resolve_threshold, e.for_duration, e.severity, e.labels, e.enabled,
         e.description
    INTO r FROM meshhook_limits.effective_alert_rules e WHERE e.name = set_alert_rule.name;
  IF NOT FOUND AND (set_alert_rule.metric IS NULL OR set_alert_rule.threshold IS NULL) THEN
    RAISE EXCEPTION 'alert rule % does not exist: a new rule needs a metric and a threshold',
      quote_literal(left(set_alert_rule.name, 80)) USING ERRCODE = '22023',
      HINT = 'set_alert_rule(name, metric, threshold, ...); metric is one of ' || array_to_string(known_metrics, ', ');
  END IF;
  r.metric := coalesce(set_alert_rule.metric, r.metric);
  r.comparison := coalesce(set_alert_rule.comparison, r.comparison, '>');
  r.threshold := coalesce(set_alert_rule.threshold, r.threshold);
  r.resolve_threshold := coalesce(set_alert_rule.resolve_threshold, r.resolve_threshold);
  r.for_duration := coalesce(set_alert_rule.for_duration, r.for_duration, interval '0');
  r.severity := coalesce(set_alert_rule.severity, r.severity, 'warning');
  r.labels := coalesce(set_alert_rule.labels, r.labels, '{}');
  r.enabled := coalesce(set_alert_rule.enabled, r.enabled, true);
  r.description := coalesce(set_alert_rule.description, r.description);
  IF NOT r.metric = ANY (known_metrics) THEN
    RAISE EXCEPTION 'unknown alert metric %', quote_literal(r.metric) USING ERRCODE = '22023',
      HINT = 'metric is one of ' || array_to_string(known_metrics, ', ');
  END IF;
  IF r.threshold = 'NaN' OR abs(r.threshold) > 1e18 THEN
    RAISE EXCEPTION 'threshold must be a number between -1e18 and 1e18' USING ERRCODE = '22023';
  END IF;
  IF r.resolve_threshold = 'NaN' OR abs(r.resolve_threshold) > 1e18 THEN
    RAISE EXCEPTION 'resolve_threshold must be NULL or a number between -1e18 and 1e18' USING ERRCODE = '22023';
  END IF;
  BEGIN
    INSERT INTO meshhook_limits.alert_rules AS a (name, metric, comparison, threshold, resolve_threshold,
        for_duration, severity, labels, enabled, description)
    VALUES (set_alert_rule.name, r.metric, r.comparison, r.threshold, r.resolve_threshold, r.for_duration,
            r.severity, r.labels, r.enabled, r.description)
    ON CONFLICT (name) DO UPDATE SET metric = EXCLUDED.metric, comparison = EXCLUDED.comparison,
      threshold = EXCLUDED.threshold, resolve_threshold = EXCLUDED.resolve_threshold,
      for_duration = EXCLUDED.for_duration, severity = EXCLUDED.severity, labels = EXCLUDED.labels,
      enabled = EXCLUDED.enabled, description = EXCLUDED.description;
  EXCEPTION WHEN check_violation OR not_null_violation THEN
    RAISE EXCEPTION 'invalid alert rule: %', SQLERRM USING ERRCODE = '22023',
      HINT = 'metric is one of ' || array_to_string(known_metrics, ', ') || '; comparison one of > >= < <=; '
             'severity info, warning or critical; for_duration >= 0';
  END;
END
$$;

-- Undo what set_alert_rule did. drop_alert_rule removes a rule of the
-- user's own (a built-in one is switched off with enabled => false);
-- reset_alert_rule puts a built-in rule back as shipped. True when a row
-- went; the rule's pending and firing series stop quietly at the next tick.
CREATE FUNCTION meshhook_limits.drop_alert_rule(name text) RETURNS boolean
LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
#variable_conflict use_variable
BEGIN
  PERFORM meshhook_limits.require_admin_access('manage alert rules');
  IF EXISTS (SELECT 1 FROM meshhook_limits.builtin_alert_rules b WHERE b.name = drop_alert_rule.name) THEN
    RAISE EXCEPTION 'alert rule % is built in and cannot be dropped', quote_literal(name) USING ERRCODE = '22023',
      HINT = 'switch it off with set_alert_rule(name, enabled => false), '
             'or undo your changes to it with reset_alert_rule(name)';
  END IF;
  DELETE FROM meshhook_limits.alert_rules r WHERE r.name = drop_alert_rule.name;
  RETURN FOUND;
END
$$;

CREATE FUNCTION meshhook_limits.reset_alert_rule(name text) RETURNS boolean
LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
#variable_conflict use_variable
BEGIN
  PERFORM meshhook_limits.require_admin_access('manage alert rules');
  IF NOT EXISTS (SELECT 1 FROM meshhook_limits.builtin_alert_rules b WHERE b.name = reset_alert_rule.name) THEN
    RAISE EXCEPTION 'no built-in alert rule %', coalesce(quote_literal(name), 'NULL') USING ERRCODE = '42704',
      HINT = 'built-in rules: ' || (SELECT string_agg(b.name, ', ' ORDER BY b.name) FROM meshhook_limits.builtin_alert_rules b)
             || '; remove a rule of your own with drop_alert_rule(name)';
  END IF;
  DELETE FROM meshhook_limits.alert_rules r WHERE r.name = reset_alert_rule.name;
  RETURN FOUND;
END
$$;
