//! Each pod's allowance of flows and fragmented datagrams: a flood of one pod never takes another's room.

use super::support::*;

/// Counter totals by reason, for floods run through [`Kernel::passes`].
fn counted(ct: &Kernel) -> BTreeMap<&'static str, u64> {
    let totals = ct.maps.counters().expect("read counters");
    Reason::ALL
        .iter()
        .zip(totals)
        .map(|(reason, total)| (reason.name(), total))
        .collect()
}

fn delta(
    before: &BTreeMap<&'static str, u64>,
    after: &BTreeMap<&'static str, u64>,
) -> BTreeMap<&'static str, u64> {
    after
        .iter()
        .map(|(name, n)| (*name, n - before[name]))
        .filter(|(_, n)| *n > 0)
        .collect()
}

/// sg-semantics §4 / EC2's tracked-connection allowance: 300k new flows from pod
/// A (far more than the whole table) leave pod B's established TCP flow and its
/// UDP stream passing; A keeps its allowance of flows and its excess is
/// dropped as `drop_flow_limit`, counted, and A's own flows keep working. The
/// sweep gives the allowance back once the flows expire.
#[test]
fn a_flood_of_new_flows_from_one_pod_never_evicts_another_pods_flows() {
    let mut model = model();
    // Pod B may also ask UDP 53 of anyone; nothing may reach it unasked.
    let locked = model.groups.get_mut("sg-locked").unwrap();
    locked
        .egress
        .push(rule(ports(17, 53, 53), cidr("0.0.0.0/0")));
    let allowance = model.node.max_flows_per_pod;
    assert_eq!(allowance, enforcer_common::DEFAULT_MAX_FLOWS_PER_POD);
    let mut ct = Ct {
        kernel: Kernel::load(&model),
        model,
    };
    // B: an established TCP connection and a UDP stream (two transactions).
    let syn = tcp(B, 41000, SERVER, 443, TCP_SYN);
    ct.send("B SYN", B_VLAN, Egress, &syn, Reason::PassNew);
    let syn_ack = syn.reply(TCP_SYN | TCP_ACK);
    ct.send(
        "B SYN-ACK",
        B_VLAN,
        Ingress,
        &syn_ack,
        Reason::PassEstablished,
    );
    let ack = tcp(B, 41000, SERVER, 443, TCP_ACK);
    ct.send("B ACK", B_VLAN, Egress, &ack, Reason::PassEstablished);
    let query = udp(B, 53000, SERVER, 53);
    ct.send("B query", B_VLAN, Egress, &query, Reason::PassNew);
    for round in 0..2 {
        ct.send(
            "B answer",
            B_VLAN,
            Ingress,
            &query.reply(0),
            Reason::PassEstablished,
        );
        if round == 0 {
            ct.send(
                "B query again",
                B_VLAN,
                Egress,
                &query,
                Reason::PassEstablished,
            );
        }
    }
    let stream = ct.expect_entry("B's stream", &ct_key(B_VLAN, Egress, &query));
    assert_eq!(stream.state, ct_state::BOTH_WAYS);

    // A: 300k new UDP flows (5 destination ports x 60k source ports).
    let before = counted(&ct.kernel);
    let (mut passed, mut flows) = (0u64, 0u64);
    for dport in 1000..1005u16 {
        for sport in 1..=60_000u16 {
            let f = frame::ip_frame(Tag::Vlan(A_VLAN), &udp(A, sport, SERVER, dport));
            passed += u64::from(ct.kernel.passes(Egress, &f));
            flows += 1;
        }
    }
    let flood = delta(&before, &counted(&ct.kernel));
    eprintln!("flood of {flows} new flows from pod A: {flood:?}");
    let cap = u64::from(allowance);
    assert_eq!(passed, cap, "A's allowance passes, no more");
    assert_eq!(
        flood,
        BTreeMap::from([("pass_new", cap), ("drop_flow_limit", flows - cap)]),
    );
    assert_eq!(ct.kernel.maps.tracked(A_VLAN).flows, cap);
    assert_eq!(ct.vlan_flows(A_VLAN), cap as usize);

    // B's flows are all there and pass, though B's groups let neither in.
    ct.send(
        "B data in",
        B_VLAN,
        Ingress,
        &syn.reply(TCP_ACK | TCP_PSH),
        Reason::PassEstablished,
    );
    ct.send(
        "B answer after",
        B_VLAN,
        Ingress,
        &query.reply(0),
        Reason::PassEstablished,
    );
    ct.send(
        "B query after",
        B_VLAN,
        Egress,
        &query,
        Reason::PassEstablished,
    );
    assert_eq!(ct.kernel.maps.tracked(B_VLAN).flows, 2);
    // B still opens new flows: its allowance is its own.
    ct.send(
        "B new",
        B_VLAN,
        Egress,
        &tcp(B, 41001, SERVER, 443, TCP_SYN),
        Reason::PassNew,
    );
    // A's admitted flows go on; a new one is refused with its own reason.
    ct.send(
        "A old",
        A_VLAN,
        Egress,
        &udp(A, 1, SERVER, 1000),
        Reason::PassEstablished,
    );
    ct.send(
        "A new",
        A_VLAN,
        Egress,
        &udp(A, 1, SERVER, 2000),
        Reason::DropFlowLimit,
    );

    // Once expired and swept, A's slots are its again (B's flows expire too).
    let later = enforcer::observe::events::monotonic().as_nanos() as u64 + 1_000 * NS_PER_SEC;
    let swept = ct.kernel.maps.sweep(later).expect("sweep");
    assert_eq!(swept.flows, cap + 3);
    assert_eq!(ct.kernel.maps.tracked(A_VLAN).flows, 0);
    assert_eq!(ct.kernel.maps.tracked(B_VLAN).flows, 0);
    assert!(ct.flows().is_empty());
    ct.send(
        "A new after the sweep",
        A_VLAN,
        Egress,
        &udp(A, 1, SERVER, 2000),
        Reason::PassNew,
    );
    assert_eq!(ct.kernel.maps.tracked(A_VLAN).flows, 1);
}

/// The fragment table has the same allowance per pod: A's flood of first
/// fragments stops at its allowance (`drop_fragment_limit`), B's fragmented
/// datagram still passes whole; the sweep frees A's slots after the
/// reassembly timeout.
#[test]
fn a_flood_of_fragmented_datagrams_from_one_pod_leaves_room_for_another() {
    let mut ct = Ct::new();
    let cap = u64::from(ct.model.node.max_fragments_per_pod);
    let datagram = udp(A, 5000, SERVER, 9999);
    let first_payload = [0u8; 24];
    let first = |id: u16, tag: Tag, ip: &Ip| {
        let fragment = Fragment {
            id,
            offset: 0,
            more: true,
        };
        let mut payload = ip.transport_bytes();
        payload.resize(first_payload.len().max(payload.len()), 0xaa);
        frame::ipv4_fragment_frame(tag, ip, fragment, &payload)
    };
    let before = counted(&ct.kernel);
    let total = cap + 1_000;
    for id in 0..total as u16 {
        ct.kernel
            .passes(Egress, &first(id, Tag::Vlan(A_VLAN), &datagram));
    }
    let flood = delta(&before, &counted(&ct.kernel));
    eprintln!("flood of {total} first fragments from pod A: {flood:?}");
    // One flow: the first fragment creates it, the others are its packets.
    assert_eq!(
        flood,
        BTreeMap::from([
            ("pass_new", 1),
            ("pass_established", cap - 1),
            ("drop_fragment_limit", total - cap),
        ])
    );
    assert_eq!(ct.kernel.maps.tracked(A_VLAN).fragments, cap);
    // A retransmitted first fragment reuses its datagram's slot.
    ct.frame(
        "A again",
        Egress,
        &first(0, Tag::Vlan(A_VLAN), &datagram),
        Reason::PassEstablished,
    );
    // B's datagram: first and later fragment pass.
    let b = tcp(B, 40000, SERVER, 443, TCP_SYN);
    ct.frame(
        "B first",
        Egress,
        &first(7, Tag::Vlan(B_VLAN), &b),
        Reason::PassNew,
    );
    let later = Fragment {
        id: 7,
        offset: 3,
        more: false,
    };
    let b_later = frame::ipv4_fragment_frame(Tag::Vlan(B_VLAN), &b, later, &[1; 16]);
    ct.frame("B later", Egress, &b_later, Reason::PassFragment);
    assert_eq!(ct.kernel.maps.tracked(B_VLAN).fragments, 1);

    let now = enforcer::observe::events::monotonic().as_nanos() as u64;
    let swept = ct.kernel.maps.sweep(now).expect("sweep");
    assert_eq!(
        swept.fragments, 0,
        "nothing is older than the reassembly timeout yet"
    );
    let swept = ct.kernel.maps.sweep(now + 61 * NS_PER_SEC).expect("sweep");
    assert_eq!(swept.fragments, cap + 1);
    assert_eq!(ct.kernel.maps.tracked(A_VLAN).fragments, 0);
    // The flow expired with its datagrams (UDP timeout 45 s): a new flow.
    let fresh = first(u16::MAX, Tag::Vlan(A_VLAN), &datagram);
    ct.frame("A after the sweep", Egress, &fresh, Reason::PassNew);
    assert_eq!(ct.kernel.maps.tracked(A_VLAN).fragments, 1);
}
