//! The compiler against the reference evaluator: hand-made models, then generated
//! models and packets, over a fresh compile and over a previous state.

use std::collections::BTreeSet;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use proptest::prelude::*;
use proptest::strategy::ValueTree;

use super::*;
use crate::model::Cidr;
use crate::model::L4Match;
use crate::model::Peer;
use crate::model::{BranchPod, Rule, SecurityGroup};
use crate::policy::eval::L4Packet;
use crate::policy::eval::fixtures::*;
use crate::policy::eval::{L4Query, Query, Reason, evaluate};
use crate::policy::eval::{PROTO_TCP, PROTO_UDP};

const STRICT: EnforcingMode = EnforcingMode::Strict;
const STANDARD: EnforcingMode = EnforcingMode::Standard;

#[test]
fn a_rule_covers_one_span_of_the_port_word() {
    use super::classes::l4_span;
    use enforcer_common::port_word;
    assert_eq!(l4_span(&L4Match::All), (0, 0xff_ffff));
    assert_eq!(l4_span(&L4Match::Protocol(17)), (0x11_0000, 0x11_ffff));
    assert_eq!(l4_span(&tcp(80, 90)), (port_word(6, 80), port_word(6, 90)));
    let icmp = |icmp_type, code| L4Match::Icmp {
        v6: false,
        icmp_type,
        code,
    };
    assert_eq!(l4_span(&icmp(None, None)), (0x01_0000, 0x01_ffff));
    assert_eq!(l4_span(&icmp(Some(8), None)), (0x01_0800, 0x01_08ff));
    assert_eq!(l4_span(&icmp(Some(3), Some(4))), (0x01_0304, 0x01_0304));
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]

    /// The kernel's search finds the range holding the word, in a fixed number of probes.
    #[test]
    fn the_port_search_finds_the_range_of_a_word(
        mut starts in proptest::collection::btree_set(1u32..0xff_ffff, 0..300),
        word in 0u32..0x100_0000,
    ) {
        use enforcer_common::ranges;
        starts.insert(0);
        let starts: Vec<u32> = starts.into_iter().collect();
        let mut probes = 0;
        let found = ranges::search(starts.len() as u32, word, |i| {
            probes += 1;
            starts.get(i as usize).copied()
        });
        let expected = starts.partition_point(|&s| s <= word) - 1;
        prop_assert_eq!(found, Some(expected as u32));
        prop_assert_eq!(probes, ranges::STEPS);
    }
}

#[test]
fn a_port_table_is_sorted_from_zero_and_neighbours_differ() {
    let m = model(
        vec![group(
            "sg-web",
            vec![
                rule(tcp(80, 90), cidr("10.0.0.0/16")),
                rule(tcp(85, 100), cidr("10.0.0.0/16")),
                rule(L4Match::Protocol(17), cidr("10.0.0.0/16")),
                rule(tcp(101, 200), cidr("10.0.0.0/16")),
            ],
            vec![],
        )],
        vec![pod(1, "10.0.1.1", &["sg-web"], STRICT)],
    );
    let c = compile(&m).expect("compiles");
    let table = c.classes.values().next().expect("one class");
    let words: Vec<u32> = table.iter().map(|r| r.start).collect();
    // 0, tcp 80, 91 (the second rule), 101 (the fourth), 201, udp, after udp.
    assert_eq!(
        words,
        [
            0, 0x06_0050, 0x06_005b, 0x06_0065, 0x06_00c9, 0x11_0000, 0x12_0000
        ]
    );
    assert!(table.windows(2).all(|w| w[0].verdict != w[1].verdict));
    assert_eq!(table[0].verdict.rule, enforcer_common::NO_RULE);
}

fn web_model() -> Model {
    let web = group(
        "sg-web",
        vec![
            rule(tcp(443, 443), cidr("0.0.0.0/0")),
            rule(tcp(8000, 8999), cidr("10.1.0.0/16")),
        ],
        vec![rule(L4Match::All, cidr("0.0.0.0/0"))],
    );
    let node_sg = group(
        "sg-node",
        vec![rule(tcp(0, 65535), cidr("10.0.0.0/8"))],
        vec![rule(L4Match::All, cidr("0.0.0.0/0"))],
    );
    model(
        vec![web, node_sg],
        vec![
            pod(7, "10.0.64.7", &["sg-web"], STRICT),
            pod(8, "10.0.64.8", &["sg-web", "sg-web"], STANDARD),
            pod(9, "10.0.64.9", &["sg-node", "sg-web"], STRICT),
        ],
    )
}

#[test]
fn policies_are_shared_and_strict_pods_have_no_primary() {
    let c = compile(&web_model()).unwrap();
    let p7 = c.pods[&7].policies;
    let p8 = c.pods[&8].policies;
    let p9 = c.pods[&9].policies;
    assert_eq!(p7[..2], p8[..2]);
    assert_eq!(p7[2..], [NO_POLICY, NO_POLICY]);
    assert_ne!(p8[2], NO_POLICY);
    assert_ne!(p9[0], p7[0]);
    assert_eq!(c.pods[&8].mode, STANDARD as u8);
    assert_eq!(c.pods[&7].ipv4, [10, 0, 64, 7]);
    assert_eq!(c.pods[&7].flags, POD_HAS_IPV4 | POD_HAS_IPV6);
    assert_eq!(c.rules.len(), 5);
    assert_eq!(c.rule(1).unwrap().group_id, "sg-node");
    assert_eq!(c.rule(0), None);
    assert_eq!(c.rule(6), None);
}

#[test]
fn unchanged_parts_keep_their_ids_and_a_changed_policy_gets_a_fresh_handle() {
    let before = compile(&web_model()).unwrap();
    assert_eq!(compile_with(&web_model(), Some(&before)).unwrap(), before);

    // sg-web's second ingress rule changes its ports: every policy keeps its handle and
    // entries, and the one class of that rule keeps its ID with a new table (switched in place).
    let mut ports = web_model();
    ports.groups.get_mut("sg-web").unwrap().ingress[1].l4 = tcp(8000, 8080);
    let switched = compile_with(&ports, Some(&before)).unwrap();
    assert_eq!(switched.pods, before.pods);
    assert_eq!(switched.policies, before.policies);
    let changed: Vec<u32> = switched
        .classes
        .iter()
        .filter(|(class, entries)| before.classes.get(*class) != Some(*entries))
        .map(|(class, _)| *class)
        .collect();
    assert_eq!(changed.len(), 1, "{changed:?}");
    assert!(before.classes.contains_key(&changed[0]));

    // Its peer changes instead: every policy with sg-web ingress is new.
    let mut m = web_model();
    m.groups.get_mut("sg-web").unwrap().ingress[1].peer = cidr("10.2.0.0/16");
    let after = compile_with(&m, Some(&before)).unwrap();
    let all_handles =
        |c: &Compiled| -> BTreeSet<u32> { c.pods.values().flat_map(|p| p.policies).collect() };
    let old_handles = all_handles(&before);
    for vlan in [7, 8] {
        let (old, new) = (before.pods[&vlan].policies, after.pods[&vlan].policies);
        assert!(
            !old_handles.contains(&new[0]),
            "fresh ingress handle of {vlan}"
        );
        assert_eq!(old[1], new[1], "egress of {vlan} did not change");
    }
    // sg-node's rule from 10.0.0.0/8 to every port covers the changed rule: same entries.
    assert_eq!(before.pods[&9].policies, after.pods[&9].policies);
    assert_eq!(before.pods[&8].policies[2..], after.pods[&8].policies[2..]);
    assert_eq!(after.rules, before.rules, "rules keep their IDs");
    // Classes of unchanged rule sets keep their IDs and entries.
    let egress = before.pods[&7].policies[1];
    assert_eq!(before.policies[&egress], after.policies[&egress]);

    // A new group's rules get IDs the previous state did not use; gone rules' IDs are
    // free again one compile later.
    let mut grown = m.clone();
    grown.groups.insert(
        "sg-a".into(),
        group("sg-a", vec![rule(tcp(1, 1), cidr("10.2.0.0/16"))], vec![]),
    );
    let grown_c = compile_with(&grown, Some(&after)).unwrap();
    let new_id = grown_c.rule_id(&RuleRef {
        group_id: "sg-a".into(),
        direction: Direction::Ingress,
        index: 0,
    });
    assert_eq!(new_id, Some(6));
    for (id, rule) in after.rules.iter() {
        assert_eq!(grown_c.rule_id(rule), Some(id));
    }
    let shrunk = compile_with(&m, Some(&grown_c)).unwrap();
    assert_eq!(shrunk.rules, after.rules);
    assert_eq!(
        compile_with(&grown, Some(&shrunk))
            .unwrap()
            .rule_id(&RuleRef {
                group_id: "sg-a".into(),
                direction: Direction::Ingress,
                index: 0,
            }),
        Some(6)
    );
}

#[test]
fn address_sets() {
    let m = web_model();
    let c = compile(&m).unwrap();
    // The node's never-filtered peers for every pod, a pod's own (its subnet router) for it.
    let never_filters = |vlan: u16, peer: &str| {
        let (addr, ipv6) = match ip(peer) {
            IpAddr::V4(v4) => (v4.to_ipv6_mapped().octets(), false),
            IpAddr::V6(v6) => (v6.octets(), true),
        };
        c.pods[&vlan].never_filters(&addr, ipv6)
    };
    assert!(never_filters(7, "10.0.0.2"));
    assert!(never_filters(9, "fd00:ec2::254"));
    assert!(never_filters(7, "10.0.64.1"));
    assert!(!never_filters(7, "10.0.0.3"));
    assert_eq!(
        (
            c.pods[&7].unfiltered_v4_count,
            c.pods[&7].unfiltered_v6_count
        ),
        (MAX_UNFILTERED_V4 as u8, MAX_UNFILTERED_V6 as u8)
    );
    assert_eq!(
        addr_key(0, ip("10.0.0.2")).addr[10..],
        [0xff, 0xff, 10, 0, 0, 2]
    );
    assert_eq!(c.node_local.len(), m.node_local.len());
    assert!(c.node_local.contains_key(&addr_key(0, ip("10.0.1.10"))));
}

#[test]
fn interpret_follows_the_kernel_sequence() {
    let c = compile(&web_model()).unwrap();
    let run = |vlan, dir, peer: &str, packet| interpret(&c, vlan, dir, ip(peer), packet);
    let tcp443 = L4Packet::tcp(443);
    assert_eq!(
        run(99, Direction::Ingress, "192.0.2.1", tcp443),
        Interpretation::UnknownVlan
    );
    assert_eq!(
        run(7, Direction::Ingress, "10.0.0.2", tcp443),
        Interpretation::Unfiltered
    );
    assert_eq!(
        run(8, Direction::Ingress, "10.0.1.10", tcp443),
        Interpretation::NodeLocal
    );
    let strict_node = run(7, Direction::Ingress, "10.0.1.10", L4Packet::tcp(10250));
    assert!(!strict_node.allowed());
    let r = run(7, Direction::Ingress, "192.0.2.1", tcp443);
    assert!(r.allowed() && r.untracked());
    let Interpretation::Policy {
        branch: SideLookup::Allowed(v),
        primary,
    } = r
    else {
        panic!("{r:?}");
    };
    assert_eq!(primary, SideLookup::NotChecked);
    assert_eq!(c.rule(v.rule).unwrap().index, 0);
    let r = run(8, Direction::Ingress, "192.0.2.1", tcp443);
    assert!(matches!(
        r,
        Interpretation::Policy {
            primary: SideLookup::Denied,
            ..
        }
    ));
    // An IPv6 packet claiming an IPv4-mapped unfiltered peer is filtered.
    let r = run(7, Direction::Ingress, "::ffff:10.0.0.2", L4Packet::tcp(22));
    assert!(!r.allowed());
}

#[test]
fn all_traffic_gets_per_protocol_untracked_keys() {
    let g = group(
        "sg-a",
        vec![rule(L4Match::All, cidr("0.0.0.0/0"))],
        vec![rule(udp(0, 65535), cidr("0.0.0.0/0"))],
    );
    let m = model(vec![g], vec![pod(1, "10.0.64.1", &["sg-a"], STRICT)]);
    let c = compile(&m).unwrap();
    let run = |packet| interpret(&c, 1, Direction::Ingress, ip("192.0.2.1"), packet);
    assert!(run(L4Packet::udp(5)).untracked());
    assert!(!run(L4Packet::tcp(5)).untracked());
    assert!(run(L4Packet::tcp(5)).allowed());
    assert!(!run(L4Packet::icmp(8, 0)).untracked());
}

#[test]
fn compiling_is_deterministic_and_rejects_bad_vlans() {
    let m = web_model();
    assert_eq!(compile(&m).unwrap(), compile(&m).unwrap());
    let mut reordered = m.clone();
    reordered.pods.reverse();
    reordered.pods[0].groups.reverse();
    assert_eq!(compile(&reordered).unwrap(), compile(&m).unwrap());

    let mut dup = m.clone();
    dup.pods[1].vlan = 7;
    assert!(matches!(
        compile(&dup),
        Err(CompileError::DuplicateVlan { vlan: 7, .. })
    ));
    let mut zero = m;
    zero.pods[0].vlan = 0;
    assert!(matches!(
        compile(&zero),
        Err(CompileError::InvalidVlan { vlan: 0, .. })
    ));
}

/// 120 pods with 16 of 64 groups of 60 + 60 rules each; `all_traffic`: some rules allow
/// everything from everywhere, which lets the compiler drop the rules they shadow.
fn large_model(all_traffic: bool) -> Model {
    let mut groups = Vec::new();
    for g in 0..64u32 {
        let rules = |dir: u32| -> Vec<Rule> {
            (0..60u32)
                .map(|r| {
                    let n = g * 1000 + dir * 100 + r;
                    let peer = match r % 6 {
                        0 => Peer::Group(format!("sg-{:03}", (g + r) % 64)),
                        1 => Peer::PrefixList(format!("pl-{}", r % 4)),
                        2 => cidr("0.0.0.0/0"),
                        3 => cidr(&format!("10.{}.0.0/16", n % 200)),
                        4 => cidr(&format!("2600:1f00:{:x}::/48", n)),
                        _ => cidr(&format!("10.{}.{}.{}/32", g, dir, r)),
                    };
                    let l4 = match r % 5 {
                        0 => tcp(1000 + r as u16, 2000 + 7 * r as u16),
                        1 => udp(53, 53),
                        2 => L4Match::Icmp {
                            v6: false,
                            icmp_type: Some(8),
                            code: None,
                        },
                        3 if all_traffic => L4Match::All,
                        3 => tcp(9000 + r as u16, 9100),
                        _ => tcp(r as u16, r as u16 + 1),
                    };
                    rule(l4, peer)
                })
                .collect()
        };
        groups.push(group(&format!("sg-{g:03}"), rules(0), rules(1)));
    }
    let pods: Vec<BranchPod> = (1..=120u16)
        .map(|vlan| {
            let names: Vec<String> = (0..16u16)
                .map(|i| format!("sg-{:03}", (vlan * 7 + i * 3) % 64))
                .collect();
            let names: Vec<&str> = names.iter().map(String::as_str).collect();
            let mode = if vlan % 2 == 0 { STRICT } else { STANDARD };
            pod(
                vlan,
                &format!("10.0.{}.{}", 64 + vlan / 200, vlan % 200 + 2),
                &names,
                mode,
            )
        })
        .collect();
    let mut m = model(groups, pods);
    m.node.primary_security_groups = vec!["sg-000".to_string(), "sg-001".to_string()];
    for g in 0..64u32 {
        let members = (0..40u32)
            .map(|i| IpAddr::V4(Ipv4Addr::new(10, 0, 100 + (g % 100) as u8, i as u8)))
            .chain(std::iter::once(IpAddr::V6(Ipv6Addr::new(
                0x2600, 0x1f00, 0, 0, 0, 0, g as u16, 1,
            ))))
            .map(Cidr::host)
            .collect();
        m.members.insert(format!("sg-{g:03}"), members);
    }
    for l in 0..4u32 {
        let cidrs = (0..20u32)
            .map(|i| format!("172.{}.{}.0/24", 16 + l, i).parse().unwrap())
            .collect();
        m.prefix_lists.insert(format!("pl-{l}"), cidrs);
    }
    m
}

/// Compile time is the benchmark's (`apply_ms`); here, only what a large model means.
#[test]
fn large_models_compile_right() {
    for all_traffic in [true, false] {
        let m = large_model(all_traffic);
        let c = compile(&m).unwrap();
        assert_eq!(c.pods.len(), 120);
        assert_eq!(c.rules.len(), 64 * 120);
        let (pod, peer) = (&m.pods[3], ip("10.0.103.5"));
        let queries: Vec<Query> = [L4Packet::tcp(1003), L4Packet::udp(53), L4Packet::icmp(8, 0)]
            .into_iter()
            .flat_map(|packet| {
                [Direction::Ingress, Direction::Egress].map(|direction| Query {
                    direction,
                    peer,
                    l4: L4Query::Packet(packet),
                })
            })
            .collect();
        for query in &queries {
            check(&m, &c, pod, query);
        }
        // One rule's ports changed in a group many pods share (on both sides of the standard
        // ones: sg-000 is a primary group): compiled over the previous state, in parallel.
        let mut changed = m.clone();
        changed.groups.get_mut("sg-000").unwrap().ingress[0].l4 = tcp(8443, 8443);
        let over = compile_with(&changed, Some(&c)).unwrap();
        let scratch = compile(&changed).unwrap();
        for pod in &changed.pods {
            for query in &queries {
                check(&changed, &over, pod, query);
                assert_eq!(answer(&over, pod, query), answer(&scratch, pod, query));
            }
        }
    }
}

/// `interpret(compile(model))` agrees with the evaluator ([`disagreement`]).
fn check(model: &Model, compiled: &Compiled, pod: &BranchPod, query: &Query) {
    if let Some(difference) = disagreement(model, compiled, pod, query) {
        panic!("{difference}");
    }
}

// Random models: overlapping prefixes come from a small address space.
fn v4_addr() -> impl Strategy<Value = Ipv4Addr> {
    prop_oneof![
        3 => (0u32..4, any::<u8>(), any::<u8>())
            .prop_map(|(a, b, c)| Ipv4Addr::new(10, a as u8, b & 0x0f, c)),
        1 => any::<u32>().prop_map(Ipv4Addr::from),
    ]
}

fn v6_addr() -> impl Strategy<Value = Ipv6Addr> {
    prop_oneof![
        3 => (0u16..4, any::<u8>(), any::<u16>())
            .prop_map(|(a, b, c)| Ipv6Addr::new(0xfd00, a, 0, 0, 0, 0, u16::from(b & 0x0f), c)),
        1 => any::<u128>().prop_map(|x| Ipv6Addr::from(x | (0xfd00 << 112))),
    ]
}

fn addr() -> impl Strategy<Value = IpAddr> {
    prop_oneof![
        v4_addr().prop_map(IpAddr::V4),
        v6_addr().prop_map(IpAddr::V6)
    ]
}

/// A member of a referenced group: an ENI's address or one of its delegated prefixes.
fn member() -> impl Strategy<Value = Cidr> {
    prop_oneof![
        3 => addr().prop_map(Cidr::host),
        1 => (v4_addr(), 28u8..=32).prop_map(|(a, l)| Cidr::new(IpAddr::V4(a), l).unwrap()),
        1 => (v6_addr(), 80u8..=128).prop_map(|(a, l)| Cidr::new(IpAddr::V6(a), l).unwrap()),
    ]
}

fn any_cidr() -> impl Strategy<Value = Cidr> {
    prop_oneof![
        (v4_addr(), 0u8..=32).prop_map(|(a, l)| Cidr::new(IpAddr::V4(a), l).unwrap()),
        (v6_addr(), 0u8..=128).prop_map(|(a, l)| Cidr::new(IpAddr::V6(a), l).unwrap()),
        Just("0.0.0.0/0".parse().unwrap()),
        Just("::/0".parse().unwrap()),
    ]
}

fn l4() -> impl Strategy<Value = L4Match> {
    let ports = (
        prop_oneof![Just(6u8), Just(17u8)],
        any::<u16>(),
        any::<u16>(),
    )
        .prop_map(|(protocol, a, b)| L4Match::Ports {
            protocol,
            from: a.min(b),
            to: a.max(b),
        });
    let near = (prop_oneof![Just(6u8), Just(17u8)], 0u16..64, 0u16..8).prop_map(
        |(protocol, from, width)| L4Match::Ports {
            protocol,
            from,
            to: from + width,
        },
    );
    let every_port = prop_oneof![Just(6u8), Just(17u8)].prop_map(|protocol| L4Match::Ports {
        protocol,
        from: 0,
        to: 65535,
    });
    let icmp = (
        any::<bool>(),
        proptest::option::of(0u8..4),
        proptest::option::of(0u8..3),
    )
        .prop_map(|(v6, icmp_type, code)| L4Match::Icmp {
            v6,
            icmp_type,
            code: icmp_type.and(code),
        });
    prop_oneof![
        2 => Just(L4Match::All),
        2 => ports,
        3 => near,
        2 => every_port,
        2 => icmp,
        1 => prop_oneof![Just(50u8), Just(132u8), any::<u8>()].prop_map(L4Match::Protocol),
    ]
}

fn peer() -> impl Strategy<Value = Peer> {
    prop_oneof![
        6 => any_cidr().prop_map(Peer::Cidr),
        1 => (0..3u8).prop_map(|i| Peer::PrefixList(format!("pl-{i}"))),
        2 => (0..5u8).prop_map(|i| Peer::Group(format!("sg-{i}"))),
    ]
}

fn rules() -> impl Strategy<Value = Vec<Rule>> {
    proptest::collection::vec((l4(), peer()).prop_map(|(l4, p)| rule(l4, p)), 0..6)
}

fn group_ids() -> impl Strategy<Value = Vec<String>> {
    proptest::collection::vec((0..5u8).prop_map(|i| format!("sg-{i}")), 1..4)
}

prop_compose! {
    fn arb_model()(
        rules in proptest::collection::vec((rules(), rules()), 4),
        members in proptest::collection::vec(proptest::collection::btree_set(member(), 0..4), 5),
        lists in proptest::collection::vec(proptest::collection::vec(any_cidr(), 0..4), 2),
        pods in proptest::collection::vec(
            (group_ids(), any::<bool>(), v4_addr(), v6_addr(), any_cidr(), any_cidr()), 1..4),
        primary in group_ids(),
        node_local in proptest::collection::btree_set(addr(), 0..4),
    ) -> Model {
        // sg-4 stays undefined: referenced and assigned, but without rules.
        let groups: Vec<SecurityGroup> = rules
            .into_iter()
            .enumerate()
            .map(|(i, (ingress, egress))| group(&format!("sg-{i}"), ingress, egress))
            .collect();
        let pods: Vec<BranchPod> = pods
            .into_iter()
            .enumerate()
            .map(|(i, (groups, standard, v4, v6, s1, s2))| {
                let mode = if standard { STANDARD } else { STRICT };
                let mut p = pod(i as u16 + 1, "10.0.64.1", &[], mode);
                p.groups = groups;
                p.ipv4 = Some(v4);
                p.ipv6 = Some(v6);
                p.subnet_v4 = [s1, s2].into_iter().find(Cidr::is_ipv4);
                p.subnet_v6 = [s1, s2].into_iter().find(|c| !c.is_ipv4());
                p
            })
            .collect();
        let mut m = model(groups, pods);
        m.node.primary_security_groups = primary;
        m.node_local.extend(node_local);
        m.members = members
            .into_iter()
            .enumerate()
            .map(|(i, set)| (format!("sg-{i}"), set))
            .collect();
        m.prefix_lists = lists
            .into_iter()
            .enumerate()
            .map(|(i, cidrs)| (format!("pl-{i}"), cidrs))
            .collect();
        m
    }
}

/// Raw choices for one packet, turned into a query against a model by [`pick`].
type PacketSeed = (u8, bool, u8, u32, u128, u8, u8, u16);

fn packet_seed() -> impl Strategy<Value = PacketSeed> {
    (
        any::<u8>(),
        any::<bool>(),
        0u8..13,
        any::<u32>(),
        any::<u128>(),
        0u8..10,
        any::<u8>(),
        any::<u16>(),
    )
}

/// An address inside `cidr`, the host bits from `random`.
fn inside(cidr: Cidr, random: u128) -> IpAddr {
    let len = u32::from(cidr.prefix_len());
    match cidr.addr() {
        IpAddr::V4(a) => {
            let host = (random as u32).checked_shr(len).unwrap_or(0);
            IpAddr::V4(Ipv4Addr::from(u32::from(a) | host))
        }
        IpAddr::V6(a) => {
            let host = random.checked_shr(len).unwrap_or(0);
            IpAddr::V6(Ipv6Addr::from(u128::from(a) | host))
        }
    }
}

/// Biased towards rule peers and rule ports, so that many packets hit rules.
fn pick(model: &Model, seed: PacketSeed) -> (&BranchPod, Query) {
    let (pod_i, ingress, peer_kind, n, random, l4_kind, proto_i, port) = seed;
    let pod = &model.pods[usize::from(pod_i) % model.pods.len()];
    let direction = if ingress {
        Direction::Ingress
    } else {
        Direction::Egress
    };
    // Mostly the rules that apply to this packet, sometimes any rule of the model.
    let primary: &[String] = if pod.mode == STANDARD {
        &model.node.primary_security_groups
    } else {
        &[]
    };
    let own_rules: Vec<&Rule> = pod
        .groups
        .iter()
        .chain(primary)
        .filter_map(|id| model.groups.get(id))
        .flat_map(|g| g.rules(direction))
        .collect();
    let all_rules: Vec<&Rule> = model
        .groups
        .values()
        .flat_map(|g| g.ingress.iter().chain(&g.egress))
        .collect();
    let candidates = if own_rules.is_empty() || random >> 120 == 0 {
        all_rules
    } else {
        own_rules
    };
    let some_rule = candidates
        .get(n as usize % candidates.len().max(1))
        .copied();
    let mut prefixes: Vec<Cidr> = Vec::new();
    if let Some(r) = some_rule {
        match &r.peer {
            Peer::Cidr(c) => prefixes.push(*c),
            Peer::PrefixList(id) => {
                prefixes.extend(model.prefix_lists.get(id).into_iter().flatten())
            }
            Peer::Group(id) => {
                prefixes.extend(model.members.get(id).into_iter().flatten().copied())
            }
        }
    }
    let specials: Vec<IpAddr> = crate::policy::eval::node_unfiltered(model)
        .into_iter()
        .map(|(a, _)| a)
        .chain(crate::policy::eval::pod_unfiltered(pod))
        .chain(model.node_local.iter().copied())
        .collect();
    let pool_v4 = Ipv4Addr::new(10, (n % 4) as u8, ((n >> 8) & 0x0f) as u8, (n >> 16) as u8);
    let peer = match peer_kind {
        0..=7 if !prefixes.is_empty() => {
            inside(prefixes[(n >> 8) as usize % prefixes.len()], random)
        }
        8 => specials[n as usize % specials.len()],
        9 => IpAddr::V4(pool_v4),
        10 => IpAddr::V6(Ipv6Addr::from(
            (0xfd00u128 << 112) | (random & 0x0003_0000_0000_0000_0000_0000_000f_ffff),
        )),
        _ => {
            if random & 1 == 0 {
                IpAddr::V4(Ipv4Addr::from(n))
            } else {
                IpAddr::V6(Ipv6Addr::from(random))
            }
        }
    };
    let protocols = [6u8, 17, 1, 58, 50, 132, proto_i];
    let rule_l4 = if port % 4 == 0 {
        candidates
            .get(port as usize % candidates.len().max(1))
            .map(|r| r.l4)
    } else {
        some_rule.map(|r| r.l4)
    };
    let packet = match (l4_kind, rule_l4) {
        (0..=5, Some(L4Match::Ports { protocol, from, to })) => {
            let mid = from + (to - from) / 2;
            let candidates = [
                from,
                to,
                mid,
                from,
                to,
                from.wrapping_sub(1),
                to.wrapping_add(1),
            ];
            L4Packet::new(protocol, candidates[usize::from(proto_i) % 7], 0, 0)
        }
        (
            0..=5,
            Some(L4Match::Icmp {
                v6,
                icmp_type,
                code,
            }),
        ) => {
            let t = icmp_type.unwrap_or(proto_i % 4);
            let c = code.map_or(proto_i % 3, |c| {
                if proto_i % 4 == 0 {
                    c.wrapping_add(1)
                } else {
                    c
                }
            });
            L4Packet::new(if v6 { 58 } else { 1 }, 0, t, c)
        }
        (0..=5, Some(L4Match::Protocol(p))) => L4Packet::new(p, port, 0, 0),
        _ => {
            let protocol = protocols[usize::from(proto_i) % protocols.len()];
            let port = if l4_kind % 2 == 0 { port % 70 } else { port };
            L4Packet::new(protocol, port, (port >> 8) as u8 % 5, port as u8 % 4)
        }
    };
    let query = Query {
        direction,
        peer,
        l4: L4Query::Packet(packet),
    };
    (pod, query)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 3000, ..ProptestConfig::default() })]

    #[test]
    fn compiled_maps_agree_with_the_evaluator(
        model in arb_model(),
        seeds in proptest::collection::vec(packet_seed(), 40),
    ) {
        let compiled = compile(&model).unwrap();
        for seed in seeds {
            let (pod, query) = pick(&model, seed);
            check(&model, &compiled, pod, &query);
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 500, ..ProptestConfig::default() })]

    /// IDs kept from a previous state never change what the entries mean.
    #[test]
    fn compiled_over_a_previous_state_agrees_with_the_evaluator(
        first in arb_model(),
        model in arb_model(),
        seeds in proptest::collection::vec(packet_seed(), 40),
    ) {
        let previous = compile(&first).unwrap();
        let compiled = compile_with(&model, Some(&previous)).unwrap();
        for seed in seeds {
            let (pod, query) = pick(&model, seed);
            check(&model, &compiled, pod, &query);
        }
        prop_assert_eq!(compile_with(&model, Some(&compiled)).unwrap(), compiled);
    }
}

/// `model` with one change an operator makes: a rule's ports, a rule added or removed, a
/// referenced group's members, a prefix list, a description (no change in meaning).
fn mutate(model: &Model, change: u8, at: usize, cidr: Cidr, ip: IpAddr) -> Model {
    let mut m = model.clone();
    let ids: Vec<GroupId> = m.groups.keys().cloned().collect();
    let id = &ids[at % ids.len()];
    let group = m.groups.get_mut(id).expect("a group");
    let rules = if at.is_multiple_of(2) {
        &mut group.ingress
    } else {
        &mut group.egress
    };
    let i = at % rules.len().max(1);
    match change % 6 {
        0 if !rules.is_empty() => {
            rules[i].l4 = match at % 3 {
                0 => L4Match::Ports {
                    protocol: PROTO_TCP,
                    from: (at % 70) as u16,
                    to: 70,
                },
                1 => L4Match::All,
                _ => L4Match::Protocol(PROTO_UDP),
            }
        }
        1 if !rules.is_empty() => {
            rules.remove(i);
        }
        2 => rules.push(Rule {
            l4: L4Match::All,
            peer: Peer::Cidr(cidr),
            description: None,
        }),
        3 => {
            m.members
                .entry(id.clone())
                .or_default()
                .insert(Cidr::host(ip));
        }
        4 => m.prefix_lists.entry("pl-0".into()).or_default().push(cidr),
        _ if !rules.is_empty() => rules[i].description = Some(format!("changed {at}")),
        _ => {}
    }
    m
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 400, ..ProptestConfig::default() })]

    /// What a compile takes over from the previous one (policies, classes) is never stale:
    /// through a chain of small changes, the entries still mean what the evaluator says.
    #[test]
    fn reused_policies_and_classes_follow_every_change(
        first in arb_model(),
        changes in proptest::collection::vec((any::<u8>(), any::<usize>(), any_cidr(), addr()), 1..5),
        seeds in proptest::collection::vec(packet_seed(), 30),
    ) {
        let mut model = first;
        let mut compiled = compile(&model).unwrap();
        for (change, at, cidr, ip) in changes {
            model = mutate(&model, change, at, cidr, ip);
            compiled = compile_with(&model, Some(&compiled)).unwrap();
            for &seed in &seeds {
                let (pod, query) = pick(&model, seed);
                check(&model, &compiled, pod, &query);
            }
        }
    }
}

/// What the kernel answers for `query`, rules named by what they stand for (their IDs
/// differ between compiles).
fn answer(compiled: &Compiled, pod: &BranchPod, query: &Query) -> String {
    let L4Query::Packet(packet) = query.l4 else {
        unreachable!("generated queries are packets")
    };
    let side = |lookup: SideLookup| match lookup {
        SideLookup::Allowed(verdict) => {
            format!("{:?} {}", compiled.rule(verdict.rule), verdict.flags)
        }
        other => format!("{other:?}"),
    };
    match interpret(compiled, pod.vlan, query.direction, query.peer, packet) {
        Interpretation::Policy { branch, primary } => {
            format!("{} / {}", side(branch), side(primary))
        }
        other => format!("{other:?}"),
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 300, ..ProptestConfig::default() })]

    /// A compile over the previous one (policies and classes taken over, peer tables folded
    /// again only under rules whose ports changed, tables switched in place) reads as a
    /// compile of the same model from scratch; it never rewrites a policy under its handle,
    /// and a table it switches is one no pod can see beside another change.
    #[test]
    fn an_incremental_compile_reads_as_a_compile_from_scratch(
        first in arb_model(),
        changes in proptest::collection::vec((any::<u8>(), any::<usize>(), any_cidr(), addr()), 1..6),
        seeds in proptest::collection::vec(packet_seed(), 30),
    ) {
        let mut model = first;
        let mut compiled = compile(&model).unwrap();
        for (change, at, cidr, ip) in changes {
            model = mutate(&model, change, at, cidr, ip);
            let next = compile_with(&model, Some(&compiled)).unwrap();
            let scratch = compile(&model).unwrap();
            for &seed in &seeds {
                let (pod, query) = pick(&model, seed);
                prop_assert_eq!(answer(&next, pod, &query), answer(&scratch, pod, &query));
            }
            for (handle, entries) in &next.policies {
                if let Some(held) = compiled.policies.get(handle) {
                    prop_assert_eq!(held, entries, "policy {} rewritten", handle);
                }
            }
            let switched: Switched = next
                .classes
                .iter()
                .filter(|(class, entries)| compiled.classes.get(*class).is_some_and(|held| held != *entries))
                .map(|(class, _)| *class)
                .collect();
            prop_assert_eq!(unsafe_switches(&compiled, &next, &switched), Vec::<u32>::new());
            compiled = next;
        }
    }
}

#[test]
fn generated_packets_often_hit_rules() {
    let mut runner = proptest::test_runner::TestRunner::deterministic();
    let (mut allowed, mut total, mut untracked) = (0, 0, 0);
    let mut reasons = BTreeSet::new();
    for _ in 0..300 {
        let model = arb_model().new_tree(&mut runner).unwrap().current();
        let seeds = proptest::collection::vec(packet_seed(), 40)
            .new_tree(&mut runner)
            .unwrap()
            .current();
        for seed in seeds {
            let (pod, query) = pick(&model, seed);
            let e = evaluate(&model, pod, &query);
            total += 1;
            if e.reason == Reason::Allowed {
                allowed += 1;
                untracked += usize::from(e.untracked);
            }
            reasons.insert(
                format!("{:?}", e.reason)
                    .chars()
                    .take(8)
                    .collect::<String>(),
            );
        }
    }
    assert!(
        allowed * 4 > total,
        "only {allowed} of {total} allowed by rules"
    );
    assert!(untracked > 50, "only {untracked} untracked");
    assert!(reasons.len() >= 4, "{reasons:?}");
}
