//! Writing a compiled state into the maps: a diff by ID against what they hold,
//! copy-on-write so that no pod ever reads half of two states, and the
//! admission that refuses a state the maps cannot hold before anything is written.

use super::*;

impl KernelMaps {
    /// Makes the kernel enforce `compiled` with `node`'s settings, writing
    /// only what differs from the enforced state. Policy handles and peer
    /// classes are copy-on-write (`compiled` must come from
    /// [`crate::compile::compile_with`] over [`KernelMaps::enforced`]): new
    /// ones are written before the pods switch to them, one atomic update
    /// per pod, and the old ones leave after a grace period, so no pod ever
    /// points at a missing or half-written policy; unchanged ones are not
    /// touched. A pod that is gone, or replaced on its VLAN by another
    /// (`PodEntry::identity`), loses its tracked flows, fragment verdicts and
    /// counters, so the VLAN's next pod inherits none. Tracked flows of
    /// remaining pods are kept.
    pub fn apply(
        &mut self,
        compiled: &Compiled,
        node: &NodeConfig,
    ) -> Result<ApplyStats, MapsError> {
        self.write_state(compiled, node, true)
    }

    /// As [`KernelMaps::apply`], but the entries `compiled` no longer uses stay:
    /// the attached programs are a previous build's, reading maps of their own
    /// beside these ([`crate::kernel::pins`]), and may still use them. Once the new
    /// programs are attached, the next apply reads the maps back and retires them.
    pub fn stage(
        &mut self,
        compiled: &Compiled,
        node: &NodeConfig,
    ) -> Result<ApplyStats, MapsError> {
        let stats = self.write_state(compiled, node, false)?;
        self.enforced = None;
        Ok(stats)
    }

    fn write_state(
        &mut self,
        compiled: &Compiled,
        node: &NodeConfig,
        retire: bool,
    ) -> Result<ApplyStats, MapsError> {
        let reconcile = self.enforced.is_none() || self.unreconciled;
        let mut old = match self.enforced.take() {
            Some(old) => old,
            None => self.read_back()?,
        };
        let mut swept = 0;
        if reconcile && retire {
            swept = self.sweep_unreached(&mut old)?;
        }
        let changes = Changes::between(&old, compiled);
        if let Err(error) = changes.copy_on_write(&old, compiled) {
            self.enforced = Some(old);
            return Err(error);
        }
        let result = self
            .apply_changes(&old, compiled, &changes, node, reconcile, retire)
            .map(|stats| ApplyStats {
                removed: stats.removed + swept,
                ..stats
            });
        // After an error the maps hold neither state: the next apply reads them back.
        if result.is_ok() {
            self.enforced = Some(compiled.clone());
            self.unreconciled = false;
        }
        result
    }

    /// Removes the policies and classes no pod reaches: what an apply that
    /// failed half-way (a map that filled up) wrote before it stopped. No
    /// program reads them once a grace period has passed, and they must go
    /// before anything is written, or the next state finds the map still full.
    fn sweep_unreached(&mut self, held: &mut Compiled) -> Result<usize, MapsError> {
        let reached: std::collections::BTreeSet<u32> = held
            .pods
            .values()
            .flat_map(|pod| pod.policies)
            .filter(|&handle| handle != NO_POLICY)
            .collect();
        let policies: Vec<u32> = held
            .policies
            .keys()
            .copied()
            .filter(|handle| !reached.contains(handle))
            .collect();
        let named: std::collections::BTreeSet<u32> = held
            .policies
            .iter()
            .filter(|(handle, _)| reached.contains(handle))
            .flat_map(|(_, entries)| entries.classes())
            .collect();
        let classes: Vec<u32> = held
            .classes
            .keys()
            .copied()
            .filter(|class| !named.contains(class))
            .collect();
        if policies.is_empty() && classes.is_empty() {
            return Ok(0);
        }
        // A pod switched away from one of them just before the failure may still be read.
        wait_for_running_programs();
        let peers = peer_entries(
            &policies
                .iter()
                .map(|h| (*h, held.policies[h].as_ref()))
                .collect::<Vec<_>>(),
        );
        remove_hash(&mut self.peers_v4, &keys(&peers.v4), map_names::PEERS_V4)?;
        remove_hash(&mut self.peers_v6, &keys(&peers.v6), map_names::PEERS_V6)?;
        let ports = self.ports.retire(&classes, true);
        for handle in &policies {
            held.policies.remove(handle);
        }
        for class in &classes {
            held.classes.remove(class);
        }
        log::warn!(
            "removed {} policies and {} peer classes no pod uses (left by an apply that failed)",
            policies.len(),
            classes.len()
        );
        Ok(peers.v4.len() + peers.v6.len() + ports)
    }

    fn apply_changes(
        &mut self,
        old: &Compiled,
        new: &Compiled,
        changes: &Changes,
        node: &NodeConfig,
        reconcile: bool,
        retire: bool,
    ) -> Result<ApplyStats, MapsError> {
        let mut stats = ApplyStats::default();
        let current = self.settings()?;
        let wanted = Settings {
            allowed_events_until_ns: current.allowed_events_until_ns,
            ..settings(node)
        };
        if wanted != current {
            self.settings
                .set(0, wanted, 0)
                .map_err(map_err(map_names::SETTINGS))?;
            stats.written += 1;
        }

        // Entries of new rules, classes and policies go in before any pod uses them.
        for (id, rule) in &changes.rules.write {
            // A counter left by an interrupted apply or a late packet of a freed ID.
            match self.rule_traffic.remove(id) {
                Ok(()) => {}
                Err(e) if absent(&e) => {}
                Err(e) => return Err(map_err(map_names::RULE_TRAFFIC)(e)),
            }
            self.rules
                .insert(id, rule_name(rule)?, 0)
                .map_err(map_err(map_names::RULES))?;
        }
        stats.written += changes.rules.write.len();
        let written = peer_entries(&changes.policies.write);
        // New classes, and classes whose tables switch in place (`Changes::copy_on_write`
        // checked that no pod can see the switch beside another of its lookups' changes).
        let tables: Vec<(u32, &ClassEntries)> = changes
            .classes
            .write
            .iter()
            .chain(&changes.classes.rewritten)
            .copied()
            .collect();
        stats.written += self.ports.write(&tables)?;
        stats.written += write_hash(&mut self.peers_v4, &written.v4, map_names::PEERS_V4)?;
        stats.written += write_hash(&mut self.peers_v6, &written.v6, map_names::PEERS_V6)?;
        stats.written += write_hash(
            &mut self.node_local,
            &changes.node_local.write,
            map_names::NODE_LOCAL,
        )?;

        // Each pod switches with one update. A VLAN that gets a pod, or another
        // pod than before, starts its counters at zero.
        let replaced: BTreeSet<u16> = changes
            .pods
            .write
            .iter()
            .filter(|(vlan, entry)| {
                old.pods
                    .get(vlan)
                    .is_some_and(|held| held.identity != entry.identity)
            })
            .map(|(vlan, _)| *vlan)
            .collect();
        for (vlan, _) in changes
            .pods
            .write
            .iter()
            .filter(|(v, _)| !old.pods.contains_key(v) || replaced.contains(v))
        {
            self.reset_pod_traffic(*vlan)?;
        }
        stats.written += write_hash(&mut self.pods, &changes.pods.write, map_names::PODS)?;
        for vlan in &changes.pods.remove {
            self.pods.remove(vlan).map_err(map_err(map_names::PODS))?;
            self.reset_pod_traffic(*vlan)?;
        }
        stats.removed += changes.pods.remove.len();
        // What the kernel learnt of a pod that left or was replaced must not
        // admit the next pod's traffic: flows and fragment verdicts go with it.
        if reconcile || !changes.pods.remove.is_empty() || !replaced.is_empty() {
            stats.removed += self
                .forget_vlans(|vlan| !new.pods.contains_key(&vlan) || replaced.contains(&vlan))?;
        }
        if !retire {
            return Ok(stats);
        }

        // What no pod uses any more leaves once no program can be reading it.
        let removed_peers = peer_entries(&changes.policies.remove);
        let removed_classes: Vec<u32> = changes.classes.remove.iter().map(|(c, _)| *c).collect();
        let removed_ports: usize = changes.classes.remove.iter().map(|(_, e)| e.len()).sum();
        let retired = [
            changes.rules.remove.len(),
            removed_ports,
            removed_peers.v4.len(),
            removed_peers.v6.len(),
            changes.node_local.remove.len(),
        ];
        // The runs that tables switched away from are freed after this grace period too,
        // but never wait for one: they stay reserved until an apply waits anyway, or the
        // space is needed (`PortTables::write`).
        let waited = retired.iter().any(|&n| n > 0) && !old.pods.is_empty();
        if waited {
            wait_for_running_programs();
        }
        let counted = if reconcile {
            // Counters a previous agent left, of rules gone or never named.
            self.rule_traffic
                .keys()
                .collect::<Result<Vec<u32>, _>>()
                .map_err(map_err(map_names::RULE_TRAFFIC))?
                .into_iter()
                .filter(|id| new.rule(*id).is_none())
                .collect()
        } else {
            changes.rules.remove.clone()
        };
        for id in counted {
            if let Some(traffic) = self.take_rule_traffic(id)?
                && let Some(rule) = old.rule(id)
            {
                let total = Arc::make_mut(&mut self.retired_traffic)
                    .entry(rule.clone())
                    .or_default();
                total.packets += traffic.packets;
                total.bytes += traffic.bytes;
            }
        }
        remove_hash(
            &mut self.node_local,
            &changes.node_local.remove,
            map_names::NODE_LOCAL,
        )?;
        remove_hash(
            &mut self.peers_v6,
            &keys(&removed_peers.v6),
            map_names::PEERS_V6,
        )?;
        remove_hash(
            &mut self.peers_v4,
            &keys(&removed_peers.v4),
            map_names::PEERS_V4,
        )?;
        self.ports.retire(&removed_classes, waited);
        for id in &changes.rules.remove {
            self.rules.remove(id).map_err(map_err(map_names::RULES))?;
        }
        stats.removed += retired.iter().sum::<usize>();
        Ok(stats)
    }

    /// The entries the kernel holds, as a compiled state.
    pub(super) fn read_back(&mut self) -> Result<Compiled, MapsError> {
        let mut rules = RuleIds::default();
        for entry in self.rules.iter() {
            let (id, name) = entry.map_err(map_err(map_names::RULES))?;
            rules.insert(id, rule_ref(&name));
        }
        let pods = self.pods()?;
        // Every handle a pod uses, entries or not (a policy without entries denies all).
        let mut policies: BTreeMap<u32, PolicyEntries> = pods
            .values()
            .flat_map(|p| p.policies)
            .filter(|&h| h != NO_POLICY)
            .map(|h| (h, PolicyEntries::default()))
            .collect();
        for (key, class) in read_hash(&self.peers_v4, map_names::PEERS_V4)? {
            let entry = (PeerKeyV4 { policy: 0, ..key }, class);
            policies.entry(key.policy).or_default().v4.push(entry);
        }
        for (key, class) in read_hash(&self.peers_v6, map_names::PEERS_V6)? {
            let entry = (PeerKeyV6 { policy: 0, ..key }, class);
            policies.entry(key.policy).or_default().v6.push(entry);
        }
        let mut compiled = Compiled::default();
        compiled.pods = pods;
        compiled.policies = policies
            .into_iter()
            .map(|(h, e)| (h, Arc::new(e)))
            .collect();
        compiled.classes = self.ports.read()?;
        compiled.node_local = read_hash(&self.node_local, map_names::NODE_LOCAL)?;
        compiled.rules = rules;
        Ok(compiled)
    }

    fn reset_pod_traffic(&mut self, vlan: u16) -> Result<(), MapsError> {
        let zero = PerCpuValues::try_from(vec![PodTraffic::default(); cpus()?])
            .map_err(|e| MapsError::Cpus(e.to_string()))?;
        self.pod_traffic
            .set(u32::from(vlan), zero, 0)
            .map_err(map_err(map_names::POD_TRAFFIC))
    }

    /// Removes a rule's counter; returns its CPU sum, if it had one.
    fn take_rule_traffic(&mut self, id: u32) -> Result<Option<RuleTraffic>, MapsError> {
        let traffic = match self.rule_traffic.get(&id, 0) {
            Ok(values) => sum_rule_traffic(&values),
            Err(e) if absent(&e) => return Ok(None),
            Err(e) => return Err(map_err(map_names::RULE_TRAFFIC)(e)),
        };
        match self.rule_traffic.remove(&id) {
            Ok(()) => Ok(Some(traffic)),
            Err(e) if absent(&e) => Ok(Some(traffic)),
            Err(e) => Err(map_err(map_names::RULE_TRAFFIC)(e)),
        }
    }
}

/// Refuses, before anything is written, a state the maps cannot hold: names
/// longer than their keys, or more entries than a map's capacity. `enforcer
/// check` and the agent both run it, so `check` refuses what `run` would.
/// (An apply can still find a map full when old and new entries coexist
/// during a copy-on-write switch: [`MapsError::Full`] then.)
pub fn admit(model: &Model, compiled: &Compiled) -> Result<(), MapsError> {
    for pod in &model.pods {
        pod_uid(&pod.identity())?;
        pod_groups(&pod.groups)?;
    }
    for (_, rule) in compiled.rules.iter() {
        rule_name(rule)?;
    }
    let peers = |v4: bool| -> usize {
        compiled
            .policies
            .values()
            .map(|p| if v4 { p.v4.len() } else { p.v6.len() })
            .sum()
    };
    if let Some(table) = compiled
        .classes
        .values()
        .find(|c| c.len() > enforcer_common::ranges::MAX_PER_TABLE as usize)
    {
        return Err(MapsError::PortTableTooLarge {
            ranges: table.len(),
        });
    }
    let ports: usize = compiled.classes.values().map(|c| c.len()).sum();
    // Class IDs index `PORT_TABLES`: the highest must be below its capacity.
    let classes = compiled
        .classes
        .keys()
        .last()
        .map_or(0, |&c| c as usize + 1);
    let needs = [
        (map_names::PODS, compiled.pods.len(), MAX_PODS),
        (map_names::RULES, compiled.rules.len(), MAX_RULES),
        (map_names::PEERS_V4, peers(true), MAX_PEER_ENTRIES),
        (map_names::PEERS_V6, peers(false), MAX_PEER_ENTRIES),
        (map_names::PORT_TABLES, classes, MAX_CLASSES),
        (map_names::PORT_RANGES, ports, MAX_PORT_RANGES),
        (
            map_names::NODE_LOCAL,
            compiled.node_local.len(),
            MAX_ADDRESSES,
        ),
    ];
    match needs
        .into_iter()
        .find(|&(_, n, capacity)| n > capacity as usize)
    {
        Some((map, _, capacity)) => Err(MapsError::Full { map, capacity }),
        None => Ok(()),
    }
}

/// What one map must gain (new keys and changed values) and lose.
pub(super) struct Diff<K, V> {
    pub(super) write: Vec<(K, V)>,
    pub(super) remove: Vec<K>,
}

impl<K: Ord + Copy, V: PartialEq + Copy> Diff<K, V> {
    /// Merges two key-ordered sequences of entries.
    pub(super) fn between(
        old: impl IntoIterator<Item = (K, V)>,
        new: impl IntoIterator<Item = (K, V)>,
    ) -> Self {
        let mut diff = Self {
            write: Vec::new(),
            remove: Vec::new(),
        };
        let mut old = old.into_iter().peekable();
        for (key, value) in new {
            while let Some(&(gone, _)) = old.peek().filter(|(k, _)| *k < key) {
                diff.remove.push(gone);
                old.next();
            }
            match old.peek() {
                Some(&(k, v)) if k == key => {
                    if v != value {
                        diff.write.push((key, value));
                    }
                    old.next();
                }
                _ => diff.write.push((key, value)),
            }
        }
        diff.remove.extend(old.map(|(k, _)| k));
        diff
    }
}

/// The entries one apply writes and removes, map by map; policies and classes by ID.
struct Changes<'c> {
    pods: Diff<u16, PodEntry>,
    policies: IdDiff<'c, PolicyEntries>,
    classes: IdDiff<'c, ClassEntries>,
    node_local: Diff<AddrKey, u8>,
    rules: Diff<u32, &'c RuleRef>,
}

fn copied<'m, K: Copy + 'm, V: Copy + 'm>(
    map: &'m BTreeMap<K, V>,
) -> impl Iterator<Item = (K, V)> + 'm {
    map.iter().map(|(k, v)| (*k, *v))
}

impl<'c> Changes<'c> {
    fn between(old: &'c Compiled, new: &'c Compiled) -> Self {
        Self {
            pods: Diff::between(copied(&old.pods), copied(&new.pods)),
            policies: IdDiff::between(&old.policies, &new.policies),
            classes: IdDiff::between(&old.classes, &new.classes),
            node_local: Diff::between(copied(&old.node_local), copied(&new.node_local)),
            rules: Diff::between(old.rules.iter(), new.rules.iter()),
        }
    }

    /// Checks that no policy or rule of `old` changes under its ID (what changes must be
    /// under fresh IDs), and that a class switched in place under its ID is one no pod can
    /// see switched beside another change ([`crate::compile::unsafe_switches`]).
    fn copy_on_write(&self, old: &Compiled, new: &Compiled) -> Result<(), MapsError> {
        let in_place = |map, id| Err(MapsError::InPlace { map, id });
        if let Some(&(id, _)) = self.policies.rewritten.first() {
            return in_place(map_names::PEERS_V4, id);
        }
        let switched: crate::compile::Switched =
            self.classes.rewritten.iter().map(|&(c, _)| c).collect();
        if let Some(&id) = crate::compile::unsafe_switches(old, new, &switched).first() {
            return in_place(map_names::PORT_TABLES, id);
        }
        match self
            .rules
            .write
            .iter()
            .find(|(id, _)| old.rule(*id).is_some())
        {
            Some(&(id, _)) => in_place(map_names::RULES, id),
            None => Ok(()),
        }
    }
}

/// The IDs whose entries an apply writes (new IDs) and removes (gone IDs). `rewritten`:
/// IDs of both states whose entries differ, with the new entries: copy-on-write forbids
/// it but for classes switched in place.
struct IdDiff<'c, E> {
    write: Vec<(u32, &'c E)>,
    remove: Vec<(u32, &'c E)>,
    rewritten: Vec<(u32, &'c E)>,
}

impl<'c, E: PartialEq> IdDiff<'c, E> {
    fn between(old: &'c BTreeMap<u32, Arc<E>>, new: &'c BTreeMap<u32, Arc<E>>) -> Self {
        let mut diff = Self {
            write: Vec::new(),
            remove: Vec::new(),
            rewritten: Vec::new(),
        };
        for (&id, entries) in new {
            match old.get(&id) {
                None => diff.write.push((id, entries)),
                // Shared with the previous compile, or equal.
                Some(held) if Arc::ptr_eq(held, entries) || held == entries => {}
                Some(_) => diff.rewritten.push((id, entries)),
            }
        }
        for (&id, entries) in old {
            if !new.contains_key(&id) {
                diff.remove.push((id, entries));
            }
        }
        diff
    }
}

/// The map entries of policies, their handles in the keys.
fn peer_entries(policies: &[(u32, &PolicyEntries)]) -> PolicyEntries {
    let v4 = policies
        .iter()
        .flat_map(|&(policy, e)| {
            e.v4.iter()
                .map(move |&(k, c)| (PeerKeyV4 { policy, ..k }, c))
        })
        .collect();
    let v6 = policies
        .iter()
        .flat_map(|&(policy, e)| {
            e.v6.iter()
                .map(move |&(k, c)| (PeerKeyV6 { policy, ..k }, c))
        })
        .collect();
    PolicyEntries { v4, v6 }
}

fn keys<K: Copy, V>(entries: &[(K, V)]) -> Vec<K> {
    entries.iter().map(|(k, _)| *k).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::eval::fixtures::{cidr, group, model, pod, rule, tcp};

    #[test]
    fn a_diff_writes_new_and_changed_entries_and_removes_gone_ones() {
        let old = BTreeMap::from([(1u32, 10u8), (2, 20), (4, 40), (6, 60)]);
        let new = BTreeMap::from([(0u32, 0u8), (2, 20), (4, 41), (5, 50)]);
        let diff = Diff::between(old, new);
        assert_eq!(diff.write, [(0, 0), (4, 41), (5, 50)]);
        assert_eq!(diff.remove, [1, 6]);
    }

    /// Four pods on distinct groups; `peer` is that of one rule of sg-x, which only pod 4 uses.
    fn spread(peer: &str) -> crate::model::Model {
        let groups = (0..4)
            .map(|g| {
                let rules = (0..20)
                    .map(|r| rule(tcp(1000 + r, 1000 + r), cidr(&format!("10.{g}.{r}.0/24"))))
                    .collect();
                group(
                    &format!("sg-{g}"),
                    rules,
                    vec![rule(tcp(53, 53), cidr("10.9.0.0/16"))],
                )
            })
            .chain([group("sg-x", vec![rule(tcp(80, 80), cidr(peer))], vec![])])
            .collect();
        let pods = (0..4u16)
            .map(|i| {
                let gi = format!("sg-{i}");
                let groups: &[&str] = if i == 3 { &[&gi, "sg-x"] } else { &[&gi] };
                pod(
                    i + 1,
                    &format!("10.0.1.{}", i + 1),
                    groups,
                    EnforcingMode::Strict,
                )
            })
            .collect();
        model(groups, pods)
    }

    #[test]
    fn one_changed_rule_writes_only_the_entries_of_its_policy() {
        let before = crate::compile::compile(&spread("10.8.0.0/16")).expect("compiles");
        let state = spread("10.8.0.0/17");
        let after = crate::compile::compile_with(&state, Some(&before)).expect("compiles");
        let changes = Changes::between(&before, &after);
        changes
            .copy_on_write(&before, &after)
            .expect("copy-on-write");

        // The new policy of pod 4's ingress side, with its new classes, is all that is written.
        let (handle, old_handle) = (after.pods[&4].policies[0], before.pods[&4].policies[0]);
        assert_ne!(handle, old_handle);
        let written: Vec<u32> = changes.policies.write.iter().map(|(h, _)| *h).collect();
        assert_eq!(written, [handle]);
        let classes: Vec<u32> = after.policies[&handle].classes().collect();
        assert!(
            changes
                .classes
                .write
                .iter()
                .all(|(class, _)| classes.contains(class))
        );
        assert!(changes.classes.write.len() * 10 < after.classes.len());
        assert_eq!(changes.pods.write.len(), 1, "pod 4 switches, no other");
        assert!(changes.rules.write.is_empty() && changes.rules.remove.is_empty());
        // And the old policy is all that goes.
        let removed: Vec<u32> = changes.policies.remove.iter().map(|(h, _)| *h).collect();
        assert_eq!(removed, [old_handle]);

        // Recompiling the same state over itself changes nothing.
        let again = crate::compile::compile_with(&state, Some(&after)).expect("compiles");
        assert_eq!(again, after);
    }

    /// Four pods, each on a group of its own and the shared sg-s, whose first ingress rule
    /// opens `port` to 10.7.0.0/16; each pod's own group opens another port to it, so each
    /// pod's ingress policy has a class of its own for 10.7.0.0/16.
    fn shared(port: u16) -> crate::model::Model {
        let groups = (0..4u16)
            .map(|g| {
                let mut rules: Vec<_> = (0..20)
                    .map(|r| rule(tcp(1000 + r, 1000 + r), cidr(&format!("10.{g}.{r}.0/24"))))
                    .collect();
                rules.push(rule(tcp(2000 + g, 2000 + g), cidr("10.7.0.0/16")));
                group(&format!("sg-{g}"), rules, vec![])
            })
            .chain([group(
                "sg-s",
                vec![
                    rule(tcp(port, port), cidr("10.7.0.0/16")),
                    rule(tcp(22, 22), cidr("10.9.0.0/16")),
                ],
                vec![rule(tcp(53, 53), cidr("10.9.0.0/16"))],
            )])
            .collect();
        let pods = (0..4u16)
            .map(|i| {
                let own = format!("sg-{i}");
                let address = format!("10.0.1.{}", i + 1);
                pod(
                    i + 1,
                    &address,
                    &[own.as_str(), "sg-s"],
                    EnforcingMode::Strict,
                )
            })
            .collect();
        model(groups, pods)
    }

    #[test]
    fn a_shared_rule_whose_ports_change_switches_the_tables_of_its_classes_and_nothing_else() {
        let before = crate::compile::compile(&shared(80)).expect("compiles");
        let after = crate::compile::compile_with(&shared(8443), Some(&before)).expect("compiles");
        let changes = Changes::between(&before, &after);
        changes
            .copy_on_write(&before, &after)
            .expect("switches no pod can see beside another change");

        // No policy, pod, rule or new class is written.
        assert!(changes.policies.write.is_empty() && changes.policies.remove.is_empty());
        assert!(changes.pods.write.is_empty() && changes.pods.remove.is_empty());
        assert!(changes.classes.write.is_empty() && changes.classes.remove.is_empty());
        assert!(changes.rules.write.is_empty() && changes.rules.remove.is_empty());
        // Exactly the tables that name the rule are switched: one class per pod.
        let shared_rule = RuleRef {
            group_id: "sg-s".into(),
            direction: crate::model::Direction::Ingress,
            index: 0,
        };
        let id = after.rule_id(&shared_rule).expect("the rule keeps its ID");
        let naming: BTreeSet<u32> = before
            .classes
            .iter()
            .filter(|(_, table)| table.iter().any(|range| range.verdict.rule == id))
            .map(|(class, _)| *class)
            .collect();
        let switched: BTreeSet<u32> = changes.classes.rewritten.iter().map(|(c, _)| *c).collect();
        assert_eq!(switched, naming);
        assert_eq!(switched.len(), 4);
        // A pod that also changes (its groups) would see a switched table through its old
        // policy before it switches: that class gets a fresh ID and the pod a new policy.
        let mut moved = shared(8443);
        moved.pods[0].groups.push("sg-2".into());
        let over = crate::compile::compile_with(&moved, Some(&before)).expect("compiles");
        let changes = Changes::between(&before, &over);
        changes
            .copy_on_write(&before, &over)
            .expect("copy-on-write");
        assert_eq!(changes.classes.rewritten.len(), 3);
        assert_eq!(changes.pods.write.len(), 1);
    }

    #[test]
    fn a_state_not_compiled_over_the_enforced_one_is_refused() {
        let before = crate::compile::compile(&spread("10.8.0.0/16")).expect("compiles");
        let mut state = spread("10.8.0.0/16");
        state.pods.remove(0);
        // Fresh IDs renumber: entries in use would change in place.
        let fresh = crate::compile::compile(&state).expect("compiles");
        let changes = Changes::between(&before, &fresh);
        assert!(matches!(
            changes.copy_on_write(&before, &fresh),
            Err(MapsError::InPlace { .. })
        ));
        let over = crate::compile::compile_with(&state, Some(&before)).expect("compiles");
        Changes::between(&before, &over)
            .copy_on_write(&before, &over)
            .expect("copy-on-write");
    }
}
