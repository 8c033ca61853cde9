//! The kernel programs' object, embedded at build time, and its life on the node:
//! maps, programs and TCX links pinned under `P/{maps,programs,links}/`, adopted by restarts
//! (maps through [`crate::kernel::pins`]).

use std::io;
use std::path::{Path, PathBuf};

use aya::programs::links::{FdLink, LinkError, PinnedLink};
use aya::programs::tc::{SchedClassifierLink, TcAttachOptions};
use aya::programs::{LinkOrder, ProgramError, SchedClassifier, TcAttachType};
use aya::sys::SyscallError;
use aya::{Ebpf, EbpfLoader};
use enforcer_common::map_names;

use super::bpffs::{
    create_dir, detach_pinned_link, link_pin, map_pin, program_pin, remove_pin, repin_program,
    staging_pin,
};
use crate::Error;

/// The eBPF ELF built by `cargo xtask build-ebpf` (empty if it was not built).
static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/enforcer-ebpf.o"));

/// Name of the TC program for traffic arriving on the trunk (network -> pod).
pub const TC_INGRESS: &str = "tc_ingress";
/// Name of the TC program for traffic leaving on the trunk (pod -> network).
pub const TC_EGRESS: &str = "tc_egress";

/// Name of the TC program on the primary interface's ingress: replies of
/// standard mode's source-NATed flows go back to their pods.
pub const TC_PRIMARY_INGRESS: &str = "tc_primary_ingress";

/// Both classifiers with the trunk hook each one is attached to.
pub const CLASSIFIERS: [(&str, TcAttachType); 2] = [
    (TC_INGRESS, TcAttachType::Ingress),
    (TC_EGRESS, TcAttachType::Egress),
];

/// The embedded object, or an error saying how to build it.
pub fn object() -> Result<&'static [u8], Error> {
    if OBJECT.is_empty() {
        Err(Error::NoEbpfObject)
    } else {
        Ok(OBJECT)
    }
}

/// The level of the programs' own log statements (aya-log): debug when this
/// process logs at debug level, else none, so production pays nothing for them.
pub fn kernel_log_level() -> u8 {
    if log::max_level() >= log::LevelFilter::Debug {
        aya_log::Level::Debug as u8
    } else {
        0
    }
}

/// A loader for the embedded object with the kernel log level set.
pub(crate) fn loader<'a>(level: &'a u8) -> EbpfLoader<'a> {
    let mut loader = EbpfLoader::new();
    loader.override_global(aya_log::LEVEL, level, true);
    loader
}

/// Loads the object with private maps (tests, benchmarks).
pub fn load() -> Result<Ebpf, Error> {
    load_with_kernel_log(kernel_log_level())
}

/// Loads the object with private maps, its log statements at `level`
/// (an `aya_log::Level` as `u8`; 0 turns them off).
pub fn load_with_kernel_log(level: u8) -> Result<Ebpf, Error> {
    loader(&level)
        .load(object()?)
        .map_err(|e| Error::Ebpf(Box::new(e)))
}

/// How a classifier came to be attached.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Attachment {
    /// A new link was created and pinned (nothing was attached before).
    Created,
    /// The pinned link now runs the newly loaded program (a restart or upgrade).
    Replaced,
}

/// Verifies both classifiers and makes them the ones attached to `interface`
/// through links pinned under `pin_path` (TCX only: netlink attachments
/// cannot be pinned). A pinned link on the trunk gets the new program with
/// one atomic `BPF_LINK_UPDATE`: the trunk is never without a program and
/// never gets a second one. Programs are always replaced, identical or not:
/// one path for restarts and upgrades. The programs are pinned too, for
/// `bpftool` and tests.
pub fn attach_pinned(
    ebpf: &mut Ebpf,
    interface: &str,
    pin_path: &Path,
) -> Result<[Attachment; 2], Error> {
    create_dir(pin_path.join("links"))?;
    create_dir(pin_path.join("programs"))?;
    let mut done = [Attachment::Created; 2];
    for ((name, attach_type), done) in CLASSIFIERS.into_iter().zip(done.iter_mut()) {
        let program = loaded_classifier(ebpf, name)?;
        *done = attach_one(program, name, interface, attach_type, pin_path)?;
        repin_program(ebpf, pin_path, name)?;
    }
    Ok(done)
}

/// The classifier `name` of the object, verified (loaded) if it was not yet.
fn loaded_classifier<'e>(
    ebpf: &'e mut Ebpf,
    name: &'static str,
) -> Result<&'e mut SchedClassifier, Error> {
    let program_err = |source| Error::Program { name, source };
    let program: &mut SchedClassifier = ebpf
        .program_mut(name)
        .ok_or(Error::MissingProgram(name))?
        .try_into()
        .map_err(program_err)?;
    if program.fd().is_err() {
        program.load().map_err(program_err)?;
    }
    Ok(program)
}

/// Makes [`TC_PRIMARY_INGRESS`] the first program on `primary`'s ingress,
/// through a link pinned like the trunk's (see [`attach_pinned`]).
pub fn attach_primary(
    ebpf: &mut Ebpf,
    primary: &str,
    pin_path: &Path,
) -> Result<Attachment, Error> {
    create_dir(pin_path.join("links"))?;
    create_dir(pin_path.join("programs"))?;
    let name = TC_PRIMARY_INGRESS;
    let program = loaded_classifier(ebpf, name)?;
    let done = attach_one(program, name, primary, TcAttachType::Ingress, pin_path)?;
    repin_program(ebpf, pin_path, name)?;
    Ok(done)
}

fn attach_one(
    program: &mut SchedClassifier,
    name: &'static str,
    interface: &str,
    attach_type: TcAttachType,
    pin_path: &Path,
) -> Result<Attachment, Error> {
    let program_err = |source| Error::Program { name, source };
    let link_err = |source| Error::Link { name, source };
    let pin = link_pin(pin_path, name);
    match PinnedLink::from_pin(&pin) {
        Ok(pinned) => {
            let link = FdLink::from(pinned);
            let state = link_state_of(&link, interface, attach_type).map_err(|e| match e {
                LinkQuery::Link(source) => link_err(source),
                LinkQuery::Program(source) => program_err(source),
            })?;
            if state == LinkState::First {
                let link = SchedClassifierLink::try_from(link).map_err(link_err)?;
                let id = program.attach_to_link(link).map_err(program_err)?;
                // The pin holds the link; our descriptor can go.
                drop(program.take_link(id).map_err(program_err)?);
                return Ok(Attachment::Replaced);
            }
            // A link left on another interface, one whose interface is gone, or
            // one another program went ahead of: attach first on the trunk, then
            // let the old link go (the old one holds until the new one runs).
            let created = create_link(program, name, interface, attach_type)?;
            remove_pin(&pin)?;
            pin_link(created, &pin)?;
            drop(link);
            Ok(Attachment::Created)
        }
        Err(LinkError::SyscallError(SyscallError { io_error, .. }))
            if io_error.kind() == io::ErrorKind::NotFound =>
        {
            let created = create_link(program, name, interface, attach_type)?;
            pin_link(created, &pin)?;
            Ok(Attachment::Created)
        }
        Err(source) => Err(link_err(source)),
    }
}

/// Where one of the enforcer's pinned links stands on the trunk.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LinkState {
    /// Attached to the trunk, ahead of every other program there.
    First,
    /// Attached to the trunk behind `ahead` other programs: one of them may
    /// pass a frame before the enforcer judges it.
    Behind { ahead: usize },
    /// Not on the trunk: attached elsewhere, or its interface was deleted.
    Elsewhere,
    /// No link pinned (never attached, or removed by `uninstall` or another tool).
    Missing,
}

#[derive(Debug)]
enum LinkQuery {
    Link(LinkError),
    Program(ProgramError),
}

/// Where the link pinned for `name` stands on `interface`, read from the
/// kernel (the link's program among the interface's TCX programs), not from
/// the pin's existence. A missing interface is [`LinkState::Elsewhere`].
pub fn link_state(
    pin_path: &Path,
    name: &'static str,
    interface: &str,
    attach_type: TcAttachType,
) -> Result<LinkState, Error> {
    let link = match PinnedLink::from_pin(link_pin(pin_path, name)) {
        Ok(pinned) => FdLink::from(pinned),
        Err(LinkError::SyscallError(SyscallError { io_error, .. }))
            if io_error.kind() == io::ErrorKind::NotFound =>
        {
            return Ok(LinkState::Missing);
        }
        Err(source) => return Err(Error::Link { name, source }),
    };
    link_state_of(&link, interface, attach_type).map_err(|e| match e {
        LinkQuery::Link(source) => Error::Link { name, source },
        LinkQuery::Program(source) => Error::Program { name, source },
    })
}

fn link_state_of(
    link: &FdLink,
    interface: &str,
    attach_type: TcAttachType,
) -> Result<LinkState, LinkQuery> {
    let program = link.info().map_err(LinkQuery::Link)?.program_id();
    let attached = match attached_programs(interface, attach_type) {
        Ok(attached) => attached,
        Err(error) if interface_missing(&error) => return Ok(LinkState::Elsewhere),
        Err(error) => return Err(LinkQuery::Program(error)),
    };
    Ok(match attached.iter().position(|&id| id == program) {
        Some(0) => LinkState::First,
        Some(ahead) => LinkState::Behind { ahead },
        None => LinkState::Elsewhere,
    })
}

/// The interface does not exist (in this network namespace).
fn interface_missing(error: &ProgramError) -> bool {
    matches!(
        error,
        ProgramError::TcError(aya::programs::tc::TcError::IoError(e))
            if e.kind() == io::ErrorKind::NotFound || e.raw_os_error() == Some(libc::ENODEV)
    )
}

/// Where both classifiers stand on `interface`.
pub fn link_states(pin_path: &Path, interface: &str) -> Result<[LinkState; 2], Error> {
    let [(ingress, ingress_hook), (egress, egress_hook)] = CLASSIFIERS;
    Ok([
        link_state(pin_path, ingress, interface, ingress_hook)?,
        link_state(pin_path, egress, interface, egress_hook)?,
    ])
}

fn create_link(
    program: &mut SchedClassifier,
    name: &'static str,
    interface: &str,
    attach_type: TcAttachType,
) -> Result<FdLink, Error> {
    let program_err = |source| Error::Program { name, source };
    let id = program
        .attach_with_options(
            interface,
            attach_type,
            // First in the chain: a program before the enforcer could pass a
            // frame (TCX_PASS ends the chain) that the enforcer would drop.
            TcAttachOptions::TcxOrder(LinkOrder::first()),
        )
        .map_err(program_err)?;
    let link = program.take_link(id).map_err(program_err)?;
    FdLink::try_from(link).map_err(|source| Error::Link { name, source })
}

fn pin_link(link: FdLink, pin: &Path) -> Result<(), Error> {
    link.pin(pin).map_err(|source| Error::Pin {
        path: pin.to_path_buf(),
        source,
    })?;
    Ok(())
}

/// IDs of the programs attached to `interface` at `attach_type` through TCX.
pub fn attached_programs(
    interface: &str,
    attach_type: TcAttachType,
) -> Result<Vec<u32>, ProgramError> {
    let (_, programs) = SchedClassifier::query_tcx(interface, attach_type)?;
    Ok(programs.iter().map(|p| p.id()).collect())
}

/// Detaches the programs (TC and XDP) and removes every pin under `pin_path`, then the
/// directory itself; returns the pins removed. Missing pins are not an error.
pub fn uninstall(pin_path: &Path) -> Result<Vec<PathBuf>, Error> {
    let names = || {
        CLASSIFIERS
            .iter()
            .map(|(name, _)| *name)
            .chain([TC_PRIMARY_INGRESS])
    };
    let mut pins: Vec<PathBuf> = names().map(|name| link_pin(pin_path, name)).collect();
    pins.extend(names().map(|name| program_pin(pin_path, name)));
    pins.extend(super::xdp::pins(pin_path));
    pins.extend(map_names::ALL.iter().map(|name| map_pin(pin_path, name)));
    // Maps of an upgrade that did not finish.
    pins.extend(
        map_names::ALL
            .iter()
            .map(|name| staging_pin(pin_path, name)),
    );
    // Detached first, whoever else holds the links: removing the last pin only
    // lets them go once every descriptor is closed, and the kernel may do even
    // that later.
    for name in names() {
        detach_pinned_link(&link_pin(pin_path, name))
            .map_err(|source| Error::Detach { name, source })?;
    }
    super::xdp::detach_links(pin_path)?;
    let mut removed = Vec::new();
    for pin in pins {
        if pin.exists() {
            remove_pin(&pin)?;
            removed.push(pin);
        }
    }
    for dir in ["links", "programs", "maps", "staging"]
        .iter()
        .map(|d| pin_path.join(d))
        .chain([pin_path.to_path_buf()])
    {
        match std::fs::remove_dir(&dir) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => {
                return Err(Error::Unpin {
                    path: dir,
                    source: e,
                });
            }
            _ => {}
        }
    }
    Ok(removed)
}
