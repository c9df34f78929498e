-- meshhook_limits: Storage quotas: tracked tables, bytes per tenant kept by triggers in the
-- data path, and event triggers that follow renames and drops.
-- Everything is schema-qualified; SECURITY DEFINER functions pin search_path.

-- Storage quotas: statement-level triggers with transition tables keep each
-- tenant's bytes in tracked tables. A tenant's total is one row, so writers
-- that grow the same tenant serialise on it and the check is exact.
CREATE TABLE meshhook_limits.tracked_tables (
  table_schema name NOT NULL,
  table_name name NOT NULL,
  tenant_column name NOT NULL,
  tracked_at timestamptz NOT NULL DEFAULT pg_catalog.now(),
  -- Identity in this cluster, to follow renames; refreshed from the names
  -- when it does not match (after pg_dump/restore).
  relid oid,
  tenant_attnum smallint,
  PRIMARY KEY (table_schema, table_name)
);
CREATE TABLE meshhook_limits.storage_usage (
  tenant_id uuid NOT NULL,
  table_schema name NOT NULL,
  table_name name NOT NULL,
  bytes bigint NOT NULL,
  PRIMARY KEY (tenant_id, table_schema, table_name)
);
CREATE TABLE meshhook_limits.storage_totals (
  tenant_id uuid PRIMARY KEY,
  bytes bigint NOT NULL
);
SELECT pg_catalog.pg_extension_config_dump('meshhook_limits.tracked_tables', '');
SELECT pg_catalog.pg_extension_config_dump('meshhook_limits.storage_usage', '');
SELECT pg_catalog.pg_extension_config_dump('meshhook_limits.storage_totals', '');
ALTER TABLE meshhook_limits.tracked_tables ENABLE ROW LEVEL SECURITY;
ALTER TABLE meshhook_limits.storage_usage ENABLE ROW LEVEL SECURITY;
ALTER TABLE meshhook_limits.storage_totals ENABLE ROW LEVEL SECURITY;
CREATE POLICY admin_all ON meshhook_limits.tracked_tables FOR SELECT USING ((SELECT meshhook_limits.can_monitor()));
CREATE POLICY admin_all ON meshhook_limits.storage_usage FOR SELECT USING ((SELECT meshhook_limits.can_monitor()));
CREATE POLICY own_rows ON meshhook_limits.storage_usage FOR SELECT USING (tenant_id = (SELECT meshhook_limits.current_tenant()));
CREATE POLICY admin_all ON meshhook_limits.storage_totals FOR SELECT USING ((SELECT meshhook_limits.can_monitor()));
CREATE POLICY own_rows ON meshhook_limits.storage_totals FOR SELECT USING (tenant_id = (SELECT meshhook_limits.current_tenant()));
GRANT SELECT ON meshhook_limits.tracked_tables TO PUBLIC;
GRANT SELECT ON meshhook_limits.storage_usage TO PUBLIC;
GRANT SELECT ON meshhook_limits.storage_totals TO PUBLIC;

-- Apply per-tenant byte deltas of one statement on one table; refuse growth
-- past storage_bytes (53400), announce crossings of the warn ratio.
CREATE FUNCTION meshhook_limits._storage_apply(p_schema name, p_table name, p_tenant uuid, p_delta bigint)
RETURNS void LANGUAGE plpgsql VOLATILE SET search_path = pg_catalog, pg_temp AS $$
#variable_conflict use_column
DECLARE lim record; new_total bigint; old_total bigint; thr numeric;
BEGIN
  IF p_tenant IS NULL OR p_delta = 0 THEN
    RETURN;
  END IF;
  INSERT INTO meshhook_limits.storage_totals AS s (tenant_id, bytes) VALUES (p_tenant, p_delta)
  ON CONFLICT (tenant_id) DO UPDATE SET bytes = GREATEST(s.bytes + EXCLUDED.bytes, 0)
  RETURNING s.bytes INTO new_total;
  old_total := new_total - p_delta;
  INSERT INTO meshhook_limits.storage_usage AS u (tenant_id, table_schema, table_name, bytes)
  VALUES (p_tenant, p_schema, p_table, p_delta)
  ON CONFLICT (tenant_id, table_schema, table_name) DO UPDATE SET bytes = GREATEST(u.bytes + EXCLUDED.bytes, 0);
  SELECT * INTO lim FROM meshhook_limits._resolve(p_tenant, NULL) r WHERE r.resource = 'storage_bytes';
  IF lim.limit_value IS NULL THEN
    RETURN;
  END IF;
  IF p_delta > 0 AND new_total > lim.limit_value THEN
    RAISE EXCEPTION 'tenant % would store % bytes, over its storage_bytes limit of % (% bytes in use)',
                    p_tenant, new_total, lim.limit_value, old_total
      USING ERRCODE = '53400',
            DETAIL = format('the statement adds %s bytes to %I.%I', p_delta, p_schema, p_table),
            HINT = 'delete data first, or ask an admin to raise storage_bytes';
  END IF;
  thr := lim.limit_value * lim.warn_ratio;
  IF old_total < thr AND new_total >= thr THEN
    PERFORM meshhook_limits._emit('limit.warning', p_tenant, 'storage_bytes', new_total, lim.limit_value, NULL);
  ELSIF old_total >= thr AND new_total < thr THEN
    PERFORM meshhook_limits._emit('limit.recovered', p_tenant, 'storage_bytes', new_total, lim.limit_value, NULL);
  END IF;
END
$$;
REVOKE EXECUTE ON FUNCTION meshhook_limits._storage_apply(name, name, uuid, bigint) FROM PUBLIC;

-- The tracked table a table's writes count against: itself, or the root of
-- its partition tree (partitions of a tracked partitioned table carry the
-- same triggers, since DML on a partition fires only the partition's own
-- statement triggers, and DML on the parent only the parent's).
CREATE FUNCTION meshhook_limits._tracked(p_relid oid, p_schema name, p_table name)
RETURNS meshhook_limits.tracked_tables
LANGUAGE plpgsql VOLATILE SET search_path = pg_catalog, pg_temp AS $$
#variable_conflict use_column
DECLARE t meshhook_limits.tracked_tables; root oid;
BEGIN
  root := coalesce(pg_catalog.pg_partition_root(p_relid), p_relid);
  IF root <> p_relid THEN
    SELECT n.nspname, c.relname INTO p_schema, p_table
      FROM pg_catalog.pg_class c JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace WHERE c.oid = root;
  END IF;
  SELECT * INTO t FROM meshhook_limits.tracked_tables x WHERE x.relid = root;
  IF NOT FOUND THEN
    UPDATE meshhook_limits.tracked_tables x
       SET relid = root,
           tenant_attnum = (SELECT a.attnum FROM pg_catalog.pg_attribute a
                             WHERE a.attrelid = root AND a.attname = x.tenant_column AND NOT a.attisdropped)
     WHERE x.table_schema = p_schema AND x.table_name = p_table
    RETURNING x.* INTO t;
  END IF;
  RETURN t;
END
$$;
REVOKE EXECUTE ON FUNCTION meshhook_limits._tracked(oid, name, name) FROM PUBLIC;

CREATE FUNCTION meshhook_limits._storage_trigger() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE tr meshhook_limits.tracked_tables; col text; d record; q text;
BEGIN
  tr := meshhook_limits._tracked(TG_RELID, TG_TABLE_SCHEMA, TG_TABLE_NAME);
  IF tr.table_name IS NULL THEN
    RETURN NULL;  -- untracked in between, or a partition detached from a tracked table
  END IF;
  IF TG_OP = 'TRUNCATE' THEN
    IF tr.relid = TG_RELID THEN
      PERFORM meshhook_limits._storage_forget(tr.table_schema, tr.table_name, false);
    ELSE
      PERFORM meshhook_limits._storage_recount(tr.relid);  -- one partition of it
    END IF;
    RETURN NULL;
  END IF;
  col := tr.tenant_column;
  -- A row's size is the sum of its values' sizes (_row_bytes): the same rows
  -- always add and subtract alike, whatever the session's settings, and no
  -- cast or output function of the table's types runs as the definer.
  q := CASE TG_OP
    WHEN 'INSERT' THEN format('SELECT %I AS t, sum(meshhook_limits._row_bytes(n))::bigint AS b FROM new_rows n GROUP BY 1', col)
    WHEN 'DELETE' THEN format('SELECT %I AS t, -sum(meshhook_limits._row_bytes(o))::bigint AS b FROM old_rows o GROUP BY 1', col)
    ELSE format('SELECT t, sum(b)::bigint AS b FROM (SELECT %1$I AS t, meshhook_limits._row_bytes(n) AS b FROM new_rows n '
                'UNION ALL SELECT %1$I, -meshhook_limits._row_bytes(o) FROM old_rows o) x GROUP BY 1', col)
  END;
  -- Tenants in a fixed order, so concurrent multi-tenant statements cannot deadlock.
  FOR d IN EXECUTE q || ' ORDER BY 1' LOOP
    PERFORM meshhook_limits._storage_apply(tr.table_schema, tr.table_name, d.t, d.b);
  END LOOP;
  RETURN NULL;
END
$$;
REVOKE EXECUTE ON FUNCTION meshhook_limits._storage_trigger() FROM PUBLIC;

-- Bytes per tenant in a tracked table (all its partitions), counted as the
-- table's owner (see _read_as_owner): [{"t": tenant, "b": bytes}, ...].
CREATE FUNCTION meshhook_limits._storage_count(p_relid oid, p_column name) RETURNS jsonb
LANGUAGE sql VOLATILE SET search_path = pg_catalog, pg_temp AS $$
  SELECT meshhook_limits._read_as_owner(p_relid, pg_catalog.format(
    'SELECT coalesce(pg_catalog.jsonb_agg(pg_catalog.jsonb_build_object(''t'', s.t, ''b'', s.b)), ''[]'')
       FROM (SELECT x.%1$I AS t, pg_catalog.sum(meshhook_limits._row_bytes(x))::bigint AS b
               FROM %2$s x WHERE x.%1$I IS NOT NULL GROUP BY 1) s', p_column, p_relid::regclass))
$$;
REVOKE EXECUTE ON FUNCTION meshhook_limits._storage_count(oid, name) FROM PUBLIC;

-- Count a tracked table again from its rows (after a schema change that
-- changes row sizes, an attach or detach of a partition, a TRUNCATE of one
-- partition). Never refuses: the rows are already there.
CREATE FUNCTION meshhook_limits._storage_recount(p_relid oid) RETURNS void
LANGUAGE plpgsql VOLATILE SET search_path = pg_catalog, pg_temp AS $$
DECLARE tr meshhook_limits.tracked_tables; d record;
BEGIN
  SELECT * INTO tr FROM meshhook_limits.tracked_tables t WHERE t.relid = p_relid;
  IF NOT FOUND THEN
    RETURN;
  END IF;
  PERFORM meshhook_limits._storage_forget(tr.table_schema, tr.table_name, false);
  FOR d IN SELECT (e->>'t')::uuid AS t, (e->>'b')::bigint AS b
             FROM pg_catalog.jsonb_array_elements(meshhook_limits._storage_count(p_relid, tr.tenant_column)) e
            ORDER BY 1 LOOP
    INSERT INTO meshhook_limits.storage_usage (tenant_id, table_schema, table_name, bytes)
    VALUES (d.t, tr.table_schema, tr.table_name, d.b);
    INSERT INTO meshhook_limits.storage_totals AS s (tenant_id, bytes) VALUES (d.t, d.b)
    ON CONFLICT (tenant_id) DO UPDATE SET bytes = s.bytes + EXCLUDED.bytes;
  END LOOP;
END
$$;
REVOKE EXECUTE ON FUNCTION meshhook_limits._storage_recount(oid) FROM PUBLIC;

-- The storage triggers on one table (a tracked table, or a partition of one).
CREATE FUNCTION meshhook_limits._storage_triggers(p_rel regclass, p_column name, p_create boolean)
RETURNS void LANGUAGE plpgsql VOLATILE SET search_path = pg_catalog, pg_temp AS $$
BEGIN
  IF NOT p_create THEN
    EXECUTE format('DROP TRIGGER IF EXISTS meshhook_limits_storage_ins ON %1$s;
                    DROP TRIGGER IF EXISTS meshhook_limits_storage_upd ON %1$s;
                    DROP TRIGGER IF EXISTS meshhook_limits_storage_del ON %1$s;
                    DROP TRIGGER IF EXISTS meshhook_limits_storage_trunc ON %1$s', p_rel);
    RETURN;
  END IF;
  IF EXISTS (SELECT 1 FROM pg_catalog.pg_trigger g WHERE g.tgrelid = p_rel AND g.tgname = 'meshhook_limits_storage_ins') THEN
    RETURN;
  END IF;
  EXECUTE format('CREATE TRIGGER meshhook_limits_storage_ins AFTER INSERT ON %s REFERENCING NEW TABLE AS new_rows '
                 'FOR EACH STATEMENT EXECUTE FUNCTION meshhook_limits._storage_trigger(%L)', p_rel, p_column);
  EXECUTE format('CREATE TRIGGER meshhook_limits_storage_upd AFTER UPDATE ON %s REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows '
                 'FOR EACH STATEMENT EXECUTE FUNCTION meshhook_limits._storage_trigger(%L)', p_rel, p_column);
  EXECUTE format('CREATE TRIGGER meshhook_limits_storage_del AFTER DELETE ON %s REFERENCING OLD TABLE AS old_rows '
                 'FOR EACH STATEMENT EXECUTE FUNCTION meshhook_limits._storage_trigger(%L)', p_rel, p_column);
  EXECUTE format('CREATE TRIGGER meshhook_limits_storage_trunc AFTER TRUNCATE ON %s '
                 'FOR EACH STATEMENT EXECUTE FUNCTION meshhook_limits._storage_trigger(%L)', p_rel, p_column);
END
$$;
REVOKE EXECUTE ON FUNCTION meshhook_limits._storage_triggers(regclass, name, boolean) FROM PUBLIC;

CREATE FUNCTION meshhook_limits.track_storage(tbl regclass, tenant_column name)
RETURNS bigint LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
#variable_conflict use_column
DECLARE sch name; rel name; typ regtype; kind "char"; part boolean; counted bigint; m record;
BEGIN
  PERFORM meshhook_limits.require_admin_access('track storage');
  IF tbl IS NULL OR tenant_column IS NULL THEN
    RAISE EXCEPTION 'tbl and tenant_column must not be NULL' USING ERRCODE = '22023';
  END IF;
  SELECT n.nspname, c.relname, c.relkind, c.relispartition INTO sch, rel, kind, part
    FROM pg_catalog.pg_class c JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace WHERE c.oid = tbl;
  IF kind NOT IN ('r', 'p') THEN
    RAISE EXCEPTION '% is not a table', tbl USING ERRCODE = '22023',
      HINT = 'track the tables behind a view instead';
  END IF;
  IF NOT meshhook_limits._caller_has_privs_of((SELECT c.relowner FROM pg_catalog.pg_class c WHERE c.oid = tbl)) THEN
    RAISE EXCEPTION 'must be the owner of table % to track it', tbl USING ERRCODE = '42501',
      HINT = 'an admin tracks the tables it owns (or whose owner role it is a member of)';
  END IF;
  IF part THEN
    RAISE EXCEPTION '% is a partition', tbl USING ERRCODE = '22023',
      HINT = format('track its partitioned table %s: that counts writes through it and through every partition',
                    pg_catalog.pg_partition_root(tbl)::regclass);
  END IF;
  SELECT a.atttypid::regtype INTO typ FROM pg_catalog.pg_attribute a
   WHERE a.attrelid = tbl AND a.attname = tenant_column AND a.attnum > 0 AND NOT a.attisdropped;
  IF typ IS NULL THEN
    RAISE EXCEPTION 'table % has no column %', tbl, quote_ident(tenant_column) USING ERRCODE = '22023';
  ELSIF typ <> 'uuid'::regtype THEN
    RAISE EXCEPTION 'column % of % is %, not uuid', quote_ident(tenant_column), tbl, typ USING ERRCODE = '22023',
      HINT = 'the tenant column holds tenant ids, which are uuids';
  END IF;
  IF EXISTS (SELECT 1 FROM meshhook_limits.tracked_tables t WHERE t.table_schema = sch AND t.table_name = rel) THEN
    RAISE EXCEPTION '% is already tracked', tbl USING ERRCODE = '22023', HINT = 'untrack_storage it first';
  END IF;
  -- No writer may slip between counting and the triggers.
  EXECUTE format('LOCK TABLE %s IN SHARE ROW EXCLUSIVE MODE', tbl);
  INSERT INTO meshhook_limits.tracked_tables (table_schema, table_name, tenant_column, relid, tenant_attnum)
  VALUES (sch, rel, tenant_column, tbl,
          (SELECT a.attnum FROM pg_catalog.pg_attribute a WHERE a.attrelid = tbl AND a.attname = tenant_column));
  FOR m IN SELECT p.relid FROM pg_catalog.pg_partition_tree(tbl) p UNION SELECT tbl LOOP
    PERFORM meshhook_limits._storage_triggers(m.relid, tenant_column, true);
  END LOOP;
  -- Existing rows count from now on; registration itself never refuses.
  PERFORM meshhook_limits._storage_recount(tbl);
  SELECT coalesce(sum(u.bytes), 0)::bigint INTO counted FROM meshhook_limits.storage_usage u
   WHERE u.table_schema = sch AND u.table_name = rel;
  RETURN counted;
END
$$;

CREATE FUNCTION meshhook_limits.untrack_storage(tbl regclass)
RETURNS boolean LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
#variable_conflict use_column
DECLARE sch name; rel name; m record;
BEGIN
  PERFORM meshhook_limits.require_admin_access('track storage');
  IF tbl IS NULL THEN
    RAISE EXCEPTION 'tbl must not be NULL' USING ERRCODE = '22023';
  END IF;
  SELECT n.nspname, c.relname INTO sch, rel
    FROM pg_catalog.pg_class c JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace WHERE c.oid = tbl;
  IF NOT EXISTS (SELECT 1 FROM meshhook_limits.tracked_tables t
                  WHERE t.relid = tbl OR (t.table_schema = sch AND t.table_name = rel)) THEN
    RETURN false;
  END IF;
  IF NOT meshhook_limits._caller_has_privs_of((SELECT c.relowner FROM pg_catalog.pg_class c WHERE c.oid = tbl)) THEN
    RAISE EXCEPTION 'must be the owner of table % to untrack it', tbl USING ERRCODE = '42501';
  END IF;
  EXECUTE format('LOCK TABLE %s IN SHARE ROW EXCLUSIVE MODE', tbl);
  FOR m IN SELECT p.relid FROM pg_catalog.pg_partition_tree(tbl) p UNION SELECT tbl LOOP
    PERFORM meshhook_limits._storage_triggers(m.relid, NULL, false);
  END LOOP;
  PERFORM meshhook_limits._storage_forget(sch, rel);
  RETURN true;
END
$$;

-- Subtract a table's bytes from its tenants (TRUNCATE, untrack, DROP). A
-- total never goes below zero.
CREATE FUNCTION meshhook_limits._storage_forget(p_schema name, p_table name, p_untrack boolean DEFAULT true)
RETURNS void LANGUAGE plpgsql VOLATILE SET search_path = pg_catalog, pg_temp AS $$
DECLARE d record;
BEGIN
  FOR d IN WITH gone AS (DELETE FROM meshhook_limits.storage_usage u
                          WHERE u.table_schema = p_schema AND u.table_name = p_table
                          RETURNING u.tenant_id, u.bytes)
           SELECT * FROM gone ORDER BY 1 LOOP
    UPDATE meshhook_limits.storage_totals s SET bytes = GREATEST(s.bytes - d.bytes, 0) WHERE s.tenant_id = d.tenant_id;
  END LOOP;
  IF p_untrack THEN
    DELETE FROM meshhook_limits.tracked_tables t WHERE t.table_schema = p_schema AND t.table_name = p_table;
  END IF;
END
$$;
REVOKE EXECUTE ON FUNCTION meshhook_limits._storage_forget(name, name, boolean) FROM PUBLIC;

-- A dropped tracked table stops counting.
CREATE FUNCTION meshhook_limits._storage_on_drop() RETURNS event_trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE o record; t record;
BEGIN
  FOR o IN SELECT * FROM pg_catalog.pg_event_trigger_dropped_objects() x WHERE x.object_type = 'table' LOOP
    -- By identity (a table renamed in a way no trigger saw), else by name.
    FOR t IN SELECT tt.table_schema, tt.table_name FROM meshhook_limits.tracked_tables tt
              WHERE tt.relid = o.objid OR (tt.table_schema = o.schema_name AND tt.table_name = o.object_name) LOOP
      PERFORM meshhook_limits._storage_forget(t.table_schema, t.table_name);
    END LOOP;
  END LOOP;
END
$$;
REVOKE EXECUTE ON FUNCTION meshhook_limits._storage_on_drop() FROM PUBLIC;

-- Tracked tables whose name or schema changed (ALTER TABLE/INDEX ... RENAME,
-- SET SCHEMA, ALTER SCHEMA ... RENAME) are followed: the table is known by
-- its oid and by carrying this extension's trigger.
CREATE FUNCTION meshhook_limits._storage_follow_renames() RETURNS void
LANGUAGE plpgsql VOLATILE SET search_path = pg_catalog, pg_temp AS $$
DECLARE t record;
BEGIN
  FOR t IN SELECT tt.table_schema AS old_schema, tt.table_name AS old_name, n.nspname, c.relname, tt.relid
             FROM meshhook_limits.tracked_tables tt
             JOIN pg_catalog.pg_class c ON c.oid = tt.relid
             JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
            WHERE (n.nspname, c.relname) IS DISTINCT FROM (tt.table_schema, tt.table_name)
              AND EXISTS (SELECT 1 FROM pg_catalog.pg_trigger g
                           WHERE g.tgrelid = tt.relid AND g.tgname = 'meshhook_limits_storage_ins') LOOP
    UPDATE meshhook_limits.storage_usage u SET table_schema = t.nspname, table_name = t.relname
     WHERE u.table_schema = t.old_schema AND u.table_name = t.old_name;
    UPDATE meshhook_limits.tracked_tables tt SET table_schema = t.nspname, table_name = t.relname
     WHERE tt.relid = t.relid;
  END LOOP;
END
$$;
REVOKE EXECUTE ON FUNCTION meshhook_limits._storage_follow_renames() FROM PUBLIC;
CREATE EVENT TRIGGER meshhook_limits_storage_drop ON sql_drop
  EXECUTE FUNCTION meshhook_limits._storage_on_drop();

-- Renames of a tracked table (or its schema move) and of its tenant column
-- are followed; dropping or retyping the tenant column is refused; a tracked
-- table may not become a partition (writes through its new parent would not
-- count). New partitions of a tracked table get its triggers, and any ALTER
-- TABLE of a tracked table (a column with a default, a rewrite, an attached
-- or detached partition) counts it again.
CREATE FUNCTION meshhook_limits._storage_on_alter() RETURNS event_trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE c record; t record; cur record; col name; typ regtype; root oid; m record;
BEGIN
  PERFORM meshhook_limits._storage_follow_renames();
  SELECT tt.table_schema, tt.table_name INTO t
    FROM meshhook_limits.tracked_tables tt JOIN pg_catalog.pg_class r ON r.oid = tt.relid
   WHERE r.relispartition LIMIT 1;
  IF FOUND THEN
    RAISE EXCEPTION 'tracked table %.% cannot become a partition', quote_ident(t.table_schema), quote_ident(t.table_name)
      USING ERRCODE = '55000',
            HINT = 'run meshhook_limits.untrack_storage on it, attach it, then track_storage its partitioned table';
  END IF;
  FOR c IN SELECT DISTINCT x.objid, x.command_tag FROM pg_catalog.pg_event_trigger_ddl_commands() x
            WHERE x.object_type IN ('table', 'table column') LOOP
    root := coalesce(pg_catalog.pg_partition_root(c.objid), c.objid);
    SELECT * INTO t FROM meshhook_limits.tracked_tables tt WHERE tt.relid = root;
    CONTINUE WHEN NOT FOUND;
    IF root <> c.objid THEN
      PERFORM meshhook_limits._storage_triggers(c.objid::regclass, t.tenant_column, true);
      CONTINUE;
    END IF;
    SELECT n.nspname, r.relname INTO cur
      FROM pg_catalog.pg_class r JOIN pg_catalog.pg_namespace n ON n.oid = r.relnamespace WHERE r.oid = c.objid;
    SELECT a.attname, a.atttypid::regtype INTO col, typ FROM pg_catalog.pg_attribute a
     WHERE a.attrelid = c.objid AND a.attnum = t.tenant_attnum AND NOT a.attisdropped;
    IF col IS NULL OR typ <> 'uuid'::regtype THEN
      RAISE EXCEPTION 'column % is the tenant column of tracked table %.%', quote_ident(t.tenant_column),
                      quote_ident(cur.nspname), quote_ident(cur.relname)
        USING ERRCODE = '55000', HINT = 'run meshhook_limits.untrack_storage on the table first';
    END IF;
    -- (The table's own renames were followed above, by _storage_follow_renames.)
    IF col IS DISTINCT FROM t.tenant_column THEN
      UPDATE meshhook_limits.tracked_tables tt SET tenant_column = col WHERE tt.relid = c.objid;
    END IF;
    IF c.command_tag = 'ALTER TABLE' THEN
      FOR m IN SELECT p.relid FROM pg_catalog.pg_partition_tree(root) p WHERE p.relid <> root LOOP
        PERFORM meshhook_limits._storage_triggers(m.relid, col, true);
      END LOOP;
      PERFORM meshhook_limits._storage_recount(root);
    END IF;
  END LOOP;
END
$$;
REVOKE EXECUTE ON FUNCTION meshhook_limits._storage_on_alter() FROM PUBLIC;
CREATE EVENT TRIGGER meshhook_limits_storage_alter ON ddl_command_end
  WHEN TAG IN ('ALTER TABLE', 'CREATE TABLE', 'ALTER INDEX', 'ALTER SCHEMA', 'ALTER VIEW', 'ALTER SEQUENCE',
               'ALTER MATERIALIZED VIEW', 'ALTER FOREIGN TABLE')
  EXECUTE FUNCTION meshhook_limits._storage_on_alter();
