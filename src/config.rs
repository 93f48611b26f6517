//! The one configuration struct, its defaults (SPEC §2) and its loader.
//!
//! The loader reads the file into a TOML table and walks it key by key instead of handing it to
//! serde's derive: that way *every* problem — each unknown key, each bad value — is collected and
//! reported at once, each naming the file and the dotted key, and nothing can panic.

use std::collections::BTreeSet;
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Shards beyond this are a configuration mistake, not a machine we will meet.
pub const MAX_SHARDS: usize = 1024;

/// Everything ringmail runs on. Built only through [`Config::load`] or [`Config::defaults`], so
/// every instance has passed validation.
#[derive(Clone, Debug, PartialEq)]
pub struct Config {
    /// Named in the banner, in `Received:` headers and in HELO when relaying.
    pub hostname: String,
    /// Root of the shard logs: one sub-directory per shard, plus the instance lock.
    pub data_dir: PathBuf,
    /// Number of shards as configured; 0 means one per online CPU (see [`Config::shard_count`]).
    pub shards: usize,
    /// How long SIGTERM waits for transactions in flight before closing them.
    pub shutdown_grace: Duration,
    /// Where Prometheus scrapes `/metrics`; `None` serves no metrics.
    pub metrics_listen: Option<SocketAddr>,
    /// Mail for these domains (lower-cased) is delivered to mailboxes.
    pub local_domains: Vec<String>,
    /// Receives `postmaster@<each local domain>`; empty means the first user.
    pub postmaster: String,
    /// The mailbox owners; also the POP3 and SMTP AUTH accounts.
    pub users: Vec<User>,
    pub smtp: SmtpConfig,
    pub pop3: Pop3Config,
    pub relay: RelayConfig,
    pub tls: TlsConfig,
}

/// One mailbox owner.
#[derive(Clone, Debug, PartialEq)]
pub struct User {
    /// The address as configured; also the POP3 user name.
    pub address: String,
    /// argon2id PHC string, as `ringmail hash-password` prints it.
    pub password_hash: String,
}

#[derive(Clone, Debug, PartialEq)]
pub struct SmtpConfig {
    /// MX ingest listeners (port 25 in production).
    pub listen: Vec<SocketAddr>,
    /// Submission listeners: AUTH required, may relay once authenticated.
    pub submission_listen: Vec<SocketAddr>,
    /// Implicit-TLS submission listeners.
    pub tls_listen: Vec<SocketAddr>,
    /// Largest message accepted, advertised as SIZE.
    pub max_message_size: u64,
    /// Recipients per transaction before `452 4.5.3`.
    pub max_recipients: usize,
    /// Concurrent SMTP connections per process before `421 4.7.0`.
    pub max_connections: usize,
    /// Concurrent SMTP connections from one client address.
    pub max_connections_per_ip: usize,
    /// Clients that may relay without AUTH.
    pub relay_networks: Vec<IpNetwork>,
    /// A silent client is disconnected after this long.
    pub idle_timeout: Duration,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Pop3Config {
    pub listen: Vec<SocketAddr>,
    pub tls_listen: Vec<SocketAddr>,
    pub idle_timeout: Duration,
}

#[derive(Clone, Debug, PartialEq)]
pub struct RelayConfig {
    /// Where DNS questions go.
    pub resolver: Resolver,
    /// TCP port dialled at each MX host.
    pub port: u16,
    /// Send all relayed mail to this `host:port` instead of the MX hosts.
    pub smarthost: Option<String>,
    /// Delays between delivery attempts; the last repeats.
    pub retry_schedule: Vec<Duration>,
    /// A recipient still undelivered after this long bounces.
    pub max_queue_lifetime: Duration,
    pub max_connections_per_domain: usize,
    pub connect_timeout: Duration,
}

/// Which nameserver the relay asks.
#[derive(Clone, Debug, PartialEq)]
pub enum Resolver {
    /// The nameservers of `/etc/resolv.conf`.
    System,
    /// One nameserver (tests point this at a fake DNS on loopback).
    Server(SocketAddr),
}

#[derive(Clone, Debug, PartialEq, Default)]
pub struct TlsConfig {
    /// PEM certificate chain; TLS is on when both this and `key` are set.
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
}

impl TlsConfig {
    pub fn enabled(&self) -> bool {
        self.cert.is_some() && self.key.is_some()
    }
}

/// An IP network in CIDR notation, e.g. `127.0.0.0/8`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IpNetwork {
    pub addr: IpAddr,
    pub prefix_len: u8,
}

impl IpNetwork {
    pub fn contains(&self, ip: IpAddr) -> bool {
        // A v4 client reaching a v6 socket shows up as ::ffff:a.b.c.d; judge it as v4.
        let ip = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(ip),
            v4 => v4,
        };
        match (self.addr, ip) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => {
                prefix_matches(&net.octets(), &ip.octets(), self.prefix_len)
            }
            (IpAddr::V6(net), IpAddr::V6(ip)) => {
                prefix_matches(&net.octets(), &ip.octets(), self.prefix_len)
            }
            _ => false,
        }
    }
}

fn prefix_matches(net: &[u8], ip: &[u8], prefix_len: u8) -> bool {
    let full_bytes = usize::from(prefix_len / 8);
    if net[..full_bytes] != ip[..full_bytes] {
        return false;
    }
    let rest_bits = prefix_len % 8;
    if rest_bits == 0 {
        return true;
    }
    let mask = 0xffu8 << (8 - rest_bits);
    net[full_bytes] & mask == ip[full_bytes] & mask
}

impl std::str::FromStr for IpNetwork {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let (addr, len) = s
            .split_once('/')
            .ok_or_else(|| format!("{s:?} is not in CIDR notation (address/prefix-length)"))?;
        let addr: IpAddr = addr
            .parse()
            .map_err(|_| format!("{addr:?} is not an IP address"))?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix_len: u8 = len
            .parse()
            .ok()
            .filter(|l| *l <= max)
            .ok_or_else(|| format!("prefix length {len:?} must be 0..={max}"))?;
        Ok(IpNetwork { addr, prefix_len })
    }
}

impl fmt::Display for IpNetwork {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix_len)
    }
}

/// Why a configuration could not be used. Its `Display` is the one message the user sees.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{file}: cannot read: {source}")]
    Unreadable {
        file: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{file}: line {line}, column {column}: {message}")]
    Syntax {
        file: String,
        line: usize,
        column: usize,
        message: String,
    },
    #[error("{}", render_problems(file, problems))]
    Invalid {
        file: String,
        problems: Vec<Problem>,
    },
}

/// One bad or unknown key.
#[derive(Debug, Clone, PartialEq)]
pub struct Problem {
    /// Dotted path, e.g. `smtp.listen[1]`.
    pub key: String,
    pub message: String,
}

fn render_problems(file: &str, problems: &[Problem]) -> String {
    let mut out = format!(
        "{file}: {} configuration problem{}:",
        problems.len(),
        if problems.len() == 1 { "" } else { "s" }
    );
    for p in problems {
        out.push_str(&format!("\n  {}: {}", p.key, p.message));
    }
    out
}

impl Config {
    /// The embedded defaults of SPEC §2, which `ringmail serve` without `--config` runs on.
    pub fn defaults() -> Config {
        Config::from_table("<embedded defaults>", &toml::Table::new())
            .expect("the embedded defaults are valid")
    }

    /// Reads and validates a configuration file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let file = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Unreadable {
            file: file.clone(),
            source,
        })?;
        Config::parse(&file, &text)
    }

    /// Validates configuration text; `file` only names it in messages.
    pub fn parse(file: &str, text: &str) -> Result<Config, ConfigError> {
        let table: toml::Table = toml::from_str(text).map_err(|e| {
            let (line, column) = e
                .span()
                .map(|span| line_and_column(text, span.start))
                .unwrap_or((1, 1));
            ConfigError::Syntax {
                file: file.to_string(),
                line,
                column,
                message: e.message().to_string(),
            }
        })?;
        Config::from_table(file, &table)
    }

    fn from_table(file: &str, table: &toml::Table) -> Result<Config, ConfigError> {
        let mut problems = Vec::new();
        let config = {
            let mut root = Section::new("", table, &mut problems);
            let hostname = root.string("hostname", default_hostname);
            let data_dir = PathBuf::from(root.string("data_dir", || "./ringmail-data".into()));
            let shards = root.integer("shards", 0, 0, MAX_SHARDS as u64) as usize;
            let shutdown_grace = root.seconds("shutdown_grace_secs", 30.0);
            let metrics_listen = root.optional_socket_addr("metrics_listen");
            let local_domains: Vec<String> = root
                .strings("local_domains", &["localhost"])
                .into_iter()
                .map(|d| d.to_ascii_lowercase())
                .collect();
            let postmaster = root.string("postmaster", String::new);
            let users = root.users();
            let smtp = {
                let mut s = root.section("smtp");
                let smtp = SmtpConfig {
                    listen: s.socket_addrs("listen", &["127.0.0.1:2525"]),
                    submission_listen: s.socket_addrs("submission_listen", &[]),
                    tls_listen: s.socket_addrs("tls_listen", &[]),
                    max_message_size: s.integer("max_message_size", 26_214_400, 1, 1 << 40),
                    // The envelope stores the count (and each recipient's index) in 16 bits.
                    max_recipients: s.integer(
                        "max_recipients",
                        100,
                        1,
                        crate::envelope::MAX_RECIPIENTS as u64,
                    ) as usize,
                    max_connections: s.integer("max_connections", 10_000, 1, 10_000_000) as usize,
                    max_connections_per_ip: s.integer("max_connections_per_ip", 100, 1, 10_000_000)
                        as usize,
                    relay_networks: s.networks("relay_networks", &["127.0.0.0/8", "::1/128"]),
                    idle_timeout: s.seconds("idle_timeout_secs", 300.0),
                };
                s.finish();
                smtp
            };
            let pop3 = {
                let mut s = root.section("pop3");
                let pop3 = Pop3Config {
                    listen: s.socket_addrs("listen", &["127.0.0.1:1100"]),
                    tls_listen: s.socket_addrs("tls_listen", &[]),
                    idle_timeout: s.seconds("idle_timeout_secs", 600.0),
                };
                s.finish();
                pop3
            };
            let relay = {
                let mut s = root.section("relay");
                let relay = RelayConfig {
                    resolver: s.resolver("resolver"),
                    port: s.integer("port", 25, 1, 65535) as u16,
                    smarthost: s.smarthost("smarthost"),
                    retry_schedule: s.seconds_list(
                        "retry_schedule_secs",
                        &[60.0, 300.0, 900.0, 1800.0, 3600.0, 7200.0, 14400.0],
                    ),
                    max_queue_lifetime: s.seconds("max_queue_lifetime_secs", 432_000.0),
                    max_connections_per_domain: s.integer(
                        "max_connections_per_domain",
                        20,
                        1,
                        100_000,
                    ) as usize,
                    connect_timeout: s.seconds("connect_timeout_secs", 30.0),
                };
                s.finish();
                relay
            };
            let tls = {
                let mut s = root.section("tls");
                let tls = TlsConfig {
                    cert: s.optional_path("cert"),
                    key: s.optional_path("key"),
                };
                s.finish();
                tls
            };
            root.finish();
            Config {
                hostname,
                data_dir,
                shards,
                shutdown_grace,
                metrics_listen,
                local_domains,
                postmaster,
                users,
                smtp,
                pop3,
                relay,
                tls,
            }
        };
        config.cross_check(&mut problems);
        if problems.is_empty() {
            Ok(config)
        } else {
            Err(ConfigError::Invalid {
                file: file.to_string(),
                problems,
            })
        }
    }

    /// Rules that involve more than one key.
    fn cross_check(&self, problems: &mut Vec<Problem>) {
        let mut problem = |key: &str, message: String| {
            problems.push(Problem {
                key: key.to_string(),
                message,
            })
        };
        if self.hostname.is_empty() || !is_domain_like(&self.hostname) {
            problem(
                "hostname",
                format!("{:?} is not a host name", self.hostname),
            );
        }
        for (i, domain) in self.local_domains.iter().enumerate() {
            if !is_domain_like(domain) {
                problem(
                    &format!("local_domains[{i}]"),
                    format!("{domain:?} is not a domain name"),
                );
            }
        }
        let mut seen = BTreeSet::new();
        for (i, user) in self.users.iter().enumerate() {
            match split_address(&user.address) {
                None => problem(
                    &format!("users[{i}].address"),
                    format!(
                        "{:?} is not an address of the form local@domain",
                        user.address
                    ),
                ),
                Some((_, domain)) if !self.is_local_domain(domain) => problem(
                    &format!("users[{i}].address"),
                    format!(
                        "the domain of {:?} is not one of local_domains, so no mail would reach it",
                        user.address
                    ),
                ),
                Some(_) => {}
            }
            if !seen.insert(user.address.to_ascii_lowercase()) {
                problem(
                    &format!("users[{i}].address"),
                    format!("{:?} is configured twice", user.address),
                );
            }
            if !user.password_hash.starts_with("$argon2id$") {
                problem(
                    &format!("users[{i}].password_hash"),
                    "must be an argon2id PHC string from `ringmail hash-password`".into(),
                );
            }
        }
        if !self.postmaster.is_empty() && split_address(&self.postmaster).is_none() {
            problem(
                "postmaster",
                format!(
                    "{:?} is not an address of the form local@domain",
                    self.postmaster
                ),
            );
        }
        if let Some(bad) = self
            .smtp
            .submission_listen
            .iter()
            .find(|a| !a.ip().is_loopback())
        {
            if !self.tls.enabled() {
                problem(
                    "smtp.submission_listen",
                    format!("{bad} is off loopback, so passwords would cross the network in the clear: set [tls] cert and key"),
                );
            }
        }
        if !self.tls.enabled() {
            if !self.smtp.tls_listen.is_empty() {
                problem("smtp.tls_listen", "needs [tls] cert and key".into());
            }
            if !self.pop3.tls_listen.is_empty() {
                problem("pop3.tls_listen", "needs [tls] cert and key".into());
            }
        }
        if self.tls.cert.is_some() != self.tls.key.is_some() {
            let missing = if self.tls.cert.is_some() {
                "tls.key"
            } else {
                "tls.cert"
            };
            problem(missing, "set both tls.cert and tls.key, or neither".into());
        }
        if let Some((_, domain)) = split_address(&self.postmaster) {
            if self.is_local_domain(domain)
                && !self
                    .users
                    .iter()
                    .any(|u| u.address.eq_ignore_ascii_case(&self.postmaster))
            {
                problem(
                    "postmaster",
                    format!(
                        "{:?} is in a local domain but is not one of the users",
                        self.postmaster
                    ),
                );
            }
        }
        // Every message accepted must fit one log record, dot-stuffing and envelope included
        // (the session counts bodies before stuffing); a setting that could break this
        // is refused here rather than answered with 552 for mail within the advertised SIZE.
        let record_limit = crate::store::record::MAX_PAYLOAD_BYTES;
        let worst_record = crate::envelope::max_message_record_bytes(
            self.smtp.max_message_size,
            self.smtp.max_recipients,
        );
        if worst_record > record_limit {
            let (key, fix) = match crate::envelope::largest_message_size_fitting(
                self.smtp.max_recipients,
                record_limit,
            ) {
                Some(largest) => ("smtp.max_message_size", format!("at most {largest} fits")),
                None => ("smtp.max_recipients", "lower max_recipients".to_string()),
            };
            problem(
                key,
                format!(
                    "{} with max_recipients = {}: the largest message accepted, dot-stuffed and \
                     with its envelope, could need a log record of {worst_record} bytes, over \
                     the log's limit of {record_limit}; {fix}",
                    self.smtp.max_message_size, self.smtp.max_recipients
                ),
            );
        }
        let mut listeners = BTreeSet::new();
        for (key, addrs) in self.listeners() {
            for addr in addrs {
                if addr.port() != 0 && !listeners.insert(*addr) {
                    problem(key, format!("{addr} is configured for two listeners"));
                }
            }
        }
    }

    /// Every listener key with its addresses, in a fixed order.
    pub fn listeners(&self) -> [(&'static str, &Vec<SocketAddr>); 5] {
        [
            ("smtp.listen", &self.smtp.listen),
            ("smtp.submission_listen", &self.smtp.submission_listen),
            ("smtp.tls_listen", &self.smtp.tls_listen),
            ("pop3.listen", &self.pop3.listen),
            ("pop3.tls_listen", &self.pop3.tls_listen),
        ]
    }

    pub fn is_local_domain(&self, domain: &str) -> bool {
        self.local_domains
            .iter()
            .any(|d| d.eq_ignore_ascii_case(domain))
    }

    /// The number of shards to run: `shards`, or one per online CPU when it is 0.
    pub fn shard_count(&self) -> usize {
        if self.shards > 0 {
            self.shards
        } else {
            std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(1)
        }
    }

    /// The effective configuration as TOML, every key shown (what `check-config` prints).
    pub fn to_toml(&self) -> String {
        use toml::Value;
        fn addrs(list: &[SocketAddr]) -> Value {
            Value::Array(list.iter().map(|a| Value::String(a.to_string())).collect())
        }
        fn secs(d: Duration) -> Value {
            Value::Float(d.as_secs_f64())
        }
        fn strings<T: ToString>(list: &[T]) -> Value {
            Value::Array(list.iter().map(|s| Value::String(s.to_string())).collect())
        }
        fn int(n: u64) -> Value {
            Value::Integer(i64::try_from(n).unwrap_or(i64::MAX))
        }
        fn path(p: &Option<PathBuf>) -> Value {
            Value::String(
                p.as_ref()
                    .map(|p| p.display().to_string())
                    .unwrap_or_default(),
            )
        }
        let mut root = toml::Table::new();
        root.insert("hostname".into(), Value::String(self.hostname.clone()));
        root.insert(
            "data_dir".into(),
            Value::String(self.data_dir.display().to_string()),
        );
        root.insert("shards".into(), int(self.shards as u64));
        root.insert("shutdown_grace_secs".into(), secs(self.shutdown_grace));
        root.insert(
            "metrics_listen".into(),
            Value::String(
                self.metrics_listen
                    .map(|a| a.to_string())
                    .unwrap_or_default(),
            ),
        );
        root.insert("local_domains".into(), strings(&self.local_domains));
        root.insert("postmaster".into(), Value::String(self.postmaster.clone()));
        let users = self
            .users
            .iter()
            .map(|u| {
                let mut t = toml::Table::new();
                t.insert("address".into(), Value::String(u.address.clone()));
                t.insert(
                    "password_hash".into(),
                    Value::String(u.password_hash.clone()),
                );
                Value::Table(t)
            })
            .collect();
        root.insert("users".into(), Value::Array(users));

        let mut smtp = toml::Table::new();
        smtp.insert("listen".into(), addrs(&self.smtp.listen));
        smtp.insert(
            "submission_listen".into(),
            addrs(&self.smtp.submission_listen),
        );
        smtp.insert("tls_listen".into(), addrs(&self.smtp.tls_listen));
        smtp.insert("max_message_size".into(), int(self.smtp.max_message_size));
        smtp.insert(
            "max_recipients".into(),
            int(self.smtp.max_recipients as u64),
        );
        smtp.insert(
            "max_connections".into(),
            int(self.smtp.max_connections as u64),
        );
        smtp.insert(
            "max_connections_per_ip".into(),
            int(self.smtp.max_connections_per_ip as u64),
        );
        smtp.insert("relay_networks".into(), strings(&self.smtp.relay_networks));
        smtp.insert("idle_timeout_secs".into(), secs(self.smtp.idle_timeout));
        root.insert("smtp".into(), Value::Table(smtp));

        let mut pop3 = toml::Table::new();
        pop3.insert("listen".into(), addrs(&self.pop3.listen));
        pop3.insert("tls_listen".into(), addrs(&self.pop3.tls_listen));
        pop3.insert("idle_timeout_secs".into(), secs(self.pop3.idle_timeout));
        root.insert("pop3".into(), Value::Table(pop3));

        let mut relay = toml::Table::new();
        relay.insert(
            "resolver".into(),
            Value::String(match &self.relay.resolver {
                Resolver::System => "system".into(),
                Resolver::Server(addr) => addr.to_string(),
            }),
        );
        relay.insert("port".into(), int(u64::from(self.relay.port)));
        relay.insert(
            "smarthost".into(),
            Value::String(self.relay.smarthost.clone().unwrap_or_default()),
        );
        relay.insert(
            "retry_schedule_secs".into(),
            Value::Array(self.relay.retry_schedule.iter().map(|d| secs(*d)).collect()),
        );
        relay.insert(
            "max_queue_lifetime_secs".into(),
            secs(self.relay.max_queue_lifetime),
        );
        relay.insert(
            "max_connections_per_domain".into(),
            int(self.relay.max_connections_per_domain as u64),
        );
        relay.insert(
            "connect_timeout_secs".into(),
            secs(self.relay.connect_timeout),
        );
        root.insert("relay".into(), Value::Table(relay));

        let mut tls = toml::Table::new();
        tls.insert("cert".into(), path(&self.tls.cert));
        tls.insert("key".into(), path(&self.tls.key));
        root.insert("tls".into(), Value::Table(tls));

        toml::to_string(&root).expect("a TOML table always serializes")
    }
}

/// 1-based line and column of a byte offset, for syntax errors.
fn line_and_column(text: &str, offset: usize) -> (usize, usize) {
    let before = &text[..offset.min(text.len())];
    let line = before.matches('\n').count() + 1;
    let column = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
    (line, column)
}

fn default_hostname() -> String {
    let mut buf = [0u8; 256];
    // SAFETY: the buffer is valid for its length; gethostname NUL-terminates within it on success.
    let rc = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) };
    let name = if rc == 0 {
        let end = buf.iter().position(|b| *b == 0).unwrap_or(buf.len());
        String::from_utf8_lossy(&buf[..end]).into_owned()
    } else {
        String::new()
    };
    if name.is_empty() || !is_domain_like(&name) {
        "localhost".into()
    } else {
        name
    }
}

/// Splits `local@domain` at its last `@`; both parts must be non-empty.
pub fn split_address(address: &str) -> Option<(&str, &str)> {
    let (local, domain) = address.rsplit_once('@')?;
    (!local.is_empty() && is_domain_like(domain)).then_some((local, domain))
}

/// A loose check for a DNS name: labels of letters, digits and hyphens (and UTF-8 for IDNs).
fn is_domain_like(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 255
        && name.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && !label.starts_with('-')
                && label
                    .chars()
                    .all(|c| c.is_alphanumeric() || c == '-' || c == '_')
        })
}

/// One TOML table being read: remembers which keys were taken so the rest are reported unknown.
struct Section<'a> {
    path: String,
    table: &'a toml::Table,
    taken: BTreeSet<String>,
    problems: &'a mut Vec<Problem>,
}

impl<'a> Section<'a> {
    fn new(path: &str, table: &'a toml::Table, problems: &'a mut Vec<Problem>) -> Self {
        Section {
            path: path.to_string(),
            table,
            taken: BTreeSet::new(),
            problems,
        }
    }

    fn key(&self, key: &str) -> String {
        if self.path.is_empty() {
            key.to_string()
        } else {
            format!("{}.{key}", self.path)
        }
    }

    fn problem(&mut self, key: &str, message: impl Into<String>) {
        let key = self.key(key);
        self.problems.push(Problem {
            key,
            message: message.into(),
        });
    }

    fn get(&mut self, key: &str) -> Option<&'a toml::Value> {
        self.taken.insert(key.to_string());
        self.table.get(key)
    }

    fn section(&mut self, key: &str) -> Section<'_> {
        static EMPTY: std::sync::OnceLock<toml::Table> = std::sync::OnceLock::new();
        let empty = EMPTY.get_or_init(toml::Table::new);
        let path = self.key(key);
        let table = match self.get(key) {
            Some(toml::Value::Table(t)) => t,
            Some(other) => {
                self.problem(key, format!("must be a table, found {}", other.type_str()));
                empty
            }
            None => empty,
        };
        Section::new(&path, table, self.problems)
    }

    /// Reports every key nobody asked for.
    fn finish(self) {
        for key in self.table.keys() {
            if !self.taken.contains(key) {
                let key = if self.path.is_empty() {
                    key.clone()
                } else {
                    format!("{}.{key}", self.path)
                };
                self.problems.push(Problem {
                    key,
                    message: "unknown key".into(),
                });
            }
        }
    }

    fn string(&mut self, key: &str, default: impl FnOnce() -> String) -> String {
        match self.get(key) {
            None => default(),
            Some(toml::Value::String(s)) => s.clone(),
            Some(other) => {
                self.problem(key, format!("must be a string, found {}", other.type_str()));
                default()
            }
        }
    }

    fn integer(&mut self, key: &str, default: u64, min: u64, max: u64) -> u64 {
        match self.get(key) {
            None => default,
            Some(toml::Value::Integer(n))
                if (min as i128..=max as i128).contains(&(*n as i128)) =>
            {
                *n as u64
            }
            Some(toml::Value::Integer(n)) => {
                self.problem(key, format!("{n} is out of range {min}..={max}"));
                default
            }
            Some(other) => {
                self.problem(
                    key,
                    format!("must be an integer, found {}", other.type_str()),
                );
                default
            }
        }
    }

    fn seconds(&mut self, key: &str, default: f64) -> Duration {
        match self.get(key) {
            None => Duration::from_secs_f64(default),
            Some(value) => match to_seconds(value) {
                Ok(d) => d,
                Err(message) => {
                    self.problem(key, message);
                    Duration::from_secs_f64(default)
                }
            },
        }
    }

    fn seconds_list(&mut self, key: &str, default: &[f64]) -> Vec<Duration> {
        let fallback = || {
            default
                .iter()
                .map(|s| Duration::from_secs_f64(*s))
                .collect()
        };
        match self.get(key) {
            None => fallback(),
            Some(toml::Value::Array(items)) if items.is_empty() => {
                self.problem(key, "needs at least one step");
                fallback()
            }
            Some(toml::Value::Array(items)) => {
                let mut out = Vec::new();
                for (i, item) in items.iter().enumerate() {
                    match to_seconds(item) {
                        Ok(d) => out.push(d),
                        Err(message) => self.problem(&format!("{key}[{i}]"), message),
                    }
                }
                out
            }
            Some(other) => {
                self.problem(
                    key,
                    format!("must be an array of seconds, found {}", other.type_str()),
                );
                fallback()
            }
        }
    }

    fn strings(&mut self, key: &str, default: &[&str]) -> Vec<String> {
        let fallback = || default.iter().map(|s| s.to_string()).collect();
        match self.get(key) {
            None => fallback(),
            Some(toml::Value::Array(items)) => {
                let mut out = Vec::new();
                for (i, item) in items.iter().enumerate() {
                    match item {
                        toml::Value::String(s) => out.push(s.clone()),
                        other => self.problem(
                            &format!("{key}[{i}]"),
                            format!("must be a string, found {}", other.type_str()),
                        ),
                    }
                }
                out
            }
            Some(other) => {
                self.problem(
                    key,
                    format!("must be an array of strings, found {}", other.type_str()),
                );
                fallback()
            }
        }
    }

    fn parsed_list<T: std::str::FromStr>(
        &mut self,
        key: &str,
        default: &[&str],
        what: &str,
    ) -> Vec<T> {
        let raw = self.strings(key, default);
        let mut out = Vec::new();
        for (i, s) in raw.iter().enumerate() {
            match s.parse() {
                Ok(v) => out.push(v),
                Err(_) => self.problem(&format!("{key}[{i}]"), format!("{s:?} is not {what}")),
            }
        }
        out
    }

    fn socket_addrs(&mut self, key: &str, default: &[&str]) -> Vec<SocketAddr> {
        self.parsed_list(
            key,
            default,
            "an IP:PORT address (e.g. 127.0.0.1:2525 or [::1]:2525)",
        )
    }

    fn networks(&mut self, key: &str, default: &[&str]) -> Vec<IpNetwork> {
        let raw = self.strings(key, default);
        let mut out = Vec::new();
        for (i, s) in raw.iter().enumerate() {
            match s.parse() {
                Ok(n) => out.push(n),
                Err(message) => self.problem(&format!("{key}[{i}]"), message),
            }
        }
        out
    }

    fn optional_socket_addr(&mut self, key: &str) -> Option<SocketAddr> {
        let raw = self.string(key, String::new);
        if raw.is_empty() {
            return None;
        }
        match raw.parse() {
            Ok(a) => Some(a),
            Err(_) => {
                self.problem(
                    key,
                    format!("{raw:?} is not an IP:PORT address (or \"\" for none)"),
                );
                None
            }
        }
    }

    fn optional_path(&mut self, key: &str) -> Option<PathBuf> {
        let raw = self.string(key, String::new);
        (!raw.is_empty()).then(|| PathBuf::from(raw))
    }

    fn resolver(&mut self, key: &str) -> Resolver {
        let raw = self.string(key, || "system".into());
        if raw == "system" {
            return Resolver::System;
        }
        match raw.parse() {
            Ok(addr) => Resolver::Server(addr),
            Err(_) => {
                self.problem(
                    key,
                    format!("{raw:?} must be \"system\" or a nameserver's IP:PORT"),
                );
                Resolver::System
            }
        }
    }

    fn smarthost(&mut self, key: &str) -> Option<String> {
        let raw = self.string(key, String::new);
        if raw.is_empty() {
            return None;
        }
        let valid = raw.rsplit_once(':').is_some_and(|(host, port)| {
            let host = host.trim_start_matches('[').trim_end_matches(']');
            port.parse::<u16>().is_ok_and(|p| p > 0)
                && (host.parse::<IpAddr>().is_ok() || is_domain_like(host))
        });
        if valid {
            Some(raw)
        } else {
            self.problem(
                key,
                format!("{raw:?} must be \"host:port\" (or \"\" for MX delivery)"),
            );
            None
        }
    }

    fn users(&mut self) -> Vec<User> {
        let items = match self.get("users") {
            None => return Vec::new(),
            Some(toml::Value::Array(items)) => items,
            Some(other) => {
                self.problem(
                    "users",
                    format!(
                        "must be an array of tables ([[users]]), found {}",
                        other.type_str()
                    ),
                );
                return Vec::new();
            }
        };
        let mut users = Vec::new();
        for (i, item) in items.iter().enumerate() {
            let key = format!("users[{i}]");
            let toml::Value::Table(table) = item else {
                self.problem(&key, "must be a table with address and password_hash");
                continue;
            };
            let path = self.key(&key);
            let mut s = Section::new(&path, table, self.problems);
            let address = s.string("address", String::new);
            let password_hash = s.string("password_hash", String::new);
            s.finish();
            users.push(User {
                address,
                password_hash,
            });
        }
        users
    }
}

fn to_seconds(value: &toml::Value) -> Result<Duration, String> {
    let secs = match value {
        toml::Value::Integer(n) => *n as f64,
        toml::Value::Float(f) => *f,
        other => {
            return Err(format!(
                "must be seconds (a number), found {}",
                other.type_str()
            ))
        }
    };
    // A day's worth of years is plenty; beyond that Duration math could overflow.
    if secs.is_finite() && secs > 0.0 && secs <= 1.0e9 {
        Ok(Duration::from_secs_f64(secs))
    } else {
        Err(format!("{secs} must be a number of seconds above 0"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn problems(text: &str) -> Vec<Problem> {
        match Config::parse("t.toml", text) {
            Err(ConfigError::Invalid { problems, .. }) => problems,
            other => panic!("expected problems, got {other:?}"),
        }
    }

    #[test]
    fn defaults_match_the_spec() {
        let c = Config::defaults();
        assert_eq!(c.data_dir, PathBuf::from("./ringmail-data"));
        assert_eq!(c.shards, 0);
        assert_eq!(c.shutdown_grace, Duration::from_secs(30));
        assert_eq!(c.metrics_listen, None);
        assert_eq!(c.local_domains, vec!["localhost"]);
        assert_eq!(c.smtp.listen, vec!["127.0.0.1:2525".parse().unwrap()]);
        assert_eq!(c.smtp.max_message_size, 26_214_400);
        assert_eq!(c.smtp.max_recipients, 100);
        assert_eq!(c.smtp.max_connections, 10_000);
        assert_eq!(c.smtp.max_connections_per_ip, 100);
        assert_eq!(c.smtp.idle_timeout, Duration::from_secs(300));
        assert_eq!(c.pop3.listen, vec!["127.0.0.1:1100".parse().unwrap()]);
        assert_eq!(c.pop3.idle_timeout, Duration::from_secs(600));
        assert_eq!(c.relay.resolver, Resolver::System);
        assert_eq!(c.relay.port, 25);
        assert_eq!(c.relay.retry_schedule.len(), 7);
        assert_eq!(c.relay.max_queue_lifetime, Duration::from_secs(432_000));
        assert_eq!(c.relay.max_connections_per_domain, 20);
        assert_eq!(c.relay.connect_timeout, Duration::from_secs(30));
        assert!(!c.tls.enabled());
    }

    #[test]
    fn effective_configuration_round_trips() {
        let c = Config::defaults();
        let again = Config::parse("printed", &c.to_toml()).unwrap();
        assert_eq!(c, again);
    }

    #[test]
    fn fractional_seconds_are_accepted() {
        let c = Config::parse(
            "t.toml",
            "[relay]\nretry_schedule_secs = [0.2, 1]\nmax_queue_lifetime_secs = 2.5\n",
        )
        .unwrap();
        assert_eq!(
            c.relay.retry_schedule,
            vec![Duration::from_millis(200), Duration::from_secs(1)]
        );
        assert_eq!(c.relay.max_queue_lifetime, Duration::from_millis(2500));
    }

    #[test]
    fn every_problem_is_reported_at_once() {
        let found = problems(
            "bogus = 1\nshards = \"two\"\n[smtp]\nlisten = [\"nope\"]\nextra = true\n[relay]\nresolver = \"x\"\n",
        );
        let keys: Vec<&str> = found.iter().map(|p| p.key.as_str()).collect();
        assert!(keys.contains(&"bogus"), "{keys:?}");
        assert!(keys.contains(&"shards"), "{keys:?}");
        assert!(keys.contains(&"smtp.listen[0]"), "{keys:?}");
        assert!(keys.contains(&"smtp.extra"), "{keys:?}");
        assert!(keys.contains(&"relay.resolver"), "{keys:?}");
    }

    #[test]
    fn message_sizes_must_fit_a_log_record() {
        let largest = crate::envelope::largest_message_size_fitting(
            100,
            crate::store::record::MAX_PAYLOAD_BYTES,
        )
        .unwrap();
        let at = |size: u64, recipients: u64| {
            Config::parse(
                "t.toml",
                &format!("[smtp]\nmax_message_size = {size}\nmax_recipients = {recipients}\n"),
            )
        };
        assert!(at(largest, 100).is_ok());
        let found = problems(&format!(
            "[smtp]\nmax_message_size = {}\nmax_recipients = 100\n",
            largest + 1
        ));
        assert_eq!(found.len(), 1, "{found:?}");
        assert_eq!(found[0].key, "smtp.max_message_size");
        assert!(
            found[0]
                .message
                .contains(&format!("at most {largest} fits")),
            "{}",
            found[0].message
        );
        // The configured maximum, 2^40, never fits; more recipients leave less room.
        assert!(at(1 << 40, 1).is_err());
        assert!(at(largest, 65_535).is_err());
        assert!(at(largest - 65_535 * 645, 65_535).is_ok());
        // The envelope counts recipients in 16 bits.
        let found = problems("[smtp]\nmax_recipients = 65536\n");
        assert_eq!(found[0].key, "smtp.max_recipients");
        assert!(at(1000, 65_535).is_ok());
    }

    #[test]
    fn syntax_errors_name_the_line() {
        let err = Config::parse("t.toml", "hostname = \"a\"\nshards = = 2\n").unwrap_err();
        match err {
            ConfigError::Syntax { line, .. } => assert_eq!(line, 2),
            other => panic!("{other:?}"),
        }
        assert!(err.to_string().starts_with("t.toml: line 2"));
    }

    #[test]
    fn submission_off_loopback_needs_tls() {
        let found = problems("[smtp]\nsubmission_listen = [\"0.0.0.0:587\"]\n");
        assert_eq!(found[0].key, "smtp.submission_listen");
        assert!(found[0].message.contains("in the clear"), "{found:?}");
    }

    #[test]
    fn tls_enables_submission_and_implicit_tls_listeners() {
        let text = "[smtp]\nsubmission_listen = [\"0.0.0.0:587\"]\ntls_listen = [\"0.0.0.0:465\"]\n\
                    [pop3]\ntls_listen = [\"0.0.0.0:995\"]\n[tls]\ncert = \"c.pem\"\nkey = \"k.pem\"\n";
        let c = Config::parse("t.toml", text).unwrap();
        assert!(c.tls.enabled());
        let found = problems("[smtp]\ntls_listen = [\"0.0.0.0:465\"]\n[tls]\ncert = \"c.pem\"\n");
        let keys: Vec<&str> = found.iter().map(|p| p.key.as_str()).collect();
        assert_eq!(keys, ["smtp.tls_listen", "tls.key"]);
    }

    #[test]
    fn users_are_checked() {
        let found = problems(
            "local_domains=[\"example.test\"]\n[[users]]\naddress=\"a@other.test\"\npassword_hash=\"plain\"\ncolour=1\n",
        );
        let keys: Vec<&str> = found.iter().map(|p| p.key.as_str()).collect();
        assert_eq!(
            keys,
            vec![
                "users[0].colour",
                "users[0].address",
                "users[0].password_hash"
            ]
        );
    }

    #[test]
    fn networks_match_prefixes() {
        let n: IpNetwork = "10.1.0.0/15".parse().unwrap();
        assert!(n.contains("10.0.255.1".parse().unwrap()));
        assert!(n.contains("10.1.2.3".parse().unwrap()));
        assert!(!n.contains("10.2.0.0".parse().unwrap()));
        let lo: IpNetwork = "127.0.0.0/8".parse().unwrap();
        assert!(lo.contains("::ffff:127.0.0.9".parse().unwrap()));
        assert!(!lo.contains("::1".parse().unwrap()));
        assert!("1.2.3.4/33".parse::<IpNetwork>().is_err());
        assert!("1.2.3.4".parse::<IpNetwork>().is_err());
    }
}
