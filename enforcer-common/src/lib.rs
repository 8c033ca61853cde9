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
}

impl PodEntry {
    pub const fn mode(&self) -> Option<EnforcingMode> {
        EnforcingMode::from_u8(self.mode)
    }
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
}

/// Number of [`Counter`] slots.
pub const COUNTER_SLOTS: u32 = 5;

#[cfg(feature = "user")]
mod user {
    // SAFETY: plain-old-data, `#[repr(C)]`, explicit padding, every bit pattern valid.
    unsafe impl aya::Pod for super::PodEntry {}
}
