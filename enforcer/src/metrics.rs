//! The agent's Prometheus endpoint: `/metrics` (text format 0.0.4) with
//! verdict, per-pod and per-rule counters, `/healthz` and `/readyz`.

use std::fmt::Write as _;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use enforcer_common::Reason;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpStream};

use crate::agent::Agent;
use crate::maps::MapsError;
use crate::status::reason_name;

/// How long a client may take to send its request.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
const MAX_REQUEST_BYTES: usize = 8192;

/// Answers HTTP requests on `listener` until the runtime stops.
pub async fn serve(listener: TcpListener, agent: Arc<Mutex<Agent>>) {
    loop {
        match listener.accept().await {
            Ok((stream, _)) => {
                tokio::spawn(answer(stream, agent.clone()));
            }
            Err(e) => log::warn!("metrics endpoint: accept: {e}"),
        }
    }
}

async fn answer(mut stream: TcpStream, agent: Arc<Mutex<Agent>>) {
    let Ok(Some(path)) = tokio::time::timeout(REQUEST_TIMEOUT, request_path(&mut stream)).await
    else {
        return;
    };
    let (status, body) = {
        let agent = agent
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        match path.as_str() {
            "/metrics" => match render(&agent) {
                Ok(text) => ("200 OK", text),
                Err(e) => (
                    "500 Internal Server Error",
                    format!("{}\n", crate::agent::error_text(&e)),
                ),
            },
            "/healthz" => ("200 OK", "ok\n".to_string()),
            "/readyz" if agent.is_ready() => ("200 OK", "ready\n".to_string()),
            "/readyz" => ("503 Service Unavailable", not_ready(&agent)),
            _ => (
                "404 Not Found",
                "try /metrics, /healthz or /readyz\n".to_string(),
            ),
        }
    };
    let response = format!(
        "HTTP/1.1 {status}\r\nContent-Type: text/plain; version=0.0.4; charset=utf-8\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    if let Err(e) = stream.write_all(response.as_bytes()).await {
        log::debug!("metrics endpoint: write: {e}");
    }
}

/// The path of a `GET` request, once its headers are in.
async fn request_path(stream: &mut TcpStream) -> Option<String> {
    let mut request = Vec::new();
    let mut buffer = [0u8; 1024];
    while !request.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = stream.read(&mut buffer).await.ok()?;
        if n == 0 || request.len() + n > MAX_REQUEST_BYTES {
            return None;
        }
        request.extend_from_slice(&buffer[..n]);
    }
    let line = request.split(|&b| b == b'\r').next()?;
    let mut words = std::str::from_utf8(line).ok()?.split(' ');
    match (words.next(), words.next()) {
        (Some("GET"), Some(target)) => Some(target.split('?').next()?.to_string()),
        _ => None,
    }
}

fn not_ready(agent: &Agent) -> String {
    if let Some(failure) = agent.failure() {
        format!("the latest state was not applied: {}\n", failure.message)
    } else {
        "programs not attached yet\n".to_string()
    }
}

/// One metric family's header.
fn family(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
}

/// A label value with `\`, `"` and newlines escaped.
fn label(value: &str) -> String {
    value
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// The metrics text of `agent` now.
pub fn render(agent: &Agent) -> Result<String, MapsError> {
    let maps = agent.maps();
    let mut out = String::new();
    family(
        &mut out,
        "enforcer_ready",
        "gauge",
        "1 when the programs are attached and the current state is applied.",
    );
    let _ = writeln!(out, "enforcer_ready {}", u8::from(agent.is_ready()));
    family(
        &mut out,
        "enforcer_state_error",
        "gauge",
        "1 when the latest state directory was rejected (the kernel keeps the previous state).",
    );
    let _ = writeln!(
        out,
        "enforcer_state_error {}",
        u8::from(agent.failure().is_some())
    );
    family(
        &mut out,
        "enforcer_reloads_total",
        "counter",
        "Attempts to apply the state directory, by result.",
    );
    let (applied, rejected) = agent.reloads();
    let _ = writeln!(
        out,
        "enforcer_reloads_total{{result=\"applied\"}} {applied}"
    );
    let _ = writeln!(
        out,
        "enforcer_reloads_total{{result=\"rejected\"}} {rejected}"
    );
    if let Some(applied) = agent.applied() {
        family(
            &mut out,
            "enforcer_state_applied_timestamp_seconds",
            "gauge",
            "When the enforced state was applied.",
        );
        let at = applied
            .at
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0.0, |d| d.as_secs_f64());
        let _ = writeln!(out, "enforcer_state_applied_timestamp_seconds {at:.3}");
        family(&mut out, "enforcer_pods", "gauge", "Pods enforced.");
        let _ = writeln!(out, "enforcer_pods {}", applied.model.pods.len());
    }
    family(
        &mut out,
        "enforcer_conntrack_entries",
        "gauge",
        "Tracked flows.",
    );
    let _ = writeln!(out, "enforcer_conntrack_entries {}", maps.flows()?.len());
    family(
        &mut out,
        "enforcer_verdicts_total",
        "counter",
        "Frames judged on the trunk, by reason.",
    );
    let counters = maps.counters()?;
    for reason in Reason::ALL {
        let verdict = if reason.is_drop() { "deny" } else { "allow" };
        let _ = writeln!(
            out,
            "enforcer_verdicts_total{{reason=\"{}\",verdict=\"{verdict}\"}} {}",
            reason_name(reason),
            counters[reason as usize]
        );
    }
    family(
        &mut out,
        "enforcer_events_suppressed_total",
        "counter",
        "Verdict events not sent: over the rate limit or ring buffer full.",
    );
    let _ = writeln!(
        out,
        "enforcer_events_suppressed_total {}",
        maps.suppressed_events()?
    );
    if let Some(applied) = agent.applied() {
        family(
            &mut out,
            "enforcer_pod_packets_total",
            "counter",
            "Packets of each pod, by verdict.",
        );
        let mut bytes = String::new();
        family(
            &mut bytes,
            "enforcer_pod_bytes_total",
            "counter",
            "Bytes of each pod, by verdict.",
        );
        for pod in &applied.model.pods {
            let traffic = maps.pod_traffic(pod.vlan)?;
            let labels = format!("pod=\"{}\",vlan=\"{}\"", label(&pod.key()), pod.vlan);
            for (verdict, packets, octets) in [
                ("allow", traffic.allowed_packets, traffic.allowed_bytes),
                ("deny", traffic.denied_packets, traffic.denied_bytes),
            ] {
                let _ = writeln!(
                    out,
                    "enforcer_pod_packets_total{{{labels},verdict=\"{verdict}\"}} {packets}"
                );
                let _ = writeln!(
                    bytes,
                    "enforcer_pod_bytes_total{{{labels},verdict=\"{verdict}\"}} {octets}"
                );
            }
        }
        out.push_str(&bytes);
    }
    let rules = maps.rule_traffic()?;
    family(
        &mut out,
        "enforcer_rule_packets_total",
        "counter",
        "Packets each rule decided to allow (first packets of flows, untracked packets).",
    );
    let mut bytes = String::new();
    family(
        &mut bytes,
        "enforcer_rule_bytes_total",
        "counter",
        "Bytes of the packets each rule decided to allow.",
    );
    for (rule, traffic) in &rules {
        let labels = format!(
            "group=\"{}\",direction=\"{}\",rule=\"{}\"",
            label(&rule.group_id),
            rule.direction.as_str(),
            rule.index
        );
        let _ = writeln!(
            out,
            "enforcer_rule_packets_total{{{labels}}} {}",
            traffic.packets
        );
        let _ = writeln!(
            bytes,
            "enforcer_rule_bytes_total{{{labels}}} {}",
            traffic.bytes
        );
    }
    out.push_str(&bytes);
    Ok(out)
}
