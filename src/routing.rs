//! Recipient routing: which addresses are ours, which are relayed, which are refused.
//!
//! Pure: built once from configuration, asked once per RCPT. Domains and local parts
//! match case-insensitively (SPEC §2); the canonical spelling of a local mailbox is the
//! one in the configuration, so every shard indexes a mailbox under one name.

#![warn(missing_docs)]

use std::borrow::Cow;
use std::collections::{HashMap, HashSet};

/// Where a recipient's copy of a message goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Route {
    /// Into a local mailbox.
    Local {
        /// The configured address of the mailbox (canonical spelling).
        mailbox: String,
    },
    /// To the relay queue for delivery to the domain's MX hosts.
    Remote {
        /// The destination domain, lower-cased (the relay's queue key).
        domain: String,
    },
}

/// Why a recipient is refused at RCPT.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum RouteRefusal {
    /// A local domain without such a user: 550 5.1.1.
    #[error("no such user in a local domain")]
    UnknownUser,
    /// A remote domain and the client may not relay: 554 5.7.1.
    #[error("relaying denied")]
    RelayDenied,
}

/// A configuration that cannot route mail.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DirectoryError {
    /// A user address that is not `local@domain`.
    #[error("user address {0:?} is not local@domain")]
    BadUserAddress(String),
    /// A user whose domain is not in `local_domains`: mail for it could never arrive.
    #[error("user {0:?} is not in any of local_domains")]
    UserOutsideLocalDomains(String),
    /// `postmaster` names an address in a local domain that is not a user.
    #[error("postmaster {0:?} is in a local domain but is not a configured user")]
    UnknownPostmaster(String),
}

/// Local domains and users, as configured.
#[derive(Debug, Clone)]
pub struct Directory {
    /// Lower-cased local domains.
    local_domains: HashSet<String>,
    /// Lower-cased address → configured address.
    users: HashMap<String, String>,
    /// Where postmaster mail goes; `None` when there is nobody to receive it.
    postmaster: Option<Route>,
}

impl Directory {
    /// Builds the directory. `postmaster` "" means the first user (SPEC §2); a postmaster
    /// outside the local domains is relayed to (RFC 5321 §4.5.1 requires that postmaster
    /// mail is accepted, so it is routed whatever the client's relay rights).
    pub fn new(
        local_domains: &[String],
        user_addresses: &[String],
        postmaster: &str,
    ) -> Result<Directory, DirectoryError> {
        let local_domains: HashSet<String> =
            local_domains.iter().map(|d| d.to_lowercase()).collect();
        let mut users = HashMap::new();
        for address in user_addresses {
            let (_, domain) = split_address(address)
                .ok_or_else(|| DirectoryError::BadUserAddress(address.clone()))?;
            if !local_domains.contains(&domain.to_lowercase()) {
                return Err(DirectoryError::UserOutsideLocalDomains(address.clone()));
            }
            users.insert(address.to_lowercase(), address.clone());
        }
        let postmaster = if postmaster.is_empty() {
            user_addresses.first().map(|first| Route::Local {
                mailbox: first.clone(),
            })
        } else {
            let (_, domain) = split_address(postmaster)
                .ok_or_else(|| DirectoryError::BadUserAddress(postmaster.to_string()))?;
            let domain = domain.to_lowercase();
            if local_domains.contains(&domain) {
                let mailbox = users
                    .get(&postmaster.to_lowercase())
                    .ok_or_else(|| DirectoryError::UnknownPostmaster(postmaster.to_string()))?;
                Some(Route::Local {
                    mailbox: mailbox.clone(),
                })
            } else {
                Some(Route::Remote { domain })
            }
        };
        Ok(Directory {
            local_domains,
            users,
            postmaster,
        })
    }

    /// Routes one recipient address as received (`local@domain`, or bare `postmaster`).
    pub fn route(&self, addr: &str, relay_allowed: bool) -> Result<Route, RouteRefusal> {
        let Some((local, domain)) = split_address(addr) else {
            return if addr.eq_ignore_ascii_case("postmaster") {
                self.postmaster.clone().ok_or(RouteRefusal::UnknownUser)
            } else {
                Err(RouteRefusal::UnknownUser)
            };
        };
        let domain = domain.to_lowercase();
        if self.local_domains.contains(&domain) {
            let local = unquoted_local_part(local);
            let key = match &local {
                Cow::Borrowed(_) => addr.to_lowercase(),
                Cow::Owned(plain) => format!("{plain}@{domain}").to_lowercase(),
            };
            if let Some(mailbox) = self.users.get(&key) {
                return Ok(Route::Local {
                    mailbox: mailbox.clone(),
                });
            }
            if local.eq_ignore_ascii_case("postmaster") {
                return self.postmaster.clone().ok_or(RouteRefusal::UnknownUser);
            }
            return Err(RouteRefusal::UnknownUser);
        }
        if relay_allowed {
            Ok(Route::Remote { domain })
        } else {
            Err(RouteRefusal::RelayDenied)
        }
    }

    /// True when `domain` is one of ours (any case).
    pub fn is_local_domain(&self, domain: &str) -> bool {
        self.local_domains.contains(&domain.to_lowercase())
    }
}

/// A quoted local part that needs no quoting (`"alice"`, `"a\lice"`) names the same mailbox
/// as the bare one (RFC 5321 §4.1.2); any other is kept as it is.
fn unquoted_local_part(local: &str) -> Cow<'_, str> {
    let Some(inner) = local.strip_prefix('"').and_then(|l| l.strip_suffix('"')) else {
        return Cow::Borrowed(local);
    };
    let mut plain = String::with_capacity(inner.len());
    let mut chars = inner.chars();
    while let Some(c) = chars.next() {
        let c = match c {
            '\\' => match chars.next() {
                Some(escaped) => escaped,
                None => return Cow::Borrowed(local),
            },
            c => c,
        };
        plain.push(c);
    }
    let is_dot_atom = plain
        .split('.')
        .all(|atom| !atom.is_empty() && atom.bytes().all(crate::smtp::address::is_atext));
    if is_dot_atom {
        Cow::Owned(plain)
    } else {
        Cow::Borrowed(local)
    }
}

/// Splits at the last '@' (a quoted local part may itself hold '@').
fn split_address(addr: &str) -> Option<(&str, &str)> {
    let (local, domain) = addr.rsplit_once('@')?;
    if local.is_empty() || domain.is_empty() {
        return None;
    }
    Some((local, domain))
}

/// The shard that owns `mailbox`'s index: a stable hash (FNV-1a 64) of the lower-cased
/// address, so every shard and every restart agree. std's hasher is randomised per
/// process and would scatter a mailbox across restarts. `shards == 0` is treated as 1.
pub fn owner_shard(mailbox: &str, shards: usize) -> usize {
    const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
    const FNV_PRIME: u64 = 0x0000_0100_0000_01b3;
    let mut hash = FNV_OFFSET;
    for c in mailbox.chars().flat_map(char::to_lowercase) {
        let mut utf8 = [0u8; 4];
        for &b in c.encode_utf8(&mut utf8).as_bytes() {
            hash ^= u64::from(b);
            hash = hash.wrapping_mul(FNV_PRIME);
        }
    }
    (hash % shards.max(1) as u64) as usize
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn directory(postmaster: &str) -> Directory {
        Directory::new(
            &["Example.test".into(), "local.test".into()],
            &["Alice@example.test".into(), "bob@local.test".into()],
            postmaster,
        )
        .unwrap()
    }

    fn local(mailbox: &str) -> Result<Route, RouteRefusal> {
        Ok(Route::Local {
            mailbox: mailbox.into(),
        })
    }

    #[test]
    fn routes() {
        let dir = directory("");
        let table: &[(&str, bool, Result<Route, RouteRefusal>)] = &[
            ("alice@example.test", false, local("Alice@example.test")),
            ("ALICE@EXAMPLE.TEST", false, local("Alice@example.test")),
            ("bob@Local.Test", true, local("bob@local.test")),
            ("carol@example.test", false, Err(RouteRefusal::UnknownUser)),
            ("carol@example.test", true, Err(RouteRefusal::UnknownUser)),
            // Quoting that changes nothing names the same mailbox; real quoting does not.
            ("\"alice\"@example.test", false, local("Alice@example.test")),
            (
                "\"Al\\ice\"@Example.test",
                false,
                local("Alice@example.test"),
            ),
            (
                "\"post.master\"@example.test",
                false,
                Err(RouteRefusal::UnknownUser),
            ),
            (
                "\"PostMaster\"@local.test",
                false,
                local("Alice@example.test"),
            ),
            (
                "\"al ice\"@example.test",
                false,
                Err(RouteRefusal::UnknownUser),
            ),
            (
                "\"alice@x\"@example.test",
                false,
                Err(RouteRefusal::UnknownUser),
            ),
            ("\"\"@example.test", false, Err(RouteRefusal::UnknownUser)),
            ("alice@local.test", false, Err(RouteRefusal::UnknownUser)),
            (
                "postmaster@example.test",
                false,
                local("Alice@example.test"),
            ),
            ("PostMaster@LOCAL.test", false, local("Alice@example.test")),
            ("postmaster", false, local("Alice@example.test")),
            ("POSTMASTER", false, local("Alice@example.test")),
            ("someone", false, Err(RouteRefusal::UnknownUser)),
            ("x@remote.test", false, Err(RouteRefusal::RelayDenied)),
            (
                "x@Remote.Test",
                true,
                Ok(Route::Remote {
                    domain: "remote.test".into(),
                }),
            ),
            (
                "postmaster@remote.test",
                false,
                Err(RouteRefusal::RelayDenied),
            ),
        ];
        for (addr, relay, want) in table {
            assert_eq!(dir.route(addr, *relay), *want, "{addr} relay={relay}");
        }
    }

    #[test]
    fn configured_postmaster_wins() {
        let dir = directory("BOB@local.test");
        assert_eq!(
            dir.route("postmaster@example.test", false),
            local("bob@local.test")
        );
        let dir = directory("hostmaster@elsewhere.test");
        assert_eq!(
            dir.route("postmaster", false),
            Ok(Route::Remote {
                domain: "elsewhere.test".into()
            })
        );
    }

    #[test]
    fn no_users_means_no_postmaster() {
        let dir = Directory::new(&["x.test".into()], &[], "").unwrap();
        assert_eq!(
            dir.route("postmaster@x.test", false),
            Err(RouteRefusal::UnknownUser)
        );
    }

    #[test]
    fn bad_configurations_are_named() {
        let domains = ["x.test".to_string()];
        assert_eq!(
            Directory::new(&domains, &["nodomain".into()], "").unwrap_err(),
            DirectoryError::BadUserAddress("nodomain".into())
        );
        assert_eq!(
            Directory::new(&domains, &["a@y.test".into()], "").unwrap_err(),
            DirectoryError::UserOutsideLocalDomains("a@y.test".into())
        );
        assert_eq!(
            Directory::new(&domains, &["a@x.test".into()], "pm@x.test").unwrap_err(),
            DirectoryError::UnknownPostmaster("pm@x.test".into())
        );
    }

    #[test]
    fn owner_shard_is_stable_and_case_insensitive() {
        // Pinned values: changing the hash would move every mailbox index on upgrade.
        assert_eq!(owner_shard("u7@bench.test", 1), 0);
        assert_eq!(owner_shard("", 0), 0);
        let pinned: Vec<usize> = ["a@x.test", "b@x.test", "c@x.test", "u7@bench.test"]
            .iter()
            .map(|a| owner_shard(a, 16))
            .collect();
        assert_eq!(
            pinned,
            vec![
                owner_shard("A@X.TEST", 16),
                owner_shard("B@x.test", 16),
                owner_shard("c@X.test", 16),
                owner_shard("U7@Bench.Test", 16)
            ]
        );
        let fnv = |s: &str| {
            s.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
                (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
            })
        };
        assert_eq!(
            owner_shard("u7@bench.test", 7) as u64,
            fnv("u7@bench.test") % 7
        );
    }

    proptest! {
        #[test]
        fn owner_shard_in_range(addr in "\\PC{0,80}", shards in 1usize..64) {
            let shard = owner_shard(&addr, shards);
            prop_assert!(shard < shards);
            prop_assert_eq!(shard, owner_shard(&addr.to_ascii_uppercase(), shards));
        }

        #[test]
        fn route_never_panics(addr in "\\PC{0,80}", relay in any::<bool>()) {
            let _ = directory("").route(&addr, relay);
        }
    }
}
