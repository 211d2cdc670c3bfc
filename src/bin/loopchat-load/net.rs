//! Where the load goes and from where: the `ws://` target (refused unless it
//! is a loopback address), the rotation over source addresses 127.0.0.2,
//! 127.0.0.3, …, the non-blocking bind-then-connect done with libc (mio has
//! no way to bind a client socket before connecting), and raising the tool's
//! own open-file limit. Nothing here reads or writes WebSocket bytes.

use std::fmt;
use std::io;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::os::fd::{AsRawFd, FromRawFd, IntoRawFd, OwnedFd};

/// What `--url` points at, already checked to be on this machine.
#[derive(Clone, Debug)]
pub struct Target {
    pub addr: SocketAddr,
    /// The `Host` header value, as written in the URL.
    pub host: String,
    pub path: String,
    /// The URL's own query, without `?`; the tool appends its parameters.
    pub query: String,
}

#[derive(Debug, PartialEq, Eq)]
pub enum TargetError {
    NotWs,
    BadHostPort(String),
    /// Load traffic only ever goes to loopback (127.0.0.0/8 or ::1).
    NotLoopback(String),
}

impl fmt::Display for TargetError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TargetError::NotWs => f.write_str("--url must start with ws:// (no TLS)"),
            TargetError::BadHostPort(h) => write!(f, "--url: bad host or port {h:?}"),
            TargetError::NotLoopback(h) => {
                write!(
                    f,
                    "--url: {h} is not a loopback address (127.0.0.0/8, ::1, localhost)"
                )
            }
        }
    }
}

impl Target {
    pub fn parse(url: &str) -> Result<Target, TargetError> {
        let rest = url.strip_prefix("ws://").ok_or(TargetError::NotWs)?;
        let (authority, path_query) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, "/"),
        };
        let (path, query) = match path_query.split_once('?') {
            Some((p, q)) => (p.to_string(), q.to_string()),
            None => (path_query.to_string(), String::new()),
        };
        let bad = || TargetError::BadHostPort(authority.to_string());
        let (host, port) = if let Some(v6) = authority.strip_prefix('[') {
            let (h, after) = v6.split_once(']').ok_or_else(bad)?;
            (h, after.strip_prefix(':'))
        } else {
            match authority.rsplit_once(':') {
                Some((h, p)) => (h, Some(p)),
                None => (authority, None),
            }
        };
        let port: u16 = match port {
            Some(p) => p.parse().map_err(|_| bad())?,
            None => 80,
        };
        // Names are not resolved: a resolver could point anywhere.
        let ip: IpAddr = if host.eq_ignore_ascii_case("localhost") {
            IpAddr::V4(Ipv4Addr::LOCALHOST)
        } else {
            host.parse()
                .map_err(|_| TargetError::NotLoopback(host.to_string()))?
        };
        if !ip.is_loopback() {
            return Err(TargetError::NotLoopback(host.to_string()));
        }
        Ok(Target {
            addr: SocketAddr::new(ip, port),
            host: authority.to_string(),
            path,
            query,
        })
    }

    /// The request target for one session: the URL's path and query plus ours.
    pub fn request_target(&self, params: &str) -> String {
        if self.query.is_empty() {
            format!("{}?{params}", self.path)
        } else {
            format!("{}?{}&{params}", self.path, self.query)
        }
    }

    /// The same server's plain-HTTP address, for `GET /stats`.
    pub fn http_host(&self) -> &str {
        &self.host
    }
}

/// Round-robin over the source addresses 127.0.0.2 … 127.0.0.(1+n).
///
/// One source address gives at most one ephemeral port range (~28 k ports)
/// towards one server address, and ports in TIME_WAIT stay taken for a
/// minute; every extra address is another full range.
pub struct SourceAddrs {
    count: u32,
    next: u32,
}

impl SourceAddrs {
    /// `count` 0 lets the kernel choose (no bind); also used for IPv6
    /// targets, as only 127.0.0.0/8 offers spare loopback addresses.
    pub fn new(count: u32, target: &Target, offset: u32) -> SourceAddrs {
        let count = if target.addr.is_ipv4() { count } else { 0 };
        SourceAddrs {
            count,
            next: if count == 0 { 0 } else { offset % count },
        }
    }

    pub fn next_addr(&mut self) -> Option<Ipv4Addr> {
        if self.count == 0 {
            return None;
        }
        let i = self.next;
        self.next = (self.next + 1) % self.count;
        let host = 2 + i; // 127.0.0.1 is usually the server's own address
        Some(Ipv4Addr::new(
            127,
            (host >> 16) as u8,
            (host >> 8) as u8,
            host as u8,
        ))
    }
}

/// Starts a non-blocking connect to `dst` from `src` (port chosen by the
/// kernel). Returns at once: completion shows up as the socket becoming
/// writable, with the outcome in `SO_ERROR` (`TcpStream::take_error`).
pub fn connect_from(src: Option<Ipv4Addr>, dst: SocketAddr) -> io::Result<mio::net::TcpStream> {
    let domain = if dst.is_ipv4() {
        libc::AF_INET
    } else {
        libc::AF_INET6
    };
    // SAFETY: plain syscall; the result is checked before use.
    let fd = unsafe {
        libc::socket(
            domain,
            libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            0,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` is a fresh socket that nothing else owns; OwnedFd closes
    // it on every early return below.
    let socket = unsafe { OwnedFd::from_raw_fd(fd) };
    set_int_opt(&socket, libc::IPPROTO_TCP, libc::TCP_NODELAY, 1)?;
    if let Some(src) = src {
        // Without this, bind() picks the port before knowing the destination,
        // so each source address would give one port per socket in total
        // rather than per destination; the kernel then defers it to connect().
        // Best effort: older kernels lack it and binding still works.
        let _ = set_int_opt(&socket, libc::IPPROTO_IP, libc::IP_BIND_ADDRESS_NO_PORT, 1);
        let sa = sockaddr_v4(SocketAddr::new(IpAddr::V4(src), 0));
        // SAFETY: `sa` is a valid sockaddr_in of the size passed.
        let rc = unsafe {
            libc::bind(
                socket.as_raw_fd(),
                &sa as *const _ as *const libc::sockaddr,
                size_of_val(&sa) as libc::socklen_t,
            )
        };
        if rc < 0 {
            return Err(io::Error::last_os_error());
        }
    }
    let rc = match dst {
        SocketAddr::V4(_) => {
            let sa = sockaddr_v4(dst);
            // SAFETY: as for bind.
            unsafe {
                libc::connect(
                    socket.as_raw_fd(),
                    &sa as *const _ as *const libc::sockaddr,
                    size_of_val(&sa) as libc::socklen_t,
                )
            }
        }
        SocketAddr::V6(v6) => {
            // SAFETY: all-zero is a valid sockaddr_in6; fields are set below.
            let mut sa: libc::sockaddr_in6 = unsafe { std::mem::zeroed() };
            sa.sin6_family = libc::AF_INET6 as libc::sa_family_t;
            sa.sin6_port = v6.port().to_be();
            sa.sin6_addr.s6_addr = v6.ip().octets();
            // SAFETY: as for bind.
            unsafe {
                libc::connect(
                    socket.as_raw_fd(),
                    &sa as *const _ as *const libc::sockaddr,
                    size_of_val(&sa) as libc::socklen_t,
                )
            }
        }
    };
    if rc < 0 {
        let err = io::Error::last_os_error();
        // EINPROGRESS is the normal answer of a non-blocking connect.
        if err.raw_os_error() != Some(libc::EINPROGRESS) {
            return Err(err);
        }
    }
    // SAFETY: ownership of the connected (or connecting) socket moves to mio.
    Ok(unsafe { mio::net::TcpStream::from_raw_fd(socket.into_raw_fd()) })
}

fn sockaddr_v4(addr: SocketAddr) -> libc::sockaddr_in {
    let ip = match addr.ip() {
        IpAddr::V4(ip) => ip,
        IpAddr::V6(_) => Ipv4Addr::UNSPECIFIED,
    };
    // SAFETY: all-zero is a valid sockaddr_in; fields are set below.
    let mut sa: libc::sockaddr_in = unsafe { std::mem::zeroed() };
    sa.sin_family = libc::AF_INET as libc::sa_family_t;
    sa.sin_port = addr.port().to_be();
    sa.sin_addr.s_addr = u32::from(ip).to_be();
    sa
}

fn set_int_opt(
    fd: &OwnedFd,
    level: libc::c_int,
    name: libc::c_int,
    value: libc::c_int,
) -> io::Result<()> {
    // SAFETY: `value` outlives the call and its size is passed.
    let rc = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            level,
            name,
            &value as *const _ as *const libc::c_void,
            size_of_val(&value) as libc::socklen_t,
        )
    };
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// Raises the soft open-file limit to the hard one and returns the new soft
/// limit: every connection is a descriptor, and the usual soft default of
/// 1024 would cap a run long before the machine does.
pub fn raise_nofile_limit() -> io::Result<u64> {
    // SAFETY: getrlimit/setrlimit with a valid pointer to a local struct.
    unsafe {
        let mut lim = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) != 0 {
            return Err(io::Error::last_os_error());
        }
        if lim.rlim_cur < lim.rlim_max {
            lim.rlim_cur = lim.rlim_max;
            if libc::setrlimit(libc::RLIMIT_NOFILE, &lim) != 0 {
                return Err(io::Error::last_os_error());
            }
        }
        Ok(lim.rlim_cur)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_only_loopback_targets() {
        let t = Target::parse("ws://127.0.0.1:8080/ws").unwrap();
        assert_eq!(t.addr, "127.0.0.1:8080".parse().unwrap());
        assert_eq!(t.request_target("username=a"), "/ws?username=a");
        let t = Target::parse("ws://[::1]:9/ws?token=x").unwrap();
        assert_eq!(t.request_target("username=a"), "/ws?token=x&username=a");
        assert_eq!(Target::parse("ws://localhost").unwrap().addr.port(), 80);
        assert!(Target::parse("ws://127.9.9.9:1/").is_ok());
        for bad in [
            "ws://10.0.0.1:80/ws",
            "ws://example.com/ws",
            "ws://[2001:db8::1]:80/",
        ] {
            assert!(
                matches!(Target::parse(bad), Err(TargetError::NotLoopback(_))),
                "{bad}"
            );
        }
        assert_eq!(
            Target::parse("wss://127.0.0.1/").unwrap_err(),
            TargetError::NotWs
        );
        assert!(matches!(
            Target::parse("ws://127.0.0.1:x/"),
            Err(TargetError::BadHostPort(_))
        ));
    }

    #[test]
    fn source_addresses_rotate_from_127_0_0_2() {
        let t = Target::parse("ws://127.0.0.1:1/").unwrap();
        let mut s = SourceAddrs::new(2, &t, 0);
        let got: Vec<_> = (0..3).map(|_| s.next_addr().unwrap().to_string()).collect();
        assert_eq!(got, ["127.0.0.2", "127.0.0.3", "127.0.0.2"]);
        assert_eq!(SourceAddrs::new(0, &t, 0).next_addr(), None);
        let mut wide = SourceAddrs::new(300, &t, 299);
        assert_eq!(wide.next_addr(), Some(Ipv4Addr::new(127, 0, 1, 45)));
    }
}
