//! TCP checksums in the driver (RFC 793 3.1, RFC 1071), in place of
//! smoltcp's: the NIC offload a physical card would do, done once per frame
//! with eight-byte loads.
//!
//! smoltcp sums a segment two bytes at a time. On the nodes' CPU (QEMU's
//! TCG, where every load goes through a software TLB) that loop was one of
//! the largest costs per frame on both ends of a stream; this one reads a
//! frame in eight-byte words and folds at the end (RFC 1071 2.(B): the sum
//! is byte-order independent, so words are summed as they lie in memory and
//! the result is swapped once).
//!
//! [`fill_tcp`] completes an outgoing IPv4/TCP frame whose checksum field
//! smoltcp left zero (the migration NIC's `ChecksumCapabilities` hand TCP
//! checksums to the device); [`tcp_ok`] checks an incoming one before
//! smoltcp sees it. Both look only at frames that are IPv4 carrying TCP,
//! unfragmented and self-consistent in length; anything else is left alone
//! (and smoltcp parses and drops it as before). Frames are untrusted: every
//! offset is checked, nothing panics.

/// Ethernet header length; the IPv4 header follows it.
const ETH_BYTES: usize = 14;
const ETHERTYPE_IPV4: u16 = 0x0800;
const PROTOCOL_TCP: u8 = 6;
/// Offset of the checksum in the TCP header.
const TCP_CHECKSUM_AT: usize = 16;
const TCP_HEADER_MIN: usize = 20;

/// The ones' complement sum of `data` as little-endian 16-bit words
/// (a trailing odd byte padded with zero), not yet folded.
fn sum_le(data: &[u8]) -> u64 {
    // u32 halves of u64 words into a u64: no carry to track, and room for
    // 2^32 additions, far beyond any slice of a frame.
    let mut acc = 0u64;
    let (words, rest) = data.as_chunks::<8>();
    for w in words {
        let w = u64::from_le_bytes(*w);
        acc += (w & 0xffff_ffff) + (w >> 32);
    }
    let (halves, rest) = rest.as_chunks::<2>();
    for h in halves {
        acc += u64::from(u16::from_le_bytes(*h));
    }
    if let Some(&b) = rest.first() {
        acc += u64::from(b);
    }
    acc
}

/// Fold a sum of little-endian words to 16 bits (end-around carry).
fn fold(mut acc: u64) -> u16 {
    while acc > 0xffff {
        acc = (acc & 0xffff) + (acc >> 16);
    }
    acc as u16
}

/// The TCP segment of an IPv4 frame: (sum of the pseudo header, segment
/// bounds in the frame), or `None` when the frame is not one to handle.
fn tcp_segment(frame: &[u8]) -> Option<(u64, usize, usize)> {
    let ethertype = u16::from_be_bytes([*frame.get(12)?, *frame.get(13)?]);
    if ethertype != ETHERTYPE_IPV4 {
        return None;
    }
    let ip = frame.get(ETH_BYTES..)?;
    let version_ihl = *ip.first()?;
    let header_bytes = usize::from(version_ihl & 0x0f) * 4;
    if version_ihl >> 4 != 4 || header_bytes < 20 || ip.len() < header_bytes {
        return None;
    }
    let total = usize::from(u16::from_be_bytes([ip[2], ip[3]]));
    // More-fragments flag or a fragment offset: not a whole segment.
    let fragment = u16::from_be_bytes([ip[6], ip[7]]) & 0x3fff;
    if ip[9] != PROTOCOL_TCP || fragment != 0 || total > ip.len() {
        return None;
    }
    let tcp_len = total.checked_sub(header_bytes)?;
    if tcp_len < TCP_HEADER_MIN {
        return None;
    }
    // Pseudo header: source, destination, zero, protocol, TCP length.
    let mut pseudo = [0u8; 12];
    pseudo[..8].copy_from_slice(&ip[12..20]);
    pseudo[9] = PROTOCOL_TCP;
    pseudo[10..].copy_from_slice(&(tcp_len as u16).to_be_bytes());
    let start = ETH_BYTES + header_bytes;
    Some((sum_le(&pseudo), start, start + tcp_len))
}

/// Write the TCP checksum of `frame` if it is an IPv4/TCP frame; true if
/// it was one.
pub fn fill_tcp(frame: &mut [u8]) -> bool {
    let Some((pseudo, start, end)) = tcp_segment(frame) else {
        return false;
    };
    let field = start + TCP_CHECKSUM_AT;
    frame[field..field + 2].fill(0);
    let sum = fold(pseudo + sum_le(&frame[start..end]));
    // The complement of a little-endian sum, stored little-endian, is the
    // big-endian checksum (RFC 1071 2.(B)).
    frame[field..field + 2].copy_from_slice(&(!sum).to_le_bytes());
    true
}

/// Whether `frame` may go to the stack: false only for an IPv4/TCP frame
/// whose checksum is wrong.
pub fn tcp_ok(frame: &[u8]) -> bool {
    match tcp_segment(frame) {
        // The sum over a segment that includes its correct checksum is
        // all ones.
        Some((pseudo, start, end)) => fold(pseudo + sum_le(&frame[start..end])) == 0xffff,
        None => true,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use smoltcp::phy::ChecksumCapabilities;
    use smoltcp::wire::{
        EthernetAddress, EthernetFrame, EthernetProtocol, EthernetRepr, IpAddress, IpProtocol,
        Ipv4Address, Ipv4Packet, Ipv4Repr, TcpControl, TcpPacket, TcpRepr, TcpSeqNumber,
    };

    /// RFC 1071 as written: big-endian words, end-around carry each step.
    fn reference(data: &[u8]) -> u16 {
        let mut acc = 0u32;
        for pair in data.chunks(2) {
            let w = u16::from_be_bytes([pair[0], *pair.get(1).unwrap_or(&0)]);
            acc += u32::from(w);
            acc = (acc & 0xffff) + (acc >> 16);
        }
        !(acc as u16)
    }

    /// An Ethernet/IPv4/TCP frame built by smoltcp with its own checksums.
    fn frame(payload: &[u8]) -> Vec<u8> {
        let src = Ipv4Address::new(192, 168, 100, 1);
        let dst = Ipv4Address::new(192, 168, 100, 2);
        let tcp = TcpRepr {
            src_port: 49153,
            dst_port: 7200,
            control: TcpControl::Psh,
            seq_number: TcpSeqNumber(0x1234_5678),
            ack_number: Some(TcpSeqNumber(0x0bad_cafe)),
            window_len: 4096,
            window_scale: None,
            max_seg_size: None,
            sack_permitted: false,
            sack_ranges: [None; 3],
            timestamp: None,
            payload,
        };
        let ip = Ipv4Repr {
            src_addr: src,
            dst_addr: dst,
            next_header: IpProtocol::Tcp,
            payload_len: tcp.buffer_len(),
            hop_limit: 64,
        };
        let eth = EthernetRepr {
            src_addr: EthernetAddress([0x52, 0x54, 0, 0, 1, 1]),
            dst_addr: EthernetAddress([0x52, 0x54, 0, 0, 1, 2]),
            ethertype: EthernetProtocol::Ipv4,
        };
        let mut buf = vec![0u8; eth.buffer_len() + ip.buffer_len() + tcp.buffer_len()];
        let caps = ChecksumCapabilities::default();
        let mut e = EthernetFrame::new_unchecked(&mut buf[..]);
        eth.emit(&mut e);
        let mut i = Ipv4Packet::new_unchecked(e.payload_mut());
        ip.emit(&mut i, &caps);
        let mut t = TcpPacket::new_unchecked(i.payload_mut());
        tcp.emit(&mut t, &IpAddress::Ipv4(src), &IpAddress::Ipv4(dst), &caps);
        buf
    }

    fn checksum_field(f: &[u8]) -> [u8; 2] {
        [f[14 + 20 + 16], f[14 + 20 + 17]]
    }

    #[test]
    fn sums_match_rfc_1071_for_every_length_and_alignment() {
        let bytes: Vec<u8> = (0..300u32).map(|i| (i * 167 + 13) as u8).collect();
        for start in 0..8 {
            for len in 0..(bytes.len() - start) {
                let d = &bytes[start..start + len];
                assert_eq!(
                    !fold(sum_le(d)).swap_bytes(),
                    reference(d),
                    "start {start} len {len}"
                );
            }
        }
        // All ones: the largest words, many carries.
        let ff = [0xffu8; 1500];
        assert_eq!(!fold(sum_le(&ff)).swap_bytes(), reference(&ff));
    }

    #[test]
    fn filled_checksums_are_smoltcps_and_verify() {
        for len in [0usize, 1, 2, 7, 8, 9, 1459, 1460] {
            let payload: Vec<u8> = (0..len).map(|i| (i * 31 + len) as u8).collect();
            let good = frame(&payload);
            let mut f = good.clone();
            f[14 + 20 + 16..14 + 20 + 18].fill(0);
            assert!(fill_tcp(&mut f));
            assert_eq!(checksum_field(&f), checksum_field(&good), "len {len}");
            assert_eq!(f, good);
            assert!(tcp_ok(&good));
            // Any flipped bit in the segment or the addresses is caught.
            for at in [14 + 12, 14 + 19, 14 + 20, 14 + 20 + 13, good.len() - 1] {
                let mut bad = good.clone();
                bad[at] ^= 0x10;
                assert!(!tcp_ok(&bad), "len {len} byte {at}");
            }
        }
    }

    #[test]
    fn other_and_malformed_frames_are_left_alone() {
        let good = frame(b"hello");
        // Not IPv4, not TCP, fragments, short or inconsistent headers: no
        // checksum written, and passed on for smoltcp to judge.
        let mut cases = Vec::new();
        let mut arp = good.clone();
        arp[12..14].copy_from_slice(&0x0806u16.to_be_bytes());
        cases.push(arp);
        let mut udp = good.clone();
        udp[14 + 9] = 17;
        cases.push(udp);
        let mut frag = good.clone();
        frag[14 + 6] |= 0x20;
        cases.push(frag);
        let mut long = good.clone();
        long[14 + 2..14 + 4].copy_from_slice(&2000u16.to_be_bytes());
        cases.push(long);
        let mut short_tcp = good.clone();
        short_tcp[14 + 2..14 + 4].copy_from_slice(&30u16.to_be_bytes());
        cases.push(short_tcp);
        let mut ihl = good.clone();
        ihl[14] = 0x44;
        cases.push(ihl);
        let mut v6 = good.clone();
        v6[14] = 0x65;
        cases.push(v6);
        cases.push(good[..20].to_vec());
        cases.push(Vec::new());
        for mut c in cases {
            let before = c.clone();
            assert!(!fill_tcp(&mut c));
            assert_eq!(c, before);
            assert!(tcp_ok(&c));
        }
        // Every truncation of a real frame: no panic, no write past it.
        for n in 0..good.len() {
            let mut t = good[..n].to_vec();
            fill_tcp(&mut t);
            tcp_ok(&t);
        }
    }
}
