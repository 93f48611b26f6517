//! Mailbox and path syntax (RFC 5321 §4.1.2, with RFC 6531 UTF-8) and the size limits of
//! RFC 5321 §4.5.3.1: local part 64 octets, domain 255 octets, path 256 octets.
//!
//! Parsing borrows from the command line; nothing is allocated.

use std::net::{Ipv4Addr, Ipv6Addr};

/// Longest local part we accept (RFC 5321 §4.5.3.1.1).
pub const MAX_LOCAL_PART_BYTES: usize = 64;
/// Longest domain we accept (RFC 5321 §4.5.3.1.2).
pub const MAX_DOMAIN_BYTES: usize = 255;
/// Longest path, angle brackets included (RFC 5321 §4.5.3.1.3).
pub const MAX_PATH_BYTES: usize = 256;

/// Why a path did not parse; the session maps it to 501 5.1.7 / 5.1.3.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum AddressError {
    /// The text is not a path in RFC 5321 syntax.
    #[error("malformed path")]
    Syntax,
    /// A part is over its RFC 5321 §4.5.3.1 limit.
    #[error("path, local part or domain too long")]
    TooLong,
}

/// A mailbox `local-part@domain` exactly as the client wrote it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Mailbox<'a> {
    /// The whole `local@domain` text as received; kept verbatim because addresses are
    /// stored as received (SPEC §2) and only compared case-insensitively.
    pub text: &'a str,
    /// The local part, quotes included when it was quoted.
    pub local_part: &'a str,
    /// The domain or address literal (`[192.0.2.1]`).
    pub domain: &'a str,
    /// True when the mailbox holds UTF-8 beyond ASCII: only allowed with SMTPUTF8.
    pub non_ascii: bool,
}

/// The argument of MAIL FROM.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReversePath<'a> {
    /// `<>`: bounces and other mail that must not be answered.
    Null,
    /// A sender mailbox.
    Mailbox(Mailbox<'a>),
}

/// The argument of RCPT TO.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ForwardPath<'a> {
    /// `<Postmaster>` with no domain (RFC 5321 §4.1.1.3), spelled as received.
    Postmaster(&'a str),
    /// A recipient mailbox.
    Mailbox(Mailbox<'a>),
}

/// Parses `<...>` at the start of `input`; returns the path's inner text (without the
/// source route) and what follows the closing `>`.
fn split_path(input: &str) -> Result<(&str, &str), AddressError> {
    let bytes = input.as_bytes();
    if bytes.first() != Some(&b'<') {
        return Err(AddressError::Syntax);
    }
    // Find the closing '>' outside a quoted string.
    let mut in_quotes = false;
    let mut escaped = false;
    let mut close = None;
    for (i, &b) in bytes.iter().enumerate().skip(1) {
        if i >= MAX_PATH_BYTES {
            // A '>' here or later makes the path longer than the limit: stop scanning.
            return Err(AddressError::TooLong);
        }
        if escaped {
            escaped = false;
        } else if in_quotes && b == b'\\' {
            escaped = true;
        } else if b == b'"' {
            in_quotes = !in_quotes;
        } else if b == b'>' && !in_quotes {
            close = Some(i);
            break;
        }
    }
    let close = close.ok_or(AddressError::Syntax)?;
    let inner = &input[1..close];
    let rest = &input[close + 1..];
    // Strip an obsolete source route "@a,@b:" (RFC 5321 §4.1.2: accept, ignore).
    let inner = if inner.starts_with('@') {
        let colon = inner.find(':').ok_or(AddressError::Syntax)?;
        for hop in inner[..colon].split(',') {
            let domain = hop.strip_prefix('@').ok_or(AddressError::Syntax)?;
            parse_domain(domain)?;
        }
        &inner[colon + 1..]
    } else {
        inner
    };
    Ok((inner, rest))
}

/// Parses a reverse-path (`<>` or `<mailbox>`) at the start of `input`; returns it and the
/// rest of the line (parameters).
pub fn parse_reverse_path(input: &str) -> Result<(ReversePath<'_>, &str), AddressError> {
    let (inner, rest) = split_path(input)?;
    if inner.is_empty() {
        if input.starts_with("<>") {
            return Ok((ReversePath::Null, rest));
        }
        // A source route followed by nothing: "<@a:>".
        return Err(AddressError::Syntax);
    }
    Ok((ReversePath::Mailbox(parse_mailbox(inner)?), rest))
}

/// Parses a forward-path (`<Postmaster>` or `<mailbox>`) at the start of `input`; returns
/// it and the rest of the line (parameters).
pub fn parse_forward_path(input: &str) -> Result<(ForwardPath<'_>, &str), AddressError> {
    let (inner, rest) = split_path(input)?;
    if inner.eq_ignore_ascii_case("postmaster") && input.as_bytes().get(1) != Some(&b'@') {
        return Ok((ForwardPath::Postmaster(inner), rest));
    }
    Ok((ForwardPath::Mailbox(parse_mailbox(inner)?), rest))
}

/// Parses `local-part@domain` (the whole of `text`).
pub fn parse_mailbox(text: &str) -> Result<Mailbox<'_>, AddressError> {
    let at = local_part_end(text)?;
    let local_part = &text[..at];
    let domain = &text[at + 1..];
    if local_part.len() > MAX_LOCAL_PART_BYTES {
        return Err(AddressError::TooLong);
    }
    parse_domain(domain)?;
    Ok(Mailbox {
        text,
        local_part,
        domain,
        non_ascii: !text.is_ascii(),
    })
}

/// Validates the local part at the start of `text`; returns the index of the '@' after it.
fn local_part_end(text: &str) -> Result<usize, AddressError> {
    let bytes = text.as_bytes();
    if bytes.first() == Some(&b'"') {
        // Quoted-string: qtextSMTP / quoted-pairSMTP (RFC 5321 §4.1.2).
        let mut i = 1;
        loop {
            match bytes.get(i) {
                None => return Err(AddressError::Syntax),
                Some(b'"') => break,
                Some(b'\\') => match bytes.get(i + 1) {
                    Some(32..=126) => i += 2,
                    _ => return Err(AddressError::Syntax),
                },
                Some(&b) if b == 32 || b == 33 || (35..=126).contains(&b) || b >= 0x80 => i += 1,
                Some(_) => return Err(AddressError::Syntax),
            }
        }
        return match bytes.get(i + 1) {
            Some(b'@') => Ok(i + 1),
            _ => Err(AddressError::Syntax),
        };
    }
    // Dot-string: atoms separated by single dots.
    let at = text.find('@').ok_or(AddressError::Syntax)?;
    let local = &bytes[..at];
    if local.is_empty() {
        return Err(AddressError::Syntax);
    }
    for atom in local.split(|&b| b == b'.') {
        if atom.is_empty() || !atom.iter().all(|&b| is_atext(b)) {
            return Err(AddressError::Syntax);
        }
    }
    Ok(at)
}

/// RFC 5322 atext, plus any UTF-8 byte beyond ASCII (RFC 6531 §3.3).
pub(crate) fn is_atext(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-/=?^_`{|}~".contains(&b) || b >= 0x80
}

/// Validates a domain name or an address literal.
pub fn parse_domain(domain: &str) -> Result<(), AddressError> {
    if domain.len() > MAX_DOMAIN_BYTES {
        return Err(AddressError::TooLong);
    }
    if let Some(literal) = domain.strip_prefix('[') {
        let literal = literal.strip_suffix(']').ok_or(AddressError::Syntax)?;
        let ok = match literal.get(..5) {
            Some(tag) if tag.eq_ignore_ascii_case("IPv6:") => {
                literal[5..].parse::<Ipv6Addr>().is_ok()
            }
            _ => literal.parse::<Ipv4Addr>().is_ok(),
        };
        return if ok {
            Ok(())
        } else {
            Err(AddressError::Syntax)
        };
    }
    if domain.is_empty() {
        return Err(AddressError::Syntax);
    }
    for label in domain.split('.') {
        let bytes = label.as_bytes();
        let let_dig = |b: u8| b.is_ascii_alphanumeric() || b >= 0x80;
        let valid = match (bytes.first(), bytes.last()) {
            (Some(&first), Some(&last)) => {
                let_dig(first)
                    && let_dig(last)
                    && bytes.iter().all(|&b| let_dig(b) || b == b'-')
                    && bytes.len() <= 63
            }
            _ => false,
        };
        if !valid {
            return Err(AddressError::Syntax);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn reverse_paths() {
        /// (input, Ok((mailbox text or None for <>, rest of line)) or the error)
        type Row<'a> = (&'a str, Result<(Option<&'a str>, &'a str), AddressError>);
        let table: &[Row<'_>] = &[
            ("<>", Ok((None, ""))),
            ("<> SIZE=1", Ok((None, " SIZE=1"))),
            ("<a@b.test>", Ok((Some("a@b.test"), ""))),
            (
                "<A.B+c@Example.TEST> BODY=8BITMIME",
                Ok((Some("A.B+c@Example.TEST"), " BODY=8BITMIME")),
            ),
            (
                "<@relay.test,@other.test:a@b.test>",
                Ok((Some("a@b.test"), "")),
            ),
            (
                "<\"john doe\"@b.test>",
                Ok((Some("\"john doe\"@b.test"), "")),
            ),
            ("<\"a>b\"@b.test>", Ok((Some("\"a>b\"@b.test"), ""))),
            ("<\"a\\\"b\"@b.test>", Ok((Some("\"a\\\"b\"@b.test"), ""))),
            ("<a@[192.0.2.1]>", Ok((Some("a@[192.0.2.1]"), ""))),
            (
                "<a@[IPv6:2001:db8::1]>",
                Ok((Some("a@[IPv6:2001:db8::1]"), "")),
            ),
            ("<用户@例子.test>", Ok((Some("用户@例子.test"), ""))),
            ("a@b.test", Err(AddressError::Syntax)),
            ("<a@b.test", Err(AddressError::Syntax)),
            ("<a>", Err(AddressError::Syntax)),
            ("<@b.test>", Err(AddressError::Syntax)),
            ("<a@>", Err(AddressError::Syntax)),
            ("<a..b@c.test>", Err(AddressError::Syntax)),
            ("<.a@c.test>", Err(AddressError::Syntax)),
            ("<a.@c.test>", Err(AddressError::Syntax)),
            ("<a b@c.test>", Err(AddressError::Syntax)),
            ("<a@-c.test>", Err(AddressError::Syntax)),
            ("<a@c-.test>", Err(AddressError::Syntax)),
            ("<a@c..test>", Err(AddressError::Syntax)),
            ("<a@c_d.test>", Err(AddressError::Syntax)),
            ("<a@[300.0.0.1]>", Err(AddressError::Syntax)),
            ("<a@[IPv6:zz]>", Err(AddressError::Syntax)),
            ("<a@b@c.test>", Err(AddressError::Syntax)),
            ("<\"unterminated@b.test>", Err(AddressError::Syntax)),
            ("<@a.test:>", Err(AddressError::Syntax)),
            ("<@a_b:x@y.test>", Err(AddressError::Syntax)),
        ];
        for (input, want) in table {
            let got = parse_reverse_path(input).map(|(path, rest)| {
                let text = match path {
                    ReversePath::Null => None,
                    ReversePath::Mailbox(m) => Some(m.text),
                };
                (text, rest)
            });
            assert_eq!(got, *want, "input {input:?}");
        }
    }

    #[test]
    fn forward_paths_accept_bare_postmaster_in_any_case() {
        for input in ["<postmaster>", "<PostMaster>", "<POSTMASTER>"] {
            let (path, _) = parse_forward_path(input).unwrap();
            assert!(matches!(path, ForwardPath::Postmaster(_)), "{input}");
        }
        let (path, _) = parse_forward_path("<postmaster@x.test>").unwrap();
        assert!(matches!(path, ForwardPath::Mailbox(m) if m.domain == "x.test"));
        assert_eq!(parse_forward_path("<>"), Err(AddressError::Syntax));
    }

    #[test]
    fn limits_are_exact() {
        let local = "a".repeat(MAX_LOCAL_PART_BYTES);
        assert!(parse_mailbox(&format!("{local}@b.test")).is_ok());
        assert_eq!(
            parse_mailbox(&format!("{local}a@b.test")),
            Err(AddressError::TooLong)
        );
        // The quotes count towards the 64 octets.
        let quoted = format!("\"{}\"@b.test", "q".repeat(MAX_LOCAL_PART_BYTES - 2));
        assert!(parse_mailbox(&quoted).is_ok());
        let quoted = format!("\"{}\"@b.test", "q".repeat(MAX_LOCAL_PART_BYTES - 1));
        assert_eq!(parse_mailbox(&quoted), Err(AddressError::TooLong));
        // 63-octet labels joined to exactly 255 octets.
        let label = "d".repeat(63);
        let domain = format!("{label}.{label}.{label}.{}", "d".repeat(63));
        assert_eq!(domain.len(), 255);
        assert!(parse_domain(&domain).is_ok());
        assert_eq!(
            parse_domain(&format!("a{domain}")),
            Err(AddressError::TooLong)
        );
        assert_eq!(parse_domain(&"d".repeat(64)), Err(AddressError::Syntax));
        // A path of exactly 256 octets (with a source route to reach it) is fine.
        let route = |len: usize| format!("{}.", "r".repeat(59)).repeat(4) + &"r".repeat(len - 240);
        let path = format!("<@{}:a@b.test>", route(244));
        assert_eq!(path.len(), 256);
        assert!(parse_reverse_path(&path).is_ok());
        let path = format!("<@{}:a@b.test>", route(245));
        assert_eq!(parse_reverse_path(&path), Err(AddressError::TooLong));
        let never_closed = format!("<{}", "x".repeat(10_000));
        assert_eq!(
            parse_reverse_path(&never_closed),
            Err(AddressError::TooLong)
        );
    }

    proptest! {
        #[test]
        fn never_panics(s in "\\PC{0,300}") {
            let _ = parse_reverse_path(&s);
            let _ = parse_forward_path(&s);
            let _ = parse_mailbox(&s);
        }

        #[test]
        fn wellformed_mailboxes_round_trip(
            local in "[a-z0-9!#$%&'*+/=?^_`{|}~-]{1,20}(\\.[a-z0-9]{1,10}){0,2}",
            domain in "[a-z0-9]([a-z0-9-]{0,20}[a-z0-9])?(\\.[a-z]{2,10}){1,3}",
        ) {
            let input = format!("<{local}@{domain}> SIZE=5");
            let (path, rest) = parse_reverse_path(&input).unwrap();
            prop_assert_eq!(rest, " SIZE=5");
            match path {
                ReversePath::Mailbox(m) => {
                    prop_assert_eq!(m.local_part, local.as_str());
                    prop_assert_eq!(m.domain, domain.as_str());
                }
                ReversePath::Null => prop_assert!(false, "parsed as null"),
            }
        }
    }
}
