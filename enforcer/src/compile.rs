//! Compiles the model into the fast path's map entries, whose lookups cost the same whatever the
//! number of rules, and [`interpret`]s those entries exactly as the kernel looks them up.
//!
//! A policy's peer table maps (prefix) to a class, the set of rules whose peer covers the
//! prefix (each longer prefix folds in every shorter covering one, as a longest-prefix match
//! returns only the longest). A class's port table maps (protocol, port or ICMP type/code) to
//! the lowest allowing rule ID, folded the same way. Both are laid out for the kernel's
//! binary search on prefix lengths (`prefix::lay_out`). Rule IDs, classes and policy handles
//! start at 1; 0 means none. They are stable across compiles ([`compile_with`]): what did not
//! change keeps its ID.
//!
//! To keep the maps small, a class leaves out rules that can never decide a verdict (a
//! lower rule covers all they cover), and a prefix whose value equals that of the nearest
//! shorter prefix covering it is left out: the longest match answers the same without it.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

/// The compiler hashes many rule sets and entry lists: a fast hasher (its inputs come from
/// the operator's own state, not from the network).
type HashMap<K, V> = std::collections::HashMap<K, V, foldhash::fast::RandomState>;
type HashSet<K> = std::collections::HashSet<K, foldhash::fast::RandomState>;
use std::net::IpAddr;

use enforcer_common::lengths::{self, PeerV4, PeerV6, Port};
use enforcer_common::{
    AddrKey, EnforcingMode, MAX_UNFILTERED_V4, MAX_UNFILTERED_V6, NO_CLASS, NO_POLICY, NO_RULE,
    POD_HAS_IPV4, POD_HAS_IPV6, PeerClass, PeerKeyV4, PeerKeyV6, PodEntry, PortKey, PortVerdict,
    V4_MAPPED_PREFIX, VERDICT_UNTRACKED, VLAN_MAX, VLAN_MIN, policy_slot,
};

use crate::eval::{
    self, L4Packet, PROTO_ICMP, PROTO_ICMPV6, PROTO_TCP, PROTO_UDP, RuleRef, everything_family,
    opens_all_ports, sorted_set,
};
use crate::model::{Cidr, Direction, GroupId, L4Match, Model, Peer, Rule};
use crate::prefix::{Prefix, fold, lay_out};

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

/// A class's port entries, its own ID zeroed in the keys, sorted.
pub type ClassEntries = Vec<(PortKey, PortVerdict)>;

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
}

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
/// entries in use). Over a compiled `previous`, policies and classes whose inputs did not
/// change are taken over as they are, not computed again. Fresh IDs are the lowest that
/// neither `previous` nor this compile uses, so an ID freed by one compile is reused at the
/// earliest by the next. Deterministic for (model, previous).
pub fn compile_with(model: &Model, previous: Option<&Compiled>) -> Result<Compiled, CompileError> {
    check_vlans(model)?;
    let rules = RuleTable::new(model);
    let policies = policies(model);
    let reuse = Reuse::new(previous, model);
    let mut before = Previous::index(previous);
    let rule_ids: Vec<u32> = rules.refs.iter().map(|r| before.rule_id(r)).collect();

    // Policies whose inputs did not change keep their handle, entries and classes.
    let mut handles: Vec<Option<u32>> = policies.iter().map(|p| reuse.policy(p)).collect();
    let mut policy_entries: BTreeMap<u32, Arc<PolicyEntries>> = BTreeMap::new();
    let mut classes: BTreeMap<u32, Arc<ClassEntries>> = BTreeMap::new();
    for &handle in handles.iter().flatten() {
        let entries = reuse.policy_entries(handle);
        for class in entries.classes() {
            classes.insert(class, reuse.class_entries(class));
        }
        policy_entries.insert(handle, entries);
    }

    // The other policies' peer entries, computed in parallel, point at interned class keys
    // (value = order of first sight); classes are visited in the order of their rule sets
    // once all are known, so that fresh IDs depend neither on the walk nor on the threads.
    let pending: Vec<usize> = (0..policies.len())
        .filter(|&i| handles[i].is_none())
        .collect();
    let mut sets = RuleSets::new(&rules);
    let mut interned: HashMap<ClassKey, usize> = HashMap::default();
    let mut peer_entries: Vec<(usize, PeerPrefixes)> = Vec::with_capacity(pending.len());
    for work in peer_work(model, &rules, &policies, &pending) {
        let global: Vec<usize> = work.sets.into_iter().map(|set| sets.intern(set)).collect();
        for (i, tables) in work.policies {
            let mut entries = Vec::with_capacity(tables.len());
            for (v6, prefix, key) in tables {
                let key = ClassKey {
                    set: global[key.set],
                    ..key
                };
                let next = interned.len();
                let provisional = *interned.entry(key).or_insert(next);
                entries.push((v6, prefix, provisional));
            }
            peer_entries.push((i, entries));
        }
    }
    let mut keys: Vec<(&ClassKey, usize)> = interned.iter().map(|(k, &v)| (k, v)).collect();
    keys.sort_by(|(a, _), (b, _)| {
        (&sets.sets[a.set], a.reverse_open).cmp(&(&sets.sets[b.set], b.reverse_open))
    });

    // A class computed from the same unchanged rules keeps its ID and entries; classes with
    // identical port entries share one ID.
    let mut class_of = vec![0; keys.len()];
    let mut computed: HashMap<ClassEntries, u32> = HashMap::default();
    let mut class_inputs: HashMap<ClassInputs, u32> = reuse.kept_class_inputs(&classes);
    for (key, provisional) in keys {
        let set = &sets.sets[key.set];
        let mut ids: Vec<u32> = set.iter().map(|&p| rule_ids[index(p)]).collect();
        ids.sort_unstable();
        let inputs = (ids, key.reverse_open);
        let class = match reuse.class(&inputs) {
            Some(class) => {
                classes.insert(class, reuse.class_entries(class));
                class
            }
            None => {
                let entries = class_ports(&rules, &rule_ids, set, key.reverse_open);
                match computed.get(&entries) {
                    Some(&class) => class,
                    None => {
                        let class = before.class(&entries);
                        classes.insert(class, Arc::new(entries.clone()));
                        computed.insert(entries, class);
                        class
                    }
                }
            }
        };
        class_of[provisional] = class;
        class_inputs.insert(inputs, class);
    }

    // Policies with identical peer entries share one handle (a kept policy's is found by
    // `before`, which indexes every previous policy by its entries).
    let mut seen: HashMap<Arc<PolicyEntries>, u32> = HashMap::default();
    for (i, entries) in peer_entries {
        let mut tables: [Vec<(Prefix, PeerClass)>; 2] = Default::default();
        for (is_v6, prefix, provisional) in entries {
            let class = PeerClass {
                class: class_of[provisional],
            };
            tables[usize::from(is_v6)].push((prefix, class));
        }
        let entries = policy_layout(&tables[0], &tables[1]);
        let handle = match seen.get(&entries) {
            Some(&handle) => handle,
            None => {
                let handle = before.policy(&entries);
                let entries = Arc::new(entries);
                policy_entries.insert(handle, entries.clone());
                seen.insert(entries, handle);
                handle
            }
        };
        handles[i] = Some(handle);
    }
    let handles: Vec<u32> = handles.into_iter().flatten().collect();
    let pods = pod_entries(model, &policies, &handles)?;

    let node_local = model
        .node_local
        .iter()
        .map(|&addr| (addr_key(0, addr), 1))
        .collect();

    let mut ids = RuleIds::default();
    for (rule, id) in rules.refs.into_iter().zip(rule_ids) {
        ids.insert(id, rule);
    }
    let memo = Memo {
        model: model.clone(),
        handles: policies.into_iter().zip(handles).collect(),
        classes: class_inputs,
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

/// One policy's (IPv6, prefix, class key) of both families.
type PolicyPeers = Vec<(bool, Prefix, ClassKey)>;

/// Peer prefixes of some policies (by index), their classes' rule sets local to the work.
struct PeerWork {
    sets: Vec<Vec<u32>>,
    policies: Vec<(usize, PolicyPeers)>,
}

/// The peer prefixes of `policies[pending]`, the work spread over the CPUs (each policy's
/// fold is independent; a node's hundreds of policies are most of a compile).
fn peer_work(
    model: &Model,
    rules: &RuleTable,
    policies: &[Policy],
    pending: &[usize],
) -> Vec<PeerWork> {
    let work = |chunk: &[usize]| {
        let mut sets = RuleSets::new(rules);
        let policies = chunk
            .iter()
            .map(|&i| {
                let tables = [false, true]
                    .into_iter()
                    .flat_map(|v6| {
                        policy_peers(model, &mut sets, &policies[i], v6)
                            .into_iter()
                            .map(move |(prefix, key)| (v6, prefix, key))
                    })
                    .collect();
                (i, tables)
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

/// A policy's peer prefixes: (IPv6, prefix, provisional class).
type PeerPrefixes = Vec<(bool, Prefix, usize)>;

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

/// What of the previous compile this one takes over: policies whose inputs are unchanged,
/// and classes computed from the same rules, none of which changed.
struct Reuse<'p> {
    previous: Option<(&'p Compiled, &'p Memo)>,
    model: &'p Model,
    /// Stable IDs of rules whose contents changed, or that are gone (their IDs may name
    /// other rules one compile later).
    stale: HashSet<u32>,
}

impl<'p> Reuse<'p> {
    fn new(previous: Option<&'p Compiled>, model: &'p Model) -> Self {
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
        Self {
            previous,
            model,
            stale,
        }
    }

    /// The previous handle of `policy`, if what it is compiled from is unchanged.
    fn policy(&self, policy: &Policy) -> Option<u32> {
        let (compiled, memo) = self.previous?;
        let handle = *memo.handles.get(policy)?;
        let unchanged = same_policy_inputs(&memo.model, self.model, policy)
            && compiled.policies.contains_key(&handle);
        unchanged.then_some(handle)
    }

    /// The previous ID of a class with these inputs, if none of its rules changed.
    fn class(&self, inputs: &ClassInputs) -> Option<u32> {
        let (compiled, memo) = self.previous?;
        let class = *memo.classes.get(inputs)?;
        let unchanged = !inputs.0.iter().any(|id| self.stale.contains(id))
            && compiled.classes.contains_key(&class);
        unchanged.then_some(class)
    }

    /// The inputs of the previous classes kept in `classes`, for the next compile.
    fn kept_class_inputs(
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

    fn policy_entries(&self, handle: u32) -> Arc<PolicyEntries> {
        let (compiled, _) = self.previous.expect("a kept policy has a previous compile");
        compiled.policies[&handle].clone()
    }

    fn class_entries(&self, class: u32) -> Arc<ClassEntries> {
        let (compiled, _) = self.previous.expect("a kept class has a previous compile");
        compiled.classes[&class].clone()
    }
}

/// Whether `policy` compiles the same in both models: its groups' rules (both directions: the
/// opposite one decides what is untracked), and the members and prefix lists they name.
fn same_policy_inputs(old: &Model, new: &Model, policy: &Policy) -> bool {
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
                    .all(|rule| match &rule.peer {
                        Peer::Group(g) => old.members.get(g) == new.members.get(g),
                        Peer::PrefixList(l) => old.prefix_lists.get(l) == new.prefix_lists.get(l),
                        Peer::Cidr(_) => true,
                    })
            })
    })
}

/// The IDs a previous compile gave, by what they stand for, and a source of fresh ones.
struct Previous<'p> {
    rules: Option<&'p RuleIds>,
    /// Class IDs by entries: only for a previous state read back from the kernel (a
    /// compiled one finds its classes by their inputs, far cheaper).
    classes: HashMap<Arc<ClassEntries>, u32>,
    policies: HashMap<Arc<PolicyEntries>, u32>,
    rule_ids: Fresh,
    class_ids: Fresh,
    handles: Fresh,
}

impl<'p> Previous<'p> {
    fn index(previous: Option<&'p Compiled>) -> Self {
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
                    .extend(entries.iter().map(|(_, v)| v.rule));
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

    fn rule_id(&mut self, rule: &RuleRef) -> u32 {
        match self.rules.and_then(|r| r.id(rule)) {
            Some(id) => id,
            None => self.rule_ids.next(),
        }
    }

    fn class(&mut self, entries: &ClassEntries) -> u32 {
        match self.classes.get(entries) {
            Some(&class) => class,
            None => self.class_ids.next(),
        }
    }

    fn policy(&mut self, entries: &PolicyEntries) -> u32 {
        match self.policies.get(entries) {
            Some(&handle) => handle,
            None => self.handles.next(),
        }
    }
}

/// The lowest IDs (from 1) not taken, in increasing order.
#[derive(Default)]
struct Fresh {
    taken: HashSet<u32>,
    last: u32,
}

impl Fresh {
    fn next(&mut self) -> u32 {
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

/// What a peer-table value stands for: the rules (that can decide) whose peer covers the
/// prefix, an index into [`RuleSets`], and for which protocols (TCP, UDP) the policy's
/// opposite direction opens every port to everywhere.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
struct ClassKey {
    set: usize,
    reverse_open: [bool; 2],
}

/// The peer table of one policy and family, as (prefix, class key).
fn policy_peers(
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
struct RuleTable {
    refs: Vec<RuleRef>,
    /// The (protocol, port) prefixes of the rule's L4 part.
    l4: Vec<Vec<Prefix>>,
    /// The same as one span of the 24-bit (protocol, port) space: an L4 part is contiguous.
    spans: Vec<(u32, u32)>,
    is_all: Vec<bool>,
    /// The rule's peer is `0.0.0.0/0` or `::/0`.
    everything: Vec<bool>,
    /// First rule ID of each group's ingress and egress rules.
    first: BTreeMap<(GroupId, Direction), u32>,
}

impl RuleTable {
    fn new(model: &Model) -> Self {
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
    fn of<'m>(
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
struct RuleSets<'r> {
    rules: &'r RuleTable,
    sets: Vec<Vec<u32>>,
    ids: HashMap<Vec<u32>, usize>,
    memo: HashMap<(Option<usize>, Vec<u32>), usize>,
}

impl<'r> RuleSets<'r> {
    fn new(rules: &'r RuleTable) -> Self {
        Self {
            rules,
            sets: Vec::new(),
            ids: HashMap::default(),
            memo: HashMap::default(),
        }
    }

    /// The index of the pruned union of the set `inherited` and the rules `own`.
    fn extend(&mut self, inherited: Option<usize>, own: Vec<u32>) -> usize {
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
    fn intern(&mut self, set: Vec<u32>) -> usize {
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
    fn prune(&self, set: &[u32]) -> Vec<u32> {
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
struct Spans(Vec<(u32, u32)>);

impl Spans {
    fn contains(&self, (lo, hi): (u32, u32)) -> bool {
        let after = self.0.partition_point(|&(start, _)| start <= lo);
        after > 0 && self.0[after - 1].1 >= hi
    }

    fn insert(&mut self, (lo, hi): (u32, u32)) {
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
fn peer_cidrs<'m>(model: &'m Model, peer: &'m Peer, v6: bool) -> impl Iterator<Item = Cidr> + 'm {
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
fn union(inherited: &[u32], own: &[u32]) -> Vec<u32> {
    let mut all = Vec::with_capacity(inherited.len() + own.len());
    all.extend_from_slice(inherited);
    all.extend_from_slice(own);
    all.sort_unstable();
    all.dedup();
    all
}

/// The (protocol, port) prefixes a rule's L4 part covers.
fn l4_prefixes(l4: &L4Match) -> Vec<Prefix> {
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
fn port_blocks(from: u16, to: u16) -> Vec<(u16, u8)> {
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
fn class_ports(
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
    fn passes(self) -> bool {
        self != Self::Denied
    }

    fn untracked(self) -> bool {
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
/// class -> port search.
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
        let verdict = ports.and_then(|ports| {
            lengths::search::<Port, _>(|len| {
                find(
                    ports,
                    &PortKey::new(0, packet.protocol, packet.selector, len),
                )
            })
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
    model: &Model,
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
fn find<K: Ord, V: Copy>(entries: &[(K, V)], key: &K) -> Option<V> {
    entries
        .binary_search_by(|(k, _)| k.cmp(key))
        .ok()
        .map(|i| entries[i].1)
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;
    use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

    use proptest::prelude::*;
    use proptest::strategy::ValueTree;

    use super::*;
    use crate::eval::fixtures::*;
    use crate::eval::{L4Query, Query, Reason, evaluate};
    use crate::model::{BranchPod, Rule, SecurityGroup};

    const STRICT: EnforcingMode = EnforcingMode::Strict;
    const STANDARD: EnforcingMode = EnforcingMode::Standard;

    #[test]
    fn port_blocks_are_minimal_aligned_covers() {
        assert_eq!(port_blocks(0, 65535), vec![(0, 0)]);
        assert_eq!(port_blocks(443, 443), vec![(443, 16)]);
        assert_eq!(port_blocks(8000, 8001), vec![(8000, 15)]);
        assert_eq!(port_blocks(1, 65535).len(), 16);
        assert_eq!(port_blocks(5, 4), vec![]);
        assert_eq!(port_blocks(65535, 65535), vec![(65535, 16)]);
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]

        #[test]
        fn port_blocks_cover_exactly(a in any::<u16>(), b in any::<u16>()) {
            let (from, to) = (a.min(b), a.max(b));
            let blocks = port_blocks(from, to);
            let mut next = u32::from(from);
            for (start, len) in &blocks {
                let size = 1u32 << (16 - len);
                prop_assert_eq!(u32::from(*start), next);
                prop_assert_eq!(u32::from(*start) % size, 0);
                next += size;
            }
            prop_assert_eq!(next, u32::from(to) + 1);
            // Minimal: no two neighbouring blocks of one size could merge into an aligned one.
            for pair in blocks.windows(2) {
                let ((s0, l0), (_, l1)) = (pair[0], pair[1]);
                let size = 1u32 << (16 - l0);
                prop_assert!(!(l0 == l1 && l0 > 0 && u32::from(s0) % (2 * size) == 0));
            }
        }
    }

    fn web_model() -> Model {
        let web = group(
            "sg-web",
            vec![
                rule(tcp(443, 443), cidr("0.0.0.0/0")),
                rule(tcp(8000, 8999), cidr("10.1.0.0/16")),
            ],
            vec![rule(L4Match::All, cidr("0.0.0.0/0"))],
        );
        let node_sg = group(
            "sg-node",
            vec![rule(tcp(0, 65535), cidr("10.0.0.0/8"))],
            vec![rule(L4Match::All, cidr("0.0.0.0/0"))],
        );
        model(
            vec![web, node_sg],
            vec![
                pod(7, "10.0.64.7", &["sg-web"], STRICT),
                pod(8, "10.0.64.8", &["sg-web", "sg-web"], STANDARD),
                pod(9, "10.0.64.9", &["sg-node", "sg-web"], STRICT),
            ],
        )
    }

    #[test]
    fn policies_are_shared_and_strict_pods_have_no_primary() {
        let c = compile(&web_model()).unwrap();
        let p7 = c.pods[&7].policies;
        let p8 = c.pods[&8].policies;
        let p9 = c.pods[&9].policies;
        assert_eq!(p7[..2], p8[..2]);
        assert_eq!(p7[2..], [NO_POLICY, NO_POLICY]);
        assert_ne!(p8[2], NO_POLICY);
        assert_ne!(p9[0], p7[0]);
        assert_eq!(c.pods[&8].mode, STANDARD as u8);
        assert_eq!(c.pods[&7].ipv4, [10, 0, 64, 7]);
        assert_eq!(c.pods[&7].flags, POD_HAS_IPV4 | POD_HAS_IPV6);
        assert_eq!(c.rules.len(), 5);
        assert_eq!(c.rule(1).unwrap().group_id, "sg-node");
        assert_eq!(c.rule(0), None);
        assert_eq!(c.rule(6), None);
    }

    #[test]
    fn unchanged_parts_keep_their_ids_and_a_changed_policy_gets_a_fresh_handle() {
        let before = compile(&web_model()).unwrap();
        assert_eq!(compile_with(&web_model(), Some(&before)).unwrap(), before);

        // sg-web's second ingress rule changes: every policy with sg-web ingress is new.
        let mut m = web_model();
        m.groups.get_mut("sg-web").unwrap().ingress[1].l4 = tcp(8000, 8080);
        let after = compile_with(&m, Some(&before)).unwrap();
        let all_handles =
            |c: &Compiled| -> BTreeSet<u32> { c.pods.values().flat_map(|p| p.policies).collect() };
        let old_handles = all_handles(&before);
        for vlan in [7, 8] {
            let (old, new) = (before.pods[&vlan].policies, after.pods[&vlan].policies);
            assert!(
                !old_handles.contains(&new[0]),
                "fresh ingress handle of {vlan}"
            );
            assert_eq!(old[1], new[1], "egress of {vlan} did not change");
        }
        // sg-node's rule from 10.0.0.0/8 to every port covers the changed rule: same entries.
        assert_eq!(before.pods[&9].policies, after.pods[&9].policies);
        assert_eq!(before.pods[&8].policies[2..], after.pods[&8].policies[2..]);
        assert_eq!(after.rules, before.rules, "rules keep their IDs");
        // Classes of unchanged rule sets keep their IDs and entries.
        let egress = before.pods[&7].policies[1];
        assert_eq!(before.policies[&egress], after.policies[&egress]);

        // A new group's rules get IDs the previous state did not use; gone rules' IDs are
        // free again one compile later.
        let mut grown = m.clone();
        grown.groups.insert(
            "sg-a".into(),
            group("sg-a", vec![rule(tcp(1, 1), cidr("10.2.0.0/16"))], vec![]),
        );
        let grown_c = compile_with(&grown, Some(&after)).unwrap();
        let new_id = grown_c.rule_id(&RuleRef {
            group_id: "sg-a".into(),
            direction: Direction::Ingress,
            index: 0,
        });
        assert_eq!(new_id, Some(6));
        for (id, rule) in after.rules.iter() {
            assert_eq!(grown_c.rule_id(rule), Some(id));
        }
        let shrunk = compile_with(&m, Some(&grown_c)).unwrap();
        assert_eq!(shrunk.rules, after.rules);
        assert_eq!(
            compile_with(&grown, Some(&shrunk))
                .unwrap()
                .rule_id(&RuleRef {
                    group_id: "sg-a".into(),
                    direction: Direction::Ingress,
                    index: 0,
                }),
            Some(6)
        );
    }

    #[test]
    fn address_sets() {
        let m = web_model();
        let c = compile(&m).unwrap();
        // The node's never-filtered peers for every pod, a pod's own (its subnet router) for it.
        let never_filters = |vlan: u16, peer: &str| {
            let (addr, ipv6) = match ip(peer) {
                IpAddr::V4(v4) => (v4.to_ipv6_mapped().octets(), false),
                IpAddr::V6(v6) => (v6.octets(), true),
            };
            c.pods[&vlan].never_filters(&addr, ipv6)
        };
        assert!(never_filters(7, "10.0.0.2"));
        assert!(never_filters(9, "fd00:ec2::254"));
        assert!(never_filters(7, "10.0.64.1"));
        assert!(!never_filters(7, "10.0.0.3"));
        assert_eq!(
            (
                c.pods[&7].unfiltered_v4_count,
                c.pods[&7].unfiltered_v6_count
            ),
            (MAX_UNFILTERED_V4 as u8, MAX_UNFILTERED_V6 as u8)
        );
        assert_eq!(
            addr_key(0, ip("10.0.0.2")).addr[10..],
            [0xff, 0xff, 10, 0, 0, 2]
        );
        assert_eq!(c.node_local.len(), m.node_local.len());
        assert!(c.node_local.contains_key(&addr_key(0, ip("10.0.1.10"))));
    }

    #[test]
    fn interpret_follows_the_kernel_sequence() {
        let c = compile(&web_model()).unwrap();
        let run = |vlan, dir, peer: &str, packet| interpret(&c, vlan, dir, ip(peer), packet);
        let tcp443 = L4Packet::tcp(443);
        assert_eq!(
            run(99, Direction::Ingress, "192.0.2.1", tcp443),
            Interpretation::UnknownVlan
        );
        assert_eq!(
            run(7, Direction::Ingress, "10.0.0.2", tcp443),
            Interpretation::Unfiltered
        );
        assert_eq!(
            run(8, Direction::Ingress, "10.0.1.10", tcp443),
            Interpretation::NodeLocal
        );
        let strict_node = run(7, Direction::Ingress, "10.0.1.10", L4Packet::tcp(10250));
        assert!(!strict_node.allowed());
        let r = run(7, Direction::Ingress, "192.0.2.1", tcp443);
        assert!(r.allowed() && r.untracked());
        let Interpretation::Policy {
            branch: SideLookup::Allowed(v),
            primary,
        } = r
        else {
            panic!("{r:?}");
        };
        assert_eq!(primary, SideLookup::NotChecked);
        assert_eq!(c.rule(v.rule).unwrap().index, 0);
        let r = run(8, Direction::Ingress, "192.0.2.1", tcp443);
        assert!(matches!(
            r,
            Interpretation::Policy {
                primary: SideLookup::Denied,
                ..
            }
        ));
        // An IPv6 packet claiming an IPv4-mapped unfiltered peer is filtered.
        let r = run(7, Direction::Ingress, "::ffff:10.0.0.2", L4Packet::tcp(22));
        assert!(!r.allowed());
    }

    #[test]
    fn all_traffic_gets_per_protocol_untracked_keys() {
        let g = group(
            "sg-a",
            vec![rule(L4Match::All, cidr("0.0.0.0/0"))],
            vec![rule(udp(0, 65535), cidr("0.0.0.0/0"))],
        );
        let m = model(vec![g], vec![pod(1, "10.0.64.1", &["sg-a"], STRICT)]);
        let c = compile(&m).unwrap();
        let run = |packet| interpret(&c, 1, Direction::Ingress, ip("192.0.2.1"), packet);
        assert!(run(L4Packet::udp(5)).untracked());
        assert!(!run(L4Packet::tcp(5)).untracked());
        assert!(run(L4Packet::tcp(5)).allowed());
        assert!(!run(L4Packet::icmp(8, 0)).untracked());
    }

    #[test]
    fn compiling_is_deterministic_and_rejects_bad_vlans() {
        let m = web_model();
        assert_eq!(compile(&m).unwrap(), compile(&m).unwrap());
        let mut reordered = m.clone();
        reordered.pods.reverse();
        reordered.pods[0].groups.reverse();
        assert_eq!(compile(&reordered).unwrap(), compile(&m).unwrap());

        let mut dup = m.clone();
        dup.pods[1].vlan = 7;
        assert!(matches!(
            compile(&dup),
            Err(CompileError::DuplicateVlan { vlan: 7, .. })
        ));
        let mut zero = m;
        zero.pods[0].vlan = 0;
        assert!(matches!(
            compile(&zero),
            Err(CompileError::InvalidVlan { vlan: 0, .. })
        ));
    }

    /// 120 pods with 16 of 64 groups of 60 + 60 rules each; `all_traffic`: some rules allow
    /// everything from everywhere, which lets the compiler drop the rules they shadow.
    fn large_model(all_traffic: bool) -> Model {
        let mut groups = Vec::new();
        for g in 0..64u32 {
            let rules = |dir: u32| -> Vec<Rule> {
                (0..60u32)
                    .map(|r| {
                        let n = g * 1000 + dir * 100 + r;
                        let peer = match r % 6 {
                            0 => Peer::Group(format!("sg-{:03}", (g + r) % 64)),
                            1 => Peer::PrefixList(format!("pl-{}", r % 4)),
                            2 => cidr("0.0.0.0/0"),
                            3 => cidr(&format!("10.{}.0.0/16", n % 200)),
                            4 => cidr(&format!("2600:1f00:{:x}::/48", n)),
                            _ => cidr(&format!("10.{}.{}.{}/32", g, dir, r)),
                        };
                        let l4 = match r % 5 {
                            0 => tcp(1000 + r as u16, 2000 + 7 * r as u16),
                            1 => udp(53, 53),
                            2 => L4Match::Icmp {
                                v6: false,
                                icmp_type: Some(8),
                                code: None,
                            },
                            3 if all_traffic => L4Match::All,
                            3 => tcp(9000 + r as u16, 9100),
                            _ => tcp(r as u16, r as u16 + 1),
                        };
                        rule(l4, peer)
                    })
                    .collect()
            };
            groups.push(group(&format!("sg-{g:03}"), rules(0), rules(1)));
        }
        let pods: Vec<BranchPod> = (1..=120u16)
            .map(|vlan| {
                let names: Vec<String> = (0..16u16)
                    .map(|i| format!("sg-{:03}", (vlan * 7 + i * 3) % 64))
                    .collect();
                let names: Vec<&str> = names.iter().map(String::as_str).collect();
                let mode = if vlan % 2 == 0 { STRICT } else { STANDARD };
                pod(
                    vlan,
                    &format!("10.0.{}.{}", 64 + vlan / 200, vlan % 200 + 2),
                    &names,
                    mode,
                )
            })
            .collect();
        let mut m = model(groups, pods);
        m.node.primary_security_groups = vec!["sg-000".to_string(), "sg-001".to_string()];
        for g in 0..64u32 {
            let members = (0..40u32)
                .map(|i| IpAddr::V4(Ipv4Addr::new(10, 0, 100 + (g % 100) as u8, i as u8)))
                .chain(std::iter::once(IpAddr::V6(Ipv6Addr::new(
                    0x2600, 0x1f00, 0, 0, 0, 0, g as u16, 1,
                ))))
                .map(Cidr::host)
                .collect();
            m.members.insert(format!("sg-{g:03}"), members);
        }
        for l in 0..4u32 {
            let cidrs = (0..20u32)
                .map(|i| format!("172.{}.{}.0/24", 16 + l, i).parse().unwrap())
                .collect();
            m.prefix_lists.insert(format!("pl-{l}"), cidrs);
        }
        m
    }

    /// Compile time is the benchmark's (`apply_ms`); here, only what a large model means.
    #[test]
    fn large_models_compile_right() {
        for all_traffic in [true, false] {
            let m = large_model(all_traffic);
            let c = compile(&m).unwrap();
            assert_eq!(c.pods.len(), 120);
            assert_eq!(c.rules.len(), 64 * 120);
            let (pod, peer) = (&m.pods[3], ip("10.0.103.5"));
            for packet in [L4Packet::tcp(1003), L4Packet::udp(53), L4Packet::icmp(8, 0)] {
                for direction in [Direction::Ingress, Direction::Egress] {
                    let query = Query {
                        direction,
                        peer,
                        l4: L4Query::Packet(packet),
                    };
                    check(&m, &c, pod, &query);
                }
            }
        }
    }

    /// `interpret(compile(model))` agrees with the evaluator ([`disagreement`]).
    fn check(model: &Model, compiled: &Compiled, pod: &BranchPod, query: &Query) {
        if let Some(difference) = disagreement(model, compiled, pod, query) {
            panic!("{difference}");
        }
    }

    // Random models: overlapping prefixes come from a small address space.
    fn v4_addr() -> impl Strategy<Value = Ipv4Addr> {
        prop_oneof![
            3 => (0u32..4, any::<u8>(), any::<u8>())
                .prop_map(|(a, b, c)| Ipv4Addr::new(10, a as u8, b & 0x0f, c)),
            1 => any::<u32>().prop_map(Ipv4Addr::from),
        ]
    }

    fn v6_addr() -> impl Strategy<Value = Ipv6Addr> {
        prop_oneof![
            3 => (0u16..4, any::<u8>(), any::<u16>())
                .prop_map(|(a, b, c)| Ipv6Addr::new(0xfd00, a, 0, 0, 0, 0, u16::from(b & 0x0f), c)),
            1 => any::<u128>().prop_map(|x| Ipv6Addr::from(x | (0xfd00 << 112))),
        ]
    }

    fn addr() -> impl Strategy<Value = IpAddr> {
        prop_oneof![
            v4_addr().prop_map(IpAddr::V4),
            v6_addr().prop_map(IpAddr::V6)
        ]
    }

    /// A member of a referenced group: an ENI's address or one of its delegated prefixes.
    fn member() -> impl Strategy<Value = Cidr> {
        prop_oneof![
            3 => addr().prop_map(Cidr::host),
            1 => (v4_addr(), 28u8..=32).prop_map(|(a, l)| Cidr::new(IpAddr::V4(a), l).unwrap()),
            1 => (v6_addr(), 80u8..=128).prop_map(|(a, l)| Cidr::new(IpAddr::V6(a), l).unwrap()),
        ]
    }

    fn any_cidr() -> impl Strategy<Value = Cidr> {
        prop_oneof![
            (v4_addr(), 0u8..=32).prop_map(|(a, l)| Cidr::new(IpAddr::V4(a), l).unwrap()),
            (v6_addr(), 0u8..=128).prop_map(|(a, l)| Cidr::new(IpAddr::V6(a), l).unwrap()),
            Just("0.0.0.0/0".parse().unwrap()),
            Just("::/0".parse().unwrap()),
        ]
    }

    fn l4() -> impl Strategy<Value = L4Match> {
        let ports = (
            prop_oneof![Just(6u8), Just(17u8)],
            any::<u16>(),
            any::<u16>(),
        )
            .prop_map(|(protocol, a, b)| L4Match::Ports {
                protocol,
                from: a.min(b),
                to: a.max(b),
            });
        let near = (prop_oneof![Just(6u8), Just(17u8)], 0u16..64, 0u16..8).prop_map(
            |(protocol, from, width)| L4Match::Ports {
                protocol,
                from,
                to: from + width,
            },
        );
        let every_port = prop_oneof![Just(6u8), Just(17u8)].prop_map(|protocol| L4Match::Ports {
            protocol,
            from: 0,
            to: 65535,
        });
        let icmp = (
            any::<bool>(),
            proptest::option::of(0u8..4),
            proptest::option::of(0u8..3),
        )
            .prop_map(|(v6, icmp_type, code)| L4Match::Icmp {
                v6,
                icmp_type,
                code: icmp_type.and(code),
            });
        prop_oneof![
            2 => Just(L4Match::All),
            2 => ports,
            3 => near,
            2 => every_port,
            2 => icmp,
            1 => prop_oneof![Just(50u8), Just(132u8), any::<u8>()].prop_map(L4Match::Protocol),
        ]
    }

    fn peer() -> impl Strategy<Value = Peer> {
        prop_oneof![
            6 => any_cidr().prop_map(Peer::Cidr),
            1 => (0..3u8).prop_map(|i| Peer::PrefixList(format!("pl-{i}"))),
            2 => (0..5u8).prop_map(|i| Peer::Group(format!("sg-{i}"))),
        ]
    }

    fn rules() -> impl Strategy<Value = Vec<Rule>> {
        proptest::collection::vec((l4(), peer()).prop_map(|(l4, p)| rule(l4, p)), 0..6)
    }

    fn group_ids() -> impl Strategy<Value = Vec<String>> {
        proptest::collection::vec((0..5u8).prop_map(|i| format!("sg-{i}")), 1..4)
    }

    prop_compose! {
        fn arb_model()(
            rules in proptest::collection::vec((rules(), rules()), 4),
            members in proptest::collection::vec(proptest::collection::btree_set(member(), 0..4), 5),
            lists in proptest::collection::vec(proptest::collection::vec(any_cidr(), 0..4), 2),
            pods in proptest::collection::vec(
                (group_ids(), any::<bool>(), v4_addr(), v6_addr(), any_cidr(), any_cidr()), 1..4),
            primary in group_ids(),
            node_local in proptest::collection::btree_set(addr(), 0..4),
        ) -> Model {
            // sg-4 stays undefined: referenced and assigned, but without rules.
            let groups: Vec<SecurityGroup> = rules
                .into_iter()
                .enumerate()
                .map(|(i, (ingress, egress))| group(&format!("sg-{i}"), ingress, egress))
                .collect();
            let pods: Vec<BranchPod> = pods
                .into_iter()
                .enumerate()
                .map(|(i, (groups, standard, v4, v6, s1, s2))| {
                    let mode = if standard { STANDARD } else { STRICT };
                    let mut p = pod(i as u16 + 1, "10.0.64.1", &[], mode);
                    p.groups = groups;
                    p.ipv4 = Some(v4);
                    p.ipv6 = Some(v6);
                    p.subnet_v4 = [s1, s2].into_iter().find(Cidr::is_ipv4);
                    p.subnet_v6 = [s1, s2].into_iter().find(|c| !c.is_ipv4());
                    p
                })
                .collect();
            let mut m = model(groups, pods);
            m.node.primary_security_groups = primary;
            m.node_local.extend(node_local);
            m.members = members
                .into_iter()
                .enumerate()
                .map(|(i, set)| (format!("sg-{i}"), set))
                .collect();
            m.prefix_lists = lists
                .into_iter()
                .enumerate()
                .map(|(i, cidrs)| (format!("pl-{i}"), cidrs))
                .collect();
            m
        }
    }

    /// Raw choices for one packet, turned into a query against a model by [`pick`].
    type PacketSeed = (u8, bool, u8, u32, u128, u8, u8, u16);

    fn packet_seed() -> impl Strategy<Value = PacketSeed> {
        (
            any::<u8>(),
            any::<bool>(),
            0u8..13,
            any::<u32>(),
            any::<u128>(),
            0u8..10,
            any::<u8>(),
            any::<u16>(),
        )
    }

    /// An address inside `cidr`, the host bits from `random`.
    fn inside(cidr: Cidr, random: u128) -> IpAddr {
        let len = u32::from(cidr.prefix_len());
        match cidr.addr() {
            IpAddr::V4(a) => {
                let host = (random as u32).checked_shr(len).unwrap_or(0);
                IpAddr::V4(Ipv4Addr::from(u32::from(a) | host))
            }
            IpAddr::V6(a) => {
                let host = random.checked_shr(len).unwrap_or(0);
                IpAddr::V6(Ipv6Addr::from(u128::from(a) | host))
            }
        }
    }

    /// Biased towards rule peers and rule ports, so that many packets hit rules.
    fn pick(model: &Model, seed: PacketSeed) -> (&BranchPod, Query) {
        let (pod_i, ingress, peer_kind, n, random, l4_kind, proto_i, port) = seed;
        let pod = &model.pods[usize::from(pod_i) % model.pods.len()];
        let direction = if ingress {
            Direction::Ingress
        } else {
            Direction::Egress
        };
        // Mostly the rules that apply to this packet, sometimes any rule of the model.
        let primary: &[String] = if pod.mode == STANDARD {
            &model.node.primary_security_groups
        } else {
            &[]
        };
        let own_rules: Vec<&Rule> = pod
            .groups
            .iter()
            .chain(primary)
            .filter_map(|id| model.groups.get(id))
            .flat_map(|g| g.rules(direction))
            .collect();
        let all_rules: Vec<&Rule> = model
            .groups
            .values()
            .flat_map(|g| g.ingress.iter().chain(&g.egress))
            .collect();
        let candidates = if own_rules.is_empty() || random >> 120 == 0 {
            all_rules
        } else {
            own_rules
        };
        let some_rule = candidates
            .get(n as usize % candidates.len().max(1))
            .copied();
        let mut prefixes: Vec<Cidr> = Vec::new();
        if let Some(r) = some_rule {
            match &r.peer {
                Peer::Cidr(c) => prefixes.push(*c),
                Peer::PrefixList(id) => {
                    prefixes.extend(model.prefix_lists.get(id).into_iter().flatten())
                }
                Peer::Group(id) => {
                    prefixes.extend(model.members.get(id).into_iter().flatten().copied())
                }
            }
        }
        let specials: Vec<IpAddr> = crate::eval::node_unfiltered(model)
            .into_iter()
            .map(|(a, _)| a)
            .chain(crate::eval::pod_unfiltered(pod))
            .chain(model.node_local.iter().copied())
            .collect();
        let pool_v4 = Ipv4Addr::new(10, (n % 4) as u8, ((n >> 8) & 0x0f) as u8, (n >> 16) as u8);
        let peer = match peer_kind {
            0..=7 if !prefixes.is_empty() => {
                inside(prefixes[(n >> 8) as usize % prefixes.len()], random)
            }
            8 => specials[n as usize % specials.len()],
            9 => IpAddr::V4(pool_v4),
            10 => IpAddr::V6(Ipv6Addr::from(
                (0xfd00u128 << 112) | (random & 0x0003_0000_0000_0000_0000_0000_000f_ffff),
            )),
            _ => {
                if random & 1 == 0 {
                    IpAddr::V4(Ipv4Addr::from(n))
                } else {
                    IpAddr::V6(Ipv6Addr::from(random))
                }
            }
        };
        let protocols = [6u8, 17, 1, 58, 50, 132, proto_i];
        let rule_l4 = if port % 4 == 0 {
            candidates
                .get(port as usize % candidates.len().max(1))
                .map(|r| r.l4)
        } else {
            some_rule.map(|r| r.l4)
        };
        let packet = match (l4_kind, rule_l4) {
            (0..=5, Some(L4Match::Ports { protocol, from, to })) => {
                let mid = from + (to - from) / 2;
                let candidates = [
                    from,
                    to,
                    mid,
                    from,
                    to,
                    from.wrapping_sub(1),
                    to.wrapping_add(1),
                ];
                L4Packet::new(protocol, candidates[usize::from(proto_i) % 7], 0, 0)
            }
            (
                0..=5,
                Some(L4Match::Icmp {
                    v6,
                    icmp_type,
                    code,
                }),
            ) => {
                let t = icmp_type.unwrap_or(proto_i % 4);
                let c = code.map_or(proto_i % 3, |c| {
                    if proto_i % 4 == 0 {
                        c.wrapping_add(1)
                    } else {
                        c
                    }
                });
                L4Packet::new(if v6 { 58 } else { 1 }, 0, t, c)
            }
            (0..=5, Some(L4Match::Protocol(p))) => L4Packet::new(p, port, 0, 0),
            _ => {
                let protocol = protocols[usize::from(proto_i) % protocols.len()];
                let port = if l4_kind % 2 == 0 { port % 70 } else { port };
                L4Packet::new(protocol, port, (port >> 8) as u8 % 5, port as u8 % 4)
            }
        };
        let query = Query {
            direction,
            peer,
            l4: L4Query::Packet(packet),
        };
        (pod, query)
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 3000, ..ProptestConfig::default() })]

        #[test]
        fn compiled_maps_agree_with_the_evaluator(
            model in arb_model(),
            seeds in proptest::collection::vec(packet_seed(), 40),
        ) {
            let compiled = compile(&model).unwrap();
            for seed in seeds {
                let (pod, query) = pick(&model, seed);
                check(&model, &compiled, pod, &query);
            }
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 500, ..ProptestConfig::default() })]

        /// IDs kept from a previous state never change what the entries mean.
        #[test]
        fn compiled_over_a_previous_state_agrees_with_the_evaluator(
            first in arb_model(),
            model in arb_model(),
            seeds in proptest::collection::vec(packet_seed(), 40),
        ) {
            let previous = compile(&first).unwrap();
            let compiled = compile_with(&model, Some(&previous)).unwrap();
            for seed in seeds {
                let (pod, query) = pick(&model, seed);
                check(&model, &compiled, pod, &query);
            }
            prop_assert_eq!(compile_with(&model, Some(&compiled)).unwrap(), compiled);
        }
    }

    /// `model` with one change an operator makes: a rule's ports, a rule added or removed, a
    /// referenced group's members, a prefix list, a description (no change in meaning).
    fn mutate(model: &Model, change: u8, at: usize, cidr: Cidr, ip: IpAddr) -> Model {
        let mut m = model.clone();
        let ids: Vec<GroupId> = m.groups.keys().cloned().collect();
        let id = &ids[at % ids.len()];
        let group = m.groups.get_mut(id).expect("a group");
        let rules = if at.is_multiple_of(2) {
            &mut group.ingress
        } else {
            &mut group.egress
        };
        let i = at % rules.len().max(1);
        match change % 6 {
            0 if !rules.is_empty() => {
                rules[i].l4 = L4Match::Ports {
                    protocol: PROTO_TCP,
                    from: (at % 70) as u16,
                    to: 70,
                }
            }
            1 if !rules.is_empty() => {
                rules.remove(i);
            }
            2 => rules.push(Rule {
                l4: L4Match::All,
                peer: Peer::Cidr(cidr),
                description: None,
            }),
            3 => {
                m.members
                    .entry(id.clone())
                    .or_default()
                    .insert(Cidr::host(ip));
            }
            4 => m.prefix_lists.entry("pl-0".into()).or_default().push(cidr),
            _ if !rules.is_empty() => rules[i].description = Some(format!("changed {at}")),
            _ => {}
        }
        m
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 400, ..ProptestConfig::default() })]

        /// What a compile takes over from the previous one (policies, classes) is never stale:
        /// through a chain of small changes, the entries still mean what the evaluator says.
        #[test]
        fn reused_policies_and_classes_follow_every_change(
            first in arb_model(),
            changes in proptest::collection::vec((any::<u8>(), any::<usize>(), any_cidr(), addr()), 1..5),
            seeds in proptest::collection::vec(packet_seed(), 30),
        ) {
            let mut model = first;
            let mut compiled = compile(&model).unwrap();
            for (change, at, cidr, ip) in changes {
                model = mutate(&model, change, at, cidr, ip);
                compiled = compile_with(&model, Some(&compiled)).unwrap();
                for &seed in &seeds {
                    let (pod, query) = pick(&model, seed);
                    check(&model, &compiled, pod, &query);
                }
            }
        }
    }

    #[test]
    fn generated_packets_often_hit_rules() {
        let mut runner = proptest::test_runner::TestRunner::deterministic();
        let (mut allowed, mut total, mut untracked) = (0, 0, 0);
        let mut reasons = BTreeSet::new();
        for _ in 0..300 {
            let model = arb_model().new_tree(&mut runner).unwrap().current();
            let seeds = proptest::collection::vec(packet_seed(), 40)
                .new_tree(&mut runner)
                .unwrap()
                .current();
            for seed in seeds {
                let (pod, query) = pick(&model, seed);
                let e = evaluate(&model, pod, &query);
                total += 1;
                if e.reason == Reason::Allowed {
                    allowed += 1;
                    untracked += usize::from(e.untracked);
                }
                reasons.insert(
                    format!("{:?}", e.reason)
                        .chars()
                        .take(8)
                        .collect::<String>(),
                );
            }
        }
        assert!(
            allowed * 4 > total,
            "only {allowed} of {total} allowed by rules"
        );
        assert!(untracked > 50, "only {untracked} untracked");
        assert!(reasons.len() >= 4, "{reasons:?}");
    }
}
