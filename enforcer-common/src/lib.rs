//! What the kernel programs and userspace must agree on: map names, map keys
//! and values (`#[repr(C)]`, BTF-typed), verdict codes and drop reasons.
//! Nothing here parses or decides; it only fixes the layout.
#![no_std]

/// Names of the maps in the eBPF object; also their file names under the pin path.
pub mod map_names {
    /// VLAN ID -> [`crate::PodEntry`].
    pub const PODS: &str = "PODS";
    /// Per-CPU counters indexed by [`crate::Counter`].
    pub const COUNTERS: &str = "COUNTERS";
    /// LPM trie: (policy, IPv4 peer prefix) -> [`crate::PeerClass`].
    pub const PEERS_V4: &str = "PEERS_V4";
    /// LPM trie: (policy, IPv6 peer prefix) -> [`crate::PeerClass`].
    pub const PEERS_V6: &str = "PEERS_V6";
    /// LPM trie: (peer class, protocol, port prefix) -> [`crate::PortVerdict`].
    pub const PORTS: &str = "PORTS";
    /// Hash: [`crate::AddrKey`] -> `u8`, peers security groups never filter (sg-semantics.md §5).
    pub const UNFILTERED: &str = "UNFILTERED";
    /// Hash: [`crate::AddrKey`] (vlan 0) -> `u8`, addresses on this node (standard mode skips them).
    pub const NODE_LOCAL: &str = "NODE_LOCAL";
}

/// Capacity of the pod map: every 12-bit VLAN ID a trunk can carry.
pub const MAX_PODS: u32 = 4096;

/// Lowest and highest VLAN ID a branch ENI may use (802.1Q reserves 0 and 4095).
pub const VLAN_MIN: u16 = 1;
pub const VLAN_MAX: u16 = 4094;

/// How a pod's groups are enforced (sg-semantics.md §6), pinned at pod creation.
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EnforcingMode {
    Strict = 1,
    Standard = 2,
}

impl EnforcingMode {
    pub const fn from_u8(value: u8) -> Option<Self> {
        match value {
            1 => Some(Self::Strict),
            2 => Some(Self::Standard),
            _ => None,
        }
    }
}

/// [`PodEntry::flags`]: the pod has an IPv4 address.
pub const POD_HAS_IPV4: u8 = 1 << 0;
/// [`PodEntry::flags`]: the pod has an IPv6 address.
pub const POD_HAS_IPV6: u8 = 1 << 1;

/// Policy handle meaning "this side is not checked" (strict mode has no primary side).
pub const NO_POLICY: u32 = 0;

/// Indexes of [`PodEntry::policies`].
pub mod policy_slot {
    pub const BRANCH_INGRESS: usize = 0;
    pub const BRANCH_EGRESS: usize = 1;
    pub const PRIMARY_INGRESS: usize = 2;
    pub const PRIMARY_EGRESS: usize = 3;
}

/// Value of the pod map, keyed by the branch ENI's VLAN ID (`u16`).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PodEntry {
    /// The branch ENI's IPv4 address, network byte order.
    pub ipv4: [u8; 4],
    /// The branch ENI's IPv6 address, network byte order.
    pub ipv6: [u8; 16],
    /// [`EnforcingMode`] as `u8`.
    pub mode: u8,
    /// `POD_HAS_*` bits.
    pub flags: u8,
    pub _pad: [u8; 2],
    /// Policy handles by [`policy_slot`]; a packet must be allowed by every
    /// side whose handle is not [`NO_POLICY`]. A handle with no entries denies all.
    pub policies: [u32; 4],
}

impl PodEntry {
    pub const fn mode(&self) -> Option<EnforcingMode> {
        EnforcingMode::from_u8(self.mode)
    }

    /// Whether `addr` (IPv4 as `::ffff:a.b.c.d`) is one of the pod's addresses.
    #[inline(always)]
    pub fn owns(&self, addr: &[u8; 16], ipv6: bool) -> bool {
        if ipv6 {
            self.flags & POD_HAS_IPV6 != 0 && *addr == self.ipv6
        } else {
            self.flags & POD_HAS_IPV4 != 0
                && addr[..12] == V4_MAPPED_PREFIX
                && addr[12..] == self.ipv4
        }
    }
}

/// The first 12 bytes of an IPv4-mapped IPv6 address.
pub const V4_MAPPED_PREFIX: [u8; 12] = [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff];

/// Data of a `PEERS_V4` LPM key. Fields are big-endian bytes so that the
/// trie's bit order is policy first, then address: the key's prefix length is
/// `32 + cidr prefix length`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PeerKeyV4 {
    pub policy: [u8; 4],
    pub addr: [u8; 4],
}

/// Data of a `PEERS_V6` LPM key; prefix length `32 + cidr prefix length`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PeerKeyV6 {
    pub policy: [u8; 4],
    pub addr: [u8; 16],
}

/// Value of the peer tries: the set of rules whose peer contains the address
/// (every covering prefix folded in), named by a class shared by all
/// prefixes, policies and families with the same rule set.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PeerClass {
    pub class: u32,
}

/// Data of a `PORTS` LPM key, big-endian bytes: class (32 bits), protocol (8),
/// then the destination port or, for ICMP/ICMPv6, `[type, code]` (16).
/// Prefix length 32 matches every protocol, 40 one protocol, 40 + n a port
/// block or ICMP type (48) or type and code (56). Lookups use 64 with `_pad` 0.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PortKey {
    pub class: [u8; 4],
    pub protocol: u8,
    pub port: [u8; 2],
    pub _pad: u8,
}

/// Prefix length of a full `PORTS` lookup key.
pub const PORT_KEY_BITS: u32 = 64;

/// [`PortVerdict::flags`]: the flow is not tracked (sg-semantics.md §4).
pub const VERDICT_UNTRACKED: u32 = 1 << 0;

/// Value of `PORTS`: the flow is allowed; `rule` is the compiler's rule ID of
/// the lowest-numbered rule allowing it (userspace maps it to group, direction
/// and rule index).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PortVerdict {
    pub rule: u32,
    pub flags: u32,
}

/// Key of the address sets: an address (IPv4 as `::ffff:a.b.c.d`) seen by one
/// pod's VLAN, or by every pod when `vlan` is 0.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct AddrKey {
    pub vlan: u16,
    pub _pad: [u8; 2],
    pub addr: [u8; 16],
}

/// Indexes of the per-CPU counter array: one per outcome, so an operator can
/// tell from `bpftool map dump` why packets were passed or dropped.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Counter {
    /// Untagged frame: not branch-ENI traffic.
    PassUntagged = 0,
    /// Tagged frame of a known pod, accepted.
    PassPod = 1,
    /// Tagged frame whose VLAN has no pod entry, dropped.
    DropUnknownVlan = 2,
    /// Truncated or malformed headers on a pod's VLAN, dropped.
    DropMalformed = 3,
    /// Stacked tags (QinQ) or an ethertype that is not IP/ARP on a pod's VLAN, dropped.
    DropUnsupportedL2 = 4,
    /// Egress source or ingress destination is not the pod's address, dropped.
    DropSpoofed = 5,
}

/// Number of [`Counter`] slots.
pub const COUNTER_SLOTS: u32 = 6;

#[cfg(feature = "user")]
mod user {
    // SAFETY: plain-old-data, `#[repr(C)]`, explicit padding, every bit pattern valid.
    unsafe impl aya::Pod for super::PodEntry {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::PeerKeyV4 {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::PeerKeyV6 {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::PeerClass {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::PortKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::PortVerdict {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::AddrKey {}
}
