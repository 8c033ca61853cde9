//! Traffic security groups never filter (sg-semantics.md §5): addresses, DHCP,
//! and neighbour discovery judged per packet.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use super::query::{L4Packet, L4Query, PROTO_UDP, Query};
use crate::model::{BranchPod, Cidr, Direction, Model};

/// Traffic security groups never filter (sg-semantics.md §5).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Unfiltered {
    /// The VPC resolver: primary VPC CIDR base + 2, 169.254.169.253, fd00:ec2::253.
    AmazonDns,
    /// Instance metadata: 169.254.169.254, fd00:ec2::254.
    Imds,
    /// Amazon Time Sync: 169.254.169.123, fd00:ec2::123.
    TimeSync,
    /// The pod subnet's router, base + 1.
    SubnetRouter,
    /// Windows license activation: 169.254.169.250 and 169.254.169.251.
    WindowsActivation,
    /// The ECS task metadata endpoint: 169.254.170.2.
    EcsTaskMetadata,
    /// DHCP (UDP 67/68) and DHCPv6 (UDP 546/547).
    Dhcp,
}

impl Unfiltered {
    pub fn describe(self) -> &'static str {
        match self {
            Self::AmazonDns => "Amazon DNS resolver",
            Self::Imds => "instance metadata service",
            Self::TimeSync => "Amazon Time Sync",
            Self::SubnetRouter => "the pod subnet's router",
            Self::WindowsActivation => "Windows license activation",
            Self::EcsTaskMetadata => "the ECS task metadata endpoint",
            Self::Dhcp => "DHCP",
        }
    }
}

/// Node-wide addresses never filtered, for every pod.
pub fn node_unfiltered(model: &Model) -> Vec<(IpAddr, Unfiltered)> {
    let mut out = Vec::new();
    if let Some(vpc) = model.node.vpc_cidrs.iter().find(|c| c.is_ipv4()) {
        out.push((vpc.nth(2), Unfiltered::AmazonDns));
    }
    let fixed = [
        (
            Ipv4Addr::new(169, 254, 169, 253),
            0x253,
            Unfiltered::AmazonDns,
        ),
        (Ipv4Addr::new(169, 254, 169, 254), 0x254, Unfiltered::Imds),
        (
            Ipv4Addr::new(169, 254, 169, 123),
            0x123,
            Unfiltered::TimeSync,
        ),
    ];
    for (v4, v6_low, kind) in fixed {
        out.push((IpAddr::V4(v4), kind));
        out.push((
            IpAddr::V6(Ipv6Addr::new(0xfd00, 0xec2, 0, 0, 0, 0, 0, v6_low)),
            kind,
        ));
    }
    // IPv4 only, as the VPC user guide lists them ("Security groups": traffic
    // security groups do not filter).
    for (v4, kind) in [
        (
            Ipv4Addr::new(169, 254, 169, 250),
            Unfiltered::WindowsActivation,
        ),
        (
            Ipv4Addr::new(169, 254, 169, 251),
            Unfiltered::WindowsActivation,
        ),
        (Ipv4Addr::new(169, 254, 170, 2), Unfiltered::EcsTaskMetadata),
    ] {
        out.push((IpAddr::V4(v4), kind));
    }
    out
}

/// Addresses never filtered for this pod only: its subnets' routers.
pub fn pod_unfiltered(pod: &BranchPod) -> Vec<IpAddr> {
    pod.subnet_v4
        .iter()
        .chain(pod.subnet_v6.iter())
        .map(|subnet| subnet.nth(1))
        .collect()
}

/// Protocol-level traffic never filtered: DHCP as DHCP (to the server port at
/// the broadcast or servers' multicast address; DHCPv6 replies from a
/// link-local server; the subnet router is unfiltered by address). Neighbour
/// discovery is link-layer plumbing, judged per packet before any flow
/// ([`neighbour_discovery`]); what fails that is ordinary ICMPv6 here.
pub fn unfiltered_l4(direction: Direction, peer: IpAddr, packet: L4Packet) -> Option<Unfiltered> {
    let dhcp = match (direction, peer) {
        (Direction::Egress, IpAddr::V4(v4)) => packet.selector == 67 && v4 == Ipv4Addr::BROADCAST,
        (Direction::Egress, IpAddr::V6(v6)) => {
            packet.selector == 547 && v6 == Ipv6Addr::new(0xff02, 0, 0, 0, 0, 0, 1, 2)
        }
        (Direction::Ingress, IpAddr::V4(_)) => false,
        (Direction::Ingress, IpAddr::V6(v6)) => {
            packet.selector == 546 && v6.is_unicast_link_local()
        }
    };
    (packet.protocol == PROTO_UDP && dhcp).then_some(Unfiltered::Dhcp)
}

/// The ICMPv6 types of router and neighbour discovery (RFC 4861 §4): router
/// solicitation and advertisement, neighbour solicitation and advertisement, redirect.
pub const NEIGHBOUR_DISCOVERY_TYPES: std::ops::RangeInclusive<u8> = 133..=137;

/// Whether an ICMPv6 packet of `pod` passes as neighbour or router discovery, as
/// EC2 passes it (sg-semantics.md §5): a discovery type, hop limit 255 (RFC 4861
/// receivers drop anything else: it crossed no router), and the pod's side (the
/// destination to the pod, the source from it) its own address, link-local, the
/// unspecified address of duplicate address detection (from the pod), or a
/// group discovery is sent to (to the pod: all-nodes `ff02::1`, all-routers
/// `ff02::2`, solicited-node `ff02::1:ff00:0/104`, RFC 4291 §2.7.1). Only an
/// unfragmented packet can be discovery (RFC 6980), which the caller knows.
/// Anything else of those types is ordinary ICMPv6, checked like any packet.
pub fn neighbour_discovery(
    pod: &BranchPod,
    direction: Direction,
    src: Ipv6Addr,
    dst: Ipv6Addr,
    hop_limit: u8,
    icmp_type: u8,
) -> bool {
    if !NEIGHBOUR_DISCOVERY_TYPES.contains(&icmp_type) || hop_limit != 255 {
        return false;
    }
    let (pod_side, to_pod) = match direction {
        Direction::Ingress => (dst, true),
        Direction::Egress => (src, false),
    };
    let all_nodes = Ipv6Addr::new(0xff02, 0, 0, 0, 0, 0, 0, 1);
    let all_routers = Ipv6Addr::new(0xff02, 0, 0, 0, 0, 0, 0, 2);
    let solicited_node = Cidr::new(
        IpAddr::V6(Ipv6Addr::new(0xff02, 0, 0, 0, 0, 1, 0xff00, 0)),
        104,
    )
    .expect("a /104");
    pod.ipv6 == Some(pod_side)
        || pod_side.is_unicast_link_local()
        || if to_pod {
            pod_side == all_nodes
                || pod_side == all_routers
                || solicited_node.contains(IpAddr::V6(pod_side))
        } else {
            pod_side.is_unspecified()
        }
}

/// Whether the query is never filtered for this pod, and as what.
pub fn unfiltered(model: &Model, pod: &BranchPod, query: &Query) -> Option<Unfiltered> {
    if let Some(&(_, kind)) = node_unfiltered(model)
        .iter()
        .find(|(addr, _)| *addr == query.peer)
    {
        return Some(kind);
    }
    if pod_unfiltered(pod).contains(&query.peer) {
        return Some(Unfiltered::SubnetRouter);
    }
    match query.l4 {
        L4Query::Packet(packet) => unfiltered_l4(query.direction, query.peer, packet),
        L4Query::AllTraffic => None,
    }
}

#[cfg(test)]
mod tests {
    use super::super::fixtures::pod;
    use super::*;
    use crate::model::EnforcingMode;

    #[test]
    fn neighbour_discovery_passes_only_as_ec2_passes_it() {
        let mut pod = pod(5, "10.0.64.5", &["sg-web"], EnforcingMode::Strict);
        pod.ipv6 = Some("2600:1f00::5".parse().unwrap());
        let v6 = |s: &str| s.parse::<Ipv6Addr>().unwrap();
        let (own, peer) = ("2600:1f00::5", "2600:1f00::9");
        let cases = [
            // (direction, source, destination, hop limit, type, passes)
            (Direction::Ingress, "fe80::1", own, 255, 135, true),
            (Direction::Ingress, "fe80::1", "fe80::5", 255, 136, true),
            (Direction::Ingress, "fe80::1", "ff02::1", 255, 134, true),
            (Direction::Ingress, "fe80::1", "ff02::2", 255, 133, true),
            (
                Direction::Ingress,
                "fe80::1",
                "ff02::1:ff00:5",
                255,
                135,
                true,
            ),
            (
                Direction::Ingress,
                "fe80::1",
                "ff02::1:ff12:3456",
                255,
                137,
                true,
            ),
            (Direction::Egress, own, "ff02::1:ff00:9", 255, 135, true),
            (Direction::Egress, "::", "ff02::1:ff00:5", 255, 135, true),
            (Direction::Egress, "fe80::5", "ff02::2", 255, 133, true),
            // Hop limit below 255: forwarded by a router, so not discovery.
            (Direction::Ingress, "fe80::1", own, 254, 135, false),
            (Direction::Ingress, peer, own, 64, 136, false),
            (Direction::Egress, own, peer, 1, 135, false),
            // Other types, other groups, the wrong side.
            (Direction::Ingress, "fe80::1", own, 255, 138, false),
            (Direction::Ingress, "fe80::1", own, 255, 128, false),
            (Direction::Ingress, "fe80::1", "ff02::fb", 255, 135, false),
            (
                Direction::Ingress,
                "fe80::1",
                "ff05::1:ff00:5",
                255,
                135,
                false,
            ),
            (
                Direction::Ingress,
                "fe80::1",
                "ff02::1:fe00:5",
                255,
                135,
                false,
            ),
            (Direction::Ingress, "fe80::1", "::", 255, 135, false),
            (Direction::Ingress, "fe80::1", peer, 255, 135, false),
            (Direction::Egress, "ff02::1", peer, 255, 136, false),
            (Direction::Egress, peer, "ff02::1", 255, 136, false),
        ];
        for (direction, src, dst, hop_limit, icmp_type, passes) in cases {
            assert_eq!(
                neighbour_discovery(&pod, direction, v6(src), v6(dst), hop_limit, icmp_type),
                passes,
                "{direction:?} {src} -> {dst} hop limit {hop_limit} type {icmp_type}"
            );
        }
    }
}
