//! What each verdict leaves behind: per-reason, per-pod and per-rule
//! counters, and a rate-limited verdict event for `enforcer flows`.

use aya_ebpf::bindings::BPF_NOEXIST;
use enforcer_common::{
    DIR_EGRESS, DIR_INGRESS, EVENT_IP, EVENT_IPV6, EVENT_POD, EVENT_WOULD_DROP, EVENTS_BURST,
    EVENTS_PER_SECOND, Reason, RuleTraffic, VerdictEvent, counter_slot,
};

use crate::Direction;
use crate::conntrack::now_ns;
use crate::maps::{COUNTERS, EVENT_BUDGET, EVENTS, POD_TRAFFIC, RULE_TRAFFIC, SETTINGS};
use crate::subject::Subject;

const NS_PER_SEC: u64 = 1_000_000_000;
const NS_PER_TOKEN: u64 = NS_PER_SEC / EVENTS_PER_SECOND;

/// Counts the verdict and reports it if it is an event; `would_drop`: audit passed
/// a frame `reason` drops, counted apart from drops. Out of line, with plain
/// types in its signature, so that its stack frame is its own.
#[inline(never)]
pub fn record(subject: &Subject, reason: Reason, would_drop: bool, direction: Direction, len: u32) {
    let bytes = u64::from(len);
    if let Some(slot) = COUNTERS.get_ptr_mut(counter_slot(reason, would_drop)) {
        // SAFETY: per-CPU slot; programs do not preempt each other on one CPU.
        unsafe { *slot += 1 };
    }
    if subject.pod
        && let Some(traffic) = POD_TRAFFIC.get_ptr_mut(u32::from(subject.vlan))
    {
        // SAFETY: as above.
        let traffic = unsafe { &mut *traffic };
        if would_drop {
            traffic.would_drop_packets += 1;
            traffic.would_drop_bytes += bytes;
        } else if reason.is_drop() {
            traffic.denied_packets += 1;
            traffic.denied_bytes += bytes;
        } else {
            traffic.allowed_packets += 1;
            traffic.allowed_bytes += bytes;
        }
    }
    if reason == Reason::PassNew {
        count_rule(subject.admitted.rules[0], bytes);
        count_rule(subject.admitted.rules[1], bytes);
    }
    if is_event(reason) {
        emit(subject, reason, would_drop, direction, len);
    }
}

#[inline(always)]
fn count_rule(key: u32, bytes: u64) {
    if key == 0 {
        return;
    }
    match RULE_TRAFFIC.get_ptr_mut(key) {
        Some(traffic) => {
            // SAFETY: per-CPU value of a successful lookup.
            let traffic = unsafe { &mut *traffic };
            traffic.packets += 1;
            traffic.bytes += bytes;
        }
        None => {
            let first = RuleTraffic { packets: 1, bytes };
            // Another CPU may have created it first: that packet goes uncounted.
            let _ = RULE_TRAFFIC.insert(key, first, u64::from(BPF_NOEXIST));
        }
    }
}

/// Denies (would-drops too) always; allowed new flows while `enforcer flows` holds the lease.
#[inline(always)]
fn is_event(reason: Reason) -> bool {
    if reason.is_drop() {
        return true;
    }
    let new_flow = matches!(
        reason,
        Reason::PassNew | Reason::PassUnfiltered | Reason::PassSameNode | Reason::PassUnknownVlan
    );
    new_flow
        && match SETTINGS.get(0) {
            Some(settings) => {
                settings.allowed_events_until_ns != 0 && now_ns() < settings.allowed_events_until_ns
            }
            None => false,
        }
}

#[inline(always)]
fn emit(subject: &Subject, reason: Reason, would_drop: bool, direction: Direction, len: u32) {
    let Some(budget) = EVENT_BUDGET.get_ptr_mut(0) else {
        return;
    };
    // SAFETY: per-CPU slot; programs do not preempt each other on one CPU.
    let budget = unsafe { &mut *budget };
    let now = now_ns();
    let earned = now.saturating_sub(budget.refilled_ns) / NS_PER_TOKEN;
    if earned > 0 {
        let topped = budget.tokens.saturating_add(earned);
        if topped >= EVENTS_BURST {
            budget.tokens = EVENTS_BURST;
            budget.refilled_ns = now;
        } else {
            budget.tokens = topped;
            budget.refilled_ns += earned * NS_PER_TOKEN;
        }
    }
    if budget.tokens == 0 {
        budget.suppressed += 1;
        return;
    }
    let Some(mut entry) = EVENTS.reserve_untyped::<VerdictEvent>(0) else {
        budget.suppressed += 1;
        return;
    };
    budget.tokens -= 1;
    let packet = &subject.packet;
    let mut flags = 0;
    if subject.pod {
        flags |= EVENT_POD;
    }
    if would_drop {
        flags |= EVENT_WOULD_DROP;
    }
    if subject.ip {
        flags |= EVENT_IP;
        if packet.ipv6 {
            flags |= EVENT_IPV6;
        }
    }
    entry.write(VerdictEvent {
        timestamp_ns: now,
        src: packet.src,
        dst: packet.dst,
        src_port: packet.src_port,
        dst_port: packet.dst_port,
        vlan: subject.vlan,
        protocol: packet.protocol,
        direction: match direction {
            Direction::Ingress => DIR_INGRESS as u8,
            Direction::Egress => DIR_EGRESS as u8,
        },
        reason: reason as u32,
        rule: subject.admitted.rules[0],
        primary_rule: subject.admitted.rules[1],
        len,
        icmp_type: packet.icmp_type,
        icmp_code: packet.icmp_code,
        flags,
        _pad: 0,
        nat_port: subject.admitted.nat_port,
        _pad2: [0; 2],
    });
    entry.submit(0);
}
