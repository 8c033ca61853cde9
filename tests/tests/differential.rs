//! The kernel against the reference: for random policies and random frames
//! (both directions, both modes, IPv4/IPv6, every protocol kind, fragments,
//! extension header chains, tag tricks, frames cut at any byte, malformed
//! fields, neighbour discovery; outer tags inline or, for a third of the
//! frames that have one, in skb metadata; the generator's shares are in
//! `enforcer_tests::random`), the kernel's verdict *and reason* must equal what
//! the frame-stage oracle (`enforcer_tests::frame_oracle`, written from the
//! standards, not from the kernel's parser), the reference evaluator and the
//! conntrack model (`enforcer::policy::flow`) predict, and the conntrack entry the
//! kernel holds must equal the model's. Some models get small flow and
//! fragment allowances, so the limits are compared too. Some pods are audited:
//! a frame their groups refuse passes, counted as "would drop" under its
//! reason, and leaves no conntrack entry. Frames arriving on the trunk go
//! through the XDP program (its screen, then TC for what it passes) or TC alone, in turn.
//!
//! Standard mode's source NAT: a frame the reference says leaves translated must
//! leave redirected, as [`nat_oracle`] says a translated frame looks, with the
//! mapping the model holds in `NAT_PORTS`; its peer's answer and an ICMP error
//! quoting it then go through the primary interface's program, must come back
//! as the pod's (built anew with every checksum computed whole), and are judged
//! at the trunk as the model judges them. Some models get a port range of one to
//! three ports (collisions and exhaustion), external SNAT, or an excluded CIDR.
//!
//! Seeded and reproducible: `ENFORCER_DIFF_SEED=<n>` replays one run;
//! `ENFORCER_DIFF_PACKETS=<n>` changes the packet count (100,000 by default).
//! The test prints how many frames took each path of the frame stage, each
//! generator kind and each reason, and fails if any got none.

use std::collections::BTreeMap;

use std::net::{IpAddr, Ipv4Addr};

use enforcer::model::{Direction, EnforcingAction, Model, UnknownVlanAction};
use enforcer::policy::flow::{FlowTable, nat_key};
use enforcer_common::{CtEntry, CtKey, Reason};
use enforcer_tests::frame::{self, Ip, L4, TCP_ACK, Tag};
use enforcer_tests::frame_oracle::{FrameOracle, PATHS};
use enforcer_tests::kernel::{IngressPath, Kernel, Outcome, TC_ACT_REDIRECT};
use enforcer_tests::models::NODE_IP;
use enforcer_tests::nat_oracle;
use enforcer_tests::random::{CaseGenerator, Kind, Rng, change_ports, random_model};

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
    enforcer::observe::events::monotonic().as_nanos() as u64
}

/// The kernel entry with the fields the model cannot know (timestamps) cleared.
fn comparable(mut entry: CtEntry) -> CtEntry {
    entry.created_ns = 0;
    entry.last_seen_ns = 0;
    entry
}

/// Whether the pod of `frame`'s outer tag (inline in the generated frame) is audited.
fn audited(model: &Model, frame: &[u8]) -> bool {
    let Some(tci) = frame.get(14..16) else {
        return false;
    };
    let vlan = u16::from_be_bytes([tci[0], tci[1]]) & 0x0fff;
    model
        .pods
        .iter()
        .any(|p| p.vlan == vlan && p.action == EnforcingAction::Audit)
}

/// The `index`th model: one in four lets unknown VLANs pass, one in three
/// has a small flow allowance and one in two a small fragment allowance, so
/// that those verdicts come up within a model's packets. Source NAT: one in
/// five has one to three ports, one in seven external SNAT, one in six the
/// upper half of IPv4 excluded.
fn next_model(rng: &mut Rng, index: u64) -> Model {
    let mut model = random_model(rng);
    if index % 5 == 4 {
        let first = *model.node.snat_port_range.start();
        model.node.snat_port_range = first..=first + rng.below(3) as u16;
    }
    if index % 7 == 5 {
        model.node.external_snat = true;
    }
    if index % 6 == 3 {
        model.node.exclude_snat_cidrs = vec!["128.0.0.0/1".parse().expect("a CIDR")];
    }
    if index % 4 == 1 {
        model.node.unknown_vlan = UnknownVlanAction::Pass;
    }
    if index % 3 == 2 {
        model.node.max_flows_per_pod = 1 + rng.below(40) as u32;
    }
    if index % 2 == 1 {
        model.node.max_fragments_per_pod = 1 + rng.below(6) as u32;
    }
    model
}

#[test]
fn kernel_verdicts_equal_the_reference_on_random_policies_and_packets() {
    let seed = env_u64("ENFORCER_DIFF_SEED", DEFAULT_SEED);
    let packets = env_u64("ENFORCER_DIFF_PACKETS", DEFAULT_PACKETS);
    eprintln!("differential: seed {seed:#x}, {packets} packets");
    let mut rng = Rng::new(seed);
    let mut model = next_model(&mut rng, 0);
    let mut kernel = Kernel::load(&model);
    let mut flows = FlowTable::new();
    let mut oracle = FrameOracle::new();
    let mut cases = CaseGenerator::new();
    let mut reasons = BTreeMap::<&str, u64>::new();
    let mut paths: BTreeMap<&str, u64> = PATHS.iter().map(|p| (*p, 0)).collect();
    let mut placements = BTreeMap::<&str, u64>::new();
    let mut programs = BTreeMap::<String, u64>::new();
    let mut on_audited = BTreeMap::<&str, u64>::new();
    let mut kinds: BTreeMap<Kind, u64> = Kind::SHARES.iter().map(|(k, _)| (*k, 0)).collect();
    let mut translated = BTreeMap::<u8, u64>::new();
    for n in 0..packets {
        if n > 0 && n % PACKETS_PER_MODEL == 0 {
            // A fresh policy and empty tables, so flows and datagrams of one
            // model never meet the next one's rules.
            model = next_model(&mut rng, n / PACKETS_PER_MODEL);
            kernel.apply(&model);
            // Then one rule's ports changed: its classes' tables switched in place, the
            // policies kept (an RNG of its own keeps the models' sequence).
            model = change_ports(&mut Rng::new(seed ^ n), &model);
            kernel.apply(&model);
            kernel.maps.forget_flows(|_| true).expect("clear conntrack");
            kernel
                .maps
                .forget_fragments(|_| true)
                .expect("clear fragments");
            flows = FlowTable::new();
            oracle.clear();
            cases = CaseGenerator::new();
        }
        let case = cases.next(&mut rng, &model);
        let now = monotonic_ns();
        // XDP sees only inline tags: frames whose tag is in metadata go to TC.
        let path = if n % 2 == 0 {
            IngressPath::Xdp
        } else {
            IngressPath::Tc
        };
        let (want, got, program) = if case.metadata {
            // What the fast path sees: the outer tag's VLAN ID in metadata, the bytes without it.
            let vid = u16::from_be_bytes([case.frame[14], case.frame[15]]) & 0x0fff;
            let mut seen = case.frame.clone();
            seen.drain(12..16);
            let want = oracle.judge(&model, &mut flows, &seen, Some(vid), case.direction, now);
            (
                want,
                kernel.run_tag_in_metadata(case.direction, &case.frame),
                format!("{:?} TC", case.direction),
            )
        } else {
            let want = oracle.judge(&model, &mut flows, &case.frame, None, case.direction, now);
            match case.direction {
                Direction::Ingress => (
                    want,
                    kernel.run_ingress(path, &case.frame),
                    format!("Ingress {path:?}"),
                ),
                Direction::Egress => (
                    want,
                    kernel.run(Direction::Egress, &case.frame),
                    "Egress TC".to_string(),
                ),
            }
        };
        *programs.entry(program).or_default() += 1;
        *placements
            .entry(if case.metadata {
                "tag in metadata"
            } else {
                "tag inline or none"
            })
            .or_default() += 1;
        let context = || {
            format!(
                "packet #{n} (seed {seed:#x}), path {:?}: {case:?}\nframe {:02x?}\nmodel {model:#?}",
                want.path, case.frame
            )
        };
        let audited = audited(&model, &case.frame);
        let expected = Outcome {
            redirected: want.nat_port != 0,
            ..Outcome::expected(want.reason, audited)
        };
        assert_eq!(
            got,
            expected,
            "kernel and reference disagree on {}",
            context()
        );
        // The frame as the pod sent it, without the tag the translation drops.
        let mut seen = case.frame.clone();
        seen.drain(12..16.min(seen.len()));
        if want.nat_port != 0 {
            nat_oracle::check_source_translation(
                &seen,
                &kernel.last_output(),
                NODE_IP,
                want.nat_port,
            )
            .unwrap_or_else(|e| panic!("translated frame wrong: {e}\n{}", context()));
        }
        if want.nat_port != 0 && want.reason == Reason::PassRelated {
            *translated.entry(0).or_default() += 1;
        } else if want.nat_port != 0 {
            let key = want.flow.expect("a translated frame has a flow");
            *translated.entry(key.protocol).or_default() += 1;
            let mapping = nat_key(&key, want.nat_port);
            let target = kernel
                .maps
                .nat_mapping(&mapping)
                .expect("read NAT_PORTS")
                .unwrap_or_else(|| panic!("no kernel mapping {mapping:?} after {}", context()));
            assert_eq!(
                (
                    Some(&target.flow),
                    &target.pod_mac[..],
                    &target.router_mac[..]
                ),
                (flows.nat_target(&mapping), &seen[6..12], &seen[0..6]),
                "mappings differ after {}",
                context()
            );
            let error_translated = returns(
                &kernel,
                &model,
                &mut flows,
                &mut oracle,
                &key,
                want.nat_port,
                &seen,
                path,
                now,
            );
            if error_translated {
                *translated.entry(0).or_default() += 1;
            }
        }
        *reasons.entry(want.reason.name()).or_default() += 1;
        if audited && want.reason.is_drop() {
            *on_audited.entry(want.reason.name()).or_default() += 1;
        }
        *paths.get_mut(want.path).expect("a listed path") += 1;
        *kinds.get_mut(&case.kind).expect("a listed kind") += 1;
        if let Some(key) = want.flow {
            let kernel_entry = kernel.maps.flow(&key).expect("read conntrack");
            let model_entry = flows
                .get(&key)
                .map(|e| e.to_kernel(|r| kernel.compiled.rule_id(r)));
            assert_eq!(
                kernel_entry.map(comparable),
                model_entry.map(comparable),
                "conntrack entries differ for {key:?} after {}",
                context()
            );
        }
    }
    eprintln!(
        "differential: translated frames by protocol (0: ICMP errors the pods sent) {translated:?}"
    );
    for protocol in [0, 1, 6, 17] {
        assert!(
            translated.get(&protocol).copied().unwrap_or(0) > 0,
            "no protocol {protocol} frame was translated: {translated:?}"
        );
    }
    eprintln!("differential: generator kinds {kinds:?}, tags {placements:?}");
    assert_eq!(
        placements.len(),
        2,
        "tags both inline and in metadata: {placements:?}"
    );
    eprintln!("differential: programs {programs:?}");
    for program in ["Ingress Xdp", "Ingress Tc", "Egress TC"] {
        assert!(
            programs.get(program).copied().unwrap_or(0) > 0,
            "no frame went through {program}: {programs:?}"
        );
    }
    // Audited pods pass policy drops and keep dropping what is not policy.
    eprintln!("differential: drops on audited pods {on_audited:?}");
    for reason in [
        Reason::DropPolicy,
        Reason::DropPrimaryPolicy,
        Reason::DropSpoofed,
    ] {
        assert!(
            on_audited.get(reason.name()).copied().unwrap_or(0) > 0,
            "no {} on an audited pod: {on_audited:?}",
            reason.name()
        );
    }
    eprintln!("differential: frame-stage paths {paths:#?}");
    eprintln!("differential: reasons {reasons:#?}");
    let missing_paths: Vec<_> = paths.iter().filter(|(_, n)| **n == 0).collect();
    assert!(
        missing_paths.is_empty(),
        "paths no frame took: {missing_paths:?}"
    );
    let missing_kinds: Vec<_> = kinds.iter().filter(|(_, n)| **n == 0).collect();
    assert!(
        missing_kinds.is_empty(),
        "kinds never generated: {missing_kinds:?}"
    );
    // Every reason but the ones only standard-mode primary groups or a
    // same-node peer give is a path too; none may go unseen.
    let missing_reasons: Vec<_> = Reason::ALL
        .iter()
        .filter(|r| reasons.get(r.name()).copied().unwrap_or(0) == 0)
        .collect();
    assert!(
        missing_reasons.is_empty(),
        "reasons never seen: {missing_reasons:?} of {reasons:?}"
    );
}

/// A router's address outside the VPC, reporting on translated packets.
const ROUTER: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 1);

/// The packets of translated flow `key` between the node and the peer: the
/// node's translated one (`nat_port`) and the pod's as it sent it.
fn packets(key: &CtKey, nat_port: u16) -> (Ip, Ip) {
    let v4 = |addr: &[u8; 16]| Ipv4Addr::new(addr[12], addr[13], addr[14], addr[15]);
    let (pod, peer) = (v4(&key.pod_addr), v4(&key.peer_addr));
    let packet = |src: Ipv4Addr, port: u16| match key.protocol {
        6 => frame::tcp(src, port, peer, key.peer_port, TCP_ACK),
        17 => frame::udp(src, port, peer, key.peer_port),
        _ => Ip {
            src: IpAddr::V4(src),
            dst: IpAddr::V4(peer),
            l4: L4::Icmp {
                icmp_type: 8,
                code: 0,
                id: port,
            },
        },
    };
    (packet(NODE_IP, nat_port), packet(pod, key.pod_port))
}

/// The peer's answer to a translated frame, and a router's ICMP error quoting
/// the translated frame, arrive on the primary interface: the kernel must
/// give them back their pod's address and port (compared with the frames
/// built for the pod, every checksum computed whole) and its Ethernet
/// addresses on the trunk (`seen`, the pod's frame), then judge them at the
/// trunk as the model does. An ICMP error the pod sends about the answer leaves
/// translated (returned: whether it did). An answer to a port no flow maps
/// passes untouched.
#[allow(clippy::too_many_arguments)]
fn returns(
    kernel: &Kernel,
    model: &Model,
    flows: &mut FlowTable,
    oracle: &mut FrameOracle,
    key: &CtKey,
    nat_port: u16,
    seen: &[u8],
    path: IngressPath,
    now: u64,
) -> bool {
    let (sent, pod_sent) = packets(key, nat_port);
    let as_pod_sees = |frame: Vec<u8>| {
        let mut frame = nat_oracle::sealed(frame);
        frame[..6].copy_from_slice(&seen[6..12]);
        frame[6..12].copy_from_slice(&seen[..6]);
        frame
    };
    let answer = |ip: &Ip| {
        let mut answer = ip.reply(TCP_ACK);
        if let L4::Icmp { icmp_type, .. } = &mut answer.l4 {
            *icmp_type = 0;
        }
        answer
    };
    let error = |original: &Ip, to: Ipv4Addr| {
        let error =
            frame::icmp_error_frame(Tag::Untagged, ROUTER.into(), to.into(), 11, 0, original);
        nat_oracle::sealed(error)
    };
    let pod = match pod_sent.src {
        IpAddr::V4(pod) => pod,
        IpAddr::V6(_) => unreachable!("translated flows are IPv4"),
    };
    for (arriving, restored) in [
        (
            nat_oracle::sealed(frame::ip_frame(Tag::Untagged, &answer(&sent))),
            as_pod_sees(frame::ip_frame(Tag::Untagged, &answer(&pod_sent))),
        ),
        (error(&sent, NODE_IP), as_pod_sees(error(&pod_sent, pod))),
    ] {
        let (verdict, out) = kernel.run_primary(&arriving);
        assert_eq!(
            (verdict, &out),
            (TC_ACT_REDIRECT, &restored),
            "the return path of {key:?} (port {nat_port}) restored {arriving:02x?} wrong"
        );
        let mut tagged = out;
        tagged.splice(12..12, [0x81, 0x00, (key.vlan >> 8) as u8, key.vlan as u8]);
        let want = oracle.judge(model, flows, &tagged, None, Direction::Ingress, now);
        let got = kernel.run_ingress(path, &tagged);
        assert_eq!(
            got,
            Outcome::expected(want.reason, audited(model, &tagged)),
            "the returned {tagged:02x?} of {key:?} judged differently"
        );
    }
    // The pod's own ICMP error about the answer, as the pod received it, leaves
    // translated, its quoted packet's destination too.
    let peer = match pod_sent.dst {
        IpAddr::V4(peer) => peer,
        IpAddr::V6(_) => unreachable!("translated flows are IPv4"),
    };
    let pod_error = nat_oracle::sealed(frame::icmp_error_frame(
        Tag::Untagged,
        pod.into(),
        peer.into(),
        3,
        3,
        &answer(&pod_sent),
    ));
    let mut tagged = pod_error.clone();
    tagged.splice(12..12, [0x81, 0x00, (key.vlan >> 8) as u8, key.vlan as u8]);
    // (A tracked ICMP flow between the two takes it first: then it is that flow's.)
    let want = oracle.judge(model, flows, &tagged, None, Direction::Egress, now);
    assert_eq!(
        kernel.run(Direction::Egress, &tagged),
        Outcome {
            redirected: want.nat_port != 0,
            ..Outcome::expected(want.reason, audited(model, &tagged))
        },
        "the pod's error about {key:?}: {want:?}"
    );
    let error_translated = want.nat_port != 0;
    if error_translated {
        // Related to the translated flow, or (see above) taken by a tracked ICMP
        // flow between the two, which leaves by its own mapping.
        assert!(
            match want.reason {
                Reason::PassRelated => want.nat_port == nat_port,
                Reason::PassEstablished => true,
                _ => false,
            },
            "the pod's error about {key:?}: {want:?}"
        );
        nat_oracle::check_source_translation(
            &pod_error,
            &kernel.last_output(),
            NODE_IP,
            want.nat_port,
        )
        .unwrap_or_else(|e| panic!("the pod's error about {key:?} translated wrong: {e}"));
    }
    let stranger = frame::ip_frame(Tag::Untagged, &frame::udp(ROUTER, 53, NODE_IP, 1023));
    assert_eq!(
        kernel.run_primary(&stranger),
        (u32::MAX, stranger.clone()),
        "traffic to no mapped port is the node's own"
    );
    error_translated
}
