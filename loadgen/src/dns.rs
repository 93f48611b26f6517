//! `loadgen dns`: a tiny authoritative DNS server for test domains, on UDP and TCP.
//!
//! `answer` is pure (query bytes in, response bytes out) and built on hickory-proto; the
//! server loop only moves datagrams and length-prefixed TCP messages.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, SocketAddr};
use std::os::fd::{FromRawFd, IntoRawFd};
use std::rc::Rc;
use std::time::Duration;

use futures_lite::{AsyncReadExt, AsyncWriteExt};
use glommio::net::{TcpListener, TcpStream, UdpSocket};
use hickory_proto::op::{Message, MessageType, OpCode, ResponseCode};
use hickory_proto::rr::rdata::{A, AAAA, MX};
use hickory_proto::rr::{Name, RData, Record, RecordType};

/// TTL of every answer: short, so tests that change the zone see it soon.
pub const TTL_SECS: u32 = 60;

/// Largest UDP response without EDNS (RFC 1035 §4.2.1).
const MAX_UDP_RESPONSE_BYTES: usize = 512;

/// A TCP client that sends nothing for this long is dropped.
const TCP_IDLE_TIMEOUT: Duration = Duration::from_secs(10);

/// Most names accepted per option, to bound the zone.
const MAX_ZONE_ENTRIES: usize = 10_000;

/// The test zone: what each domain answers. Names are lowercase without a trailing dot.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Zone {
    /// MX targets per domain, in preference order (mx1.DOMAIN = 10, mx2.DOMAIN = 20...).
    pub mx: BTreeMap<String, Vec<String>>,
    /// Addresses per host name (the MX hosts and `--a` names).
    pub hosts: BTreeMap<String, Vec<IpAddr>>,
    /// Domains with a null MX (RFC 7505: "0 .").
    pub null_mx: BTreeSet<String>,
    /// Domains answered SERVFAIL.
    pub servfail: BTreeSet<String>,
    /// Domains whose UDP answers are truncated.
    pub truncate: BTreeSet<String>,
}

/// Lowercases a domain and drops a trailing dot.
fn normalise(domain: &str) -> String {
    domain.trim_end_matches('.').to_ascii_lowercase()
}

/// Splits `DOMAIN=IP[,IP]` into the domain and its addresses.
fn parse_domain_ips(option: &str, text: &str) -> Result<(String, Vec<IpAddr>), String> {
    let (domain, ips) = text
        .split_once('=')
        .ok_or_else(|| format!("{option} {text}: expected DOMAIN=IP[,IP]"))?;
    let domain = normalise(domain);
    Name::from_ascii(&domain).map_err(|e| format!("{option} {text}: bad domain: {e}"))?;
    if domain.is_empty() {
        return Err(format!("{option} {text}: empty domain"));
    }
    let ips = ips
        .split(',')
        .map(|ip| {
            ip.trim()
                .parse::<IpAddr>()
                .map_err(|e| format!("{option} {text}: bad IP '{ip}': {e}"))
        })
        .collect::<Result<Vec<_>, _>>()?;
    Ok((domain, ips))
}

/// Checks a bare domain option.
fn parse_domain(option: &str, text: &str) -> Result<String, String> {
    let domain = normalise(text);
    if domain.is_empty() {
        return Err(format!("{option}: empty domain"));
    }
    Name::from_ascii(&domain).map_err(|e| format!("{option} {text}: bad domain: {e}"))?;
    Ok(domain)
}

impl Zone {
    /// Builds the zone from the command-line options.
    pub fn from_args(
        mx: &[String],
        null_mx: &[String],
        a: &[String],
        servfail: &[String],
        truncate: &[String],
    ) -> Result<Zone, String> {
        let total = mx.len() + null_mx.len() + a.len() + servfail.len() + truncate.len();
        if total > MAX_ZONE_ENTRIES {
            return Err(format!("at most {MAX_ZONE_ENTRIES} zone options"));
        }
        let mut zone = Zone::default();
        for text in mx {
            let (domain, ips) = parse_domain_ips("--mx", text)?;
            let mut targets = Vec::new();
            for (index, ip) in ips.into_iter().enumerate() {
                let host = format!("mx{}.{domain}", index + 1);
                zone.hosts.entry(host.clone()).or_default().push(ip);
                targets.push(host);
            }
            zone.mx.insert(domain, targets);
        }
        for text in a {
            let (domain, ips) = parse_domain_ips("--a", text)?;
            zone.hosts.entry(domain).or_default().extend(ips);
        }
        for text in null_mx {
            zone.null_mx.insert(parse_domain("--null-mx", text)?);
        }
        for text in servfail {
            zone.servfail.insert(parse_domain("--servfail", text)?);
        }
        for text in truncate {
            zone.truncate.insert(parse_domain("--truncate", text)?);
        }
        Ok(zone)
    }

    /// Whether the zone knows `domain` at all (NODATA rather than NXDOMAIN).
    fn knows(&self, domain: &str) -> bool {
        self.mx.contains_key(domain)
            || self.hosts.contains_key(domain)
            || self.null_mx.contains(domain)
            || self.truncate.contains(domain)
    }
}

/// Which transport a query came over (truncation applies to UDP only).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    /// Datagram: answers for `--truncate` domains get TC and no records.
    Udp,
    /// Stream: always the full answer.
    Tcp,
}

/// Answers one query message. Returns `None` for input that is not a query we can parse
/// (dropped, as authoritative servers do with garbage).
pub fn answer(zone: &Zone, query: &[u8], transport: Transport) -> Option<Vec<u8>> {
    let request = Message::from_vec(query).ok()?;
    if request.metadata.message_type != MessageType::Query {
        return None;
    }
    let mut response = Message::response(request.metadata.id, request.metadata.op_code);
    response.metadata.recursion_desired = request.metadata.recursion_desired;
    response.metadata.authoritative = true;
    if request.metadata.op_code != OpCode::Query || request.queries.len() != 1 {
        response.metadata.response_code = ResponseCode::NotImp;
        response.add_queries(request.queries.iter().cloned());
        return response.to_vec().ok();
    }
    let question = request.queries[0].clone();
    let name = question.name().clone();
    let domain = normalise(&name.to_ascii());
    response.add_query(question.clone());
    if zone.servfail.contains(&domain) {
        response.metadata.authoritative = false;
        response.metadata.response_code = ResponseCode::ServFail;
        return response.to_vec().ok();
    }
    if !zone.knows(&domain) {
        response.metadata.response_code = ResponseCode::NXDomain;
        return response.to_vec().ok();
    }
    let record_type = question.query_type();
    let addresses = |host: &str, wanted: RecordType| -> Vec<Record> {
        let Ok(host_name) = Name::from_ascii(format!("{host}.")) else {
            return Vec::new();
        };
        zone.hosts
            .get(host)
            .into_iter()
            .flatten()
            .filter_map(|ip| match (ip, wanted) {
                (IpAddr::V4(v4), RecordType::A) => Some(Record::from_rdata(
                    host_name.clone(),
                    TTL_SECS,
                    RData::A(A(*v4)),
                )),
                (IpAddr::V6(v6), RecordType::AAAA) => Some(Record::from_rdata(
                    host_name.clone(),
                    TTL_SECS,
                    RData::AAAA(AAAA(*v6)),
                )),
                _ => None,
            })
            .collect()
    };
    match record_type {
        RecordType::MX if zone.null_mx.contains(&domain) => {
            response.add_answer(Record::from_rdata(
                name.clone(),
                TTL_SECS,
                RData::MX(MX::new(0, Name::root())),
            ));
        }
        RecordType::MX => {
            for (index, host) in zone.mx.get(&domain).into_iter().flatten().enumerate() {
                let Ok(host_name) = Name::from_ascii(format!("{host}.")) else {
                    continue;
                };
                let preference = 10 * (index as u16 + 1);
                response.add_answer(Record::from_rdata(
                    name.clone(),
                    TTL_SECS,
                    RData::MX(MX::new(preference, host_name)),
                ));
                for wanted in [RecordType::A, RecordType::AAAA] {
                    for record in addresses(host, wanted) {
                        response.add_additional(record);
                    }
                }
            }
        }
        RecordType::A | RecordType::AAAA => {
            for record in addresses(&domain, record_type) {
                response.add_answer(record);
            }
        }
        _ => {}
    }
    if transport == Transport::Udp && zone.truncate.contains(&domain) {
        let mut truncated = response.truncate();
        truncated.metadata.id = request.metadata.id;
        truncated.metadata.message_type = MessageType::Response;
        return truncated.to_vec().ok();
    }
    let bytes = response.to_vec().ok()?;
    if transport == Transport::Udp && bytes.len() > MAX_UDP_RESPONSE_BYTES {
        let mut truncated = response.truncate();
        truncated.metadata.id = request.metadata.id;
        return truncated.to_vec().ok();
    }
    Some(bytes)
}

/// Serves `zone` on UDP and TCP at `listen` until the process is killed.
pub fn run(listen: SocketAddr, zone: Zone) -> anyhow::Result<()> {
    // glommio's binds set SO_REUSEPORT, which would let us share the port with another
    // server that set it too (and, for UDP, can even hand port 0 one that is in use). Plain
    // binds fail if the port is taken; the UDP bind resolves port 0 and the TCP listener
    // takes the same port.
    let udp = std::net::UdpSocket::bind(listen)
        .map_err(|e| anyhow::anyhow!("cannot listen on udp {listen}: {e}"))?;
    let listen = udp.local_addr()?;
    let tcp = std::net::TcpListener::bind(listen)
        .map_err(|e| anyhow::anyhow!("cannot listen on tcp {listen}: {e}"))?;
    let executor = glommio::LocalExecutorBuilder::new(glommio::Placement::Unbound)
        .name("dns")
        .io_memory(512 * 1024)
        .make()
        .map_err(std::io::Error::from)?;
    let result: std::io::Result<()> = executor.run(async move {
        let zone = Rc::new(zone);
        // SAFETY: bound sockets (the TCP one listening) whose descriptors move to glommio.
        let (udp, tcp) = unsafe {
            (
                UdpSocket::from_raw_fd(udp.into_raw_fd()),
                TcpListener::from_raw_fd(tcp.into_raw_fd()),
            )
        };
        println!("dns listening on {listen} (udp and tcp)");
        let tcp_zone = zone.clone();
        glommio::spawn_local(async move {
            loop {
                match tcp.accept().await {
                    Ok(stream) => {
                        let zone = tcp_zone.clone();
                        glommio::spawn_local(async move {
                            let _ = serve_tcp(stream, &zone).await;
                        })
                        .detach();
                    }
                    Err(error) => {
                        eprintln!("loadgen dns: accept: {error}");
                        glommio::timer::sleep(Duration::from_millis(10)).await;
                    }
                }
            }
        })
        .detach();
        let mut buffer = vec![0u8; 4096];
        loop {
            let (len, peer) = match udp.recv_from(&mut buffer).await {
                Ok(received) => received,
                Err(error) => {
                    eprintln!("loadgen dns: udp receive: {error}");
                    continue;
                }
            };
            if let Some(response) = answer(&zone, &buffer[..len], Transport::Udp) {
                if let Err(error) = udp.send_to(&response, peer).await {
                    eprintln!("loadgen dns: udp send to {peer}: {error}");
                }
            }
        }
    });
    result?;
    Ok(())
}

/// Answers length-prefixed queries on one TCP connection (RFC 1035 §4.2.2).
async fn serve_tcp(mut stream: TcpStream, zone: &Zone) -> std::io::Result<()> {
    stream.set_read_timeout(Some(TCP_IDLE_TIMEOUT))?;
    let mut query = vec![0u8; u16::MAX as usize];
    loop {
        let mut prefix = [0u8; 2];
        stream.read_exact(&mut prefix).await?;
        let len = usize::from(u16::from_be_bytes(prefix));
        stream.read_exact(&mut query[..len]).await?;
        let Some(response) = answer(zone, &query[..len], Transport::Tcp) else {
            return Ok(());
        };
        let Ok(response_len) = u16::try_from(response.len()) else {
            return Ok(());
        };
        let mut framed = response_len.to_be_bytes().to_vec();
        framed.extend_from_slice(&response);
        stream.write_all(&framed).await?;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hickory_proto::op::Query;
    use proptest::prelude::*;

    fn zone() -> Zone {
        let strings = |items: &[&str]| items.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        Zone::from_args(
            &strings(&[
                "example.test=127.0.0.2,127.0.0.3",
                "Six.Test.=::1",
                "big.test=127.0.0.9",
            ]),
            &strings(&["null.test"]),
            &strings(&["plain.test=127.0.0.4"]),
            &strings(&["broken.test"]),
            &strings(&["big.test"]),
        )
        .unwrap()
    }

    fn ask(name: &str, record_type: RecordType, transport: Transport) -> Message {
        let mut query = Message::new(0, MessageType::Query, OpCode::Query);
        query.metadata.id = 4711;
        query.metadata.recursion_desired = true;
        query.add_query(Query::query(Name::from_ascii(name).unwrap(), record_type));
        let bytes = answer(&zone(), &query.to_vec().unwrap(), transport).expect("an answer");
        let response = Message::from_vec(&bytes).unwrap();
        assert_eq!(response.metadata.id, 4711);
        assert_eq!(response.metadata.message_type, MessageType::Response);
        response
    }

    fn mx_targets(response: &Message) -> Vec<(u16, String)> {
        response
            .answers
            .iter()
            .filter_map(|record| match &record.data {
                RData::MX(mx) => Some((mx.preference, mx.exchange.to_ascii())),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn mx_with_additional_addresses() {
        let response = ask("example.test.", RecordType::MX, Transport::Udp);
        assert_eq!(response.metadata.response_code, ResponseCode::NoError);
        assert!(response.metadata.authoritative);
        assert_eq!(
            mx_targets(&response),
            vec![
                (10, "mx1.example.test.".to_string()),
                (20, "mx2.example.test.".to_string())
            ]
        );
        assert_eq!(response.additionals.len(), 2);
        assert!(response.answers.iter().all(|r| r.ttl == TTL_SECS));
    }

    #[test]
    fn mx_hosts_answer_a_queries_case_insensitively() {
        let response = ask("MX2.Example.Test.", RecordType::A, Transport::Udp);
        let ips: Vec<_> = response
            .answers
            .iter()
            .filter_map(|r| match &r.data {
                RData::A(a) => Some(a.0.to_string()),
                _ => None,
            })
            .collect();
        assert_eq!(ips, vec!["127.0.0.3"]);
        let six = ask("mx1.six.test.", RecordType::AAAA, Transport::Udp);
        assert_eq!(six.answers.len(), 1);
        let plain = ask("plain.test.", RecordType::A, Transport::Udp);
        assert_eq!(plain.answers.len(), 1);
    }

    #[test]
    fn null_mx_servfail_nxdomain_nodata() {
        let null = ask("null.test.", RecordType::MX, Transport::Udp);
        assert_eq!(mx_targets(&null), vec![(0, ".".to_string())]);
        let broken = ask("broken.test.", RecordType::MX, Transport::Udp);
        assert_eq!(broken.metadata.response_code, ResponseCode::ServFail);
        let unknown = ask("nowhere.test.", RecordType::MX, Transport::Udp);
        assert_eq!(unknown.metadata.response_code, ResponseCode::NXDomain);
        let nodata = ask("plain.test.", RecordType::MX, Transport::Udp);
        assert_eq!(nodata.metadata.response_code, ResponseCode::NoError);
        assert!(nodata.answers.is_empty());
    }

    #[test]
    fn truncates_over_udp_only() {
        let udp = ask("big.test.", RecordType::MX, Transport::Udp);
        assert!(udp.metadata.truncation);
        assert!(udp.answers.is_empty());
        let tcp = ask("big.test.", RecordType::MX, Transport::Tcp);
        assert!(!tcp.metadata.truncation);
        assert_eq!(mx_targets(&tcp), vec![(10, "mx1.big.test.".to_string())]);
    }

    #[test]
    fn bad_options_are_refused() {
        let none: &[String] = &[];
        for bad in ["example.test", "example.test=notanip", "=127.0.0.1"] {
            assert!(
                Zone::from_args(&[bad.to_string()], none, none, none, none).is_err(),
                "{bad}"
            );
        }
    }

    proptest! {
        #[test]
        fn garbage_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
            let _ = answer(&zone(), &bytes, Transport::Udp);
            let _ = answer(&zone(), &bytes, Transport::Tcp);
        }
    }
}
