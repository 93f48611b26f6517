//! Users and their passwords: argon2id hashing and verification, the user directory built from
//! the configuration, and the SASL PLAIN decoder shared by POP3 and SMTP AUTH.
//!
//! Verification costs tens of milliseconds of CPU by design, so callers on a shard must run
//! [`UserDirectory::verify`] / [`verify_password`] off the executor (glommio's
//! `spawn_blocking`); nothing here does I/O or reads a clock.

use std::collections::HashMap;
use std::sync::OnceLock;

use argon2::password_hash::rand_core::OsRng;
use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use argon2::{Algorithm, Argon2, Params, Version};
use base64ct::{Base64, Encoding};

/// Memory cost of new hashes in KiB (OWASP's argon2id recommendation; SPEC §2 documents it).
pub const HASH_MEMORY_KIB: u32 = 19_456;
/// Time cost (passes over memory) of new hashes.
pub const HASH_ITERATIONS: u32 = 2;
/// Parallelism (lanes) of new hashes.
pub const HASH_LANES: u32 = 1;

/// Largest memory cost we agree to verify against. A hash from the configuration with a larger
/// cost would let one login pin a gigabyte per attempt; we refuse it when loading users.
pub const MAX_VERIFY_MEMORY_KIB: u32 = 262_144;
/// Largest time cost we agree to verify against, for the same reason.
pub const MAX_VERIFY_ITERATIONS: u32 = 16;

/// Longest SASL PLAIN response we decode, in base64 characters. RFC 4616 caps authzid, authcid
/// and password at 255 octets each: 767 octets, 1,024 base64 characters.
pub const MAX_SASL_PLAIN_BASE64_LEN: usize = 1_024;
/// Longest authzid, authcid or password inside a SASL PLAIN response (RFC 4616 §2).
pub const MAX_SASL_PLAIN_FIELD_LEN: usize = 255;

/// Why a password could not be hashed, a stored hash is unusable, or a SASL response is invalid.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum AuthError {
    /// The argon2 implementation refused to hash (a parameter it rejects).
    #[error("cannot hash password: {0}")]
    Hash(String),
    /// A stored hash is not a PHC string we can verify against.
    #[error("invalid password hash: {0}")]
    InvalidHash(String),
    /// A stored hash asks for more memory or time than we allow one login to cost.
    #[error("password hash parameters too costly (m={memory_kib} KiB, t={iterations}); at most m={MAX_VERIFY_MEMORY_KIB}, t={MAX_VERIFY_ITERATIONS}")]
    HashTooCostly {
        /// Memory cost found in the hash, in KiB.
        memory_kib: u32,
        /// Time cost found in the hash.
        iterations: u32,
    },
    /// The same address appears twice among the configured users.
    #[error("user {0} is configured twice")]
    DuplicateUser(String),
    /// The SASL response is not valid base64.
    #[error("SASL response is not valid base64")]
    SaslBase64,
    /// The SASL response is longer than any valid PLAIN response.
    #[error("SASL response too long")]
    SaslTooLong,
    /// The decoded PLAIN message is not `[authzid] NUL authcid NUL password` with sane fields.
    #[error("malformed SASL PLAIN message: {0}")]
    SaslMalformed(&'static str),
}

/// The three fields of a SASL PLAIN message (RFC 4616).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SaslPlain {
    /// Identity to act as; empty means "the same as `authcid`". We only allow that or an exact match.
    pub authzid: String,
    /// Identity whose password is checked: for us, the full mail address.
    pub authcid: String,
    /// The clear-text password.
    pub password: String,
}

fn new_hash_params() -> Params {
    // Constant parameters that the argon2 crate accepts; a failure here is a programming error
    // caught by the unit tests, not a runtime condition.
    Params::new(HASH_MEMORY_KIB, HASH_ITERATIONS, HASH_LANES, None)
        .expect("constant argon2 parameters are valid")
}

/// Hashes `password` with argon2id (m=19456 KiB, t=2, p=1) and a fresh random salt, returning
/// the PHC string that goes into the configuration's `password_hash`.
pub fn hash_password(password: &str) -> Result<String, AuthError> {
    let salt = SaltString::generate(&mut OsRng);
    Argon2::new(Algorithm::Argon2id, Version::V0x13, new_hash_params())
        .hash_password(password.as_bytes(), &salt)
        .map(|hash| hash.to_string())
        .map_err(|e| AuthError::Hash(e.to_string()))
}

/// Checks that `hash` is an argon2 PHC string whose cost we accept, so that a bad
/// configuration is reported at load time instead of failing every login.
pub fn check_hash(hash: &str) -> Result<(), AuthError> {
    let parsed = PasswordHash::new(hash).map_err(|e| AuthError::InvalidHash(e.to_string()))?;
    Algorithm::try_from(parsed.algorithm).map_err(|e| AuthError::InvalidHash(e.to_string()))?;
    let params = Params::try_from(&parsed).map_err(|e| AuthError::InvalidHash(e.to_string()))?;
    if params.m_cost() > MAX_VERIFY_MEMORY_KIB || params.t_cost() > MAX_VERIFY_ITERATIONS {
        return Err(AuthError::HashTooCostly {
            memory_kib: params.m_cost(),
            iterations: params.t_cost(),
        });
    }
    if parsed.hash.is_none() {
        return Err(AuthError::InvalidHash("no hash output".into()));
    }
    Ok(())
}

/// True when `password` matches the PHC string `hash`. An unparsable or too costly hash never
/// matches. Expensive (tens of ms): call it off the executor.
pub fn verify_password(hash: &str, password: &str) -> bool {
    if check_hash(hash).is_err() {
        return false;
    }
    let Ok(parsed) = PasswordHash::new(hash) else {
        return false;
    };
    // Argon2::default() takes the algorithm, version and costs from the PHC string itself.
    Argon2::default()
        .verify_password(password.as_bytes(), &parsed)
        .is_ok()
}

/// Decodes a base64 SASL PLAIN response into its three fields. `authzid` must be empty or equal
/// to `authcid` (we do not support acting as someone else); fields are UTF-8, 1..=255 octets
/// (authzid may be empty), with no NUL.
pub fn decode_sasl_plain(base64: &str) -> Result<SaslPlain, AuthError> {
    let base64 = base64.trim_end_matches([' ', '\t']);
    if base64.len() > MAX_SASL_PLAIN_BASE64_LEN {
        return Err(AuthError::SaslTooLong);
    }
    let mut buffer = [0u8; MAX_SASL_PLAIN_BASE64_LEN / 4 * 3];
    let decoded = Base64::decode(base64, &mut buffer).map_err(|_| AuthError::SaslBase64)?;
    let mut fields = decoded.split(|&b| b == 0);
    let (Some(authzid), Some(authcid), Some(password), None) =
        (fields.next(), fields.next(), fields.next(), fields.next())
    else {
        return Err(AuthError::SaslMalformed(
            "expected authzid NUL authcid NUL password",
        ));
    };
    if authcid.is_empty() || password.is_empty() {
        return Err(AuthError::SaslMalformed("empty user name or password"));
    }
    if [authzid, authcid, password]
        .iter()
        .any(|f| f.len() > MAX_SASL_PLAIN_FIELD_LEN)
    {
        return Err(AuthError::SaslMalformed("field longer than 255 octets"));
    }
    let text = |bytes: &[u8]| {
        std::str::from_utf8(bytes)
            .map(str::to_owned)
            .map_err(|_| AuthError::SaslMalformed("field is not UTF-8"))
    };
    let plain = SaslPlain {
        authzid: text(authzid)?,
        authcid: text(authcid)?,
        password: text(password)?,
    };
    if !plain.authzid.is_empty() && plain.authzid != plain.authcid {
        return Err(AuthError::SaslMalformed(
            "authorization identity differs from authentication identity",
        ));
    }
    Ok(plain)
}

/// Normalises an address for lookup: SPEC §2 says local parts and domains match
/// case-insensitively.
fn lookup_key(address: &str) -> String {
    address.to_lowercase()
}

/// One configured user.
#[derive(Debug, Clone)]
struct UserRecord {
    /// The address as configured: the canonical name of the mailbox, whatever case a client types.
    address: String,
    /// Argon2 PHC string, checked by [`check_hash`] at load time.
    password_hash: String,
}

/// The configured users, looked up case-insensitively by address.
#[derive(Debug, Clone, Default)]
pub struct UserDirectory {
    /// Lower-cased address → user.
    users: HashMap<String, UserRecord>,
}

impl UserDirectory {
    /// Builds the directory from `(address, password_hash)` pairs, refusing unusable hashes and
    /// duplicate addresses so the configuration check can name them.
    pub fn new<I, A, H>(users: I) -> Result<UserDirectory, AuthError>
    where
        I: IntoIterator<Item = (A, H)>,
        A: Into<String>,
        H: Into<String>,
    {
        let mut map = HashMap::new();
        for (address, hash) in users {
            let address = address.into();
            let password_hash = hash.into();
            check_hash(&password_hash)?;
            let key = lookup_key(&address);
            if map.contains_key(&key) {
                return Err(AuthError::DuplicateUser(address));
            }
            map.insert(
                key,
                UserRecord {
                    address,
                    password_hash,
                },
            );
        }
        Ok(UserDirectory { users: map })
    }

    /// Number of configured users.
    pub fn len(&self) -> usize {
        self.users.len()
    }

    /// True when no user is configured.
    pub fn is_empty(&self) -> bool {
        self.users.is_empty()
    }

    /// The configured spelling of `address`, if it is a user: the mailbox name to open after a
    /// successful login, so `Alice@Example.test` and `alice@example.test` share one maildrop.
    pub fn canonical(&self, address: &str) -> Option<&str> {
        self.users
            .get(&lookup_key(address))
            .map(|u| u.address.as_str())
    }

    /// True when `address` is a user and `password` is theirs. For an unknown address it still
    /// runs one argon2 verification against a dummy hash, so response time does not tell an
    /// attacker which addresses exist. Expensive: call it off the executor.
    pub fn verify(&self, address: &str, password: &str) -> bool {
        match self.users.get(&lookup_key(address)) {
            Some(user) => verify_password(&user.password_hash, password),
            None => {
                let _ = verify_password(dummy_hash(), password);
                false
            }
        }
    }
}

/// A hash of a random password, computed once, to spend the same time on unknown users.
fn dummy_hash() -> &'static str {
    static DUMMY: OnceLock<String> = OnceLock::new();
    DUMMY.get_or_init(|| {
        let mut secret = [0u8; 16];
        rand::Rng::fill(&mut rand::thread_rng(), &mut secret[..]);
        let secret: String = secret.iter().map(|b| format!("{b:02x}")).collect();
        hash_password(&secret).unwrap_or_default()
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn b64(bytes: &[u8]) -> String {
        Base64::encode_string(bytes)
    }

    #[test]
    fn hash_then_verify_round_trips_with_documented_parameters() {
        let hash = hash_password("correct horse").unwrap();
        assert!(
            hash.starts_with("$argon2id$v=19$m=19456,t=2,p=1$"),
            "{hash}"
        );
        assert!(verify_password(&hash, "correct horse"));
        assert!(!verify_password(&hash, "correct horsE"));
        assert!(!verify_password(&hash, ""));
    }

    #[test]
    fn hashes_are_salted() {
        assert_ne!(hash_password("x").unwrap(), hash_password("x").unwrap());
    }

    #[test]
    fn unusable_hashes_never_verify_and_are_refused_at_load() {
        let too_costly =
            "$argon2id$v=19$m=1048576,t=2,p=1$c29tZXNhbHQ$RdescudvJCsgt3ub+b+dWRWJTmaaJObG";
        for hash in [
            "",
            "plain",
            "$argon2id$v=19$m=19456",
            "$2b$12$abcdefghijklmnopqrstuv",
            too_costly,
        ] {
            assert!(!verify_password(hash, "x"), "{hash}");
            assert!(UserDirectory::new([("a@b", hash)]).is_err(), "{hash}");
        }
        assert!(matches!(
            check_hash(too_costly),
            Err(AuthError::HashTooCostly {
                memory_kib: 1_048_576,
                iterations: 2
            })
        ));
    }

    #[test]
    fn directory_matches_addresses_case_insensitively_and_keeps_configured_spelling() {
        let hash = hash_password("pw").unwrap();
        let users = UserDirectory::new([("Alice@Example.test", hash.as_str())]).unwrap();
        assert_eq!(
            users.canonical("alice@example.TEST"),
            Some("Alice@Example.test")
        );
        assert_eq!(users.canonical("bob@example.test"), None);
        assert!(users.verify("ALICE@example.test", "pw"));
        assert!(!users.verify("alice@example.test", "PW"));
        assert!(!users.verify("bob@example.test", "pw"));
        assert!(matches!(
            UserDirectory::new([("a@x", hash.as_str()), ("A@X", hash.as_str())]),
            Err(AuthError::DuplicateUser(_))
        ));
    }

    #[test]
    fn sasl_plain_table() {
        let ok = |authzid: &str, authcid: &str, password: &str| {
            Ok(SaslPlain {
                authzid: authzid.into(),
                authcid: authcid.into(),
                password: password.into(),
            })
        };
        let long = "x".repeat(256);
        let cases: Vec<(String, Result<SaslPlain, AuthError>)> = vec![
            (b64(b"\0alice@x\0secret"), ok("", "alice@x", "secret")),
            (
                b64(b"alice@x\0alice@x\0pass word"),
                ok("alice@x", "alice@x", "pass word"),
            ),
            (
                b64("\0jos\u{e9}@x\0p\u{e4}ss".as_bytes()),
                ok("", "jos\u{e9}@x", "p\u{e4}ss"),
            ),
            (
                b64(b"bob@x\0alice@x\0secret"),
                Err(AuthError::SaslMalformed(
                    "authorization identity differs from authentication identity",
                )),
            ),
            (
                b64(b"\0alice@x"),
                Err(AuthError::SaslMalformed(
                    "expected authzid NUL authcid NUL password",
                )),
            ),
            (
                b64(b"\0a\0b\0c"),
                Err(AuthError::SaslMalformed(
                    "expected authzid NUL authcid NUL password",
                )),
            ),
            (
                b64(b"\0\0secret"),
                Err(AuthError::SaslMalformed("empty user name or password")),
            ),
            (
                b64(b"\0alice@x\0"),
                Err(AuthError::SaslMalformed("empty user name or password")),
            ),
            (
                b64(b"\0a\0\xff"),
                Err(AuthError::SaslMalformed("field is not UTF-8")),
            ),
            (
                b64(format!("\0{long}\0pw").as_bytes()),
                Err(AuthError::SaslMalformed("field longer than 255 octets")),
            ),
            ("not base64!".into(), Err(AuthError::SaslBase64)),
            ("AGFsaWNlAHNlY3JldA".into(), Err(AuthError::SaslBase64)),
            (
                "".into(),
                Err(AuthError::SaslMalformed(
                    "expected authzid NUL authcid NUL password",
                )),
            ),
            (
                "A".repeat(MAX_SASL_PLAIN_BASE64_LEN + 4),
                Err(AuthError::SaslTooLong),
            ),
        ];
        for (input, expected) in cases {
            assert_eq!(decode_sasl_plain(&input), expected, "{input:?}");
        }
    }

    proptest! {
        #[test]
        fn sasl_plain_never_panics(input in ".{0,1200}") {
            let _ = decode_sasl_plain(&input);
        }

        #[test]
        fn sasl_plain_round_trips(user in "[a-z0-9.@]{1,60}", password in "[^\0]{1,60}") {
            let encoded = b64(format!("\0{user}\0{password}").as_bytes());
            let decoded = decode_sasl_plain(&encoded).unwrap();
            prop_assert_eq!(decoded.authcid, user);
            prop_assert_eq!(decoded.password, password);
        }
    }
}
