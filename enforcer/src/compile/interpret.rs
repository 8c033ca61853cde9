//! The compiled entries read exactly as the kernel looks them up, for the tests and
//! tools that must agree with it.

use std::net::IpAddr;

use enforcer_common::lengths::{self, PeerV4, PeerV6};
use enforcer_common::{
    EnforcingMode, NO_POLICY, NO_RULE, PeerKeyV4, PeerKeyV6, PortVerdict, V4_MAPPED_PREFIX,
    VERDICT_UNTRACKED, policy_slot, port_word, ranges,
};

use super::{Compiled, addr_key};
use crate::model::Direction;
use crate::policy::eval::{self, L4Packet};

/// What one side's policy says about a packet.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SideLookup {
    /// The handle is [`NO_POLICY`]: the side is not checked.
    NotChecked,
    /// No peer or port entry matched.
    Denied,
    Allowed(PortVerdict),
}

impl SideLookup {
    pub(super) fn passes(self) -> bool {
        self != Self::Denied
    }

    pub(super) fn untracked(self) -> bool {
        match self {
            Self::NotChecked => true,
            Self::Denied => false,
            Self::Allowed(verdict) => verdict.flags & VERDICT_UNTRACKED != 0,
        }
    }
}

/// The kernel's decision for the first packet of a flow.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Interpretation {
    /// No pod entry for the VLAN (`unknownVlan` decides).
    UnknownVlan,
    /// The peer or the protocol is never filtered.
    Unfiltered,
    /// Standard mode and the peer is on this node.
    NodeLocal,
    /// Looked up in the pod's policies.
    Policy {
        branch: SideLookup,
        primary: SideLookup,
    },
}

impl Interpretation {
    pub fn allowed(&self) -> bool {
        match self {
            Self::UnknownVlan => false,
            Self::Unfiltered | Self::NodeLocal => true,
            Self::Policy { branch, primary } => branch.passes() && primary.passes(),
        }
    }

    /// Allowed and without a conntrack entry.
    pub fn untracked(&self) -> bool {
        match self {
            Self::UnknownVlan => false,
            Self::Unfiltered | Self::NodeLocal => true,
            Self::Policy { branch, primary } => {
                self.allowed() && branch.untracked() && primary.untracked()
            }
        }
    }
}

/// Looks a new flow up in the compiled entries in the kernel's order: pod, never-filtered
/// addresses and protocols, same-node (standard), then per checked side the peer search ->
/// class -> port table search.
pub fn interpret(
    compiled: &Compiled,
    vlan: u16,
    direction: Direction,
    peer: IpAddr,
    packet: L4Packet,
) -> Interpretation {
    let Some(pod) = compiled.pods.get(&vlan) else {
        return Interpretation::UnknownVlan;
    };
    // The kernel's view of the peer: IPv4 as IPv4-mapped, and the packet's family.
    let (addr, ipv6) = match peer {
        IpAddr::V4(v4) => (v4.to_ipv6_mapped().octets(), false),
        IpAddr::V6(v6) => (v6.octets(), true),
    };
    if pod.never_filters(&addr, ipv6) || eval::unfiltered_l4(direction, peer, packet).is_some() {
        return Interpretation::Unfiltered;
    }
    // An IPv6 packet with an IPv4-mapped peer must not pass as that IPv4 address.
    let mapped = ipv6 && addr[..12] == V4_MAPPED_PREFIX;
    if pod.mode() == Some(EnforcingMode::Standard)
        && !mapped
        && compiled.node_local.contains_key(&addr_key(0, peer))
    {
        return Interpretation::NodeLocal;
    }
    let (branch_slot, primary_slot) = match direction {
        Direction::Ingress => (policy_slot::BRANCH_INGRESS, policy_slot::PRIMARY_INGRESS),
        Direction::Egress => (policy_slot::BRANCH_EGRESS, policy_slot::PRIMARY_EGRESS),
    };
    let side = |handle: u32| {
        if handle == NO_POLICY {
            return SideLookup::NotChecked;
        }
        let Some(policy) = compiled.policies.get(&handle) else {
            return SideLookup::Denied;
        };
        // The kernel's probes, on the entries as grouped here (their IDs zero).
        let class = match peer {
            IpAddr::V4(a) => lengths::search::<PeerV4, _>(|len| {
                find(&policy.v4, &PeerKeyV4::new(0, a.octets(), len)).map(|c| c.class)
            }),
            IpAddr::V6(a) => lengths::search::<PeerV6, _>(|len| {
                find(&policy.v6, &PeerKeyV6::new(0, &a.octets(), len)).map(|c| c.class)
            }),
        };
        let ports = class.and_then(|class| compiled.classes.get(&class));
        let verdict = ports.filter(|ports| !ports.is_empty()).and_then(|ports| {
            let count = u32::try_from(ports.len()).ok()?;
            let word = port_word(packet.protocol, packet.selector);
            let start = |i: u32| ports.get(i as usize).map(|r| r.start);
            let found = ranges::search(count, word, start)?;
            Some(ports[found as usize].verdict)
        });
        let verdict = verdict.filter(|v| v.rule != NO_RULE);
        verdict.map_or(SideLookup::Denied, SideLookup::Allowed)
    };
    Interpretation::Policy {
        branch: side(pod.policies[branch_slot]),
        primary: side(pod.policies[primary_slot]),
    }
}

/// Where `interpret(compiled)` and the evaluator disagree on the first packet
/// `query` of `pod`'s flow (verdict, reason kind, untracked flag, lowest
/// allowing rule of each side), or `None`: the check the compiler's tests and
/// its fuzz target (`fuzz/`) make. `query` must be a packet, not "all traffic".
pub fn disagreement(
    model: &crate::model::Model,
    compiled: &Compiled,
    pod: &crate::model::BranchPod,
    query: &eval::Query,
) -> Option<String> {
    use eval::{L4Query, Reason, RuleRef};
    let L4Query::Packet(packet) = query.l4 else {
        return Some(format!("{query:?}: the kernel only sees packets"));
    };
    let e = eval::evaluate(model, pod, query);
    let k = interpret(compiled, pod.vlan, query.direction, query.peer, packet);
    let ctx = format!("{query:?} of {}: {e:?} vs {k:?}", pod.key());
    if e.allowed != k.allowed() || e.untracked != k.untracked() {
        return Some(format!("verdict or tracking differ: {ctx}"));
    }
    let lowest = |rules: &[RuleRef]| rules.first().and_then(|r| compiled.rule_id(r));
    let expect_side = |rules: &[RuleRef], checked: bool| match lowest(rules) {
        _ if !checked => SideLookup::NotChecked,
        None => SideLookup::Denied,
        Some(rule) => SideLookup::Allowed(PortVerdict { rule, flags: 0 }),
    };
    let strip = |s: SideLookup| match s {
        SideLookup::Allowed(v) => SideLookup::Allowed(PortVerdict { flags: 0, ..v }),
        other => other,
    };
    match (e.reason, k) {
        (Reason::Unfiltered(_), Interpretation::Unfiltered) => None,
        (Reason::SameNode, Interpretation::NodeLocal) => None,
        (Reason::Allowed | Reason::NoRule { .. }, Interpretation::Policy { branch, primary }) => {
            let standard = pod.mode == EnforcingMode::Standard;
            (strip(branch) != expect_side(&e.branch, true)
                || strip(primary) != expect_side(&e.primary, standard))
            .then(|| format!("lowest allowing rules differ: {ctx}"))
        }
        _ => Some(format!("reasons differ: {ctx}")),
    }
}

/// The value of `key` in entries sorted by key.
pub(super) fn find<K: Ord, V: Copy>(entries: &[(K, V)], key: &K) -> Option<V> {
    entries
        .binary_search_by(|(k, _)| k.cmp(key))
        .ok()
        .map(|i| entries[i].1)
}
