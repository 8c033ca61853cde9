//! When EC2 is polled, for the node's poller and the controller's alike: every
//! interval (jittered), backing off while EC2 fails, and early when what is
//! wanted grows past what the last poll read.

use std::time::Duration;

use super::error::Ec2Error;

/// Waits after a throttled poll (`RequestLimitExceeded`): doubling, up to 5 minutes.
const THROTTLED: (Duration, Duration) = (Duration::from_secs(2), Duration::from_secs(300));
/// Waits after another failure: doubling from 1 s, up to the poll interval.
const FAILED_FIRST: Duration = Duration::from_secs(1);

/// What a poll reads (groups, ENIs, instances).
pub trait Wanted {
    /// Whether a poll that read `self` read everything `other` asks for.
    fn covers(&self, other: &Self) -> bool;
}

/// One poller: what it wants read, how it reads it, and where the answer goes.
pub trait Poller {
    type Wanted: Wanted;
    type Read;
    /// What to read now; `None` while that is not known yet.
    fn wanted(&self) -> Option<Self::Wanted>;
    async fn poll(&self, wanted: &Self::Wanted) -> Result<Self::Read, Ec2Error>;
    async fn publish(&self, read: Self::Read);
    /// Tells of a failed poll; the next try is `wait` away.
    fn failed(&self, error: &Ec2Error, wait: Duration);
    /// Waits until what is wanted may have changed; false once it never will.
    async fn changed(&mut self) -> bool;
}

/// Polls with `poller` until its changes end.
pub async fn run<P: Poller>(mut poller: P, interval: Duration) {
    let mut asked = None;
    let mut failures = 0u32;
    loop {
        let Some(wanted) = poller.wanted() else {
            if !poller.changed().await {
                return;
            }
            continue;
        };
        let wait = match poller.poll(&wanted).await {
            Ok(read) => {
                failures = 0;
                asked = Some(wanted);
                poller.publish(read).await;
                jittered(interval)
            }
            Err(error) => {
                failures = failures.saturating_add(1);
                let wait = retry_wait(&error, failures, interval);
                poller.failed(&error, wait);
                wait
            }
        };
        let sleep = tokio::time::sleep(wait);
        tokio::pin!(sleep);
        loop {
            tokio::select! {
                () = &mut sleep => break,
                changed = poller.changed() => {
                    if !changed {
                        return;
                    }
                    // Early only after a success: a failing EC2 keeps its backoff.
                    let grown = |now: &P::Wanted| asked.as_ref().is_some_and(|a| !a.covers(now));
                    if failures == 0 && poller.wanted().is_some_and(|now| grown(&now)) {
                        break;
                    }
                }
            }
        }
    }
}

/// The wait before the next poll after `failures` failures in a row.
pub(super) fn retry_wait(error: &Ec2Error, failures: u32, interval: Duration) -> Duration {
    let doubled = |first: Duration, max: Duration| {
        first
            .saturating_mul(1 << failures.saturating_sub(1).min(16))
            .min(max)
    };
    if error.is_throttling() {
        doubled(THROTTLED.0, THROTTLED.1)
    } else {
        doubled(FAILED_FIRST, interval.max(FAILED_FIRST))
    }
}

/// The interval, ±20 %: nodes started together do not poll together.
fn jittered(interval: Duration) -> Duration {
    interval.mul_f64(rand::random_range(0.8..1.2))
}
