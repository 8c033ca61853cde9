//! Loading the programs over the maps a previous agent pinned, when that agent may
//! have been another build.
//!
//! aya reuses whatever map is pinned at a map's pin path without comparing it
//! with the object's definition, so a build whose layout changed (a `PodEntry`
//! that grew) would fail verification over the old pins, or worse, read and
//! write them with the wrong sizes. Hence each pinned map's kernel parameters
//! (type, key and value size, capacity, flags) are compared with the object's
//! definition first:
//!
//! - a map that matches is reused with its content (tracked flows, counters);
//! - a map pinned by no one is created and pinned (no program uses a pin that
//!   does not exist);
//! - a map that differs is **migrated**: created fresh beside the pinned one,
//!   pinned under `P/staging/`, filled by the agent's first apply
//!   ([`crate::kernel::maps::KernelMaps::stage`]: the attached programs, of the
//!   previous build, still read the old map), and only once the new programs
//!   are swapped into the pinned links (one atomic `BPF_LINK_UPDATE` each)
//!   does [`Migration::commit`] rename the staging pin over the old one.
//!
//! So a pod is judged by the old programs and maps, then by the new programs
//! and maps, never by neither. A rename replaces the pin in one step: the live
//! path always names a whole map, never nothing (with unlink and pin, a
//! reader would find no map, and a starting agent would create an empty one).
//! A migrated map starts empty: entries the agent computes are written again,
//! what the kernel accumulated in it (counters) is lost, except the tracked
//! flows: a conntrack or fragment table whose keys and values kept their sizes
//! (a new capacity, new flags) is **carried**: its entries are copied into the
//! new table before the new programs run, and what the old programs tracked
//! meanwhile once more after ([`Carried`]), so an upgrade never turns an
//! established connection's replies into refused new flows. The pods' counts
//! (`POD_TRACKED`) then stay as they are, counting the same entries.

use std::io;
use std::path::{Path, PathBuf};

use aya::Ebpf;
use aya::maps::{Map, MapData, MapError, MapInfo};
use aya::sys::SyscallError;
use enforcer_common::map_names;

use crate::Error;
use crate::kernel::bpffs::{create_dir, map_pin, remove_pin, staging_pin};
use crate::kernel::ebpf::{loader, object};
use crate::kernel::maps::Carried;

/// The programs and maps of the embedded object, loaded over a pin path.
pub struct Loaded {
    pub ebpf: Ebpf,
    /// Maps that replace pinned maps of another layout; empty on a first start
    /// or a restart of the same layout.
    pub migration: Migration,
}

/// Fresh maps pinned under staging names, waiting for the programs that use them
/// to be attached before they take over the live pins.
#[derive(Debug)]
pub struct Migration {
    pin_path: PathBuf,
    maps: Vec<&'static str>,
    carried: Carried,
}

/// Loads the object with every map pinned under `pin_path/maps/`: maps of the
/// same layout are reused, those of another are migrated (see the module).
pub fn load(pin_path: &Path) -> Result<Loaded, Error> {
    create_dir(pin_path.join("maps"))?;
    create_dir(pin_path.join("staging"))?;
    let object = object()?;
    let definitions = aya_obj::Object::parse(object)
        .map_err(|e| Error::Object(Box::new(e)))?
        .maps;
    let level = crate::kernel::ebpf::kernel_log_level();
    remove_unknown_pins(pin_path)?;
    let mut loader = loader(&level);
    let mut migrated = Vec::new();
    let mut reused = Vec::new();
    let mut carried = Carried::default();
    for name in map_names::ALL {
        let definition = definitions.get(name).ok_or(Error::MissingMap(name))?;
        // A staging pin left by an upgrade that did not finish.
        remove_pin(&staging_pin(pin_path, name))?;
        let live = map_pin(pin_path, name);
        match MapInfo::from_pin(&live) {
            Ok(pinned) if same_layout(definition, &pinned) => reused.push(name),
            // Created unpinned and pinned below: aya would reuse any map at a pin path it is given.
            Ok(pinned) => {
                if same_entries(definition, &pinned)
                    && let Some(slot) = carried.previous(name)
                {
                    let pinned = |source| Error::PinnedMap {
                        path: live.clone(),
                        source,
                    };
                    let previous = MapData::from_pin(&live).map_err(pinned)?;
                    *slot = Some(Map::from_map_data(previous).map_err(pinned)?);
                }
                migrated.push(name)
            }
            Err(MapError::SyscallError(SyscallError { io_error, .. }))
                if io_error.kind() == io::ErrorKind::NotFound =>
            {
                reused.push(name)
            }
            Err(source) => return Err(Error::PinnedMap { path: live, source }),
        }
    }
    // Each pod's count of entries must describe the tables it counts: new
    // (empty) tables start with new (zero) counts; carried ones keep theirs.
    if migrated.iter().any(|name| carried.loses(name)) {
        reused.retain(|name| *name != map_names::POD_TRACKED);
        if !migrated.contains(&map_names::POD_TRACKED) {
            migrated.push(map_names::POD_TRACKED);
        }
    }
    for name in reused {
        loader.map_pin_path(name, map_pin(pin_path, name));
    }
    let ebpf = loader.load(object).map_err(|e| Error::Ebpf(Box::new(e)))?;
    for &name in &migrated {
        let staging = staging_pin(pin_path, name);
        let map = ebpf.map(name).ok_or(Error::MissingMap(name))?;
        map.pin(&staging).map_err(|source| Error::Pin {
            path: staging.clone(),
            source,
        })?;
        log::warn!(
            "map {name}: the pinned one has another layout; a new one waits at {} until the new programs are attached",
            staging.display()
        );
    }
    Ok(Loaded {
        ebpf,
        migration: Migration {
            pin_path: pin_path.to_path_buf(),
            maps: migrated,
            carried,
        },
    })
}

/// Unpins the maps of an older build that this object no longer has (`PORTS` went in
/// `PORT_TABLES` and `PORT_RANGES`): a pin alone would keep such a map's memory forever.
/// The programs of that build, still attached, hold their maps until they are replaced.
fn remove_unknown_pins(pin_path: &Path) -> Result<(), Error> {
    let live = map_pin(pin_path, map_names::PODS);
    let staging = staging_pin(pin_path, map_names::PODS);
    for dir in [live.parent(), staging.parent()].into_iter().flatten() {
        let entries = std::fs::read_dir(dir).map_err(|source| Error::Unpin {
            path: dir.to_path_buf(),
            source,
        })?;
        for entry in entries.flatten() {
            let name = entry.file_name();
            if !map_names::ALL.iter().any(|&known| name == known) {
                log::warn!(
                    "map pin {}: no such map in this build, unpinned",
                    entry.path().display()
                );
                remove_pin(&entry.path())?;
            }
        }
    }
    Ok(())
}

/// Whether the kernel map `pinned` is what the object defines: the programs
/// and userspace may use it as their own.
fn same_layout(definition: &aya_obj::Map, pinned: &MapInfo) -> bool {
    same_entries(definition, pinned)
        && pinned.max_entries() == definition.max_entries()
        && pinned.map_flags() == definition.map_flags()
}

/// Whether the pinned map holds entries of the object's map's shape (type, key
/// and value sizes: the same test `same_layout` trusts), whatever its capacity
/// and flags.
fn same_entries(definition: &aya_obj::Map, pinned: &MapInfo) -> bool {
    pinned
        .map_type()
        .is_ok_and(|t| t as u32 == definition.map_type())
        && pinned.key_size() == definition.key_size()
        && pinned.value_size() == definition.value_size()
}

impl Migration {
    /// No map was migrated.
    pub fn is_empty(&self) -> bool {
        self.maps.is_empty()
    }

    /// The previous tracking tables whose entries the new ones take over.
    pub fn carried(&mut self) -> &mut Carried {
        &mut self.carried
    }

    /// Points the live pins at the migrated maps; call only once the programs
    /// using them are attached. Each rename replaces the old pin in one step.
    /// The old maps go when their last user, the replaced programs, does.
    pub fn commit(&mut self) -> Result<(), Error> {
        while let Some(&name) = self.maps.first() {
            let (staging, live) = (
                staging_pin(&self.pin_path, name),
                map_pin(&self.pin_path, name),
            );
            std::fs::rename(&staging, &live).map_err(|source| Error::Repin {
                from: staging,
                to: live,
                source,
            })?;
            self.maps.remove(0);
            log::warn!("map {name}: migrated to the new layout");
        }
        // The previous tables go with the previous programs.
        self.carried = Carried::default();
        Ok(())
    }
}
