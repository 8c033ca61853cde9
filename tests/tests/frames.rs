//! The frame stage of the programs, through `BPF_PROG_TEST_RUN`: VLAN from
//! the tag, untagged pass-through, unknown VLANs, anti-spoofing, malformed
//! and unsupported headers, ARP, neighbour discovery, IPv6 extension headers,
//! IPv4 options and fragments of both families. Most pods' policy allows
//! everything, so only this stage can drop; the discovery, header-chain and
//! fragment tests use a policy of one port, so that a transport header read at
//! the wrong offset changes the verdict.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use enforcer::model::{Direction, L4Match};
use enforcer_common::Reason;
use enforcer_tests::frame::{self, Ip, L4, Tag};
use enforcer_tests::kernel::{Kernel, Outcome};
use enforcer_tests::models::{branch_pod, group, model, node_config, rule};

const VLAN: u16 = 100;
const POD_V4: Ipv4Addr = Ipv4Addr::new(10, 0, 1, 20);
const POD_V6: Ipv6Addr = Ipv6Addr::new(0x2600, 0x1f14, 0, 1, 0, 0, 0, 0x20);
const PEER_V4: Ipv4Addr = Ipv4Addr::new(10, 0, 2, 30);
const PEER_V6: Ipv6Addr = Ipv6Addr::new(0x2600, 0x1f14, 0, 2, 0, 0, 0, 0x30);

/// One pod whose group allows all traffic both ways: only the frame stage can drop.
fn kernel() -> Kernel {
    let everything = || vec![rule(L4Match::All, "0.0.0.0/0"), rule(L4Match::All, "::/0")];
    let open = group("sg-0open", everything(), everything());
    let pod = branch_pod("pod", VLAN, POD_V4, Some(POD_V6), &["sg-0open"]);
    Kernel::load(&model(
        node_config(vec!["sg-0open".into()]),
        vec![open],
        vec![pod],
    ))
}

const PASS_NEW: Outcome = Outcome {
    passed: true,
    reason: Reason::PassNew,
    would_drop: false,
    redirected: false,
};

fn dropped(reason: Reason) -> Outcome {
    Outcome {
        passed: false,
        reason,
        would_drop: false,
        redirected: false,
    }
}

fn tcp(src: IpAddr, dst: IpAddr) -> Ip {
    Ip {
        src,
        dst,
        l4: L4::Tcp {
            src: 40000,
            dst: 443,
            flags: frame::TCP_SYN,
        },
    }
}

fn ingress_v4() -> Ip {
    tcp(PEER_V4.into(), POD_V4.into())
}

#[test]
fn untagged_frames_are_not_branch_traffic() {
    let k = kernel();
    let f = frame::ip_frame(Tag::Untagged, &ingress_v4());
    for direction in [Direction::Ingress, Direction::Egress] {
        let outcome = k.run(direction, &f);
        assert_eq!(outcome.reason, Reason::PassUntagged);
        assert!(outcome.passed);
    }
}

#[test]
fn known_vlan_to_the_pod_passes_in_both_families() {
    let k = kernel();
    let v4 = frame::ip_frame(Tag::Vlan(VLAN), &ingress_v4());
    let v6 = frame::ip_frame(Tag::Vlan(VLAN), &tcp(PEER_V6.into(), POD_V6.into()));
    assert_eq!(k.run(Direction::Ingress, &v4), PASS_NEW);
    assert_eq!(k.run(Direction::Ingress, &v6), PASS_NEW);
    let egress = frame::ip_frame(Tag::Vlan(VLAN), &tcp(POD_V4.into(), PEER_V4.into()));
    assert_eq!(k.run(Direction::Egress, &egress), PASS_NEW);
}

#[test]
fn unknown_vlan_is_dropped() {
    let k = kernel();
    let f = frame::ip_frame(Tag::Vlan(VLAN + 1), &ingress_v4());
    assert_eq!(
        k.run(Direction::Ingress, &f),
        dropped(Reason::DropUnknownVlan)
    );
}

/// An 802.1p priority tag (VLAN ID 0) is no VLAN: Linux hands the frame to its
/// inner tag's VLAN device. So a pod's VLAN behind one is judged as stacked tags,
/// even where unknown VLANs pass; without an inner tag it is untagged.
#[test]
fn a_priority_tag_never_hides_a_pods_vlan() {
    let mut state = model(
        node_config(vec!["sg-0open".into()]),
        vec![group(
            "sg-0open",
            vec![rule(L4Match::All, "0.0.0.0/0")],
            vec![],
        )],
        vec![branch_pod("pod", VLAN, POD_V4, Some(POD_V6), &["sg-0open"])],
    );
    state.node.unknown_vlan = enforcer::model::UnknownVlanAction::Pass;
    let k = Kernel::load(&state);
    let run = |tag| k.run(Direction::Ingress, &frame::ip_frame(tag, &ingress_v4()));
    assert_eq!(
        run(Tag::Priority(Some(VLAN))),
        dropped(Reason::DropUnsupportedL2),
        "a pod's VLAN behind a priority tag"
    );
    assert_eq!(
        run(Tag::Priority(Some(VLAN + 1))),
        Outcome {
            passed: true,
            reason: Reason::PassUnknownVlan,
            would_drop: false,
            redirected: false,
        },
        "an unknown VLAN behind a priority tag is an unknown VLAN"
    );
    assert_eq!(
        run(Tag::Priority(None)),
        Outcome {
            passed: true,
            reason: Reason::PassUntagged,
            would_drop: false,
            redirected: false,
        },
        "a priority tag alone: the trunk's own traffic"
    );
    let cut = frame::ethernet(Tag::Priority(None), 0x8100, &[0x00]);
    assert_eq!(
        k.run(Direction::Ingress, &cut),
        dropped(Reason::DropMalformed),
        "an inner tag cut short"
    );
}

#[test]
fn addresses_not_owned_by_the_pod_are_spoofed() {
    let k = kernel();
    let other = IpAddr::V4(Ipv4Addr::new(10, 0, 1, 99));
    let wrong_dst = frame::ip_frame(Tag::Vlan(VLAN), &tcp(PEER_V4.into(), other));
    let wrong_src = frame::ip_frame(Tag::Vlan(VLAN), &tcp(other, PEER_V4.into()));
    // The egress check looks at the source, the ingress check at the destination.
    let spoofed = dropped(Reason::DropSpoofed);
    assert_eq!(k.run(Direction::Ingress, &wrong_dst), spoofed);
    assert_eq!(k.run(Direction::Egress, &wrong_src), spoofed);
    let reversed = frame::ip_frame(Tag::Vlan(VLAN), &ingress_v4());
    assert_eq!(k.run(Direction::Egress, &reversed), spoofed);
}

#[test]
fn truncated_headers_on_a_pod_vlan_are_dropped() {
    let k = kernel();
    let malformed = dropped(Reason::DropMalformed);
    let full = frame::ip_frame(Tag::Vlan(VLAN), &ingress_v4());
    // Cut inside the tag, inside the IPv4 header, then inside the TCP header.
    for len in [16, 18 + 10, 18 + 20 + 10] {
        assert_eq!(
            k.run(Direction::Ingress, &full[..len]),
            malformed,
            "cut at {len}"
        );
    }
    // A header length below 20 bytes is inconsistent.
    let mut bad_ihl = full.clone();
    bad_ihl[18] = 0x44;
    assert_eq!(k.run(Direction::Ingress, &bad_ihl), malformed);
}

#[test]
fn stacked_tags_and_unknown_ethertypes_on_a_pod_vlan_are_dropped() {
    let k = kernel();
    let ip = ingress_v4().to_bytes();
    let qinq = frame::ethernet(Tag::Stacked(VLAN, 7), frame::ETH_P_IPV4, &ip);
    let mpls = frame::ethernet(Tag::Vlan(VLAN), 0x8847, &ip);
    let unsupported = dropped(Reason::DropUnsupportedL2);
    assert_eq!(k.run(Direction::Ingress, &qinq), unsupported);
    assert_eq!(k.run(Direction::Egress, &mpls), unsupported);
}

#[test]
fn arp_of_the_pod_passes_and_spoofed_arp_is_dropped() {
    let k = kernel();
    let f = frame::arp_frame(Tag::Vlan(VLAN), POD_V4.octets(), PEER_V4.octets());
    let link_layer = Outcome {
        passed: true,
        reason: Reason::PassLinkLayer,
        would_drop: false,
        redirected: false,
    };
    assert_eq!(k.run(Direction::Egress, &f), link_layer);
    // A pod announcing another address is spoofing.
    let spoofed = frame::arp_frame(Tag::Vlan(VLAN), PEER_V4.octets(), POD_V4.octets());
    assert_eq!(
        k.run(Direction::Egress, &spoofed),
        dropped(Reason::DropSpoofed)
    );
}

#[test]
fn ipv6_extension_headers_are_skipped() {
    let k = kernel();
    let mut ip = tcp(PEER_V6.into(), POD_V6.into()).to_bytes();
    // Insert an 8-byte hop-by-hop header between the fixed header and TCP.
    let tcp_proto = ip[6];
    ip[6] = 0;
    let payload_len = u16::from_be_bytes([ip[4], ip[5]]) + 8;
    ip[4..6].copy_from_slice(&payload_len.to_be_bytes());
    let hop_by_hop = [tcp_proto, 0, 1, 4, 0, 0, 0, 0];
    ip.splice(40..40, hop_by_hop);
    let f = frame::ethernet(Tag::Vlan(VLAN), frame::ETH_P_IPV6, &ip);
    assert_eq!(k.run(Direction::Ingress, &f), PASS_NEW);
    // The same header chain cut inside the extension header is malformed.
    assert_eq!(
        k.run(Direction::Ingress, &f[..18 + 40 + 4]),
        dropped(Reason::DropMalformed)
    );
}

/// Neighbour and router discovery pass before any group only as EC2 passes
/// them: hop limit 255 and the pod's side its own, link-local, unspecified
/// (DAD) or a discovery group. Anything else of those types is ICMPv6 like any
/// other: anti-spoofing, then a policy that allows no ICMPv6 at all.
#[test]
fn neighbour_discovery_passes_only_as_ec2_passes_it() {
    let https = L4Match::Ports {
        protocol: 6,
        from: 443,
        to: 443,
    };
    let tcp_only = || vec![rule(https, "::/0")];
    let closed = group("sg-0closed", tcp_only(), tcp_only());
    let pod = branch_pod("pod", VLAN, POD_V4, Some(POD_V6), &["sg-0closed"]);
    let k = Kernel::load(&model(
        node_config(vec!["sg-0closed".into()]),
        vec![closed],
        vec![pod],
    ));
    let v6 = |s: &str| -> IpAddr { s.parse().expect("address") };
    let nd = |src: IpAddr, dst: IpAddr, icmp_type: u8, hop_limit: u8| {
        let ip = Ip {
            src,
            dst,
            l4: L4::Icmp {
                icmp_type,
                code: 0,
                id: 0,
            },
        };
        let mut f = frame::ip_frame(Tag::Vlan(VLAN), &ip);
        frame::set_hop_limit(&mut f, Tag::Vlan(VLAN), hop_limit);
        f
    };
    let link_layer = Outcome {
        passed: true,
        reason: Reason::PassLinkLayer,
        would_drop: false,
        redirected: false,
    };
    let (own, peer, router) = (IpAddr::V6(POD_V6), IpAddr::V6(PEER_V6), v6("fe80::1"));
    let solicited = v6("ff02::1:ff00:20");
    let cases = [
        (Direction::Ingress, nd(router, own, 135, 255), link_layer),
        (
            Direction::Ingress,
            nd(router, solicited, 135, 255),
            link_layer,
        ),
        (
            Direction::Ingress,
            nd(router, v6("ff02::1"), 134, 255),
            link_layer,
        ),
        (
            Direction::Ingress,
            nd(router, v6("fe80::20"), 137, 255),
            link_layer,
        ),
        (
            Direction::Egress,
            nd(v6("::"), solicited, 135, 255),
            link_layer,
        ),
        (
            Direction::Egress,
            nd(own, v6("ff02::2"), 133, 255),
            link_layer,
        ),
        (
            Direction::Egress,
            nd(v6("fe80::20"), router, 136, 255),
            link_layer,
        ),
        // Forwarded by a router (hop limit below 255): ordinary ICMPv6, and the
        // policy allows none.
        (
            Direction::Ingress,
            nd(peer, own, 135, 254),
            dropped(Reason::DropPolicy),
        ),
        (
            Direction::Ingress,
            nd(router, own, 134, 64),
            dropped(Reason::DropPolicy),
        ),
        (
            Direction::Egress,
            nd(own, peer, 136, 1),
            dropped(Reason::DropPolicy),
        ),
        // Not a discovery group, or not the pod's side: not the pod's traffic.
        (
            Direction::Ingress,
            nd(router, v6("ff02::fb"), 135, 255),
            dropped(Reason::DropSpoofed),
        ),
        (
            Direction::Ingress,
            nd(router, v6("ff05::1:ff00:20"), 135, 255),
            dropped(Reason::DropSpoofed),
        ),
        (
            Direction::Ingress,
            nd(router, peer, 136, 255),
            dropped(Reason::DropSpoofed),
        ),
        (
            Direction::Egress,
            nd(peer, router, 136, 255),
            dropped(Reason::DropSpoofed),
        ),
        (
            Direction::Egress,
            nd(v6("ff02::1"), router, 136, 255),
            dropped(Reason::DropSpoofed),
        ),
    ];
    for (n, (direction, f, want)) in cases.into_iter().enumerate() {
        assert_eq!(
            k.run(direction, &f),
            want,
            "case {n}: {direction:?} {f:02x?}"
        );
    }
}

/// A pod that takes TCP 443 from the peer and nothing else, so a parser that
/// finds the transport header at the wrong offset reads other ports and the
/// verdict changes.
fn https_only() -> Kernel {
    let https = L4Match::Ports {
        protocol: 6,
        from: 443,
        to: 443,
    };
    let from_peer = || {
        vec![
            rule(https, "10.0.2.30/32"),
            rule(https, "2600:1f14:0:2::30/128"),
        ]
    };
    let locked = group("sg-0https", from_peer(), vec![]);
    let pod = branch_pod("pod", VLAN, POD_V4, Some(POD_V6), &["sg-0https"]);
    Kernel::load(&model(
        node_config(vec!["sg-0https".into()]),
        vec![locked],
        vec![pod],
    ))
}

/// A SYN from a source port of its own (`sport`), so each is a new flow.
fn syn_to(src: IpAddr, dst: IpAddr, port: u16, sport: u16) -> Ip {
    Ip {
        src,
        dst,
        l4: L4::Tcp {
            src: sport,
            dst: port,
            flags: frame::TCP_SYN,
        },
    }
}

/// Extension headers of every kind, in every legal order, are skipped to the
/// right byte: TCP 443 behind them is allowed, 444 refused. Hop-by-hop after
/// another header, two fragment headers and more headers than the parser
/// follows are malformed.
#[test]
fn ipv6_extension_chains_lead_to_the_right_transport_header() {
    use frame::ExtHeader::{Auth, DestOptions, Fragment, HopByHop, Routing};
    let k = https_only();
    let tag = Tag::Vlan(VLAN);
    let atomic = Fragment {
        id: 9,
        offset: 0,
        more: false,
    };
    let chains: [&[frame::ExtHeader]; 6] = [
        &[HopByHop { units: 0 }],
        &[HopByHop { units: 2 }, DestOptions { units: 1 }],
        &[Routing { units: 1 }, Auth { words: 4 }],
        &[
            HopByHop { units: 1 },
            Routing { units: 0 },
            atomic,
            DestOptions { units: 0 },
        ],
        &[
            DestOptions { units: 0 },
            Routing { units: 2 },
            DestOptions { units: 1 },
        ],
        &[Auth { words: 1 }, atomic],
    ];
    for (n, chain) in chains.into_iter().enumerate() {
        for (port, want) in [(443, PASS_NEW), (444, dropped(Reason::DropPolicy))] {
            let ip = syn_to(PEER_V6.into(), POD_V6.into(), port, 41000 + n as u16);
            let f = frame::ipv6_chain_frame(tag, &ip, chain, &ip.transport_bytes());
            assert_eq!(k.run(Direction::Ingress, &f), want, "{chain:?} port {port}");
        }
    }
    let malformed: [&[frame::ExtHeader]; 3] = [
        &[DestOptions { units: 0 }, HopByHop { units: 0 }],
        &[atomic, Routing { units: 0 }, atomic],
        &[
            HopByHop { units: 0 },
            Routing { units: 0 },
            DestOptions { units: 0 },
            Auth { words: 1 },
            DestOptions { units: 0 },
        ],
    ];
    let ip = syn_to(PEER_V6.into(), POD_V6.into(), 443, 42000);
    for chain in malformed {
        let f = frame::ipv6_chain_frame(tag, &ip, chain, &ip.transport_bytes());
        assert_eq!(
            k.run(Direction::Ingress, &f),
            dropped(Reason::DropMalformed),
            "{chain:?}"
        );
    }
    // A header longer than what is left of the frame is cut short, whatever follows.
    let f = frame::ipv6_chain_frame(tag, &ip, &[DestOptions { units: 3 }], &[]);
    let cut = &f[..f.len() - 8];
    assert_eq!(
        k.run(Direction::Ingress, cut),
        dropped(Reason::DropMalformed)
    );
}

/// IPv4 options are skipped (IHL), and a header whose options are not all there is malformed.
#[test]
fn ipv4_options_lead_to_the_right_transport_header() {
    let k = https_only();
    let tag = Tag::Vlan(VLAN);
    for (port, want) in [(443, PASS_NEW), (444, dropped(Reason::DropPolicy))] {
        let ip = syn_to(PEER_V4.into(), POD_V4.into(), port, 40000);
        let mut f = frame::ip_frame(tag, &ip);
        // Eight bytes of no-op options: IHL 7.
        f[18] = 0x47;
        let total = u16::from_be_bytes([f[20], f[21]]) + 8;
        f[20..22].copy_from_slice(&total.to_be_bytes());
        f.splice(38..38, [1; 8]);
        assert_eq!(k.run(Direction::Ingress, &f), want, "port {port}");
        let mut cut = f.clone();
        cut[18] = 0x4f;
        cut.truncate(18 + 40);
        assert_eq!(
            k.run(Direction::Ingress, &cut),
            dropped(Reason::DropMalformed)
        );
    }
}

/// Fragments of both families: the first fragment is judged by its transport
/// header (also behind headers after the fragment header), the later ones by
/// the first's verdict; a later fragment whose first was refused or never came
/// is dropped, and its payload is never read as headers.
#[test]
fn fragments_of_both_families_follow_their_first_fragment() {
    use frame::ExtHeader::{DestOptions, Fragment as FragmentHeader};
    let k = https_only();
    let tag = Tag::Vlan(VLAN);
    let peers: [(IpAddr, IpAddr); 2] = [
        (PEER_V4.into(), POD_V4.into()),
        (PEER_V6.into(), POD_V6.into()),
    ];
    for (n, (peer, pod)) in peers.into_iter().enumerate() {
        let family = if peer.is_ipv4() { "IPv4" } else { "IPv6" };
        for (id, port, first_want, later_want) in [
            (0x10 + n as u16, 443, PASS_NEW, Reason::PassFragment),
            (
                0x20 + n as u16,
                444,
                dropped(Reason::DropPolicy),
                Reason::DropFragment,
            ),
        ] {
            let ip = syn_to(peer, pod, port, 43000);
            let first = frame::Fragment {
                id,
                offset: 0,
                more: true,
            };
            let mut payload = ip.transport_bytes();
            payload.resize(24, 0);
            let f = frame::fragment_frame(tag, &ip, first, &payload);
            assert_eq!(
                k.run(Direction::Ingress, &f),
                first_want,
                "{family} first to {port}"
            );
            let later = frame::Fragment {
                offset: 3,
                more: false,
                ..first
            };
            // The later fragment's payload looks like a destination options header.
            let f = frame::fragment_frame(tag, &ip, later, &[60, 0, 1, 4, 0, 0, 0, 0]);
            let outcome = k.run(Direction::Ingress, &f);
            assert_eq!(outcome.reason, later_want, "{family} later to {port}");
        }
        let stray = frame::Fragment {
            id: 0x30 + n as u16,
            offset: 5,
            more: true,
        };
        let ip = syn_to(peer, pod, 443, 43001);
        let f = frame::fragment_frame(tag, &ip, stray, &[0; 16]);
        assert_eq!(
            k.run(Direction::Ingress, &f),
            dropped(Reason::DropFragment),
            "{family} later fragment without its first"
        );
    }
    // IPv6: headers after the fragment header in the first fragment; its
    // datagram is the same for the later fragments (RFC 8200 reassembles by
    // addresses and identification).
    let ip = syn_to(PEER_V6.into(), POD_V6.into(), 443, 43002);
    let first = [
        FragmentHeader {
            id: 0x77,
            offset: 0,
            more: true,
        },
        DestOptions { units: 0 },
    ];
    let f = frame::ipv6_chain_frame(tag, &ip, &first, &ip.transport_bytes());
    assert_eq!(k.run(Direction::Ingress, &f), PASS_NEW);
    let later = [FragmentHeader {
        id: 0x77,
        offset: 4,
        more: false,
    }];
    let f = frame::ipv6_chain_frame(tag, &ip, &later, &[0; 8]);
    assert_eq!(k.run(Direction::Ingress, &f).reason, Reason::PassFragment);
}
