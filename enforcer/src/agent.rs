//! The running enforcer: the programs loaded with their maps pinned under the
//! pin path, the maps filled from a compiled state, then the programs attached
//! to the trunk, so that the first enforced packet already sees the policy.

use std::path::Path;

use aya::Ebpf;

use crate::compile::{self, CompileError, Compiled};
use crate::maps::{ApplyStats, KernelMaps, MapsError};
use crate::model::Model;

/// Why the enforcer could not start or apply a state.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error(transparent)]
    Load(#[from] crate::Error),
    #[error("compiling the state")]
    Compile(#[from] CompileError),
    #[error("writing the kernel maps")]
    Maps(#[from] MapsError),
}

/// Programs attached to the trunk and the maps they read.
pub struct Enforcer {
    /// Owns the programs and their attachments (dropped: detached).
    _ebpf: Ebpf,
    maps: KernelMaps,
    compiled: Compiled,
}

impl Enforcer {
    /// Loads the programs with maps pinned under `pin_path`, applies `model`,
    /// then attaches to the model's trunk interface.
    pub fn start(model: &Model, pin_path: &Path) -> Result<Self, AgentError> {
        let compiled = compile::compile(model)?;
        let mut ebpf = crate::ebpf::load_pinned(pin_path)?;
        let mut maps = KernelMaps::take(&mut ebpf)?;
        maps.apply(&compiled, &model.node)?;
        crate::ebpf::attach(&mut ebpf, &model.node.trunk_interface)?;
        Ok(Self {
            _ebpf: ebpf,
            maps,
            compiled,
        })
    }

    /// Makes the kernel enforce `model` instead of the current state.
    pub fn apply(&mut self, model: &Model) -> Result<ApplyStats, AgentError> {
        let compiled = compile::compile(model)?;
        let stats = self.maps.apply(&compiled, &model.node)?;
        self.compiled = compiled;
        Ok(stats)
    }

    /// What the kernel enforces now.
    pub fn compiled(&self) -> &Compiled {
        &self.compiled
    }

    pub fn maps(&mut self) -> &mut KernelMaps {
        &mut self.maps
    }
}
