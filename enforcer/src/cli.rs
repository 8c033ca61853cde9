//! The `enforcer` command line (contract: `../shared/docs/design.md`, "CLI").

use std::process::ExitCode;

use anyhow::Result;
use clap::{Parser, Subcommand};

/// Enforces EC2 security groups for pods (branch ENIs) in the node's kernel, on the trunk interface.
#[derive(Parser, Debug)]
#[command(name = "enforcer", version, about)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {}

pub fn run(cli: Cli) -> Result<ExitCode> {
    match cli.command {}
}
