//! How the virtual node is wired, as `ip` commands: the VPC's routes to the node's ENIs, the
//! node's VLAN links, route tables and rules per enforcing mode, the pods' default routes.

use std::fmt::{self, Write as _};
use std::net::IpAddr;

use enforcer::model::{BranchPod, EnforcingMode};

/// The next hop every pod and VLAN link routes through, resolved by a permanent neighbour
/// entry as the CNI does for pods (`169.254.1.1`); `fe80::1` for IPv6.
pub const GATEWAY_V4: &str = "169.254.1.1";
pub const GATEWAY_V6: &str = "fe80::1";

/// The VPC's ends of the node's primary ENI and of its trunk ENI.
pub const VPC_PRIMARY: &str = "primary";
pub const VPC_TRUNK: &str = "trunk";

/// Rule priorities in the node, for traffic from a standard-mode pod: the node's own
/// addresses, then the pods on the node (the main table without its default route).
const PREF_STANDARD_LOCAL: u32 = 100;
const PREF_STANDARD_ON_NODE: u32 = 101;
/// Then the VLAN tables, then the node's own addresses for everything else.
const PREF_VLAN: u32 = 110;
const PREF_LOCAL: u32 = 200;

/// A locally administered MAC address.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Mac(pub [u8; 6]);

impl Mac {
    /// A MAC of the test bed: `02:73:67` ("sg"), a role byte, then a 16-bit index.
    fn testbed(role: u8, index: u16) -> Self {
        let [hi, lo] = index.to_be_bytes();
        Self([0x02, 0x73, 0x67, role, hi, lo])
    }

    pub const NODE_PRIMARY: Self = Self([0x02, 0x73, 0x67, 1, 0, 0]);
    pub const NODE_TRUNK: Self = Self([0x02, 0x73, 0x67, 2, 0, 0]);
    pub const VPC_PRIMARY: Self = Self([0x02, 0x73, 0x67, 3, 0, 0]);
    pub const VPC_TRUNK: Self = Self([0x02, 0x73, 0x67, 4, 0, 0]);

    /// The node's `vlan.eth.N` link.
    pub fn vlan_link(vlan: u16) -> Self {
        Self::testbed(5, vlan)
    }

    /// The node's side of the veth of the pod at `index`.
    pub fn host_side(index: u16) -> Self {
        Self::testbed(6, index)
    }

    /// The `eth0` of a pod without a branch ENI (branch pods use their ENI's MAC).
    pub fn regular_pod(index: u16) -> Self {
        Self::testbed(7, index)
    }

    /// Parses `0a:1b:2c:3d:4e:01`.
    pub fn parse(text: &str) -> Option<Self> {
        let mut bytes = [0u8; 6];
        let mut parts = text.split(':');
        for byte in &mut bytes {
            *byte = u8::from_str_radix(parts.next()?, 16).ok()?;
        }
        parts.next().is_none().then_some(Self(bytes))
    }
}

impl fmt::Display for Mac {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let [a, b, c, d, e, g] = self.0;
        write!(f, "{a:02x}:{b:02x}:{c:02x}:{d:02x}:{e:02x}:{g:02x}")
    }
}

/// The node's VLAN link for `vlan`, named as the VPC CNI names it.
pub fn vlan_link(vlan: u16) -> String {
    format!("vlan.eth.{vlan}")
}

/// The route table of a VLAN link, as the VPC CNI numbers it.
pub fn vlan_table(vlan: u16) -> u32 {
    100 + u32::from(vlan)
}

/// The node's side of a pod's veth: `vlan` (strict branch pods) or `eni` (the others),
/// then a hash of the pod, as the VPC CNI names them.
pub fn host_link(prefix: &str, pod: &str) -> String {
    // FNV-1a: stable across runs and platforms.
    let hash = pod.bytes().fold(0xcbf2_9ce4_8422_2325_u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
    });
    format!("{prefix}{:011x}", hash >> 20)
}

fn prefix(addr: &IpAddr) -> String {
    match addr {
        IpAddr::V4(a) => format!("{a}/32"),
        IpAddr::V6(a) => format!("{a}/128"),
    }
}

/// IPv6 addresses are usable at once: no duplicate address detection.
fn no_dad(addr: &IpAddr) -> &'static str {
    if addr.is_ipv6() { " nodad" } else { "" }
}

fn any_of_family(v6: bool) -> &'static str {
    if v6 { "::/0" } else { "0.0.0.0/0" }
}

fn gateway(v6: bool) -> &'static str {
    if v6 { GATEWAY_V6 } else { GATEWAY_V4 }
}

/// `ip` commands: one batch, then one of IPv6 policy rules (`ip rule` takes its family
/// from the command line only).
#[derive(Default)]
pub struct Script {
    commands: String,
    rules_v6: String,
}

impl Script {
    fn line(&mut self, line: impl AsRef<str>) {
        self.commands.push_str(line.as_ref());
        self.commands.push('\n');
    }

    /// An `ip rule` command for `v6` or IPv4 traffic.
    fn rule(&mut self, v6: bool, rule: impl AsRef<str>) {
        if v6 {
            self.rules_v6.push_str(rule.as_ref());
            self.rules_v6.push('\n');
        } else {
            self.line(rule);
        }
    }

    pub fn commands(&self) -> &str {
        &self.commands
    }

    pub fn rules_v6(&self) -> &str {
        &self.rules_v6
    }

    fn permanent_neighbour(&mut self, addr: impl fmt::Display, mac: Mac, dev: &str) {
        self.line(format!(
            "neigh replace {addr} lladdr {mac} dev {dev} nud permanent"
        ));
    }
}

/// The VPC: the peers' addresses, routes to the node's primary ENI (its IPs and the
/// secondary IPs of regular pods) and to every branch ENI through the trunk.
pub fn vpc(peers: &[IpAddr], on_primary: &[IpAddr], branches: &[(IpAddr, u16)]) -> Script {
    let mut s = Script::default();
    s.line("link set lo up");
    for peer in peers {
        s.line(format!("addr add {} dev lo", prefix(peer)));
    }
    for dev in [VPC_PRIMARY, VPC_TRUNK] {
        s.line(format!("link set {dev} up"));
    }
    for addr in on_primary {
        s.line(format!("route add {} dev {VPC_PRIMARY}", prefix(addr)));
        s.permanent_neighbour(addr, Mac::NODE_PRIMARY, VPC_PRIMARY);
    }
    for (addr, vlan) in branches {
        s.line(format!("route add {} dev {VPC_TRUNK}", prefix(addr)));
        s.permanent_neighbour(addr, Mac::vlan_link(*vlan), VPC_TRUNK);
    }
    s
}

/// The node's primary ENI (`primary_interface`, with `primary_ips`), a veth to the VPC;
/// the node routes everything not on it to the VPC. The trunk is [`trunk_veth`]'s.
pub fn node(vpc_ns: &str, primary: &str, primary_ips: &[IpAddr]) -> Script {
    let mut s = Script::default();
    s.line("link set lo up");
    s.line(format!(
        "link add {primary} address {} type veth peer name {VPC_PRIMARY} address {} netns {vpc_ns}",
        Mac::NODE_PRIMARY,
        Mac::VPC_PRIMARY
    ));
    s.line(format!("link set {primary} up"));
    for v6 in [false, true] {
        let ips: Vec<_> = primary_ips.iter().filter(|a| a.is_ipv6() == v6).collect();
        for ip in &ips {
            s.line(format!(
                "addr add {} dev {primary}{}",
                prefix(ip),
                no_dad(ip)
            ));
        }
        if !ips.is_empty() {
            route_default(&mut s, v6, primary, None);
            s.permanent_neighbour(gateway(v6), Mac::VPC_PRIMARY, primary);
        }
    }
    for v6 in [false, true] {
        s.rule(v6, format!("rule add lookup local pref {PREF_LOCAL}"));
        s.rule(v6, "rule del lookup local pref 0");
    }
    s
}

/// The node's trunk ENI, a veth to the VPC.
pub fn trunk_veth(vpc_ns: &str, trunk: &str) -> Script {
    let mut s = Script::default();
    s.line(format!(
        "link add {trunk} address {} type veth peer name {VPC_TRUNK} address {} netns {vpc_ns}",
        Mac::NODE_TRUNK,
        Mac::VPC_TRUNK
    ));
    s.line(format!("link set {trunk} up"));
    s
}

fn route_default(s: &mut Script, v6: bool, dev: &str, table: Option<u32>) {
    let table = table.map(|t| format!(" table {t}")).unwrap_or_default();
    s.line(format!(
        "route add {} via {} dev {dev} onlink{table}",
        any_of_family(v6),
        gateway(v6)
    ));
}

/// A pod's namespace: its `eth0` (peer of `host_link` in the node) with its addresses and a
/// default route through the node, whose MAC a permanent neighbour entry gives.
pub fn pod(addresses: &[IpAddr], host_mac: Mac) -> Script {
    let mut s = Script::default();
    s.line("link set lo up");
    s.line("link set eth0 up");
    for v6 in [false, true] {
        let own: Vec<_> = addresses.iter().filter(|a| a.is_ipv6() == v6).collect();
        for addr in &own {
            s.line(format!(
                "addr add {} dev eth0{}",
                prefix(addr),
                no_dad(addr)
            ));
        }
        if !own.is_empty() {
            route_default(&mut s, v6, "eth0", None);
            s.permanent_neighbour(gateway(v6), host_mac, "eth0");
        }
    }
    s
}

/// The node's side of a pod: the veth (its peer `eth0` created in `pod_ns`), the
/// neighbour entries for the pod's addresses, and, for a branch pod, its VLAN link with
/// route table and rules for the pod's mode.
///
/// Like the VPC CNI: a branch pod's traffic leaves through `vlan.eth.N` (here a macvlan on
/// the trunk whose programs tag and untag) with route table `100 + N`; the node's side of
/// its veth is `vlan…` in strict mode and `eni…` in standard mode, as for a regular pod.
/// Strict mode: everything the pod sends goes to its VLAN table, even to the node's own
/// addresses (the node's `local` table comes after the pods' rules), and the node has no
/// route to the pod: node -> pod and pod -> pod go out through the VPC and come back in on
/// the trunk, as the CNI's redirects between veth and VLAN link make them on a real node.
/// Standard mode: the node routes to its pods directly; the pod's traffic to anything not
/// on the node leaves through its VLAN link.
pub fn node_side_of_pod(
    index: u16,
    pod_ns: &str,
    host: &str,
    pod_mac: Mac,
    addresses: &[IpAddr],
    branch: Option<&BranchPod>,
    trunk: &str,
) -> Script {
    let mut s = Script::default();
    let host_mac = Mac::host_side(index);
    s.line(format!(
        "link add {host} address {host_mac} type veth peer name eth0 address {pod_mac} netns {pod_ns}"
    ));
    s.line(format!("link set {host} up"));
    for addr in addresses {
        s.permanent_neighbour(addr, pod_mac, host);
    }
    let on_node = |s: &mut Script, table: Option<u32>| {
        for addr in addresses {
            let table = table.map(|t| format!(" table {t}")).unwrap_or_default();
            s.line(format!("route add {} dev {host}{table}", prefix(addr)));
        }
    };
    let Some(pod) = branch else {
        on_node(&mut s, None);
        return s;
    };
    let link = vlan_link(pod.vlan);
    let table = vlan_table(pod.vlan);
    s.line(format!(
        "link add {link} link {trunk} address {} type macvlan mode vepa",
        Mac::vlan_link(pod.vlan)
    ));
    s.line(format!("link set {link} up"));
    match pod.mode {
        // Only traffic arriving on the VLAN link reaches the pod: the node itself has no route.
        EnforcingMode::Strict => on_node(&mut s, Some(table)),
        EnforcingMode::Standard => on_node(&mut s, None),
    }
    for v6 in [false, true] {
        if !addresses.iter().any(|a| a.is_ipv6() == v6) {
            continue;
        }
        route_default(&mut s, v6, &link, Some(table));
        s.permanent_neighbour(gateway(v6), Mac::VPC_TRUNK, &link);
        match pod.mode {
            EnforcingMode::Strict => {
                s.rule(
                    v6,
                    format!("rule add iif {link} lookup {table} pref {PREF_VLAN}"),
                );
            }
            EnforcingMode::Standard => {
                s.rule(
                    v6,
                    format!("rule add iif {host} lookup local pref {PREF_STANDARD_LOCAL}"),
                );
                s.rule(
                    v6,
                    format!(
                        "rule add iif {host} lookup main suppress_prefixlength 0 pref {PREF_STANDARD_ON_NODE}"
                    ),
                );
            }
        }
        s.rule(
            v6,
            format!("rule add iif {host} lookup {table} pref {PREF_VLAN}"),
        );
    }
    s
}

/// Sysctls of every namespace: no addresses or router discovery of the kernel's own
/// (only what the wiring sets), ping sockets for the ICMP probes.
pub const COMMON_SYSCTLS: &[(&str, &str)] = &[
    ("net.ipv6.conf.default.addr_gen_mode", "1"),
    ("net.ipv6.conf.default.accept_dad", "0"),
    ("net.ipv6.conf.default.accept_ra", "0"),
    ("net.ipv6.conf.default.router_solicitations", "0"),
    ("net.ipv4.ping_group_range", "0 2147483647"),
];

/// Sysctls of the namespaces that route (VPC, node): forwarding, and no reverse-path
/// filter or redirects (the VPC sends hairpinned traffic back out on the trunk).
pub const ROUTER_SYSCTLS: &[(&str, &str)] = &[
    ("net.ipv4.ip_forward", "1"),
    ("net.ipv6.conf.all.forwarding", "1"),
    // Forwarding needs only the `all` switch; links created afterwards then do not join the
    // all-routers groups, and send no MLD reports (which the enforcer counts as spoofed).
    ("net.ipv6.conf.default.forwarding", "0"),
    ("net.ipv4.conf.all.rp_filter", "0"),
    ("net.ipv4.conf.default.rp_filter", "0"),
    ("net.ipv4.conf.all.send_redirects", "0"),
    ("net.ipv4.conf.default.send_redirects", "0"),
    // Strict mode: the node's own probes come back to it through the VPC and the trunk,
    // and the pod's replies to them must be forwarded there, not matched to the node's
    // sockets on the way in (on real nodes too: sg-semantics.md §6).
    ("net.ipv4.conf.all.accept_local", "1"),
    ("net.ipv4.tcp_early_demux", "0"),
    ("net.ipv4.udp_early_demux", "0"),
];

/// Describes the wiring of one pod for people reading the demo's output.
pub fn describe_pod(out: &mut String, label: &str, host: &str, branch: Option<&BranchPod>) {
    let _ = match branch {
        Some(pod) => writeln!(
            out,
            "  {label}: VLAN {} on {} (route table {}), veth {host}",
            pod.vlan,
            vlan_link(pod.vlan),
            vlan_table(pod.vlan),
        ),
        None => writeln!(out, "  {label}: no branch ENI, veth {host}"),
    };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_addresses() {
        assert_eq!(vlan_link(4), "vlan.eth.4");
        assert_eq!(vlan_table(4), 104);
        let name = host_link("vlan", "shop/web-6f7c9d8b5-x2x7q");
        assert!(name.starts_with("vlan") && name.len() == 15, "{name}");
        assert_ne!(name, host_link("vlan", "shop/orders-5b8d7c6f4-k9m2p"));
        assert_eq!(Mac::vlan_link(258).to_string(), "02:73:67:05:01:02");
        assert_eq!(
            Mac::parse("0a:1b:2c:3d:4e:01"),
            Some(Mac([0x0a, 0x1b, 0x2c, 0x3d, 0x4e, 0x01]))
        );
        assert_eq!(Mac::parse("0a:1b:2c"), None);
        assert_eq!(Mac::parse("0a:1b:2c:3d:4e:01:02"), None);
    }
}
