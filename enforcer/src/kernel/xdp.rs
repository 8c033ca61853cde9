//! The XDP program on the trunk: what the trunk receives is judged before the
//! kernel builds a packet, so a flood of denied frames costs their verdicts only.
//! Attached through a pinned XDP link, replaced atomically on restart like the
//! TC links; the pin's name says the mode (`links/xdp_native`, `links/xdp_generic`),
//! since the kernel's link information does not.

use std::fmt;
use std::path::Path;
use std::str::FromStr;

use aya::Ebpf;
use aya::programs::links::{FdLink, LinkError, PinnedLink};
use aya::programs::xdp::XdpLink;
use aya::programs::{Xdp, XdpMode as AttachMode};
use aya::sys::SyscallError;

use super::bpffs::{
    create_dir, detach_pinned_link, link_pin, pinned_info, program_pin, remove_pin,
};
use crate::Error;

/// Name of the XDP program for traffic arriving on the trunk (network -> pod).
pub const XDP_INGRESS: &str = "xdp_ingress";

/// The XDP attachment the operator asks for (`enforcer run --xdp`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum XdpSetting {
    /// Native where the driver supports it (ENA, virtio, veth), else generic.
    #[default]
    Auto,
    Native,
    Generic,
    /// No XDP program: TC judges everything.
    Off,
}

impl XdpSetting {
    /// The modes to try, in order.
    fn modes(self) -> &'static [XdpMode] {
        match self {
            Self::Auto => &[XdpMode::Native, XdpMode::Generic],
            Self::Native => &[XdpMode::Native],
            Self::Generic => &[XdpMode::Generic],
            Self::Off => &[],
        }
    }

    /// Whether an XDP program attached in `mode` is what this setting asks for.
    pub fn accepts(self, mode: XdpMode) -> bool {
        self.modes().contains(&mode)
    }
}

impl FromStr for XdpSetting {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        match text {
            "auto" => Ok(Self::Auto),
            "native" => Ok(Self::Native),
            "generic" => Ok(Self::Generic),
            "off" => Ok(Self::Off),
            other => Err(format!(
                "unknown XDP setting {other:?}: expected auto, native, generic or off"
            )),
        }
    }
}

impl fmt::Display for XdpSetting {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Auto => "auto",
            Self::Native => "native",
            Self::Generic => "generic",
            Self::Off => "off",
        })
    }
}

/// Where the XDP program runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum XdpMode {
    /// In the driver, before any packet is built.
    Native,
    /// In the kernel's receive path, after the packet is built (any device).
    Generic,
}

impl XdpMode {
    pub const ALL: [Self; 2] = [Self::Native, Self::Generic];

    pub fn name(self) -> &'static str {
        match self {
            Self::Native => "native",
            Self::Generic => "generic",
        }
    }

    /// The link's pin name under `links/`.
    fn pin_name(self) -> &'static str {
        match self {
            Self::Native => "xdp_native",
            Self::Generic => "xdp_generic",
        }
    }

    fn attach_mode(self) -> AttachMode {
        match self {
            Self::Native => AttachMode::Driver,
            Self::Generic => AttachMode::Skb,
        }
    }
}

/// Where the enforcer's pinned XDP link stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum XdpState {
    /// Attached to the trunk in this mode.
    Attached(XdpMode),
    /// Pinned, but not on the trunk: its interface was deleted, or it is another one's.
    Elsewhere(XdpMode),
    /// No XDP link pinned.
    Missing,
}

/// Where the XDP link pinned under `pin_path` stands on `interface`, read from
/// the kernel (the link's interface), not from the pin's existence.
pub fn xdp_state(pin_path: &Path, interface: &str) -> Result<XdpState, Error> {
    for mode in XdpMode::ALL {
        let pin = link_pin(pin_path, mode.pin_name());
        let Some(ifindex) = link_ifindex(&pin).map_err(|source| Error::LinkInfo {
            path: pin.clone(),
            source,
        })?
        else {
            continue;
        };
        let on_trunk = ifindex != 0 && Some(ifindex) == interface_index(interface);
        return Ok(if on_trunk {
            XdpState::Attached(mode)
        } else {
            XdpState::Elsewhere(mode)
        });
    }
    Ok(XdpState::Missing)
}

/// Makes the XDP program the one attached to `interface` as `setting` asks,
/// through a link pinned under `pin_path`: a pinned link on the trunk in an
/// accepted mode gets the newly loaded program with one atomic
/// `BPF_LINK_UPDATE`; otherwise a link is created in the first mode the device
/// takes, and stale links go. `Off` detaches and removes any XDP link. Returns
/// the mode in use.
pub fn attach_xdp(
    ebpf: &mut Ebpf,
    interface: &str,
    pin_path: &Path,
    setting: XdpSetting,
) -> Result<Option<XdpMode>, Error> {
    if setting == XdpSetting::Off {
        detach_xdp(pin_path)?;
        return Ok(None);
    }
    create_dir(pin_path.join("links"))?;
    create_dir(pin_path.join("programs"))?;
    let name = XDP_INGRESS;
    let program_err = |source| Error::Program { name, source };
    let link_err = |source| Error::Link { name, source };
    let program: &mut Xdp = ebpf
        .program_mut(name)
        .ok_or(Error::MissingProgram(name))?
        .try_into()
        .map_err(program_err)?;
    if program.fd().is_err() {
        program.load().map_err(program_err)?;
    }
    let mode = match xdp_state(pin_path, interface)? {
        XdpState::Attached(mode) if setting.accepts(mode) => {
            let link = pinned_link(pin_path, mode)?.expect("the link was just found pinned");
            let link = XdpLink::try_from(link).map_err(link_err)?;
            let id = program.attach_to_link(link).map_err(program_err)?;
            // The pin holds the link; our descriptor can go.
            drop(program.take_link(id).map_err(program_err)?);
            mode
        }
        _ => {
            // A device takes one XDP program: the old link goes first.
            detach_links(pin_path)?;
            for mode in XdpMode::ALL {
                remove_pin(&link_pin(pin_path, mode.pin_name()))?;
            }
            create_link(program, interface, pin_path, setting)?
        }
    };
    super::bpffs::repin_program(ebpf, pin_path, name)?;
    Ok(Some(mode))
}

fn create_link(
    program: &mut Xdp,
    interface: &str,
    pin_path: &Path,
    setting: XdpSetting,
) -> Result<XdpMode, Error> {
    let name = XDP_INGRESS;
    let mut last_error = None;
    for &mode in setting.modes() {
        let id = match program.attach(interface, mode.attach_mode()) {
            Ok(id) => id,
            Err(source) => {
                log::debug!("XDP {} on {interface}: {source}", mode.name());
                last_error = Some(source);
                continue;
            }
        };
        let link = program
            .take_link(id)
            .map_err(|source| Error::Program { name, source })?;
        // A netlink attachment (kernels before XDP links) cannot be pinned.
        let link = FdLink::try_from(link).map_err(|source| Error::Link { name, source })?;
        let pin = link_pin(pin_path, mode.pin_name());
        link.pin(&pin)
            .map_err(|source| Error::Pin { path: pin, source })?;
        return Ok(mode);
    }
    Err(Error::Program {
        name,
        source: last_error.expect("every setting but off tries a mode"),
    })
}

/// Detaches the XDP link and removes its pins and the program's.
pub fn detach_xdp(pin_path: &Path) -> Result<(), Error> {
    detach_links(pin_path)?;
    pins(pin_path).iter().try_for_each(|pin| remove_pin(pin))
}

/// Detaches the XDP link now, whoever else holds it; the pins stay.
pub(super) fn detach_links(pin_path: &Path) -> Result<(), Error> {
    XdpMode::ALL.iter().try_for_each(|mode| {
        detach_pinned_link(&link_pin(pin_path, mode.pin_name())).map_err(|source| Error::Detach {
            name: XDP_INGRESS,
            source,
        })
    })
}

/// The pins `uninstall` removes for XDP.
pub fn pins(pin_path: &Path) -> Vec<std::path::PathBuf> {
    XdpMode::ALL
        .iter()
        .map(|mode| link_pin(pin_path, mode.pin_name()))
        .chain([program_pin(pin_path, XDP_INGRESS)])
        .collect()
}

fn pinned_link(pin_path: &Path, mode: XdpMode) -> Result<Option<FdLink>, Error> {
    match PinnedLink::from_pin(link_pin(pin_path, mode.pin_name())) {
        Ok(pinned) => Ok(Some(FdLink::from(pinned))),
        Err(LinkError::SyscallError(SyscallError { io_error, .. }))
            if io_error.kind() == std::io::ErrorKind::NotFound =>
        {
            Ok(None)
        }
        Err(source) => Err(Error::Link {
            name: XDP_INGRESS,
            source,
        }),
    }
}

fn interface_index(interface: &str) -> Option<u32> {
    let name = std::ffi::CString::new(interface).ok()?;
    // SAFETY: a valid NUL-terminated string.
    let index = unsafe { libc::if_nametoindex(name.as_ptr()) };
    (index != 0).then_some(index)
}

/// The interface of the XDP link pinned at `pin` (0: detached, e.g. its device
/// was deleted), from `bpf_link_info.xdp.ifindex`, which aya does not expose;
/// `None` when nothing is pinned there.
fn link_ifindex(pin: &Path) -> std::io::Result<Option<u32>> {
    /// `bpf_link_info` of `linux/bpf.h`: type, id, prog_id, then the union
    /// (8-aligned), whose `xdp` member starts with the ifindex.
    #[repr(C)]
    #[derive(Default)]
    struct LinkInfo {
        link_type: u32,
        id: u32,
        prog_id: u32,
        _pad: u32,
        union: [u64; 8],
    }
    let mut info = LinkInfo::default();
    let found = pinned_info(pin, (&raw mut info).cast(), std::mem::size_of::<LinkInfo>())?;
    Ok(found.map(|()| info.union[0] as u32))
}
