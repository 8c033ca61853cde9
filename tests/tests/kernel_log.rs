//! The programs' own log statements (aya-log): at debug level every verdict
//! is logged with its direction, VLAN and reason; otherwise none is produced.

use std::sync::Mutex;

use aya::programs::SchedClassifier;
use aya_log::EbpfLogger;
use enforcer::kernel::ebpf::{TC_INGRESS, load_with_kernel_log};
use enforcer_common::Reason;
use enforcer_tests::frame::{self, Ip, L4, Tag};

/// Collects the records the logger forwards.
struct Capture(Mutex<Vec<String>>);

impl log::Log for Capture {
    fn enabled(&self, _: &log::Metadata<'_>) -> bool {
        true
    }

    fn log(&self, record: &log::Record<'_>) {
        let line = format!("{} {}", record.level(), record.args());
        self.0.lock().expect("capture lock").push(line);
    }

    fn flush(&self) {}
}

/// Runs one untagged frame through `tc_ingress` loaded at `level`; returns the records.
fn records_at(level: u8) -> Vec<String> {
    enforcer_tests::require_root();
    let capture: &'static Capture = Box::leak(Box::new(Capture(Mutex::new(Vec::new()))));
    let mut ebpf = load_with_kernel_log(level).expect("load the embedded eBPF object");
    let mut logger = EbpfLogger::init_with_logger(&mut ebpf, capture).expect("aya-log ring");
    let program: &mut SchedClassifier = ebpf
        .program_mut(TC_INGRESS)
        .expect("program")
        .try_into()
        .expect("a TC classifier");
    program.load().expect("verifier accepts the program");
    let ip = Ip {
        src: "10.0.2.30".parse().expect("address"),
        dst: "10.0.1.20".parse().expect("address"),
        l4: L4::Udp { src: 5000, dst: 53 },
    };
    enforcer_tests::time_run(program, &frame::ip_frame(Tag::Untagged, &ip));
    logger.flush();
    capture.0.lock().expect("capture lock").clone()
}

#[test]
fn verdicts_are_logged_at_debug_level() {
    let records = records_at(aya_log::Level::Debug as u8);
    let expected = format!(
        "DEBUG ingress VLAN 0: reason {}",
        Reason::PassUntagged as u32
    );
    assert_eq!(records, vec![expected]);
}

#[test]
fn nothing_is_logged_below_debug_level() {
    assert_eq!(records_at(0), Vec::<String>::new());
    assert_eq!(records_at(aya_log::Level::Info as u8), Vec::<String>::new());
}
