//! Address prefixes, shared by the agent's settings (excluded CIDRs) and
//! the mesh's policy (ipBlocks). Pure values; imports nothing of the crate.

#![forbid(unsafe_code)]

use std::net::IpAddr;

/// A destination prefix that is never captured.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    pub addr: IpAddr,
    pub prefix_len: u8,
}

impl Cidr {
    pub fn parse(s: &str) -> Result<Cidr, String> {
        let (a, l) = match s.split_once('/') {
            Some((a, l)) => (a, Some(l)),
            None => (s, None),
        };
        let addr: IpAddr =
            a.trim().parse().map_err(|_| format!("`{s}` is not an address or CIDR (e.g. 10.0.0.0/8, fd00::/8)"))?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix_len = match l {
            Some(l) => l
                .trim()
                .parse::<u8>()
                .ok()
                .filter(|p| *p <= max)
                .ok_or_else(|| format!("`{s}`: prefix length must be 0..={max}"))?,
            None => max,
        };
        Ok(Cidr { addr, prefix_len })
    }

    /// Whether `ip` falls inside this prefix. (The kernel answers the same
    /// question with an LPM trie; this is for user space and tests.)
    pub fn contains(&self, ip: IpAddr) -> bool {
        fn masked(bytes: &[u8], len: u8) -> Vec<u8> {
            bytes
                .iter()
                .enumerate()
                .map(|(i, b)| {
                    let bits = (len as i32 - (i as i32) * 8).clamp(0, 8);
                    if bits == 0 {
                        0
                    } else {
                        b & (0xffu8 << (8 - bits))
                    }
                })
                .collect()
        }
        match (self.addr, ip) {
            (IpAddr::V4(a), IpAddr::V4(b)) => {
                masked(&a.octets(), self.prefix_len) == masked(&b.octets(), self.prefix_len)
            }
            (IpAddr::V6(a), IpAddr::V6(b)) => {
                masked(&a.octets(), self.prefix_len) == masked(&b.octets(), self.prefix_len)
            }
            (IpAddr::V4(_), IpAddr::V6(b)) => match b.to_ipv4_mapped() {
                Some(b4) => self.contains(IpAddr::V4(b4)),
                None => false,
            },
            (IpAddr::V6(_), IpAddr::V4(_)) => false,
        }
    }
}
