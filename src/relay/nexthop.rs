//! Where to send mail for a domain: the MX answer turned into an ordered list of hosts
//! (RFC 5321 §5.1), with RFC 7505 null MX and mail-loop checks. Pure: the random order
//! among equal preferences comes from an injected [`Rng`], addresses from the caller.
//!
//! Loop detection, two levels (SPEC §5):
//! - by name: an MX whose exchange is our `hostname` means we are an MX of the domain.
//!   As RFC 5321 §5.1 says, we drop it and every MX of equal or lower preference (a backup
//!   MX hands mail up to better ones, never down); if nothing is left the mail would come
//!   back to us: bounce.
//! - by address: a host that resolves only to an address and port ringmail listens on is
//!   us under another name: bounce.
//!
//! Both bounce with `554 5.4.6` ("routing loop detected", RFC 3463 §3.5). We chose 5.4.6
//! over 5.3.5 ("system incorrectly configured") because the fault is in the routing
//! (the domain's MX records point back at this host), not in this system's configuration,
//! and 5.4.6 is what Postfix and Exim report for the same condition.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use rand::seq::SliceRandom;
use rand::Rng;

use super::client::Reply;
use super::dns::MxAnswer;

/// Most hosts tried for one domain; more cannot be tried within one delivery attempt.
pub const MAX_NEXT_HOPS: usize = 16;

/// A host to connect to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hop {
    /// A host name to resolve (A/AAAA), or an IP literal (a smarthost given by address).
    pub host: String,
    /// TCP port to dial (`relay.port`, or the smarthost's).
    pub port: u16,
}

impl Hop {
    /// The address when `host` is an IP literal (then no DNS lookup is needed).
    pub fn literal_ip(&self) -> Option<IpAddr> {
        self.host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .parse()
            .ok()
    }
}

/// The decision for one domain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Route {
    /// Try these hosts in order; each host's addresses in turn.
    Hops(Vec<Hop>),
    /// Do not try at all: bounce every recipient of the domain with this reply.
    Bounce(Reply),
}

/// The parts of the configuration next-hop selection needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NextHopPolicy {
    /// Our `hostname`: an MX with this name is us.
    pub hostname: String,
    /// `relay.port`: the port dialled at every MX host.
    pub relay_port: u16,
    /// `relay.smarthost`, parsed: when set, every domain goes there and MX is not looked up.
    pub smarthost: Option<Hop>,
    /// Every SMTP listen address of this process; a hop resolving to one is a loop.
    pub own_listeners: Vec<SocketAddr>,
    /// Addresses of this host's interfaces (caller's choice, e.g. from getifaddrs at start):
    /// with a listener on 0.0.0.0 / ::, these are ours too. Loopback always is.
    pub own_addresses: Vec<IpAddr>,
}

/// Parse `relay.smarthost`: "" is none; "host:port", "1.2.3.4:port" or `[v6]:port`.
pub fn parse_smarthost(setting: &str) -> Result<Option<Hop>, String> {
    if setting.is_empty() {
        return Ok(None);
    }
    let bad = || format!("relay.smarthost: {setting:?} is not host:port");
    let (host, port) = setting.rsplit_once(':').ok_or_else(bad)?;
    let port: u16 = port.parse().map_err(|_| bad())?;
    let bare = host.trim_start_matches('[').trim_end_matches(']');
    let is_ip = bare.parse::<IpAddr>().is_ok();
    let is_name = !bare.is_empty()
        && bare.len() <= 253
        && bare
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.');
    if port == 0 || !(is_ip || is_name) || (host.starts_with('[') && !is_ip) {
        return Err(bad());
    }
    Ok(Some(Hop {
        host: bare.to_ascii_lowercase(),
        port,
    }))
}

/// The smarthost route, when one is configured: it overrides MX entirely, so the caller
/// asks this first and skips the MX lookup when it answers.
pub fn smarthost_route(policy: &NextHopPolicy) -> Option<Route> {
    policy
        .smarthost
        .as_ref()
        .map(|hop| Route::Hops(vec![hop.clone()]))
}

/// The route for an address literal, "[192.0.2.1]" or "[IPv6:2001:db8::1]" (RFC 5321
/// §4.1.3): that address itself, without DNS. `None` for a domain name.
pub fn address_literal_route(domain: &str, policy: &NextHopPolicy) -> Option<Route> {
    let inner = domain.strip_prefix('[')?.strip_suffix(']')?;
    let ip = match inner.get(..5) {
        Some(tag) if tag.eq_ignore_ascii_case("IPv6:") => {
            inner[5..].parse::<Ipv6Addr>().ok().map(IpAddr::V6)
        }
        _ => inner.parse::<Ipv4Addr>().ok().map(IpAddr::V4),
    };
    Some(match ip {
        Some(ip) => Route::Hops(vec![Hop {
            host: ip.to_string(),
            port: policy.relay_port,
        }]),
        None => Route::Bounce(Reply::local(
            550,
            format!("5.1.3 unusable address literal {domain}"),
        )),
    })
}

fn same_host(a: &str, b: &str) -> bool {
    a.trim_end_matches('.')
        .eq_ignore_ascii_case(b.trim_end_matches('.'))
}

/// The route for `domain` given its MX answer (RFC 5321 §5.1, RFC 7505).
pub fn route_for_domain(
    domain: &str,
    mx: &MxAnswer,
    policy: &NextHopPolicy,
    rng: &mut impl Rng,
) -> Route {
    if let Some(route) = smarthost_route(policy) {
        return route;
    }
    let exchanges = match mx {
        MxAnswer::NullMx => {
            return Route::Bounce(Reply::local(
                556,
                format!("5.1.10 domain {domain} accepts no mail (null MX)"),
            ))
        }
        // Implicit MX: the domain itself, preference 0.
        MxAnswer::NoMx => {
            return if same_host(domain, &policy.hostname) {
                Route::Bounce(loop_reply(domain))
            } else {
                Route::Hops(vec![Hop {
                    host: domain.trim_end_matches('.').to_ascii_lowercase(),
                    port: policy.relay_port,
                }])
            };
        }
        MxAnswer::Exchanges(exchanges) => exchanges,
    };
    let mut sorted = exchanges.clone();
    sorted.shuffle(rng);
    // Stable: the shuffle decides the order among equal preferences.
    sorted.sort_by_key(|mx| mx.preference);
    if let Some(ours) = sorted
        .iter()
        .find(|mx| same_host(&mx.exchange, &policy.hostname))
    {
        let ours = ours.preference;
        sorted.retain(|mx| mx.preference < ours);
    }
    let mut hops: Vec<Hop> = Vec::new();
    for mx in sorted {
        if hops.len() == MAX_NEXT_HOPS {
            break;
        }
        if !mx.exchange.is_empty() && !hops.iter().any(|hop| same_host(&hop.host, &mx.exchange)) {
            hops.push(Hop {
                host: mx.exchange,
                port: policy.relay_port,
            });
        }
    }
    if hops.is_empty() {
        return Route::Bounce(loop_reply(domain));
    }
    Route::Hops(hops)
}

fn loop_reply(domain: &str) -> Reply {
    Reply::local(
        554,
        format!("5.4.6 mail for {domain} loops back to myself (MX points to this host)"),
    )
}

/// What to dial for one hop, given the addresses its name resolved to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HopTargets {
    /// Connect to these, in order (our own addresses removed).
    Connect(Vec<SocketAddr>),
    /// Every address is one of ours: a mail loop, bounce with this reply.
    Loop(Reply),
    /// The name has no address: try the next hop (the reply is for logs and, if it was the
    /// last hop, the deferral).
    NoAddress(Reply),
}

/// The socket addresses to dial for `hop`, our own listeners excluded.
pub fn hop_targets(hop: &Hop, addrs: &[IpAddr], policy: &NextHopPolicy) -> HopTargets {
    if addrs.is_empty() {
        return HopTargets::NoAddress(Reply::local(
            451,
            format!("4.4.4 host {} has no address", hop.host),
        ));
    }
    let targets: Vec<SocketAddr> = addrs
        .iter()
        .map(|&ip| SocketAddr::new(ip, hop.port))
        .filter(|target| !is_own_address(*target, policy))
        .collect();
    if targets.is_empty() {
        return HopTargets::Loop(Reply::local(
            554,
            format!(
                "5.4.6 mail loops back to myself: {} is this host's listening address",
                hop.host
            ),
        ));
    }
    HopTargets::Connect(targets)
}

/// Whether ringmail itself listens at `target`.
pub fn is_own_address(target: SocketAddr, policy: &NextHopPolicy) -> bool {
    policy.own_listeners.iter().any(|listener| {
        if listener.port() != target.port() {
            return false;
        }
        if listener.ip() == target.ip() {
            return true;
        }
        // A wildcard listener answers on loopback and on every interface address (of the
        // same family, or any with a dual-stack "::" listener).
        let family_matches = listener.is_ipv6() || target.is_ipv4();
        listener.ip().is_unspecified()
            && family_matches
            && (target.ip().is_loopback()
                || target.ip().is_unspecified()
                || policy.own_addresses.contains(&target.ip()))
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::relay::dns::MxRecord;
    use rand::rngs::StdRng;
    use rand::SeedableRng;

    fn policy() -> NextHopPolicy {
        NextHopPolicy {
            hostname: "relay.example.test".into(),
            relay_port: 25,
            smarthost: None,
            own_listeners: vec![
                "127.0.0.1:2525".parse().unwrap(),
                "0.0.0.0:25".parse().unwrap(),
            ],
            own_addresses: vec!["192.0.2.10".parse().unwrap()],
        }
    }

    fn mx(list: &[(u16, &str)]) -> MxAnswer {
        MxAnswer::Exchanges(
            list.iter()
                .map(|&(preference, exchange)| MxRecord {
                    preference,
                    exchange: exchange.into(),
                })
                .collect(),
        )
    }

    fn hosts(route: &Route) -> Vec<&str> {
        match route {
            Route::Hops(hops) => hops.iter().map(|hop| hop.host.as_str()).collect(),
            Route::Bounce(_) => vec![],
        }
    }

    fn bounce_status(route: &Route) -> Option<String> {
        match route {
            Route::Bounce(reply) => Some(format!("{} {}", reply.code, reply.enhanced_status()?)),
            Route::Hops(_) => None,
        }
    }

    #[test]
    fn route_table() {
        let mut rng = StdRng::seed_from_u64(7);
        // (MX answer, expected hosts in order, expected bounce "code status")
        let cases: Vec<(MxAnswer, Vec<&str>, Option<&str>)> = vec![
            (
                mx(&[(20, "b.far.test"), (10, "a.far.test")]),
                vec!["a.far.test", "b.far.test"],
                None,
            ),
            (MxAnswer::NoMx, vec!["far.test"], None),
            (MxAnswer::NullMx, vec![], Some("556 5.1.10")),
            // We are the best MX: nothing better to hand to, a loop.
            (
                mx(&[(10, "Relay.Example.Test."), (20, "b.far.test")]),
                vec![],
                Some("554 5.4.6"),
            ),
            // We are a backup MX: hand up to the better one only.
            (
                mx(&[
                    (10, "a.far.test"),
                    (20, "relay.example.test"),
                    (30, "c.far.test"),
                ]),
                vec!["a.far.test"],
                None,
            ),
            // An equal-preference peer of ours is dropped too (RFC 5321 §5.1).
            (
                mx(&[
                    (10, "a.far.test"),
                    (20, "relay.example.test"),
                    (20, "b.far.test"),
                ]),
                vec!["a.far.test"],
                None,
            ),
            // Duplicates are tried once.
            (
                mx(&[(10, "a.far.test"), (20, "A.far.test")]),
                vec!["a.far.test"],
                None,
            ),
        ];
        for (answer, expected_hosts, expected_bounce) in cases {
            let route = route_for_domain("far.test", &answer, &policy(), &mut rng);
            assert_eq!(hosts(&route), expected_hosts, "{answer:?}");
            assert_eq!(
                bounce_status(&route).as_deref(),
                expected_bounce,
                "{answer:?}"
            );
        }
        let implicit_loop =
            route_for_domain("relay.example.test", &MxAnswer::NoMx, &policy(), &mut rng);
        assert_eq!(bounce_status(&implicit_loop).as_deref(), Some("554 5.4.6"));
        let null = route_for_domain("far.test", &MxAnswer::NullMx, &policy(), &mut rng);
        assert_eq!(
            null,
            Route::Bounce(Reply::local(
                556,
                "5.1.10 domain far.test accepts no mail (null MX)"
            ))
        );
    }

    #[test]
    fn equal_preferences_are_shuffled_and_lower_ones_stay_behind() {
        let answer = mx(&[(10, "a"), (10, "b"), (10, "c"), (5, "first"), (20, "last")]);
        let mut seen_first_of_equals = std::collections::HashSet::new();
        for seed in 0..64 {
            let route = route_for_domain(
                "far.test",
                &answer,
                &policy(),
                &mut StdRng::seed_from_u64(seed),
            );
            let order: Vec<String> = hosts(&route).into_iter().map(String::from).collect();
            assert_eq!(order[0], "first");
            assert_eq!(order[4], "last");
            let mut middle = order[1..4].to_vec();
            seen_first_of_equals.insert(middle[0].clone());
            middle.sort();
            assert_eq!(middle, vec!["a", "b", "c"]);
        }
        assert_eq!(
            seen_first_of_equals.len(),
            3,
            "every equal host comes first sometimes"
        );
    }

    #[test]
    fn smarthost_overrides_everything() {
        let policy = NextHopPolicy {
            smarthost: parse_smarthost("smart.example.test:2526").unwrap(),
            ..policy()
        };
        let expected = Route::Hops(vec![Hop {
            host: "smart.example.test".into(),
            port: 2526,
        }]);
        let mut rng = StdRng::seed_from_u64(1);
        for answer in [
            MxAnswer::NullMx,
            MxAnswer::NoMx,
            mx(&[(10, "relay.example.test")]),
        ] {
            assert_eq!(
                route_for_domain("far.test", &answer, &policy, &mut rng),
                expected
            );
        }
        assert_eq!(smarthost_route(&policy), Some(expected));
    }

    #[test]
    fn smarthost_parse_table() {
        type Expected = Result<Option<(&'static str, u16)>, ()>;
        let cases: &[(&str, Expected)] = &[
            ("", Ok(None)),
            ("smart.test:25", Ok(Some(("smart.test", 25)))),
            ("127.0.0.2:2525", Ok(Some(("127.0.0.2", 2525)))),
            ("[::1]:25", Ok(Some(("::1", 25)))),
            ("smart.test", Err(())),
            ("smart.test:0", Err(())),
            ("smart.test:99999", Err(())),
            (":25", Err(())),
            ("[smart.test]:25", Err(())),
            ("bad host:25", Err(())),
        ];
        for (input, expected) in cases {
            let got = parse_smarthost(input)
                .map(|hop| hop.map(|hop| (hop.host, hop.port)))
                .map_err(|_| ());
            let expected = expected.map(|hop| hop.map(|(host, port)| (host.to_string(), port)));
            assert_eq!(got, expected, "{input:?}");
        }
        let literal = parse_smarthost("[::1]:25").unwrap().unwrap();
        assert_eq!(literal.literal_ip(), Some("::1".parse().unwrap()));
        assert_eq!(
            Hop {
                host: "a.test".into(),
                port: 25
            }
            .literal_ip(),
            None
        );
    }

    #[test]
    fn address_literals_route_to_their_address() {
        let policy = policy();
        let hop = |domain: &str| match address_literal_route(domain, &policy) {
            Some(Route::Hops(hops)) => Some(hops[0].literal_ip().unwrap()),
            Some(Route::Bounce(reply)) => panic!("{domain}: {reply:?}"),
            None => None,
        };
        assert_eq!(hop("[192.0.2.1]"), Some("192.0.2.1".parse().unwrap()));
        assert_eq!(
            hop("[IPv6:2001:db8::1]"),
            Some("2001:db8::1".parse().unwrap())
        );
        assert_eq!(hop("[ipv6:::1]"), Some("::1".parse().unwrap()));
        assert_eq!(hop("example.test"), None);
        for bad in ["[2001:db8::1]", "[192.0.2.999]", "[]", "[IPv6:192.0.2.1]"] {
            assert!(
                matches!(address_literal_route(bad, &policy), Some(Route::Bounce(_))),
                "{bad}"
            );
        }
        assert_eq!(
            address_literal_route("[192.0.2.1]", &policy),
            Some(Route::Hops(vec![Hop {
                host: "192.0.2.1".into(),
                port: policy.relay_port
            }]))
        );
    }

    #[test]
    fn address_loop_table() {
        let hop = |port| Hop {
            host: "mx.far.test".into(),
            port,
        };
        let ip = |text: &str| text.parse::<IpAddr>().unwrap();
        let sock = |text: &str| text.parse::<SocketAddr>().unwrap();
        let cases: Vec<(Hop, Vec<IpAddr>, HopTargets)> = vec![
            // Our explicit listener.
            (
                hop(2525),
                vec![ip("127.0.0.1")],
                HopTargets::Loop(Reply::local(
                    554,
                    "5.4.6 mail loops back to myself: mx.far.test is this host's listening address",
                )),
            ),
            // Same address, other port: a different server (tests run fake MXs this way).
            (
                hop(2526),
                vec![ip("127.0.0.1")],
                HopTargets::Connect(vec![sock("127.0.0.1:2526")]),
            ),
            // The wildcard listener on 25 covers loopback and our interface address ...
            (
                hop(25),
                vec![ip("127.0.0.2"), ip("192.0.2.10"), ip("192.0.2.99")],
                HopTargets::Connect(vec![sock("192.0.2.99:25")]),
            ),
            // ... but not IPv6 (a 0.0.0.0 listener is IPv4 only).
            (
                hop(25),
                vec![ip("::1")],
                HopTargets::Connect(vec![sock("[::1]:25")]),
            ),
            (
                hop(25),
                vec![],
                HopTargets::NoAddress(Reply::local(451, "4.4.4 host mx.far.test has no address")),
            ),
        ];
        for (hop, addrs, expected) in cases {
            assert_eq!(
                hop_targets(&hop, &addrs, &policy()),
                expected,
                "{hop:?} {addrs:?}"
            );
        }
        let dual_stack = NextHopPolicy {
            own_listeners: vec![sock("[::]:25")],
            ..policy()
        };
        assert!(is_own_address(sock("127.0.0.1:25"), &dual_stack));
        assert!(is_own_address(sock("[::1]:25"), &dual_stack));
        assert!(!is_own_address(sock("198.51.100.1:25"), &dual_stack));
    }
}
