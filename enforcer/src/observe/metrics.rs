//! The agent's Prometheus metrics (prometheus-client, OpenMetrics text): what
//! the agent publishes of itself, and what the kernel counted, read from the
//! pinned maps at scrape time, never under the agent's control of the maps.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime};

use enforcer_common::{
    COUNTER_SLOTS, POD_AUDIT, PodTracked, PodTraffic, Reason, RuleTraffic, counter_slot,
};
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{
    DescriptorEncoder, EncodeGaugeValue, EncodeLabelSet, EncodeMetric,
};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::registry::Registry;
use tokio::sync::watch;

use crate::kernel::maps::{KernelMaps, MapsError, NatUse};
use crate::policy::eval::RuleRef;
use crate::source::SourceHealth;

/// What the agent tells the endpoint about itself, published after every
/// change; the endpoint reads it without waiting for the agent.
#[derive(Clone, Debug, Default)]
pub struct AgentView {
    /// Both programs first on the configured trunk.
    pub attached: bool,
    /// A state has been applied.
    pub applied: bool,
    /// The latest state was rejected (the kernel keeps the previous one).
    pub state_error: bool,
    /// Reloads that applied a state, and that were rejected.
    pub reloads: (u64, u64),
    pub applied_at: Option<SystemTime>,
    /// The pods enforced: `namespace/name` and VLAN.
    pub pods: Arc<Vec<(String, u16)>>,
    /// What rules no longer in the maps admitted (the kernel forgot it).
    pub retired_traffic: Arc<BTreeMap<RuleRef, RuleTraffic>>,
    /// Findings of the applied state by kind (docs/isolation.md), every kind listed.
    pub findings: Vec<(crate::model::FindingKind, usize)>,
    /// Where the XDP program runs on the trunk (`native`, `generic`), if it does.
    pub xdp_mode: Option<&'static str>,
    /// The live sources' health (empty for a state directory).
    pub sources: Arc<Vec<SourceHealth>>,
}

impl AgentView {
    /// Attached, applied, and the latest state is the applied one.
    pub fn is_ready(&self) -> bool {
        self.not_ready_reason().is_none()
    }

    /// Why it is not ready, in words that reveal nothing of the state's content.
    pub fn not_ready_reason(&self) -> Option<&'static str> {
        if self.sources.iter().any(|s| s.last_success.is_none()) {
            Some("a live source has not produced its first view yet (see `enforcer status`)")
        } else if !self.applied {
            Some("no state applied yet")
        } else if self.state_error {
            Some(
                "the latest state was rejected; the kernel keeps the previous one (see `enforcer status`)",
            )
        } else if !self.attached {
            Some("the programs are not attached first on the trunk")
        } else {
            None
        }
    }
}

/// The agent's end: publishes its view around every change of the maps.
pub struct Feed {
    view: watch::Sender<Arc<AgentView>>,
    /// Odd while the agent changes the maps; a scrape that overlaps a change reads again.
    changes: Arc<AtomicU64>,
}

/// The endpoint's end: the latest view and the maps pinned under `pin_path`.
#[derive(Clone)]
pub struct Source {
    view: watch::Receiver<Arc<AgentView>>,
    changes: Arc<AtomicU64>,
    pin_path: PathBuf,
}

/// A feed and its source, starting from `view`.
pub fn feed(view: AgentView, pin_path: PathBuf) -> (Feed, Source) {
    let (sender, receiver) = watch::channel(Arc::new(view));
    let changes = Arc::new(AtomicU64::new(0));
    (
        Feed {
            view: sender,
            changes: changes.clone(),
        },
        Source {
            view: receiver,
            changes,
            pin_path,
        },
    )
}

impl Feed {
    /// Runs `change` (which may write the maps), then publishes the view it returns.
    pub fn update<T>(&self, change: impl FnOnce() -> (T, AgentView)) -> T {
        self.changes.fetch_add(1, Ordering::SeqCst);
        let (result, view) = change();
        self.view.send_replace(Arc::new(view));
        self.changes.fetch_add(1, Ordering::SeqCst);
        result
    }
}

/// How often a scrape reads again when the agent changed the maps meanwhile.
const CONSISTENT_READS: usize = 10;
const REREAD_AFTER: Duration = Duration::from_millis(20);

impl Source {
    pub fn view(&self) -> Arc<AgentView> {
        self.view.borrow().clone()
    }

    /// The metrics text now. Blocking (it walks the maps): call it off the
    /// async threads. A read that overlapped a change of the maps is taken
    /// again, so counters moved by an apply (folded into the retired totals)
    /// are not missed; after a few tries the last read is served.
    pub fn scrape(&self) -> Result<String, MapsError> {
        let maps = KernelMaps::open_pinned(&self.pin_path)?;
        let mut sample = None;
        for _ in 0..CONSISTENT_READS {
            let before = self.changes.load(Ordering::SeqCst);
            let read = Sample::read(self.view(), &maps)?;
            let consistent =
                before.is_multiple_of(2) && self.changes.load(Ordering::SeqCst) == before;
            sample = Some(read);
            if consistent {
                break;
            }
            std::thread::sleep(REREAD_AFTER);
        }
        Ok(sample.expect("at least one read").render())
    }
}

/// One scrape's figures: read first (reading can fail), then encoded.
#[derive(Debug)]
struct Sample {
    view: Arc<AgentView>,
    conntrack_entries: usize,
    /// `maxFlowsPerPod` and `maxFragmentsPerPod` as the kernel enforces them.
    allowances: (u32, u32),
    nat: NatUse,
    verdicts: [u64; COUNTER_SLOTS as usize],
    suppressed_events: u64,
    pods: Vec<PodSample>,
    /// VLANs whose pod the kernel audits.
    audited: BTreeSet<u16>,
    rules: BTreeMap<RuleRef, RuleTraffic>,
}

/// One pod's figures in a scrape.
#[derive(Debug)]
struct PodSample {
    pod: String,
    vlan: u16,
    traffic: PodTraffic,
    tracked: PodTracked,
}

impl PodSample {
    fn labels(&self) -> [(&'static str, String); 2] {
        [("pod", self.pod.clone()), ("vlan", self.vlan.to_string())]
    }

    fn verdict_labels(&self, verdict: &'static str) -> [(&'static str, String); 3] {
        let [pod, vlan] = self.labels();
        [pod, vlan, ("verdict", verdict.to_string())]
    }
}

impl Sample {
    fn read(view: Arc<AgentView>, maps: &KernelMaps) -> Result<Self, MapsError> {
        let pods = view
            .pods
            .iter()
            .map(|(pod, vlan)| {
                Ok(PodSample {
                    pod: pod.clone(),
                    vlan: *vlan,
                    traffic: maps.pod_traffic(*vlan)?,
                    tracked: maps.tracked(*vlan),
                })
            })
            .collect::<Result<_, MapsError>>()?;
        let settings = maps.settings()?;
        let audited = maps
            .pods()?
            .into_iter()
            .filter(|(_, entry)| entry.flags & POD_AUDIT != 0)
            .map(|(vlan, _)| vlan)
            .collect();
        Ok(Self {
            audited,
            // A walk, not the sum of the pods' counts: those count what the
            // kernel inserted, but a table kept over an upgrade that reset the
            // counts (`kernel::pins`), or an entry written by hand, is in the
            // table and in no count.
            conntrack_entries: maps.flow_count()?,
            allowances: (settings.max_flows_per_pod, settings.max_fragments_per_pod),
            nat: maps.nat_use()?,
            verdicts: maps.counters()?,
            suppressed_events: maps.suppressed_events()?,
            pods,
            rules: maps.rule_traffic_over(&view.retired_traffic)?,
            view,
        })
    }

    fn render(self) -> String {
        let mut registry = Registry::default();
        registry.register_collector(Box::new(self));
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry)
            .expect("writing to a String cannot fail");
        text
    }
}

/// One gauge without labels.
fn gauge<N: EncodeGaugeValue + Clone + std::fmt::Debug>(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    value: N,
) -> std::fmt::Result {
    let gauge = ConstGauge::new(value);
    gauge.encode(encoder.encode_descriptor(name, help, None, gauge.metric_type())?)
}

/// A gauge family, one sample per label set.
fn gauges<L: EncodeLabelSet, N: EncodeGaugeValue + Clone + std::fmt::Debug>(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    samples: impl IntoIterator<Item = (L, N)>,
) -> std::fmt::Result {
    let mut family = encoder.encode_descriptor(
        name,
        help,
        None,
        prometheus_client::metrics::MetricType::Gauge,
    )?;
    for (labels, value) in samples {
        ConstGauge::new(value).encode(family.encode_family(&labels)?)?;
    }
    Ok(())
}

/// Each live source's last success, its staleness at `now`, and whether its latest
/// attempt failed (its last view stays in use).
fn sources(
    e: &mut DescriptorEncoder,
    sources: &[SourceHealth],
    now: SystemTime,
) -> std::fmt::Result {
    if sources.is_empty() {
        return Ok(());
    }
    let label = |s: &SourceHealth| [("source", s.name.clone())];
    let succeeded: Vec<_> = sources
        .iter()
        .filter_map(|s| Some((s, s.last_success?)))
        .collect();
    gauges(
        e,
        "enforcer_source_last_success_timestamp_seconds",
        "When each live source last produced a view.",
        succeeded.iter().map(|(s, at)| {
            let unix = at.duration_since(SystemTime::UNIX_EPOCH);
            (label(s), unix.map_or(0.0, |d| d.as_secs_f64()))
        }),
    )?;
    gauges(
        e,
        "enforcer_source_staleness_seconds",
        "Age of each live source's view in use (absent before its first).",
        succeeded.iter().map(|(s, at)| {
            let age = now.duration_since(*at).unwrap_or_default();
            (label(s), age.as_secs_f64())
        }),
    )?;
    gauges(
        e,
        "enforcer_source_error",
        "1 when a live source's latest attempt failed (its last view stays in use).",
        sources
            .iter()
            .map(|s| (label(s), if s.error.is_some() { 1.0 } else { 0.0 })),
    )
}

/// A counter family: `name` gets its `_total` suffix from the encoder.
fn counters<L: EncodeLabelSet>(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    samples: impl IntoIterator<Item = (L, u64)>,
) -> std::fmt::Result {
    let mut family = encoder.encode_descriptor(
        name,
        help,
        None,
        prometheus_client::metrics::MetricType::Counter,
    )?;
    for (labels, value) in samples {
        ConstCounter::new(value).encode(family.encode_family(&labels)?)?;
    }
    Ok(())
}

impl Collector for Sample {
    fn encode(&self, mut encoder: DescriptorEncoder) -> std::fmt::Result {
        let view = &self.view;
        let e = &mut encoder;
        gauge(
            e,
            "enforcer_ready",
            "1 when the programs are attached first on the trunk and the current state is applied.",
            i64::from(view.is_ready()),
        )?;
        gauge(
            e,
            "enforcer_attached",
            "1 when both programs are attached to the configured trunk, ahead of any other program.",
            i64::from(view.attached),
        )?;
        let mut xdp = e.encode_descriptor(
            "enforcer_xdp_attached",
            "1 for the mode the XDP program runs in on the trunk (native, generic); 0 for the others.",
            None,
            prometheus_client::metrics::MetricType::Gauge,
        )?;
        for mode in ["native", "generic"] {
            ConstGauge::new(i64::from(view.xdp_mode == Some(mode)))
                .encode(xdp.encode_family(&[("mode", mode)])?)?;
        }
        gauge(
            e,
            "enforcer_state_error",
            "1 when the latest state was rejected (the kernel keeps the previous state).",
            i64::from(view.state_error),
        )?;
        counters(
            e,
            "enforcer_reloads",
            "Attempts to apply the state, by result.",
            [
                ([("result", "applied")], view.reloads.0),
                ([("result", "rejected")], view.reloads.1),
            ],
        )?;
        if let Some(at) = view.applied_at {
            let seconds = at
                .duration_since(SystemTime::UNIX_EPOCH)
                .map_or(0.0, |d| d.as_secs_f64());
            gauge(
                e,
                "enforcer_state_applied_timestamp_seconds",
                "When the enforced state was applied.",
                seconds,
            )?;
            gauge(e, "enforcer_pods", "Pods enforced.", view.pods.len() as i64)?;
            gauges(
                e,
                "enforcer_state_findings",
                "Findings of the applied state by kind: warning (accepted, worth a look), ignored \
                 (an annotation not applied), skipped (an object set aside), quarantined (a pod \
                 whose groups cannot be known, its VLAN dropping what groups filter).",
                view.findings
                    .iter()
                    .map(|(kind, count)| ([("kind", kind.name())], *count as i64)),
            )?;
        }
        sources(e, &view.sources, SystemTime::now())?;
        gauge(
            e,
            "enforcer_conntrack_entries",
            "Tracked flows.",
            self.conntrack_entries as i64,
        )?;
        gauge(
            e,
            "enforcer_nat_mappings",
            "Standard mode's source-NATed flows.",
            self.nat.mappings as i64,
        )?;
        gauge(
            e,
            "enforcer_nat_ports",
            "Ports of snatPortRange (0: source NAT off).",
            match self.nat.address {
                Some(_) => i64::from(self.nat.ports.1 - self.nat.ports.0) + 1,
                None => 0,
            },
        )?;
        gauge(
            e,
            "enforcer_nat_busiest_peer_ports",
            "The most ports of snatPortRange one peer endpoint holds (new flows to it drop at enforcer_nat_ports).",
            self.nat.busiest_peer as i64,
        )?;
        counters(
            e,
            "enforcer_verdicts",
            "Frames judged on the trunk, by reason; would_deny: dropped but for audit (passed).",
            Reason::ALL
                .iter()
                .map(|&reason| {
                    let verdict = if reason.is_drop() { "deny" } else { "allow" };
                    (
                        [("reason", reason.name()), ("verdict", verdict)],
                        self.verdicts[reason as usize],
                    )
                })
                .chain(
                    Reason::ALL
                        .iter()
                        .filter(|r| r.is_audited())
                        .map(|&reason| {
                            (
                                [("reason", reason.name()), ("verdict", "would_deny")],
                                self.verdicts[counter_slot(reason, true) as usize],
                            )
                        }),
                ),
        )?;
        let suppressed = ConstCounter::new(self.suppressed_events);
        suppressed.encode(e.encode_descriptor(
            "enforcer_events_suppressed",
            "Verdict events not sent: over the rate limit or ring buffer full.",
            None,
            suppressed.metric_type(),
        )?)?;
        let mut audit = encoder.encode_descriptor(
            "enforcer_pod_audit",
            "1 when the pod is audited (enforcingAction: audit): what its groups refuse passes.",
            None,
            prometheus_client::metrics::MetricType::Gauge,
        )?;
        for pod in &self.pods {
            ConstGauge::new(i64::from(self.audited.contains(&pod.vlan)))
                .encode(audit.encode_family(&pod.labels())?)?;
        }
        let e = &mut encoder;
        counters(
            e,
            "enforcer_pod_packets",
            "Packets of each pod, by verdict (would_deny: refused, passed by audit).",
            self.pods.iter().flat_map(|p| {
                let t = &p.traffic;
                [
                    (p.verdict_labels("allow"), t.allowed_packets),
                    (p.verdict_labels("deny"), t.denied_packets),
                    (p.verdict_labels("would_deny"), t.would_drop_packets),
                ]
            }),
        )?;
        counters(
            e,
            "enforcer_pod_bytes",
            "Bytes of each pod, by verdict (would_deny: refused, passed by audit).",
            self.pods.iter().flat_map(|p| {
                let t = &p.traffic;
                [
                    (p.verdict_labels("allow"), t.allowed_bytes),
                    (p.verdict_labels("deny"), t.denied_bytes),
                    (p.verdict_labels("would_deny"), t.would_drop_bytes),
                ]
            }),
        )?;
        gauge(
            e,
            "enforcer_max_flows_per_pod",
            "Tracked flows each pod may hold (maxFlowsPerPod); its new flows drop beyond.",
            i64::from(self.allowances.0),
        )?;
        gauge(
            e,
            "enforcer_max_fragments_per_pod",
            "Fragment verdicts each pod may hold (maxFragmentsPerPod); its fragmented datagrams drop beyond.",
            i64::from(self.allowances.1),
        )?;
        gauges(
            e,
            "enforcer_pod_tracked_flows",
            "Tracked flows each pod holds, as the kernel counts them against enforcer_max_flows_per_pod.",
            self.pods
                .iter()
                .map(|p| (p.labels(), p.tracked.flows as i64)),
        )?;
        gauges(
            e,
            "enforcer_pod_tracked_fragments",
            "Fragment verdicts each pod holds, as the kernel counts them against enforcer_max_fragments_per_pod.",
            self.pods
                .iter()
                .map(|p| (p.labels(), p.tracked.fragments as i64)),
        )?;
        let rule_labels = |rule: &RuleRef| {
            [
                ("group", rule.group_id.clone()),
                ("direction", rule.direction.as_str().to_string()),
                ("rule", rule.index.to_string()),
            ]
        };
        counters(
            e,
            "enforcer_rule_packets",
            "Packets each rule decided to allow (first packets of flows, untracked packets).",
            self.rules
                .iter()
                .map(|(rule, traffic)| (rule_labels(rule), traffic.packets)),
        )?;
        counters(
            e,
            "enforcer_rule_bytes",
            "Bytes of the packets each rule decided to allow.",
            self.rules
                .iter()
                .map(|(rule, traffic)| (rule_labels(rule), traffic.bytes)),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Direction;

    #[test]
    fn a_sample_renders_the_metric_names_operators_scrape() {
        let rule = RuleRef {
            group_id: "sg-0a\"b".to_string(),
            direction: Direction::Ingress,
            index: 3,
        };
        let view = AgentView {
            attached: true,
            applied: true,
            state_error: false,
            reloads: (2, 1),
            applied_at: Some(SystemTime::UNIX_EPOCH + Duration::from_millis(1500)),
            pods: Arc::new(vec![("shop/web".to_string(), 7)]),
            retired_traffic: Arc::default(),
            findings: vec![
                (crate::model::FindingKind::Warning, 2),
                (crate::model::FindingKind::Ignored, 0),
                (crate::model::FindingKind::Skipped, 1),
                (crate::model::FindingKind::Quarantined, 3),
            ],
            xdp_mode: Some("native"),
            sources: Arc::new(vec![
                SourceHealth {
                    name: "ec2".into(),
                    last_success: Some(SystemTime::UNIX_EPOCH + Duration::from_secs(1000)),
                    error: Some("throttled".into()),
                    error_at: Some(SystemTime::UNIX_EPOCH + Duration::from_secs(1010)),
                },
                SourceHealth {
                    name: "imds".into(),
                    last_success: Some(SystemTime::UNIX_EPOCH + Duration::from_secs(900)),
                    error: None,
                    error_at: None,
                },
            ]),
        };
        let mut verdicts = [0; COUNTER_SLOTS as usize];
        verdicts[Reason::DropPolicy as usize] = 4;
        verdicts[counter_slot(Reason::DropPolicy, true) as usize] = 3;
        let sample = Sample {
            view: Arc::new(view),
            conntrack_entries: 9,
            nat: NatUse {
                address: Some(std::net::Ipv4Addr::new(10, 0, 1, 10)),
                ports: (61000, 61009),
                mappings: 4,
                busiest_peer: 3,
            },
            verdicts,
            suppressed_events: 5,
            allowances: (512, 64),
            pods: vec![PodSample {
                pod: "shop/web".to_string(),
                vlan: 7,
                traffic: PodTraffic {
                    allowed_packets: 1,
                    allowed_bytes: 60,
                    denied_packets: 2,
                    denied_bytes: 120,
                    would_drop_packets: 3,
                    would_drop_bytes: 180,
                },
                tracked: PodTracked {
                    flows: 8,
                    fragments: 2,
                },
            }],
            audited: BTreeSet::from([7]),
            rules: BTreeMap::from([(
                rule,
                RuleTraffic {
                    packets: 6,
                    bytes: 600,
                },
            )]),
        };
        let text = sample.render();
        for line in [
            "enforcer_ready 1",
            "enforcer_attached 1",
            "enforcer_state_error 0",
            r#"enforcer_xdp_attached{mode="native"} 1"#,
            r#"enforcer_xdp_attached{mode="generic"} 0"#,
            r#"enforcer_reloads_total{result="applied"} 2"#,
            r#"enforcer_reloads_total{result="rejected"} 1"#,
            "enforcer_state_applied_timestamp_seconds 1.5",
            "enforcer_pods 1",
            r#"enforcer_state_findings{kind="warning"} 2"#,
            r#"enforcer_state_findings{kind="ignored"} 0"#,
            r#"enforcer_state_findings{kind="skipped"} 1"#,
            r#"enforcer_state_findings{kind="quarantined"} 3"#,
            "enforcer_conntrack_entries 9",
            "enforcer_nat_mappings 4",
            "enforcer_nat_ports 10",
            "enforcer_nat_busiest_peer_ports 3",
            r#"enforcer_verdicts_total{reason="drop_policy",verdict="deny"} 4"#,
            r#"enforcer_verdicts_total{reason="pass_new",verdict="allow"} 0"#,
            r#"enforcer_verdicts_total{reason="drop_policy",verdict="would_deny"} 3"#,
            r#"enforcer_pod_audit{pod="shop/web",vlan="7"} 1"#,
            r#"enforcer_pod_packets_total{pod="shop/web",vlan="7",verdict="would_deny"} 3"#,
            "enforcer_events_suppressed_total 5",
            r#"enforcer_pod_packets_total{pod="shop/web",vlan="7",verdict="deny"} 2"#,
            r#"enforcer_pod_bytes_total{pod="shop/web",vlan="7",verdict="allow"} 60"#,
            "enforcer_max_flows_per_pod 512",
            "enforcer_max_fragments_per_pod 64",
            r#"enforcer_pod_tracked_flows{pod="shop/web",vlan="7"} 8"#,
            r#"enforcer_pod_tracked_fragments{pod="shop/web",vlan="7"} 2"#,
            r#"enforcer_rule_packets_total{group="sg-0a\"b",direction="ingress",rule="3"} 6"#,
            r#"enforcer_rule_bytes_total{group="sg-0a\"b",direction="ingress",rule="3"} 600"#,
            r#"enforcer_source_last_success_timestamp_seconds{source="ec2"} 1000.0"#,
            r#"enforcer_source_error{source="ec2"} 1.0"#,
            r#"enforcer_source_error{source="imds"} 0.0"#,
            "# TYPE enforcer_verdicts counter",
            "# EOF",
        ] {
            assert!(
                text.lines().any(|l| l == line),
                "{line:?} missing from:\n{text}"
            );
        }
    }

    #[test]
    fn readiness_needs_attachment_an_applied_state_and_no_rejected_one() {
        let ready = AgentView {
            attached: true,
            applied: true,
            ..AgentView::default()
        };
        assert!(ready.is_ready());
        assert_eq!(ready.not_ready_reason(), None);
        for view in [
            AgentView {
                attached: false,
                ..ready.clone()
            },
            AgentView {
                applied: false,
                ..ready.clone()
            },
            AgentView {
                state_error: true,
                ..ready.clone()
            },
            // A live source without a first view, though a state was applied before.
            AgentView {
                sources: Arc::new(vec![SourceHealth {
                    name: "ec2".into(),
                    last_success: None,
                    error: Some("denied".into()),
                    error_at: Some(SystemTime::now()),
                }]),
                ..ready.clone()
            },
        ] {
            assert!(!view.is_ready(), "{view:?}");
            assert!(view.not_ready_reason().is_some());
        }
    }
}
