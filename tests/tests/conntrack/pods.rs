//! Flows per pod: isolation, untracked flows, counters, a removed pod, rule changes and audit.

use super::support::*;

#[test]
fn a_flow_tracked_for_one_pod_never_admits_traffic_to_another() {
    let ct = Ct::new();
    let syn = tcp(A, 40000, SERVER, 443, TCP_SYN);
    ct.send("A's SYN", A_VLAN, Egress, &syn, Reason::PassNew);
    let to_b = tcp(SERVER, 443, B, 40000, TCP_SYN | TCP_ACK);
    ct.send(
        "the SYN-ACK to B",
        B_VLAN,
        Ingress,
        &to_b,
        Reason::DropPolicy,
    );
    let synack = syn.reply(TCP_SYN | TCP_ACK);
    ct.send(
        "A's SYN-ACK tagged with B's VLAN",
        B_VLAN,
        Ingress,
        &synack,
        Reason::DropSpoofed,
    );
    let error = frame::icmp_error_frame(Tag::Vlan(B_VLAN), SERVER.into(), B.into(), 3, 3, &syn);
    ct.frame(
        "an error to B quoting A's flow",
        Ingress,
        &error,
        Reason::DropPolicy,
    );
    assert_eq!(ct.vlan_flows(B_VLAN), 0);
    ct.send(
        "A's SYN-ACK",
        A_VLAN,
        Ingress,
        &synack,
        Reason::PassEstablished,
    );

    // Where B's rules allow the packet it is a new flow of B's, not A's reply.
    let from_a = tcp(A, 8080, VPC_HOST, 40000, TCP_SYN);
    ct.send(
        "A to the VPC host",
        A_VLAN,
        Egress,
        &from_a,
        Reason::PassNew,
    );
    let to_b = tcp(VPC_HOST, 40000, B, 8080, TCP_SYN | TCP_ACK);
    ct.send("the VPC host to B", B_VLAN, Ingress, &to_b, Reason::PassNew);
    let entry = ct.expect_entry("B's flow", &ct_key(B_VLAN, Ingress, &to_b));
    assert_eq!(usize::from(entry.origin), DIR_INGRESS);
    assert_eq!(ct.rule_of(&entry), Some(&rref("sg-locked", Ingress, 0)));
}

#[test]
fn flows_allowed_from_everywhere_with_the_reverse_all_open_are_untracked() {
    let ct = Ct::new();
    let cases = [
        (Ingress, tcp(CLIENT, 50000, C, 443, TCP_SYN), true),
        (
            Ingress,
            tcp(IpAddr::from(SERVER6), 50001, C6, 22, TCP_SYN),
            true,
        ),
        (Egress, tcp(C, 40000, SERVER, 443, TCP_SYN), true),
        (Egress, udp(C, 5000, SERVER, 53), true),
        (Ingress, udp(CLIENT, 5000, C, 5001), true),
        // ICMP and other protocols are always tracked.
        (Egress, icmp(C, SERVER, 8, 1), false),
        (Egress, other(C, SERVER, 47), false),
    ];
    ct.assert_tracking("C's flow", C_VLAN, &cases);
    assert_eq!(ct.vlan_flows(C_VLAN), 2);
    // The untracked flow's next packet is judged (and allowed) again, still without an entry.
    let answer = tcp(C, 443, CLIENT, 50000, TCP_SYN | TCP_ACK);
    ct.send("C's answer", C_VLAN, Egress, &answer, Reason::PassNew);
    assert_eq!(ct.vlan_flows(C_VLAN), 2);
}

#[test]
fn untracked_needs_the_reverse_direction_open_on_all_ports() {
    // D: ingress every TCP port from 0.0.0.0/0; egress TCP 443 and UDP 53 to 0.0.0.0/0.
    let ct = Ct::new();
    let cases = [
        // Egress does not open every TCP port: tracked.
        (Ingress, tcp(CLIENT, 50000, D, 22, TCP_SYN), false),
        // Ingress opens every TCP port from everywhere: untracked.
        (Egress, tcp(D, 40000, SERVER, 443, TCP_SYN), true),
        // Ingress opens no UDP: tracked.
        (Egress, udp(D, 5000, SERVER, 53), false),
    ];
    ct.assert_tracking("D's flow", D_VLAN, &cases);
    assert_eq!(ct.vlan_flows(D_VLAN), 2);
}

#[test]
fn entries_count_packets_and_bytes_per_direction() {
    let ct = Ct::new();
    let tag = Tag::Vlan(A_VLAN);
    let syn = tcp(A, 40000, SERVER, 443, TCP_SYN);
    let key = ct_key(A_VLAN, Egress, &syn);
    let frames = [
        (Egress, frame::ip_frame(tag, &syn), Reason::PassNew),
        (
            Ingress,
            frame::ip_frame(tag, &syn.reply(TCP_SYN | TCP_ACK)),
            Reason::PassEstablished,
        ),
        (
            Egress,
            frame::ip_frame_with_payload(tag, &tcp(A, 40000, SERVER, 443, TCP_ACK), &[7; 100]),
            Reason::PassEstablished,
        ),
        (
            Ingress,
            frame::ip_frame_with_payload(tag, &syn.reply(TCP_ACK), &[8; 1000]),
            Reason::PassEstablished,
        ),
        (
            Ingress,
            frame::ip_frame_with_payload(tag, &syn.reply(TCP_ACK | TCP_PSH), &[9; 500]),
            Reason::PassEstablished,
        ),
    ];
    let mut packets = [0u64; 2];
    let mut bytes = [0u64; 2];
    let mut last_seen = 0;
    for (direction, frame, reason) in &frames {
        ct.frame("segment", *direction, frame, *reason);
        let index = match direction {
            Ingress => DIR_INGRESS,
            Egress => DIR_EGRESS,
        };
        packets[index] += 1;
        bytes[index] += frame.len() as u64;
        let entry = ct.expect_entry("counting", &key);
        assert_eq!(entry.packets, packets, "packets");
        assert_eq!(entry.bytes, bytes, "bytes");
        assert!(entry.last_seen_ns >= last_seen && entry.last_seen_ns >= entry.created_ns);
        last_seen = entry.last_seen_ns;
    }
    // Dropped packets and other flows do not count.
    ct.send(
        "another port",
        A_VLAN,
        Ingress,
        &tcp(SERVER, 443, A, 40001, TCP_ACK),
        Reason::DropPolicy,
    );
    let entry = ct.expect_entry("after a drop", &key);
    assert_eq!((entry.packets, entry.bytes), (packets, bytes));
    // Ethernet + 802.1Q + IPv4 + TCP headers are 58 bytes a frame.
    assert_eq!(packets, [3, 2]);
    assert_eq!(bytes, [3 * 58 + 1000 + 500, 2 * 58 + 100]);
}

#[test]
fn removing_a_pod_deletes_its_flows_and_a_reused_vlan_inherits_none() {
    let mut ct = Ct::new();
    let a_syn = tcp(A, 40000, SERVER, 443, TCP_SYN);
    let b_syn = tcp(B, 40000, SERVER, 443, TCP_SYN);
    ct.send("A's SYN", A_VLAN, Egress, &a_syn, Reason::PassNew);
    ct.send(
        "A's query",
        A_VLAN,
        Egress,
        &udp(A, 5000, SERVER, 53),
        Reason::PassNew,
    );
    ct.send("B's SYN", B_VLAN, Egress, &b_syn, Reason::PassNew);
    assert_eq!(ct.vlan_flows(A_VLAN), 2);

    let mut without_a = ct.model.clone();
    without_a.pods.retain(|p| p.vlan != A_VLAN);
    ct.kernel.apply(&without_a);
    assert_eq!(ct.vlan_flows(A_VLAN), 0, "A's flows: {:?}", ct.flows());
    assert_eq!(ct.vlan_flows(B_VLAN), 1);
    let synack = a_syn.reply(TCP_SYN | TCP_ACK);
    ct.send(
        "A's SYN-ACK, A gone",
        A_VLAN,
        Ingress,
        &synack,
        Reason::DropUnknownVlan,
    );
    ct.send(
        "B's SYN-ACK",
        B_VLAN,
        Ingress,
        &b_syn.reply(TCP_SYN | TCP_ACK),
        Reason::PassEstablished,
    );

    // A new pod gets the VLAN (and, here, the same address and groups): no old flow.
    ct.kernel.apply(&ct.model);
    ct.send(
        "A's SYN-ACK to the new pod",
        A_VLAN,
        Ingress,
        &synack,
        Reason::DropPolicy,
    );
}

#[test]
fn rule_changes_keep_tracked_flows_and_cut_untracked_ones() {
    let mut ct = Ct::new();
    let syn = tcp(A, 40000, SERVER, 443, TCP_SYN);
    ct.send("A's SYN", A_VLAN, Egress, &syn, Reason::PassNew);
    let client = tcp(CLIENT, 50000, C, 443, TCP_SYN);
    ct.send("to C, untracked", C_VLAN, Ingress, &client, Reason::PassNew);

    let mut changed = ct.model.clone();
    changed.groups.get_mut("sg-app").unwrap().egress.clear();
    changed.groups.get_mut("sg-open").unwrap().ingress.clear();
    ct.kernel.apply(&changed);
    ct.send(
        "A's SYN-ACK",
        A_VLAN,
        Ingress,
        &syn.reply(TCP_SYN | TCP_ACK),
        Reason::PassEstablished,
    );
    ct.send(
        "A's ACK",
        A_VLAN,
        Egress,
        &tcp(A, 40000, SERVER, 443, TCP_ACK),
        Reason::PassEstablished,
    );
    ct.send(
        "A's new flow",
        A_VLAN,
        Egress,
        &tcp(A, 40001, SERVER, 443, TCP_SYN),
        Reason::DropPolicy,
    );
    ct.send(
        "C's client, next segment",
        C_VLAN,
        Ingress,
        &tcp(CLIENT, 50000, C, 443, TCP_ACK),
        Reason::DropPolicy,
    );
}

/// Audit (`enforcer.sgp.dev/action: audit`): a flow pod A's groups refuse passes
/// as a would-drop under its reason and leaves no entry, and so do the later
/// fragments of a refused datagram; what is not a policy verdict (a spoofed
/// source) still drops. Switching A to enforce (one `PODS` update) drops the
/// refused flow's next packet at once and keeps the flows A's groups allowed.
#[test]
fn an_audited_pod_passes_refused_flows_untracked_until_it_enforces() {
    let mut ct = Ct::new();
    let audit = |ct: &mut Ct, action| {
        ct.model
            .pods
            .iter_mut()
            .find(|p| p.vlan == A_VLAN)
            .unwrap()
            .action = action;
        ct.kernel.apply(&ct.model);
    };
    audit(&mut ct, EnforcingAction::Audit);
    let run = |ct: &Ct, direction, frame: &[u8]| ct.kernel.run(direction, frame);
    let would_drop = |reason| Outcome::expected(reason, true);
    // A admits only TCP 8080 in: UDP to 8080 is refused.
    let refused = udp(VPC_HOST, 5000, A, 8080);
    let refused_frame = frame::ip_frame(Tag::Vlan(A_VLAN), &refused);
    for _ in 0..2 {
        assert_eq!(
            run(&ct, Ingress, &refused_frame),
            would_drop(Reason::DropPolicy)
        );
    }
    assert!(ct.entry(&ct_key(A_VLAN, Ingress, &refused)).is_none());
    let fragment = |offset, more| Fragment {
        id: 0x5a,
        offset,
        more,
    };
    let first = frame::ipv4_fragment_frame(
        Tag::Vlan(A_VLAN),
        &refused,
        fragment(0, true),
        &refused.transport_bytes(),
    );
    assert_eq!(run(&ct, Ingress, &first), would_drop(Reason::DropPolicy));
    let later =
        frame::ipv4_fragment_frame(Tag::Vlan(A_VLAN), &refused, fragment(3, false), &[7; 8]);
    assert_eq!(run(&ct, Ingress, &later), would_drop(Reason::DropFragment));
    let spoofed = frame::ip_frame(Tag::Vlan(A_VLAN), &udp(B, 5000, VPC_HOST, 53));
    assert_eq!(
        run(&ct, Egress, &spoofed),
        Outcome::expected(Reason::DropSpoofed, true)
    );
    assert!(
        !run(&ct, Egress, &spoofed).passed,
        "audit never passes spoofing"
    );
    let allowed = tcp(VPC_HOST, 40000, A, 8080, TCP_SYN);
    ct.send("allowed SYN", A_VLAN, Ingress, &allowed, Reason::PassNew);
    assert_eq!(ct.vlan_flows(A_VLAN), 1, "only the allowed flow is tracked");
    let traffic = ct.kernel.maps.pod_traffic(A_VLAN).expect("POD_TRAFFIC");
    assert_eq!(
        (
            traffic.would_drop_packets,
            traffic.denied_packets,
            traffic.allowed_packets
        ),
        (4, 2, 1)
    );

    audit(&mut ct, EnforcingAction::Enforce);
    assert_eq!(
        run(&ct, Ingress, &refused_frame),
        Outcome::expected(Reason::DropPolicy, false)
    );
    let reply = allowed.reply(TCP_SYN | TCP_ACK);
    ct.send(
        "the allowed flow's reply",
        A_VLAN,
        Egress,
        &reply,
        Reason::PassEstablished,
    );
}
