//! A state larger than the maps hold is refused with the full map's name and capacity,
//! and the kernel keeps enforcing the state before it.

use std::net::{IpAddr, Ipv4Addr};

use enforcer::compile;
use enforcer::kernel::maps::MapsError;
use enforcer::model::{Cidr, Direction, L4Match, Peer, Rule};
use enforcer_common::{MAX_PEER_ENTRIES, Reason, map_names};
use enforcer_tests::frame::{self, TCP_SYN, Tag};
use enforcer_tests::kernel::Kernel;
use enforcer_tests::models::{branch_pod, group, model, node_config, rule};

const VLAN: u16 = 7;
const WEB: Ipv4Addr = Ipv4Addr::new(10, 0, 1, 101);

#[test]
fn a_state_over_capacity_names_the_full_map_and_keeps_the_one_before() {
    let https = L4Match::Ports {
        protocol: 6,
        from: 443,
        to: 443,
    };
    let web = group("sg-0web", vec![rule(https, "10.0.0.0/16")], vec![]);
    let pod = branch_pod("web", VLAN, WEB, None, &["sg-0web"]);
    let small = model(node_config(vec!["sg-0web".into()]), vec![web], vec![pod]);
    let mut kernel = Kernel::load(&small);
    let client = Ipv4Addr::new(10, 0, 5, 5);
    let allowed = frame::ip_frame(
        Tag::Vlan(VLAN),
        &frame::tcp(client, 40000, WEB, 443, TCP_SYN),
    );
    assert_eq!(
        kernel.run(Direction::Ingress, &allowed).reason,
        Reason::PassNew
    );

    // One more rule, from a referenced group with more members than PEERS_V4 holds.
    let mut big = small.clone();
    let crowd = "sg-0crowd";
    big.groups
        .get_mut("sg-0web")
        .expect("sg-0web")
        .ingress
        .push(Rule {
            l4: L4Match::All,
            peer: Peer::Group(crowd.into()),
            description: None,
        });
    big.groups
        .insert(crowd.into(), group(crowd, vec![], vec![]));
    let first = u32::from(Ipv4Addr::new(11, 0, 0, 0));
    big.members.insert(
        crowd.into(),
        (0..MAX_PEER_ENTRIES + 1000)
            .map(|i| Cidr::host(IpAddr::V4(Ipv4Addr::from(first + i))))
            .collect(),
    );
    let enforced = kernel.maps.enforced().expect("enforced state").clone();
    let compiled = compile::compile_with(&big, Some(&enforced)).expect("compiles");
    let error = kernel
        .maps
        .apply(&compiled, &big.node)
        .expect_err("more entries than PEERS_V4 holds");
    assert!(
        matches!(
            error,
            MapsError::Full { map, capacity }
                if map == map_names::PEERS_V4 && capacity == MAX_PEER_ENTRIES
        ),
        "{error:?}"
    );
    assert!(error.to_string().contains("PEERS_V4 is full"), "{error}");

    // The pod still points at its old policy: HTTPS from the VPC passes, the crowd does not.
    kernel.maps.forget_flows(|_| true).expect("clear conntrack");
    assert_eq!(
        kernel.run(Direction::Ingress, &allowed).reason,
        Reason::PassNew
    );
    let member = Ipv4Addr::from(first + 5);
    let crowd_frame = frame::ip_frame(
        Tag::Vlan(VLAN),
        &frame::tcp(member, 40000, WEB, 22, TCP_SYN),
    );
    assert_eq!(
        kernel.run(Direction::Ingress, &crowd_frame).reason,
        Reason::DropPolicy
    );

    // The next apply reconciles with what the kernel holds, half-written entries included.
    kernel.apply(&small);
    assert_eq!(
        kernel.run(Direction::Ingress, &crowd_frame).reason,
        Reason::DropPolicy
    );
}
