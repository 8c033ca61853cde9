//! The resolver's findings as Kubernetes Events on the objects they name, so that
//! whoever owns a bad policy or a quarantined pod sees it where they look
//! (`kubectl describe`, `kubectl events`). An object's Event is published when its
//! finding first appears and, while it persists, at most once per [`REPEAT`]; a
//! finding about something that is no Kubernetes object (an EC2 group, the
//! NodeConfig) goes on this node.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ::kube::Client;
use ::kube::runtime::events::{Event, EventType, Recorder, Reporter};
use k8s_openapi::api::core::v1::ObjectReference;
use tokio::sync::mpsc;

use super::hub::Hub;
use crate::model::{Finding, FindingKind};

/// The least time between two Events of one object (kube's recorder also folds
/// repeats of one Event into a series).
pub const REPEAT: Duration = Duration::from_secs(600);

/// Events' notes are capped by the API server at 1 kB.
const NOTE_BYTES: usize = 1024;

/// Starts the publisher; the hub forwards each applied state's findings to it.
pub fn spawn(client: Client, node_name: &str, hub: &Arc<Hub>) {
    let (sender, mut findings) = mpsc::unbounded_channel::<Vec<Finding>>();
    hub.set_findings_sink(sender);
    let recorder = Recorder::new(
        client,
        Reporter {
            controller: "enforcer".into(),
            instance: Some(node_name.to_string()),
        },
    );
    let node = node_name.to_string();
    tokio::spawn(async move {
        let mut published: BTreeMap<(String, String), Instant> = BTreeMap::new();
        while let Some(batch) = findings.recv().await {
            let now = Instant::now();
            // Forget what is no longer found: it is news again if it comes back.
            published.retain(|key, _| batch.iter().any(|f| &key_of(f) == key));
            for finding in &batch {
                let key = key_of(finding);
                if published
                    .get(&key)
                    .is_some_and(|at| now.duration_since(*at) < REPEAT)
                {
                    continue;
                }
                let (event, regarding) = event(finding, &node);
                match recorder.publish(&event, &regarding).await {
                    Ok(()) => {
                        published.insert(key, now);
                    }
                    Err(error) => log::warn!(
                        "recording the event of {}: {}",
                        finding.at.object,
                        crate::error_chain(&error)
                    ),
                }
            }
        }
    });
}

fn key_of(finding: &Finding) -> (String, String) {
    (finding.at.object.clone(), finding.at.message.clone())
}

/// The Event of `finding`, and the object it regards.
pub fn event(finding: &Finding, node: &str) -> (Event, ObjectReference) {
    let reference =
        |api_version: &str, kind: &str, namespace: Option<&str>, name: &str| ObjectReference {
            api_version: Some(api_version.into()),
            kind: Some(kind.into()),
            namespace: namespace.map(str::to_string),
            name: Some(name.into()),
            ..ObjectReference::default()
        };
    let (kind, named) = finding
        .at
        .object
        .split_once(' ')
        .unwrap_or((finding.at.object.as_str(), ""));
    let namespaced = named.split_once('/');
    let regarding = match (kind, namespaced) {
        ("Pod", Some((namespace, name))) => reference("v1", "Pod", Some(namespace), name),
        ("ServiceAccount", Some((namespace, name))) => {
            reference("v1", "ServiceAccount", Some(namespace), name)
        }
        ("SecurityGroupPolicy", Some((namespace, name))) => reference(
            crate::source::state::SGP_API_VERSION,
            "SecurityGroupPolicy",
            Some(namespace),
            name,
        ),
        _ => reference("v1", "Node", None, node),
    };
    let reason = match finding.kind {
        FindingKind::Warning => "SecurityGroupWarning",
        FindingKind::Ignored => "AnnotationIgnored",
        FindingKind::Skipped => "ObjectSetAside",
        FindingKind::Quarantined => "PodQuarantined",
    };
    let mut note = match &finding.at.field {
        Some(field) => format!("{}: {field}: {}", finding.at.object, finding.at.message),
        None => format!("{}: {}", finding.at.object, finding.at.message),
    };
    if note.len() > NOTE_BYTES {
        let mut end = NOTE_BYTES - 3;
        while !note.is_char_boundary(end) {
            end -= 1;
        }
        note.truncate(end);
        note.push_str("...");
    }
    let event = Event {
        type_: EventType::Warning,
        reason: reason.into(),
        note: Some(note),
        action: "Enforcing".into(),
        secondary: None,
    };
    (event, regarding)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::StateError;

    fn finding(kind: FindingKind, object: &str, message: &str) -> Finding {
        Finding {
            kind,
            at: StateError {
                file: "/state/x.yaml".into(),
                object: object.into(),
                field: Some("spec".into()),
                message: message.into(),
            },
        }
    }

    #[test]
    fn events_regard_the_object_the_finding_names() {
        let cases = [
            (
                FindingKind::Quarantined,
                "Pod shop/web",
                ("v1", "Pod", Some("shop"), "web"),
                "PodQuarantined",
            ),
            (
                FindingKind::Skipped,
                "SecurityGroupPolicy team-a/typo",
                (
                    "vpcresources.k8s.aws/v1beta1",
                    "SecurityGroupPolicy",
                    Some("team-a"),
                    "typo",
                ),
                "ObjectSetAside",
            ),
            (
                FindingKind::Skipped,
                "ServiceAccount shop/sa",
                ("v1", "ServiceAccount", Some("shop"), "sa"),
                "ObjectSetAside",
            ),
            (
                FindingKind::Warning,
                "SecurityGroup sg-0a",
                ("v1", "Node", None, "node-1"),
                "SecurityGroupWarning",
            ),
            (
                FindingKind::Ignored,
                "NodeConfig",
                ("v1", "Node", None, "node-1"),
                "AnnotationIgnored",
            ),
        ];
        for (kind, object, (api_version, target, namespace, name), reason) in cases {
            let (event, regarding) = event(&finding(kind, object, "why"), "node-1");
            assert_eq!(
                (
                    regarding.api_version.as_deref(),
                    regarding.kind.as_deref(),
                    regarding.namespace.as_deref(),
                    regarding.name.as_deref()
                ),
                (Some(api_version), Some(target), namespace, Some(name)),
                "{object}"
            );
            assert_eq!(event.reason, reason);
            assert_eq!(
                event.note.as_deref(),
                Some(format!("{object}: spec: why").as_str())
            );
        }
        let (event, _) = event(
            &finding(FindingKind::Warning, "Pod a/b", &"é".repeat(800)),
            "n",
        );
        let note = event.note.unwrap();
        assert!(
            note.len() <= NOTE_BYTES && note.ends_with("..."),
            "{}",
            note.len()
        );
    }
}
