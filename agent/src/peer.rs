//! Who is on the other end of a loopback TCP connection, so that the local
//! database tunnel serves only the OS user who started it (its certificate
//! is that user's grant; another user on the machine must not ride it).
//!
//! Linux: one exact lookup of the client's socket through the kernel's
//! `sock_diag` netlink interface (what `ss` uses), which names the socket's
//! owner (UID) in microseconds. (`/proc/net/tcp` says the same but costs
//! milliseconds per read: it walks the whole connection hash table.)
//! Elsewhere nothing can be said and the caller allows the connection.

use std::net::SocketAddr;

/// What is known about the process at the other end of a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Peer {
    /// Its socket belongs to this UID.
    Uid(u32),
    /// The kernel does not know the connection (it is gone).
    Unlisted,
    /// No way to ask here: nothing can be said.
    Unknown,
}

/// The UID this process runs as, where [`peer_of`] can compare with it.
pub fn my_uid() -> Option<u32> {
    #[cfg(target_os = "linux")]
    {
        Some(os_uid())
    }
    #[cfg(not(target_os = "linux"))]
    {
        None
    }
}

/// The UID this process runs as (a Unix socket's peer is compared with it
/// on every Unix system).
#[cfg(unix)]
pub fn os_uid() -> u32 {
    rustix::process::getuid().as_raw()
}

/// The owner of the client socket of the accepted connection `peer` →
/// `local`.
pub fn peer_of(peer: SocketAddr, local: SocketAddr) -> Peer {
    #[cfg(target_os = "linux")]
    {
        diag::lookup(peer, local)
    }
    #[cfg(not(target_os = "linux"))]
    {
        let _ = (peer, local);
        Peer::Unknown
    }
}

#[cfg(any(target_os = "linux", test))]
mod wire {
    use super::Peer;
    use std::net::{IpAddr, SocketAddr};

    const SOCK_DIAG_BY_FAMILY: u16 = 20;
    const NLM_F_REQUEST: u16 = 1;
    const NLMSG_ERROR: u16 = 2;
    const IPPROTO_TCP: u8 = 6;
    const AF_INET: u8 = 2;
    const AF_INET6: u8 = 10;
    /// nlmsghdr (16) + inet_diag_msg's family (1): where the TCP state is.
    const STATE_AT: usize = 16 + 1;
    /// nlmsghdr (16) + inet_diag_msg's family..retrans (4) + sockid (48) +
    /// expires, rqueue, wqueue (12): where the UID is; the inode follows.
    const UID_AT: usize = 16 + 4 + 48 + 12;
    const INODE_AT: usize = UID_AT + 4;
    /// The states of a client socket its process still holds: open, or
    /// closed for sending only (`shutdown`). A closed socket the kernel
    /// finishes alone (TIME_WAIT, or FIN_WAIT2 once orphaned) belongs to no
    /// process and reports UID 0 — root's — so it must never count.
    const TCP_ESTABLISHED: u8 = 1;
    const TCP_FIN_WAIT1: u8 = 4;
    const TCP_FIN_WAIT2: u8 = 5;
    const HELD_STATES: u32 = 1 << TCP_ESTABLISHED | 1 << TCP_FIN_WAIT1 | 1 << TCP_FIN_WAIT2;

    fn addr_words(ip: IpAddr) -> [u8; 16] {
        let mut out = [0u8; 16];
        match ip {
            IpAddr::V4(v4) => out[..4].copy_from_slice(&v4.octets()),
            IpAddr::V6(v6) => out.copy_from_slice(&v6.octets()),
        }
        out
    }

    /// A `SOCK_DIAG_BY_FAMILY` request for the one TCP socket whose local
    /// address is `src` and remote address `dst`.
    pub fn request(src: SocketAddr, dst: SocketAddr) -> Vec<u8> {
        let mut m = Vec::with_capacity(72);
        m.extend_from_slice(&72u32.to_ne_bytes());
        m.extend_from_slice(&SOCK_DIAG_BY_FAMILY.to_ne_bytes());
        m.extend_from_slice(&NLM_F_REQUEST.to_ne_bytes());
        m.extend_from_slice(&1u32.to_ne_bytes()); // seq
        m.extend_from_slice(&0u32.to_ne_bytes()); // pid: the kernel fills it
        m.push(if src.is_ipv4() { AF_INET } else { AF_INET6 });
        m.push(IPPROTO_TCP);
        m.push(0); // no extensions
        m.push(0);
        m.extend_from_slice(&HELD_STATES.to_ne_bytes());
        m.extend_from_slice(&src.port().to_be_bytes());
        m.extend_from_slice(&dst.port().to_be_bytes());
        m.extend_from_slice(&addr_words(src.ip()));
        m.extend_from_slice(&addr_words(dst.ip()));
        m.extend_from_slice(&0u32.to_ne_bytes()); // any interface
        m.extend_from_slice(&[0xff; 8]); // INET_DIAG_NOCOOKIE
        m
    }

    /// The kernel's answer: the socket's owner, or that it has none (it is
    /// not in a state a process holds, or is no process's file: inode 0).
    pub fn answer(buf: &[u8]) -> Peer {
        let u16_at = |i: usize| buf.get(i..i + 2).map(|b| u16::from_ne_bytes([b[0], b[1]]));
        let u32_at = |i: usize| {
            buf.get(i..i + 4)
                .map(|b| u32::from_ne_bytes([b[0], b[1], b[2], b[3]]))
        };
        match u16_at(4) {
            Some(SOCK_DIAG_BY_FAMILY) => {
                let (Some(state), Some(uid), Some(inode)) =
                    (buf.get(STATE_AT), u32_at(UID_AT), u32_at(INODE_AT))
                else {
                    return Peer::Unknown;
                };
                let held = *state < 32 && HELD_STATES & (1 << state) != 0;
                match held && inode != 0 {
                    true => Peer::Uid(uid),
                    false => Peer::Unlisted,
                }
            }
            Some(NLMSG_ERROR) => Peer::Unlisted,
            _ => Peer::Unknown,
        }
    }
}

#[cfg(target_os = "linux")]
mod diag {
    use super::{wire, Peer};
    use rustix::net::{
        netlink, recv, send, socket, AddressFamily, RecvFlags, SendFlags, SocketType,
    };
    use std::net::SocketAddr;

    pub fn lookup(peer: SocketAddr, local: SocketAddr) -> Peer {
        let Ok(fd) = socket(
            AddressFamily::NETLINK,
            SocketType::DGRAM,
            Some(netlink::SOCK_DIAG),
        ) else {
            return Peer::Unknown;
        };
        if send(&fd, &wire::request(peer, local), SendFlags::empty()).is_err() {
            return Peer::Unknown;
        }
        let mut buf = [0u8; 512];
        match recv(&fd, &mut buf, RecvFlags::empty()) {
            Ok((n, _)) => wire::answer(&buf[..n.min(buf.len())]),
            Err(_) => Peer::Unknown,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_request_names_the_socket_and_the_answer_its_owner() {
        let src: SocketAddr = "127.0.0.1:51234".parse().unwrap();
        let dst: SocketAddr = "127.0.0.1:40000".parse().unwrap();
        let r = wire::request(src, dst);
        assert_eq!(r.len(), 72);
        assert_eq!(&r[24..26], &51234u16.to_be_bytes());
        assert_eq!(&r[26..28], &40000u16.to_be_bytes());
        assert_eq!(&r[28..32], &[127, 0, 0, 1]);
        assert_eq!(&r[44..48], &[127, 0, 0, 1]);
        assert_eq!(&r[20..24], &(1u32 << 1 | 1 << 4 | 1 << 5).to_ne_bytes());
        // An answer: type SOCK_DIAG_BY_FAMILY, established, UID 1001 and
        // an inode at their places.
        let mut a = vec![0u8; 16 + 72];
        a[4..6].copy_from_slice(&20u16.to_ne_bytes());
        a[17] = 1;
        a[80..84].copy_from_slice(&1001u32.to_ne_bytes());
        a[84..88].copy_from_slice(&4242u32.to_ne_bytes());
        assert_eq!(wire::answer(&a), Peer::Uid(1001));
        // A socket closed by its process reports UID 0 (root): TIME_WAIT,
        // or held by no file (inode 0). Neither names an owner.
        let mut closed = a.clone();
        closed[17] = 6;
        closed[80..84].copy_from_slice(&0u32.to_ne_bytes());
        assert_eq!(wire::answer(&closed), Peer::Unlisted);
        let mut orphan = a.clone();
        orphan[17] = 5;
        orphan[80..84].copy_from_slice(&0u32.to_ne_bytes());
        orphan[84..88].copy_from_slice(&0u32.to_ne_bytes());
        assert_eq!(wire::answer(&orphan), Peer::Unlisted);
        assert_eq!(wire::answer(&a[..86]), Peer::Unknown);
        a[4..6].copy_from_slice(&2u16.to_ne_bytes());
        assert_eq!(wire::answer(&a), Peer::Unlisted);
        assert_eq!(wire::answer(&a[..3]), Peer::Unknown);
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn the_kernel_names_the_owner_of_a_loopback_client() {
        let me = my_uid().unwrap();
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let c = std::net::TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (s, peer) = l.accept().unwrap();
        assert_eq!(peer, c.local_addr().unwrap());
        let local = s.local_addr().unwrap();
        assert_eq!(peer_of(peer, local), Peer::Uid(me));
        // Closed by the client before the lookup (the bytes it sent wait
        // in the server's queue): its socket is the kernel's now, reported
        // as UID 0, and must not pass for root's.
        drop(c);
        assert_eq!(peer_of(peer, local), Peer::Unlisted);
        drop(s);
        // A connection that never existed.
        let nowhere: SocketAddr = "127.0.0.1:1".parse().unwrap();
        assert_eq!(peer_of(nowhere, local), Peer::Unlisted);
    }
}
