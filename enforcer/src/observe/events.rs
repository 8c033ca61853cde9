//! Live verdict events for `enforcer flows`: read from the pinned ring
//! buffer, decoded with the pinned rule table and the agent's pod names.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::Path;
use std::time::{Duration, SystemTime};

use aya::maps::{Map, MapData, MapError, RingBuf};
use enforcer_common::{
    ALLOWED_EVENTS_LEASE_NS, DIR_EGRESS, EVENT_IP, EVENT_IPV6, EVENT_POD, EVENT_WOULD_DROP, Reason,
    VerdictEvent, map_names,
};
use serde::Serialize;
use tokio::io::Interest;
use tokio::io::unix::AsyncFd;

use crate::kernel::maps::{KernelMaps, MapsError};
use crate::observe::status::AgentReport;

/// Why events cannot be read.
#[derive(Debug, thiserror::Error)]
pub enum EventsError {
    #[error("cannot open the pinned event ring buffer {path}")]
    Open {
        path: std::path::PathBuf,
        #[source]
        source: MapError,
    },
    #[error("waiting for events")]
    Poll(#[source] std::io::Error),
    #[error(transparent)]
    Maps(#[from] MapsError),
}

/// One verdict, decoded.
#[derive(Clone, Debug, Serialize)]
pub struct FlowEvent {
    /// Unix time in seconds, to the microsecond.
    pub time: f64,
    pub vlan: u16,
    /// `namespace/name`, when the VLAN has a pod the agent reported.
    pub pod: Option<String>,
    pub direction: &'static str,
    /// `allow`, `deny`, or `would drop`: an audited pod's frame the groups refused,
    /// passed (`reason` says why it would have been dropped).
    pub verdict: &'static str,
    pub reason: &'static str,
    pub protocol: Option<u8>,
    pub src: Option<IpAddr>,
    pub dst: Option<IpAddr>,
    pub src_port: Option<u16>,
    pub dst_port: Option<u16>,
    pub icmp_type: Option<u8>,
    pub icmp_code: Option<u8>,
    /// The branch rule that allowed a new flow, as `group direction #index`.
    pub rule: Option<String>,
    /// Standard mode: the node's rule that allowed it too.
    pub primary_rule: Option<String>,
    /// A source-NATed flow: its source as it left the node, `address:port`
    /// (the port is the ICMP echo identifier for a ping).
    pub translated: Option<String>,
    pub len: u32,
}

/// The pinned event stream of one pin path.
pub struct EventStream {
    ring: AsyncFd<RingBuf<MapData>>,
    maps: KernelMaps,
    report: Option<AgentReport>,
    pin_path: std::path::PathBuf,
    /// Wall clock minus the monotonic clock the kernel stamps events with.
    clock_offset: Duration,
}

impl EventStream {
    /// Opens the ring buffer and the maps pinned under `pin_path`. Needs a Tokio runtime.
    pub fn open(pin_path: &Path) -> Result<Self, EventsError> {
        let path = crate::kernel::bpffs::map_pin(pin_path, map_names::EVENTS);
        let open = |source| EventsError::Open {
            path: path.clone(),
            source,
        };
        let data = MapData::from_pin(&path).map_err(open)?;
        let ring = RingBuf::try_from(Map::from_map_data(data).map_err(open)?).map_err(open)?;
        // SAFETY: the ring buffer owns its descriptor for as long as the AsyncFd holds it.
        let ring = unsafe { AsyncFd::register_with_interest(ring, Interest::READABLE) }
            .map_err(|e| EventsError::Poll(e.into()))?;
        Ok(Self {
            ring,
            maps: KernelMaps::open_pinned(pin_path)?,
            report: AgentReport::read(pin_path),
            pin_path: pin_path.to_path_buf(),
            clock_offset: clock_offset(),
        })
    }

    /// Asks the kernel for allowed new flows too, for the next
    /// [`ALLOWED_EVENTS_LEASE_NS`]: call again before it runs out.
    pub fn lease_allowed_events(&mut self) -> Result<(), EventsError> {
        let until = monotonic().as_nanos() as u64 + ALLOWED_EVENTS_LEASE_NS;
        Ok(self.maps.set_allowed_events_until(until)?)
    }

    /// Ends the lease now: denies only.
    pub fn end_allowed_events(&mut self) -> Result<(), EventsError> {
        Ok(self.maps.set_allowed_events_until(0)?)
    }

    /// The VLAN of `namespace/name` according to the agent's report.
    pub fn vlan_of(&self, pod: &str) -> Option<u16> {
        self.report
            .as_ref()?
            .pods
            .iter()
            .find_map(|p| (format!("{}/{}", p.namespace, p.name) == pod).then_some(p.vlan))
    }

    /// Waits for the next events and decodes them.
    pub async fn next(&mut self) -> Result<Vec<FlowEvent>, EventsError> {
        loop {
            let mut guard = self.ring.readable_mut().await.map_err(EventsError::Poll)?;
            let mut raw = Vec::new();
            while let Some(item) = guard.get_inner_mut().next() {
                if item.len() >= std::mem::size_of::<VerdictEvent>() {
                    // SAFETY: the kernel wrote a whole VerdictEvent; read_unaligned copes with any alignment.
                    raw.push(unsafe {
                        std::ptr::read_unaligned(item.as_ptr().cast::<VerdictEvent>())
                    });
                }
            }
            guard.clear_ready();
            if raw.is_empty() {
                continue;
            }
            // Names may have changed since the stream opened (new pods, new rules).
            self.report = AgentReport::read(&self.pin_path);
            return raw.iter().map(|event| self.decode(event)).collect();
        }
    }

    fn decode(&self, event: &VerdictEvent) -> Result<FlowEvent, EventsError> {
        // An object newer than this binary may know more reasons.
        let reason = Reason::ALL.get(event.reason as usize).copied();
        let ip = event.flags & EVENT_IP != 0;
        let address = |bytes: [u8; 16]| {
            if event.flags & EVENT_IPV6 != 0 {
                IpAddr::V6(Ipv6Addr::from(bytes))
            } else {
                IpAddr::V4(Ipv4Addr::new(bytes[12], bytes[13], bytes[14], bytes[15]))
            }
        };
        let ports = ip && matches!(event.protocol, 6 | 17);
        let icmp = ip && matches!(event.protocol, 1 | 58);
        let rule = |key: u32| -> Result<Option<String>, EventsError> {
            if key == 0 {
                return Ok(None);
            }
            Ok(Some(match self.maps.rule_ref(key)? {
                Some(rule) => format!(
                    "{} {} #{}",
                    rule.group_id,
                    rule.direction.as_str(),
                    rule.index
                ),
                None => format!("rule {key} (replaced since)"),
            }))
        };
        let at = self.clock_offset + Duration::from_nanos(event.timestamp_ns);
        let translated = match event.nat_port {
            0 => None,
            port => Some(format!(
                "{}:{port}",
                std::net::Ipv4Addr::from(self.maps.settings()?.nat.address)
            )),
        };
        Ok(FlowEvent {
            time: at.as_secs_f64(),
            vlan: event.vlan,
            pod: (event.flags & EVENT_POD != 0)
                .then(|| self.report.as_ref()?.pod_name(event.vlan))
                .flatten(),
            direction: if usize::from(event.direction) == DIR_EGRESS {
                "egress"
            } else {
                "ingress"
            },
            verdict: match reason {
                Some(_) if event.flags & EVENT_WOULD_DROP != 0 => "would drop",
                Some(reason) if reason.is_drop() => "deny",
                Some(_) => "allow",
                None => "unknown",
            },
            reason: reason.map_or("unknown", Reason::name),
            protocol: ip.then_some(event.protocol),
            src: ip.then(|| address(event.src)),
            dst: ip.then(|| address(event.dst)),
            src_port: ports.then_some(event.src_port),
            dst_port: ports.then_some(event.dst_port),
            icmp_type: icmp.then_some(event.icmp_type),
            icmp_code: icmp.then_some(event.icmp_code),
            rule: rule(event.rule)?,
            primary_rule: rule(event.primary_rule)?,
            translated,
            len: event.len,
        })
    }
}

/// CLOCK_MONOTONIC, the clock of the kernel's `bpf_ktime_get_ns`.
pub fn monotonic() -> Duration {
    let mut now = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: writes into our timespec.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut now) };
    Duration::new(now.tv_sec as u64, now.tv_nsec as u32)
}

/// Wall-clock time at the monotonic clock's zero.
fn clock_offset() -> Duration {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default()
        .saturating_sub(monotonic())
}

impl fmt::Display for FlowEvent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let seconds = self.time as u64;
        let (h, m, s) = ((seconds / 3600) % 24, (seconds / 60) % 60, seconds % 60);
        let millis = ((self.time - seconds as f64) * 1000.0) as u64;
        write!(f, "{h:02}:{m:02}:{s:02}.{millis:03} VLAN {:>4} ", self.vlan)?;
        write!(
            f,
            "{} {:<7} ",
            self.pod.as_deref().unwrap_or("-"),
            self.direction
        )?;
        let endpoint = |addr: Option<IpAddr>, port: Option<u16>| match (addr, port) {
            (Some(IpAddr::V6(a)), Some(p)) => format!("[{a}]:{p}"),
            (Some(a), Some(p)) => format!("{a}:{p}"),
            (Some(a), None) => a.to_string(),
            (None, _) => "-".to_string(),
        };
        match self.protocol {
            Some(protocol) => {
                let name = match protocol {
                    6 => "tcp".to_string(),
                    17 => "udp".to_string(),
                    1 => "icmp".to_string(),
                    58 => "icmpv6".to_string(),
                    other => format!("proto {other}"),
                };
                write!(
                    f,
                    "{name} {} -> {}",
                    endpoint(self.src, self.src_port),
                    endpoint(self.dst, self.dst_port)
                )?;
                if let (Some(t), Some(c)) = (self.icmp_type, self.icmp_code) {
                    write!(f, " type {t} code {c}")?;
                }
            }
            None => write!(f, "non-IP")?,
        }
        write!(f, "  {} {}", self.verdict.to_uppercase(), self.reason)?;
        if let Some(rule) = &self.rule {
            write!(f, " by {rule}")?;
        }
        if let Some(rule) = &self.primary_rule {
            write!(f, " and node {rule}")?;
        }
        if let Some(translated) = &self.translated {
            write!(f, ", leaves as {translated}")?;
        }
        Ok(())
    }
}
