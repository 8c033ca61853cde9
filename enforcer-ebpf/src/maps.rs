//! Every map of the object, BTF-typed so that `bpftool map dump` prints field
//! names. Layouts live in `enforcer-common`; userspace fills all but the
//! conntrack, fragment, NAT, counter and event maps (and `SUBJECTS`, the
//! kernel's own), and alone reads `RULES`, `POD_MODES` and `POD_GROUPS`.

use aya_ebpf::{
    bindings::{BPF_F_MMAPABLE, BPF_F_NO_PREALLOC},
    btf_maps::{Array, HashMap, PerCpuArray, PerCpuHashMap, RingBuf},
    macros::btf_map,
};
use enforcer_common::{
    AddrKey, COUNTER_SLOTS, CtEntry, CtKey, EVENTS_RING_BYTES, EventBudget, FragmentKey,
    FragmentVerdict, MAX_ADDRESSES, MAX_CLASSES, MAX_FLOWS, MAX_FRAGMENTED_DATAGRAMS,
    MAX_NAT_ENTRIES, MAX_PEER_ENTRIES, MAX_PODS, MAX_PORT_RANGES, MAX_RULES, NatKey, NatTarget,
    PeerClass, PeerKeyV4, PeerKeyV6, PodEntry, PodGroups, PodTracked, PodTraffic, PodUid,
    PortRange, PortTable, RuleName, RuleTraffic, Settings,
};

/// Not preallocated: an update then frees the replaced entry only after an
/// RCU grace period, so a program holding a reference never sees it torn.
#[btf_map]
pub static PODS: HashMap<u16, PodEntry, { MAX_PODS as usize }, { BPF_F_NO_PREALLOC as usize }> =
    HashMap::new();

/// The policy maps are not preallocated: their memory follows the rules.
#[btf_map]
pub static PEERS_V4: HashMap<
    PeerKeyV4,
    PeerClass,
    { MAX_PEER_ENTRIES as usize },
    { BPF_F_NO_PREALLOC as usize },
> = HashMap::new();

#[btf_map]
pub static PEERS_V6: HashMap<
    PeerKeyV6,
    PeerClass,
    { MAX_PEER_ENTRIES as usize },
    { BPF_F_NO_PREALLOC as usize },
> = HashMap::new();

/// Port tables are arrays: the verifier inlines an array lookup into an index
/// check, so a search's fixed run of probes costs little more than its memory reads.
/// Memory-mapped, so that the agent switches a class's table with one atomic store
/// (`PortTable::word`).
#[btf_map]
pub static PORT_TABLES: Array<PortTable, { MAX_CLASSES as usize }, { BPF_F_MMAPABLE as usize }> =
    Array::new();

#[btf_map]
pub static PORT_RANGES: Array<PortRange, { MAX_PORT_RANGES as usize }> = Array::new();

/// Userspace-written maps are not preallocated either: only the entries in use
/// cost memory, and no program ever inserts into them.
#[btf_map]
pub static NODE_LOCAL: HashMap<
    AddrKey,
    u8,
    { MAX_ADDRESSES as usize },
    { BPF_F_NO_PREALLOC as usize },
> = HashMap::new();

/// Not LRU: an LRU table lets one pod's flood of new flows evict every other
/// pod's. Entries leave when the agent sweeps them expired; each pod's share is
/// capped (`POD_TRACKED`). Not preallocated: memory follows the flows tracked
/// (preallocated, the full table cost 42 MiB on every node, idle or not), and
/// a new entry comes from the kernel's per-CPU element cache (BENCHMARKS.md
/// measures what that costs a new flow). An allocation that fails refuses the
/// flow's tracking as a full table does.
#[btf_map]
pub static CONNTRACK: HashMap<
    CtKey,
    CtEntry,
    { MAX_FLOWS as usize },
    { BPF_F_NO_PREALLOC as usize },
> = HashMap::new();

/// Allowed fragmented datagrams; not LRU and not preallocated, as `CONNTRACK`.
#[btf_map]
pub static FRAGMENTS: HashMap<
    FragmentKey,
    FragmentVerdict,
    { MAX_FRAGMENTED_DATAGRAMS as usize },
    { BPF_F_NO_PREALLOC as usize },
> = HashMap::new();

/// Memory-mapped, so that the agent's sweep subtracts what it deleted with an
/// atomic instruction, as the kernel adds.
#[btf_map]
pub static POD_TRACKED: Array<PodTracked, { MAX_PODS as usize }, { BPF_F_MMAPABLE as usize }> =
    Array::new();

#[btf_map]
pub static SETTINGS: Array<Settings, 1> = Array::new();

#[btf_map]
pub static COUNTERS: PerCpuArray<u64, { COUNTER_SLOTS as usize }> = PerCpuArray::new();

#[btf_map]
pub static RULES: HashMap<u32, RuleName, { MAX_RULES as usize }, { BPF_F_NO_PREALLOC as usize }> =
    HashMap::new();

#[btf_map]
pub static POD_MODES: HashMap<PodUid, u8, { MAX_PODS as usize }> = HashMap::new();

#[btf_map]
pub static POD_GROUPS: HashMap<PodUid, PodGroups, { MAX_PODS as usize }> = HashMap::new();

#[btf_map]
pub static POD_TRAFFIC: PerCpuArray<PodTraffic, { MAX_PODS as usize }> = PerCpuArray::new();

/// Not preallocated: a program inserts a rule's counter once, at the first flow
/// the rule admits; the rules that never admit one cost nothing.
#[btf_map]
pub static RULE_TRAFFIC: PerCpuHashMap<
    u32,
    RuleTraffic,
    { MAX_RULES as usize },
    { BPF_F_NO_PREALLOC as usize },
> = PerCpuHashMap::new();

/// Untyped: libbpf (bpftool) rejects a ring buffer whose BTF value type has a size.
#[btf_map]
pub static EVENTS: RingBuf<(), { EVENTS_RING_BYTES as usize }> = RingBuf::new();

#[btf_map]
pub static EVENT_BUDGET: PerCpuArray<EventBudget, 1> = PerCpuArray::new();

/// Standard mode's translated flows, by the tuple their peer answers; each
/// names its `CONNTRACK` entry, which holds the same port. Not LRU: a mapping
/// leaves with its flow (the agent's sweep), never while the flow lives. Not
/// preallocated: a node without translated flows (strict pods, external SNAT)
/// pays for the buckets alone, and a translated flow's first packet already
/// pays for a rewrite.
#[btf_map]
pub static NAT_PORTS: HashMap<
    NatKey,
    NatTarget,
    { MAX_NAT_ENTRIES as usize },
    { BPF_F_NO_PREALLOC as usize },
> = HashMap::new();

/// The TC programs' [`crate::subject::Subject`] of the frame being judged
/// (see `tc_verdict` in main.rs for why not on the stack). Kernel only.
#[btf_map]
pub static SUBJECTS: PerCpuArray<crate::subject::Subject, 1> = PerCpuArray::new();
