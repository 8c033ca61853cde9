//! IPv4 fragments: later fragments follow their first fragment's verdict.

use super::support::*;

#[test]
fn later_fragments_follow_an_allowed_first_fragment() {
    let ct = Ct::new();
    let tag = Tag::Vlan(A_VLAN);
    // A large UDP datagram out (egress allows everything), 0x4242, in three fragments.
    let datagram = udp(A, 5000, SERVER, 9999);
    let mut first_payload = datagram.transport_bytes();
    first_payload.resize(24, 0xaa);
    let fragment = |offset, more| Fragment {
        id: 0x4242,
        offset,
        more,
    };
    let first = frame::ipv4_fragment_frame(tag, &datagram, fragment(0, true), &first_payload);
    ct.frame("first fragment", Egress, &first, Reason::PassNew);
    assert!(ct.entry(&ct_key(A_VLAN, Egress, &datagram)).is_some());
    let middle = frame::ipv4_fragment_frame(tag, &datagram, fragment(3, true), &[0xbb; 24]);
    ct.frame("middle fragment", Egress, &middle, Reason::PassFragment);
    let last = frame::ipv4_fragment_frame(tag, &datagram, fragment(6, false), &[0xcc; 8]);
    ct.frame("last fragment", Egress, &last, Reason::PassFragment);
    let other_id = Fragment {
        id: 0x4243,
        ..fragment(3, true)
    };
    let stranger = frame::ipv4_fragment_frame(tag, &datagram, other_id, &[0xbb; 24]);
    ct.frame(
        "a fragment of another datagram",
        Egress,
        &stranger,
        Reason::DropFragment,
    );

    // An allowed first fragment coming in (TCP 8080 from the VPC).
    let syn = tcp(VPC_HOST, 40000, A, 8080, TCP_SYN);
    let in_fragment = |offset, more| Fragment {
        id: 0x77,
        offset,
        more,
    };
    let first = frame::ipv4_fragment_frame(tag, &syn, in_fragment(0, true), &syn.transport_bytes());
    ct.frame("first fragment in", Ingress, &first, Reason::PassNew);
    let later = frame::ipv4_fragment_frame(tag, &syn, in_fragment(3, false), &[1; 16]);
    ct.frame("later fragment in", Ingress, &later, Reason::PassFragment);
    // The same datagram ID towards another pod belongs to another datagram.
    let to_b = tcp(VPC_HOST, 40000, B, 8080, TCP_SYN);
    let later_b =
        frame::ipv4_fragment_frame(Tag::Vlan(B_VLAN), &to_b, in_fragment(3, false), &[1; 16]);
    ct.frame(
        "later fragment to B",
        Ingress,
        &later_b,
        Reason::DropFragment,
    );
}

#[test]
fn later_fragments_of_a_denied_datagram_are_dropped() {
    let ct = Ct::new();
    let tag = Tag::Vlan(A_VLAN);
    // A admits only TCP 8080: a UDP datagram to 8080 is denied at its first fragment.
    let datagram = udp(VPC_HOST, 5000, A, 8080);
    let fragment = |offset, more| Fragment {
        id: 0x99,
        offset,
        more,
    };
    let mut payload = datagram.transport_bytes();
    payload.resize(16, 0);
    let first = frame::ipv4_fragment_frame(tag, &datagram, fragment(0, true), &payload);
    ct.frame("first fragment", Ingress, &first, Reason::DropPolicy);
    let later = frame::ipv4_fragment_frame(tag, &datagram, fragment(2, false), &[2; 8]);
    ct.frame("later fragment", Ingress, &later, Reason::DropFragment);
    assert_eq!(ct.vlan_flows(A_VLAN), 0);
}

#[test]
fn a_later_fragment_without_its_first_is_dropped_and_matches_no_port_rule() {
    let ct = Ct::new();
    let tag = Tag::Vlan(A_VLAN);
    // Whole, this segment is allowed (TCP 8080 from the VPC) ...
    let syn = tcp(VPC_HOST, 40000, A, 8080, TCP_SYN);
    ct.send(
        "the whole segment",
        A_VLAN,
        Ingress,
        &tcp(VPC_HOST, 40001, A, 8080, TCP_SYN),
        Reason::PassNew,
    );
    // ... but as a later fragment its bytes are not a TCP header, and its first
    // fragment was never seen (lost, or sent after it).
    let fragment = Fragment {
        id: 0x55,
        offset: 1,
        more: false,
    };
    let later = frame::ipv4_fragment_frame(tag, &syn, fragment, &syn.transport_bytes());
    ct.frame(
        "a later fragment that looks like TCP 8080",
        Ingress,
        &later,
        Reason::DropFragment,
    );
    assert!(ct.entry(&ct_key(A_VLAN, Ingress, &syn)).is_none());
    // The first fragment arriving afterwards does not revive the earlier drop, but
    // later fragments after it pass.
    let first = frame::ipv4_fragment_frame(
        tag,
        &syn,
        Fragment {
            offset: 0,
            more: true,
            ..fragment
        },
        &[syn.transport_bytes(), vec![0; 4]].concat(),
    );
    ct.frame("the first fragment, late", Ingress, &first, Reason::PassNew);
    ct.frame(
        "the later fragment again",
        Ingress,
        &later,
        Reason::PassFragment,
    );
}
