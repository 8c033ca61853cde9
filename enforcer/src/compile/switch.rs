//! Classes whose port tables are switched in place: a class keeps its ID when only its
//! rules' ports changed, so the policies naming it (the bulk of a node's entries) stay as
//! they are and an apply writes one table and flips one slot (`kernel/maps/ports.rs`).
//!
//! A switch is atomic per lookup (one aligned 8-byte slot), not per pod: a frame judged by
//! two lookups (a standard pod's branch and primary sides, or both through one policy)
//! could see one table switched and the other not, and a pod that changes policies could
//! see a switched table through its old ones. Such a class must get a fresh ID instead
//! (the pods then switch policies, each with one update of its entry).

use std::collections::BTreeSet;

use enforcer_common::{NO_POLICY, policy_slot};

use super::{Compiled, HashMap};

/// IDs of classes of both states whose port tables differ.
pub type Switched = BTreeSet<u32>;

/// The classes of `switched` that a frame could see switched beside another state's
/// entries: those named by a pod of `old` whose entry changes (it reads its old policies
/// until it switches), and those of a pod whose frames take two lookups (both sides of a
/// direction) that both name switched classes. Every other pod reads at most one switched
/// table per frame, through policies the new state keeps: the old state or the new.
pub fn unsafe_switches(old: &Compiled, new: &Compiled, switched: &Switched) -> Vec<u32> {
    if switched.is_empty() {
        return Vec::new();
    }
    let mut named: HashMap<u32, Vec<u32>> = HashMap::default();
    let mut found = BTreeSet::new();
    for (vlan, entry) in &old.pods {
        let kept = new.pods.get(vlan) == Some(entry);
        for sides in [
            [policy_slot::BRANCH_INGRESS, policy_slot::PRIMARY_INGRESS],
            [policy_slot::BRANCH_EGRESS, policy_slot::PRIMARY_EGRESS],
        ] {
            let handles: Vec<u32> = sides
                .into_iter()
                .map(|side| entry.policies[side])
                .filter(|&handle| handle != NO_POLICY)
                .collect();
            for &handle in &handles {
                named.entry(handle).or_insert_with(|| {
                    let mut classes: Vec<u32> =
                        old.policies.get(&handle).map_or_else(Vec::new, |e| {
                            e.classes().filter(|c| switched.contains(c)).collect()
                        });
                    classes.sort_unstable();
                    classes.dedup();
                    classes
                });
            }
            let lookups: Vec<&Vec<u32>> = handles
                .iter()
                .map(|handle| &named[handle])
                .filter(|classes| !classes.is_empty())
                .collect();
            if !(kept && lookups.len() <= 1) {
                found.extend(lookups.into_iter().flatten());
            }
        }
    }
    found.into_iter().collect()
}
