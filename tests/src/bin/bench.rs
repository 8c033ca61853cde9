//! `cargo xtask bench [--quick] --json PATH`: the fast path's per-packet cost
//! against the floor and by rule count, the control plane's apply time and
//! the maps' memory, all measured in one run so that ratios hold on a noisy
//! machine. Every figure is a median of kernel-timed `BPF_PROG_TEST_RUN`s.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv4Addr};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use aya::EbpfLoader;
use aya::maps::HashMap;
use aya::programs::SchedClassifier;
use enforcer::model::{Direction, EnforcingMode, L4Match, Model, NodeConfig};
use enforcer_common::{
    MAX_FLOWS, MAX_UNFILTERED_V4, MAX_UNFILTERED_V6, POD_HAS_IPV4, PodEntry, Reason, map_names,
};
use enforcer_tests::frame::{self, Ip, L4, TCP_ACK, Tag};
use enforcer_tests::kernel::Kernel;
use enforcer_tests::random::{Rng, packet_for_rule, scale_model};
use enforcer_tests::staged;
use enforcer_tests::testbed::throughput::{self, Bed, Filter};
use serde_json::json;

/// The node of the issue: 120 branch pods.
const PODS: usize = 120;
/// Rules per pod and how they are made: (groups per pod, rules per group).
const SCALES: [(usize, usize, usize); 4] = [(1, 1, 1), (60, 1, 60), (300, 5, 60), (960, 16, 60)];
const SEED: u64 = 0xbe_7c4;

struct Options {
    quick: bool,
    json: PathBuf,
}

fn options() -> Result<Options> {
    let mut quick = false;
    let mut json = None;
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--quick" => quick = true,
            "--json" => json = Some(PathBuf::from(args.next().context("--json needs a path")?)),
            other => bail!("unknown argument {other}; usage: bench [--quick] --json PATH"),
        }
    }
    Ok(Options {
        quick,
        json: json.context("--json PATH is required")?,
    })
}

fn median(mut samples: Vec<Duration>) -> f64 {
    samples.sort();
    samples[samples.len() / 2].as_nanos() as f64
}

/// A tagged TCP SYN from `peer` to the first pod.
fn ingress_frame(model: &Model, peer: IpAddr, l4: L4) -> Vec<u8> {
    let pod = &model.pods[0];
    let dst = match peer {
        IpAddr::V4(_) => IpAddr::V4(pod.ipv4.expect("bench pods have IPv4")),
        IpAddr::V6(_) => IpAddr::V6(pod.ipv6.expect("bench pods have IPv6")),
    };
    frame::ip_frame(Tag::Vlan(pod.vlan), &Ip { src: peer, dst, l4 })
}

/// The floor program: same parser, one hash lookup by VLAN.
fn floor_ns(frame: &[u8], vlan: u16, samples: usize) -> Result<f64> {
    let object = staged::object("enforcer-floor");
    let bytes = std::fs::read(&object).with_context(|| {
        format!(
            "reading {} (run `{}`)",
            object.display(),
            staged::build_command(staged::PROFILE)
        )
    })?;
    let mut ebpf = EbpfLoader::new()
        .load(&bytes)
        .context("loading the floor object")?;
    let mut pods: HashMap<_, u16, PodEntry> =
        HashMap::try_from(ebpf.map_mut("FLOOR_PODS").context("floor map")?)?;
    let entry = PodEntry {
        ipv4: [10, 0, 100, 1],
        ipv6: [0; 16],
        mode: 1,
        flags: POD_HAS_IPV4,
        unfiltered_v4_count: 0,
        unfiltered_v6_count: 0,
        policies: [0; 4],
        identity: [0; 8],
        unfiltered_v4: [[0; 4]; MAX_UNFILTERED_V4],
        unfiltered_v6: [[0; 16]; MAX_UNFILTERED_V6],
    };
    pods.insert(vlan, entry, 0)?;
    let program: &mut SchedClassifier = ebpf
        .program_mut("floor_ingress")
        .context("floor program")?
        .try_into()?;
    program.load()?;
    Ok(median(
        (0..samples)
            .map(|_| enforcer_tests::time_run(program, frame))
            .collect(),
    ))
}

/// Standard mode's source NAT against a plain allowed flow, on one kernel in one
/// run: a standard pod's egress frame of an established TCP flow to a peer in the
/// VPC (passed on) and to one outside it (translated, checksums updated,
/// redirected to the primary interface). Medians in ns: (plain, translated).
fn nat_costs(samples: usize) -> Result<(f64, f64)> {
    use enforcer_tests::models;
    let pod_ip = Ipv4Addr::new(10, 0, 64, 7);
    let mut pod = models::branch_pod("bench", 7, pod_ip, None, &["sg-out"]);
    pod.mode = EnforcingMode::Standard;
    let https = L4Match::Ports {
        protocol: 6,
        from: 443,
        to: 443,
    };
    let out = models::group("sg-out", vec![], vec![models::rule(https, "0.0.0.0/0")]);
    let node = models::node_config(vec!["sg-out".into()]);
    let kernel = Kernel::load(&models::model(node, vec![out], vec![pod]));
    let time = |peer: Ipv4Addr, translated: bool| -> Result<f64> {
        let packet = frame::tcp(pod_ip, 40000, peer, 443, TCP_ACK);
        let frame = frame::ip_frame(Tag::Vlan(7), &packet);
        let first = kernel.run(Direction::Egress, &frame);
        if first.reason != Reason::PassNew || first.redirected != translated {
            bail!("to {peer}: the kernel said {first:?}");
        }
        Ok(median(
            (0..samples)
                .map(|_| kernel.time(Direction::Egress, &frame))
                .collect(),
        ))
    };
    Ok((
        time(Ipv4Addr::new(10, 0, 9, 9), false)?,
        time(Ipv4Addr::new(192, 0, 2, 7), true)?,
    ))
}

/// Cost of the first packet of a flow: the frame must be judged as new on
/// every sample, so its tracked entry is forgotten first.
fn new_flow_time(kernel: &mut Kernel, frame: &[u8]) -> Duration {
    kernel.maps.forget_flows(|_| true).expect("clear conntrack");
    kernel.time(Direction::Ingress, frame)
}

/// The median and 99th percentile of `times`, in ns.
fn median_and_p99(mut times: Vec<Duration>) -> (f64, f64) {
    times.sort();
    let p99 = times[times.len() * 99 / 100].as_nanos() as f64;
    (median(times), p99)
}

/// Frames for the first pod: allowed by its first rule, by its last rule, denied.
fn probe_frames(rng: &mut Rng, model: &Model) -> Vec<(&'static str, Vec<u8>)> {
    let pod = &model.pods[0];
    let rules: Vec<_> = pod
        .groups
        .iter()
        .flat_map(|id| model.groups[id].ingress.iter())
        .filter(|rule| !matches!(rule.l4, L4Match::Icmp { .. }))
        .collect();
    let mut frames = Vec::new();
    for (name, rule) in [("first rule", rules.first()), ("last rule", rules.last())] {
        if let Some((peer, l4)) = rule.and_then(|r| packet_for_rule(rng, model, r)) {
            frames.push((name, ingress_frame(model, peer, l4)));
        }
    }
    let unmatched = IpAddr::V4(Ipv4Addr::new(192, 0, 2, 77));
    let deny = L4::Tcp {
        src: 40000,
        dst: 1,
        flags: frame::TCP_SYN,
    };
    frames.push(("deny", ingress_frame(model, unmatched, deny)));
    frames
}

/// Kernel memory of every BPF map this process holds (`memlock` in `/proc/self/fdinfo`),
/// by map name, each map once.
fn map_memory() -> Result<BTreeMap<String, u64>> {
    let mut seen = BTreeSet::new();
    let mut by_name = BTreeMap::new();
    for entry in std::fs::read_dir("/proc/self/fdinfo")? {
        let Ok(info) = std::fs::read_to_string(entry?.path()) else {
            continue;
        };
        let field = |name: &str| {
            info.lines()
                .find_map(|l| l.strip_prefix(name))
                .and_then(|v| v.trim().parse::<u64>().ok())
        };
        let (Some(id), Some(memlock)) = (field("map_id:"), field("memlock:")) else {
            continue;
        };
        if !seen.insert(id) {
            continue;
        }
        let map = aya::maps::MapInfo::from_id(u32::try_from(id)?)?;
        let name = map.name_as_str().unwrap_or("?").to_string();
        *by_name.entry(name).or_default() += memlock;
    }
    Ok(by_name)
}

/// Packets per second through the trunk per filter: new flows and one established flow.
struct Throughput {
    /// Frames per second of one CPU dropped: refused new flows, unknown VLAN.
    deny_flood: Vec<(Filter, [f64; 2])>,
    /// Refused flows, per enforcer filter: (ns a dropped frame, of which the first program).
    flood_program_ns: Vec<(Filter, (f64, f64))>,
    new_flows: Vec<(Filter, f64)>,
    established: Vec<(Filter, f64)>,
    repeats: usize,
    linear_rules: usize,
    set_elements: usize,
    /// Spot-check frames the groups allow and deny.
    spot_checked: (usize, usize),
    /// The conntrack's memory: (bytes it grew by, flows it tracked) over one run of new flows.
    conntrack_growth: (u64, usize),
}

impl Throughput {
    fn new_pps(&self, filter: Filter) -> f64 {
        self.new_flows
            .iter()
            .find(|(f, _)| *f == filter)
            .map_or(0.0, |(_, p)| *p)
    }

    fn flood_pps(&self, filter: Filter, which: usize) -> f64 {
        self.deny_flood
            .iter()
            .find(|(f, _)| *f == filter)
            .map_or(0.0, |(_, p)| p[which])
    }

    fn established_pps(&self, filter: Filter) -> f64 {
        self.established
            .iter()
            .find(|(f, _)| *f == filter)
            .map_or(0.0, |(_, p)| *p)
    }
}

/// The filters a flood is measured against, and their names in the report.
const FLOOD_FILTERS: [Filter; 4] = [
    Filter::EnforcerXdp,
    Filter::Enforcer,
    Filter::NftSets,
    Filter::NftLinear,
];
/// Distinct frames of each flood (cycled).
const FLOOD_FRAMES: usize = 20_000;

fn flood_key(filter: Filter) -> &'static str {
    match filter {
        Filter::EnforcerXdp => "xdp",
        Filter::EnforcerXdpHook => "xdp_pass_all",
        Filter::Enforcer => "tc",
        Filter::NftSets => "nft_sets",
        Filter::NftLinear => "nft_linear",
        Filter::Unfiltered => "unfiltered",
    }
}

fn median_f64(mut samples: Vec<f64>) -> f64 {
    samples.sort_by(f64::total_cmp);
    samples[samples.len() / 2]
}

/// The first pod of `model` behind the virtual node's trunk, its traffic judged by nothing,
/// the enforcer, or its groups as nftables rules; every filter measured in every round, so
/// that drift on a shared machine hits them all alike.
fn throughput(rng: &mut Rng, model: &Model, quick: bool) -> Result<Throughput> {
    // A run's budget is CPU time, as the kernel times the generator's runs.
    let (repeats, budget, pool) = if quick {
        (3, Duration::from_millis(250), 60_000)
    } else {
        (5, Duration::from_secs(1), 200_000)
    };
    // One pod takes every new flow: its allowance is the whole table here, so
    // the run measures the path, not the per-pod cap (`maxFlowsPerPod`).
    let model = &Model {
        node: NodeConfig {
            max_flows_per_pod: enforcer_common::MAX_FLOWS,
            ..model.node.clone()
        },
        ..model.clone()
    };
    let (flows, established) = throughput::new_flows(rng, model, pool)?;
    let checks = throughput::spot_check_frames(rng, model, 100);
    let mut bed = Bed::build(model)?;
    let stored_flows = bed.store(&flows)?;
    let stored_established = bed.store(std::slice::from_ref(&established))?;

    // The same frames, the same verdicts: the evaluator's, for every filter.
    let frames: Vec<Vec<u8>> = checks.iter().map(|(f, _)| f.clone()).collect();
    let frames = bed.store(&frames)?;
    for filter in Filter::ALL {
        bed.install(filter)?;
        bed.forget_flows()?;
        let delivered = bed.deliveries(&frames);
        bed.remove(filter)?;
        let delivered = delivered?;
        for (frame, allowed) in &checks {
            let key = throughput::flow_key(frame, 18).context("a spot-check frame's key")?;
            let expected = *allowed || filter == Filter::Unfiltered;
            if delivered.contains(&key) != expected {
                bail!(
                    "{}: frame {frame:02x?} was {}delivered; the pod's groups {} it",
                    filter.name(),
                    if expected { "not " } else { "" },
                    if *allowed { "allow" } else { "deny" }
                );
            }
        }
    }

    let conntrack_memory = || -> Result<u64> {
        Ok(map_memory()?
            .get(map_names::CONNTRACK)
            .copied()
            .unwrap_or_default())
    };
    let mut conntrack_growth = (0, 0);
    let mut new_runs: Vec<Vec<f64>> = vec![Vec::new(); Filter::ALL.len()];
    let mut established_runs: Vec<Vec<f64>> = vec![Vec::new(); Filter::ALL.len()];
    for _ in 0..repeats {
        for (i, filter) in Filter::ALL.into_iter().enumerate() {
            bed.install(filter)?;
            let measured = (|| -> Result<(f64, f64)> {
                bed.forget_flows()?;
                let (tracked_before, new_before) = bed.tracked_counts(filter)?;
                let memory_before = conntrack_memory()?;
                let run = bed.run(&stored_flows, false, budget)?;
                let (tracked_after, new_after) = bed.tracked_counts(filter)?;
                if filter == Filter::Enforcer {
                    let grown = conntrack_memory()?.saturating_sub(memory_before);
                    conntrack_growth = (grown, bed.tracked_flows()?);
                }
                if run.received * 2 < run.sent {
                    bail!(
                        "{}: {} of {} new flows arrived",
                        filter.name(),
                        run.received,
                        run.sent
                    );
                }
                if tracked_after != tracked_before
                    || (matches!(
                        filter,
                        Filter::Enforcer | Filter::EnforcerXdp | Filter::EnforcerXdpHook
                    ) && new_after - new_before < run.received)
                {
                    bail!(
                        "{}: {} new flows arrived, judged new {}, tracked {}",
                        filter.name(),
                        run.received,
                        new_after - new_before,
                        tracked_after - tracked_before
                    );
                }
                bed.forget_flows()?;
                bed.establish(&established, &stored_established)?;
                let (tracked_before, _) = bed.tracked_counts(filter)?;
                let one = bed.run(&stored_established, true, budget / 2)?;
                let (tracked_after, _) = bed.tracked_counts(filter)?;
                if filter != Filter::Unfiltered && tracked_after - tracked_before < one.received {
                    bail!(
                        "{}: the established flow was not judged as tracked",
                        filter.name()
                    );
                }
                Ok((run.pps(), one.pps()))
            })();
            bed.remove(filter)?;
            let (new, est) = measured?;
            new_runs[i].push(new);
            established_runs[i].push(est);
        }
    }
    // Floods the filters drop: new flows the pod's groups refuse, and frames of a VLAN no
    // pod has; frames per second of one CPU.
    let denied = throughput::denied_flows(rng, model, FLOOD_FRAMES)?;
    let unknown = throughput::on_unknown_vlan(model, &denied)?;
    let stored_denied = bed.store(&denied)?;
    let stored_unknown = bed.store(&unknown)?;
    let mut flood_runs: Vec<[Vec<f64>; 2]> = vec![[Vec::new(), Vec::new()]; FLOOD_FILTERS.len()];
    for _ in 0..repeats {
        for (i, filter) in FLOOD_FILTERS.into_iter().enumerate() {
            bed.install(filter)?;
            let measured = (|| -> Result<[f64; 2]> {
                bed.forget_flows()?;
                let denied = bed.run(&stored_denied, true, budget / 2)?;
                let unknown = bed.run(&stored_unknown, true, budget / 2)?;
                for (what, run) in [("refused flows", &denied), ("unknown VLAN", &unknown)] {
                    if run.received > 0 {
                        bail!(
                            "{}: {} frames of the {what} flood reached the pod",
                            filter.name(),
                            run.received
                        );
                    }
                }
                Ok([denied.sent_pps(), unknown.sent_pps()])
            })();
            bed.remove(filter)?;
            let [denied, unknown] = measured?;
            flood_runs[i][0].push(denied);
            flood_runs[i][1].push(unknown);
        }
    }
    // Where a dropped frame's time goes: the enforcer's first program, timed by the kernel
    // (in a round of its own: run statistics cost each run two clock reads), and the rest,
    // the frame's way into the kernel and, without XDP, its skb and the stack up to TC.
    let mut flood_program_ns = Vec::new();
    {
        let _stats = aya::sys::enable_stats(aya::sys::Stats::RunTime)
            .context("enabling BPF run statistics")?;
        for filter in [Filter::EnforcerXdp, Filter::Enforcer] {
            bed.install(filter)?;
            let measured = (|| -> Result<(f64, f64)> {
                bed.forget_flows()?;
                let (time, count) = bed.first_program_runs(filter)?;
                let run = bed.run(&stored_denied, true, budget / 2)?;
                let (time_after, count_after) = bed.first_program_runs(filter)?;
                if count_after - count < run.sent {
                    bail!(
                        "{}: the program ran {} times for {} frames",
                        filter.name(),
                        count_after - count,
                        run.sent
                    );
                }
                let program = (time_after - time).as_nanos() as f64 / (count_after - count) as f64;
                Ok((1e9 / run.sent_pps(), program))
            })();
            bed.remove(filter)?;
            flood_program_ns.push((filter, measured?));
        }
    }
    let deny_flood = FLOOD_FILTERS
        .into_iter()
        .zip(flood_runs)
        .map(|(filter, [denied, unknown])| (filter, [median_f64(denied), median_f64(unknown)]))
        .collect();
    let by_filter = |runs: Vec<Vec<f64>>| -> Vec<(Filter, f64)> {
        Filter::ALL
            .into_iter()
            .zip(runs.into_iter().map(median_f64))
            .collect()
    };
    Ok(Throughput {
        deny_flood,
        flood_program_ns,
        new_flows: by_filter(new_runs),
        established: by_filter(established_runs),
        repeats,
        linear_rules: bed.linear.rules,
        set_elements: bed.sets.elements,
        spot_checked: (
            checks.iter().filter(|(_, allowed)| *allowed).count(),
            checks.iter().filter(|(_, allowed)| !*allowed).count(),
        ),
        conntrack_growth,
    })
}

fn main() -> Result<()> {
    let options = options()?;
    let samples = if options.quick { 400 } else { 4000 };
    let apply_repeats = if options.quick { 1 } else { 5 };
    let mut rng = Rng::new(SEED);

    let mut new_flow = serde_json::Map::new();
    let mut new_flow_rows = Vec::new();
    let mut table = Vec::new();
    let mut established_ns = 0.0;
    let mut established_xdp_ns = 0.0;
    let (mut deny_xdp_ns, mut deny_tc_warm_ns) = (0.0, 0.0);
    let mut floor_frame = Vec::new();
    // Every scale's kernel is loaded first and the rows sampled in turn, a warm sample of
    // each per round: the machine's slow spells (a shared host's) then fall on every row
    // alike, where rows measured one after the other each drew their own.
    let mut rows = Vec::new();
    for (rules, groups, per_group) in SCALES {
        let model = scale_model(&mut rng, PODS, groups, per_group);
        let mut kernel = Kernel::load(&model);
        let mut frames = Vec::new();
        for (what, frame) in probe_frames(&mut rng, &model) {
            kernel.maps.forget_flows(|_| true)?;
            let outcome = kernel.run(Direction::Ingress, &frame);
            let expected = if what == "deny" {
                Reason::DropPolicy
            } else {
                Reason::PassNew
            };
            if outcome.reason != expected {
                bail!(
                    "{rules} rules, {what}: the kernel said {:?}, not {expected:?}",
                    outcome.reason
                );
            }
            frames.push((what, frame));
        }
        rows.push((rules, kernel, frames));
    }
    let mut times: Vec<Vec<Vec<Duration>>> = rows
        .iter()
        .map(|(_, _, frames)| vec![Vec::with_capacity(samples); frames.len()])
        .collect();
    for _ in 0..samples {
        for ((_, kernel, frames), times) in rows.iter_mut().zip(&mut times) {
            for ((_, frame), times) in frames.iter().zip(times.iter_mut()) {
                // Untimed first: the row before ran another kernel, out of the caches.
                new_flow_time(kernel, frame);
                times.push(new_flow_time(kernel, frame));
            }
        }
    }
    for ((rules, kernel, frames), times) in rows.iter_mut().zip(times) {
        let rules = *rules;
        let mut worst: f64 = 0.0;
        for ((what, frame), times) in frames.iter().zip(times) {
            let (ns, p99) = median_and_p99(times);
            table.push(format!(
                "new flow, {rules:>3} rules/pod, {what:<10} {ns:>8.0} ns  (p99 {p99:.0} ns)"
            ));
            new_flow_rows.push(json!({"rules": rules, "row": what, "p50_ns": ns, "p99_ns": p99}));
            worst = worst.max(ns);
            if rules == 960 && *what == "first rule" {
                kernel.maps.forget_flows(|_| true)?;
                let _ = kernel.run(Direction::Ingress, frame);
                established_ns = median(
                    (0..samples)
                        .map(|_| kernel.time(Direction::Ingress, frame))
                        .collect(),
                );
                established_xdp_ns = median((0..samples).map(|_| kernel.time_xdp(frame)).collect());
                floor_frame = frame.clone();
            }
            if rules == 960 && *what == "deny" {
                deny_xdp_ns = median((0..samples).map(|_| kernel.time_xdp(frame)).collect());
                deny_tc_warm_ns = median(
                    (0..samples)
                        .map(|_| kernel.time(Direction::Ingress, frame))
                        .collect(),
                );
            }
        }
        new_flow.insert(rules.to_string(), json!(worst));
    }
    drop(rows);
    let floor = floor_ns(&floor_frame, 1, samples)?;
    let (plain_ns, translated_ns) = nat_costs(samples)?;

    // Control plane at full scale: from a parsed state to an enforcing kernel.
    let big = scale_model(&mut rng, PODS, 16, 60);
    let empty = Model {
        pods: Vec::new(),
        ..big.clone()
    };
    let mut full = Vec::new();
    let mut incremental = Vec::new();
    // (compile, maps) of each apply.
    let mut full_parts = (Vec::new(), Vec::new());
    let mut incremental_parts = (Vec::new(), Vec::new());
    let mut memory = BTreeMap::new();
    let mut entries = [0; 3];
    for _ in 0..apply_repeats {
        let mut kernel = Kernel::load(&empty);
        let started = Instant::now();
        let times = kernel.apply(&big);
        full.push(started.elapsed());
        full_parts.0.push(times.compile);
        full_parts.1.push(times.maps);
        memory = map_memory()?;
        let compiled = &kernel.compiled;
        entries = [
            compiled.policies.values().map(|p| p.v4.len()).sum(),
            compiled.policies.values().map(|p| p.v6.len()).sum(),
            compiled.classes.values().map(|c| c.len()).sum(),
        ];
        let mut changed = big.clone();
        let shared = changed
            .groups
            .get_mut(&big.pods[0].groups[0])
            .expect("group 0");
        shared.ingress[0].l4 = L4Match::Ports {
            protocol: 6,
            from: 8443,
            to: 8443,
        };
        let started = Instant::now();
        let times = kernel.apply(&changed);
        incremental.push(started.elapsed());
        incremental_parts.0.push(times.compile);
        incremental_parts.1.push(times.maps);
    }
    let ms = |d: Vec<Duration>| median(d) / 1e6;
    let full_split = [ms(full_parts.0), ms(full_parts.1)];
    let change_split = [ms(incremental_parts.0), ms(incremental_parts.1)];
    let tput = throughput(&mut rng, &big, options.quick)?;
    let (full_ms, change_ms) = (ms(full), ms(incremental));
    // The conntrack's memory follows the flows tracked: what one costs, and the table full.
    let (grown, tracked) = tput.conntrack_growth;
    let per_flow = grown as f64 / tracked.max(1) as f64;
    let conntrack_full = memory
        .get(map_names::CONNTRACK)
        .copied()
        .unwrap_or_default() as f64
        + per_flow * f64::from(MAX_FLOWS);

    let report = json!({
        "floor_ns": floor,
        "established_ns": established_ns,
        "established_xdp_ns": established_xdp_ns,
        "nat_established_ns": {"plain": plain_ns, "translated": translated_ns},
        "deny_warm_ns": {"tc": deny_tc_warm_ns, "xdp": deny_xdp_ns},
        "new_flow_ns": new_flow,
        "new_flow_rows": new_flow_rows,
        "throughput": {
            "rules": 960,
            "unfiltered_pps": tput.new_pps(Filter::Unfiltered),
            "enforcer_pps": tput.new_pps(Filter::Enforcer),
            "enforcer_xdp_pps": tput.new_pps(Filter::EnforcerXdp),
            "enforcer_xdp_pass_all_pps": tput.new_pps(Filter::EnforcerXdpHook),
            "nft_linear_pps": tput.new_pps(Filter::NftLinear),
            "nft_sets_pps": tput.new_pps(Filter::NftSets),
            "established": {
                "unfiltered_pps": tput.established_pps(Filter::Unfiltered),
                "enforcer_pps": tput.established_pps(Filter::Enforcer),
                "enforcer_xdp_pps": tput.established_pps(Filter::EnforcerXdp),
                "enforcer_xdp_pass_all_pps": tput.established_pps(Filter::EnforcerXdpHook),
                "nft_linear_pps": tput.established_pps(Filter::NftLinear),
                "nft_sets_pps": tput.established_pps(Filter::NftSets),
            },
        },
        "deny_flood_pps": {
            "refused_flows": FLOOD_FILTERS.iter().map(|&f| (flood_key(f).to_string(), json!(tput.flood_pps(f, 0)))).collect::<serde_json::Map<_, _>>(),
            "refused_flow_frame_ns": tput.flood_program_ns.iter().map(|(f, (frame, program))| (flood_key(*f).to_string(), json!({"frame": frame, "first_program": program}))).collect::<serde_json::Map<_, _>>(),
            "unknown_vlan": FLOOD_FILTERS.iter().map(|&f| (flood_key(f).to_string(), json!(tput.flood_pps(f, 1)))).collect::<serde_json::Map<_, _>>(),
        },
        "apply_ms": {"pods": PODS, "rules_per_pod": 960, "full": full_ms, "one_group_change": change_ms,
            "full_compile": full_split[0], "full_maps": full_split[1],
            "one_group_change_compile": change_split[0], "one_group_change_maps": change_split[1]},
        "memory_bytes": {"maps": memory.values().sum::<u64>(), "by_map": memory,
            "conntrack_per_flow": per_flow, "conntrack_full": conntrack_full},
        "entries": {"peers_v4": entries[0], "peers_v6": entries[1], "port_ranges": entries[2]},
    });
    std::fs::write(&options.json, serde_json::to_string_pretty(&report)? + "\n")
        .with_context(|| format!("writing {}", options.json.display()))?;

    println!("floor (parse + one VLAN lookup)         {floor:>8.0} ns");
    println!(
        "established flow, 960 rules/pod         {established_ns:>8.0} ns  ({:.2}x floor)",
        established_ns / floor
    );
    println!("established flow, 960 rules/pod, XDP    {established_xdp_ns:>8.0} ns");
    println!(
        "established egress, standard mode: plain {plain_ns:.0} ns, source-NATed {translated_ns:.0} ns ({:.2}x)",
        translated_ns / plain_ns
    );
    for line in &table {
        println!("{line}");
    }
    println!(
        "denied flow again (warm), 960 rules/pod: TC {deny_tc_warm_ns:.0} ns, XDP {deny_xdp_ns:.0} ns"
    );
    let ratio = new_flow["960"].as_f64().unwrap_or(0.0) / new_flow["1"].as_f64().unwrap_or(1.0);
    println!("new flow worst case, 960 vs 1 rule/pod  {ratio:.2}x");
    println!(
        "apply {PODS} pods x 960 rules: full {full_ms:.0} ms, one shared group changed {change_ms:.0} ms"
    );
    println!(
        "  medians of compile + map writes: full {:.0} + {:.0} ms, one group {:.0} + {:.0} ms",
        full_split[0], full_split[1], change_split[0], change_split[1]
    );
    let mib = |bytes: u64| bytes as f64 / (1 << 20) as f64;
    println!(
        "map memory {:.1} MiB; entries: peers IPv4 {}, peers IPv6 {}, port ranges {}",
        mib(memory.values().sum()),
        entries[0],
        entries[1],
        entries[2]
    );
    let mut largest: Vec<(&String, &u64)> = memory.iter().collect();
    largest.sort_by(|a, b| b.1.cmp(a.1));
    let largest: Vec<String> = largest
        .iter()
        .take(8)
        .map(|(name, bytes)| format!("{name} {:.1}", mib(**bytes)))
        .collect();
    println!("  largest maps, MiB: {}", largest.join(", "));
    println!(
        "  conntrack: {per_flow:.0} bytes a tracked flow ({tracked} flows measured); {:.1} MiB with all {MAX_FLOWS} tracked",
        conntrack_full / (1 << 20) as f64
    );
    println!(
        "throughput through the trunk, 960 rules/pod, median of {} (spot check: {} allowed and {} denied frames, same verdicts):",
        tput.repeats, tput.spot_checked.0, tput.spot_checked.1
    );
    println!(
        "  {:<40} {:>12} {:>14}",
        "filter", "new flows/s", "established/s"
    );
    for filter in Filter::ALL {
        let label = match filter {
            Filter::NftLinear => format!("{} ({} rules)", filter.name(), tput.linear_rules),
            Filter::NftSets => format!("{} ({} elements)", filter.name(), tput.set_elements),
            _ => filter.name().to_string(),
        };
        println!(
            "  {label:<40} {:>12.0} {:>14.0}",
            tput.new_pps(filter),
            tput.established_pps(filter)
        );
    }
    let enforcer_pps = tput.new_pps(Filter::Enforcer);
    for (filter, target) in [(Filter::NftLinear, 2.0), (Filter::NftSets, 0.95)] {
        let ratio = enforcer_pps / tput.new_pps(filter);
        println!(
            "enforcer / {:<16} new flows {ratio:.2}x (target >= {target}: {})",
            filter.name(),
            if ratio >= target { "met" } else { "missed" }
        );
    }
    println!(
        "floods dropped, frames/s of one CPU, median of {}:",
        tput.repeats
    );
    println!(
        "  {:<40} {:>14} {:>14}",
        "filter", "refused flows", "unknown VLAN"
    );
    for filter in FLOOD_FILTERS {
        println!(
            "  {:<40} {:>14.0} {:>14.0}",
            filter.name(),
            tput.flood_pps(filter, 0),
            tput.flood_pps(filter, 1)
        );
    }
    for (filter, (frame, program)) in &tput.flood_program_ns {
        println!(
            "  a refused flow's frame, {:<16} {frame:>6.0} ns: the enforcer's first program {program:.0} ns, the rest {:.0} ns",
            filter.name(),
            frame - program
        );
    }
    for (versus, target) in [(Filter::NftSets, 5.0), (Filter::Enforcer, 2.0)] {
        let ratio = tput.flood_pps(Filter::EnforcerXdp, 0) / tput.flood_pps(versus, 0);
        println!(
            "xdp / {:<22} refused flows {ratio:.2}x (target >= {target}: {})",
            versus.name(),
            if ratio >= target { "met" } else { "missed" }
        );
    }
    for (what, pps) in [
        (
            "new flows",
            Throughput::new_pps as fn(&Throughput, Filter) -> f64,
        ),
        ("established", Throughput::established_pps),
    ] {
        let ratio = pps(&tput, Filter::EnforcerXdp) / pps(&tput, Filter::Enforcer);
        let hook = pps(&tput, Filter::EnforcerXdpHook) / pps(&tput, Filter::Enforcer);
        println!(
            "allowed {what} with xdp / without {ratio:.2}x (target >= 0.95: {}): the driver's XDP hook alone {hook:.2}x, the screen {:.2}x",
            if ratio >= 0.95 { "met" } else { "missed" },
            ratio / hook
        );
    }
    println!("report written to {}", options.json.display());
    Ok(())
}
