//! A tiny authoritative-looking DNS server on 127.0.0.1 (port 0) for resolver tests, so
//! that no test ever asks a real nameserver. Runs as tasks on the current glommio executor.

use std::cell::Cell;
use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::rc::Rc;

use futures_lite::{AsyncReadExt, AsyncWriteExt};
use hickory_proto::op::{Message, MessageType, ResponseCode};
use hickory_proto::rr::rdata::{A, AAAA, MX, SOA};
use hickory_proto::rr::{Name, RData, Record, RecordType};

/// TTL of every record the fake serves.
const FAKE_TTL_SECS: u32 = 300;

/// The records the fake serves and how it misbehaves.
#[derive(Debug, Default, Clone)]
pub struct Zone {
    records: HashMap<(String, RecordType), Vec<RData>>,
    servfail: HashSet<String>,
    truncate: HashSet<String>,
}

fn key(name: &str) -> String {
    name.trim_end_matches('.').to_ascii_lowercase()
}

fn fqdn(name: &str) -> Name {
    let mut name = Name::from_ascii(name).expect("test name");
    name.set_fqdn(true);
    name
}

impl Zone {
    /// MX records for `domain`; exchange "." is the root (null MX).
    pub fn mx(&mut self, domain: &str, exchanges: &[(u16, &str)]) {
        let entry = self
            .records
            .entry((key(domain), RecordType::MX))
            .or_default();
        for &(preference, exchange) in exchanges {
            let exchange = if exchange == "." {
                Name::root()
            } else {
                fqdn(exchange)
            };
            entry.push(RData::MX(MX::new(preference, exchange)));
        }
    }

    /// An A record.
    pub fn a(&mut self, host: &str, ip: &str) {
        let ip = ip.parse().expect("test IPv4");
        self.records
            .entry((key(host), RecordType::A))
            .or_default()
            .push(RData::A(A(ip)));
    }

    /// An AAAA record.
    pub fn aaaa(&mut self, host: &str, ip: &str) {
        let ip = ip.parse().expect("test IPv6");
        self.records
            .entry((key(host), RecordType::AAAA))
            .or_default()
            .push(RData::AAAA(AAAA(ip)));
    }

    /// Every query for `domain` gets SERVFAIL.
    pub fn servfail(&mut self, domain: &str) {
        self.servfail.insert(key(domain));
    }

    /// UDP queries for `domain` get an empty answer with TC set; TCP gets the records.
    pub fn truncate(&mut self, domain: &str) {
        self.truncate.insert(key(domain));
    }

    fn answer(&self, query: &[u8], over_udp: bool) -> Option<Vec<u8>> {
        let request = Message::from_vec(query).ok()?;
        let question = request.queries.first()?.clone();
        let mut response = Message::response(request.metadata.id, request.metadata.op_code);
        response.metadata.recursion_desired = request.metadata.recursion_desired;
        response.metadata.recursion_available = true;
        response.add_query(question.clone());
        let name = key(&question.name().to_ascii());
        let known = self.records.keys().any(|(owner, _)| *owner == name);
        if self.servfail.contains(&name) {
            response.metadata.response_code = ResponseCode::ServFail;
        } else if over_udp && self.truncate.contains(&name) {
            response.metadata.truncation = true;
        } else if let Some(found) = self.records.get(&(name.clone(), question.query_type())) {
            for data in found {
                response.add_answer(Record::from_rdata(
                    question.name().clone(),
                    FAKE_TTL_SECS,
                    data.clone(),
                ));
            }
        } else {
            response.metadata.response_code = if known {
                ResponseCode::NoError
            } else {
                ResponseCode::NXDomain
            };
            response.add_authority(Record::from_rdata(
                fqdn("test"),
                FAKE_TTL_SECS,
                RData::SOA(SOA::new(
                    fqdn("ns.test"),
                    fqdn("hostmaster.test"),
                    1,
                    3600,
                    600,
                    86400,
                    60,
                )),
            ));
        }
        debug_assert_eq!(response.metadata.message_type, MessageType::Response);
        response.to_vec().ok()
    }
}

/// A running fake: its address (UDP and TCP share the port) and what it was asked.
pub struct FakeDns {
    /// Where to point the resolver.
    pub addr: SocketAddr,
    /// Queries received over UDP.
    pub udp_queries: Rc<Cell<u64>>,
    /// Queries received over TCP.
    pub tcp_queries: Rc<Cell<u64>>,
}

/// A UDP socket on a port of loopback that no other socket shares. (This file stands alone:
/// the integration tests include it by path, so it cannot borrow the resolver's twin.)
fn exclusive_udp_socket() -> std::io::Result<glommio::net::UdpSocket> {
    use std::os::fd::{FromRawFd, IntoRawFd};
    let socket = std::net::UdpSocket::bind("127.0.0.1:0")?;
    // SAFETY: a bound UDP socket whose descriptor moves to glommio's socket.
    Ok(unsafe { glommio::net::UdpSocket::from_raw_fd(socket.into_raw_fd()) })
}

/// A TCP listener that fails to bind where any other socket listens.
fn exclusive_tcp_listener(addr: SocketAddr) -> std::io::Result<glommio::net::TcpListener> {
    use socket2::{Domain, Socket, Type};
    use std::os::fd::{FromRawFd, IntoRawFd};
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, None)?;
    socket.bind(&addr.into())?;
    socket.listen(128)?;
    // SAFETY: a bound, listening TCP socket whose descriptor moves to the listener.
    Ok(unsafe { glommio::net::TcpListener::from_raw_fd(socket.into_raw_fd()) })
}

/// Start serving `zone` on 127.0.0.1 (a free port) on the current executor.
pub fn spawn(zone: Zone) -> FakeDns {
    // A port free for UDP may be taken for TCP (tests running beside us open connections
    // from ephemeral ports): try a few until both bind. Neither socket sets SO_REUSEPORT,
    // which glommio's own binds do: with it, the TCP bind could join another process's
    // listener on the port (a ringmail under test, say), and the UDP bind could be handed a
    // port another fake DNS already answers on.
    let (udp, tcp, addr) = (0..64)
        .find_map(|_| {
            let udp = exclusive_udp_socket().ok()?;
            let addr = udp.local_addr().ok()?;
            let tcp = exclusive_tcp_listener(addr).ok()?;
            Some((udp, tcp, addr))
        })
        .expect("bind fake DNS on UDP and TCP");
    let zone = Rc::new(zone);
    let udp_queries = Rc::new(Cell::new(0));
    let tcp_queries = Rc::new(Cell::new(0));

    let (udp_zone, udp_count) = (zone.clone(), udp_queries.clone());
    glommio::spawn_local(async move {
        let mut buffer = vec![0u8; 4096];
        while let Ok((len, from)) = udp.recv_from(&mut buffer).await {
            udp_count.set(udp_count.get() + 1);
            if let Some(reply) = udp_zone.answer(&buffer[..len], true) {
                let _ = udp.send_to(&reply, from).await;
            }
        }
    })
    .detach();

    let tcp_count = tcp_queries.clone();
    glommio::spawn_local(async move {
        while let Ok(mut stream) = tcp.accept().await {
            tcp_count.set(tcp_count.get() + 1);
            let mut prefix = [0u8; 2];
            if stream.read_exact(&mut prefix).await.is_err() {
                continue;
            }
            let mut query = vec![0u8; usize::from(u16::from_be_bytes(prefix))];
            if stream.read_exact(&mut query).await.is_err() {
                continue;
            }
            if let Some(reply) = zone.answer(&query, false) {
                let mut framed = (reply.len() as u16).to_be_bytes().to_vec();
                framed.extend_from_slice(&reply);
                let _ = stream.write_all(&framed).await;
                let _ = stream.flush().await;
            }
        }
    })
    .detach();

    FakeDns {
        addr,
        udp_queries,
        tcp_queries,
    }
}
