//! The test bed's own programs (`tests/testbed-ebpf`, staged by `cargo xtask build-ebpf`) on
//! the VLAN links, the VPC's end of the trunk, and the trunk itself, behind the enforcer.

use std::net::IpAddr;
use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use aya::Ebpf;
use aya::maps::{HashMap, MapData, PerCpuArray};
use aya::programs::tc::TcAttachOptions;
use aya::programs::xdp::XdpLinkId;
use aya::programs::{LinkOrder, SchedClassifier, TcAttachType, Xdp, XdpMode};

use super::netns::Namespace;

/// Set to use another object than the one `cargo xtask build-ebpf` stages.
pub const OBJECT_VARIABLE: &str = "TESTBED_EBPF_OBJECT";

const VLAN_LINK_TRANSMIT: &str = "vlan_link_transmit";
const VLAN_LINK_RECEIVE: &str = "vlan_link_receive";
const FABRIC_RECEIVE: &str = "fabric_receive";
const FABRIC_DELIVER: &str = "fabric_deliver";
const TRUNK_WITNESS_INGRESS: &str = "trunk_witness_ingress";
const TRUNK_WITNESS_EGRESS: &str = "trunk_witness_egress";
const XDP_PASS_ALL: &str = "xdp_pass_all";
const PROGRAMS: [&str; 6] = [
    VLAN_LINK_TRANSMIT,
    VLAN_LINK_RECEIVE,
    FABRIC_RECEIVE,
    FABRIC_DELIVER,
    TRUNK_WITNESS_INGRESS,
    TRUNK_WITNESS_EGRESS,
];

/// Map layouts, as `tests/testbed-ebpf/src/main.rs` declares them.
const VLAN_LINKS: &str = "VLAN_LINKS";
const BRANCH_ADDRESSES: &str = "BRANCH_ADDRESSES";
const TRUNK_FRAMES: &str = "TRUNK_FRAMES";
const VLAN_IDS: u32 = 4096;

/// The staged object, or the one [`OBJECT_VARIABLE`] names.
pub fn object_path() -> PathBuf {
    std::env::var_os(OBJECT_VARIABLE)
        .map(PathBuf::from)
        .unwrap_or_else(|| crate::staged::object("testbed-ebpf"))
}

/// The loaded programs and their attachments (dropped: detached).
pub struct Datapath {
    ebpf: Ebpf,
}

/// Frames the witness counted on the trunk, in one direction, for one VLAN.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TrunkFrames {
    /// The tag was in the skb's metadata.
    pub tag_in_metadata: u64,
    /// The tag was inline, in the frame's bytes.
    pub tag_inline: u64,
    /// No tag (counted under VLAN 0).
    pub untagged: u64,
}

impl TrunkFrames {
    pub fn tagged(&self) -> u64 {
        self.tag_in_metadata + self.tag_inline
    }
}

/// Which way a frame crossed the trunk, as the enforcer names it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TrunkDirection {
    /// Arriving on the trunk, towards the pods.
    Ingress,
    /// Leaving on the trunk, from the pods.
    Egress,
}

impl Datapath {
    /// Loads and verifies every program of the staged object.
    pub fn load() -> Result<Self> {
        let path = object_path();
        if !path.exists() {
            bail!(
                "{} is missing: run `{}`",
                path.display(),
                crate::staged::build_command(crate::staged::PROFILE)
            );
        }
        let mut ebpf =
            Ebpf::load_file(&path).with_context(|| format!("loading {}", path.display()))?;
        for name in PROGRAMS {
            classifier(&mut ebpf, name)?
                .load()
                .with_context(|| format!("the verifier rejected {name}"))?;
        }
        xdp_pass_all(&mut ebpf)?
            .load()
            .with_context(|| format!("the verifier rejected {XDP_PASS_ALL}"))?;
        Ok(Self { ebpf })
    }

    /// Makes `link` (a macvlan on the trunk, in `node`) the node's VLAN link for `vlan`.
    pub fn attach_vlan_link(&mut self, node: &Namespace, link: &str, vlan: u16) -> Result<()> {
        let ifindex = node.enter(|| ifindex(link))??;
        let mut links: HashMap<_, u32, u16> = HashMap::try_from(
            self.ebpf
                .map_mut(VLAN_LINKS)
                .context("map VLAN_LINKS in the object")?,
        )?;
        links.insert(ifindex, vlan, 0)?;
        self.attach(node, VLAN_LINK_TRANSMIT, link, TcAttachType::Egress)?;
        self.attach(node, VLAN_LINK_RECEIVE, link, TcAttachType::Ingress)
    }

    /// Makes `dev` (in `vpc`) the VPC's end of the trunk.
    pub fn attach_fabric(&mut self, vpc: &Namespace, dev: &str) -> Result<()> {
        self.attach(vpc, FABRIC_RECEIVE, dev, TcAttachType::Ingress)?;
        self.attach(vpc, FABRIC_DELIVER, dev, TcAttachType::Egress)
    }

    /// Tells the fabric that `addr` is a branch ENI's on `vlan`.
    pub fn add_branch_address(&mut self, addr: IpAddr, vlan: u16) -> Result<()> {
        let key = match addr {
            IpAddr::V4(a) => a.to_ipv6_mapped().octets(),
            IpAddr::V6(a) => a.octets(),
        };
        let mut addresses: HashMap<_, [u8; 16], u16> = HashMap::try_from(
            self.ebpf
                .map_mut(BRANCH_ADDRESSES)
                .context("map BRANCH_ADDRESSES in the object")?,
        )?;
        addresses.insert(key, vlan, 0)?;
        Ok(())
    }

    /// Attaches the witness to both hooks of `trunk`, last: the enforcer always
    /// goes first, so the witness counts the frames the enforcer passed.
    pub fn attach_trunk_witness(&mut self, node: &Namespace, trunk: &str) -> Result<()> {
        for (name, hook) in [
            (TRUNK_WITNESS_INGRESS, TcAttachType::Ingress),
            (TRUNK_WITNESS_EGRESS, TcAttachType::Egress),
        ] {
            let program = classifier(&mut self.ebpf, name)?;
            node.enter(|| {
                program.attach_with_options(
                    trunk,
                    hook,
                    TcAttachOptions::TcxOrder(LinkOrder::last()),
                )
            })?
            .with_context(|| format!("attaching {name} to {trunk}"))?;
        }
        Ok(())
    }

    /// Attaches a program that passes every frame to `dev`'s driver (native XDP).
    pub fn attach_xdp_pass_all(&mut self, ns: &Namespace, dev: &str) -> Result<XdpLinkId> {
        let program = xdp_pass_all(&mut self.ebpf)?;
        ns.enter(|| program.attach(dev, XdpMode::Driver))?
            .with_context(|| format!("attaching {XDP_PASS_ALL} to {dev}"))
    }

    pub fn detach_xdp_pass_all(&mut self, link: XdpLinkId) -> Result<()> {
        Ok(xdp_pass_all(&mut self.ebpf)?.detach(link)?)
    }

    /// What the witness counted for `vlan` (0: untagged frames) in `direction`.
    pub fn trunk_frames(&self, direction: TrunkDirection, vlan: u16) -> Result<TrunkFrames> {
        let frames: PerCpuArray<&MapData, [u64; 3]> = PerCpuArray::try_from(
            self.ebpf
                .map(TRUNK_FRAMES)
                .context("map TRUNK_FRAMES in the object")?,
        )?;
        let side = match direction {
            TrunkDirection::Ingress => 0,
            TrunkDirection::Egress => 1,
        };
        let per_cpu = frames.get(&(side * VLAN_IDS + u32::from(vlan)), 0)?;
        Ok(per_cpu
            .iter()
            .fold(TrunkFrames::default(), |sum, [meta, inline, untagged]| {
                TrunkFrames {
                    tag_in_metadata: sum.tag_in_metadata + meta,
                    tag_inline: sum.tag_inline + inline,
                    untagged: sum.untagged + untagged,
                }
            }))
    }

    fn attach(
        &mut self,
        ns: &Namespace,
        name: &'static str,
        dev: &str,
        hook: TcAttachType,
    ) -> Result<()> {
        let program = classifier(&mut self.ebpf, name)?;
        ns.enter(|| program.attach(dev, hook))?
            .with_context(|| format!("attaching {name} to {dev} in {}", ns.name()))?;
        Ok(())
    }
}

fn classifier<'a>(ebpf: &'a mut Ebpf, name: &str) -> Result<&'a mut SchedClassifier> {
    ebpf.program_mut(name)
        .with_context(|| format!("program {name} in the test bed's object"))?
        .try_into()
        .with_context(|| format!("{name} is a TC classifier"))
}

fn xdp_pass_all(ebpf: &mut Ebpf) -> Result<&mut Xdp> {
    ebpf.program_mut(XDP_PASS_ALL)
        .with_context(|| format!("program {XDP_PASS_ALL} in the test bed's object"))?
        .try_into()
        .with_context(|| format!("{XDP_PASS_ALL} is an XDP program"))
}

/// The index of `dev` in the calling thread's namespace.
pub(super) fn ifindex(dev: &str) -> Result<u32> {
    let name = std::ffi::CString::new(dev).context("interface name")?;
    // SAFETY: `name` is a valid C string for the duration of the call.
    let index = unsafe { libc::if_nametoindex(name.as_ptr()) };
    if index == 0 {
        return Err(std::io::Error::last_os_error()).with_context(|| format!("no interface {dev}"));
    }
    Ok(index)
}
