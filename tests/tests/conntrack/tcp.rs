//! TCP: the state machine, its idle timeouts, a reset, and a new SYN on a closed flow.

use super::support::*;

#[test]
fn tcp_handshake_data_and_close_follow_the_state_machine() {
    let ct = Ct::new();
    let syn = tcp(A, 40000, SERVER, 443, TCP_SYN);
    let key = ct_key(A_VLAN, Egress, &syn);
    ct.send("SYN out", A_VLAN, Egress, &syn, Reason::PassNew);
    let entry = ct.expect_entry("after SYN", &key);
    assert_eq!(entry.state, ct_state::OPENING);
    assert_eq!(entry.flags, ct_flag::SEEN_EGRESS);
    assert_eq!(usize::from(entry.origin), DIR_EGRESS);
    assert_eq!(ct.rule_of(&entry), Some(&rref("sg-app", Egress, 0)));
    assert_eq!(entry.created_ns, entry.last_seen_ns);

    // A's ingress rules admit only TCP 8080 from the VPC: the same SYN-ACK to a
    // port with no flow is dropped.
    let synack = syn.reply(TCP_SYN | TCP_ACK);
    let stray = tcp(SERVER, 443, A, 40001, TCP_SYN | TCP_ACK);
    ct.send(
        "SYN-ACK without a flow",
        A_VLAN,
        Ingress,
        &stray,
        Reason::DropPolicy,
    );
    assert!(!ct.evaluate(A_VLAN, Ingress, &synack).allowed);
    ct.send(
        "SYN-ACK in",
        A_VLAN,
        Ingress,
        &synack,
        Reason::PassEstablished,
    );
    let entry = ct.expect_entry("after SYN-ACK", &key);
    assert_eq!(entry.state, ct_state::ESTABLISHED);
    assert_eq!(entry.flags, ct_flag::SEEN_EGRESS | ct_flag::SEEN_INGRESS);

    let ack = tcp(A, 40000, SERVER, 443, TCP_ACK);
    ct.send("ACK out", A_VLAN, Egress, &ack, Reason::PassEstablished);
    let data_out = tcp(A, 40000, SERVER, 443, TCP_ACK | TCP_PSH);
    ct.send(
        "data out",
        A_VLAN,
        Egress,
        &data_out,
        Reason::PassEstablished,
    );
    ct.send(
        "data in",
        A_VLAN,
        Ingress,
        &syn.reply(TCP_ACK | TCP_PSH),
        Reason::PassEstablished,
    );
    assert_eq!(ct.expect_entry("data", &key).state, ct_state::ESTABLISHED);

    let fin_out = tcp(A, 40000, SERVER, 443, TCP_FIN | TCP_ACK);
    ct.send("FIN out", A_VLAN, Egress, &fin_out, Reason::PassEstablished);
    let entry = ct.expect_entry("after one FIN", &key);
    assert_eq!(entry.state, ct_state::ESTABLISHED, "one FIN is not closing");
    assert_ne!(entry.flags & ct_flag::FIN_EGRESS, 0);
    assert_eq!(entry.flags & ct_flag::FIN_INGRESS, 0);
    ct.send(
        "FIN in",
        A_VLAN,
        Ingress,
        &syn.reply(TCP_FIN | TCP_ACK),
        Reason::PassEstablished,
    );
    let entry = ct.expect_entry("after both FINs", &key);
    assert_eq!(entry.state, ct_state::CLOSING);
    assert_ne!(entry.flags & ct_flag::FIN_INGRESS, 0);
    ct.send("last ACK", A_VLAN, Egress, &ack, Reason::PassEstablished);
    assert_eq!(ct.expect_entry("last ACK", &key).state, ct_state::CLOSING);
    assert_eq!(ct.vlan_flows(A_VLAN), 1, "one flow, one entry");
}

#[test]
fn tcp_reset_closes_the_flow_at_once() {
    let ct = Ct::new();
    let (syn, key) = handshake(&ct, 40000);
    ct.send(
        "RST in",
        A_VLAN,
        Ingress,
        &syn.reply(TCP_RST | TCP_ACK),
        Reason::PassEstablished,
    );
    assert_eq!(ct.expect_entry("after RST", &key).state, ct_state::CLOSING);
}

#[test]
fn tcp_opening_flow_expires_after_60_seconds() {
    let mut ct = Ct::new();
    let young = tcp(A, 40000, SERVER, 443, TCP_SYN);
    let old = tcp(A, 40001, SERVER, 443, TCP_SYN);
    for syn in [&young, &old] {
        ct.send("SYN", A_VLAN, Egress, syn, Reason::PassNew);
    }
    ct.age(&ct_key(A_VLAN, Egress, &young), 55);
    ct.age(&ct_key(A_VLAN, Egress, &old), 61);
    let synack = TCP_SYN | TCP_ACK;
    ct.send(
        "SYN-ACK 55 s after the SYN",
        A_VLAN,
        Ingress,
        &young.reply(synack),
        Reason::PassEstablished,
    );
    ct.send(
        "SYN-ACK 61 s after the SYN",
        A_VLAN,
        Ingress,
        &old.reply(synack),
        Reason::DropPolicy,
    );
}

#[test]
fn tcp_established_flow_expires_after_the_configured_timeout() {
    wait_for_uptime(TCP_ESTABLISHED_TIMEOUT + 1);
    let mut ct = Ct::new();
    let (young, young_key) = handshake(&ct, 40000);
    let (old, old_key) = handshake(&ct, 40001);
    // Far past the opening timeout, within the established one.
    ct.age(&young_key, TCP_ESTABLISHED_TIMEOUT - 10);
    ct.age(&old_key, TCP_ESTABLISHED_TIMEOUT + 1);
    ct.send(
        "data within tcpEstablishedTimeout",
        A_VLAN,
        Ingress,
        &young.reply(TCP_ACK),
        Reason::PassEstablished,
    );
    ct.send(
        "data past tcpEstablishedTimeout",
        A_VLAN,
        Ingress,
        &old.reply(TCP_ACK),
        Reason::DropPolicy,
    );
    // The pod's own packet is judged as a new flow, which its egress rules allow.
    ct.send(
        "the pod's next segment",
        A_VLAN,
        Egress,
        &tcp(A, 40001, SERVER, 443, TCP_ACK),
        Reason::PassNew,
    );
    let entry = ct.expect_entry("recreated", &old_key);
    assert_eq!(entry.state, ct_state::OPENING);
    assert_eq!(entry.packets, [0, 1]);
}

#[test]
fn tcp_closing_flow_expires_after_10_seconds() {
    let mut ct = Ct::new();
    let (young, young_key) = closed(&ct, 40000);
    let (old, old_key) = closed(&ct, 40001);
    ct.age(&young_key, 8);
    ct.age(&old_key, 11);
    ct.send(
        "last ACK 8 s after closing",
        A_VLAN,
        Ingress,
        &young.reply(TCP_ACK),
        Reason::PassEstablished,
    );
    ct.send(
        "last ACK 11 s after closing",
        A_VLAN,
        Ingress,
        &old.reply(TCP_ACK),
        Reason::DropPolicy,
    );
}

#[test]
fn a_new_syn_on_a_closed_flow_reopens_it() {
    // The pod reuses its source port for a new connection to the same server
    // while the old one's entry is still closing (within 10 s of the FINs). The
    // SYN is a new connection, judged by the rules again, and the new flow gets
    // the established timeout, as Linux conntrack reopens a closed flow on a
    // SYN, instead of staying on the 10 s closing one.
    let mut ct = Ct::new();
    let (syn, key) = closed(&ct, 40000);
    ct.send("new SYN, same ports", A_VLAN, Egress, &syn, Reason::PassNew);
    ct.send(
        "new SYN-ACK",
        A_VLAN,
        Ingress,
        &syn.reply(TCP_SYN | TCP_ACK),
        Reason::PassEstablished,
    );
    ct.send(
        "new ACK",
        A_VLAN,
        Egress,
        &tcp(A, 40000, SERVER, 443, TCP_ACK),
        Reason::PassEstablished,
    );
    let entry = ct.expect_entry("reopened", &key);
    assert_eq!(
        entry.state,
        ct_state::ESTABLISHED,
        "state after a new handshake"
    );
    // Idle 30 s, far within tcpEstablishedTimeout.
    ct.age(&key, 30);
    ct.send(
        "the server's data after 30 s idle",
        A_VLAN,
        Ingress,
        &syn.reply(TCP_ACK | TCP_PSH),
        Reason::PassEstablished,
    );
}
