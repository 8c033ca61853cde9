//! Compiles the model into the fast path's map entries, whose lookups cost the same whatever the
//! number of rules, and [`interpret`]s those entries exactly as the kernel looks them up.
//!
//! A policy's peer table maps (prefix) to a class, the set of rules whose peer covers the
//! prefix (each longer prefix folds in every shorter covering one, as a longest-prefix match
//! returns only the longest), laid out for the kernel's binary search on prefix lengths
//! (`prefix::lay_out`). A class's port table maps ranges of (protocol, port or ICMP
//! type/code) to the lowest allowing rule ID, sorted for the kernel's binary search. Rule IDs, classes and policy handles
//! start at 1; 0 means none. They are stable across compiles ([`compile_with`]): what did not
//! change keeps its ID.
//!
//! To keep the maps small, a class leaves out rules that can never decide a verdict (a
//! lower rule covers all they cover), a prefix whose value equals that of the nearest
//! shorter prefix covering it is left out (the longest match answers the same without it),
//! and neighbouring port ranges with the same verdict are one.

mod classes;
mod interpret;
mod prefix;
mod reuse;
mod switch;
#[cfg(test)]
mod tests;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

/// The compiler hashes many rule sets and entry lists: a fast hasher (its inputs come from
/// the operator's own state, not from the network).
type HashMap<K, V> = std::collections::HashMap<K, V, foldhash::fast::RandomState>;
type HashSet<K> = std::collections::HashSet<K, foldhash::fast::RandomState>;
use std::net::IpAddr;

use enforcer_common::lengths::{PeerV4, PeerV6};
use enforcer_common::{
    AddrKey, EnforcingMode, MAX_UNFILTERED_V4, MAX_UNFILTERED_V6, NO_CLASS, NO_POLICY, POD_AUDIT,
    POD_HAS_IPV4, POD_HAS_IPV6, PeerClass, PeerKeyV4, PeerKeyV6, PodEntry, PortRange, VLAN_MAX,
    VLAN_MIN, policy_slot,
};

use crate::compile::prefix::{Prefix, lay_out};
use crate::model::{Direction, EnforcingAction, GroupId, Model};
use crate::policy::eval::{self, RuleRef, sorted_set};
use classes::{
    ClassKey, ClassRef, FamilyFold, Folded, RuleSets, RuleTable, class_ports, policy_peers, refold,
};
pub use interpret::{Interpretation, SideLookup, disagreement, interpret};
use reuse::{Previous, Reuse};
pub use switch::{Switched, unsafe_switches};

/// Why a model cannot be compiled.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum CompileError {
    #[error("pod {pod}: VLAN {vlan} is outside {VLAN_MIN}..={VLAN_MAX}")]
    InvalidVlan { pod: String, vlan: u16 },
    #[error("pods {first} and {second} both use VLAN {vlan}")]
    DuplicateVlan {
        vlan: u16,
        first: String,
        second: String,
    },
    #[error("pod {pod}: more than {capacity} never-filtered peers of one family")]
    TooManyUnfiltered { pod: String, capacity: usize },
}

/// The groups and direction of one side of a pod: what a policy handle is compiled from.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
struct Policy {
    /// Sorted and de-duplicated.
    groups: Vec<GroupId>,
    direction: Direction,
}

/// Every map entry the kernel needs for a model, in deterministic order: exactly what the
/// maps hold once it is applied, so a state read back from the kernel is one too. Policy and
/// class entries are grouped by ID (entries under an ID never change: copy-on-write) and
/// shared with the previous compile where they did not change.
#[derive(Clone, Debug, Default)]
pub struct Compiled {
    pub pods: BTreeMap<u16, PodEntry>,
    /// Peer entries by policy handle (the keys' `policy` zero), every handle pods use.
    pub policies: BTreeMap<u32, Arc<PolicyEntries>>,
    /// Port entries by class (the keys' `class` zero), every class the policies name.
    pub classes: BTreeMap<u32, Arc<ClassEntries>>,
    pub node_local: BTreeMap<AddrKey, u8>,
    /// The rules the port verdicts name.
    pub rules: RuleIds,
    /// What the next compile may reuse; `None` for a state read back from the kernel.
    memo: Option<Arc<Memo>>,
}

impl PartialEq for Compiled {
    /// Equal map contents, whatever either compile remembers.
    fn eq(&self, other: &Self) -> bool {
        self.pods == other.pods
            && self.policies == other.policies
            && self.classes == other.classes
            && self.node_local == other.node_local
            && self.rules == other.rules
    }
}

impl Eq for Compiled {}

/// A class's port table: ranges sorted by start, the first at 0.
pub type ClassEntries = Vec<PortRange>;

/// A policy's IPv4 and IPv6 peer entries, its own handle zeroed in the keys, sorted.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
pub struct PolicyEntries {
    pub v4: Vec<(PeerKeyV4, PeerClass)>,
    pub v6: Vec<(PeerKeyV6, PeerClass)>,
}

impl PolicyEntries {
    /// The classes the entries name.
    pub fn classes(&self) -> impl Iterator<Item = u32> + '_ {
        let v4 = self.v4.iter().map(|(_, c)| c.class);
        v4.chain(self.v6.iter().map(|(_, c)| c.class))
            .filter(|&c| c != NO_CLASS)
    }
}

/// What a compile remembers for the next: the model it compiled, its policies' handles and
/// its classes' IDs by what they were computed from.
#[derive(Debug)]
struct Memo {
    model: Model,
    handles: HashMap<Policy, u32>,
    classes: HashMap<ClassInputs, u32>,
    /// Each policy's peer folds, to fold again only what a change of ports touches.
    folds: HashMap<Policy, Arc<PolicyFold>>,
}

/// A policy's IPv4 and IPv6 peer folds.
type PolicyFold = [FamilyFold; 2];

/// What a class's port entries are computed from, besides the rules' contents: the stable IDs
/// of its rules (sorted) and for which protocols the opposite direction opens every port.
type ClassInputs = (Vec<u32>, [bool; 2]);

impl Compiled {
    pub fn rule(&self, id: u32) -> Option<&RuleRef> {
        self.rules.get(id)
    }

    /// The ID of a rule, if it is in the table.
    pub fn rule_id(&self, rule: &RuleRef) -> Option<u32> {
        self.rules.id(rule)
    }
}

/// Rule IDs and the rules they stand for, both ways.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RuleIds {
    by_id: BTreeMap<u32, RuleRef>,
    by_rule: BTreeMap<RuleRef, u32>,
}

impl RuleIds {
    /// Names rule `id`; a rule named by several IDs is found by the lowest.
    pub fn insert(&mut self, id: u32, rule: RuleRef) {
        let lowest = self.by_rule.get(&rule).map_or(id, |&known| known.min(id));
        self.by_rule.insert(rule.clone(), lowest);
        self.by_id.insert(id, rule);
    }

    pub fn get(&self, id: u32) -> Option<&RuleRef> {
        self.by_id.get(&id)
    }

    pub fn id(&self, rule: &RuleRef) -> Option<u32> {
        self.by_rule.get(rule).copied()
    }

    pub fn len(&self) -> usize {
        self.by_id.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_id.is_empty()
    }

    /// Every (ID, rule), by ID.
    pub fn iter(&self) -> impl Iterator<Item = (u32, &RuleRef)> {
        self.by_id.iter().map(|(&id, rule)| (id, rule))
    }
}

/// Builds the map entries of every pod of `model`, with fresh IDs.
pub fn compile(model: &Model) -> Result<Compiled, CompileError> {
    compile_with(model, None)
}

/// Builds the map entries of every pod of `model`, keeping the IDs `previous` gave to what
/// did not change: a rule keeps its ID while its (group, direction, index) exists; a policy
/// handle keeps its ID if its entries are identical, and so does a peer class, found by the
/// rules it was computed from (or, over a state read back from the kernel, by its entries);
/// entries that change get a fresh class or handle (copy-on-write: `maps/apply.rs` never rewrites
/// entries in use), but for a class whose rules' ports changed, which keeps its ID where no
/// pod can see its table switched beside another change (`switch.rs`). Over a compiled
/// `previous`, policies and classes whose inputs did not change are taken over as they are,
/// not computed again, and a policy whose rules changed only their ports is folded again
/// only under those rules' prefixes. Fresh IDs are the lowest that
/// neither `previous` nor this compile uses, so an ID freed by one compile is reused at the
/// earliest by the next. Deterministic for (model, previous).
pub fn compile_with(model: &Model, previous: Option<&Compiled>) -> Result<Compiled, CompileError> {
    check_vlans(model)?;
    let rules = RuleTable::new(model);
    let policies = policies(model);
    let reuse = Reuse::new(previous, model);
    let mut before = Previous::index(previous);
    let rule_ids: Vec<u32> = rules.refs.iter().map(|r| before.rule_id(r)).collect();

    // Policies whose inputs did not change keep their handle, entries, classes and folds.
    let mut handles: Vec<Option<u32>> = policies.iter().map(|p| reuse.policy(p)).collect();
    let mut policy_entries: BTreeMap<u32, Arc<PolicyEntries>> = BTreeMap::new();
    let mut classes: BTreeMap<u32, Arc<ClassEntries>> = BTreeMap::new();
    let mut folds: HashMap<Policy, Arc<PolicyFold>> = HashMap::default();
    for (policy, handle) in policies.iter().zip(&handles) {
        let Some(handle) = *handle else { continue };
        let entries = reuse.policy_entries(handle);
        for class in entries.classes() {
            classes.insert(class, reuse.class_entries(class));
        }
        policy_entries.insert(handle, entries);
        if let Some(fold) = reuse.fold(policy) {
            folds.insert(policy.clone(), fold.clone());
        }
    }

    // The other policies' peer tables, computed in parallel, point at kept classes or at
    // interned class keys (value = order of first sight); classes are visited in the order
    // of their rule sets once all are known, so that fresh IDs depend neither on the walk
    // nor on the threads.
    let pending: Vec<usize> = (0..policies.len())
        .filter(|&i| handles[i].is_none())
        .collect();
    let mut sets = RuleSets::new(&rules);
    let mut interned: HashMap<ClassKey, usize> = HashMap::default();
    let mut known: Vec<u32> = Vec::new();
    let mut folded: Vec<PendingFold> = Vec::with_capacity(pending.len());
    let mut hints: Vec<(usize, u32)> = Vec::new();
    for work in peer_work(model, &rules, &policies, &pending, &reuse) {
        let global: Vec<usize> = work.sets.into_iter().map(|set| sets.intern(set)).collect();
        for (i, [(v4, v4_table), (v6, v6_table)]) in work.policies {
            // A prefix folded again had a class: an ID its new table may take.
            let previous = reuse.fold(&policies[i]);
            let fold = [v4, v6];
            let mut table: [Vec<(usize, Slot)>; 2] = Default::default();
            for (family, refs) in [v4_table, v6_table].into_iter().enumerate() {
                let old = previous
                    .map(|p| &p[family])
                    .filter(|old| Arc::ptr_eq(&old.shape, &fold[family].shape));
                for (node, class) in refs {
                    let slot = match class {
                        ClassRef::Known(class) => {
                            known.push(class);
                            Slot::Known(class)
                        }
                        ClassRef::Key(key) => {
                            let key = ClassKey {
                                set: global[key.set],
                                ..key
                            };
                            let next = interned.len();
                            let provisional = *interned.entry(key).or_insert(next);
                            if let Some(old) = old {
                                hints.push((provisional, old.classes[node]));
                            }
                            Slot::Provisional(provisional)
                        }
                    };
                    table[family].push((node, slot));
                }
            }
            folded.push(PendingFold {
                policy: i,
                fold,
                table,
            });
        }
    }
    let mut class_of = vec![0; interned.len()];
    // A prefix none of whose rules changed keeps its class, as it is.
    known.sort_unstable();
    known.dedup();
    for class in known {
        classes.insert(class, reuse.class_entries(class));
    }
    let mut keys: Vec<(&ClassKey, usize)> = interned.iter().map(|(k, &v)| (k, v)).collect();
    keys.sort_by(|(a, _), (b, _)| {
        (&sets.sets[a.set], a.reverse_open).cmp(&(&sets.sets[b.set], b.reverse_open))
    });

    // A class computed from the same unchanged rules keeps its ID and entries; classes with
    // identical port entries share one ID.
    let mut class_inputs: HashMap<ClassInputs, u32> = reuse.kept_class_inputs(&classes);
    let mut recomputed = Vec::new();
    for (key, provisional) in keys {
        let set = &sets.sets[key.set];
        let mut ids: Vec<u32> = set.iter().map(|&p| rule_ids[index(p)]).collect();
        ids.sort_unstable();
        let inputs = (ids, key.reverse_open);
        match reuse.class(&inputs) {
            Some(class) => {
                classes.insert(class, reuse.class_entries(class));
                class_of[provisional] = class;
                class_inputs.insert(inputs, class);
            }
            None => {
                let entries = class_ports(&rules, &rule_ids, set, key.reverse_open);
                recomputed.push((provisional, inputs, entries));
            }
        }
    }
    // A class of the same rules, some of whose ports changed, keeps its ID (its table is
    // switched in place) unless another table of this compile holds it.
    hints.sort_unstable();
    hints.dedup();
    let mut computed: HashMap<ClassEntries, u32> = HashMap::default();
    for (provisional, inputs, entries) in recomputed {
        let class = match computed.get(&entries) {
            Some(&class) => class,
            None => {
                let first = hints.partition_point(|&(p, _)| p < provisional);
                let had = hints[first..]
                    .iter()
                    .take_while(|&&(p, _)| p == provisional)
                    .map(|&(_, class)| class);
                let class = reuse
                    .switchable(&inputs, had)
                    .find(|class| !classes.contains_key(class))
                    .unwrap_or_else(|| before.class(&entries));
                classes.insert(class, Arc::new(entries.clone()));
                computed.insert(entries, class);
                class
            }
        };
        class_of[provisional] = class;
        class_inputs.insert(inputs, class);
    }

    // Policies with identical peer entries share one handle (a kept policy's is found by
    // `before`, which indexes every previous policy by its entries). A switched class that
    // some pod could see beside other changes (`unsafe_switches`) takes a fresh ID, and the
    // policies are laid out again.
    let kept_entries = policy_entries.clone();
    let fresh_handles = before.handles.last;
    let (pods, handles) = loop {
        let laid = lay_out_policies(
            &policies,
            &mut folded,
            &class_of,
            &reuse,
            &mut before,
            &mut handles,
        );
        policy_entries = kept_entries.clone();
        policy_entries.extend(laid);
        let all: Vec<u32> = handles.iter().flatten().copied().collect();
        let pods = pod_entries(model, &policies, &all)?;
        let switched: Switched = match previous {
            Some(previous) => classes
                .iter()
                .filter(|(class, entries)| {
                    previous
                        .classes
                        .get(class)
                        .is_some_and(|held| !Arc::ptr_eq(held, entries) && held != *entries)
                })
                .map(|(&class, _)| class)
                .collect(),
            None => Switched::new(),
        };
        let candidate = Compiled {
            pods,
            policies: policy_entries.clone(),
            ..Compiled::default()
        };
        let refused = match previous {
            Some(previous) => unsafe_switches(previous, &candidate, &switched),
            None => Vec::new(),
        };
        if refused.is_empty() {
            break (candidate.pods, all);
        }
        for class in refused {
            let fresh = before.class_ids.next();
            for slot in class_of.iter_mut().filter(|c| **c == class) {
                *slot = fresh;
            }
            let entries = classes.remove(&class).expect("a switched class is held");
            classes.insert(fresh, entries);
            for value in class_inputs.values_mut().filter(|c| **c == class) {
                *value = fresh;
            }
        }
        for &i in &pending {
            handles[i] = None;
        }
        before.handles.last = fresh_handles;
    };
    // A class no policy names (its prefixes all folded into longer ones) is not kept: a
    // compile over this one would not take it over, and the two would differ.
    let mut named = vec![false; classes.keys().last().map_or(0, |&c| index(c) + 2)];
    for class in policy_entries.values().flat_map(|e| e.classes()) {
        named[class as usize] = true;
    }
    classes.retain(|&class, _| named[class as usize]);
    class_inputs.retain(|_, &mut class| named[class as usize]);

    let node_local = model
        .node_local
        .iter()
        .map(|&addr| (addr_key(0, addr), 1))
        .collect();

    let mut ids = RuleIds::default();
    for (rule, id) in rules.refs.into_iter().zip(rule_ids) {
        ids.insert(id, rule);
    }
    for pending in folded {
        let [v4, v6] = pending.fold;
        folds.insert(policies[pending.policy].clone(), Arc::new([v4, v6]));
    }
    let memo = Memo {
        model: model.clone(),
        handles: policies.into_iter().zip(handles).collect(),
        classes: class_inputs,
        folds,
    };
    Ok(Compiled {
        pods,
        policies: policy_entries,
        classes,
        node_local,
        rules: ids,
        memo: Some(Arc::new(memo)),
    })
}

/// A policy compiled again: its folds (IPv4, IPv6) and their peer tables as (prefix
/// index, class).
struct PendingFold {
    policy: usize,
    fold: [FamilyFold; 2],
    table: [Vec<(usize, Slot)>; 2],
}

/// A peer-table prefix's class: kept from the previous compile, or one to resolve
/// (`class_of[provisional]`).
#[derive(Clone, Copy)]
enum Slot {
    Known(u32),
    Provisional(usize),
}

/// Lays out the peer tables of the policies compiled again, their provisional classes
/// replaced by `class_of` (and recorded in their folds), and gives each a handle
/// (`handles[i]`): a policy whose prefixes and classes are those of its previous fold keeps
/// its handle and entries; otherwise policies with identical entries share one, and
/// `before` finds a previous policy's by its entries.
fn lay_out_policies(
    policies: &[Policy],
    folded: &mut [PendingFold],
    class_of: &[u32],
    reuse: &Reuse,
    before: &mut Previous,
    handles: &mut [Option<u32>],
) -> BTreeMap<u32, Arc<PolicyEntries>> {
    let mut laid = BTreeMap::new();
    let mut seen: HashMap<Arc<PolicyEntries>, u32> = HashMap::default();
    for pending in folded {
        for (fold, table) in pending.fold.iter_mut().zip(&pending.table) {
            fold.classes = vec![NO_CLASS; fold.shape.len()];
            for &(node, slot) in table {
                fold.classes[node] = match slot {
                    Slot::Known(class) => class,
                    Slot::Provisional(provisional) => class_of[provisional],
                };
            }
        }
        if let Some((handle, entries)) = reuse.same_table(&policies[pending.policy], &pending.fold)
        {
            laid.insert(handle, entries);
            handles[pending.policy] = Some(handle);
            continue;
        }
        let tables = pending.fold.each_ref().map(|fold| {
            (0..fold.shape.len())
                .filter(|&node| fold.classes[node] != NO_CLASS)
                .map(|node| {
                    let class = PeerClass {
                        class: fold.classes[node],
                    };
                    (fold.shape[node].prefix, class)
                })
                .collect::<Vec<_>>()
        });
        let entries = policy_layout(&tables[0], &tables[1]);
        let handle = match seen.get(&entries) {
            Some(&handle) => handle,
            None => {
                let handle = before.policy(&entries);
                let entries = Arc::new(entries);
                laid.insert(handle, entries.clone());
                seen.insert(entries, handle);
                handle
            }
        };
        handles[pending.policy] = Some(handle);
    }
    laid
}

/// Peer tables of some policies (by index), their classes' rule sets local to the work.
struct PeerWork {
    sets: Vec<Arc<[u32]>>,
    policies: Vec<(usize, [Folded; 2])>,
}

/// The peer tables of `policies[pending]`, each folded again from its previous fold where
/// only rules' ports changed (`Reuse::refoldable`), from scratch otherwise; the work spread
/// over the CPUs (each policy's fold is independent; a node's hundreds of policies are most
/// of a compile).
fn peer_work(
    model: &Model,
    rules: &RuleTable,
    policies: &[Policy],
    pending: &[usize],
    reuse: &Reuse,
) -> Vec<PeerWork> {
    let work = |chunk: &[usize]| {
        let mut sets = RuleSets::new(rules);
        let policies = chunk
            .iter()
            .map(|&i| {
                let policy = &policies[i];
                let previous = reuse.refoldable(policy);
                let families = [false, true].map(|v6| {
                    previous
                        .and_then(|(old, changed, held)| {
                            let old = &old[usize::from(v6)];
                            refold(model, &mut sets, policy, v6, old, changed, held)
                        })
                        .unwrap_or_else(|| policy_peers(model, &mut sets, policy, v6))
                });
                (i, families)
            })
            .collect();
        PeerWork {
            sets: sets.sets,
            policies,
        }
    };
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get().min(8));
    // Threads only pay off for more than a handful of policies.
    if threads == 1 || pending.len() < 4 * threads {
        return vec![work(pending)];
    }
    let chunk = pending.len().div_ceil(threads);
    std::thread::scope(|scope| {
        let running: Vec<_> = pending
            .chunks(chunk)
            .map(|part| scope.spawn(move || work(part)))
            .collect();
        running
            .into_iter()
            .map(|thread| thread.join().expect("a compile thread does not panic"))
            .collect()
    })
}

/// A policy's peer tables laid out for the kernel's search, keys sorted.
fn policy_layout(v4: &[(Prefix, PeerClass)], v6: &[(Prefix, PeerClass)]) -> PolicyEntries {
    let none = PeerClass { class: NO_CLASS };
    let mut entries = PolicyEntries {
        v4: lay_out::<PeerV4, _>(v4, none)
            .into_iter()
            .map(|(p, class)| {
                let addr = ((p.bits >> 96) as u32).to_be_bytes();
                (PeerKeyV4::new(0, addr, p.len), class)
            })
            .collect(),
        v6: lay_out::<PeerV6, _>(v6, none)
            .into_iter()
            .map(|(p, class)| (PeerKeyV6::new(0, &p.bits.to_be_bytes(), p.len), class))
            .collect(),
    };
    entries.v4.sort_unstable();
    entries.v6.sort_unstable();
    entries
}

fn check_vlans(model: &Model) -> Result<(), CompileError> {
    let mut seen: BTreeMap<u16, String> = BTreeMap::new();
    for pod in &model.pods {
        if !(VLAN_MIN..=VLAN_MAX).contains(&pod.vlan) {
            return Err(CompileError::InvalidVlan {
                pod: pod.key(),
                vlan: pod.vlan,
            });
        }
        if let Some(first) = seen.insert(pod.vlan, pod.key()) {
            return Err(CompileError::DuplicateVlan {
                vlan: pod.vlan,
                first,
                second: pod.key(),
            });
        }
    }
    Ok(())
}

/// Every distinct (group set, direction) of the pods' branch and, in standard mode, primary sides.
fn policies(model: &Model) -> Vec<Policy> {
    let mut set = BTreeSet::new();
    for pod in &model.pods {
        let mut sides = vec![&pod.groups];
        if pod.mode == EnforcingMode::Standard {
            sides.push(&model.node.primary_security_groups);
        }
        for groups in sides {
            for direction in [Direction::Ingress, Direction::Egress] {
                set.insert(Policy {
                    groups: sorted_set(groups),
                    direction,
                });
            }
        }
    }
    set.into_iter().collect()
}

fn pod_entries(
    model: &Model,
    policies: &[Policy],
    handles: &[u32],
) -> Result<BTreeMap<u16, PodEntry>, CompileError> {
    let handle_of = |groups: &[GroupId], direction| {
        let policy = Policy {
            groups: sorted_set(groups),
            direction,
        };
        policies
            .binary_search(&policy)
            .map_or(NO_POLICY, |i| handles[i])
    };
    let node_unfiltered: Vec<IpAddr> = eval::node_unfiltered(model)
        .into_iter()
        .map(|(addr, _)| addr)
        .collect();
    let mut pods = BTreeMap::new();
    for pod in &model.pods {
        let mut entry = PodEntry {
            ipv4: [0; 4],
            ipv6: [0; 16],
            mode: pod.mode as u8,
            flags: 0,
            unfiltered_v4_count: 0,
            unfiltered_v6_count: 0,
            policies: [NO_POLICY; 4],
            identity: PodEntry::identity_of(pod.identity().as_bytes()),
            unfiltered_v4: [[0; 4]; MAX_UNFILTERED_V4],
            unfiltered_v6: [[0; 16]; MAX_UNFILTERED_V6],
        };
        for addr in eval::pod_unfiltered(pod)
            .into_iter()
            .chain(node_unfiltered.iter().copied())
        {
            let (placed, capacity) = match addr {
                IpAddr::V4(v4) => (
                    append(
                        &mut entry.unfiltered_v4,
                        &mut entry.unfiltered_v4_count,
                        v4.octets(),
                    ),
                    MAX_UNFILTERED_V4,
                ),
                IpAddr::V6(v6) => (
                    append(
                        &mut entry.unfiltered_v6,
                        &mut entry.unfiltered_v6_count,
                        v6.octets(),
                    ),
                    MAX_UNFILTERED_V6,
                ),
            };
            if !placed {
                return Err(CompileError::TooManyUnfiltered {
                    pod: pod.name.clone(),
                    capacity,
                });
            }
        }
        if let Some(v4) = pod.ipv4 {
            entry.ipv4 = v4.octets();
            entry.flags |= POD_HAS_IPV4;
        }
        if let Some(v6) = pod.ipv6 {
            entry.ipv6 = v6.octets();
            entry.flags |= POD_HAS_IPV6;
        }
        if pod.action == EnforcingAction::Audit {
            entry.flags |= POD_AUDIT;
        }
        entry.policies[policy_slot::BRANCH_INGRESS] = handle_of(&pod.groups, Direction::Ingress);
        entry.policies[policy_slot::BRANCH_EGRESS] = handle_of(&pod.groups, Direction::Egress);
        if pod.mode == EnforcingMode::Standard {
            let primary = &model.node.primary_security_groups;
            entry.policies[policy_slot::PRIMARY_INGRESS] = handle_of(primary, Direction::Ingress);
            entry.policies[policy_slot::PRIMARY_EGRESS] = handle_of(primary, Direction::Egress);
        }
        pods.insert(pod.vlan, entry);
    }
    Ok(pods)
}

/// Puts `value` after the first `count` of `slots`; false when they are all in use.
fn append<T, const N: usize>(slots: &mut [T; N], count: &mut u8, value: T) -> bool {
    match slots.get_mut(usize::from(*count)) {
        Some(slot) => {
            *slot = value;
            *count += 1;
            true
        }
        None => false,
    }
}

/// Position `i + 1` of the element at index `i` (the compiler orders rules by position; the
/// maps name them by ID).
fn handle(i: usize) -> u32 {
    u32::try_from(i + 1).expect("fewer than 2^32 policies, classes and rules")
}

/// Index into a table of the position `id`.
fn index(id: u32) -> usize {
    id as usize - 1
}

/// The address-set key of `addr` for `vlan`, IPv4 as `::ffff:a.b.c.d`.
pub fn addr_key(vlan: u16, addr: IpAddr) -> AddrKey {
    let addr = match addr {
        IpAddr::V4(a) => a.to_ipv6_mapped(),
        IpAddr::V6(a) => a,
    };
    AddrKey {
        vlan,
        _pad: [0; 2],
        addr: addr.octets(),
    }
}
