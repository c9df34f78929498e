-- Everything CREATE EXTENSION meshhook_limits installs, as sorted text lines:
-- an upgraded install must give exactly the lines of a fresh one.
WITH ext AS (SELECT oid FROM pg_catalog.pg_extension WHERE extname = 'meshhook_limits'),
members AS (
  SELECT d.classid, d.objid FROM pg_catalog.pg_depend d, ext
   WHERE d.refclassid = 'pg_catalog.pg_extension'::regclass AND d.refobjid = ext.oid AND d.deptype = 'e'),
rels AS (
  SELECT c.oid, c.relname, c.relkind FROM pg_catalog.pg_class c
   WHERE c.relnamespace = 'meshhook_limits'::regnamespace)
SELECT line FROM (
  SELECT 'member ' || pg_catalog.pg_describe_object(m.classid, m.objid, 0) AS line FROM members m
  UNION ALL
  SELECT 'function ' || p.oid::regprocedure::text || ' owner=' || pg_catalog.pg_get_userbyid(p.proowner)
         || ' acl=' || coalesce(p.proacl::text, 'default') || ' comment=' || coalesce(pg_catalog.obj_description(p.oid, 'pg_proc'), '')
         || E'\n' || CASE WHEN p.prokind IN ('f', 'p') THEN pg_catalog.pg_get_functiondef(p.oid) ELSE p.prokind::text END
    FROM pg_catalog.pg_proc p WHERE p.pronamespace = 'meshhook_limits'::regnamespace
  UNION ALL
  SELECT 'relation ' || r.relname || ' kind=' || r.relkind::text || ' persistence=' || c.relpersistence::text
         || ' rls=' || c.relrowsecurity || ' force=' || c.relforcerowsecurity
         || ' options=' || coalesce(c.reloptions::text, '') || ' acl=' || coalesce(c.relacl::text, 'default')
         || ' owner=' || pg_catalog.pg_get_userbyid(c.relowner)
         || ' comment=' || coalesce(pg_catalog.obj_description(c.oid, 'pg_class'), '')
    FROM rels r JOIN pg_catalog.pg_class c ON c.oid = r.oid
  UNION ALL
  SELECT 'column ' || r.relname || '.' || a.attname || ' ' || pg_catalog.format_type(a.atttypid, a.atttypmod)
         || ' notnull=' || a.attnotnull || ' identity=' || a.attidentity::text || ' generated=' || a.attgenerated::text
         || ' default=' || coalesce(pg_catalog.pg_get_expr(ad.adbin, ad.adrelid), '')
         || ' acl=' || coalesce(a.attacl::text, '') || ' position=' || a.attnum
    FROM rels r JOIN pg_catalog.pg_attribute a ON a.attrelid = r.oid AND a.attnum > 0 AND NOT a.attisdropped
    LEFT JOIN pg_catalog.pg_attrdef ad ON ad.adrelid = a.attrelid AND ad.adnum = a.attnum
   WHERE r.relkind IN ('r', 'v', 'p', 'u', 'm', 'f')
  UNION ALL
  SELECT 'index ' || pg_catalog.pg_get_indexdef(i.indexrelid)
    FROM rels r JOIN pg_catalog.pg_index i ON i.indrelid = r.oid
  UNION ALL
  SELECT 'constraint ' || r.relname || '.' || co.conname || ' ' || pg_catalog.pg_get_constraintdef(co.oid)
    FROM rels r JOIN pg_catalog.pg_constraint co ON co.conrelid = r.oid
  UNION ALL
  SELECT 'policy ' || r.relname || '.' || po.polname || ' ' || po.polcmd::text || ' permissive=' || po.polpermissive
         || ' roles=' || po.polroles::text || ' using=' || coalesce(pg_catalog.pg_get_expr(po.polqual, po.polrelid), '')
         || ' check=' || coalesce(pg_catalog.pg_get_expr(po.polwithcheck, po.polrelid), '')
    FROM rels r JOIN pg_catalog.pg_policy po ON po.polrelid = r.oid
  UNION ALL
  SELECT 'trigger ' || pg_catalog.pg_get_triggerdef(t.oid)
    FROM rels r JOIN pg_catalog.pg_trigger t ON t.tgrelid = r.oid WHERE NOT t.tgisinternal
  UNION ALL
  SELECT 'view ' || r.relname || ' ' || pg_catalog.pg_get_viewdef(r.oid)
    FROM rels r WHERE r.relkind IN ('v', 'm')
  UNION ALL
  SELECT 'event trigger ' || e.evtname || ' ' || e.evtevent || ' ' || coalesce(e.evttags::text, '') || ' '
         || e.evtfoid::regprocedure::text || ' enabled=' || e.evtenabled::text
    FROM pg_catalog.pg_event_trigger e JOIN members m ON m.classid = 'pg_catalog.pg_event_trigger'::regclass AND m.objid = e.oid
  UNION ALL
  SELECT 'config dump ' || x.cfg::regclass::text || ' where=' || coalesce(x.cond, '')
    FROM pg_catalog.pg_extension e, ext,
         LATERAL unnest(e.extconfig, e.extcondition) AS x(cfg, cond) WHERE e.oid = ext.oid
  UNION ALL
  SELECT 'schema acl ' || coalesce(n.nspacl::text, '') FROM pg_catalog.pg_namespace n WHERE n.nspname = 'meshhook_limits'
  UNION ALL
  SELECT 'type ' || t.typname || ' ' || t.typtype::text FROM pg_catalog.pg_type t
   WHERE t.typnamespace = 'meshhook_limits'::regnamespace AND t.typrelid = 0 AND t.typelem = 0
) x
ORDER BY line;
