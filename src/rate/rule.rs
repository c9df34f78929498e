//! Which buckets a check of (tenant, key) spends from: the tenant's and the
//! key's `requests_per_second`, read through `_rate_rules` and cached per
//! backend until the limits change.
use super::gcra::Bucket;
use crate::error::Result;
use crate::limits::GenerationCache;
use pgrx::datum::Uuid;
use pgrx::prelude::*;
use std::cell::RefCell;

/// Rules `RULES` caches at most (emptied when full): one per tenant and
/// key this backend checked.
const MAX_RULES: usize = 10_000;

/// The buckets a check of one key spends from (see the `rate` module docs).
#[derive(Clone, Copy, Debug, PartialEq, Default)]
pub struct Rule {
    /// `requests_per_second.<key>`, when any scope sets it.
    pub key: Option<Bucket>,
    /// The tenant's `requests_per_second`, across all its keys.
    pub tenant: Option<Bucket>,
}

impl Rule {
    /// (entry key, bucket) pairs, the tenant's (empty key) first.
    pub fn buckets<'a>(&self, key: &'a [u8]) -> Vec<(&'a [u8], Bucket)> {
        let mut v = Vec::with_capacity(2);
        if let Some(b) = self.tenant {
            v.push((&key[..0], b));
        }
        if let Some(b) = self.key {
            v.push((key, b));
        }
        v
    }
}

type Key = ([u8; 16], String);
thread_local! {
    static RULES: RefCell<GenerationCache<Key, Rule>> = RefCell::new(GenerationCache::new());
}

fn load_rule(tenant: Uuid, key: &str) -> Result<Rule> {
    // A fresh snapshot, as limits::load does (see GenerationCache::get_or_load).
    // `_rate_rules` is new in 0.2.0: passthrough makes its absence (0.1.0's
    // SQL under this library) an error that says what to do.
    crate::error::passthrough(|| {
        Spi::connect_mut(|c| {
            let rows = c.update(
            "SELECT key_rate, key_burst, tenant_rate, tenant_burst FROM meshhook_limits._rate_rules($1, $2)",
            Some(1),
            &[tenant.into(), key.into()],
        )?;
            let mut rule = Rule::default();
            if let Some(r) = rows.into_iter().next() {
                let bucket = |rate: Option<f64>, burst: Option<f64>| {
                    rate.map(|rate| Bucket {
                        rate,
                        burst: burst.unwrap_or(0.0),
                    })
                };
                rule.key = bucket(r.get::<f64>(1)?, r.get::<f64>(2)?);
                rule.tenant = bucket(r.get::<f64>(3)?, r.get::<f64>(4)?);
            }
            Ok(rule)
        })
    })
}

/// The rule, from the cache or loaded into it (SPI).
pub fn get(tenant: Uuid, key: &str) -> Result<Rule> {
    GenerationCache::get_or_load(
        &RULES,
        MAX_RULES,
        (*tenant.as_bytes(), key.to_string()),
        || load_rule(tenant, key),
    )
}

/// The cached rule, without loading it (no SPI): None when not cached.
pub fn cached(tenant: Uuid, key: &str) -> Option<Rule> {
    GenerationCache::get(&RULES, &(*tenant.as_bytes(), key.to_string()))
}
