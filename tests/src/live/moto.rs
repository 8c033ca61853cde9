//! moto's EC2 server (`tests/live/moto_ec2.py`, installed by `cargo xtask setup` into
//! `target/moto`), started by a test and driven through JSON lines: boto3 calls, the
//! IDs of the next objects, ENI types moto ignores, a state directory to recreate.

use std::io::{BufRead as _, BufReader, Write as _};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};

use anyhow::{Context as _, Result, bail};
use serde_json::{Value, json};

/// The region the tests' EC2 lives in.
pub const REGION: &str = "us-east-1";

/// The venv `cargo xtask setup` makes.
pub fn python() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/moto/bin/python")
}

/// A running moto server; killed on drop.
pub struct Moto {
    child: Child,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
    pub port: u16,
}

/// The access key the agent under test signs with: the seeding client's is another,
/// so [`Moto::actions`] tells the agent's requests apart.
pub const AGENT_ACCESS_KEY: &str = "enforcer-agent";

impl Moto {
    /// Starts the server on `port` through `command` (a `Command` for [`python`], e.g.
    /// made to start inside a network namespace), and waits until it serves.
    pub fn start(mut command: Command, port: u16) -> Result<Self> {
        let python = python();
        if !python.exists() {
            bail!(
                "{} is missing: run `cargo xtask setup` (it installs moto into a venv)",
                python.display()
            );
        }
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("live/moto_ec2.py");
        let mut child = command
            .arg(&script)
            .arg(port.to_string())
            .arg(REGION)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .with_context(|| format!("starting {}", script.display()))?;
        let stdin = child.stdin.take().expect("piped stdin");
        let stdout = BufReader::new(child.stdout.take().expect("piped stdout"));
        let mut moto = Self {
            child,
            stdin,
            stdout,
            port,
        };
        let ready = moto.read_line().context("waiting for moto to start")?;
        if ready.get("ready").is_none() {
            bail!("moto did not start: {ready}");
        }
        Ok(moto)
    }

    /// The endpoint (`AWS_ENDPOINT_URL_EC2`).
    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    fn read_line(&mut self) -> Result<Value> {
        let mut line = String::new();
        if self.stdout.read_line(&mut line)? == 0 {
            bail!("moto exited: {:?}", self.child.try_wait());
        }
        serde_json::from_str(&line).with_context(|| format!("moto answered {line:?}"))
    }

    fn request(&mut self, request: Value) -> Result<Value> {
        writeln!(self.stdin, "{request}")?;
        self.stdin.flush()?;
        let answer = self.read_line()?;
        match answer.get("ok") {
            Some(ok) => Ok(ok.clone()),
            None => bail!("moto: {request}: {}", answer["error"]),
        }
    }

    /// One boto3 EC2 call, e.g. `call("authorize_security_group_ingress", json!({...}))`.
    pub fn call(&mut self, name: &str, args: Value) -> Result<Value> {
        self.request(json!({"call": name, "args": args}))
    }

    /// The IDs the next groups (`sg`), ENIs (`eni`) and prefix lists (`pl`) get.
    pub fn next_ids(&mut self, kind: &str, ids: &[&str]) -> Result<()> {
        self.request(json!({"next_ids": {kind: ids}})).map(drop)
    }

    /// Sets an ENI's `InterfaceType` (`trunk`, `branch`), which moto ignores on create.
    pub fn set_interface_type(&mut self, eni: &str, kind: &str) -> Result<()> {
        self.request(json!({"interface_type": [eni, kind]}))
            .map(drop)
    }

    /// The EC2 actions (`DescribeSecurityGroups`, …) of the requests signed with the
    /// access key `access_key` so far, each once, sorted.
    pub fn actions(&mut self, access_key: &str) -> Result<Vec<String>> {
        let answer = self.request(json!({ "actions": access_key }))?;
        serde_json::from_value(answer).context("moto's actions")
    }

    /// How many requests signed with `access_key` moto served so far, by action.
    pub fn requests(
        &mut self,
        access_key: &str,
    ) -> Result<std::collections::BTreeMap<String, u64>> {
        let answer = self.request(json!({ "requests": access_key }))?;
        serde_json::from_value(answer).context("moto's request counts")
    }

    /// Recreates the EC2 objects of the state directory `dir`, with their IDs.
    pub fn seed(&mut self, dir: &Path) -> Result<Value> {
        self.request(json!({"seed": dir}))
    }
}

impl Drop for Moto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
