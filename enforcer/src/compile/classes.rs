//! Peer classes and their port tables: which rules can decide for a prefix, and the
//! (protocol, port) ranges of each class with their verdicts, as the kernel searches them.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use enforcer_common::{NO_CLASS, NO_RULE, PortRange, PortVerdict, VERDICT_UNTRACKED, port_word};

use super::{ClassEntries, HashMap, Policy, handle, index};
use crate::compile::prefix::{Prefix, fold};
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

/// What a prefix of a policy's peer table names: a class to compute from a rule set, or,
/// for a prefix none of whose rules changed, the class it had in the previous compile.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(super) enum ClassRef {
    Key(ClassKey),
    Known(u32),
}

/// One family's peer fold of a policy, kept for the next compile: when only some rules'
/// ports change, only the prefixes under those rules' peers are folded again
/// ([`refold`]).
#[derive(Debug)]
pub(super) struct FamilyFold {
    /// Every prefix the policy's rules name, in (bits, len) order (a depth-first walk of
    /// its trie), with its own rules (positions) and its nearest covering prefix: what only
    /// the rules' peers decide, shared from compile to compile while they stay.
    pub(super) shape: Arc<[FoldNode]>,
    /// Each prefix's rules (positions, pruned): its own and its covering prefixes'.
    pub(super) sets: Vec<Arc<[u32]>>,
    /// For which protocols (TCP, UDP) the opposite direction opens every port.
    pub(super) reverse_open: [bool; 2],
    /// Each prefix's class in the peer table; `NO_CLASS` for a prefix left out (its set
    /// is its parent's). Filled once the classes are resolved.
    pub(super) classes: Vec<u32>,
}

#[derive(Debug)]
pub(super) struct FoldNode {
    pub(super) prefix: Prefix,
    pub(super) own: Box<[u32]>,
    pub(super) parent: Option<usize>,
}

/// A family's fold and, for each prefix of the peer table (by index), its class.
pub(super) type Folded = (FamilyFold, Vec<(usize, ClassRef)>);

/// For which protocols (TCP, UDP) the opposite direction of `policy` opens every port of
/// `family` to everywhere.
fn reverse_open(model: &Model, policy: &Policy, v6: bool) -> [bool; 2] {
    [PROTO_TCP, PROTO_UDP].map(|protocol| {
        let opposite = policy.direction.opposite();
        opens_all_ports(model, &policy.groups, opposite, v6, protocol)
    })
}

/// The peer table of one policy and family, folded from scratch.
pub(super) fn policy_peers(
    model: &Model,
    sets: &mut RuleSets,
    policy: &Policy,
    v6: bool,
) -> Folded {
    let mut own: BTreeMap<Prefix, Vec<u32>> = BTreeMap::new();
    for group in &policy.groups {
        for (id, rule) in sets.rules.of(model, group, policy.direction) {
            for cidr in peer_cidrs(model, &rule.peer, v6) {
                own.entry(Prefix::of_cidr(cidr)).or_default().push(id);
            }
        }
    }
    let folded = fold(
        own,
        |inherited: Option<&(usize, Box<[u32]>)>, own: Vec<u32>| {
            let kept: Box<[u32]> = own.as_slice().into();
            (sets.extend(inherited.map(|i| i.0), own), kept)
        },
    );
    let mut shape = Vec::with_capacity(folded.len());
    let mut indexes = Vec::with_capacity(folded.len());
    for (prefix, (set, own), parent) in folded {
        shape.push(FoldNode {
            prefix,
            own,
            parent,
        });
        indexes.push(set);
    }
    let fold = FamilyFold {
        shape: shape.into(),
        sets: indexes.iter().map(|&i| sets.sets[i].clone()).collect(),
        reverse_open: reverse_open(model, policy, v6),
        classes: Vec::new(),
    };
    let table = (0..indexes.len())
        .filter(|&i| {
            fold.shape[i]
                .parent
                .is_none_or(|p| indexes[p] != indexes[i])
        })
        .map(|i| {
            (
                i,
                ClassRef::Key(class_key(sets, indexes[i], fold.reverse_open)),
            )
        })
        .collect();
    (fold, table)
}

/// The peer table of one policy and family whose rules' peers are those of `old` and of
/// which only the rules at `changed` positions changed (their ports): the prefixes under
/// none of those rules keep their sets and classes (those of `held`, the previous compile's:
/// a class no entry named, all its keys shadowed by longer prefixes, was not kept), the
/// others are folded again. `None` if the opposite direction now opens other protocols
/// (every class changes).
pub(super) fn refold(
    model: &Model,
    sets: &mut RuleSets,
    policy: &Policy,
    v6: bool,
    old: &FamilyFold,
    changed: &[bool],
    held: &BTreeMap<u32, Arc<ClassEntries>>,
) -> Option<Folded> {
    let open = reverse_open(model, policy, v6);
    if open != old.reverse_open {
        return None;
    }
    let mut fold = FamilyFold {
        shape: old.shape.clone(),
        sets: old.sets.clone(),
        reverse_open: open,
        classes: Vec::new(),
    };
    let mut dirty = vec![false; fold.shape.len()];
    let mut table = Vec::new();
    for (i, node) in fold.shape.iter().enumerate() {
        dirty[i] =
            node.parent.is_some_and(|p| dirty[p]) || node.own.iter().any(|&id| changed[index(id)]);
        let class = old.classes[i];
        if !dirty[i] && class != NO_CLASS && held.contains_key(&class) {
            table.push((i, ClassRef::Known(class)));
            continue;
        }
        if !dirty[i] {
            if class != NO_CLASS {
                let set = sets.intern(fold.sets[i].clone());
                table.push((i, ClassRef::Key(class_key(sets, set, open))));
            }
            continue;
        }
        let inherited = node.parent.map_or(&[][..], |p| &*fold.sets[p]);
        let set = sets.prune(&union(inherited, &node.own));
        let set = sets.intern(set.into());
        fold.sets[i] = sets.sets[set].clone();
        if node.parent.is_none_or(|p| fold.sets[p] != fold.sets[i]) {
            table.push((i, ClassRef::Key(class_key(sets, set, open))));
        }
    }
    Some((fold, table))
}

/// The class key of rule set `set`: only a rule from everywhere can make a flow untracked.
fn class_key(sets: &RuleSets, set: usize, reverse_open: [bool; 2]) -> ClassKey {
    let everything = sets.sets[set]
        .iter()
        .any(|&id| sets.rules.everything[index(id)]);
    ClassKey {
        set,
        reverse_open: if everything { reverse_open } else { [false; 2] },
    }
}

/// The global rule table with what the compiler needs per rule.
pub(super) struct RuleTable {
    pub(super) refs: Vec<RuleRef>,
    /// The rule's L4 part as one span of the 24-bit (protocol, port) space: an L4 part is
    /// contiguous.
    pub(super) spans: Vec<(u32, u32)>,
    /// The rule's peer is `0.0.0.0/0` or `::/0`.
    pub(super) everything: Vec<bool>,
    /// First rule ID of each group's ingress and egress rules.
    pub(super) first: BTreeMap<(GroupId, Direction), u32>,
}

impl RuleTable {
    pub(super) fn new(model: &Model) -> Self {
        let mut table = Self {
            refs: Vec::new(),
            spans: Vec::new(),
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
                    table.spans.push(l4_span(&rule.l4));
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
    pub(super) sets: Vec<Arc<[u32]>>,
    pub(super) ids: HashMap<Arc<[u32]>, usize>,
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
        let base = inherited.map_or(&[][..], |i| &*self.sets[i]);
        let set = self.prune(&union(base, &key.1));
        let id = self.intern(set.into());
        self.memo.insert(key, id);
        id
    }

    /// The index of `set`.
    pub(super) fn intern(&mut self, set: Arc<[u32]>) -> usize {
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

/// The first and last (protocol, port) word a rule's L4 part covers.
pub(super) fn l4_span(l4: &L4Match) -> (u32, u32) {
    let protocol = |p: u8| (port_word(p, 0), port_word(p, u16::MAX));
    match *l4 {
        L4Match::All => (0, port_word(u8::MAX, u16::MAX)),
        L4Match::Protocol(p) => protocol(p),
        L4Match::Ports { protocol, from, to } => {
            (port_word(protocol, from), port_word(protocol, to))
        }
        L4Match::Icmp {
            v6,
            icmp_type,
            code,
        } => {
            let p = if v6 { PROTO_ICMPV6 } else { PROTO_ICMP };
            let word = |t: u8, c: u8| port_word(p, u16::from_be_bytes([t, c]));
            match (icmp_type, code) {
                (None, _) => protocol(p),
                (Some(t), None) => (word(t, 0), word(t, u8::MAX)),
                (Some(t), Some(c)) => (word(t, c), word(t, c)),
            }
        }
    }
}

/// The port table of one class: for every (protocol, port) word, the lowest rule of
/// `class_rules` covering it (named by `rule_ids`) and whether the flow goes untracked
/// (some covering rule's peer is everywhere and the opposite direction opens every port
/// of the protocol, `reverse_open` for TCP and UDP), as sorted ranges, neighbours'
/// verdicts differing.
pub(super) fn class_ports(
    rules: &RuleTable,
    rule_ids: &[u32],
    class_rules: &[u32],
    reverse_open: [bool; 2],
) -> ClassEntries {
    // A sweep over the word space: at each edge, rules start (`lo`) and end (`hi + 1`);
    // the active rules by position, so the first is the lowest.
    let mut events: Vec<(u32, bool, u32)> = Vec::with_capacity(2 * class_rules.len());
    for &id in class_rules {
        let (lo, hi) = rules.spans[index(id)];
        events.extend([(lo, true, id), (hi + 1, false, id)]);
    }
    // Where only the untracked flag may change: TCP's and UDP's edges.
    for (protocol, open) in [PROTO_TCP, PROTO_UDP].into_iter().zip(reverse_open) {
        if open {
            events.extend([
                (port_word(protocol, 0), true, 0),
                (port_word(protocol + 1, 0), true, 0),
            ]);
        }
    }
    events.sort_unstable();
    let mut active: BTreeSet<u32> = BTreeSet::new();
    let mut everywhere = 0usize;
    let mut table: ClassEntries = Vec::new();
    let mut next = events.iter().peekable();
    let mut start = 0;
    loop {
        while let Some(&&(_, starts, id)) = next.peek().filter(|e| e.0 == start) {
            next.next();
            if id == 0 {
                continue;
            }
            let everything = usize::from(rules.everything[index(id)]);
            if starts {
                active.insert(id);
                everywhere += everything;
            } else {
                active.remove(&id);
                everywhere -= everything;
            }
        }
        let open = match (start >> 16) as u8 {
            PROTO_TCP => reverse_open[0],
            PROTO_UDP => reverse_open[1],
            _ => false,
        };
        let verdict = PortVerdict {
            rule: active.first().map_or(NO_RULE, |&id| rule_ids[index(id)]),
            flags: if everywhere > 0 && open {
                VERDICT_UNTRACKED
            } else {
                0
            },
        };
        if table.last().is_none_or(|r| r.verdict != verdict) {
            table.push(PortRange { start, verdict });
        }
        match next.peek() {
            Some(&&(edge, _, _)) if edge <= port_word(u8::MAX, u16::MAX) => start = edge,
            _ => break,
        }
    }
    table
}
