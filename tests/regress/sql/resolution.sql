-- Which limit applies: project, then tenant, then the tenant's plan, then
-- global; effective_limits says which and from where, and every change
-- shows at once (the cache of the slot path follows too).
\set SHOW_CONTEXT never
\set t '''00000000-0000-0000-0000-0000000000e1'''
\set p '''00000000-0000-0000-0000-0000000000f1'''
\set q '''00000000-0000-0000-0000-0000000000f2'''
\set s meshhook_limits
SELECT :s.set_limit('concurrent_executions', 50);
SELECT :s.create_plan('pro', 'the paid plan'), :s.create_plan('free');
SELECT :s.set_plan_limit('pro', 'concurrent_executions', 20), :s.set_plan_limit('free', 'concurrent_executions', 2);
SELECT :s.set_plan_limit('pro', 'executions_per_day', 1000, 0.9, '1 day');
-- Nothing of the tenant's own yet: the global default.
SELECT resource, limit_value, source FROM :s.effective_limits(:t) WHERE resource = 'concurrent_executions';
SELECT :s.assign_plan(:t, 'pro');
SELECT resource, limit_value, warn_ratio, window_length, source FROM :s.effective_limits(:t) ORDER BY 1;
SELECT :s.set_limit('concurrent_executions', 7, :t);
SELECT :s.set_limit('concurrent_executions', 3, :t, :p);
-- Project over tenant over plan over global, per project.
SELECT coalesce(pr::text, '(none)') AS project, limit_value, source
  FROM unnest(ARRAY[NULL, :p, :q]::uuid[]) pr, LATERAL :s.effective_limits(:t, pr) e
 WHERE e.resource = 'concurrent_executions';
-- The slot path sees the same: 3 in project p, then the tenant's 7 overall.
-- (The arguments name i, so that each row calls acquire again.)
SELECT i, a.granted, a.reason, a.in_use, a.limit_value
  FROM generate_series(1, 4) i, LATERAL :s.acquire_execution_slot(:t, CASE WHEN i > 0 THEN :p::uuid END) a;
SELECT i, a.granted, a.reason, a.in_use, a.limit_value
  FROM generate_series(1, 5) i, LATERAL :s.acquire_execution_slot(:t, CASE WHEN i < 0 THEN :p::uuid END) a;
-- Changes show at once: clear the tenant's row and the plan applies again.
SELECT :s.clear_limit('concurrent_executions', :t);
SELECT limit_value, source FROM :s.effective_limits(:t) WHERE resource = 'concurrent_executions';
SELECT :s.assign_plan(:t, 'free');
SELECT limit_value, source FROM :s.effective_limits(:t) WHERE resource = 'concurrent_executions';
SELECT a.granted, a.reason, a.in_use, a.limit_value FROM :s.acquire_execution_slot(:t) a;
-- A plan in use cannot be dropped; an unused one can.
SELECT :s.drop_plan('free');
\echo :LAST_ERROR_SQLSTATE
SELECT :s.drop_plan('pro');
SELECT :s.assign_plan(:t, NULL);
SELECT limit_value, source FROM :s.effective_limits(:t) WHERE resource = 'concurrent_executions';
-- Cleanup: the slots of this file.
SELECT count(:s.release_execution_slot(slot_id)) AS released FROM :s.slots() WHERE tenant_id = :t;
SELECT :s.clear_limit('concurrent_executions', :t, :p), :s.clear_limit('concurrent_executions'), :s.drop_plan('free');
