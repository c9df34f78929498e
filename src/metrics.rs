//! `metrics()`: everything the extension knows, in the Prometheus text
//! exposition format (version 0.0.4).
//!
//! Hot-path counters (slots, rate limits) are read from shared memory; the
//! rest comes from one set-based query over tables the worker keeps small
//! (latest samples, alert states, usage of the current windows). A scrape
//! reads, it never scans the queues. Tenant labels are bounded by
//! `meshhook_limits.metrics_max_tenants` (the busiest tenants first) and can be
//! switched off with `meshhook_limits.metrics_tenant_labels = off`.
use crate::error::{OrRaise, Result};
use crate::identity;
use crate::slots::table::{self, LockedTable, RevokeReason};
use pgrx::prelude::*;
use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::atomic::Ordering;

struct Family {
    kind: &'static str,
    help: &'static str,
    samples: Vec<(Vec<(String, String)>, f64)>,
}

#[derive(Default)]
struct Exposition {
    families: BTreeMap<String, Family>,
}

impl Exposition {
    fn add(
        &mut self,
        name: &str,
        kind: &'static str,
        help: &'static str,
        labels: Vec<(String, String)>,
        value: f64,
    ) {
        self.families
            .entry(name.to_string())
            .or_insert_with(|| Family {
                kind,
                help,
                samples: Vec::new(),
            })
            .samples
            .push((labels, value));
    }

    fn declare(&mut self, name: &str, kind: &'static str, help: &'static str) {
        self.families
            .entry(name.to_string())
            .or_insert_with(|| Family {
                kind,
                help,
                samples: Vec::new(),
            });
    }

    fn render(&self) -> String {
        let mut out = String::with_capacity(64 * 1024);
        for (name, f) in &self.families {
            let _ = writeln!(out, "# HELP {name} {}", f.help);
            let _ = writeln!(out, "# TYPE {name} {}", f.kind);
            for (labels, value) in &f.samples {
                out.push_str(name);
                if !labels.is_empty() {
                    out.push('{');
                    for (i, (k, v)) in labels.iter().enumerate() {
                        if i > 0 {
                            out.push(',');
                        }
                        let _ = write!(out, "{k}=\"{}\"", escape(v));
                    }
                    out.push('}');
                }
                let _ = writeln!(out, " {}", number(*value));
            }
        }
        out
    }
}

fn escape(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

fn number(v: f64) -> String {
    if v.is_nan() {
        "NaN".into()
    } else if v.is_infinite() {
        if v > 0.0 {
            "+Inf".into()
        } else {
            "-Inf".into()
        }
    } else if v.fract() == 0.0 && v.abs() < 1e15 {
        format!("{}", v as i64)
    } else {
        format!("{v}")
    }
}

fn labels(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// Metric metadata for the rows `_metrics_rows()` returns.
fn meta(name: &str) -> (&'static str, &'static str) {
    match name {
        "meshhook_limits_tenant_limit" => (
            "gauge",
            "Effective limit of a tenant, by resource (base units).",
        ),
        "meshhook_limits_tenant_usage_ratio" => (
            "gauge",
            "Usage of the current window (or live slots) over the effective limit.",
        ),
        "meshhook_limits_tenant_storage_bytes" => {
            ("gauge", "Bytes a tenant stores in tracked tables.")
        }
        "meshhook_limits_queue_queued" => (
            "gauge",
            "Jobs waiting (pg-boss created/retry, pgmq visible).",
        ),
        "meshhook_limits_queue_active" => (
            "gauge",
            "Jobs being processed (pg-boss active, pgmq invisible).",
        ),
        "meshhook_limits_queue_failed_recent" => {
            ("gauge", "Jobs failed within meshhook_limits.queue_window.")
        }
        "meshhook_limits_queue_oldest_age_seconds" => ("gauge", "Age of the oldest waiting job."),
        "meshhook_limits_queue_processing_p50_seconds" => (
            "gauge",
            "Median processing time of jobs finished within the queue window.",
        ),
        "meshhook_limits_queue_processing_p95_seconds" => (
            "gauge",
            "95th percentile processing time of jobs finished within the queue window.",
        ),
        "meshhook_limits_queue_throughput_per_second" => {
            ("gauge", "Jobs finished per second over the last minute.")
        }
        "meshhook_limits_queue_error_ratio" => {
            ("gauge", "Failed / finished jobs within the queue window.")
        }
        "meshhook_limits_queue_status" => (
            "gauge",
            "1 for the current status (ok, warning, critical) of a queue.",
        ),
        "meshhook_limits_queue_sampled_timestamp_seconds" => {
            ("gauge", "When the queues were last sampled (Unix time).")
        }
        "meshhook_limits_pool_max_connections" => (
            "gauge",
            "max_connections minus superuser_reserved_connections.",
        ),
        "meshhook_limits_pool_connections" => ("gauge", "Client connections by state."),
        "meshhook_limits_pool_utilisation_ratio" => {
            ("gauge", "Client connections over usable connections.")
        }
        "meshhook_limits_pool_longest_transaction_seconds" => {
            ("gauge", "Age of the oldest open transaction.")
        }
        "meshhook_limits_pool_status" => (
            "gauge",
            "1 for the current pool status (ok, warning, critical).",
        ),
        "meshhook_limits_pool_connections_by_application" => {
            ("gauge", "Client connections by application_name.")
        }
        "meshhook_limits_pool_connections_by_role" => ("gauge", "Client connections by role."),
        "meshhook_limits_pooler_up" => (
            "gauge",
            "1 when the PgBouncer answered its last sample, 0 when it did not.",
        ),
        "meshhook_limits_pooler_clients_active" => {
            ("gauge", "Clients linked to a server connection, per pool.")
        }
        "meshhook_limits_pooler_clients_waiting" => {
            ("gauge", "Clients waiting for a server connection, per pool.")
        }
        "meshhook_limits_pooler_maxwait_seconds" => {
            ("gauge", "How long the oldest waiting client of a pool has waited.")
        }
        "meshhook_limits_pooler_server_connections" => (
            "gauge",
            "Server connections of a pool by state (active, idle, used, tested, login).",
        ),
        "meshhook_limits_pooler_pool_size" => ("gauge", "The pool size of a pool's database."),
        "meshhook_limits_pooler_utilisation_ratio" => {
            ("gauge", "Server connections of a pool over its pool size.")
        }
        "meshhook_limits_pooler_default_pool_size" => {
            ("gauge", "The pooler's default_pool_size.")
        }
        "meshhook_limits_pooler_transactions_total" => {
            ("counter", "Transactions pooled since the pooler started.")
        }
        "meshhook_limits_pooler_queries_total" => {
            ("counter", "Queries pooled since the pooler started.")
        }
        "meshhook_limits_pooler_client_wait_seconds_total" => (
            "counter",
            "Time clients spent waiting for a server connection since the pooler started.",
        ),
        "meshhook_limits_pooler_avg_wait_seconds" => (
            "gauge",
            "Average client wait over the pooler's last stats_period.",
        ),
        "meshhook_limits_pooler_sampled_timestamp_seconds" => {
            ("gauge", "When the pooler was last sampled (Unix time).")
        }
        "meshhook_limits_alerts" => (
            "gauge",
            "Alert series by rule, severity and state (pending, firing).",
        ),
        "meshhook_limits_worker_ticks_total" => {
            ("counter", "Ticks run since the extension was created.")
        }
        "meshhook_limits_worker_errors_total" => ("counter", "Ticks that failed."),
        "meshhook_limits_worker_last_tick_duration_seconds" => {
            ("gauge", "Duration of the last tick.")
        }
        "meshhook_limits_worker_last_tick_timestamp_seconds" => {
            ("gauge", "When the last tick ran (Unix time).")
        }
        "meshhook_limits_worker_queue_scan_duration_seconds" => (
            "gauge",
            "Duration of the last full pass over the queue tables (see queue_scan_budget).",
        ),
        "meshhook_limits_worker_queue_scan_timestamp_seconds" => (
            "gauge",
            "When the last full pass over the queue tables ran (Unix time): the age of active, failed_recent, p50/p95, throughput and error rate.",
        ),
        _ => ("gauge", "meshhook_limits metric."),
    }
}

fn shared(e: &mut Exposition, tenant_labels: bool, max_tenants: usize) -> Vec<String> {
    e.declare(
        "meshhook_limits_slot_grants_total",
        "counter",
        "Execution slots granted since the server started.",
    );
    e.declare(
        "meshhook_limits_slot_refusals_total",
        "counter",
        "Execution slots refused, by reason.",
    );
    e.declare(
        "meshhook_limits_slot_revocations_total",
        "counter",
        "Execution slots revoked, by reason.",
    );
    e.declare(
        "meshhook_limits_slots_live",
        "gauge",
        "Live execution slots.",
    );
    e.declare(
        "meshhook_limits_claims_total",
        "counter",
        "Jobs claimed by claim_jobs since the server started.",
    );
    e.declare(
        "meshhook_limits_claimed_cost_total",
        "counter",
        "Cost of the jobs claimed by claim_jobs since the server started.",
    );
    e.declare(
        "meshhook_limits_claim_blocked_total",
        "counter",
        "Jobs claim_jobs passed over, by reason (they stay queued, untouched).",
    );
    e.declare(
        "meshhook_limits_slots_capacity",
        "gauge",
        "Size of the shared slot table.",
    );
    e.declare(
        "meshhook_limits_rate_limit_decisions_total",
        "counter",
        "check_rate_limit decisions, by result.",
    );
    e.declare(
        "meshhook_limits_rate_limit_evictions_total",
        "counter",
        "Busy rate-limit keys evicted from the shared table.",
    );
    let mut busiest = Vec::new();
    if let Some(mut lk) = LockedTable::shared() {
        let t = lk.table();
        let h = &t.header;
        e.add(
            "meshhook_limits_slot_grants_total",
            "counter",
            "",
            vec![],
            h.grants.load(Ordering::Relaxed) as f64,
        );
        for (i, r) in table::REFUSAL_REASONS.iter().enumerate() {
            e.add(
                "meshhook_limits_slot_refusals_total",
                "counter",
                "",
                labels(&[("reason", r)]),
                h.refusals_by[i].load(Ordering::Relaxed) as f64,
            );
        }
        for code in 1..4u8 {
            let r = RevokeReason::from_u8(code).as_str();
            e.add(
                "meshhook_limits_slot_revocations_total",
                "counter",
                "",
                labels(&[("reason", r)]),
                h.revocations_by[code as usize].load(Ordering::Relaxed) as f64,
            );
        }
        e.add(
            "meshhook_limits_slots_live",
            "gauge",
            "",
            vec![],
            f64::from(h.live),
        );
        if let Some((claims, cost, blocked)) = crate::slots::claimed::counters() {
            e.add(
                "meshhook_limits_claims_total",
                "counter",
                "",
                vec![],
                claims as f64,
            );
            e.add(
                "meshhook_limits_claimed_cost_total",
                "counter",
                "",
                vec![],
                cost as f64,
            );
            for (reason, n) in blocked {
                e.add(
                    "meshhook_limits_claim_blocked_total",
                    "counter",
                    "",
                    labels(&[("reason", reason)]),
                    n as f64,
                );
            }
        }
        e.add(
            "meshhook_limits_slots_capacity",
            "gauge",
            "",
            vec![],
            table::MAX_SLOTS as f64,
        );
        let mut counts = t.tenant_counts(crate::shmem::my_database());
        drop(lk);
        counts.sort_by_key(|c| std::cmp::Reverse(c.1));
        if tenant_labels {
            e.declare(
                "meshhook_limits_tenant_slots_live",
                "gauge",
                "Live execution slots of a tenant.",
            );
            for (tenant, n) in counts.iter().take(max_tenants) {
                let id = pgrx::datum::Uuid::from_bytes(*tenant).to_string();
                e.add(
                    "meshhook_limits_tenant_slots_live",
                    "gauge",
                    "",
                    labels(&[("tenant_id", &id)]),
                    f64::from(*n),
                );
                busiest.push(id);
            }
        }
    }
    if let Some(rt) = crate::rate::table::table() {
        for (result, count) in [("allowed", &rt.allowed), ("denied", &rt.denied)] {
            e.add(
                "meshhook_limits_rate_limit_decisions_total",
                "counter",
                "",
                labels(&[("result", result)]),
                count.load(Ordering::Relaxed) as f64,
            );
        }
        e.add(
            "meshhook_limits_rate_limit_evictions_total",
            "counter",
            "",
            vec![],
            rt.evictions.load(Ordering::Relaxed) as f64,
        );
    }
    busiest
}

fn render() -> Result<String> {
    identity::require_monitor("read metrics")?;
    let (tenant_labels, max_tenants) = crate::gucs::metrics_tenant_labels();
    let mut e = Exposition::default();
    let busiest = shared(&mut e, tenant_labels, max_tenants);
    Spi::connect(|c| -> Result<()> {
        let rows = c.select(
            "SELECT name, labels, value FROM meshhook_limits._metrics_rows($1, $2, $3)",
            None,
            &[
                tenant_labels.into(),
                (max_tenants as i32).into(),
                busiest.into(),
            ],
        )?;
        for r in rows {
            let (Some(name), Some(value)) = (r.get::<String>(1)?, r.get::<f64>(3)?) else {
                continue;
            };
            let labels: Vec<(String, String)> = match r.get::<pgrx::JsonB>(2)? {
                Some(pgrx::JsonB(serde_json::Value::Object(m))) => m
                    .into_iter()
                    .map(|(k, v)| (k, v.as_str().map_or_else(|| v.to_string(), str::to_string)))
                    .collect(),
                _ => Vec::new(),
            };
            let (kind, help) = meta(&name);
            e.add(&name, kind, help, labels, value);
        }
        Ok(())
    })?;
    Ok(e.render())
}

/// All metrics in the Prometheus text format. For admins and the read-only
/// monitoring roles (meshhook_limits_monitor, pg_monitor).
#[pg_extern(volatile, parallel_safe, security_definer)]
#[search_path(pg_catalog, pg_temp)]
fn metrics() -> String {
    render().or_raise()
}

#[cfg(test)]
mod unit {
    use super::*;

    #[test]
    fn label_values_are_escaped() {
        assert_eq!(escape("a\"b\\c\nd"), "a\\\"b\\\\c\\nd");
        assert_eq!(number(3.0), "3");
        assert_eq!(number(0.25), "0.25");
        assert_eq!(number(f64::NAN), "NaN");
    }
}
