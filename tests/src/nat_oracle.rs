//! Standard mode's source NAT as a receiver sees it, written from the
//! standards rather than from the kernel's code: the translated frame is the
//! pod's with the source address and port (or ICMP echo identifier) replaced
//! (RFC 3022 §4.1), and every checksum that held before still holds
//! (RFC 791 header checksum, RFC 793/768 pseudo-header checksums, RFC 792).

use std::net::Ipv4Addr;

use crate::frame::checksum;

const ETH: usize = 14;

/// Where the L4 checksum of `protocol` sits, from the start of its header.
fn l4_checksum_at(protocol: u8) -> Option<usize> {
    match protocol {
        6 => Some(16),
        17 => Some(6),
        1 => Some(2),
        _ => None,
    }
}

/// Whether the IPv4 header at `l3` has a right checksum.
fn header_checksum_holds(frame: &[u8], l3: usize) -> bool {
    let len = usize::from(frame[l3] & 0x0f) * 4;
    frame.len() >= l3 + len && checksum(&frame[l3..l3 + len]) == 0
}

/// Whether the L4 checksum of the IPv4 datagram at `l3` holds over the bytes
/// its total length gives (UDP's 0: no checksum). `None` when the frame does
/// not carry the whole datagram.
fn l4_checksum_holds(frame: &[u8], l3: usize) -> Option<bool> {
    let ihl = usize::from(frame[l3] & 0x0f) * 4;
    let total = usize::from(u16::from_be_bytes([frame[l3 + 2], frame[l3 + 3]]));
    let protocol = frame[l3 + 9];
    let segment = frame.get(l3 + ihl..l3 + total)?;
    if protocol == 17 && segment.get(6..8)? == [0, 0] {
        return Some(true);
    }
    let mut summed = Vec::with_capacity(12 + segment.len());
    if protocol != 1 {
        summed.extend_from_slice(&frame[l3 + 12..l3 + 20]);
        summed.extend_from_slice(&[0, protocol]);
        summed.extend_from_slice(&(segment.len() as u16).to_be_bytes());
    }
    summed.extend_from_slice(segment);
    Some(checksum(&summed) == 0)
}

/// Whether the IPv4 frame's ICMP message is an error quoting another packet.
fn is_icmp_error(frame: &[u8], l4: usize) -> bool {
    frame[ETH + 9] == 1 && matches!(frame[l4], 3 | 4 | 11 | 12)
}

/// Checks that `out` is `seen` (an untagged IPv4 frame, as the pod sent it)
/// translated to `address:port`, with the checksums that held still holding.
/// An ICMP error the pod sends about a translated flow gets `address` as its
/// source, and its quoted packet (which travelled to the pod) `address:port` as
/// its destination.
pub fn check_source_translation(
    seen: &[u8],
    out: &[u8],
    address: Ipv4Addr,
    port: u16,
) -> Result<(), String> {
    if seen.len() != out.len() {
        return Err(format!("length {} became {}", seen.len(), out.len()));
    }
    let l4 = ETH + usize::from(seen[ETH] & 0x0f) * 4;
    let mut expected = seen.to_vec();
    expected[ETH + 12..ETH + 16].copy_from_slice(&address.octets());
    let mut ignored = vec![ETH + 10, ETH + 11];
    let (l3, protocol, address_at, port_at) = if is_icmp_error(seen, l4) {
        let quoted = l4 + 8;
        let quoted_l4 = quoted + usize::from(seen[quoted] & 0x0f) * 4;
        let protocol = seen[quoted + 9];
        ignored.extend([l4 + 2, l4 + 3, quoted + 10, quoted + 11]);
        let port_at = if protocol == 1 {
            quoted_l4 + 4
        } else {
            quoted_l4 + 2
        };
        (quoted, protocol, Some(quoted + 16), port_at)
    } else {
        let protocol = seen[ETH + 9];
        (ETH, protocol, None, if protocol == 1 { l4 + 4 } else { l4 })
    };
    if let Some(at) = address_at {
        expected[at..at + 4].copy_from_slice(&address.octets());
    }
    expected[port_at..port_at + 2].copy_from_slice(&port.to_be_bytes());
    let transport = l3 + usize::from(seen[l3] & 0x0f) * 4;
    if let Some(at) = l4_checksum_at(protocol) {
        ignored.extend([transport + at, transport + at + 1]);
    }
    for (i, (want, got)) in expected.iter().zip(out).enumerate() {
        if want != got && !ignored.contains(&i) {
            return Err(format!("byte {i}: {got:#04x}, not {want:#04x}"));
        }
    }
    if header_checksum_holds(seen, ETH) && !header_checksum_holds(out, ETH) {
        return Err("the IPv4 header checksum no longer holds".into());
    }
    if l4_checksum_holds(seen, ETH) == Some(true) && l4_checksum_holds(out, ETH) != Some(true) {
        return Err("the transport checksum no longer holds".into());
    }
    if l3 != ETH && header_checksum_holds(seen, l3) && !header_checksum_holds(out, l3) {
        return Err("the quoted IPv4 header checksum no longer holds".into());
    }
    Ok(())
}

/// Sets the transport checksum of the untagged IPv4 frame's datagram (and of
/// the datagram an ICMP error quotes whole), as a sending host computes it.
pub fn sealed(mut frame: Vec<u8>) -> Vec<u8> {
    let l4 = ETH + usize::from(frame[ETH] & 0x0f) * 4;
    if is_icmp_error(&frame, l4) {
        let quoted = l4 + 8;
        let mut inner = frame.split_off(quoted);
        inner = set_transport_checksum(inner, 0);
        frame.extend(inner);
    }
    set_transport_checksum(frame, ETH)
}

/// Sets the transport checksum of the IPv4 datagram at `l3` when the frame holds it whole.
fn set_transport_checksum(mut frame: Vec<u8>, l3: usize) -> Vec<u8> {
    let protocol = frame[l3 + 9];
    let Some(at) = l4_checksum_at(protocol) else {
        return frame;
    };
    let l4 = l3 + usize::from(frame[l3] & 0x0f) * 4;
    let end = l3 + usize::from(u16::from_be_bytes([frame[l3 + 2], frame[l3 + 3]]));
    if frame.len() < end || end < l4 + at + 2 {
        return frame;
    }
    frame[l4 + at..l4 + at + 2].copy_from_slice(&[0, 0]);
    let segment = &frame[l4..end];
    let mut summed = Vec::new();
    if protocol != 1 {
        summed.extend_from_slice(&frame[l3 + 12..l3 + 20]);
        summed.extend_from_slice(&[0, protocol]);
        summed.extend_from_slice(&(segment.len() as u16).to_be_bytes());
    }
    summed.extend_from_slice(segment);
    let sum = match checksum(&summed) {
        0 if protocol == 17 => 0xffff,
        sum => sum,
    };
    frame[l4 + at..l4 + at + 2].copy_from_slice(&sum.to_be_bytes());
    frame
}
