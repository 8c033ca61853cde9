//! Peer classes and their port tables: which rules can decide for a prefix, and the
//! (protocol, port) entries of each class, folded and laid out for the kernel.

use std::collections::BTreeMap;

use enforcer_common::lengths::Port;
use enforcer_common::{NO_RULE, PortKey, PortVerdict, VERDICT_UNTRACKED};

use super::{ClassEntries, HashMap, Policy, handle, index};
use crate::compile::prefix::{Prefix, fold, lay_out};
use crate::model::{Cidr, Direction, GroupId, L4Match, Model, Peer, Rule};
use crate::policy::eval::{
    PROTO_ICMP, PROTO_ICMPV6, PROTO_TCP, PROTO_UDP, RuleRef, everything_family, opens_all_ports,
};

/// What a peer-table value stands for: the rules (that can decide) whose peer covers the
/// prefix, an index into [`RuleSets`], and for which protocols (TCP, UDP) the policy's
/// opposite direction opens every port to everywhere.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(super) struct ClassKey {
    pub(super) set: usize,
    pub(super) reverse_open: [bool; 2],
}

/// The peer table of one policy and family, as (prefix, class key).
pub(super) fn policy_peers(
    model: &Model,
    sets: &mut RuleSets,
    policy: &Policy,
    v6: bool,
) -> Vec<(Prefix, ClassKey)> {
    let reverse_open = [PROTO_TCP, PROTO_UDP].map(|protocol| {
        let opposite = policy.direction.opposite();
        opens_all_ports(model, &policy.groups, opposite, v6, protocol)
    });
    let mut own: BTreeMap<Prefix, Vec<u32>> = BTreeMap::new();
    for group in &policy.groups {
        for (id, rule) in sets.rules.of(model, group, policy.direction) {
            for cidr in peer_cidrs(model, &rule.peer, v6) {
                own.entry(Prefix::of_cidr(cidr)).or_default().push(id);
            }
        }
    }
    let folded = fold(own, |inherited: Option<&usize>, own| {
        sets.extend(inherited.copied(), own)
    });
    folded
        .iter()
        .filter(|(_, set, parent)| parent.is_none_or(|p| folded[p].1 != *set))
        .map(|&(prefix, set, _)| {
            let rules = &sets.sets[set];
            let everything = rules.iter().any(|&id| sets.rules.everything[index(id)]);
            let key = ClassKey {
                set,
                // Only a rule from everywhere can make a flow untracked.
                reverse_open: if everything { reverse_open } else { [false; 2] },
            };
            (prefix, key)
        })
        .collect()
}

/// The global rule table with what the compiler needs per rule.
pub(super) struct RuleTable {
    pub(super) refs: Vec<RuleRef>,
    /// The (protocol, port) prefixes of the rule's L4 part.
    l4: Vec<Vec<Prefix>>,
    /// The same as one span of the 24-bit (protocol, port) space: an L4 part is contiguous.
    pub(super) spans: Vec<(u32, u32)>,
    pub(super) is_all: Vec<bool>,
    /// The rule's peer is `0.0.0.0/0` or `::/0`.
    pub(super) everything: Vec<bool>,
    /// First rule ID of each group's ingress and egress rules.
    pub(super) first: BTreeMap<(GroupId, Direction), u32>,
}

impl RuleTable {
    pub(super) fn new(model: &Model) -> Self {
        let mut table = Self {
            refs: Vec::new(),
            l4: Vec::new(),
            spans: Vec::new(),
            is_all: Vec::new(),
            everything: Vec::new(),
            first: BTreeMap::new(),
        };
        for (id, group) in &model.groups {
            for direction in [Direction::Ingress, Direction::Egress] {
                let first = handle(table.refs.len());
                table.first.insert((id.clone(), direction), first);
                for (i, rule) in group.rules(direction).iter().enumerate() {
                    table.refs.push(RuleRef {
                        group_id: id.clone(),
                        direction,
                        index: i,
                    });
                    let prefixes = l4_prefixes(&rule.l4);
                    let spans = prefixes.iter().map(Prefix::port_span);
                    let first = spans.clone().map(|(lo, _)| lo).min();
                    let last = spans.map(|(_, hi)| hi).max();
                    table.spans.push((first.unwrap_or(0), last.unwrap_or(0)));
                    table.l4.push(prefixes);
                    table.is_all.push(rule.l4 == L4Match::All);
                    let everything = everything_family(&rule.peer).is_some();
                    table.everything.push(everything);
                }
            }
        }
        table
    }

    /// The rules of one group and direction with their IDs.
    pub(super) fn of<'m>(
        &self,
        model: &'m Model,
        group: &GroupId,
        direction: Direction,
    ) -> impl Iterator<Item = (u32, &'m Rule)> {
        let first = self.first.get(&(group.clone(), direction)).copied();
        let rules = model
            .groups
            .get(group)
            .map_or(&[][..], |g| g.rules(direction));
        first
            .into_iter()
            .flat_map(move |first| (first..).zip(rules.iter()))
    }
}

/// The pruned rule sets of peer prefixes, interned: the peer fold handles their indexes, and
/// extending an inherited set with a prefix's own rules is memoised, as member addresses of
/// one referenced group all extend the same set with the same rules.
pub(super) struct RuleSets<'r> {
    pub(super) rules: &'r RuleTable,
    pub(super) sets: Vec<Vec<u32>>,
    pub(super) ids: HashMap<Vec<u32>, usize>,
    pub(super) memo: HashMap<(Option<usize>, Vec<u32>), usize>,
}

impl<'r> RuleSets<'r> {
    pub(super) fn new(rules: &'r RuleTable) -> Self {
        Self {
            rules,
            sets: Vec::new(),
            ids: HashMap::default(),
            memo: HashMap::default(),
        }
    }

    /// The index of the pruned union of the set `inherited` and the rules `own`.
    pub(super) fn extend(&mut self, inherited: Option<usize>, own: Vec<u32>) -> usize {
        let key = (inherited, own);
        if let Some(&id) = self.memo.get(&key) {
            return id;
        }
        let base = inherited.map_or(&[][..], |i| &self.sets[i]);
        let set = self.prune(&union(base, &key.1));
        let id = self.intern(set);
        self.memo.insert(key, id);
        id
    }

    /// The index of `set`.
    pub(super) fn intern(&mut self, set: Vec<u32>) -> usize {
        match self.ids.get(&set) {
            Some(&id) => id,
            None => {
                self.sets.push(set.clone());
                self.ids.insert(set, self.sets.len() - 1);
                self.sets.len() - 1
            }
        }
    }

    /// Keeps a rule unless every (protocol, port) it covers is covered by lower rules, and,
    /// if its peer is everywhere, by lower rules from everywhere too (the untracked flag).
    pub(super) fn prune(&self, set: &[u32]) -> Vec<u32> {
        let mut covered = Spans::default();
        let mut covered_everywhere = Spans::default();
        let mut kept = Vec::with_capacity(set.len());
        for &id in set {
            let span = self.rules.spans[index(id)];
            let everything = self.rules.everything[index(id)];
            if !covered.contains(span) || (everything && !covered_everywhere.contains(span)) {
                kept.push(id);
            }
            covered.insert(span);
            if everything {
                covered_everywhere.insert(span);
            }
        }
        kept
    }
}

/// A union of ranges of the 24-bit (protocol, port) space: sorted, disjoint, not adjacent.
#[derive(Default)]
pub(super) struct Spans(Vec<(u32, u32)>);

impl Spans {
    pub(super) fn contains(&self, (lo, hi): (u32, u32)) -> bool {
        let after = self.0.partition_point(|&(start, _)| start <= lo);
        after > 0 && self.0[after - 1].1 >= hi
    }

    pub(super) fn insert(&mut self, (lo, hi): (u32, u32)) {
        // The spans overlapping or touching lo..=hi are merged with it.
        let first = self.0.partition_point(|&(_, end)| end + 1 < lo);
        let last = self.0.partition_point(|&(start, _)| start <= hi + 1);
        let (mut lo, mut hi) = (lo, hi);
        if first < last {
            lo = lo.min(self.0[first].0);
            hi = hi.max(self.0[last - 1].1);
            self.0[first] = (lo, hi);
            self.0.drain(first + 1..last);
        } else {
            self.0.insert(first, (lo, hi));
        }
    }
}

/// The prefixes of `family` that a peer stands for.
pub(super) fn peer_cidrs<'m>(
    model: &'m Model,
    peer: &'m Peer,
    v6: bool,
) -> impl Iterator<Item = Cidr> + 'm {
    let (cidr, list, members) = match peer {
        Peer::Cidr(cidr) => (Some(*cidr), None, None),
        Peer::PrefixList(id) => (None, model.prefix_lists.get(id), None),
        Peer::Group(id) => (None, None, model.members.get(id)),
    };
    cidr.into_iter()
        .chain(list.into_iter().flatten().copied())
        .chain(members.into_iter().flatten().copied())
        .filter(move |c| c.is_ipv4() != v6)
}

/// Sorted, de-duplicated union of an inherited and an own set of rule IDs.
pub(super) fn union(inherited: &[u32], own: &[u32]) -> Vec<u32> {
    let mut all = Vec::with_capacity(inherited.len() + own.len());
    all.extend_from_slice(inherited);
    all.extend_from_slice(own);
    all.sort_unstable();
    all.dedup();
    all
}

/// The (protocol, port) prefixes a rule's L4 part covers.
pub(super) fn l4_prefixes(l4: &L4Match) -> Vec<Prefix> {
    let proto = |p: u8| u32::from(p) << 16;
    match *l4 {
        L4Match::All => vec![Prefix::of_port_space(0, 0)],
        L4Match::Protocol(p) => vec![Prefix::of_port_space(proto(p), 8)],
        L4Match::Ports { protocol, from, to } => port_blocks(from, to)
            .into_iter()
            .map(|(start, len)| Prefix::of_port_space(proto(protocol) | u32::from(start), 8 + len))
            .collect(),
        L4Match::Icmp {
            v6,
            icmp_type,
            code,
        } => {
            let p = proto(if v6 { PROTO_ICMPV6 } else { PROTO_ICMP });
            let prefix = match (icmp_type, code) {
                (None, _) => Prefix::of_port_space(p, 8),
                (Some(t), None) => Prefix::of_port_space(p | (u32::from(t) << 8), 16),
                (Some(t), Some(c)) => {
                    Prefix::of_port_space(p | (u32::from(t) << 8) | u32::from(c), 24)
                }
            };
            vec![prefix]
        }
    }
}

/// The fewest aligned power-of-two blocks covering `from..=to`, as (start, prefix bits of 16).
pub(super) fn port_blocks(from: u16, to: u16) -> Vec<(u16, u8)> {
    let mut blocks = Vec::new();
    let (mut lo, hi) = (u32::from(from), u32::from(to));
    while lo <= hi {
        // The largest block aligned at `lo` that does not pass `hi`.
        let mut size = if lo == 0 {
            1 << 16
        } else {
            1 << lo.trailing_zeros()
        };
        while lo + size - 1 > hi {
            size >>= 1;
        }
        let len = 16 - size.trailing_zeros() as u8;
        blocks.push((lo as u16, len));
        lo += size;
    }
    blocks
}

/// The port entries of one class (class zero), naming rules by `rule_ids`.
pub(super) fn class_ports(
    rules: &RuleTable,
    rule_ids: &[u32],
    class_rules: &[u32],
    reverse_open: [bool; 2],
) -> ClassEntries {
    // (lowest rule ID, some rule's peer is everywhere); u32::MAX = no own rule.
    let mut own: BTreeMap<Prefix, (u32, bool)> = BTreeMap::new();
    for &id in class_rules {
        let everything = rules.everything[index(id)];
        for &prefix in &rules.l4[index(id)] {
            let slot = own.entry(prefix).or_insert((u32::MAX, false));
            *slot = (slot.0.min(id), slot.1 || everything);
        }
        if rules.is_all[index(id)] {
            // Per-protocol keys under "all traffic", so the untracked flag can differ.
            for protocol in [PROTO_TCP, PROTO_UDP] {
                own.entry(Prefix::of_port_space(u32::from(protocol) << 16, 8))
                    .or_insert((u32::MAX, false));
            }
        }
    }
    let folded = fold(
        own,
        |inherited: Option<&(u32, bool)>, (rule, everything)| match inherited {
            Some(&(up_rule, up_everything)) => (up_rule.min(rule), up_everything || everything),
            None => (rule, everything),
        },
    );
    let verdict_of = |prefix: &Prefix, (rule, everything): (u32, bool)| {
        let protocol = (prefix.bits >> 120) as u8;
        let open = match protocol {
            PROTO_TCP => reverse_open[0],
            PROTO_UDP => reverse_open[1],
            _ => false,
        };
        let untracked = everything && prefix.len >= 8 && open;
        PortVerdict {
            rule,
            flags: if untracked { VERDICT_UNTRACKED } else { 0 },
        }
    };
    let mut table = Vec::new();
    for (prefix, value, parent) in &folded {
        let verdict = verdict_of(prefix, *value);
        if let Some(p) = *parent {
            let (up_prefix, up_value, _) = &folded[p];
            if verdict_of(up_prefix, *up_value) == verdict {
                continue;
            }
        }
        let verdict = PortVerdict {
            rule: rule_ids[index(verdict.rule)],
            ..verdict
        };
        table.push((*prefix, verdict));
    }
    let none = PortVerdict {
        rule: NO_RULE,
        flags: 0,
    };
    let mut entries: ClassEntries = lay_out::<Port, _>(&table, none)
        .into_iter()
        .map(|(prefix, verdict)| {
            let word = (prefix.bits >> 104) as u32;
            let key = PortKey::new(0, (word >> 16) as u8, word as u16, prefix.len);
            (key, verdict)
        })
        .collect();
    // In key order, as a previous state's entries are read.
    entries.sort_unstable();
    entries
}
