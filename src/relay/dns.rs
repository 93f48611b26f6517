//! DNS for the relay: MX / A / AAAA lookups with hickory-proto messages.
//!
//! Three layers, so that everything except the socket calls is tested byte by byte:
//! - the codec ([`encode_query`], [`decode_response`]): pure, never panics on any input, and
//!   refuses a response whose id, flags or question do not match the query we sent;
//! - the cache ([`DnsCache`]): per shard, TTLs honoured for positive and negative answers,
//!   bounded by [`DNS_CACHE_MAX_ENTRIES`], time passed in;
//! - the [`Resolver`]: glommio UDP to each nameserver in turn, TCP when the answer is
//!   truncated, a timeout per try, a bounded number of rounds.
//!
//! Failure classes follow RFC 5321 §5.1 and SPEC §5: NXDOMAIN is permanent (the recipient
//! bounces); SERVFAIL, REFUSED, timeouts and I/O errors are temporary (it is deferred).

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::rc::Rc;
use std::time::{Duration, Instant};

use futures_lite::{AsyncReadExt, AsyncWriteExt};
use hickory_proto::op::{Edns, Message, MessageType, OpCode, Query, ResponseCode};
use hickory_proto::rr::{DNSClass, Name, RData, Record, RecordType};

/// Most entries one shard's cache holds; beyond it the entry closest to expiry is evicted.
pub const DNS_CACHE_MAX_ENTRIES: usize = 4096;
/// Longest CNAME chain followed inside one answer; longer chains are treated as a loop.
pub const MAX_CNAME_CHAIN: usize = 8;
/// Most MX records or addresses kept from one answer: more cannot be tried before the
/// message expires anyway, and the relay queue stores them.
pub const MAX_ANSWER_RECORDS: usize = 32;
/// Longest we cache anything, whatever TTL the zone asks for (a day, like most resolvers).
pub const MAX_CACHE_TTL_SECS: u32 = 86_400;
/// Longest we cache a negative answer (RFC 2308 §5 recommends at most hours).
pub const MAX_NEGATIVE_TTL_SECS: u32 = 3_600;
/// EDNS payload size we advertise over UDP (the DNS flag day 2020 value: no fragmentation).
pub const UDP_PAYLOAD_BYTES: u16 = 1232;
/// Receive buffer for one UDP response; larger datagrams are cut and then fail to decode.
pub const UDP_RECEIVE_BUFFER_BYTES: usize = 4096;
/// Largest domain name we look up (RFC 1035 §2.3.4: 255 octets on the wire).
pub const MAX_DOMAIN_NAME_BYTES: usize = 253;
/// Time allowed for one query to one nameserver before the next one is asked.
pub const DEFAULT_QUERY_TIMEOUT_SECS: f64 = 5.0;
/// Rounds over the whole nameserver list before a lookup fails temporarily.
pub const DEFAULT_QUERY_ROUNDS: usize = 2;
/// Most nameservers taken from resolv.conf (glibc's MAXNS).
pub const MAX_NAMESERVERS: usize = 3;

/// Why a lookup failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DnsError {
    /// The name does not exist (NXDOMAIN): permanent, the recipient bounces.
    #[error("domain {0} does not exist (NXDOMAIN)")]
    NxDomain(String),
    /// The text is not a domain name we can look up: permanent.
    #[error("invalid domain name {0:?}")]
    InvalidName(String),
    /// The nameserver failed (SERVFAIL, REFUSED, …): temporary.
    #[error("nameserver answered {0}")]
    ServerFailure(String),
    /// No nameserver answered in time: temporary.
    #[error("DNS lookup timed out")]
    Timeout,
    /// A socket error talking to the nameserver: temporary.
    #[error("DNS transport error: {0}")]
    Transport(String),
    /// The bytes are not a DNS message we can read: temporary (try another server).
    #[error("malformed DNS response: {0}")]
    Malformed(String),
    /// A well-formed response that does not answer our query (wrong id, question or not a
    /// response): ignored by the resolver, which keeps waiting for the real answer.
    #[error("DNS response does not match the query")]
    Mismatch,
    /// CNAMEs in the answer chain longer than [`MAX_CNAME_CHAIN`] or looping: permanent.
    #[error("CNAME chain for {0} is too long or loops")]
    CnameLoop(String),
    /// No nameserver is configured.
    #[error("no nameserver configured")]
    NoNameservers,
}

impl DnsError {
    /// Whether the recipient should bounce (true) rather than be retried later.
    pub fn is_permanent(&self) -> bool {
        matches!(
            self,
            DnsError::NxDomain(_) | DnsError::InvalidName(_) | DnsError::CnameLoop(_)
        )
    }
}

/// The record type asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum QueryType {
    /// Mail exchangers of a domain.
    Mx,
    /// IPv4 addresses of a host.
    A,
    /// IPv6 addresses of a host.
    Aaaa,
}

impl QueryType {
    fn record_type(self) -> RecordType {
        match self {
            QueryType::Mx => RecordType::MX,
            QueryType::A => RecordType::A,
            QueryType::Aaaa => RecordType::AAAA,
        }
    }
}

/// One question: what a query asks and what its response must echo.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Question {
    /// Fully qualified, lower-cased name; lower case so that the cache key is canonical.
    pub name: Name,
    /// The record type asked for.
    pub query_type: QueryType,
}

impl Question {
    /// A question for `domain` (with or without the trailing dot), validated and normalised.
    pub fn new(domain: &str, query_type: QueryType) -> Result<Self, DnsError> {
        Ok(Question {
            name: parse_domain(domain)?,
            query_type,
        })
    }
}

/// Parse and normalise a domain name: ASCII (an internationalized domain, which SMTPUTF8
/// mail may carry (RFC 6531), becomes its A-labels), lower case, fully qualified, at most
/// [`MAX_DOMAIN_NAME_BYTES`].
pub fn parse_domain(domain: &str) -> Result<Name, DnsError> {
    let invalid = || DnsError::InvalidName(domain.chars().take(300).collect());
    let a_labels;
    let mut trimmed = domain.strip_suffix('.').unwrap_or(domain);
    if !trimmed.is_ascii() {
        a_labels = Name::from_utf8(trimmed).map_err(|_| invalid())?.to_ascii();
        trimmed = a_labels.strip_suffix('.').unwrap_or(&a_labels);
    }
    if trimmed.is_empty() || trimmed.len() > MAX_DOMAIN_NAME_BYTES || !trimmed.is_ascii() {
        return Err(invalid());
    }
    // An address literal ("[192.0.2.1]") or anything with characters no hostname has is not
    // a name to look up.
    if !trimmed
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.' || b == b'_')
    {
        return Err(invalid());
    }
    let mut name = Name::from_ascii(trimmed).map_err(|_| invalid())?;
    name.set_fqdn(true);
    Ok(name.to_lowercase())
}

/// A name as text, lower case, without the trailing dot ("mx1.example.test").
fn name_text(name: &Name) -> String {
    let mut text = name.to_lowercase().to_ascii();
    if text.len() > 1 && text.ends_with('.') {
        text.pop();
    }
    text
}

/// Encode a recursive query for `question` with message id `id` (the caller picks it at
/// random; the response must echo it). EDNS advertises [`UDP_PAYLOAD_BYTES`].
pub fn encode_query(id: u16, question: &Question) -> Result<Vec<u8>, DnsError> {
    let mut message = Message::new(id, MessageType::Query, OpCode::Query);
    message.metadata.recursion_desired = true;
    message.add_query(Query::query(
        question.name.clone(),
        question.query_type.record_type(),
    ));
    let mut edns = Edns::new();
    edns.set_max_payload(UDP_PAYLOAD_BYTES);
    message.set_edns(edns);
    message
        .to_vec()
        .map_err(|error| DnsError::InvalidName(format!("{}: {error}", question.name)))
}

/// One mail exchanger from an MX answer.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct MxRecord {
    /// Lower is tried first (RFC 5321 §5.1).
    pub preference: u16,
    /// Host name, lower case, no trailing dot; "" for the root name of a null MX.
    pub exchange: String,
}

/// What the MX lookup of a domain says about where its mail goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MxAnswer {
    /// The domain's mail exchangers, in the order the server gave them (unsorted: next-hop
    /// selection sorts and shuffles).
    Exchanges(Vec<MxRecord>),
    /// RFC 7505 null MX: the domain accepts no mail, bounce at once.
    NullMx,
    /// The domain exists but has no MX records: deliver to its own A/AAAA (implicit MX).
    NoMx,
}

/// The records an answer carried, of the type asked for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Records {
    /// From an MX query.
    Mx(MxAnswer),
    /// From an A or AAAA query (never empty: empty is [`Lookup::NoData`]).
    Addrs(Vec<IpAddr>),
}

/// A definitive answer to one question, as cached.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Lookup {
    /// Records of the asked type exist.
    Records(Records),
    /// The name exists but has no records of this type (NODATA).
    NoData,
    /// The name does not exist.
    NxDomain,
}

/// What one response told us.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Response {
    /// An answer, to be cached for `ttl_secs` (0: do not cache).
    Answer {
        /// The answer itself.
        lookup: Lookup,
        /// Seconds the answer may be cached, already capped by our limits.
        ttl_secs: u32,
    },
    /// The TC bit was set: ask again over TCP.
    Truncated,
}

/// Read the 12-byte header ourselves, so that a truncated response whose records were cut
/// mid-way (and so fails to decode) is still recognised as truncated.
struct RawHeader {
    id: u16,
    is_response: bool,
    truncated: bool,
}

fn raw_header(bytes: &[u8]) -> Option<RawHeader> {
    let header = bytes.get(..12)?;
    Some(RawHeader {
        id: u16::from_be_bytes([header[0], header[1]]),
        is_response: header[2] & 0x80 != 0,
        truncated: header[2] & 0x02 != 0,
    })
}

/// Decode the response to the query `id` / `question`. Total: any input gives a value or an
/// error, never a panic (fuzzed). Responses that do not echo the id and question are
/// [`DnsError::Mismatch`]: a spoofed or stale datagram, not an answer.
pub fn decode_response(bytes: &[u8], id: u16, question: &Question) -> Result<Response, DnsError> {
    let header = raw_header(bytes).ok_or_else(|| DnsError::Malformed("short header".into()))?;
    if header.id != id || !header.is_response {
        return Err(DnsError::Mismatch);
    }
    let message = match Message::from_vec(bytes) {
        Ok(message) => message,
        // A truncated UDP answer may be cut inside a record; its header is enough.
        Err(_) if header.truncated => return Ok(Response::Truncated),
        Err(error) => return Err(DnsError::Malformed(error.to_string())),
    };
    let asked = question.query_type.record_type();
    let echoes_question = message.queries.len() == 1
        && message.queries[0].name() == &question.name
        && message.queries[0].query_type() == asked
        && message.queries[0].query_class() == DNSClass::IN;
    if message.metadata.op_code != OpCode::Query || !echoes_question {
        return Err(DnsError::Mismatch);
    }
    if message.metadata.truncation {
        return Ok(Response::Truncated);
    }
    match message.metadata.response_code {
        ResponseCode::NoError => {}
        ResponseCode::NXDomain => {
            return Ok(Response::Answer {
                lookup: Lookup::NxDomain,
                ttl_secs: negative_ttl_secs(&message),
            })
        }
        other => return Err(DnsError::ServerFailure(other.to_string())),
    }
    let (final_name, chain_ttl_secs) = follow_cnames(&message.answers, &question.name)?;
    let mut ttl_secs = chain_ttl_secs;
    let matching = message
        .answers
        .iter()
        .filter(|record| record.name == final_name && record.dns_class == DNSClass::IN);
    let lookup = match question.query_type {
        QueryType::Mx => {
            let mut exchanges = Vec::new();
            for record in matching {
                if let RData::MX(mx) = &record.data {
                    ttl_secs = ttl_secs.min(record.ttl);
                    if exchanges.len() < MAX_ANSWER_RECORDS {
                        exchanges.push(MxRecord {
                            preference: mx.preference,
                            exchange: if mx.exchange.is_root() {
                                String::new()
                            } else {
                                name_text(&mx.exchange)
                            },
                        });
                    }
                }
            }
            mx_lookup(exchanges)
        }
        QueryType::A | QueryType::Aaaa => {
            let mut addrs = Vec::new();
            for record in matching {
                let addr = match (&record.data, question.query_type) {
                    (RData::A(a), QueryType::A) => IpAddr::V4(a.0),
                    (RData::AAAA(aaaa), QueryType::Aaaa) => IpAddr::V6(aaaa.0),
                    _ => continue,
                };
                ttl_secs = ttl_secs.min(record.ttl);
                if addrs.len() < MAX_ANSWER_RECORDS && !addrs.contains(&addr) {
                    addrs.push(addr);
                }
            }
            if addrs.is_empty() {
                Lookup::NoData
            } else {
                Lookup::Records(Records::Addrs(addrs))
            }
        }
    };
    let ttl_secs = match lookup {
        Lookup::NoData => negative_ttl_secs(&message),
        _ => ttl_secs.min(MAX_CACHE_TTL_SECS),
    };
    Ok(Response::Answer { lookup, ttl_secs })
}

/// Classify the MX records of an answer. A lone MX whose exchange is the root with
/// preference 0 is a null MX (RFC 7505 §3). A root exchange among real ones is a broken zone
/// (RFC 7505 says it MUST NOT happen): we drop the root entry and use the others, as
/// Postfix does, rather than bounce mail the other hosts might accept.
fn mx_lookup(mut exchanges: Vec<MxRecord>) -> Lookup {
    if exchanges.is_empty() {
        return Lookup::NoData;
    }
    if exchanges.len() == 1 && exchanges[0].exchange.is_empty() && exchanges[0].preference == 0 {
        return Lookup::Records(Records::Mx(MxAnswer::NullMx));
    }
    exchanges.retain(|mx| !mx.exchange.is_empty());
    if exchanges.is_empty() {
        // Only root exchanges with non-zero preference: still "no mail here".
        return Lookup::Records(Records::Mx(MxAnswer::NullMx));
    }
    Lookup::Records(Records::Mx(MxAnswer::Exchanges(exchanges)))
}

/// Follow CNAMEs from `start` within the answer section; returns the name the records of
/// the asked type are owned by and the smallest TTL along the chain.
fn follow_cnames(answers: &[Record], start: &Name) -> Result<(Name, u32), DnsError> {
    let mut current = start.clone();
    let mut ttl_secs = u32::MAX;
    for _ in 0..=MAX_CNAME_CHAIN {
        let alias = answers.iter().find_map(|record| match &record.data {
            RData::CNAME(target) if record.name == current => Some((target.0.clone(), record.ttl)),
            _ => None,
        });
        match alias {
            Some((target, ttl)) => {
                ttl_secs = ttl_secs.min(ttl);
                current = target.to_lowercase();
            }
            None => return Ok((current, ttl_secs)),
        }
    }
    Err(DnsError::CnameLoop(name_text(start)))
}

/// RFC 2308 §5: a negative answer is cached for min(SOA TTL, SOA MINIMUM) of the SOA in
/// the authority section; without an SOA it is not cached at all.
fn negative_ttl_secs(message: &Message) -> u32 {
    message
        .authorities
        .iter()
        .find_map(|record| match &record.data {
            RData::SOA(soa) => Some(record.ttl.min(soa.minimum)),
            _ => None,
        })
        .unwrap_or(0)
        .min(MAX_NEGATIVE_TTL_SECS)
}

/// One cached answer.
#[derive(Debug, Clone)]
struct CacheEntry {
    lookup: Lookup,
    expires_at: Duration,
}

/// A shard's DNS cache: answers (negative ones too) kept for their TTL, at most
/// `max_entries` of them. Time is passed in as a [`Duration`] since the caller's origin.
#[derive(Debug)]
pub struct DnsCache {
    entries: HashMap<Question, CacheEntry>,
    max_entries: usize,
}

impl Default for DnsCache {
    fn default() -> Self {
        Self::new(DNS_CACHE_MAX_ENTRIES)
    }
}

impl DnsCache {
    /// An empty cache holding at most `max_entries` answers.
    pub fn new(max_entries: usize) -> Self {
        DnsCache {
            entries: HashMap::new(),
            max_entries,
        }
    }

    /// The cached answer to `question`, if it has not expired at `now`.
    pub fn get(&self, question: &Question, now: Duration) -> Option<&Lookup> {
        self.entries
            .get(question)
            .filter(|entry| entry.expires_at > now)
            .map(|entry| &entry.lookup)
    }

    /// Remember `lookup` for `ttl_secs` from `now`; a zero TTL is not cached.
    pub fn insert(&mut self, question: Question, lookup: Lookup, ttl_secs: u32, now: Duration) {
        if ttl_secs == 0 || self.max_entries == 0 {
            return;
        }
        let expires_at = now.saturating_add(Duration::from_secs(u64::from(ttl_secs)));
        if self.entries.len() >= self.max_entries && !self.entries.contains_key(&question) {
            self.entries.retain(|_, entry| entry.expires_at > now);
        }
        if self.entries.len() >= self.max_entries && !self.entries.contains_key(&question) {
            // Still full of live answers: drop the one that would have expired first.
            let soonest = self
                .entries
                .iter()
                .min_by_key(|(_, entry)| entry.expires_at)
                .map(|(question, _)| question.clone());
            if let Some(soonest) = soonest {
                self.entries.remove(&soonest);
            }
        }
        self.entries
            .insert(question, CacheEntry { lookup, expires_at });
    }

    /// Number of entries held, expired ones included until they are evicted.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether the cache holds nothing.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

/// The nameservers listed in resolv.conf text (`nameserver` lines, port 53), at most
/// [`MAX_NAMESERVERS`], in order. Pure, so that the file is read once at startup, outside
/// the shards, and the parsing is tested here.
pub fn parse_resolv_conf(text: &str) -> Vec<SocketAddr> {
    text.lines()
        .filter_map(|line| {
            let line = line.split(['#', ';']).next().unwrap_or("");
            let mut words = line.split_whitespace();
            if words.next() != Some("nameserver") {
                return None;
            }
            // A scoped IPv6 address ("fe80::1%eth0") needs an interface we cannot name here.
            words.next()?.parse::<IpAddr>().ok()
        })
        .take(MAX_NAMESERVERS)
        .map(|ip| SocketAddr::new(ip, 53))
        .collect()
}

/// The nameservers for the `relay.resolver` setting: "system" reads /etc/resolv.conf (with
/// blocking std::fs: call this once at startup, never inside a shard), anything else must
/// be "IP:PORT".
pub fn nameservers_from_setting(setting: &str) -> Result<Vec<SocketAddr>, String> {
    if setting == "system" {
        let text = std::fs::read_to_string("/etc/resolv.conf")
            .map_err(|error| format!("relay.resolver = \"system\": /etc/resolv.conf: {error}"))?;
        let servers = parse_resolv_conf(&text);
        if servers.is_empty() {
            return Err(
                "relay.resolver = \"system\": no nameserver line in /etc/resolv.conf".into(),
            );
        }
        return Ok(servers);
    }
    setting
        .parse::<SocketAddr>()
        .map(|addr| vec![addr])
        .map_err(|_| format!("relay.resolver: {setting:?} is neither \"system\" nor IP:PORT"))
}

/// How the [`Resolver`] talks to its nameservers.
#[derive(Debug, Clone, PartialEq)]
pub struct ResolverConfig {
    /// Asked in order; the next one when one times out or fails.
    pub nameservers: Vec<SocketAddr>,
    /// Time allowed for one query to one nameserver (UDP, and TCP again when truncated).
    pub query_timeout: Duration,
    /// Rounds over all nameservers before giving up with a temporary error.
    pub rounds: usize,
    /// Answers cached at most (per shard).
    pub cache_max_entries: usize,
}

impl ResolverConfig {
    /// Defaults for the given nameservers.
    pub fn new(nameservers: Vec<SocketAddr>) -> Self {
        ResolverConfig {
            nameservers,
            query_timeout: Duration::from_secs_f64(DEFAULT_QUERY_TIMEOUT_SECS),
            rounds: DEFAULT_QUERY_ROUNDS,
            cache_max_entries: DNS_CACHE_MAX_ENTRIES,
        }
    }
}

/// A shard's stub resolver: asks recursive nameservers over glommio UDP (TCP on
/// truncation) and caches the answers. Not `Send`: one per shard, used from its executor.
#[derive(Debug)]
pub struct Resolver {
    config: ResolverConfig,
    cache: RefCell<DnsCache>,
    /// Origin of the cache's clock.
    started: Instant,
    /// Queries sent, for metrics and for tests that check the cache was used.
    queries_sent: Cell<u64>,
}

impl Resolver {
    /// A resolver for `config`; it opens sockets only when a lookup misses the cache.
    pub fn new(config: ResolverConfig) -> Rc<Self> {
        Rc::new(Resolver {
            cache: RefCell::new(DnsCache::new(config.cache_max_entries)),
            config,
            started: Instant::now(),
            queries_sent: Cell::new(0),
        })
    }

    /// Number of queries sent over the network so far (UDP and TCP each count).
    pub fn queries_sent(&self) -> u64 {
        self.queries_sent.get()
    }

    /// Where mail for `domain` goes: its MX records, a null MX, or no MX (implicit MX).
    /// NXDOMAIN is [`DnsError::NxDomain`] (permanent).
    pub async fn resolve_mx(&self, domain: &str) -> Result<MxAnswer, DnsError> {
        let question = Question::new(domain, QueryType::Mx)?;
        match self.lookup(question).await? {
            Lookup::Records(Records::Mx(answer)) => Ok(answer),
            Lookup::Records(Records::Addrs(_)) => Err(DnsError::Mismatch),
            Lookup::NoData => Ok(MxAnswer::NoMx),
            Lookup::NxDomain => Err(DnsError::NxDomain(domain.to_owned())),
        }
    }

    /// The IPv4 and IPv6 addresses of `host`, IPv4 first (both asked concurrently). An
    /// existing host with no address gives an empty list; NXDOMAIN is an error. When one
    /// family fails temporarily the other's addresses are still returned.
    pub async fn resolve_addrs(&self, host: &str) -> Result<Vec<IpAddr>, DnsError> {
        let v4 = Question::new(host, QueryType::A)?;
        let v6 = Question::new(host, QueryType::Aaaa)?;
        let (v4, v6) = futures_lite::future::zip(self.lookup(v4), self.lookup(v6)).await;
        let mut addrs = Vec::new();
        let mut first_error = None;
        let mut nxdomain = false;
        for result in [v4, v6] {
            match result {
                Ok(Lookup::Records(Records::Addrs(found))) => addrs.extend(found),
                Ok(Lookup::NxDomain) => nxdomain = true,
                Ok(_) => {}
                Err(error) => {
                    first_error.get_or_insert(error);
                }
            }
        }
        if !addrs.is_empty() {
            return Ok(addrs);
        }
        if let Some(error) = first_error {
            return Err(error);
        }
        if nxdomain {
            return Err(DnsError::NxDomain(host.to_owned()));
        }
        Ok(addrs)
    }

    /// The answer to `question`, from the cache or the nameservers.
    pub async fn lookup(&self, question: Question) -> Result<Lookup, DnsError> {
        if let Some(cached) = self.cache.borrow().get(&question, self.now()) {
            return Ok(cached.clone());
        }
        if self.config.nameservers.is_empty() {
            return Err(DnsError::NoNameservers);
        }
        let mut last_error = DnsError::Timeout;
        for _ in 0..self.config.rounds.max(1) {
            for &server in &self.config.nameservers {
                match self.ask(server, &question).await {
                    Ok((lookup, ttl_secs)) => {
                        self.cache.borrow_mut().insert(
                            question,
                            lookup.clone(),
                            ttl_secs,
                            self.now(),
                        );
                        return Ok(lookup);
                    }
                    Err(error) if error.is_permanent() => return Err(error),
                    Err(error) => last_error = error,
                }
            }
        }
        Err(last_error)
    }

    fn now(&self) -> Duration {
        self.started.elapsed()
    }

    /// One nameserver: UDP, then TCP if the UDP answer was truncated.
    async fn ask(
        &self,
        server: SocketAddr,
        question: &Question,
    ) -> Result<(Lookup, u32), DnsError> {
        let id: u16 = rand::random();
        let query = encode_query(id, question)?;
        let timeout = self.config.query_timeout;
        self.queries_sent.set(self.queries_sent.get() + 1);
        let response = with_timeout(timeout, query_udp(server, &query, id, question)).await?;
        let response = match response {
            Response::Truncated => {
                self.queries_sent.set(self.queries_sent.get() + 1);
                with_timeout(timeout, query_tcp(server, &query, id, question)).await?
            }
            answer => answer,
        };
        match response {
            Response::Answer { lookup, ttl_secs } => Ok((lookup, ttl_secs)),
            // A TCP answer has no reason to be truncated; treat it as a failure of this server.
            Response::Truncated => Err(DnsError::ServerFailure("truncated over TCP".into())),
        }
    }
}

/// Run `work`, or fail with [`DnsError::Timeout`] after `timeout`.
async fn with_timeout<T>(
    timeout: Duration,
    work: impl std::future::Future<Output = Result<T, DnsError>>,
) -> Result<T, DnsError> {
    futures_lite::future::or(work, async {
        glommio::timer::sleep(timeout).await;
        Err(DnsError::Timeout)
    })
    .await
}

fn transport(error: impl std::fmt::Display) -> DnsError {
    DnsError::Transport(error.to_string())
}

/// Send `query` over UDP from a fresh socket (a random source port per query, against
/// spoofing) and wait for the datagram that answers it; others are ignored.
async fn query_udp(
    server: SocketAddr,
    query: &[u8],
    id: u16,
    question: &Question,
) -> Result<Response, DnsError> {
    let local: IpAddr = if server.is_ipv4() {
        Ipv4Addr::UNSPECIFIED.into()
    } else {
        Ipv6Addr::UNSPECIFIED.into()
    };
    let socket = exclusive_udp_socket(SocketAddr::new(local, 0)).map_err(transport)?;
    socket.send_to(query, server).await.map_err(transport)?;
    let mut buffer = vec![0u8; UDP_RECEIVE_BUFFER_BYTES];
    loop {
        let (len, from) = socket.recv_from(&mut buffer).await.map_err(transport)?;
        if from != server {
            continue;
        }
        match decode_response(&buffer[..len], id, question) {
            Err(DnsError::Mismatch) => continue,
            other => return other,
        }
    }
}

/// A UDP socket on a port no other socket shares.
///
/// glommio's `UdpSocket::bind` sets SO_REUSEPORT, and for such sockets Linux may answer a
/// port-0 bind with a port another live socket of the same user holds (353 of 10,000 binds
/// beside up to 2,000 live sockets, measured here). Two queries on one port get each
/// other's answers, by the kernel's hash: one of them waits for its timeout. A socket
/// without SO_REUSEPORT is never handed a port in use.
pub(crate) fn exclusive_udp_socket(local: SocketAddr) -> std::io::Result<glommio::net::UdpSocket> {
    use socket2::{Domain, Protocol, Socket, Type};
    use std::os::fd::{FromRawFd, IntoRawFd};
    let socket = Socket::new(Domain::for_address(local), Type::DGRAM, Some(Protocol::UDP))?;
    socket.bind(&local.into())?;
    // SAFETY: a bound UDP socket whose descriptor moves to glommio's socket.
    Ok(unsafe { glommio::net::UdpSocket::from_raw_fd(socket.into_raw_fd()) })
}

/// Ask over TCP (RFC 1035 §4.2.2: two-byte length prefix), after a truncated UDP answer.
async fn query_tcp(
    server: SocketAddr,
    query: &[u8],
    id: u16,
    question: &Question,
) -> Result<Response, DnsError> {
    let mut stream = glommio::net::TcpStream::connect(server)
        .await
        .map_err(transport)?;
    let length = u16::try_from(query.len()).map_err(transport)?;
    let mut framed = Vec::with_capacity(query.len() + 2);
    framed.extend_from_slice(&length.to_be_bytes());
    framed.extend_from_slice(query);
    stream.write_all(&framed).await.map_err(transport)?;
    stream.flush().await.map_err(transport)?;
    let mut prefix = [0u8; 2];
    stream.read_exact(&mut prefix).await.map_err(transport)?;
    // At most 64 KiB by construction of the prefix: the bound on what we allocate.
    let mut buffer = vec![0u8; usize::from(u16::from_be_bytes(prefix))];
    stream.read_exact(&mut buffer).await.map_err(transport)?;
    decode_response(&buffer, id, question)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::relay::fake_dns::{self, Zone};
    use hickory_proto::rr::rdata::{A, AAAA, CNAME, MX, SOA};
    use proptest::prelude::*;

    fn name(text: &str) -> Name {
        Name::from_ascii(text).unwrap()
    }

    fn question(domain: &str, query_type: QueryType) -> Question {
        Question::new(domain, query_type).unwrap()
    }

    /// A response to `question` with id `id`, built the way a recursive server would.
    fn response(id: u16, question: &Question, code: ResponseCode) -> Message {
        let mut message = Message::response(id, OpCode::Query);
        message.metadata.response_code = code;
        message.metadata.recursion_available = true;
        message.add_query(Query::query(
            question.name.clone(),
            question.query_type.record_type(),
        ));
        message
    }

    fn soa(zone: &str, ttl: u32, minimum: u32) -> Record {
        Record::from_rdata(
            name(zone),
            ttl,
            RData::SOA(SOA::new(
                name("ns.example.test."),
                name("hostmaster.example.test."),
                1,
                3600,
                600,
                86400,
                minimum,
            )),
        )
    }

    fn mx(owner: &str, ttl: u32, preference: u16, exchange: &str) -> Record {
        Record::from_rdata(
            name(owner),
            ttl,
            RData::MX(MX::new(preference, name(exchange))),
        )
    }

    fn decode(message: &Message, id: u16, question: &Question) -> Result<Response, DnsError> {
        decode_response(&message.to_vec().unwrap(), id, question)
    }

    fn answer(lookup: Lookup, ttl_secs: u32) -> Result<Response, DnsError> {
        Ok(Response::Answer { lookup, ttl_secs })
    }

    fn exchanges(list: &[(u16, &str)]) -> Lookup {
        Lookup::Records(Records::Mx(MxAnswer::Exchanges(
            list.iter()
                .map(|&(preference, exchange)| MxRecord {
                    preference,
                    exchange: exchange.to_owned(),
                })
                .collect(),
        )))
    }

    #[test]
    fn query_round_trips_through_hickory() {
        let q = question("Example.TEST.", QueryType::Mx);
        let bytes = encode_query(0xbeef, &q).unwrap();
        let message = Message::from_vec(&bytes).unwrap();
        assert_eq!(message.metadata.id, 0xbeef);
        assert_eq!(message.metadata.message_type, MessageType::Query);
        assert!(message.metadata.recursion_desired);
        assert_eq!(message.queries.len(), 1);
        assert_eq!(message.queries[0].name(), &name("example.test."));
        assert_eq!(message.queries[0].query_type(), RecordType::MX);
        assert_eq!(message.max_payload(), UDP_PAYLOAD_BYTES);
        // Byte-exact header: id, RD set, one question, no answers, one additional (OPT).
        assert_eq!(
            &bytes[..12],
            &[0xbe, 0xef, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 1]
        );
    }

    #[test]
    fn domain_validation_table() {
        let cases: &[(&str, Option<&str>)] = &[
            ("example.test", Some("example.test.")),
            ("Example.TEST.", Some("example.test.")),
            ("mx-1.example.test", Some("mx-1.example.test.")),
            ("", None),
            (".", None),
            ("[192.0.2.1]", None),
            ("exa mple.test", None),
            ("bücher.test", Some("xn--bcher-kva.test.")),
            ("BÜCHER.test.", Some("xn--bcher-kva.test.")),
            ("xn--bcher-kva.test", Some("xn--bcher-kva.test.")),
            ("bü cher.test", None),
            ("a..b", None),
        ];
        for (input, expected) in cases {
            let got = parse_domain(input).ok().map(|name| name.to_ascii());
            assert_eq!(got.as_deref(), *expected, "{input:?}");
        }
        assert!(parse_domain(&"a.".repeat(200)).is_err());
    }

    #[test]
    fn decodes_mx_answers() {
        let q = question("example.test", QueryType::Mx);
        let mut message = response(7, &q, ResponseCode::NoError);
        message.add_answer(mx("example.test.", 300, 20, "MX2.example.test."));
        message.add_answer(mx("example.test.", 120, 10, "mx1.example.test."));
        assert_eq!(
            decode(&message, 7, &q),
            answer(
                exchanges(&[(20, "mx2.example.test"), (10, "mx1.example.test")]),
                120
            )
        );
    }

    #[test]
    fn decodes_null_mx() {
        let q = question("nomail.test", QueryType::Mx);
        let mut message = response(8, &q, ResponseCode::NoError);
        message.add_answer(mx("nomail.test.", 3600, 0, "."));
        assert_eq!(
            decode(&message, 8, &q),
            answer(Lookup::Records(Records::Mx(MxAnswer::NullMx)), 3600)
        );
        // A root exchange among real ones is ignored rather than bouncing everything.
        message.add_answer(mx("nomail.test.", 3600, 10, "mx.nomail.test."));
        assert_eq!(
            decode(&message, 8, &q),
            answer(exchanges(&[(10, "mx.nomail.test")]), 3600)
        );
    }

    #[test]
    fn decodes_nodata_and_nxdomain_with_negative_ttl() {
        let q = question("a.example.test", QueryType::Mx);
        let mut nodata = response(9, &q, ResponseCode::NoError);
        nodata.add_authority(soa("example.test.", 900, 300));
        assert_eq!(decode(&nodata, 9, &q), answer(Lookup::NoData, 300));

        let mut nxdomain = response(9, &q, ResponseCode::NXDomain);
        nxdomain.add_authority(soa("example.test.", 60, 300));
        assert_eq!(decode(&nxdomain, 9, &q), answer(Lookup::NxDomain, 60));

        // No SOA: not cached. A huge SOA minimum: capped.
        let bare = response(9, &q, ResponseCode::NXDomain);
        assert_eq!(decode(&bare, 9, &q), answer(Lookup::NxDomain, 0));
        let mut long = response(9, &q, ResponseCode::NXDomain);
        long.add_authority(soa("example.test.", 999_999, 999_999));
        assert_eq!(
            decode(&long, 9, &q),
            answer(Lookup::NxDomain, MAX_NEGATIVE_TTL_SECS)
        );
    }

    #[test]
    fn server_failures_are_temporary_errors() {
        let q = question("example.test", QueryType::A);
        for code in [
            ResponseCode::ServFail,
            ResponseCode::Refused,
            ResponseCode::FormErr,
        ] {
            let got = decode(&response(1, &q, code), 1, &q);
            match got {
                Err(error @ DnsError::ServerFailure(_)) => assert!(!error.is_permanent()),
                other => panic!("{code:?} gave {other:?}"),
            }
        }
        assert!(DnsError::NxDomain("x".into()).is_permanent());
        assert!(!DnsError::Timeout.is_permanent());
    }

    #[test]
    fn follows_cnames_within_the_answer() {
        let q = question("www.example.test", QueryType::A);
        let mut message = response(2, &q, ResponseCode::NoError);
        message.add_answer(Record::from_rdata(
            name("www.example.test."),
            600,
            RData::CNAME(CNAME(name("Host.Example.test."))),
        ));
        message.add_answer(Record::from_rdata(
            name("host.example.test."),
            900,
            RData::A(A::new(192, 0, 2, 7)),
        ));
        // A record for another owner must not be taken as ours.
        message.add_answer(Record::from_rdata(
            name("other.example.test."),
            900,
            RData::A(A::new(192, 0, 2, 66)),
        ));
        assert_eq!(
            decode(&message, 2, &q),
            answer(
                Lookup::Records(Records::Addrs(vec!["192.0.2.7".parse().unwrap()])),
                600
            )
        );
    }

    #[test]
    fn cname_loops_are_refused() {
        let q = question("a.example.test", QueryType::A);
        let mut message = response(3, &q, ResponseCode::NoError);
        message.add_answer(Record::from_rdata(
            name("a.example.test."),
            60,
            RData::CNAME(CNAME(name("b.example.test."))),
        ));
        message.add_answer(Record::from_rdata(
            name("b.example.test."),
            60,
            RData::CNAME(CNAME(name("a.example.test."))),
        ));
        assert!(matches!(
            decode(&message, 3, &q),
            Err(DnsError::CnameLoop(_))
        ));
    }

    #[test]
    fn decodes_aaaa_and_ignores_other_families() {
        let q = question("host.example.test", QueryType::Aaaa);
        let mut message = response(4, &q, ResponseCode::NoError);
        message.add_answer(Record::from_rdata(
            name("host.example.test."),
            60,
            RData::AAAA(AAAA::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 1)),
        ));
        message.add_answer(Record::from_rdata(
            name("host.example.test."),
            60,
            RData::A(A::new(192, 0, 2, 1)),
        ));
        assert_eq!(
            decode(&message, 4, &q),
            answer(
                Lookup::Records(Records::Addrs(vec!["2001:db8::1".parse().unwrap()])),
                60
            )
        );
    }

    #[test]
    fn spoofed_or_stale_responses_are_mismatches() {
        let q = question("example.test", QueryType::Mx);
        let good = response(10, &q, ResponseCode::NoError);
        assert_eq!(decode(&good, 11, &q), Err(DnsError::Mismatch));
        assert_eq!(
            decode(&good, 10, &question("evil.test", QueryType::Mx)),
            Err(DnsError::Mismatch)
        );
        assert_eq!(
            decode(&good, 10, &question("example.test", QueryType::A)),
            Err(DnsError::Mismatch)
        );
        // Our own query echoed back is not a response.
        let query = encode_query(10, &q).unwrap();
        assert_eq!(decode_response(&query, 10, &q), Err(DnsError::Mismatch));
        // Two questions are not an answer to one.
        let mut two = response(10, &q, ResponseCode::NoError);
        two.add_query(Query::query(name("example.test."), RecordType::MX));
        assert_eq!(decode(&two, 10, &q), Err(DnsError::Mismatch));
    }

    #[test]
    fn truncated_responses_ask_for_tcp_even_when_cut_mid_record() {
        let q = question("big.example.test", QueryType::Mx);
        let mut message = response(12, &q, ResponseCode::NoError);
        message.metadata.truncation = true;
        message.add_answer(mx("big.example.test.", 60, 10, "mx.big.example.test."));
        let bytes = message.to_vec().unwrap();
        assert_eq!(decode_response(&bytes, 12, &q), Ok(Response::Truncated));
        assert_eq!(
            decode_response(&bytes[..bytes.len() - 5], 12, &q),
            Ok(Response::Truncated)
        );
        // Without TC a cut message is malformed.
        let mut plain = message.clone();
        plain.metadata.truncation = false;
        let plain = plain.to_vec().unwrap();
        assert!(matches!(
            decode_response(&plain[..plain.len() - 5], 12, &q),
            Err(DnsError::Malformed(_))
        ));
        assert!(matches!(
            decode_response(&[], 12, &q),
            Err(DnsError::Malformed(_))
        ));
    }

    #[test]
    fn decodes_a_hand_assembled_compressed_mx_response() {
        // Shaped like a public resolver's answer for gmail.com MX (id 0x1d2e): RD+RA set,
        // names compressed with pointers into the question and into the first exchange.
        let q = question("gmail.com", QueryType::Mx);
        let mut bytes: Vec<u8> = vec![
            0x1d, 0x2e, 0x81, 0x80, 0, 1, 0, 2, 0, 0, 0, 0, // header: 1 question, 2 answers
            5, b'g', b'm', b'a', b'i', b'l', 3, b'c', b'o', b'm', 0, 0, 15, 0, 1,
        ];
        // gmail.com MX 5 gmail-smtp-in.l.google.com (name compressed to offset 12)
        bytes.extend_from_slice(&[0xc0, 12, 0, 15, 0, 1, 0, 0, 0x0e, 0x10, 0, 27, 0, 5]);
        bytes.extend_from_slice(b"\x0dgmail-smtp-in\x01l\x06google\xc0\x12");
        // gmail.com MX 10 alt1.gmail-smtp-in.l.google.com (pointer to the first exchange)
        bytes.extend_from_slice(&[0xc0, 12, 0, 15, 0, 1, 0, 0, 0x0e, 0x10, 0, 9, 0, 10]);
        bytes.extend_from_slice(b"\x04alt1\xc0\x29");
        assert_eq!(
            decode_response(&bytes, 0x1d2e, &q),
            answer(
                exchanges(&[
                    (5, "gmail-smtp-in.l.google.com"),
                    (10, "alt1.gmail-smtp-in.l.google.com")
                ]),
                3600
            )
        );
    }

    #[test]
    fn cache_honours_ttls_and_its_bound() {
        let mut cache = DnsCache::new(2);
        let a = question("a.test", QueryType::A);
        let b = question("b.test", QueryType::A);
        let c = question("c.test", QueryType::A);
        let at = Duration::from_secs;
        cache.insert(a.clone(), Lookup::NxDomain, 10, at(100));
        assert_eq!(cache.get(&a, at(109)), Some(&Lookup::NxDomain));
        assert_eq!(cache.get(&a, at(110)), None);
        cache.insert(b.clone(), Lookup::NoData, 0, at(100));
        assert_eq!(cache.get(&b, at(100)), None, "TTL 0 is not cached");

        cache.insert(a.clone(), Lookup::NoData, 50, at(100));
        cache.insert(b.clone(), Lookup::NoData, 20, at(100));
        cache.insert(c.clone(), Lookup::NoData, 30, at(100));
        assert_eq!(cache.len(), 2);
        assert_eq!(
            cache.get(&b, at(101)),
            None,
            "the soonest to expire was evicted"
        );
        assert!(cache.get(&a, at(101)).is_some());
        assert!(cache.get(&c, at(101)).is_some());
        // Expired entries make room before live ones are evicted.
        cache.insert(b.clone(), Lookup::NoData, 5, at(140));
        assert!(cache.get(&a, at(141)).is_some());
        assert!(cache.get(&b, at(141)).is_some());
    }

    #[test]
    fn resolv_conf_table() {
        let text = "# comment\nsearch example.test\nnameserver 10.0.0.1\n nameserver ::1 # v6\n\
                    nameserver fe80::1%eth0\nnameserver bogus\nnameserver 10.0.0.2\nnameserver 10.0.0.3\n";
        assert_eq!(
            parse_resolv_conf(text),
            vec![
                "10.0.0.1:53".parse().unwrap(),
                "[::1]:53".parse().unwrap(),
                "10.0.0.2:53".parse().unwrap(),
            ]
        );
        assert_eq!(
            nameservers_from_setting("127.0.0.1:5353"),
            Ok(vec!["127.0.0.1:5353".parse().unwrap()])
        );
        assert!(nameservers_from_setting("localhost").is_err());
    }

    proptest! {
        #[test]
        fn decode_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..600)) {
            let q = question("example.test", QueryType::Mx);
            let _ = decode_response(&bytes, u16::from_be_bytes([bytes.first().copied().unwrap_or(0), bytes.get(1).copied().unwrap_or(0)]), &q);
        }

        #[test]
        fn decode_never_panics_on_mutated_answers(
            flips in proptest::collection::vec((any::<usize>(), any::<u8>()), 1..8),
            cut in any::<usize>(),
        ) {
            let q = question("example.test", QueryType::Mx);
            let mut message = response(5, &q, ResponseCode::NoError);
            message.add_answer(mx("example.test.", 60, 10, "mx.example.test."));
            message.add_authority(soa("example.test.", 60, 60));
            let mut bytes = message.to_vec().unwrap();
            for (at, value) in flips {
                let len = bytes.len();
                bytes[at % len] = value;
            }
            let cut = cut % (bytes.len() + 1);
            let _ = decode_response(&bytes[..cut], 5, &q);
        }

        #[test]
        fn mx_answers_round_trip(records in proptest::collection::vec((any::<u16>(), "[a-z]{1,10}"), 1..10)) {
            let q = question("example.test", QueryType::Mx);
            let mut message = response(6, &q, ResponseCode::NoError);
            for (preference, host) in &records {
                message.add_answer(mx("example.test.", 60, *preference, &format!("{host}.example.test.")));
            }
            let expected: Vec<(u16, String)> = records.iter().map(|(p, h)| (*p, format!("{h}.example.test"))).collect();
            let expected: Vec<(u16, &str)> = expected.iter().map(|(p, h)| (*p, h.as_str())).collect();
            prop_assert_eq!(decode(&message, 6, &q), answer(exchanges(&expected), 60));
        }
    }

    fn run_local<T: 'static>(work: impl std::future::Future<Output = T> + 'static) -> T {
        glommio::LocalExecutorBuilder::default()
            .make()
            .expect("executor")
            .run(work)
    }

    fn fast_config(servers: Vec<SocketAddr>) -> ResolverConfig {
        ResolverConfig {
            query_timeout: Duration::from_millis(300),
            ..ResolverConfig::new(servers)
        }
    }

    fn zone() -> Zone {
        let mut zone = Zone::default();
        zone.mx(
            "example.test",
            &[(10, "mx1.example.test"), (20, "mx2.example.test")],
        );
        zone.mx("nomail.test", &[(0, ".")]);
        zone.a("mx1.example.test", "127.0.0.2");
        zone.a("implicit.test", "127.0.0.3");
        zone.aaaa("implicit.test", "::1");
        zone.servfail("broken.test");
        zone.truncate("big.test");
        zone.mx("big.test", &[(5, "mx.big.test")]);
        zone
    }

    #[test]
    fn resolver_against_a_fake_dns_on_loopback() {
        run_local(async {
            let server = fake_dns::spawn(zone());
            let resolver = Resolver::new(fast_config(vec![server.addr]));
            assert_eq!(
                resolver.resolve_mx("Example.test").await,
                Ok(MxAnswer::Exchanges(vec![
                    MxRecord {
                        preference: 10,
                        exchange: "mx1.example.test".into()
                    },
                    MxRecord {
                        preference: 20,
                        exchange: "mx2.example.test".into()
                    },
                ]))
            );
            assert_eq!(
                resolver.resolve_mx("nomail.test").await,
                Ok(MxAnswer::NullMx)
            );
            assert_eq!(
                resolver.resolve_mx("implicit.test").await,
                Ok(MxAnswer::NoMx)
            );
            assert_eq!(
                resolver.resolve_addrs("implicit.test").await,
                Ok(vec!["127.0.0.3".parse().unwrap(), "::1".parse().unwrap()])
            );
            assert_eq!(
                resolver.resolve_mx("missing.test").await,
                Err(DnsError::NxDomain("missing.test".into()))
            );
            assert_eq!(
                resolver.resolve_addrs("missing.test").await,
                Err(DnsError::NxDomain("missing.test".into()))
            );
            assert!(matches!(
                resolver.resolve_mx("broken.test").await,
                Err(DnsError::ServerFailure(_))
            ));
            // The truncated UDP answer is retried over TCP on the same server.
            let before_tcp = server.tcp_queries.get();
            assert_eq!(
                resolver.resolve_mx("big.test").await,
                Ok(MxAnswer::Exchanges(vec![MxRecord {
                    preference: 5,
                    exchange: "mx.big.test".into()
                }]))
            );
            assert_eq!(server.tcp_queries.get(), before_tcp + 1);
            // Cached: asking again sends nothing, negative answers included.
            let sent = resolver.queries_sent();
            let udp = server.udp_queries.get();
            resolver.resolve_mx("example.test").await.unwrap();
            resolver.resolve_mx("missing.test").await.unwrap_err();
            assert_eq!(resolver.queries_sent(), sent);
            assert_eq!(server.udp_queries.get(), udp);
        });
    }

    #[test]
    fn resolver_tries_the_next_nameserver_after_servfail() {
        run_local(async {
            let mut failing = Zone::default();
            failing.servfail("example.test");
            let failing = fake_dns::spawn(failing);
            let good = fake_dns::spawn(zone());
            let resolver = Resolver::new(fast_config(vec![failing.addr, good.addr]));
            assert_eq!(
                resolver.resolve_mx("example.test").await.map(|_| ()),
                Ok(())
            );
            assert_eq!(failing.udp_queries.get(), 1);
            assert_eq!(good.udp_queries.get(), 1);
            // SERVFAIL is not cached: the next lookup asks again (and fails over again).
            let broken = Resolver::new(fast_config(vec![failing.addr]));
            for _ in 0..2 {
                assert!(matches!(
                    broken.resolve_mx("example.test").await,
                    Err(DnsError::ServerFailure(_))
                ));
            }
            assert_eq!(broken.queries_sent(), 2 * DEFAULT_QUERY_ROUNDS as u64);
        });
    }

    #[test]
    fn query_sockets_never_share_a_port() {
        run_local(async {
            // With SO_REUSEPORT, 1,000 live sockets share ports a dozen times or more.
            let sockets: Vec<_> = (0..1000)
                .map(|_| exclusive_udp_socket("127.0.0.1:0".parse().unwrap()).unwrap())
                .collect();
            let ports: std::collections::HashSet<u16> = sockets
                .iter()
                .map(|s| s.local_addr().unwrap().port())
                .collect();
            assert_eq!(ports.len(), sockets.len());
        });
    }

    #[test]
    fn resolver_moves_on_from_a_silent_nameserver_and_times_out() {
        run_local(async {
            let silent = exclusive_udp_socket("127.0.0.1:0".parse().unwrap()).unwrap();
            let silent_addr = silent.local_addr().unwrap();
            let server = fake_dns::spawn(zone());
            let resolver = Resolver::new(fast_config(vec![silent_addr, server.addr]));
            assert_eq!(
                resolver.resolve_mx("nomail.test").await,
                Ok(MxAnswer::NullMx)
            );

            let only_silent = Resolver::new(ResolverConfig {
                rounds: 2,
                ..fast_config(vec![silent_addr])
            });
            let started = Instant::now();
            assert_eq!(
                only_silent.resolve_mx("example.test").await,
                Err(DnsError::Timeout)
            );
            assert!(started.elapsed() >= Duration::from_millis(600));
            assert_eq!(only_silent.queries_sent(), 2);
            drop(silent);
        });
    }
}
