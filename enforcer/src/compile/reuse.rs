//! Stable IDs across compiles: what of the previous compile this one takes over.

use std::collections::BTreeMap;
use std::sync::Arc;

use super::{
    ClassEntries, ClassInputs, Compiled, HashMap, HashSet, Memo, Policy, PolicyEntries, PolicyFold,
    RuleIds,
};
use crate::model::{Direction, Model, Peer};
use crate::policy::eval::RuleRef;

/// What of the previous compile this one takes over: policies whose inputs are unchanged,
/// and classes computed from the same rules, none of which changed.
pub(super) struct Reuse<'p> {
    pub(super) previous: Option<(&'p Compiled, &'p Memo)>,
    pub(super) model: &'p Model,
    /// Stable IDs of rules whose contents changed, or that are gone (their IDs may name
    /// other rules one compile later).
    pub(super) stale: HashSet<u32>,
    /// By rule position (both compiles' rule tables alike: the same groups with as many
    /// rules each), whether the rule's ports changed; `None` if the positions differ.
    pub(super) ports_changed: Option<Vec<bool>>,
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
        Self {
            previous,
            model,
            stale,
            ports_changed,
        }
    }

    /// The previous folds of `policy`, and which rules' ports changed, if only ports did
    /// (its rules' peers, and the members and prefix lists they name, are the same).
    pub(super) fn refoldable(&self, policy: &Policy) -> Option<(&'p PolicyFold, &[bool])> {
        let (_, memo) = self.previous?;
        let changed = self.ports_changed.as_deref()?;
        let fold = memo.folds.get(policy)?;
        same_peers(&memo.model, self.model, policy).then_some((&**fold, changed))
    }

    /// The previous folds of `policy`, to keep for the next compile: only while the rules
    /// keep their positions, which the folds name.
    pub(super) fn fold(&self, policy: &Policy) -> Option<&'p Arc<PolicyFold>> {
        self.ports_changed.as_ref()?;
        self.previous?.1.folds.get(policy)
    }

    /// The previous handle and entries of `policy`, if `fold` has its previous folds'
    /// prefixes and classes (so the same entries).
    pub(super) fn same_table(
        &self,
        policy: &Policy,
        fold: &PolicyFold,
    ) -> Option<(u32, Arc<PolicyEntries>)> {
        let (compiled, memo) = self.previous?;
        let old = memo.folds.get(policy)?;
        let same = old
            .iter()
            .zip(fold)
            .all(|(old, new)| Arc::ptr_eq(&old.shape, &new.shape) && old.classes == new.classes);
        let handle = *memo.handles.get(policy)?;
        let entries = compiled.policies.get(&handle)?;
        same.then(|| (handle, entries.clone()))
    }

    /// The previous handle of `policy`, if what it is compiled from is unchanged.
    pub(super) fn policy(&self, policy: &Policy) -> Option<u32> {
        let (compiled, memo) = self.previous?;
        let handle = *memo.handles.get(policy)?;
        let unchanged = same_policy_inputs(&memo.model, self.model, policy)
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

    /// The previous ID of a class with these inputs, whatever changed in its rules: the
    /// ID its new table may be switched to in place (`switch.rs`).
    pub(super) fn switchable(&self, inputs: &ClassInputs) -> Option<u32> {
        let (compiled, memo) = self.previous?;
        let class = *memo.classes.get(inputs)?;
        compiled.classes.contains_key(&class).then_some(class)
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

/// Whether `policy` compiles the same in both models: its groups' rules (both directions: the
/// opposite one decides what is untracked), and the members and prefix lists they name.
pub(super) fn same_policy_inputs(old: &Model, new: &Model, policy: &Policy) -> bool {
    policy.groups.iter().all(|id| {
        let same_rules = match (old.groups.get(id), new.groups.get(id)) {
            (Some(a), Some(b)) => a.ingress == b.ingress && a.egress == b.egress,
            (None, None) => true,
            _ => false,
        };
        same_rules
            && new.groups.get(id).is_none_or(|group| {
                group
                    .rules(policy.direction)
                    .iter()
                    .all(|rule| same_addresses(old, new, &rule.peer))
            })
    })
}

/// Whether `policy`'s rules name the same peers, standing for the same addresses, in both
/// models: then its peer folds have the same prefixes, whatever the rules' ports.
fn same_peers(old: &Model, new: &Model, policy: &Policy) -> bool {
    policy
        .groups
        .iter()
        .all(|id| match (old.groups.get(id), new.groups.get(id)) {
            (Some(a), Some(b)) => {
                let (a, b) = (a.rules(policy.direction), b.rules(policy.direction));
                a.len() == b.len()
                    && a.iter()
                        .zip(b)
                        .all(|(a, b)| a.peer == b.peer && same_addresses(old, new, &b.peer))
            }
            (None, None) => true,
            _ => false,
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
    pub(super) policies: HashMap<Arc<PolicyEntries>, u32>,
    pub(super) rule_ids: Fresh,
    pub(super) class_ids: Fresh,
    pub(super) handles: Fresh,
}

impl<'p> Previous<'p> {
    pub(super) fn index(previous: Option<&'p Compiled>) -> Self {
        let mut index = Self {
            rules: previous.map(|p| &p.rules),
            classes: HashMap::default(),
            policies: HashMap::default(),
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
            index.class_ids.taken.extend(entries.classes());
            index.policies.entry(entries.clone()).or_insert(handle);
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
        match self.policies.get(entries) {
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
