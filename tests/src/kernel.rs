//! The enforcer's programs loaded (not attached) with a compiled model in
//! their maps, driven frame by frame through `BPF_PROG_TEST_RUN`; each run
//! reports the kernel's verdict and the reason it counted.

use aya::Ebpf;
use aya::maps::ProgramArray;
use aya::programs::{SchedClassifier, TestRun, TestRunOptions, Xdp};
use enforcer::compile::{self, Compiled};
use enforcer::kernel::ebpf::{TC_EGRESS, TC_INGRESS, TC_PRIMARY_INGRESS};
use enforcer::kernel::maps::KernelMaps;
use enforcer::kernel::xdp::XDP_INGRESS;
use enforcer::model::{Direction, Model};
use enforcer_common::{Reason, counter_slot};

/// TC_ACT_UNSPEC (TCX_NEXT): the enforcer passes a frame on to what follows it.
const TC_ACT_UNSPEC: u32 = -1i32 as u32;
const TC_ACT_SHOT: u32 = 2;
/// TC_ACT_REDIRECT: a source-NATed frame leaves by another interface.
pub const TC_ACT_REDIRECT: u32 = 7;
const XDP_DROP: u32 = 1;
const XDP_PASS: u32 = 2;

/// Which program judges a frame arriving on the trunk.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IngressPath {
    /// TC alone (`--xdp off`).
    Tc,
    /// XDP's screen first, then TC for every frame XDP passes, as the stack
    /// hands it on.
    Xdp,
}

/// What the kernel did with one frame.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Outcome {
    pub passed: bool,
    pub reason: Reason,
    /// Counted as "would drop": an audited pod's frame `reason` drops, passed.
    pub would_drop: bool,
    /// Passed by a redirect (standard mode's source NAT): the frame as it left
    /// is [`Kernel::last_output`].
    pub redirected: bool,
}

impl Outcome {
    /// What the kernel must do with a frame judged `reason` on a pod audited or not.
    pub fn expected(reason: Reason, audited: bool) -> Self {
        let would_drop = audited && reason.is_audited();
        Self {
            passed: !reason.is_drop() || would_drop,
            reason,
            would_drop,
            redirected: false,
        }
    }
}

/// The programs with private maps holding a compiled model.
pub struct Kernel {
    ebpf: Ebpf,
    pub maps: KernelMaps,
    pub compiled: Compiled,
    /// The testbed's programs that move a frame's tag into skb metadata and
    /// tail-call the enforcer, loaded on first use ([`Kernel::run_tag_in_metadata`]).
    metadata: std::cell::OnceCell<Ebpf>,
    /// The frame as the last TC run left it.
    output: std::cell::RefCell<Vec<u8>>,
}

/// Where an apply's time went: compiling over the enforced state, then writing the maps.
#[derive(Clone, Copy, Debug)]
pub struct ApplyTimes {
    pub compile: std::time::Duration,
    pub maps: std::time::Duration,
}

/// What `metadata_tag_*` (tests/testbed-ebpf) return when they could not hand a frame on.
const NOT_HANDED_ON: u32 = 0x7a67;

impl Kernel {
    /// Loads and verifies both programs and applies `model`; fails the test without root.
    pub fn load(model: &Model) -> Self {
        crate::require_root();
        let mut ebpf = enforcer::kernel::ebpf::load().expect("load the embedded eBPF object");
        for name in [TC_INGRESS, TC_EGRESS, TC_PRIMARY_INGRESS] {
            let prog: &mut SchedClassifier = ebpf
                .program_mut(name)
                .unwrap_or_else(|| panic!("program {name} in the object"))
                .try_into()
                .expect("a TC classifier");
            prog.load()
                .unwrap_or_else(|e| panic!("verifier rejected {name}: {e}"));
        }
        let xdp: &mut Xdp = ebpf
            .program_mut(XDP_INGRESS)
            .expect("the XDP program in the object")
            .try_into()
            .expect("an XDP program");
        xdp.load()
            .unwrap_or_else(|e| panic!("verifier rejected {XDP_INGRESS}: {e}"));
        let maps = KernelMaps::take(&mut ebpf).expect("typed maps");
        let compiled = compile::compile(model).expect("the model compiles");
        let mut kernel = Self {
            ebpf,
            maps,
            compiled,
            metadata: std::cell::OnceCell::new(),
            output: std::cell::RefCell::default(),
        };
        kernel.apply(model);
        kernel
    }

    /// Replaces the enforced model.
    pub fn apply(&mut self, model: &Model) -> ApplyTimes {
        let started = std::time::Instant::now();
        let enforced = self.maps.enforced().expect("read the maps");
        self.compiled = compile::compile_with(model, Some(enforced)).expect("the model compiles");
        let compiled = std::time::Instant::now();
        self.maps
            .apply(&self.compiled, &model.node)
            .expect("apply the compiled model");
        ApplyTimes {
            compile: compiled - started,
            maps: compiled.elapsed(),
        }
    }

    fn program(&self, direction: Direction) -> &SchedClassifier {
        let name = match direction {
            Direction::Ingress => TC_INGRESS,
            Direction::Egress => TC_EGRESS,
        };
        self.ebpf
            .program(name)
            .expect("program")
            .try_into()
            .expect("a TC classifier")
    }

    /// The kernel-measured time of one run of `frame` (benchmarks).
    pub fn time(&self, direction: Direction, frame: &[u8]) -> std::time::Duration {
        crate::time_run(self.program(direction), frame)
    }

    /// The kernel-measured time of one run of `frame` through the XDP program.
    pub fn time_xdp(&self, frame: &[u8]) -> std::time::Duration {
        crate::time_run(self.xdp(), frame)
    }

    fn xdp(&self) -> &Xdp {
        self.ebpf
            .program(XDP_INGRESS)
            .expect("program")
            .try_into()
            .expect("an XDP program")
    }

    /// Runs `frame` and says only whether it passed: for floods, whose reasons
    /// the caller reads from the counters' totals afterwards.
    pub fn passes(&self, direction: Direction, frame: &[u8]) -> bool {
        let mut opts = TestRunOptions::new();
        opts.data_in = Some(frame);
        match self
            .program(direction)
            .test_run(opts)
            .unwrap_or_else(|e| panic!("BPF_PROG_TEST_RUN of {direction:?} failed: {e:?}"))
            .return_value
        {
            TC_ACT_UNSPEC => true,
            TC_ACT_SHOT => false,
            other => panic!("unexpected TC verdict {other}"),
        }
    }

    /// Runs `frame` through the TC program of `direction` (ingress: arriving on
    /// the trunk, towards the pod).
    pub fn run(&self, direction: Direction, frame: &[u8]) -> Outcome {
        self.run_through(self.program(direction), direction, frame)
    }

    /// Runs `frame`, whose outer tag is inline, with that tag moved into the
    /// skb's metadata first (as the receive path puts it), through the program
    /// of `direction`: `BPF_PROG_TEST_RUN` cannot set the metadata itself, so a
    /// testbed program moves the tag and tail-calls the enforcer.
    pub fn run_tag_in_metadata(&self, direction: Direction, frame: &[u8]) -> Outcome {
        let testbed = self.metadata.get_or_init(|| self.load_metadata_programs());
        let name = match direction {
            Direction::Ingress => "metadata_tag_ingress",
            Direction::Egress => "metadata_tag_egress",
        };
        let prog: &SchedClassifier = testbed
            .program(name)
            .expect("program")
            .try_into()
            .expect("a TC classifier");
        self.run_through(prog, direction, frame)
    }

    fn load_metadata_programs(&self) -> Ebpf {
        let path = crate::staged::object("testbed-ebpf");
        let mut testbed =
            Ebpf::load_file(&path).unwrap_or_else(|e| panic!("load {}: {e}", path.display()));
        for name in ["metadata_tag_ingress", "metadata_tag_egress"] {
            let prog: &mut SchedClassifier = testbed
                .program_mut(name)
                .unwrap_or_else(|| panic!("program {name} in the testbed object"))
                .try_into()
                .expect("a TC classifier");
            prog.load()
                .unwrap_or_else(|e| panic!("verifier rejected {name}: {e}"));
        }
        let mut slots: ProgramArray<_> = testbed
            .map_mut("ENFORCER")
            .expect("map ENFORCER in the testbed object")
            .try_into()
            .expect("a program array");
        for (slot, direction) in [(0, Direction::Ingress), (1, Direction::Egress)] {
            let fd = self.program(direction).fd().expect("a loaded program");
            slots.set(slot, fd, 0).expect("fill the program array");
        }
        testbed
    }

    fn run_through(&self, prog: &SchedClassifier, direction: Direction, frame: &[u8]) -> Outcome {
        let (verdict, counted) = self.test_run(direction, frame, |opts| prog.test_run(opts));
        assert_ne!(
            verdict, NOT_HANDED_ON,
            "the tag of {frame:02x?} could not be moved into metadata"
        );
        let passed = match verdict {
            TC_ACT_UNSPEC | TC_ACT_REDIRECT => true,
            TC_ACT_SHOT => false,
            other => panic!("unexpected TC verdict {other}"),
        };
        Outcome {
            redirected: verdict == TC_ACT_REDIRECT,
            ..outcome(passed, &counted)
        }
    }

    /// The frame as the last TC run left it (translated, for a redirected one).
    pub fn last_output(&self) -> Vec<u8> {
        self.output.borrow().clone()
    }

    /// Runs `frame` arriving on the primary interface through the return
    /// path's program: its return value and the frame as it left it.
    pub fn run_primary(&self, frame: &[u8]) -> (u32, Vec<u8>) {
        let prog: &SchedClassifier = self
            .ebpf
            .program(TC_PRIMARY_INGRESS)
            .expect("program")
            .try_into()
            .expect("a TC classifier");
        let mut out = vec![0u8; frame.len() + 64];
        let mut opts = TestRunOptions::new();
        opts.data_in = Some(frame);
        opts.data_out = Some(&mut out);
        let result = prog
            .test_run(opts)
            .unwrap_or_else(|e| panic!("BPF_PROG_TEST_RUN of {TC_PRIMARY_INGRESS} failed: {e:?}"));
        out.truncate(result.data_size_out as usize);
        (result.return_value, out)
    }

    /// Runs a frame arriving on the trunk through `path`.
    pub fn run_ingress(&self, path: IngressPath, frame: &[u8]) -> Outcome {
        if path == IngressPath::Tc {
            return self.run(Direction::Ingress, frame);
        }
        let conntrack = self.maps.flows().expect("read CONNTRACK");
        let (verdict, counted) =
            self.test_run(Direction::Ingress, frame, |opts| self.xdp().test_run(opts));
        match verdict {
            XDP_DROP => {
                let outcome = outcome(false, &counted);
                assert!(!outcome.would_drop, "XDP drops no audited frame");
                outcome
            }
            XDP_PASS => {
                assert!(counted.is_empty(), "XDP counts only what it drops");
                assert_eq!(
                    self.maps.flows().expect("read CONNTRACK"),
                    conntrack,
                    "XDP's screen leaves the conntrack as it was"
                );
                let outcome = self.run(Direction::Ingress, frame);
                assert!(
                    outcome.passed || !screened(outcome.reason),
                    "XDP passed a frame TC then dropped for {:?}",
                    outcome.reason
                );
                outcome
            }
            other => panic!("unexpected XDP verdict {other}"),
        }
    }

    /// One `BPF_PROG_TEST_RUN` of `frame`: the program's return value and the
    /// counter slots it moved (reason, counted as a would-drop).
    fn test_run(
        &self,
        direction: Direction,
        frame: &[u8],
        run: impl FnOnce(
            TestRunOptions<'_>,
        ) -> Result<aya::programs::TestRunResult, aya::programs::ProgramError>,
    ) -> (u32, Vec<(Reason, bool)>) {
        let before = self.maps.counters().expect("read counters");
        let mut out = vec![0u8; frame.len() + 64];
        let mut opts = TestRunOptions::new();
        opts.data_in = Some(frame);
        opts.data_out = Some(&mut out);
        let result = run(opts).unwrap_or_else(|e| {
            panic!("BPF_PROG_TEST_RUN of {direction:?} on {frame:02x?} failed: {e:?}")
        });
        out.truncate(result.data_size_out as usize);
        *self.output.borrow_mut() = out;
        let verdict = result.return_value;
        let after = self.maps.counters().expect("read counters");
        let counted = [false, true]
            .into_iter()
            .flat_map(|would_drop| Reason::ALL.iter().map(move |&r| (r, would_drop)))
            .filter(|&(r, would_drop)| {
                let slot = counter_slot(r, would_drop) as usize;
                after[slot] > before[slot]
            })
            .collect();
        (verdict, counted)
    }
}

/// Whether XDP's screen drops every frame TC drops for `reason`: all drops but
/// those an earlier frame's effects decide (a later fragment's datagram) or that
/// come of an effect itself (tracking a flow or a datagram, translating a flow).
fn screened(reason: Reason) -> bool {
    reason.is_drop()
        && !matches!(
            reason,
            Reason::DropFragment
                | Reason::DropFlowLimit
                | Reason::DropFragmentLimit
                | Reason::DropNatExhausted
        )
}

/// The outcome of a run that `passed` or not and moved the counter slots `counted`:
/// exactly one, which agrees with the verdict.
fn outcome(passed: bool, counted: &[(Reason, bool)]) -> Outcome {
    assert_eq!(
        counted.len(),
        1,
        "one counter slot per frame, got {counted:?}"
    );
    let (reason, would_drop) = counted[0];
    assert_eq!(
        passed,
        !reason.is_drop() || would_drop,
        "verdict and reason {reason:?} (would drop: {would_drop}) disagree"
    );
    Outcome {
        passed,
        reason,
        would_drop,
        redirected: false,
    }
}
