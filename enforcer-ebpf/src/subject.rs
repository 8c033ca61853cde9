//! What the stages of one frame's verdict share: what the verdict is about
//! ([`Subject`], for the counters and events) and what every stage of a
//! flow's verdict needs besides the packet ([`FlowContext`], with the
//! [`Stage`] judging it). Below every stage, so that the maps, the tracker
//! and source NAT can name them.

use enforcer_common::{Reason, Settings};

use crate::Direction;
use crate::parse::Packet;

/// What a verdict was about, filled in as the frame is read, for the
/// counters and events of `observe`.
#[repr(C)]
#[derive(Default)]
pub struct Subject {
    pub packet: Packet,
    pub vlan: u16,
    /// The VLAN has a pod.
    pub pod: bool,
    /// `packet` holds a parsed IP header.
    pub ip: bool,
    /// The pod is audited ([`enforcer_common::POD_AUDIT`]).
    pub audit: bool,
    pub admitted: Admission,
}

/// What admitted a flow, beyond the verdict.
#[repr(C)]
#[derive(Default)]
pub struct Admission {
    /// Rule IDs ([`enforcer_common::PortVerdict::rule`]) of the branch and primary rules
    /// that allowed a new flow; 0 where none did.
    pub rules: [u32; 2],
    /// An egress frame of a source-NATed flow: its translated port (`nat.rs`); else 0.
    pub nat_port: u16,
    /// A new flow whose tracking waits for [`crate::nat::track`].
    pub deferred: Deferred,
}

/// Tracking left to [`crate::nat::track`]: a standard-mode pod's new IPv4 flow
/// that may leave the VPC, which decides whether it is translated.
#[repr(u8)]
#[derive(Clone, Copy, Default, PartialEq, Eq)]
pub enum Deferred {
    #[default]
    No,
    /// Tracked whatever happens.
    Tracked,
    /// Its rules make it untracked, unless it is translated.
    Untracked,
}

impl Subject {
    /// Whether a frame judged `reason` passes only because its pod is audited: the
    /// groups refused it ([`Reason::is_audited`]). Judging never looks at audit, so
    /// such a flow creates no conntrack entry (its first fragment is remembered as
    /// refused): switched to enforce, the pod drops its next packet.
    #[inline(always)]
    pub fn would_drop(&self, reason: Reason) -> bool {
        self.audit && reason.is_audited()
    }
}

/// What every stage of a flow's verdict needs besides the packet.
pub struct FlowContext<'a> {
    pub vlan: u16,
    pub direction: Direction,
    /// Frame length, for the flow's byte counters.
    pub len: u32,
    pub now: u64,
    pub settings: &'a Settings,
    pub stage: Stage,
}

/// Who judges a frame (ARCHITECTURE.md, "XDP and TC").
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    /// TC: the verdict with every effect (flows tracked, fragments remembered).
    Judge,
    /// XDP, before TC: the same decision without effects, whose drops are
    /// final; a pass leaves the frame to TC. A decision that an earlier frame
    /// of the same batch could still change (a later fragment, whose first
    /// fragment TC has not remembered yet) is left to TC as a pass.
    Screen,
}
