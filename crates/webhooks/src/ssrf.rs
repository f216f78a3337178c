//! Which addresses an outbound delivery may connect to. The dispatcher checks every address a
//! destination's name resolves to, at connect time (so a name that resolves to a private
//! address is caught as well as a literal one), and refuses the ones named here unless
//! `ROOKERY_WEBHOOK_ALLOW_PRIVATE` is set.
//!
//! An IPv6 address that carries an IPv4 one (mapped `::ffff:a.b.c.d`, NAT64 `64:ff9b::/96`,
//! 6to4 `2002::/16`) is judged by the IPv4 address it reaches.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// Why an address is refused: the name of the range it is in (for the delivery's error).
pub fn refused_range(ip: IpAddr) -> Option<&'static str> {
    match ip {
        IpAddr::V4(v4) => v4_range(v4),
        IpAddr::V6(v6) => v6_range(v6),
    }
}

/// Whether a delivery may connect to `ip`.
pub fn is_allowed(ip: IpAddr, allow_private: bool) -> bool {
    allow_private || refused_range(ip).is_none()
}

fn v4_range(ip: Ipv4Addr) -> Option<&'static str> {
    let [a, b, c, _] = ip.octets();
    Some(match (a, b, c) {
        (0, _, _) => "this network (0.0.0.0/8)",
        (10, _, _) => "private (10.0.0.0/8)",
        (100, 64..=127, _) => "shared address space, CGNAT (100.64.0.0/10)",
        (127, _, _) => "loopback (127.0.0.0/8)",
        (169, 254, _) => "link-local (169.254.0.0/16)",
        (172, 16..=31, _) => "private (172.16.0.0/12)",
        (192, 0, 0) => "IETF protocol assignments (192.0.0.0/24)",
        (192, 0, 2) | (198, 51, 100) | (203, 0, 113) => "documentation",
        (192, 88, 99) => "6to4 relay anycast (192.88.99.0/24)",
        (192, 168, _) => "private (192.168.0.0/16)",
        (198, 18..=19, _) => "benchmarking (198.18.0.0/15)",
        (224..=239, _, _) => "multicast (224.0.0.0/4)",
        (240..=255, _, _) => "reserved (240.0.0.0/4) or broadcast",
        _ => return None,
    })
}

fn v6_range(ip: Ipv6Addr) -> Option<&'static str> {
    let s = ip.segments();
    if let Some(v4) = ip.to_ipv4_mapped() {
        return v4_range(v4);
    }
    // The IPv4 address in two segments.
    let v4 = |hi: u16, lo: u16| Ipv4Addr::from((u32::from(hi) << 16) | u32::from(lo));
    if s[0] == 0x64 && s[1] == 0xff9b && s[2..6] == [0, 0, 0, 0] {
        return v4_range(v4(s[6], s[7]));
    }
    if s[0] == 0x2002 {
        return v4_range(v4(s[1], s[2]));
    }
    Some(match s[0] {
        _ if ip.is_unspecified() => "unspecified (::)",
        _ if ip.is_loopback() => "loopback (::1)",
        0x0064 if s[1] == 0xff9b => "NAT64 local use (64:ff9b:1::/48)",
        0x0000..=0x00ff => "reserved (::/8: IPv4-compatible and others)",
        0x0100 if s[1..4] == [0, 0, 0] => "discard (100::/64)",
        0x2001 if s[1] < 0x0200 => "IETF protocol assignments and Teredo (2001::/23)",
        0x2001 if s[1] == 0x0db8 => "documentation (2001:db8::/32)",
        0x3fff if s[1] < 0x1000 => "documentation (3fff::/20)",
        0xfc00..=0xfdff => "unique local (fc00::/7)",
        0xfe80..=0xfebf => "link-local (fe80::/10)",
        0xfec0..=0xfeff => "site-local (fec0::/10)",
        0xff00..=0xffff => "multicast (ff00::/8)",
        0x2000..=0x3fff => return None,
        _ => "not global unicast (outside 2000::/3)",
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn refused(s: &str) -> bool {
        let ip: IpAddr = s.parse().unwrap_or_else(|e| panic!("{s}: {e}"));
        !is_allowed(ip, false)
    }

    #[test]
    fn private_loopback_link_local_cgnat_multicast_and_reserved_are_refused() {
        for s in [
            "0.0.0.0",
            "10.1.2.3",
            "100.64.0.1",
            "100.127.255.254",
            "127.0.0.1",
            "127.255.0.1",
            "169.254.169.254",
            "172.16.0.1",
            "172.31.255.255",
            "192.0.0.8",
            "192.0.2.1",
            "192.88.99.1",
            "192.168.1.1",
            "198.18.0.1",
            "198.51.100.7",
            "203.0.113.9",
            "224.0.0.251",
            "239.255.255.250",
            "240.0.0.1",
            "255.255.255.255",
            "::",
            "::1",
            "::ffff:127.0.0.1",
            "::ffff:10.0.0.1",
            "::ffff:169.254.169.254",
            "::127.0.0.1",
            "64:ff9b::7f00:1",
            "64:ff9b:1::1",
            "100::1",
            "2001::1",
            "2001:db8::1",
            "2002:7f00:1::1",
            "2002:c0a8:101::1",
            "fc00::1",
            "fd12:3456::1",
            "fe80::1",
            "fec0::1",
            "ff02::1",
        ] {
            assert!(refused(s), "{s} was allowed");
        }
    }

    #[test]
    fn public_addresses_are_allowed_and_the_flag_allows_everything() {
        for s in [
            "1.1.1.1",
            "8.8.8.8",
            "100.63.255.255",
            "100.128.0.1",
            "172.15.0.1",
            "172.32.0.1",
            "192.0.1.1",
            "198.17.0.1",
            "198.20.0.1",
            "223.255.255.255",
            "::ffff:8.8.8.8",
            "64:ff9b::808:808",
            "2002:808:808::1",
            "2606:4700:4700::1111",
            "2a00:1450::1",
        ] {
            assert!(!refused(s), "{s} was refused");
        }
        assert!(is_allowed("127.0.0.1".parse().expect("ip"), true));
        assert!(is_allowed("::1".parse().expect("ip"), true));
    }

    #[test]
    fn a_refusal_names_its_range() {
        assert_eq!(
            refused_range("::ffff:127.0.0.1".parse().expect("ip")),
            Some("loopback (127.0.0.0/8)")
        );
        assert_eq!(
            refused_range("100.100.0.1".parse().expect("ip")),
            Some("shared address space, CGNAT (100.64.0.0/10)")
        );
    }
}
