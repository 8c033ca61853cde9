//! ICMP echo by identifier, ICMP errors related to tracked flows, and other protocols by addresses.

use super::support::*;

#[test]
fn icmp_echo_reply_is_matched_by_identifier() {
    let mut ct = Ct::new();
    for (pod, server, request_type) in [
        (IpAddr::from(A), IpAddr::from(SERVER), 8),
        (A6.into(), SERVER6.into(), 128),
    ] {
        let request = icmp(pod, server, request_type, 0x77);
        let key = ct_key(A_VLAN, Egress, &request);
        assert_eq!(key.pod_port, 0x77);
        ct.send("echo request", A_VLAN, Egress, &request, Reason::PassNew);
        assert_eq!(ct.expect_entry("request", &key).state, ct_state::ONE_WAY);
        let answer = request.reply(0);
        ct.send(
            "echo reply",
            A_VLAN,
            Ingress,
            &answer,
            Reason::PassEstablished,
        );
        assert_eq!(ct.expect_entry("reply", &key).state, ct_state::BOTH_WAYS);
        let mut other_id = answer;
        other_id.l4 = match answer.l4 {
            L4::Icmp {
                icmp_type, code, ..
            } => L4::Icmp {
                icmp_type,
                code,
                id: 0x78,
            },
            l4 => l4,
        };
        ct.send(
            "echo reply with another identifier",
            A_VLAN,
            Ingress,
            &other_id,
            Reason::DropPolicy,
        );
    }
    // ICMP flows idle out after 30 s.
    let young = icmp(A, SERVER, 8, 0x79);
    let old = icmp(A, SERVER, 8, 0x7a);
    for request in [&young, &old] {
        ct.send("echo request", A_VLAN, Egress, request, Reason::PassNew);
    }
    ct.age(&ct_key(A_VLAN, Egress, &young), 25);
    ct.age(&ct_key(A_VLAN, Egress, &old), 31);
    ct.send(
        "reply after 25 s",
        A_VLAN,
        Ingress,
        &young.reply(0),
        Reason::PassEstablished,
    );
    ct.send(
        "reply after 31 s",
        A_VLAN,
        Ingress,
        &old.reply(0),
        Reason::DropPolicy,
    );
}

#[test]
fn icmp_errors_quoting_a_tracked_flow_are_related() {
    let ct = Ct::new();
    let tag = Tag::Vlan(A_VLAN);
    // Port unreachable from the server about a UDP query.
    let query = udp(A, 5353, SERVER, 53);
    ct.send("UDP query", A_VLAN, Egress, &query, Reason::PassNew);
    let unreachable = frame::icmp_error_frame(tag, SERVER.into(), A.into(), 3, 3, &query);
    ct.frame(
        "port unreachable",
        Ingress,
        &unreachable,
        Reason::PassRelated,
    );
    // Fragmentation needed from a router on the path about a TCP segment.
    let syn = tcp(A, 40000, SERVER, 443, TCP_SYN);
    ct.send("SYN", A_VLAN, Egress, &syn, Reason::PassNew);
    let frag_needed = frame::icmp_error_frame(tag, ROUTER.into(), A.into(), 3, 4, &syn);
    ct.frame(
        "fragmentation needed",
        Ingress,
        &frag_needed,
        Reason::PassRelated,
    );
    // Time exceeded about an echo request (traceroute).
    let echo = icmp(A, SERVER, 8, 0x42);
    ct.send("echo request", A_VLAN, Egress, &echo, Reason::PassNew);
    let ttl = frame::icmp_error_frame(tag, ROUTER.into(), A.into(), 11, 0, &echo);
    ct.frame("time exceeded", Ingress, &ttl, Reason::PassRelated);
    // IPv6 packet too big from a router about a TCP segment.
    let syn6 = tcp(A6, 40000, SERVER6, 443, TCP_SYN);
    ct.send("SYN over IPv6", A_VLAN, Egress, &syn6, Reason::PassNew);
    let too_big = frame::icmp_error_frame(tag, ROUTER6.into(), A6.into(), 2, 0, &syn6);
    ct.frame("packet too big", Ingress, &too_big, Reason::PassRelated);
    // Related errors open no flow of their own.
    let flows = ct.flows();
    assert!(
        !flows
            .iter()
            .any(|(k, _)| matches!(k.protocol, 1 | 58) && k.pod_port == 0),
        "an ICMP error left an entry: {flows:?}"
    );
    assert_eq!(ct.vlan_flows(A_VLAN), 4);
}

#[test]
fn icmp_errors_quoting_an_untracked_or_expired_flow_are_judged_by_rules() {
    let mut ct = Ct::new();
    let tag = Tag::Vlan(A_VLAN);
    let never_sent = udp(A, 5354, SERVER, 53);
    let error = frame::icmp_error_frame(tag, SERVER.into(), A.into(), 3, 3, &never_sent);
    ct.frame(
        "port unreachable about nothing",
        Ingress,
        &error,
        Reason::DropPolicy,
    );
    let six = tcp(A6, 40000, SERVER6, 443, TCP_SYN);
    let error = frame::icmp_error_frame(tag, ROUTER6.into(), A6.into(), 2, 0, &six);
    ct.frame(
        "packet too big about nothing",
        Ingress,
        &error,
        Reason::DropPolicy,
    );

    let query = udp(A, 5355, SERVER, 53);
    ct.send("UDP query", A_VLAN, Egress, &query, Reason::PassNew);
    ct.age(&ct_key(A_VLAN, Egress, &query), UDP_TIMEOUT + 1);
    let error = frame::icmp_error_frame(tag, SERVER.into(), A.into(), 3, 3, &query);
    ct.frame(
        "port unreachable about an expired flow",
        Ingress,
        &error,
        Reason::DropPolicy,
    );
}

#[test]
fn icmp_errors_sent_by_the_pod_about_a_tracked_flow_are_related() {
    let ct = Ct::new();
    let tag = Tag::Vlan(B_VLAN);
    // B may send only TCP 443; the connection comes in on 8080.
    let syn = tcp(VPC_HOST, 40000, B, 8080, TCP_SYN);
    ct.send("SYN to B", B_VLAN, Ingress, &syn, Reason::PassNew);
    let synack = syn.reply(TCP_SYN | TCP_ACK);
    assert!(!ct.evaluate(B_VLAN, Egress, &synack).allowed);
    ct.send(
        "B's SYN-ACK",
        B_VLAN,
        Egress,
        &synack,
        Reason::PassEstablished,
    );
    let error = frame::icmp_error_frame(tag, B.into(), VPC_HOST.into(), 3, 1, &syn);
    ct.frame(
        "B's host unreachable about the flow",
        Egress,
        &error,
        Reason::PassRelated,
    );
    let other = tcp(VPC_HOST, 40001, B, 8080, TCP_SYN);
    let error = frame::icmp_error_frame(tag, B.into(), VPC_HOST.into(), 3, 1, &other);
    ct.frame(
        "B's host unreachable about no flow",
        Egress,
        &error,
        Reason::DropPolicy,
    );
}

#[test]
fn other_protocols_are_tracked_by_addresses_for_600_seconds() {
    wait_for_uptime(601);
    let mut ct = Ct::new();
    const GRE: u8 = 47;
    let young = other(A, SERVER, GRE);
    let old = other(A, Ipv4Addr::new(192, 0, 2, 11), GRE);
    for ip in [&young, &old] {
        ct.send("GRE out", A_VLAN, Egress, ip, Reason::PassNew);
        let key = ct_key(A_VLAN, Egress, ip);
        assert_eq!(ct.expect_entry("GRE", &key).state, ct_state::ONE_WAY);
        ct.send(
            "GRE back",
            A_VLAN,
            Ingress,
            &ip.reply(0),
            Reason::PassEstablished,
        );
        assert_eq!(ct.expect_entry("GRE", &key).state, ct_state::BOTH_WAYS);
    }
    ct.age(&ct_key(A_VLAN, Egress, &young), 590);
    ct.age(&ct_key(A_VLAN, Egress, &old), 601);
    ct.send(
        "GRE back after 590 s",
        A_VLAN,
        Ingress,
        &young.reply(0),
        Reason::PassEstablished,
    );
    ct.send(
        "GRE back after 601 s",
        A_VLAN,
        Ingress,
        &old.reply(0),
        Reason::DropPolicy,
    );
}
