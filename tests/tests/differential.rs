//! The kernel against the reference: for random policies and random frames
//! (both directions, both modes, IPv4/IPv6, every protocol kind, tagged and
//! untagged, truncated), the kernel's verdict *and reason* must equal what the
//! reference evaluator and the conntrack model (`enforcer::flow`) predict, and
//! the conntrack entry the kernel holds must equal the model's.
//!
//! Seeded and reproducible: `ENFORCER_DIFF_SEED=<n>` replays one run;
//! `ENFORCER_DIFF_PACKETS=<n>` changes the packet count (100,000 by default).

use std::net::IpAddr;

use enforcer::eval::{self, Reason as EvalReason, Refused};
use enforcer::flow::{FlowTable, FlowVerdict, PacketMeta, flow_key};
use enforcer::model::{BranchPod, Direction, Model};
use enforcer_common::{CtEntry, Reason, V4_MAPPED_PREFIX};
use enforcer_tests::frame::{L4, Tag};
use enforcer_tests::kernel::{Kernel, Outcome};
use enforcer_tests::oracle;
use enforcer_tests::random::{Case, CaseGenerator, Rng, random_model};

const DEFAULT_SEED: u64 = 0x5eed_c0de;
const DEFAULT_PACKETS: u64 = 100_000;
/// Packets per random model; a new model every so often widens the policy coverage.
const PACKETS_PER_MODEL: u64 = 4_000;

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .map(|v| {
            v.parse()
                .unwrap_or_else(|_| panic!("{name}={v} is not a number"))
        })
        .unwrap_or(default)
}

/// CLOCK_MONOTONIC, the clock `bpf_ktime_get_ns` reads.
fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: valid pointer to a timespec.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    assert_eq!(rc, 0, "clock_gettime");
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

fn packet_meta(case: &Case) -> PacketMeta {
    let ip = case.ip.as_ref().expect("an IP case");
    oracle::packet_meta(
        case.direction,
        ip,
        case.quoted.as_ref(),
        case.frame.len() as u32,
    )
}

fn pod_address(pod: &BranchPod, addr: IpAddr) -> bool {
    pod.addresses().any(|a| a == addr)
}

/// What the kernel must do with `case`, from the spec and the reference
/// models; updates `flows` like the kernel updates its conntrack.
fn expected(model: &Model, flows: &mut FlowTable, case: &Case, now_ns: u64) -> Reason {
    let vlan = match case.tag {
        Tag::Untagged => return Reason::PassUntagged,
        Tag::Vlan(vlan) => vlan,
        Tag::Stacked(..) | Tag::Priority(_) => unreachable!("not generated"),
    };
    if case.truncated && case.frame.len() < 18 {
        return Reason::DropMalformed;
    }
    let Some(pod) = model.pods.iter().find(|p| p.vlan == vlan) else {
        return Reason::DropUnknownVlan;
    };
    if case.truncated {
        return Reason::DropMalformed;
    }
    let Some(ip) = case.ip else {
        // ARP: the frame carries the sender at bytes 32..36 (after an 18-byte tagged header).
        let sender: [u8; 4] = case.frame[18 + 14..18 + 18].try_into().expect("4 bytes");
        let own = pod.ipv4.is_some_and(|a| a.octets() == sender);
        return if case.direction == Direction::Egress && !own {
            Reason::DropSpoofed
        } else {
            Reason::PassLinkLayer
        };
    };
    let pod_side = match case.direction {
        Direction::Ingress => ip.dst,
        Direction::Egress => ip.src,
    };
    if let (L4::Icmp { icmp_type, .. }, IpAddr::V6(src), IpAddr::V6(dst)) = (ip.l4, ip.src, ip.dst)
        && eval::neighbour_discovery(pod, case.direction, src, dst, 64, icmp_type)
    {
        return Reason::PassLinkLayer;
    }
    if !pod_address(pod, pod_side) {
        return Reason::DropSpoofed;
    }
    match flows.process(model, pod, packet_meta(case), now_ns) {
        FlowVerdict::Established(_) => Reason::PassEstablished,
        FlowVerdict::Related => Reason::PassRelated,
        FlowVerdict::New { evaluation, .. } => match evaluation.reason {
            EvalReason::Unfiltered(_) => Reason::PassUnfiltered,
            EvalReason::SameNode => Reason::PassSameNode,
            EvalReason::Allowed => Reason::PassNew,
            EvalReason::NoRule { .. } => unreachable!("an allowed flow"),
        },
        FlowVerdict::OverLimit(_) => Reason::DropFlowLimit,
        FlowVerdict::Denied(evaluation) => match evaluation.reason {
            EvalReason::NoRule {
                refused: Refused::Primary,
            } => Reason::DropPrimaryPolicy,
            _ => Reason::DropPolicy,
        },
    }
}

/// The kernel entry with the fields the model cannot know (timestamps) cleared.
fn comparable(mut entry: CtEntry) -> CtEntry {
    entry.created_ns = 0;
    entry.last_seen_ns = 0;
    entry
}

#[test]
fn kernel_verdicts_equal_the_reference_on_random_policies_and_packets() {
    let seed = env_u64("ENFORCER_DIFF_SEED", DEFAULT_SEED);
    let packets = env_u64("ENFORCER_DIFF_PACKETS", DEFAULT_PACKETS);
    eprintln!("differential: seed {seed:#x}, {packets} packets");
    let mut rng = Rng::new(seed);
    let mut model = random_model(&mut rng);
    let mut kernel = Kernel::load(&model);
    let mut flows = FlowTable::new();
    let mut cases = CaseGenerator::new();
    let mut seen = std::collections::BTreeMap::<String, u64>::new();
    for n in 0..packets {
        if n > 0 && n % PACKETS_PER_MODEL == 0 {
            // A fresh policy and an empty tracker, so flows of one model
            // never meet the next one's rules.
            model = random_model(&mut rng);
            kernel.apply(&model);
            kernel.maps.forget_flows(|_| true).expect("clear conntrack");
            flows = FlowTable::new();
            cases = CaseGenerator::new();
        }
        let case = cases.next(&mut rng, &model);
        let now = monotonic_ns();
        let want = expected(&model, &mut flows, &case, now);
        let got = kernel.run(case.direction, &case.frame);
        let context = || {
            format!(
                "packet #{n} (seed {seed:#x}): {case:?}\nframe {:02x?}\nmodel {model:#?}",
                case.frame
            )
        };
        assert_eq!(
            got,
            Outcome {
                passed: !want.is_drop(),
                reason: want
            },
            "kernel and reference disagree on {}",
            context()
        );
        *seen.entry(format!("{want:?}")).or_default() += 1;
        if let (Some(pod), Some(ip)) = (
            model.pods.iter().find(|p| Tag::Vlan(p.vlan) == case.tag),
            case.ip,
        ) && !want.is_drop()
            && !case.truncated
            && !(ip.src.is_ipv6() && pod_side_is_mapped(&ip))
        {
            let key = flow_key(pod.vlan, &packet_meta(&case));
            let kernel_entry = kernel.maps.flow(&key).expect("read conntrack");
            let model_entry = flows.get(&key).map(|e| e.to_kernel(&kernel.compiled));
            assert_eq!(
                kernel_entry.map(comparable),
                model_entry.map(comparable),
                "conntrack entries differ for {key:?} after {}",
                context()
            );
        }
    }
    eprintln!("differential: reasons seen {seen:?}");
    for reason in [
        Reason::PassNew,
        Reason::PassEstablished,
        Reason::PassRelated,
        Reason::DropPolicy,
        Reason::DropPrimaryPolicy,
        Reason::PassUnfiltered,
        Reason::PassSameNode,
        Reason::DropSpoofed,
        Reason::DropMalformed,
        Reason::DropUnknownVlan,
        Reason::PassUntagged,
        Reason::PassLinkLayer,
    ] {
        assert!(
            seen.get(&format!("{reason:?}")).copied().unwrap_or(0) >= packets / 1000,
            "the generator hardly reaches {reason:?}: {seen:?}"
        );
    }
}

/// An IPv6 packet whose addresses are IPv4-mapped has no meaningful flow key to compare.
fn pod_side_is_mapped(ip: &enforcer_tests::frame::Ip) -> bool {
    [ip.src, ip.dst].iter().any(|a| match a {
        IpAddr::V6(v6) => v6.octets()[..12] == V4_MAPPED_PREFIX,
        IpAddr::V4(_) => false,
    })
}
