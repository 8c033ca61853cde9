//! UDP: one-way flows, request-response transactions and streams, and their timeouts.

use super::support::*;

#[test]
fn udp_becomes_a_stream_after_more_than_one_transaction() {
    let ct = Ct::new();
    let query = udp(A, 5000, SERVER, 53);
    let key = ct_key(A_VLAN, Egress, &query);
    ct.send("request", A_VLAN, Egress, &query, Reason::PassNew);
    let entry = ct.expect_entry("request", &key);
    assert_eq!(entry.state, ct_state::ONE_WAY);
    assert_eq!(ct.rule_of(&entry), Some(&rref("sg-app", Egress, 0)));
    ct.send(
        "second request",
        A_VLAN,
        Egress,
        &query,
        Reason::PassEstablished,
    );
    assert_eq!(ct.expect_entry("requests", &key).state, ct_state::ONE_WAY);
    let steps = [
        ("response", Ingress, ct_state::ANSWERED),
        ("another response", Ingress, ct_state::ANSWERED),
        (
            "a request after the response",
            Egress,
            ct_state::ASKED_AGAIN,
        ),
        (
            "its response: two transactions",
            Ingress,
            ct_state::BOTH_WAYS,
        ),
        ("a request on the stream", Egress, ct_state::BOTH_WAYS),
    ];
    for (step, direction, state) in steps {
        let ip = match direction {
            Ingress => query.reply(0),
            Egress => query,
        };
        ct.send(step, A_VLAN, direction, &ip, Reason::PassEstablished);
        assert_eq!(ct.expect_entry(step, &key).state, state, "{step}");
    }
    ct.send(
        "the server from another port",
        A_VLAN,
        Ingress,
        &udp(SERVER, 54, A, 5000),
        Reason::DropPolicy,
    );
}

#[test]
fn udp_one_way_flow_expires_after_udp_timeout() {
    let mut ct = Ct::new();
    let young = udp(A, 5000, SERVER, 53);
    let old = udp(A, 5001, SERVER, 53);
    for q in [&young, &old] {
        ct.send("request", A_VLAN, Egress, q, Reason::PassNew);
    }
    ct.age(&ct_key(A_VLAN, Egress, &young), UDP_TIMEOUT - 5);
    ct.age(&ct_key(A_VLAN, Egress, &old), UDP_TIMEOUT + 1);
    ct.send(
        "response within udpTimeout",
        A_VLAN,
        Ingress,
        &young.reply(0),
        Reason::PassEstablished,
    );
    ct.send(
        "response past udpTimeout",
        A_VLAN,
        Ingress,
        &old.reply(0),
        Reason::DropPolicy,
    );
}

/// One request and its response (a DNS lookup) are no stream: the flow
/// keeps the UDP timeout, not the stream timeout.
#[test]
fn one_udp_transaction_keeps_the_udp_timeout() {
    let mut ct = Ct::new();
    let young = udp(A, 5000, SERVER, 53);
    let old = udp(A, 5001, SERVER, 53);
    for q in [&young, &old] {
        ct.send("request", A_VLAN, Egress, q, Reason::PassNew);
        ct.send(
            "response",
            A_VLAN,
            Ingress,
            &q.reply(0),
            Reason::PassEstablished,
        );
    }
    ct.age(&ct_key(A_VLAN, Egress, &young), UDP_TIMEOUT - 5);
    ct.age(&ct_key(A_VLAN, Egress, &old), UDP_TIMEOUT + 1);
    ct.send(
        "a late response within udpTimeout",
        A_VLAN,
        Ingress,
        &young.reply(0),
        Reason::PassEstablished,
    );
    ct.send(
        "a late response past udpTimeout",
        A_VLAN,
        Ingress,
        &old.reply(0),
        Reason::DropPolicy,
    );
}

#[test]
fn udp_stream_outlives_udp_timeout_until_udp_stream_timeout() {
    let mut ct = Ct::new();
    let young = udp(A, 5000, SERVER, 53);
    let old = udp(A, 5001, SERVER, 53);
    for q in [&young, &old] {
        ct.send("request", A_VLAN, Egress, q, Reason::PassNew);
        for (step, direction, ip) in [
            ("response", Ingress, q.reply(0)),
            ("second request", Egress, *q),
            ("second response", Ingress, q.reply(0)),
        ] {
            ct.send(step, A_VLAN, direction, &ip, Reason::PassEstablished);
        }
    }
    ct.age(&ct_key(A_VLAN, Egress, &young), UDP_STREAM_TIMEOUT - 5);
    ct.age(&ct_key(A_VLAN, Egress, &old), UDP_STREAM_TIMEOUT + 1);
    const { assert!(UDP_STREAM_TIMEOUT - 5 > UDP_TIMEOUT) };
    ct.send(
        "stream past udpTimeout, within udpStreamTimeout",
        A_VLAN,
        Ingress,
        &young.reply(0),
        Reason::PassEstablished,
    );
    ct.send(
        "stream past udpStreamTimeout",
        A_VLAN,
        Ingress,
        &old.reply(0),
        Reason::DropPolicy,
    );
}
