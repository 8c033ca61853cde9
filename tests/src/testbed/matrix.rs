//! Driving flows through a virtual node and judging each: the observed verdict against the
//! expected one, with the rule `enforcer explain` says allowed it or why it was denied.

use std::fmt::Write as _;
use std::net::IpAddr;
use std::path::PathBuf;
use std::process::Command;

use anyhow::{Context, Result, bail};
use enforcer::model::{Direction, EnforcingMode};

use super::scenario::{Expect, Flow};
use super::traffic::{Outcome, Probe};
use super::{Observation, VirtualNode};

/// `enforcer explain --json` on a state directory.
pub struct Explainer {
    pub enforcer: PathBuf,
    pub state: PathBuf,
}

/// The evaluator's verdict on one side of a flow, told in a line.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Explanation {
    pub allowed: bool,
    pub text: String,
    /// The address standard mode's source NAT gives the flow, if it translates it.
    pub nat: Option<IpAddr>,
}

impl Explainer {
    /// Explains `probe` between `pod` (`namespace/name`) and `peer` in `direction`.
    pub fn explain(
        &self,
        pod: &str,
        direction: Direction,
        peer: IpAddr,
        probe: Probe,
    ) -> Result<Explanation> {
        let mut command = Command::new(&self.enforcer);
        command
            .arg("explain")
            .arg("--state")
            .arg(&self.state)
            .args(["--pod", pod, &format!("--{}", direction.as_str())])
            .args(["--peer", &peer.to_string(), "--json"]);
        match probe {
            Probe::Tcp(port) => command.args(["--protocol", "tcp", "--port", &port.to_string()]),
            Probe::Udp(port) => command.args(["--protocol", "udp", "--port", &port.to_string()]),
            Probe::Ping if peer.is_ipv6() => {
                command.args(["--protocol", "icmpv6", "--icmp-type", "128"])
            }
            Probe::Ping => command.args(["--protocol", "icmp", "--icmp-type", "8"]),
        };
        let out = command
            .output()
            .with_context(|| format!("running {}", self.enforcer.display()))?;
        if !out.status.success() {
            bail!(
                "enforcer explain failed: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        let json: serde_json::Value =
            serde_json::from_slice(&out.stdout).context("parsing `enforcer explain --json`")?;
        let allowed = match json["verdict"].as_str() {
            Some("allow") => true,
            Some("deny") => false,
            other => bail!("`enforcer explain` gave the verdict {other:?}"),
        };
        let matched = json["matched"].as_array().cloned().unwrap_or_default();
        // The first allowing rule of each checked set (branch, then primary groups).
        let mut rules = Vec::new();
        for side in ["branch", "primary"] {
            let of_side: Vec<_> = matched.iter().filter(|m| m["side"] == side).collect();
            if let Some(m) = of_side.first() {
                let more = match of_side.len() - 1 {
                    0 => String::new(),
                    n => format!(" (+{n} more)"),
                };
                rules.push(format!(
                    "{} {} #{}: {}{more}",
                    m["groupName"].as_str().unwrap_or_default(),
                    m["direction"].as_str().unwrap_or_default(),
                    m["ruleIndex"],
                    m["rule"].as_str().unwrap_or_default()
                ));
            }
        }
        let nat = match json["nat"]["to"].as_str() {
            Some(to) => Some(to.parse().context("`enforcer explain`'s nat.to")?),
            None => None,
        };
        let mut text = if allowed && !rules.is_empty() {
            rules.join("; ")
        } else {
            json["reason"].as_str().unwrap_or_default().to_string()
        };
        if let Some(to) = nat {
            let _ = write!(text, "; source NAT to {to}");
        }
        Ok(Explanation { allowed, text, nat })
    }
}

/// The verdict a flow came to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    Allow,
    Deny,
}

/// One flow, driven and judged.
#[derive(Clone, Debug)]
pub struct Row {
    pub flow: Flow,
    /// Allow or deny (the evaluator's, when the flow defers to it).
    pub expected: Verdict,
    pub observation: Observation,
    /// What `enforcer explain` says about each branch pod's side of the flow.
    pub explanation: Vec<Explanation>,
    /// What went against the expectation; `None`: as expected.
    pub problem: Option<String>,
}

impl Row {
    /// The observed verdict, if the probe came to one.
    pub fn observed(&self) -> Option<Verdict> {
        match self.observation.outcome {
            Outcome::Completed { .. } => Some(Verdict::Allow),
            Outcome::TimedOut => Some(Verdict::Deny),
            Outcome::Failed(_) => None,
        }
    }
}

/// Every flow of one mode.
pub struct Matrix {
    pub mode: EnforcingMode,
    pub rows: Vec<Row>,
}

impl Matrix {
    pub fn mismatches(&self) -> impl Iterator<Item = &Row> {
        self.rows.iter().filter(|r| r.problem.is_some())
    }
}

/// Drives `flows` one after the other through `node` (its agent running), so that the
/// enforcer's counters tell which flow its drops belong to. `explainer` is needed for flows
/// that defer to the evaluator; `on_row` sees each row as it is judged.
pub fn drive(
    node: &mut VirtualNode,
    flows: &[Flow],
    explainer: Option<&Explainer>,
    interrupted: &dyn Fn() -> bool,
    mut on_row: impl FnMut(&Row),
) -> Result<Matrix> {
    let mode = node.model().node.enforcing_mode;
    for flow in flows {
        node.serve(flow)?;
    }
    let mut rows = Vec::new();
    for flow in flows {
        if interrupted() {
            bail!("interrupted");
        }
        let explanation = match explainer {
            Some(explainer) => explain(node, flow, explainer)?,
            None => Vec::new(),
        };
        let expected = match flow.expected(mode) {
            Expect::Allow => Verdict::Allow,
            Expect::Deny => Verdict::Deny,
            Expect::Evaluator if explanation.is_empty() => {
                bail!("{flow}: no branch pod to ask the evaluator about")
            }
            Expect::Evaluator if explanation.iter().all(|e| e.allowed) => Verdict::Allow,
            Expect::Evaluator => Verdict::Deny,
        };
        let observation = node.probe(flow)?;
        let translated = explanation.iter().find_map(|e| e.nat);
        let problem = judge(expected, &observation).or_else(|| seen_as(translated, &observation));
        let row = Row {
            flow: flow.clone(),
            expected,
            observation,
            explanation,
            problem,
        };
        on_row(&row);
        rows.push(row);
    }
    Ok(Matrix { mode, rows })
}

fn judge(expected: Verdict, observation: &Observation) -> Option<String> {
    match (expected, &observation.outcome) {
        (Verdict::Allow, Outcome::Completed { .. }) => None,
        (Verdict::Allow, Outcome::TimedOut) => Some("expected to pass, timed out".into()),
        (Verdict::Deny, Outcome::TimedOut) if observation.policy_drops() > 0 => None,
        (Verdict::Deny, Outcome::TimedOut) => {
            Some("timed out, but the enforcer counted no policy drop".into())
        }
        (Verdict::Deny, Outcome::Completed { .. }) => Some("expected to be dropped, passed".into()),
        (_, Outcome::Failed(why)) => Some(why.clone()),
    }
}

/// A flow `enforcer explain` says is source-NATed must reach its peer from
/// the NAT address (TCP and UDP servers report the address they saw).
fn seen_as(translated: Option<IpAddr>, observation: &Observation) -> Option<String> {
    match (translated, &observation.outcome) {
        (
            Some(nat),
            Outcome::Completed {
                seen_as: Some(seen),
            },
        ) if *seen != nat => Some(format!("the peer saw {seen}, not the node's address {nat}")),
        _ => None,
    }
}

/// The evaluator's view of each branch pod's side of `flow`: the source pod's egress, the
/// destination pod's ingress (each named when there are both).
fn explain(node: &VirtualNode, flow: &Flow, explainer: &Explainer) -> Result<Vec<Explanation>> {
    let ipv6 = flow.ipv6();
    let (_, src) = node.locate(&flow.from, ipv6)?;
    let (_, dst) = node.locate(&flow.to, ipv6)?;
    let sides = [
        (&flow.from, Direction::Egress, dst),
        (&flow.to, Direction::Ingress, src),
    ];
    let mut explanations = Vec::new();
    for (end, direction, peer) in sides {
        let Some(name) = end.branch_pod() else {
            continue;
        };
        let pod = node
            .model()
            .pods
            .iter()
            .find(|p| p.name == name)
            .with_context(|| format!("no branch pod {name}"))?;
        let mut explanation = explainer.explain(&pod.key(), direction, peer, flow.probe)?;
        if flow.from.branch_pod().is_some() && flow.to.branch_pod().is_some() {
            explanation.text = format!("{end} {}: {}", direction.as_str(), explanation.text);
        }
        explanations.push(explanation);
    }
    Ok(explanations)
}

fn verdict_text(verdict: Verdict) -> &'static str {
    match verdict {
        Verdict::Allow => "allow",
        Verdict::Deny => "deny",
    }
}

/// The column headings of [`render_row`].
pub fn render_header() -> String {
    format!(
        "      {:<50} {:<8} {:<18} {}\n        {}\n",
        "flow",
        "expected",
        "observed",
        "what it shows",
        "the rule that allowed it, or why it was denied (enforcer explain)"
    )
}

/// A row in two lines: the flow with its verdicts, then the rules or the reason.
pub fn render_row(row: &Row) -> String {
    let mark = if row.problem.is_some() { "FAIL" } else { "ok" };
    let observed = match (&row.observation.outcome, row.observation.policy_drops()) {
        (Outcome::TimedOut, 0) => "deny (timed out)".to_string(),
        (Outcome::TimedOut, drops) => format!("deny ({drops} dropped)"),
        (Outcome::Completed { .. }, _) => "allow".to_string(),
        (Outcome::Failed(_), _) => "error".to_string(),
    };
    let mut out = format!(
        "{mark:<5} {:<50} {:<8} {:<18} {}\n",
        row.flow.to_string(),
        verdict_text(row.expected),
        observed,
        row.flow.story
    );
    let why: Vec<&str> = row.explanation.iter().map(|e| e.text.as_str()).collect();
    if !why.is_empty() {
        let _ = writeln!(out, "        {}", why.join(" / "));
    }
    if let Some(problem) = &row.problem {
        let _ = writeln!(out, "        MISMATCH: {problem}");
    }
    out
}

/// One line per mode: how many flows went as expected.
pub fn render_summary(matrix: &Matrix) -> String {
    let judged = matrix.rows.len();
    let failed = matrix.mismatches().count();
    format!(
        "{} mode: {}/{judged} as expected",
        matrix.mode.name(),
        judged - failed
    )
}
