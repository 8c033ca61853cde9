//! Connection tracking through the real programs (`BPF_PROG_TEST_RUN`), on a
//! small hand-built model: TCP/UDP/ICMP/other-protocol state and idle
//! timeouts (entries aged by rewriting `last_seen_ns`), replies admitted
//! whatever the rules say, ICMP errors related to tracked flows, per-pod
//! isolation, untracked flows, counters, IPv4 fragments, pod removal, and each
//! pod's allowance of flows and fragmented datagrams (a flood of one pod never
//! takes another's flows), given back by the sweep.
//! Every test loads its own `Kernel`.

#[path = "conntrack/allowance.rs"]
mod allowance;
#[path = "conntrack/fragments.rs"]
mod fragments;
#[path = "conntrack/icmp.rs"]
mod icmp;
#[path = "conntrack/pods.rs"]
mod pods;
#[path = "conntrack/support.rs"]
mod support;
#[path = "conntrack/tcp.rs"]
mod tcp;
#[path = "conntrack/udp.rs"]
mod udp;
