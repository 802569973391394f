//! Admission caps of a pod's inbound listeners: connections in total and
//! per peer address. A connection over either is closed as it arrives, so
//! one peer (or a flood of idle connections) cannot take a listener, the
//! agent's memory or its file descriptors from every other client.

#![forbid(unsafe_code)]

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};

/// The counts behind a listener's caps.
#[derive(Debug)]
pub struct Caps {
    total: usize,
    per_peer: usize,
    open: Mutex<(usize, HashMap<IpAddr, usize>)>,
}

/// One admitted connection; dropping it frees its place.
#[derive(Debug)]
pub struct Slot {
    caps: Arc<Caps>,
    peer: IpAddr,
}

impl Caps {
    /// At most `total` connections at once, `per_peer` of them from one
    /// address.
    pub fn new(total: usize, per_peer: usize) -> Arc<Caps> {
        Arc::new(Caps { total, per_peer, open: Mutex::new((0, HashMap::new())) })
    }

    /// A place for a connection from `peer`, if both caps allow it.
    pub fn admit(self: &Arc<Self>, peer: IpAddr) -> Option<Slot> {
        let mut open = self.open.lock().expect("caps lock");
        let from_peer = open.1.get(&peer).copied().unwrap_or(0);
        if open.0 >= self.total || from_peer >= self.per_peer {
            return None;
        }
        open.0 += 1;
        open.1.insert(peer, from_peer + 1);
        Some(Slot { caps: Arc::clone(self), peer })
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut open = self.caps.open.lock().expect("caps lock");
        open.0 -= 1;
        if let Some(n) = open.1.get_mut(&self.peer) {
            *n -= 1;
            if *n == 0 {
                open.1.remove(&self.peer);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_peer_gets_its_share_and_a_freed_place_is_taken_again() {
        let caps = Caps::new(3, 2);
        let (a, b): (IpAddr, IpAddr) = ("198.18.0.1".parse().unwrap(), "198.18.0.2".parse().unwrap());
        let a1 = caps.admit(a).unwrap();
        let _a2 = caps.admit(a).unwrap();
        assert!(caps.admit(a).is_none(), "over the peer's cap");
        let _b1 = caps.admit(b).unwrap();
        assert!(caps.admit(b).is_none(), "over the total");
        drop(a1);
        assert!(caps.admit(b).is_some(), "a freed place");
    }
}
