//! Stable IDs across compiles: what of the previous compile this one takes over.

use std::collections::BTreeMap;
use std::sync::Arc;

use enforcer_common::NO_CLASS;

use super::{
    ClassEntries, ClassInputs, Compiled, HashMap, HashSet, Memo, Policy, PolicyEntries, PolicyFold,
    RuleIds,
};
use crate::model::{Direction, GroupId, Model, Peer};
use crate::policy::eval::{PROTO_TCP, PROTO_UDP, RuleRef, opens_all_ports};

/// A policy's previous folds, which rules' ports changed, and the previous classes.
pub(super) type Refoldable<'a> = (
    &'a PolicyFold,
    &'a [bool],
    &'a BTreeMap<u32, Arc<ClassEntries>>,
);

/// What of the previous compile this one takes over: policies whose inputs are unchanged,
/// and classes computed from the same rules, none of which changed.
pub(super) struct Reuse<'p> {
    pub(super) previous: Option<(&'p Compiled, &'p Memo)>,
    model: &'p Model,
    /// Stable IDs of rules whose contents changed, or that are gone (their IDs may name
    /// other rules one compile later).
    pub(super) stale: HashSet<u32>,
    /// By rule position (both compiles' rule tables alike: the same groups with as many
    /// rules each), whether the rule's ports changed; `None` if the positions differ.
    pub(super) ports_changed: Option<Vec<bool>>,
    groups: HashMap<GroupId, GroupChange>,
}

impl<'p> Reuse<'p> {
    pub(super) fn new(previous: Option<&'p Compiled>, model: &'p Model) -> Self {
        let previous = previous.and_then(|p| p.memo.as_deref().map(|memo| (p, memo)));
        let mut stale = HashSet::default();
        if let Some((compiled, memo)) = previous {
            let rule_of = |m: &'p Model, rule: &RuleRef| {
                m.groups
                    .get(&rule.group_id)
                    .and_then(|g| g.rules(rule.direction).get(rule.index))
            };
            for (id, rule) in compiled.rules.iter() {
                if rule_of(&memo.model, rule) != rule_of(model, rule) {
                    stale.insert(id);
                }
            }
        }
        let ports_changed = previous.and_then(|(_, memo)| ports_changed(&memo.model, model));
        let groups = previous.map_or_else(HashMap::default, |(_, memo)| {
            group_changes(&memo.model, model)
        });
        Self {
            previous,
            model,
            stale,
            ports_changed,
            groups,
        }
    }

    /// The previous folds of `policy`, which rules' ports changed, and the previous
    /// classes, if only ports did (its rules' peers, and the members and prefix lists they
    /// name, are the same).
    pub(super) fn refoldable(&self, policy: &Policy) -> Option<Refoldable<'_>> {
        let (compiled, memo) = self.previous?;
        let changed = self.ports_changed.as_deref()?;
        let fold = memo.folds.get(policy)?;
        let direction = usize::from(policy.direction == Direction::Egress);
        let same = policy_changes(&self.groups, policy).all(|g| g.same_peers[direction]);
        same.then_some((&**fold, changed, &compiled.classes))
    }

    /// The previous folds of `policy`, to keep for the next compile: only while the rules
    /// keep their positions, which the folds name.
    pub(super) fn fold(&self, policy: &Policy) -> Option<&'p Arc<PolicyFold>> {
        self.ports_changed.as_ref()?;
        self.previous?.1.folds.get(policy)
    }

    /// The previous handle and entries of `policy`, if `fold` has its previous folds'
    /// prefixes and classes (so the same entries; a class the previous entries did not name,
    /// all its keys shadowed by longer prefixes', may differ: it is shadowed again).
    pub(super) fn same_table(
        &self,
        policy: &Policy,
        fold: &PolicyFold,
    ) -> Option<(u32, Arc<PolicyEntries>)> {
        let (compiled, memo) = self.previous?;
        let old = memo.folds.get(policy)?;
        let same = old.iter().zip(fold).all(|(old, new)| {
            Arc::ptr_eq(&old.shape, &new.shape)
                && old.classes.iter().zip(&new.classes).all(|(&was, &is)| {
                    was == is
                        || (was != NO_CLASS
                            && is != NO_CLASS
                            && !compiled.classes.contains_key(&was))
                })
        });
        let handle = *memo.handles.get(policy)?;
        let entries = compiled.policies.get(&handle)?;
        same.then(|| (handle, entries.clone()))
    }

    /// The previous handle of `policy`, if what it is compiled from is unchanged.
    pub(super) fn policy(&self, policy: &Policy) -> Option<u32> {
        let (compiled, memo) = self.previous?;
        let handle = *memo.handles.get(policy)?;
        // Its groups' rules of its direction, the members and prefix lists they name, and
        // what the opposite direction opens to everywhere (it decides what is untracked).
        let direction = usize::from(policy.direction == Direction::Egress);
        let unchanged = policy_changes(&self.groups, policy)
            .all(|g| g.same_rules[direction] && g.same_peers[direction])
            && (policy_changes(&self.groups, policy).all(|g| g.same_rules[1 - direction])
                || same_reverse_open(&memo.model, self.model, policy))
            && compiled.policies.contains_key(&handle);
        unchanged.then_some(handle)
    }

    /// The previous ID of a class with these inputs, if none of its rules changed.
    pub(super) fn class(&self, inputs: &ClassInputs) -> Option<u32> {
        let (compiled, memo) = self.previous?;
        let class = *memo.classes.get(inputs)?;
        let unchanged = !inputs.0.iter().any(|id| self.stale.contains(id))
            && compiled.classes.contains_key(&class);
        unchanged.then_some(class)
    }

    /// The previous classes a new table may be switched into in place (`switch.rs`): that
    /// of the same inputs, whatever changed in its rules, then those its prefixes `had`.
    pub(super) fn switchable<'a>(
        &'a self,
        inputs: &ClassInputs,
        had: impl Iterator<Item = u32> + 'a,
    ) -> impl Iterator<Item = u32> + 'a {
        let (compiled, memo) = self.previous.unzip();
        let same = memo.and_then(|memo| memo.classes.get(inputs).copied());
        same.into_iter()
            .chain(had)
            .filter(move |class| compiled.is_some_and(|c| c.classes.contains_key(class)))
    }

    /// The inputs of the previous classes kept in `classes`, for the next compile.
    pub(super) fn kept_class_inputs(
        &self,
        classes: &BTreeMap<u32, Arc<ClassEntries>>,
    ) -> HashMap<ClassInputs, u32> {
        let Some((_, memo)) = self.previous else {
            return HashMap::default();
        };
        memo.classes
            .iter()
            .filter(|(inputs, class)| {
                classes.contains_key(class) && !inputs.0.iter().any(|id| self.stale.contains(id))
            })
            .map(|(inputs, &class)| (inputs.clone(), class))
            .collect()
    }

    pub(super) fn policy_entries(&self, handle: u32) -> Arc<PolicyEntries> {
        let (compiled, _) = self.previous.expect("a kept policy has a previous compile");
        compiled.policies[&handle].clone()
    }

    pub(super) fn class_entries(&self, class: u32) -> Arc<ClassEntries> {
        let (compiled, _) = self.previous.expect("a kept class has a previous compile");
        compiled.classes[&class].clone()
    }
}

/// What changed in one group between two models, per direction (ingress, egress).
#[derive(Clone, Copy)]
pub(super) struct GroupChange {
    /// Its rules of the direction are the same.
    same_rules: [bool; 2],
    /// Its rules of the direction name the same peers, standing for the same addresses.
    same_peers: [bool; 2],
}

/// What changed in each group of either model (a policy's inputs are its groups', so each
/// group is compared once, not once per policy).
fn group_changes(old: &Model, new: &Model) -> HashMap<GroupId, GroupChange> {
    let ids: HashSet<&GroupId> = old.groups.keys().chain(new.groups.keys()).collect();
    ids.into_iter()
        .map(|id| {
            let change = match (old.groups.get(id), new.groups.get(id)) {
                (Some(a), Some(b)) => GroupChange {
                    same_rules: [a.ingress == b.ingress, a.egress == b.egress],
                    same_peers: [Direction::Ingress, Direction::Egress].map(|d| {
                        let (a, b) = (a.rules(d), b.rules(d));
                        a.len() == b.len()
                            && a.iter()
                                .zip(b)
                                .all(|(a, b)| a.peer == b.peer && same_addresses(old, new, &b.peer))
                    }),
                },
                (None, None) => GroupChange {
                    same_rules: [true; 2],
                    same_peers: [true; 2],
                },
                _ => GroupChange {
                    same_rules: [false; 2],
                    same_peers: [false; 2],
                },
            };
            (id.clone(), change)
        })
        .collect()
}

/// The changes of `policy`'s groups (a group in neither model did not change).
fn policy_changes<'c>(
    changes: &'c HashMap<GroupId, GroupChange>,
    policy: &'c Policy,
) -> impl Iterator<Item = GroupChange> + 'c {
    policy.groups.iter().map(|id| {
        changes.get(id).copied().unwrap_or(GroupChange {
            same_rules: [true; 2],
            same_peers: [true; 2],
        })
    })
}

/// Whether the opposite direction of `policy` opens every port of the same protocols to
/// everywhere in both models.
fn same_reverse_open(old: &Model, new: &Model, policy: &Policy) -> bool {
    let opposite = policy.direction.opposite();
    [false, true].into_iter().all(|v6| {
        [PROTO_TCP, PROTO_UDP].into_iter().all(|protocol| {
            opens_all_ports(old, &policy.groups, opposite, v6, protocol)
                == opens_all_ports(new, &policy.groups, opposite, v6, protocol)
        })
    })
}

/// Whether `peer` stands for the same addresses in both models.
fn same_addresses(old: &Model, new: &Model, peer: &Peer) -> bool {
    match peer {
        Peer::Group(g) => old.members.get(g) == new.members.get(g),
        Peer::PrefixList(l) => old.prefix_lists.get(l) == new.prefix_lists.get(l),
        Peer::Cidr(_) => true,
    }
}

/// By rule position (`RuleTable`: groups in order, each group's ingress then egress rules),
/// whether the rule's ports changed; `None` if the models' rule tables differ in shape.
fn ports_changed(old: &Model, new: &Model) -> Option<Vec<bool>> {
    let directions = [Direction::Ingress, Direction::Egress];
    let same_shape = old.groups.len() == new.groups.len()
        && old
            .groups
            .iter()
            .zip(&new.groups)
            .all(|((a_id, a), (b_id, b))| {
                a_id == b_id
                    && directions
                        .iter()
                        .all(|&d| a.rules(d).len() == b.rules(d).len())
            });
    same_shape.then(|| {
        old.groups
            .values()
            .zip(new.groups.values())
            .flat_map(|(a, b)| {
                directions
                    .into_iter()
                    .flat_map(move |d| a.rules(d).iter().zip(b.rules(d)).map(|(a, b)| a.l4 != b.l4))
            })
            .collect()
    })
}

/// The IDs a previous compile gave, by what they stand for, and a source of fresh ones.
pub(super) struct Previous<'p> {
    pub(super) rules: Option<&'p RuleIds>,
    /// Class IDs by entries: only for a previous state read back from the kernel (a
    /// compiled one finds its classes by their inputs, far cheaper).
    pub(super) classes: HashMap<Arc<ClassEntries>, u32>,
    /// Policy handles by entries, indexed on first use (a compile that lays out no policy
    /// again needs none).
    pub(super) policies: Option<HashMap<Arc<PolicyEntries>, u32>>,
    compiled: Option<&'p Compiled>,
    pub(super) rule_ids: Fresh,
    pub(super) class_ids: Fresh,
    pub(super) handles: Fresh,
}

impl<'p> Previous<'p> {
    pub(super) fn index(previous: Option<&'p Compiled>) -> Self {
        let mut index = Self {
            rules: previous.map(|p| &p.rules),
            classes: HashMap::default(),
            policies: None,
            compiled: previous,
            rule_ids: Fresh::default(),
            class_ids: Fresh::default(),
            handles: Fresh::default(),
        };
        let Some(previous) = previous else {
            return index;
        };
        index.rule_ids.taken.extend(previous.rules.by_id.keys());
        // Ascending: entries found under several IDs keep the lowest.
        for (&class, entries) in &previous.classes {
            index.class_ids.taken.insert(class);
            if previous.memo.is_none() {
                index
                    .rule_ids
                    .taken
                    .extend(entries.iter().map(|r| r.verdict.rule));
                index.classes.entry(entries.clone()).or_insert(class);
            }
        }
        for (&handle, entries) in &previous.policies {
            index.handles.taken.insert(handle);
            // A compiled state holds every class its policies name; one read back may not.
            if previous.memo.is_none() {
                index.class_ids.taken.extend(entries.classes());
            }
        }
        index
    }

    pub(super) fn rule_id(&mut self, rule: &RuleRef) -> u32 {
        match self.rules.and_then(|r| r.id(rule)) {
            Some(id) => id,
            None => self.rule_ids.next(),
        }
    }

    pub(super) fn class(&mut self, entries: &ClassEntries) -> u32 {
        match self.classes.get(entries) {
            Some(&class) => class,
            None => self.class_ids.next(),
        }
    }

    pub(super) fn policy(&mut self, entries: &PolicyEntries) -> u32 {
        let compiled = self.compiled;
        let policies = self.policies.get_or_insert_with(|| {
            // Ascending: entries found under several handles keep the lowest.
            let mut index = HashMap::default();
            for (&handle, entries) in compiled.iter().flat_map(|c| &c.policies) {
                index.entry(entries.clone()).or_insert(handle);
            }
            index
        });
        match policies.get(entries) {
            Some(&handle) => handle,
            None => self.handles.next(),
        }
    }
}

/// The lowest IDs (from 1) not taken, in increasing order.
#[derive(Default)]
pub(super) struct Fresh {
    pub(super) taken: HashSet<u32>,
    pub(super) last: u32,
}

impl Fresh {
    pub(super) fn next(&mut self) -> u32 {
        loop {
            self.last = self
                .last
                .checked_add(1)
                .expect("fewer than 2^32 policies, classes and rules");
            if !self.taken.contains(&self.last) {
                return self.last;
            }
        }
    }
}
