//! What the kernel programs and userspace must agree on: map names, map keys
//! and values (`#[repr(C)]`, BTF-typed), verdict codes and drop reasons.
//! Nothing here parses or decides; it only fixes the layout.
#![no_std]

/// Longest-prefix match in hash maps by binary search on prefix lengths
/// (Waldvogel et al., "Scalable High Speed IP Routing Lookups", SIGCOMM 1997).
///
/// A table's entries sit at a fixed grid of lengths (a prefix between two grid
/// lengths is expanded to the next). A lookup probes the grid as a perfect
/// binary search tree: a hit goes on to longer lengths, a miss to shorter
/// ones, and the answer is the last hit's value. Userspace puts a marker on
/// each entry's search path (so the search turns towards it) and stores in
/// every entry and marker the value of the longest prefix covering it. A
/// lookup therefore costs exactly `DEPTH` hash probes, whatever the number of
/// rules, prefixes or policies: the point of the design.
pub mod lengths {
    /// A grid of 2^`DEPTH` - 1 ascending prefix lengths.
    pub trait Grid {
        /// Probes per lookup.
        const DEPTH: u32;
        /// The length of rank `rank` (`0..2^DEPTH - 1`).
        fn length(rank: u32) -> u8;
    }

    /// IPv4 peers: 8, 12, ..., 32 (3 probes; a prefix is expanded at most 8 times, 0.0.0.0/0
    /// into 256 /8s).
    pub struct PeerV4;
    impl Grid for PeerV4 {
        const DEPTH: u32 = 3;
        #[inline(always)]
        fn length(rank: u32) -> u8 {
            (8 + 4 * rank) as u8
        }
    }

    /// IPv6 peers: 8, 12, ..., 128 (5 probes).
    pub struct PeerV6;
    impl Grid for PeerV6 {
        const DEPTH: u32 = 5;
        #[inline(always)]
        fn length(rank: u32) -> u8 {
            (8 + 4 * rank) as u8
        }
    }

    /// The longest match: `probe(len)` looks the key cut at `len` up; the value
    /// of the last hit, if any. Always `G::DEPTH` probes.
    #[inline(always)]
    pub fn search<G: Grid, V>(mut probe: impl FnMut(u8) -> Option<V>) -> Option<V> {
        let mut step = 1u32 << (G::DEPTH - 1);
        let mut rank = step - 1;
        let mut best = None;
        for _ in 0..G::DEPTH {
            step >>= 1;
            match probe(G::length(rank)) {
                Some(value) => {
                    best = Some(value);
                    rank += step;
                }
                None => rank -= step,
            }
        }
        best
    }

    /// The top `len` bits of a `width`-bit word (`len <= width <= 32`).
    #[inline(always)]
    pub fn mask32(len: u8, width: u32) -> u32 {
        let low = (width - u32::from(len)) as u64;
        ((u64::from(u32::MAX) >> (32 - width)) & !((1u64 << low) - 1)) as u32
    }

    /// The top `len` bits of a 64-bit word (`len <= 64`).
    #[inline(always)]
    pub fn mask64(len: u8) -> u64 {
        if len == 0 {
            0
        } else {
            u64::MAX << (64 - u32::from(len))
        }
    }
}

/// Names of the maps in the eBPF object; also their file names under the pin path.
pub mod map_names {
    /// VLAN ID -> [`crate::PodEntry`].
    pub const PODS: &str = "PODS";
    /// Per-CPU packet counters indexed by [`crate::counter_slot`] (reason, audit).
    pub const COUNTERS: &str = "COUNTERS";
    /// Hash: [`crate::PeerKeyV4`] (policy, IPv4 peer prefix) -> [`crate::PeerClass`], see [`crate::lengths`].
    pub const PEERS_V4: &str = "PEERS_V4";
    /// Hash: [`crate::PeerKeyV6`] (policy, IPv6 peer prefix) -> [`crate::PeerClass`].
    pub const PEERS_V6: &str = "PEERS_V6";
    /// Array indexed by peer class: [`crate::PortTable`], where the class's port table
    /// sits in `PORT_RANGES` (see [`crate::ranges`]).
    pub const PORT_TABLES: &str = "PORT_TABLES";
    /// Array of [`crate::PortRange`]: every class's port table, each a sorted run.
    pub const PORT_RANGES: &str = "PORT_RANGES";
    /// Hash: [`crate::AddrKey`] (vlan 0) -> `u8`, addresses on this node (standard mode skips them).
    pub const NODE_LOCAL: &str = "NODE_LOCAL";
    /// Hash: [`crate::CtKey`] -> [`crate::CtEntry`], the connection tracker (not LRU:
    /// entries leave when they expire, swept by the agent, never evicted by another pod's flood).
    pub const CONNTRACK: &str = "CONNTRACK";
    /// Hash: [`crate::FragmentKey`] -> [`crate::FragmentVerdict`], allowed fragmented
    /// datagrams (not LRU, like `CONNTRACK`).
    pub const FRAGMENTS: &str = "FRAGMENTS";
    /// Array of one [`crate::Settings`].
    pub const SETTINGS: &str = "SETTINGS";
    /// Hash: rule ID -> [`crate::RuleName`]; the
    /// kernel never reads it, `flows` and `status` decode rule IDs with it.
    pub const RULES: &str = "RULES";
    /// Hash: [`crate::PodUid`] -> [`crate::EnforcingMode`] as `u8`, each pod's mode as
    /// first seen (sg-semantics.md §6); userspace only.
    pub const POD_MODES: &str = "POD_MODES";
    /// Hash: [`crate::PodUid`] -> [`crate::PodGroups`], each pod's security groups as
    /// first enforced (sg-semantics.md §2: a running pod keeps its groups); userspace only.
    pub const POD_GROUPS: &str = "POD_GROUPS";
    /// Per-CPU array indexed by VLAN ID: [`crate::PodTraffic`].
    pub const POD_TRAFFIC: &str = "POD_TRAFFIC";
    /// Per-CPU hash: rule ID -> [`crate::RuleTraffic`] of the flows the rule admitted.
    pub const RULE_TRAFFIC: &str = "RULE_TRAFFIC";
    /// Ring buffer of [`crate::VerdictEvent`].
    pub const EVENTS: &str = "EVENTS";
    /// Per-CPU array of one [`crate::EventBudget`]: the events' rate limit.
    pub const EVENT_BUDGET: &str = "EVENT_BUDGET";
    /// Array indexed by VLAN ID, memory-mapped by userspace: [`crate::PodTracked`], how
    /// many `CONNTRACK` and `FRAGMENTS` entries each pod holds (its allowance's use).
    pub const POD_TRACKED: &str = "POD_TRACKED";
    /// Hash: [`crate::NatKey`] (a translated flow as the peer sees it) -> [`crate::NatTarget`]
    /// (the pod's flow): standard mode's source NAT, read by the return path.
    pub const NAT_PORTS: &str = "NAT_PORTS";

    /// Every map, in the order userspace pins them.
    pub const ALL: [&str; 19] = [
        PODS,
        PEERS_V4,
        PEERS_V6,
        PORT_TABLES,
        PORT_RANGES,
        NODE_LOCAL,
        CONNTRACK,
        FRAGMENTS,
        SETTINGS,
        COUNTERS,
        RULES,
        POD_MODES,
        POD_GROUPS,
        POD_TRAFFIC,
        RULE_TRAFFIC,
        EVENTS,
        EVENT_BUDGET,
        POD_TRACKED,
        NAT_PORTS,
    ];
}

/// Conntrack idle timeouts in seconds that are not NodeConfig settings
/// (sg-semantics.md §4); the kernel and `flow.rs` both use these.
pub mod ct_timeouts {
    /// TCP until a packet has been seen in both directions.
    pub const TCP_OPENING: u32 = 60;
    /// TCP after FIN from both sides, or after any RST.
    pub const TCP_CLOSING: u32 = 10;
    /// ICMP (echo and everything else tracked).
    pub const ICMP: u32 = 30;
    /// Protocols other than TCP, UDP and ICMP.
    pub const OTHER: u32 = 600;
    /// A fragmented datagram's verdict, from its first fragment: the longest a
    /// host waits for the rest (RFC 8200 §4.5; Linux waits 30 s for IPv4).
    pub const FRAGMENTS: u32 = 60;
}

/// Capacity of the connection tracker. Not LRU: a full table refuses new flows
/// and never evicts a live one; expired entries are swept by the agent.
pub const MAX_FLOWS: u32 = 262_144;
/// Default per-pod allowance of tracked flows (`NodeConfig.spec.maxFlowsPerPod`),
/// a sixteenth of the table: one pod's flood leaves room for fifteen others at
/// their full allowance, and never touches their flows (EC2's per-ENI
/// tracked-connection allowance plays the same part).
pub const DEFAULT_MAX_FLOWS_PER_POD: u32 = MAX_FLOWS / 16;
/// Capacity of each peer map (entries of all policies, markers included). A
/// node at the limits (120 branch pods, 16 groups of 60 rules each) needs about
/// 35k; room for twice that while a change is written beside what it replaces.
/// Hash buckets cost memory whether used or not (16 bytes per entry of capacity).
pub const MAX_PEER_ENTRIES: u32 = 1 << 18;
/// Capacity of `PORT_TABLES`: peer class IDs are below it (the classes of two
/// states, while one replaces the other).
pub const MAX_CLASSES: u32 = 1 << 16;
/// Capacity of `PORT_RANGES` (the ranges of all classes of two states): a node at
/// the limits above needs about 60k.
pub const MAX_PORT_RANGES: u32 = 1 << 19;
/// Capacity of the address sets (`UNFILTERED`, `NODE_LOCAL`).
pub const MAX_ADDRESSES: u32 = 65_536;
/// Capacity of the fragment table.
pub const MAX_FRAGMENTED_DATAGRAMS: u32 = 8192;
/// Default per-pod allowance of fragmented datagrams in flight
/// (`NodeConfig.spec.maxFragmentsPerPod`), a sixteenth of the table.
pub const DEFAULT_MAX_FRAGMENTS_PER_POD: u32 = MAX_FRAGMENTED_DATAGRAMS / 16;

/// Capacity of the pod map: every 12-bit VLAN ID a trunk can carry.
pub const MAX_PODS: u32 = 4096;
/// Capacity of the rule table and of the per-rule counters (the rules of two states, while one replaces the other).
pub const MAX_RULES: u32 = 1 << 17;
/// Size in bytes of the verdict event ring buffer (a power of two of pages).
pub const EVENTS_RING_BYTES: u32 = 1 << 20;
/// Verdict events each CPU may emit per second, and in one burst.
pub const EVENTS_PER_SECOND: u64 = 2000;
pub const EVENTS_BURST: u64 = 500;

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
    /// `strict` or `standard`, as the NodeConfig spells it.
    pub const fn name(self) -> &'static str {
        match self {
            Self::Strict => "strict",
            Self::Standard => "standard",
        }
    }

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
/// [`PodEntry::flags`]: the pod is audited (`enforcingAction: audit`): a frame its
/// groups refuse ([`Reason::is_audited`]) passes, counted and reported as "would drop".
/// A flag in the entry the packet already read, so switching is one `PODS` update.
pub const POD_AUDIT: u8 = 1 << 2;

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
    /// How many of `unfiltered_v4` and `unfiltered_v6` are in use.
    pub unfiltered_v4_count: u8,
    pub unfiltered_v6_count: u8,
    /// Policy handles by [`policy_slot`]; a packet must be allowed by every
    /// side whose handle is not [`NO_POLICY`]. A handle with no entries denies all.
    pub policies: [u32; 4],
    /// [`PodEntry::identity_of`] the pod's UID: userspace tells a pod replaced on
    /// the same VLAN from the one before it, even across restarts. The kernel never reads it.
    pub identity: [u8; 8],
    /// Peers security groups never filter for this pod (sg-semantics.md §5): the node's
    /// and its subnets' routers. In the pod's entry, which a packet has already read,
    /// because a separate map costs a new flow a cold lookup.
    pub unfiltered_v4: [[u8; 4]; MAX_UNFILTERED_V4],
    pub unfiltered_v6: [[u8; 16]; MAX_UNFILTERED_V6],
}

/// Never-filtered peers of one pod: Amazon DNS (the VPC's base + 2 and the link-local
/// resolver), the metadata service, Time Sync, Windows license activation (two), the
/// ECS task metadata endpoint and the subnet's router.
pub const MAX_UNFILTERED_V4: usize = 8;
/// The link-local resolver, metadata service and Time Sync, and the subnet's router.
pub const MAX_UNFILTERED_V6: usize = 4;

impl PodEntry {
    /// FNV-1a (64 bits) of a pod's identity (its UID): fixed by this definition, so every
    /// build of the agent computes the same value for the entries an older one wrote.
    pub const fn identity_of(uid: &[u8]) -> [u8; 8] {
        let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
        let mut i = 0;
        while i < uid.len() {
            hash ^= uid[i] as u64;
            hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
            i += 1;
        }
        hash.to_le_bytes()
    }

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

    /// Whether security groups never filter traffic with peer `addr` (IPv4 as
    /// `::ffff:a.b.c.d`; an IPv6 packet from an IPv4-mapped address is not IPv4).
    #[inline(always)]
    pub fn never_filters(&self, addr: &[u8; 16], ipv6: bool) -> bool {
        let mapped = addr[..12] == V4_MAPPED_PREFIX;
        if ipv6 {
            if mapped {
                return false;
            }
            let count = usize::from(self.unfiltered_v6_count);
            for (i, unfiltered) in self.unfiltered_v6.iter().enumerate() {
                if i < count && unfiltered == addr {
                    return true;
                }
            }
        } else {
            let count = usize::from(self.unfiltered_v4_count);
            for (i, unfiltered) in self.unfiltered_v4.iter().enumerate() {
                if i < count && unfiltered[..] == addr[12..] {
                    return true;
                }
            }
        }
        false
    }
}

/// The first 12 bytes of an IPv4-mapped IPv6 address.
pub const V4_MAPPED_PREFIX: [u8; 12] = [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff];

/// Key of `PEERS_V4`: a policy's IPv4 peer prefix, at one length of
/// [`lengths::PeerV4`], the bits after `len` zero (see [`lengths`]).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PeerKeyV4 {
    pub policy: u32,
    pub len: u8,
    pub _pad: [u8; 3],
    pub addr: [u8; 4],
}

impl PeerKeyV4 {
    /// The key probing `addr` at prefix length `len` in `policy`.
    #[inline(always)]
    pub fn new(policy: u32, addr: [u8; 4], len: u8) -> Self {
        let masked = u32::from_be_bytes(addr) & lengths::mask32(len, 32);
        Self {
            policy,
            len,
            _pad: [0; 3],
            addr: masked.to_be_bytes(),
        }
    }
}

/// Key of `PEERS_V6`: as [`PeerKeyV4`], lengths of [`lengths::PeerV6`].
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PeerKeyV6 {
    pub policy: u32,
    pub len: u8,
    pub _pad: [u8; 3],
    pub addr: [u8; 16],
}

impl PeerKeyV6 {
    /// The key probing `addr` at prefix length `len` in `policy`.
    #[inline(always)]
    pub fn new(policy: u32, addr: &[u8; 16], len: u8) -> Self {
        let [
            a0,
            a1,
            a2,
            a3,
            a4,
            a5,
            a6,
            a7,
            b0,
            b1,
            b2,
            b3,
            b4,
            b5,
            b6,
            b7,
        ] = *addr;
        let high = u64::from_be_bytes([a0, a1, a2, a3, a4, a5, a6, a7]);
        let low = u64::from_be_bytes([b0, b1, b2, b3, b4, b5, b6, b7]);
        let high = high & lengths::mask64(len.min(64));
        let low = low & lengths::mask64(len.saturating_sub(64));
        let mut masked = [0u8; 16];
        masked[..8].copy_from_slice(&high.to_be_bytes());
        masked[8..].copy_from_slice(&low.to_be_bytes());
        Self {
            policy,
            len,
            _pad: [0; 3],
            addr: masked,
        }
    }
}

/// Value of the peer maps: the set of rules whose peer contains the address
/// (every covering prefix folded in), named by a class shared by all
/// prefixes, policies and families with the same rule set; [`NO_CLASS`]: none.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PeerClass {
    pub class: u32,
}

/// [`PeerClass::class`] of an address no rule's peer contains.
pub const NO_CLASS: u32 = 0;

/// Value of `PORT_TABLES` (by class): the class's port table is `PORT_RANGES`
/// `first..first + count`. `count` 0: no such class (its lookups deny).
///
/// A class's table may be switched to another run while programs read it (a class whose
/// rules' ports changed keeps its ID): both sides move the slot as one aligned 8-byte word
/// ([`PortTable::word`]), the kernel with one load, userspace with one atomic store
/// through the memory-mapped array, so a lookup sees the old run or the new, never the
/// first of one with the count of the other.
#[repr(C, align(8))]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PortTable {
    pub first: u32,
    pub count: u32,
}

impl PortTable {
    /// The slot as the one word both sides load and store (`first` in the low half).
    #[inline(always)]
    pub fn word(self) -> u64 {
        u64::from(self.first) | (u64::from(self.count) << 32)
    }

    #[inline(always)]
    pub fn from_word(word: u64) -> Self {
        Self {
            first: word as u32,
            count: (word >> 32) as u32,
        }
    }
}

/// One range of a class's port table, in `PORT_RANGES`: the 24-bit words
/// (protocol << 16 | destination port, or ICMP/ICMPv6 `[type, code]`) from
/// `start` up to the next range's start have `verdict`. A table's ranges are
/// sorted by `start`, the first starting at 0, so every word is in exactly one.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PortRange {
    pub start: u32,
    pub verdict: PortVerdict,
}

/// The (protocol, port) word a port table is searched by; for ICMP, `port` is
/// `[type, code]` as a big-endian `u16`.
#[inline(always)]
pub fn port_word(protocol: u8, port: u16) -> u32 {
    (u32::from(protocol) << 16) | u32::from(port)
}

/// The search of a port table: a binary search of a fixed number of steps.
pub mod ranges {
    /// Probes of a search besides the last: a table holds at most
    /// 2^`STEPS` ranges ([`MAX_PER_TABLE`]).
    pub const STEPS: u32 = 12;
    /// The most ranges one class's table may hold (two per rule and a few
    /// protocol edges: EC2 allows 1000 rules per direction on an ENI).
    pub const MAX_PER_TABLE: u32 = 1 << STEPS;

    /// The index (below `count`, 1..=[`MAX_PER_TABLE`]) of the last range whose
    /// start is at most `word`, `start(i)` reading range `i`'s start (`None`
    /// only if the table cannot be read, which ends the search). Always
    /// [`STEPS`] probes, whatever `count`: the halves shrink to nothing, then
    /// probe the found range again (one cache line, already read).
    #[inline(always)]
    pub fn search(count: u32, word: u32, mut start: impl FnMut(u32) -> Option<u32>) -> Option<u32> {
        let mut low = 0;
        let mut left = count;
        for _ in 0..STEPS {
            let half = left / 2;
            if start(low + half)? <= word {
                low += half;
            }
            left -= half;
        }
        Some(low)
    }
}

/// [`PortVerdict::flags`]: the flow is not tracked (sg-semantics.md §4).
pub const VERDICT_UNTRACKED: u32 = 1 << 0;

/// A [`PortRange`]'s verdict: the flow is allowed; `rule` is the compiler's rule ID of
/// the lowest-numbered rule allowing it (userspace maps it to group, direction
/// and rule index), or [`NO_RULE`]: none allows it.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PortVerdict {
    pub rule: u32,
    pub flags: u32,
}

/// [`PortVerdict::rule`] of a (protocol, port) no rule allows.
pub const NO_RULE: u32 = 0;

/// Key of the address sets: an address (IPv4 as `::ffff:a.b.c.d`) for one pod's
/// VLAN (`UNFILTERED`), or for the node when `vlan` is 0 (`NODE_LOCAL`).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct AddrKey {
    pub vlan: u16,
    pub _pad: [u8; 2],
    pub addr: [u8; 16],
}

/// Node-wide settings from the NodeConfig (slot 0 of `SETTINGS`).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Settings {
    /// 1: frames of a VLAN with no pod pass (`unknownVlan: pass`); 0: dropped.
    pub unknown_vlan_pass: u32,
    pub tcp_established_timeout: u32,
    pub udp_stream_timeout: u32,
    pub udp_timeout: u32,
    /// Tracked flows one pod may hold ([`PodTracked::flows`]): a new flow beyond
    /// it is dropped ([`Reason::DropFlowLimit`]).
    pub max_flows_per_pod: u32,
    /// Allowed fragmented datagrams one pod may hold ([`PodTracked::fragments`]).
    pub max_fragments_per_pod: u32,
    pub _pad: u32,
    /// Allowed new flows are reported as events while CLOCK_MONOTONIC is below
    /// this (ns): a lease that `enforcer flows --allowed` renews, so the events
    /// stop however it ends (even SIGKILL). Kept by the agent's applies.
    pub allowed_events_until_ns: u64,
    /// Standard mode's source NAT (sg-semantics.md §6): off while any of
    /// `nat_address`, `primary_ifindex` and `trunk_ifindex` is zero.
    pub nat: NatSettings,
}

/// Where and how standard-mode pods' off-VPC IPv4 flows are source-NATed.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct NatSettings {
    /// `primaryIPs[0]` (IPv4), network byte order.
    pub address: [u8; 4],
    /// `snatPortRange`, both ends included: disjoint from the node's own
    /// `ip_local_port_range`, so a translated flow never meets a node socket's.
    pub port_first: u16,
    pub port_last: u16,
    /// The primary interface (translated frames leave there, replies come
    /// back there) and the trunk (replies go on to the pod there).
    pub primary_ifindex: u32,
    pub trunk_ifindex: u32,
    /// How many of `exempt` are in use.
    pub exempt_count: u32,
    pub _pad: u32,
    /// Destinations never NATed: the VPC's IPv4 CIDRs and `excludeSnatCidrs`.
    pub exempt: [NatPrefix; MAX_NAT_EXEMPT],
}

/// IPv4 prefixes [`NatSettings::exempt`] holds at most.
pub const MAX_NAT_EXEMPT: usize = 32;

/// An IPv4 prefix, the bits after `len` zero.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct NatPrefix {
    pub addr: [u8; 4],
    pub len: u8,
    pub _pad: [u8; 3],
}

impl NatSettings {
    /// Whether translation is configured and both interfaces were found.
    #[inline(always)]
    pub fn enabled(&self) -> bool {
        self.address != [0; 4] && self.primary_ifindex != 0 && self.trunk_ifindex != 0
    }

    /// Whether a flow to `addr` keeps its source (inside the VPC or an excluded CIDR).
    #[inline(always)]
    pub fn exempts(&self, addr: [u8; 4]) -> bool {
        let addr = u32::from_be_bytes(addr);
        let count = self.exempt_count as usize;
        for (i, prefix) in self.exempt.iter().enumerate() {
            if i >= count {
                break;
            }
            let mask = lengths::mask32(prefix.len.min(32), 32);
            if addr & mask == u32::from_be_bytes(prefix.addr) {
                return true;
            }
        }
        false
    }

    /// Ports in the range.
    #[inline(always)]
    pub fn port_count(&self) -> u32 {
        u32::from(self.port_last.saturating_sub(self.port_first)) + 1
    }

    /// Ports tried for one new flow: the whole range, at most [`NAT_PROBES`].
    #[inline(always)]
    pub fn probes(&self) -> u32 {
        self.port_count().min(NAT_PROBES)
    }

    /// The `attempt`th port tried for a new translated flow whose
    /// [`nat_port_hash`] is `hash`: from the hash on, the ports that follow,
    /// wrapping. Deterministic, so the reference model (`flow.rs`) picks the
    /// port the kernel picks.
    #[inline(always)]
    pub fn candidate_port(&self, hash: u32, attempt: u32) -> u16 {
        let count = self.port_count();
        (u32::from(self.port_first) + (hash % count + attempt % count) % count) as u16
    }
}

/// Where a new translated flow starts looking in the port range: FNV-1a of
/// the pod's flow (IPv4 addresses, ports, VLAN, protocol).
#[inline(always)]
pub fn nat_port_hash(flow: &CtKey) -> u32 {
    let mut hash: u32 = 0x811c_9dc5;
    let pod_port = flow.pod_port.to_be_bytes();
    let peer_port = flow.peer_port.to_be_bytes();
    let vlan = flow.vlan.to_be_bytes();
    let bytes = [
        flow.pod_addr[12],
        flow.pod_addr[13],
        flow.pod_addr[14],
        flow.pod_addr[15],
        flow.peer_addr[12],
        flow.peer_addr[13],
        flow.peer_addr[14],
        flow.peer_addr[15],
        pod_port[0],
        pod_port[1],
        peer_port[0],
        peer_port[1],
        vlan[0],
        vlan[1],
        flow.protocol,
    ];
    for byte in bytes {
        hash ^= u32::from(byte);
        hash = hash.wrapping_mul(0x0100_0193);
    }
    hash
}

/// Ports tried for a new translated flow before it is dropped
/// ([`Reason::DropNatExhausted`]): the whole range when it is this small.
pub const NAT_PROBES: u32 = 32;

/// Capacity of `NAT_PORTS`: a translated flow holds a conntrack entry too, so
/// the pods' flow allowances bound it as well.
pub const MAX_NAT_ENTRIES: u32 = 65_536;

/// Key of `NAT_PORTS`: a translated flow as its peer sees it, from
/// `peer_addr:peer_port` to the node's NAT address at `nat_port` (TCP/UDP
/// ports; for an ICMP echo, `nat_port` is the translated identifier and
/// `peer_port` 0).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct NatKey {
    pub peer_addr: [u8; 4],
    pub peer_port: u16,
    pub nat_port: u16,
    pub protocol: u8,
    pub _pad: [u8; 3],
}

/// Value of `NAT_PORTS`: the pod's flow (its `CONNTRACK` key, whose entry
/// holds the same `nat_port`), and the Ethernet addresses of its frames on the
/// trunk, which replies get back when they go on to the pod there.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NatTarget {
    /// `bpf_ktime_get_ns` when the mapping was made: the agent's sweep leaves
    /// a young mapping whose flow it cannot see yet (the kernel writes the
    /// mapping first).
    pub created_ns: u64,
    pub flow: CtKey,
    /// The pod's side (the frames' source on the trunk) and the router's.
    pub pod_mac: [u8; 6],
    pub router_mac: [u8; 6],
    pub _pad: [u8; 4],
}

/// How long one renewal of [`Settings::allowed_events_until_ns`] lasts.
pub const ALLOWED_EVENTS_LEASE_NS: u64 = 5_000_000_000;

/// A flow as seen by one pod: direction-independent, so a reply finds the
/// entry its request created, and scoped by VLAN, so one pod's flows never
/// admit traffic to another. Ports are TCP/UDP ports, the ICMP echo
/// identifier in `pod_port`, or 0.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct CtKey {
    pub pod_addr: [u8; 16],
    pub peer_addr: [u8; 16],
    pub pod_port: u16,
    pub peer_port: u16,
    pub vlan: u16,
    pub protocol: u8,
    pub _pad: u8,
}

/// [`CtEntry::state`] values.
pub mod ct_state {
    /// TCP: packets seen in one direction only.
    pub const OPENING: u8 = 1;
    /// TCP: packets seen in both directions.
    pub const ESTABLISHED: u8 = 2;
    /// TCP: FIN from both sides, or RST.
    pub const CLOSING: u8 = 3;
    /// UDP, ICMP, other protocols: packets seen in one direction only.
    pub const ONE_WAY: u8 = 4;
    /// ICMP, other protocols: packets seen in both directions. UDP: a
    /// "stream", a flow that has seen more than one request-response
    /// transaction (EC2's `UdpStreamTimeout` applies).
    pub const BOTH_WAYS: u8 = 5;
    /// UDP: one request-response transaction; the last packet was a response.
    pub const ANSWERED: u8 = 6;
    /// UDP: after one transaction, the origin's side sent again (a second
    /// request); its response makes the flow a stream.
    pub const ASKED_AGAIN: u8 = 7;
}

/// [`CtEntry::flags`] bits.
pub mod ct_flag {
    pub const SEEN_INGRESS: u8 = 1 << 0;
    pub const SEEN_EGRESS: u8 = 1 << 1;
    pub const FIN_INGRESS: u8 = 1 << 2;
    pub const FIN_EGRESS: u8 = 1 << 3;
}

/// Index of [`CtEntry::packets`] and [`CtEntry::bytes`] by direction.
pub const DIR_INGRESS: usize = 0;
pub const DIR_EGRESS: usize = 1;

/// A tracked flow.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct CtEntry {
    /// `bpf_ktime_get_ns` of the first and the latest packet.
    pub created_ns: u64,
    pub last_seen_ns: u64,
    /// Per direction ([`DIR_INGRESS`], [`DIR_EGRESS`]).
    pub packets: [u64; 2],
    pub bytes: [u64; 2],
    /// Rule ID that admitted the flow on the branch side, and on the primary side (standard mode; else 0).
    pub rule: u32,
    pub primary_rule: u32,
    /// [`ct_state`].
    pub state: u8,
    /// Direction of the first packet ([`DIR_INGRESS`] or [`DIR_EGRESS`] as u8).
    pub origin: u8,
    /// [`ct_flag`] bits.
    pub flags: u8,
    pub _pad: u8,
    /// The translated source port (or ICMP echo identifier) of a source-NATed
    /// flow ([`NatKey`]); 0: not translated.
    pub nat_port: u16,
    pub _pad2: [u8; 2],
}

/// One IP datagram's fragments: the first fragment's verdict applies to the rest.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct FragmentKey {
    pub src: [u8; 16],
    pub dst: [u8; 16],
    pub id: u32,
    pub vlan: u16,
    pub protocol: u8,
    pub _pad: u8,
}

/// A fragmented datagram whose first fragment was allowed (denied ones take no
/// entry: a later fragment without one is dropped).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct FragmentVerdict {
    /// `bpf_ktime_get_ns` of the first fragment: the agent sweeps the entry
    /// [`ct_timeouts::FRAGMENTS`] seconds later.
    pub created_ns: u64,
}

/// How many `CONNTRACK` and `FRAGMENTS` entries one pod holds (`POD_TRACKED`,
/// by VLAN). The kernel adds an entry's count before inserting it (and takes it
/// back if the insert fails or the allowance is spent); whoever deletes an
/// entry (the agent's sweep, a removed pod) subtracts it, atomically, through
/// the memory-mapped array.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct PodTracked {
    pub flows: u64,
    pub fragments: u64,
}

/// Why a frame was passed or dropped: the index of the per-CPU `COUNTERS`
/// array and the reason carried by verdict events, so `bpftool map dump`,
/// metrics and `enforcer flows` all say *why*.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reason {
    /// Untagged frame: not branch-ENI traffic.
    PassUntagged = 0,
    /// Packet of a tracked flow.
    PassEstablished = 1,
    /// Tagged frame whose VLAN has no pod (`unknownVlan: drop`).
    DropUnknownVlan = 2,
    /// Truncated or malformed headers on a pod's VLAN.
    DropMalformed = 3,
    /// Stacked tags (QinQ) or an ethertype that is not IP/ARP on a pod's VLAN.
    DropUnsupportedL2 = 4,
    /// Egress source or ingress destination is not the pod's address.
    DropSpoofed = 5,
    /// First packet of a flow the rules allow.
    PassNew = 6,
    /// Traffic security groups never filter (VPC DNS, IMDS, time sync, router, DHCP).
    PassUnfiltered = 7,
    /// Standard mode: the peer is on this node, not checked.
    PassSameNode = 8,
    /// ICMP error carrying the header of a tracked flow.
    PassRelated = 9,
    /// Later fragment of a datagram whose first fragment was allowed.
    PassFragment = 10,
    /// Later fragment of a denied datagram, or whose first fragment was not seen.
    DropFragment = 11,
    /// No rule of the pod's (branch) groups allows the flow.
    DropPolicy = 12,
    /// Standard mode: the branch groups allow it, the node's primary groups do not.
    DropPrimaryPolicy = 13,
    /// ARP and IPv6 neighbour/router discovery of the pod.
    PassLinkLayer = 14,
    /// Tagged frame whose VLAN has no pod (`unknownVlan: pass`).
    PassUnknownVlan = 15,
    /// A new flow the rules allow, beyond the pod's tracked-flow allowance
    /// (`maxFlowsPerPod`) or with the conntrack table full.
    DropFlowLimit = 16,
    /// An allowed first fragment beyond the pod's allowance of fragmented
    /// datagrams (`maxFragmentsPerPod`) or with the fragment table full.
    DropFragmentLimit = 17,
    /// A new standard-mode flow to be source-NATed that found no free port
    /// (`snatPortRange` exhausted for its peer, or the NAT table full).
    DropNatExhausted = 18,
}

/// Number of [`Reason`]s.
pub const REASONS: u32 = 19;

/// Slots of `COUNTERS`: every frame counts once, in the slot of its reason, or, when
/// audit passed a frame its reason would have dropped, in that reason's "would drop"
/// slot after the first [`REASONS`]. A drop slot never counts a passed frame.
pub const COUNTER_SLOTS: u32 = 2 * REASONS;

/// The `COUNTERS` slot of a frame judged `reason`, `would_drop` when audit passed it.
#[inline(always)]
pub const fn counter_slot(reason: Reason, would_drop: bool) -> u32 {
    if would_drop {
        REASONS + reason as u32
    } else {
        reason as u32
    }
}

impl Reason {
    /// The reason's stable name: metrics label, `flows`, `status`.
    pub const fn name(self) -> &'static str {
        match self {
            Self::PassUntagged => "pass_untagged",
            Self::PassEstablished => "pass_established",
            Self::DropUnknownVlan => "drop_unknown_vlan",
            Self::DropMalformed => "drop_malformed",
            Self::DropUnsupportedL2 => "drop_unsupported_l2",
            Self::DropSpoofed => "drop_spoofed",
            Self::PassNew => "pass_new",
            Self::PassUnfiltered => "pass_unfiltered",
            Self::PassSameNode => "pass_same_node",
            Self::PassRelated => "pass_related",
            Self::PassFragment => "pass_fragment",
            Self::DropFragment => "drop_fragment",
            Self::DropPolicy => "drop_policy",
            Self::DropPrimaryPolicy => "drop_primary_policy",
            Self::PassLinkLayer => "pass_link_layer",
            Self::PassUnknownVlan => "pass_unknown_vlan",
            Self::DropFlowLimit => "drop_flow_limit",
            Self::DropFragmentLimit => "drop_fragment_limit",
            Self::DropNatExhausted => "drop_nat_exhausted",
        }
    }

    /// Every reason, in counter-slot order.
    pub const ALL: [Reason; REASONS as usize] = [
        Self::PassUntagged,
        Self::PassEstablished,
        Self::DropUnknownVlan,
        Self::DropMalformed,
        Self::DropUnsupportedL2,
        Self::DropSpoofed,
        Self::PassNew,
        Self::PassUnfiltered,
        Self::PassSameNode,
        Self::PassRelated,
        Self::PassFragment,
        Self::DropFragment,
        Self::DropPolicy,
        Self::DropPrimaryPolicy,
        Self::PassLinkLayer,
        Self::PassUnknownVlan,
        Self::DropFlowLimit,
        Self::DropFragmentLimit,
        Self::DropNatExhausted,
    ];

    pub const fn is_drop(self) -> bool {
        matches!(
            self,
            Self::DropUnknownVlan
                | Self::DropMalformed
                | Self::DropUnsupportedL2
                | Self::DropSpoofed
                | Self::DropFragment
                | Self::DropPolicy
                | Self::DropPrimaryPolicy
                | Self::DropFlowLimit
                | Self::DropFragmentLimit
                | Self::DropNatExhausted
        )
    }

    /// Drops that are security-group verdicts, which audit passes: no rule allows the
    /// flow (either set), or a later fragment of a datagram so refused (or whose first
    /// fragment was not seen). Frames that are not a policy question (malformed, stacked
    /// tags, spoofed addresses, VLANs without a pod) are dropped in audit too.
    pub const fn is_audited(self) -> bool {
        matches!(
            self,
            Self::DropPolicy | Self::DropPrimaryPolicy | Self::DropFragment
        )
    }
}

/// Bytes of a pod identity in [`PodUid`]: a Kubernetes UID (a UUID, 36 bytes) fits;
/// a longer identity is stored as its digest (`BranchPod::identity`).
pub const POD_IDENTITY_BYTES: usize = 48;

/// Bytes of a security group ID in [`PodGroups`] and [`RuleName`] (EC2's are 11 or 20).
pub const GROUP_ID_BYTES: usize = 32;

/// Key of `POD_MODES`: a Kubernetes pod UID (a UUID), zero-padded.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PodUid {
    pub uid: [u8; POD_IDENTITY_BYTES],
}

/// Value of `RULES`: the group, direction and index a rule ID stands for.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RuleName {
    /// The security group ID, zero-padded.
    pub group: [u8; GROUP_ID_BYTES],
    /// Index of the rule in the group's rules of that direction.
    pub index: u32,
    /// [`DIR_INGRESS`] or [`DIR_EGRESS`].
    pub direction: u8,
    pub _pad: [u8; 3],
}

/// Security groups on one ENI at most (EC2's quota can be raised to 16).
pub const MAX_GROUPS_PER_POD: usize = 16;

/// Value of `POD_GROUPS`: a pod's group IDs, zero-padded, in order.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PodGroups {
    /// How many of `groups` are in use.
    pub count: u8,
    pub _pad: [u8; 3],
    pub groups: [[u8; GROUP_ID_BYTES]; MAX_GROUPS_PER_POD],
}

/// A pod's traffic by verdict (per CPU, indexed by VLAN in `POD_TRAFFIC`): each frame
/// counts in one of allowed, denied (dropped) and would-drop (passed by audit).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct PodTraffic {
    pub allowed_packets: u64,
    pub allowed_bytes: u64,
    pub denied_packets: u64,
    pub denied_bytes: u64,
    pub would_drop_packets: u64,
    pub would_drop_bytes: u64,
}

/// What one rule admitted: the packets it decided (first packets of flows,
/// every packet of untracked flows); tracked packets count per pod.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct RuleTraffic {
    pub packets: u64,
    pub bytes: u64,
}

/// [`VerdictEvent::flags`]: the addresses are IPv6 (else IPv4-mapped).
pub const EVENT_IPV6: u8 = 1 << 0;
/// [`VerdictEvent::flags`]: the frame had a parsed IP header (addresses and ports are set).
pub const EVENT_IP: u8 = 1 << 1;
/// [`VerdictEvent::flags`]: the VLAN had a pod.
pub const EVENT_POD: u8 = 1 << 2;
/// [`VerdictEvent::flags`]: the pod is audited and the frame passed although its
/// reason is a drop: "would drop".
pub const EVENT_WOULD_DROP: u8 = 1 << 3;

/// One verdict reported through `EVENTS`: denies (and would-drops) always, allowed new flows
/// while [`Settings::allowed_events_until_ns`] is ahead.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct VerdictEvent {
    /// `bpf_ktime_get_ns` (CLOCK_MONOTONIC).
    pub timestamp_ns: u64,
    pub src: [u8; 16],
    pub dst: [u8; 16],
    /// TCP/UDP ports, or the ICMP echo identifier in `src_port`.
    pub src_port: u16,
    pub dst_port: u16,
    pub vlan: u16,
    pub protocol: u8,
    /// [`DIR_INGRESS`] or [`DIR_EGRESS`].
    pub direction: u8,
    /// [`Reason`] as `u32`.
    pub reason: u32,
    /// Rule IDs of the branch and primary rules that
    /// admitted a new flow; 0 otherwise.
    pub rule: u32,
    pub primary_rule: u32,
    /// Frame length.
    pub len: u32,
    pub icmp_type: u8,
    pub icmp_code: u8,
    /// `EVENT_*` bits.
    pub flags: u8,
    pub _pad: u8,
    /// A source-NATed flow's translated source port (or echo identifier), else 0.
    pub nat_port: u16,
    pub _pad2: [u8; 2],
}

/// Per-CPU token bucket of verdict events (slot 0 of `EVENT_BUDGET`).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct EventBudget {
    pub tokens: u64,
    /// When `tokens` was last topped up.
    pub refilled_ns: u64,
    /// Events not sent: over the rate, or the ring buffer was full.
    pub suppressed: u64,
}

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
    unsafe impl aya::Pod for super::PortTable {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::PortRange {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::PortVerdict {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::AddrKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::Settings {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::CtKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::CtEntry {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::FragmentKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::FragmentVerdict {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::PodTracked {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::PodUid {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::PodGroups {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::RuleName {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::PodTraffic {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::RuleTraffic {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::VerdictEvent {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::EventBudget {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::NatKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::NatTarget {}
}
