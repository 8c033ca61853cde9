//! The frame stage of the programs, through `BPF_PROG_TEST_RUN`: VLAN from
//! the tag, untagged pass-through, unknown VLANs, anti-spoofing, malformed
//! and unsupported headers, ARP, IPv6 extension headers. The pod's policy
//! allows everything, so only this stage can drop.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use aya::Ebpf;
use aya::maps::{HashMap, LpmTrie, PerCpuArray, lpm_trie::Key};
use aya::programs::{SchedClassifier, TestRun, TestRunOptions};
use enforcer::ebpf::{TC_EGRESS, TC_INGRESS};
use enforcer_common::{
    EnforcingMode, NO_POLICY, POD_HAS_IPV4, POD_HAS_IPV6, PeerClass, PeerKeyV4, PeerKeyV6,
    PodEntry, PortKey, PortVerdict, Reason, map_names,
};
use enforcer_tests::frame::{self, Ip, L4, Tag};

const TC_ACT_OK: u32 = 0;
const TC_ACT_SHOT: u32 = 2;

const VLAN: u16 = 100;
const POD_V4: Ipv4Addr = Ipv4Addr::new(10, 0, 1, 20);
const POD_V6: Ipv6Addr = Ipv6Addr::new(0x2600, 0x1f14, 0, 1, 0, 0, 0, 0x20);
const PEER_V4: Ipv4Addr = Ipv4Addr::new(10, 0, 2, 30);
const PEER_V6: Ipv6Addr = Ipv6Addr::new(0x2600, 0x1f14, 0, 2, 0, 0, 0, 0x30);

/// Policy handle whose peer tries map every address to a class allowing every protocol.
const ALLOW_ALL: u32 = 1;

fn allow_everything(ebpf: &mut Ebpf) {
    let class = PeerClass { class: 1 };
    let policy = ALLOW_ALL.to_be_bytes();
    let mut v4: LpmTrie<_, PeerKeyV4, PeerClass> =
        LpmTrie::try_from(ebpf.map_mut(map_names::PEERS_V4).unwrap()).unwrap();
    v4.insert(
        &Key::new(
            32,
            PeerKeyV4 {
                policy,
                addr: [0; 4],
            },
        ),
        class,
        0,
    )
    .unwrap();
    let mut v6: LpmTrie<_, PeerKeyV6, PeerClass> =
        LpmTrie::try_from(ebpf.map_mut(map_names::PEERS_V6).unwrap()).unwrap();
    v6.insert(
        &Key::new(
            32,
            PeerKeyV6 {
                policy,
                addr: [0; 16],
            },
        ),
        class,
        0,
    )
    .unwrap();
    let mut ports: LpmTrie<_, PortKey, PortVerdict> =
        LpmTrie::try_from(ebpf.map_mut(map_names::PORTS).unwrap()).unwrap();
    let every_protocol = PortKey {
        class: 1u32.to_be_bytes(),
        protocol: 0,
        port: [0; 2],
        _pad: 0,
    };
    let verdict = PortVerdict { rule: 1, flags: 0 };
    ports
        .insert(&Key::new(32, every_protocol), verdict, 0)
        .unwrap();
}

struct Harness {
    ebpf: Ebpf,
}

impl Harness {
    fn new() -> Self {
        enforcer_tests::require_root();
        let mut ebpf = enforcer::ebpf::load().expect("load the embedded eBPF object");
        for name in [TC_INGRESS, TC_EGRESS] {
            let prog: &mut SchedClassifier = ebpf
                .program_mut(name)
                .unwrap_or_else(|| panic!("program {name} in the object"))
                .try_into()
                .expect("a TC classifier");
            prog.load()
                .unwrap_or_else(|e| panic!("verifier rejected {name}: {e}"));
        }
        allow_everything(&mut ebpf);
        let mut pods: HashMap<_, u16, PodEntry> =
            HashMap::try_from(ebpf.map_mut(map_names::PODS).expect("pod map")).unwrap();
        let entry = PodEntry {
            ipv4: POD_V4.octets(),
            ipv6: POD_V6.octets(),
            mode: EnforcingMode::Strict as u8,
            flags: POD_HAS_IPV4 | POD_HAS_IPV6,
            _pad: [0; 2],
            policies: [ALLOW_ALL, ALLOW_ALL, NO_POLICY, NO_POLICY],
        };
        pods.insert(VLAN, entry, 0).expect("insert pod");
        Self { ebpf }
    }

    fn run(&self, program: &str, frame: &[u8]) -> u32 {
        let prog: &SchedClassifier = self
            .ebpf
            .program(program)
            .expect("program")
            .try_into()
            .expect("a TC classifier");
        let mut opts = TestRunOptions::new();
        opts.data_in = Some(frame);
        prog.test_run(opts)
            .unwrap_or_else(|e| panic!("BPF_PROG_TEST_RUN of {program} failed: {e}"))
            .return_value
    }

    fn counter(&self, counter: Reason) -> u64 {
        let counters: PerCpuArray<_, u64> =
            PerCpuArray::try_from(self.ebpf.map(map_names::COUNTERS).expect("counters")).unwrap();
        counters
            .get(&(counter as u32), 0)
            .expect("counter slot")
            .iter()
            .sum()
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
    let h = Harness::new();
    let f = frame::ip_frame(Tag::Untagged, &ingress_v4());
    assert_eq!(h.run(TC_INGRESS, &f), TC_ACT_OK);
    assert_eq!(h.run(TC_EGRESS, &f), TC_ACT_OK);
    assert_eq!(h.counter(Reason::PassUntagged), 2);
}

#[test]
fn known_vlan_to_the_pod_passes_in_both_families() {
    let h = Harness::new();
    let v4 = frame::ip_frame(Tag::Vlan(VLAN), &ingress_v4());
    let v6 = frame::ip_frame(Tag::Vlan(VLAN), &tcp(PEER_V6.into(), POD_V6.into()));
    assert_eq!(h.run(TC_INGRESS, &v4), TC_ACT_OK);
    assert_eq!(h.run(TC_INGRESS, &v6), TC_ACT_OK);
    let egress = frame::ip_frame(Tag::Vlan(VLAN), &tcp(POD_V4.into(), PEER_V4.into()));
    assert_eq!(h.run(TC_EGRESS, &egress), TC_ACT_OK);
    assert_eq!(h.counter(Reason::PassNew), 3);
}

#[test]
fn unknown_vlan_is_dropped() {
    let h = Harness::new();
    let f = frame::ip_frame(Tag::Vlan(VLAN + 1), &ingress_v4());
    assert_eq!(h.run(TC_INGRESS, &f), TC_ACT_SHOT);
    assert_eq!(h.counter(Reason::DropUnknownVlan), 1);
}

#[test]
fn addresses_not_owned_by_the_pod_are_spoofed() {
    let h = Harness::new();
    let other = IpAddr::V4(Ipv4Addr::new(10, 0, 1, 99));
    let wrong_dst = frame::ip_frame(Tag::Vlan(VLAN), &tcp(PEER_V4.into(), other));
    let wrong_src = frame::ip_frame(Tag::Vlan(VLAN), &tcp(other, PEER_V4.into()));
    // The egress check looks at the source, the ingress check at the destination.
    assert_eq!(h.run(TC_INGRESS, &wrong_dst), TC_ACT_SHOT);
    assert_eq!(h.run(TC_EGRESS, &wrong_src), TC_ACT_SHOT);
    assert_eq!(
        h.run(TC_EGRESS, &frame::ip_frame(Tag::Vlan(VLAN), &ingress_v4())),
        TC_ACT_SHOT
    );
    assert_eq!(h.counter(Reason::DropSpoofed), 3);
}

#[test]
fn truncated_headers_on_a_pod_vlan_are_dropped() {
    let h = Harness::new();
    let full = frame::ip_frame(Tag::Vlan(VLAN), &ingress_v4());
    // Cut inside the IPv4 header, then inside the TCP header.
    for len in [18 + 10, 18 + 20 + 10] {
        assert_eq!(h.run(TC_INGRESS, &full[..len]), TC_ACT_SHOT, "cut at {len}");
    }
    // A header length below 20 bytes is inconsistent.
    let mut bad_ihl = full.clone();
    bad_ihl[18] = 0x44;
    assert_eq!(h.run(TC_INGRESS, &bad_ihl), TC_ACT_SHOT);
    assert_eq!(h.counter(Reason::DropMalformed), 3);
}

#[test]
fn stacked_tags_and_unknown_ethertypes_on_a_pod_vlan_are_dropped() {
    let h = Harness::new();
    let ip = ingress_v4().to_bytes();
    let qinq = frame::ethernet(Tag::Stacked(VLAN, 7), frame::ETH_P_IPV4, &ip);
    let mpls = frame::ethernet(Tag::Vlan(VLAN), 0x8847, &ip);
    assert_eq!(h.run(TC_INGRESS, &qinq), TC_ACT_SHOT);
    assert_eq!(h.run(TC_EGRESS, &mpls), TC_ACT_SHOT);
    assert_eq!(h.counter(Reason::DropUnsupportedL2), 2);
}

#[test]
fn arp_on_a_pod_vlan_passes() {
    let h = Harness::new();
    let f = frame::arp_frame(Tag::Vlan(VLAN), POD_V4.octets(), PEER_V4.octets());
    assert_eq!(h.run(TC_EGRESS, &f), TC_ACT_OK);
    // A pod announcing another address is spoofing.
    let spoofed = frame::arp_frame(Tag::Vlan(VLAN), PEER_V4.octets(), POD_V4.octets());
    assert_eq!(h.run(TC_EGRESS, &spoofed), TC_ACT_SHOT);
    assert_eq!(h.counter(Reason::PassLinkLayer), 1);
    assert_eq!(h.counter(Reason::DropSpoofed), 1);
}

#[test]
fn ipv6_extension_headers_are_skipped() {
    let h = Harness::new();
    let mut ip = tcp(PEER_V6.into(), POD_V6.into()).to_bytes();
    // Insert an 8-byte hop-by-hop header between the fixed header and TCP.
    let tcp_proto = ip[6];
    ip[6] = 0;
    let payload_len = u16::from_be_bytes([ip[4], ip[5]]) + 8;
    ip[4..6].copy_from_slice(&payload_len.to_be_bytes());
    let hop_by_hop = [tcp_proto, 0, 1, 4, 0, 0, 0, 0];
    ip.splice(40..40, hop_by_hop);
    let f = frame::ethernet(Tag::Vlan(VLAN), frame::ETH_P_IPV6, &ip);
    assert_eq!(h.run(TC_INGRESS, &f), TC_ACT_OK);
    // The same header chain cut inside the extension header is malformed.
    assert_eq!(h.run(TC_INGRESS, &f[..18 + 40 + 4]), TC_ACT_SHOT);
}
