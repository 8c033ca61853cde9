//! Bit-string prefixes: folding covering prefixes into the ones they cover, and laying a
//! longest-prefix table out for the kernel's binary search on lengths
//! ([`enforcer_common::lengths`]).

use std::collections::BTreeMap;
use std::net::IpAddr;

use enforcer_common::lengths::{self, Grid};

use crate::model::Cidr;

/// A bit string of `len` bits, left-aligned in a `u128`, the rest zero.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Prefix {
    pub bits: u128,
    pub len: u8,
}

impl Prefix {
    pub fn of_cidr(cidr: Cidr) -> Self {
        let bits = match cidr.addr() {
            IpAddr::V4(a) => u128::from(u32::from(a)) << 96,
            IpAddr::V6(a) => u128::from(a),
        };
        Self {
            bits,
            len: cidr.prefix_len(),
        }
    }

    pub fn covers(&self, other: &Self) -> bool {
        self.len <= other.len && (self.bits ^ other.bits) & mask(self.len) == 0
    }

    /// The first `len` bits of this prefix (`len <= self.len`).
    fn cut(&self, len: u8) -> Self {
        Self {
            bits: self.bits & mask(len),
            len,
        }
    }
}

fn mask(len: u8) -> u128 {
    u128::MAX.checked_shl(128 - u32::from(len)).unwrap_or(0)
}

/// Folds into each prefix the values of the prefixes covering it: `combine` gets the folded
/// value of the nearest covering prefix, if any, and the prefix's own value. Sorted by
/// (bits, len), a set of prefixes is a depth-first walk of its trie, so a stack of ancestors
/// suffices. Returns (prefix, folded value, index of the nearest covering prefix).
pub fn fold<O, T>(
    own: impl IntoIterator<Item = (Prefix, O)>,
    mut combine: impl FnMut(Option<&T>, O) -> T,
) -> Vec<(Prefix, T, Option<usize>)> {
    let mut out: Vec<(Prefix, T, Option<usize>)> = Vec::new();
    let mut ancestors: Vec<usize> = Vec::new();
    for (prefix, value) in own {
        while let Some(&top) = ancestors.last() {
            if out[top].0.covers(&prefix) {
                break;
            }
            ancestors.pop();
        }
        let parent = ancestors.last().copied();
        let value = combine(parent.map(|p| &out[p].1), value);
        ancestors.push(out.len());
        out.push((prefix, value, parent));
    }
    out
}

/// The smallest length of grid `G` not below `len`.
fn grid_length<G: Grid>(len: u8) -> u8 {
    (0..(1 << G::DEPTH) - 1)
        .map(G::length)
        .find(|&l| l >= len)
        .expect("every prefix length is at most the grid's longest")
}

/// Lays a longest-prefix table out for the hash search of grid `G`: each prefix expanded to
/// the next grid length, a marker at every shorter length where the search must turn towards
/// it, and every key valued by the longest prefix of `table` covering it (`none` where no
/// prefix covers it: the search then finds nothing). A lookup of these keys by
/// [`lengths::search`] returns what a longest-prefix match in `table` returns. Sorted.
pub fn lay_out<G: Grid, V: Copy>(table: &[(Prefix, V)], none: V) -> Vec<(Prefix, V)> {
    let mut keys: Vec<Prefix> = Vec::new();
    for (prefix, _) in table {
        let len = grid_length::<G>(prefix.len);
        let spread = len - prefix.len;
        for low in 0..1u128 << spread {
            let key = Prefix {
                bits: prefix.bits | low.checked_shl(128 - u32::from(len)).unwrap_or(0),
                len,
            };
            keys.push(key);
            lengths::search::<G, ()>(|probed| match probed.cmp(&len) {
                std::cmp::Ordering::Less => {
                    keys.push(key.cut(probed));
                    Some(())
                }
                std::cmp::Ordering::Equal => Some(()),
                std::cmp::Ordering::Greater => None,
            });
        }
    }
    // Table prefixes carry their values, keys inherit the nearest covering prefix's.
    let mut all: BTreeMap<Prefix, (Option<V>, bool)> =
        keys.into_iter().map(|key| (key, (None, true))).collect();
    for &(prefix, value) in table {
        all.entry(prefix).or_insert((None, false)).0 = Some(value);
    }
    fold(
        all,
        |inherited: Option<&(Option<V>, bool)>, (own, is_key)| {
            (own.or(inherited.and_then(|i| i.0)), is_key)
        },
    )
    .into_iter()
    .filter(|(_, (_, is_key), _)| *is_key)
    .map(|(prefix, (value, _), _)| (prefix, value.unwrap_or(none)))
    .collect()
}

#[cfg(test)]
mod tests {
    use enforcer_common::lengths::{PeerV4, PeerV6};
    use proptest::prelude::*;

    use super::*;

    /// The longest-prefix match of `addr` in `table`.
    fn longest<V: Copy>(table: &[(Prefix, V)], addr: Prefix) -> Option<V> {
        table
            .iter()
            .filter(|(p, _)| p.covers(&addr))
            .max_by_key(|(p, _)| p.len)
            .map(|&(_, v)| v)
    }

    /// The kernel's lookup over laid-out keys.
    fn search<G: Grid>(keys: &[(Prefix, u32)], addr: Prefix) -> Option<u32> {
        let map: BTreeMap<Prefix, u32> = keys.iter().copied().collect();
        lengths::search::<G, u32>(|len| map.get(&addr.cut(len)).copied()).filter(|&v| v != 0)
    }

    fn table(width: u8) -> impl Strategy<Value = Vec<(Prefix, u32)>> {
        proptest::collection::vec((any::<u128>(), 0..=width), 0..12).prop_map(move |raw| {
            let mut seen = BTreeMap::new();
            for (i, (bits, len)) in raw.into_iter().enumerate() {
                let top = bits & mask(width);
                seen.insert(Prefix { bits: top, len }.cut(len), i as u32 + 1);
            }
            seen.into_iter().collect()
        })
    }

    /// Addresses inside or next to the table's prefixes, and random ones.
    fn probes(table: &[(Prefix, u32)], width: u8, noise: &[u128]) -> Vec<Prefix> {
        let full = |bits: u128| Prefix {
            bits: bits & mask(width),
            len: width,
        };
        let mut out: Vec<Prefix> = noise.iter().map(|&n| full(n)).collect();
        for (p, _) in table {
            for &n in noise {
                let inside = p.bits | (n & !mask(p.len));
                out.push(full(inside));
                out.push(full(inside ^ (1u128 << (127 - u32::from(p.len.min(127))))));
            }
        }
        out
    }

    fn check<G: Grid>(table: &[(Prefix, u32)], width: u8, noise: &[u128]) {
        let keys = lay_out::<G, u32>(table, 0);
        for addr in probes(table, width, noise) {
            assert_eq!(
                search::<G>(&keys, addr),
                longest(table, addr),
                "{addr:?} in {table:?}"
            );
        }
    }

    proptest! {
        #[test]
        fn the_search_finds_the_longest_prefix_v4(t in table(32), noise in proptest::collection::vec(any::<u128>(), 4)) {
            check::<PeerV4>(&t, 32, &noise);
        }

        #[test]
        fn the_search_finds_the_longest_prefix_v6(t in table(128), noise in proptest::collection::vec(any::<u128>(), 4)) {
            check::<PeerV6>(&t, 128, &noise);
        }
    }

    #[test]
    fn a_lookup_costs_the_same_probes_whatever_the_table() {
        let mut probes = 0;
        lengths::search::<PeerV6, ()>(|_| {
            probes += 1;
            None
        });
        assert_eq!(probes, PeerV6::DEPTH);
        for len in [0, 1, 8, 31, 32] {
            let keys = lay_out::<PeerV4, u32>(&[(Prefix { bits: 0, len }, 7)], 0);
            assert!(keys.iter().all(|(k, _)| k.len % 4 == 0 && k.len >= 8));
            assert_eq!(
                search::<PeerV4>(&keys, Prefix { bits: 0, len: 32 }),
                Some(7)
            );
        }
    }
}
