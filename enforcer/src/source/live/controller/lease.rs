//! Leader election over a `coordination.k8s.io` Lease (kube-rs has no elector): the
//! holder renews it every third of its duration; a candidate takes it once its
//! `renewTime` plus its duration has passed, or when it has no holder (a leader that
//! stopped released it). Every write is conditional on the `resourceVersion` read, so
//! of two candidates one gets `409 Conflict` and stays a candidate. Expiry is judged on
//! the holder's `renewTime` (so a handover takes at most the duration after the last
//! renewal), which assumes the replicas' clocks agree within a small part of it.

use std::future::Future;
use std::time::{Duration, SystemTime};

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use k8s_openapi::jiff::Timestamp;
use kube::Api;
use kube::api::PostParams;

/// The Lease and who competes for it.
#[derive(Clone, Debug)]
pub struct LeaseConfig {
    pub namespace: String,
    pub name: String,
    /// This replica (its pod's name).
    pub identity: String,
    /// How long a holder that stopped renewing keeps the lease.
    pub duration: Duration,
}

/// What one attempt found.
#[derive(Debug, PartialEq, Eq)]
enum Attempt {
    /// This replica holds the lease (taken or renewed).
    Leading,
    /// Another holds it until then, unless it renews.
    Following { until: SystemTime },
}

/// Competes for the lease through `api`.
pub struct Elector {
    api: Api<Lease>,
    config: LeaseConfig,
}

fn micro(at: SystemTime) -> MicroTime {
    MicroTime(Timestamp::try_from(at).unwrap_or(Timestamp::UNIX_EPOCH))
}

fn is_conflict(error: &kube::Error) -> bool {
    matches!(error, kube::Error::Api(status) if status.code == 409)
}

impl Elector {
    pub fn new(api: Api<Lease>, config: LeaseConfig) -> Self {
        Self { api, config }
    }

    fn seconds(&self) -> i32 {
        i32::try_from(self.config.duration.as_secs().max(1)).unwrap_or(i32::MAX)
    }

    /// Takes or renews the lease if it may; a lost race is [`Attempt::Following`].
    async fn attempt(&self) -> Result<Attempt, kube::Error> {
        let now = SystemTime::now();
        let me = &self.config.identity;
        let Some(mut lease) = self.api.get_opt(&self.config.name).await? else {
            let lease = Lease {
                metadata: ObjectMeta {
                    name: Some(self.config.name.clone()),
                    namespace: Some(self.config.namespace.clone()),
                    ..ObjectMeta::default()
                },
                spec: Some(LeaseSpec {
                    holder_identity: Some(me.clone()),
                    lease_duration_seconds: Some(self.seconds()),
                    acquire_time: Some(micro(now)),
                    renew_time: Some(micro(now)),
                    lease_transitions: Some(0),
                    ..LeaseSpec::default()
                }),
            };
            return match self.api.create(&PostParams::default(), &lease).await {
                Ok(_) => Ok(Attempt::Leading),
                Err(e) if is_conflict(&e) => Ok(Attempt::Following { until: now }),
                Err(e) => Err(e),
            };
        };
        let spec = lease.spec.get_or_insert_with(LeaseSpec::default);
        let holder = spec.holder_identity.clone().filter(|h| !h.is_empty());
        let until = spec
            .renew_time
            .as_ref()
            .map_or(SystemTime::UNIX_EPOCH, |t| {
                let seconds = spec.lease_duration_seconds.unwrap_or(0).max(0);
                SystemTime::from(t.0) + Duration::from_secs(seconds.unsigned_abs().into())
            });
        let mine = holder.as_ref() == Some(me);
        if !mine && holder.is_some() && until > now {
            return Ok(Attempt::Following { until });
        }
        if !mine {
            spec.acquire_time = Some(micro(now));
            spec.lease_transitions = Some(spec.lease_transitions.unwrap_or(0).saturating_add(1));
        }
        spec.holder_identity = Some(me.clone());
        spec.lease_duration_seconds = Some(self.seconds());
        spec.renew_time = Some(micro(now));
        // The read's resourceVersion stays in the metadata: a write in between is a 409.
        match self
            .api
            .replace(&self.config.name, &PostParams::default(), &lease)
            .await
        {
            Ok(_) => Ok(Attempt::Leading),
            Err(e) if is_conflict(&e) => Ok(Attempt::Following { until: now }),
            Err(e) => Err(e),
        }
    }

    /// Gives the lease up (a stopping leader), so that another takes it at once.
    pub async fn release(&self) -> Result<(), kube::Error> {
        let Some(mut lease) = self.api.get_opt(&self.config.name).await? else {
            return Ok(());
        };
        let spec = lease.spec.get_or_insert_with(LeaseSpec::default);
        if spec.holder_identity.as_ref() != Some(&self.config.identity) {
            return Ok(());
        }
        spec.holder_identity = None;
        self.api
            .replace(&self.config.name, &PostParams::default(), &lease)
            .await
            .map(drop)
    }

    /// Runs `work` while this replica leads, a new one each time it becomes leader,
    /// until the runtime ends: a lost lease (another took it, or it could not be
    /// renewed within its duration) drops the running work.
    pub async fn lead<F, W>(&self, mut work: F)
    where
        F: FnMut() -> W,
        W: Future<Output = ()>,
    {
        let retry = (self.config.duration / 4).max(Duration::from_millis(100));
        let renew = (self.config.duration / 3).max(Duration::from_millis(100));
        loop {
            match self.attempt().await {
                Ok(Attempt::Leading) => {}
                Ok(Attempt::Following { until }) => {
                    // Wakes when the holder's lease would end, or to read it again.
                    let left = until.duration_since(SystemTime::now()).unwrap_or_default();
                    tokio::time::sleep(left.min(retry)).await;
                    continue;
                }
                Err(error) => {
                    log::warn!("lease {}: {}", self.config.name, crate::error_chain(&error));
                    tokio::time::sleep(retry).await;
                    continue;
                }
            }
            log::info!(
                "leading (lease {}/{} held by {})",
                self.config.namespace,
                self.config.name,
                self.config.identity
            );
            let mut renewed = tokio::time::Instant::now();
            let running = work();
            tokio::pin!(running);
            loop {
                tokio::select! {
                    () = &mut running => return,
                    () = tokio::time::sleep(renew) => match self.attempt().await {
                        Ok(Attempt::Leading) => renewed = tokio::time::Instant::now(),
                        Ok(Attempt::Following { .. }) => {
                            log::warn!("lease {}: another replica took it; following", self.config.name);
                            break;
                        }
                        Err(error) => {
                            log::warn!("lease {}: not renewed: {}", self.config.name, crate::error_chain(&error));
                            // Stops before another may take it over.
                            if renewed.elapsed() + renew >= self.config.duration {
                                log::warn!("lease {}: stepping down", self.config.name);
                                break;
                            }
                        }
                    },
                }
            }
        }
    }
}
