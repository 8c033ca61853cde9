//! The agent's side of controller mode (`--ec2 controller`): a reflector on the
//! SecurityGroupViews, whose assembled groups (`view::Assembly`) the hub takes as the
//! EC2 source's documents, dated by their EC2 read time: the `ec2` source's staleness
//! (status, metrics) is the age of the least recently confirmed group. A view older
//! than `max_age` (the controller is down or cannot read EC2) keeps being enforced,
//! flagged as the source's error and by a Kubernetes event on this node.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use ::kube::runtime::events::{Event, EventType, Recorder, Reporter};
use ::kube::runtime::reflector::{self, Store};
use ::kube::runtime::{WatchStreamExt as _, watcher};
use ::kube::{Api, Client, ResourceExt as _};
use futures::StreamExt as _;
use k8s_openapi::api::core::v1::ObjectReference;

use super::super::hub::{Hub, names};
use super::super::view::{Assembly, SecurityGroupView};

/// How often the views' age is judged between their changes.
const AGE_CHECK: Duration = Duration::from_secs(5);

/// Follows the views into `hub` until the runtime ends.
pub fn spawn(client: Client, node_name: &str, hub: Arc<Hub>, max_age: Duration) {
    let recorder = Recorder::new(
        client.clone(),
        Reporter {
            controller: "enforcer".into(),
            instance: Some(node_name.to_string()),
        },
    );
    let node = ObjectReference {
        api_version: Some("v1".into()),
        kind: Some("Node".into()),
        name: Some(node_name.to_string()),
        ..ObjectReference::default()
    };
    tokio::spawn(async move {
        let (store, writer) = reflector::store();
        let events = watcher(
            Api::<SecurityGroupView>::all(client),
            watcher::Config::default(),
        )
        .default_backoff()
        .modify(|object| object.managed_fields_mut().clear())
        .reflect(writer);
        futures::pin_mut!(events);
        let mut identities = hub.subscribe();
        let mut follower = Follower {
            hub,
            assembly: Assembly::default(),
            listed: false,
            published: false,
            stale: false,
            max_age,
        };
        let mut ticks = tokio::time::interval(AGE_CHECK.min(max_age));
        loop {
            tokio::select! {
                event = events.next() => match event {
                    None => return,
                    Some(Ok(watcher::Event::InitDone)) => {
                        follower.listed = true;
                        follower.take(&store);
                    }
                    Some(Ok(watcher::Event::Apply(_) | watcher::Event::Delete(_))) if follower.listed => {
                        follower.take(&store);
                    }
                    Some(Ok(_)) => {}
                    Some(Err(error)) => follower.hub.failed(names::EC2, format!(
                        "watching SecurityGroupViews: {} (the last view stays)",
                        crate::error_chain(&error)
                    )),
                },
                changed = identities.changed(), if !follower.published => {
                    if changed.is_err() {
                        return;
                    }
                    // The node's identity (IMDS) may be what the first publication waited for.
                    follower.publish();
                }
                _ = ticks.tick() => {
                    if let Some(note) = follower.judge_age() {
                        let event = Event {
                            type_: EventType::Warning,
                            reason: "StaleSecurityGroupViews".into(),
                            note: Some(note),
                            action: "Enforcing".into(),
                            secondary: None,
                        };
                        if let Err(error) = recorder.publish(&event, &node).await {
                            log::warn!("recording the stale views' event: {}", crate::error_chain(&error));
                        }
                    }
                }
            }
        }
    });
}

struct Follower {
    hub: Arc<Hub>,
    assembly: Assembly,
    listed: bool,
    /// A first view went to the hub.
    published: bool,
    /// The last judgement of the views' age.
    stale: bool,
    max_age: Duration,
}

impl Follower {
    fn take(&mut self, store: &Store<SecurityGroupView>) {
        if self.assembly.update(&store.state()) || !self.published {
            self.publish();
        }
    }

    /// The assembled groups into the hub, once they hold this node's own groups (the
    /// controller has read for this node).
    fn publish(&mut self) {
        let Some(identity) = self.hub.identity() else {
            return;
        };
        let Some(read_at) = self.assembly.oldest_read() else {
            return;
        };
        let (documents, node) = self.assembly.documents(&identity.instance_id);
        let missing: Vec<&String> = identity
            .security_groups
            .iter()
            .filter(|g| !self.assembly.has(g))
            .collect();
        if !missing.is_empty() {
            self.hub.failed(
                names::EC2,
                format!(
                    "no SecurityGroupView of this node's groups {missing:?} yet (is `enforcer controller` running?)"
                ),
            );
            return;
        }
        self.hub.publish_ec2_read(documents, node, read_at);
        self.published = true;
        // Judged again at the next tick: an event is sent when they turn stale.
        self.stale = false;
    }

    /// Flags the views when they turn stale; the event's note when they just did.
    fn judge_age(&mut self) -> Option<String> {
        let read_at = self.assembly.oldest_read()?;
        let age = SystemTime::now()
            .duration_since(read_at)
            .unwrap_or_default();
        if age <= self.max_age {
            return None;
        }
        let note = format!(
            "the SecurityGroupViews were last confirmed by `enforcer controller` {}s ago (over {}s): \
             the last good view stays enforced",
            age.as_secs(),
            self.max_age.as_secs()
        );
        // Once per turn: the staleness metric shows the age growing.
        if self.stale {
            return None;
        }
        self.stale = true;
        self.hub.failed(names::EC2, note.clone());
        Some(note)
    }
}
