//! The SMTP command parser: one complete command line (CRLF already removed and checked
//! by the session's line framing) in, one [`Command`] or [`CommandError`] out.
//!
//! Pure and allocation-free: the command borrows from the line.

use super::address::{self, AddressError, ForwardPath, ReversePath};
use super::reply::{replies, Reply};

/// Longest command line, CRLF included (RFC 5321 §4.5.3.1.4).
pub const MAX_COMMAND_LINE_BYTES: usize = 512;

/// Longest AUTH command or SASL response line, CRLF included (RFC 4954 §4): initial responses
/// can be long, so AUTH lines get more room than other commands.
pub const MAX_AUTH_LINE_BYTES: usize = 12_288;

/// Longest SASL mechanism name (RFC 4422 §3.1: 1 to 20 characters).
const MAX_MECHANISM_BYTES: usize = 20;

/// Longest SIZE or BDAT number we read: 20 digits already exceed u64.
const MAX_NUMBER_DIGITS: usize = 20;

/// A parsed command.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command<'a> {
    /// EHLO: the client speaks ESMTP; its argument is kept for the Received header.
    Ehlo {
        /// The client's claimed name, as sent.
        domain: &'a str,
    },
    /// HELO: plain SMTP, no extensions or parameters.
    Helo {
        /// The client's claimed name, as sent.
        domain: &'a str,
    },
    /// MAIL FROM: starts a transaction.
    Mail {
        /// The sender.
        from: ReversePath<'a>,
        /// ESMTP parameters.
        params: MailParams,
    },
    /// RCPT TO: adds a recipient.
    Rcpt {
        /// The recipient.
        to: ForwardPath<'a>,
    },
    /// DATA: the dot-terminated body follows the 354 reply.
    Data,
    /// BDAT (RFC 3030): exactly `size_bytes` octets of body follow the line.
    Bdat {
        /// Octets in this chunk.
        size_bytes: u64,
        /// True for the chunk that ends the message.
        last: bool,
    },
    /// RSET: abort the transaction.
    Rset,
    /// NOOP (arguments ignored, RFC 5321 §4.1.1.9).
    Noop,
    /// QUIT.
    Quit,
    /// VRFY: answered 252 without looking anything up.
    Vrfy,
    /// HELP (argument ignored).
    Help,
    /// STARTTLS (RFC 3207): offered only when `[tls]` is configured.
    StartTls,
    /// AUTH (RFC 4954).
    Auth {
        /// The SASL mechanism as sent (matched case-insensitively by the session).
        mechanism: &'a str,
        /// The base64 initial response, if the client sent one (`=` means empty).
        initial_response: Option<&'a str>,
    },
    /// A verb RFC 5321 defines that we do not offer (EXPN, TURN, ...).
    NotImplemented,
}

/// The body type a client declared with `BODY=` (RFC 6152).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodyType {
    /// `BODY=7BIT`.
    SevenBit,
    /// `BODY=8BITMIME`.
    EightBitMime,
}

/// MAIL FROM parameters we support.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct MailParams {
    /// `SIZE=` (RFC 1870): lets us refuse an oversized message before it is sent.
    pub size_bytes: Option<u64>,
    /// `BODY=` (RFC 6152).
    pub body: Option<BodyType>,
    /// `SMTPUTF8` (RFC 6531): addresses and headers may hold UTF-8.
    pub smtputf8: bool,
}

/// Why a command line was refused; [`CommandError::reply`] gives the answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum CommandError {
    /// The verb is unknown (or the line is not text).
    #[error("command unrecognized")]
    Unrecognized,
    /// Arguments are missing, extra or malformed.
    #[error("syntax error in arguments")]
    Syntax,
    /// MAIL FROM path is malformed.
    #[error("bad sender address: {0}")]
    BadSender(AddressError),
    /// RCPT TO path is malformed.
    #[error("bad recipient address: {0}")]
    BadRecipient(AddressError),
    /// An ESMTP parameter we do not support.
    #[error("unsupported parameter")]
    UnknownParameter,
    /// The line is an HTTP request: someone pointed a browser or proxy at us.
    #[error("HTTP request on the SMTP port")]
    Http,
    /// A BDAT whose chunk size is readable but whose other arguments are malformed. The
    /// client still sends the chunk, so the session must read and drop exactly
    /// `size_bytes` octets before answering, or they would run as commands.
    #[error("syntax error in BDAT arguments")]
    BdatSyntax {
        /// The chunk size the client announced.
        size_bytes: u64,
    },
    /// A BDAT whose chunk size cannot be read: nobody can tell where its chunk ends, so
    /// the session answers and closes rather than run chunk bytes as commands.
    #[error("BDAT chunk size unreadable")]
    BdatSizeUnreadable,
}

impl CommandError {
    /// The reply RFC 5321 asks for.
    pub fn reply(self) -> Reply {
        match self {
            CommandError::Unrecognized => replies::UNRECOGNIZED,
            CommandError::Syntax | CommandError::BdatSyntax { .. } => replies::SYNTAX_ERROR,
            CommandError::BadSender(AddressError::TooLong) => replies::SENDER_PATH_TOO_LONG,
            CommandError::BadRecipient(AddressError::TooLong) => replies::PATH_TOO_LONG,
            CommandError::BadSender(AddressError::Syntax) => replies::BAD_SENDER_SYNTAX,
            CommandError::BadRecipient(AddressError::Syntax) => replies::BAD_RECIPIENT_SYNTAX,
            CommandError::UnknownParameter => replies::UNKNOWN_PARAMETER,
            CommandError::Http => replies::HTTP_REFUSED,
            CommandError::BdatSizeUnreadable => replies::BDAT_SIZE_UNREADABLE,
        }
    }
}

/// HTTP methods: a line starting with one of these and an argument is an HTTP request.
const HTTP_METHODS: &[&str] = &[
    "GET", "POST", "HEAD", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH",
];

fn is_http_method(verb: &[u8]) -> bool {
    HTTP_METHODS
        .iter()
        .any(|method| verb.eq_ignore_ascii_case(method.as_bytes()))
}

/// Whether a line (or the start of one) that is too long, or has a bare line ending, to be
/// parsed is an HTTP request line all the same: an HTTP method, a space and more. Such a
/// line is refused and the connection closed like a well-formed one, or an HTTP request
/// with a long URL, or LF line ends, would have its body run as SMTP commands.
pub fn starts_http_request(line: &[u8]) -> bool {
    match memchr::memchr(b' ', &line[..line.len().min(8)]) {
        Some(space) => is_http_method(&line[..space]) && line.len() > space + 1,
        None => false,
    }
}

/// Parses one command line, without its CRLF.
pub fn parse(line: &[u8]) -> Result<Command<'_>, CommandError> {
    // Trailing blanks are a common client slip and carry no meaning.
    let line = trim_end_blanks(line);
    if starts_bdat(line) {
        // Before the UTF-8 check: a BDAT line with junk in it still announces a chunk.
        return parse_bdat(&line[4..]);
    }
    // Commands are ASCII; only SMTPUTF8 addresses may add UTF-8. Anything else is noise.
    let line = std::str::from_utf8(line).map_err(|_| CommandError::Unrecognized)?;
    let (verb, args) = match line.find(' ') {
        Some(space) => (&line[..space], Some(&line[space + 1..])),
        None => (line, None),
    };
    let is = |name: &str| verb.eq_ignore_ascii_case(name);
    let no_args = |command: Command<'static>| match args {
        None => Ok(command),
        Some(_) => Err(CommandError::Syntax),
    };
    if is("MAIL") {
        parse_mail(args)
    } else if is("RCPT") {
        parse_rcpt(args)
    } else if is("DATA") {
        no_args(Command::Data)
    } else if is("EHLO") || is("HELO") {
        let domain = parse_helo_domain(args)?;
        Ok(if is("EHLO") {
            Command::Ehlo { domain }
        } else {
            Command::Helo { domain }
        })
    } else if is("RSET") {
        no_args(Command::Rset)
    } else if is("NOOP") {
        Ok(Command::Noop)
    } else if is("QUIT") {
        no_args(Command::Quit)
    } else if is("VRFY") {
        match args {
            Some(a) if !a.trim().is_empty() => Ok(Command::Vrfy),
            _ => Err(CommandError::Syntax),
        }
    } else if is("HELP") {
        Ok(Command::Help)
    } else if is("STARTTLS") {
        no_args(Command::StartTls)
    } else if is("AUTH") {
        parse_auth(args)
    } else if is("EXPN") || is("TURN") || is("ETRN") || is("SEND") || is("SOML") || is("SAML") {
        Ok(Command::NotImplemented)
    } else if args.is_some() && is_http_method(verb.as_bytes()) {
        Err(CommandError::Http)
    } else {
        Err(CommandError::Unrecognized)
    }
}

/// AUTH arguments: a mechanism name and an optional initial response, nothing more.
fn parse_auth(args: Option<&str>) -> Result<Command<'_>, CommandError> {
    let mut words = args.unwrap_or("").split(' ');
    let mechanism = words.next().unwrap_or("");
    let initial_response = words.next();
    let mechanism_ok = !mechanism.is_empty()
        && mechanism.len() <= MAX_MECHANISM_BYTES
        && mechanism
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
    if !mechanism_ok || words.next().is_some() || initial_response == Some("") {
        return Err(CommandError::Syntax);
    }
    Ok(Command::Auth {
        mechanism,
        initial_response,
    })
}

/// EHLO/HELO argument: one printable token. We accept any printable name rather than a
/// strict domain because real clients send "localhost", underscores and bare IPs; it is
/// only ever quoted back in the Received header.
fn parse_helo_domain(args: Option<&str>) -> Result<&str, CommandError> {
    let domain = args.map(str::trim).unwrap_or("");
    let printable = domain.bytes().all(|b| b.is_ascii_graphic() || b >= 0x80);
    if domain.is_empty() || !printable || domain.len() > address::MAX_DOMAIN_BYTES {
        return Err(CommandError::Syntax);
    }
    Ok(domain)
}

/// Strips a case-insensitive `prefix` (e.g. "FROM:") and the blanks some clients put
/// after the colon, which RFC 5321 forbids but Postfix and others accept.
fn strip_keyword<'a>(args: Option<&'a str>, prefix: &str) -> Option<&'a str> {
    let args = args?;
    let head = args.get(..prefix.len())?;
    if !head.eq_ignore_ascii_case(prefix) {
        return None;
    }
    Some(args[prefix.len()..].trim_start_matches(' '))
}

fn parse_mail(args: Option<&str>) -> Result<Command<'_>, CommandError> {
    let path = strip_keyword(args, "FROM:").ok_or(CommandError::Syntax)?;
    let (from, rest) = address::parse_reverse_path(path).map_err(CommandError::BadSender)?;
    let mut params = MailParams::default();
    for (keyword, value) in esmtp_params(rest)? {
        if keyword.eq_ignore_ascii_case("SIZE") {
            let value = value.ok_or(CommandError::Syntax)?;
            if params.size_bytes.replace(parse_number(value)?).is_some() {
                return Err(CommandError::Syntax);
            }
        } else if keyword.eq_ignore_ascii_case("BODY") {
            let body = match value {
                Some(v) if v.eq_ignore_ascii_case("7BIT") => BodyType::SevenBit,
                Some(v) if v.eq_ignore_ascii_case("8BITMIME") => BodyType::EightBitMime,
                _ => return Err(CommandError::Syntax),
            };
            if params.body.replace(body).is_some() {
                return Err(CommandError::Syntax);
            }
        } else if keyword.eq_ignore_ascii_case("SMTPUTF8") {
            if value.is_some() || params.smtputf8 {
                return Err(CommandError::Syntax);
            }
            params.smtputf8 = true;
        } else {
            return Err(CommandError::UnknownParameter);
        }
    }
    Ok(Command::Mail { from, params })
}

fn parse_rcpt(args: Option<&str>) -> Result<Command<'_>, CommandError> {
    let path = strip_keyword(args, "TO:").ok_or(CommandError::Syntax)?;
    let (to, rest) = address::parse_forward_path(path).map_err(CommandError::BadRecipient)?;
    // We offer no RCPT parameters (no DSN): any is unknown.
    if esmtp_params(rest)?.next().is_some() {
        return Err(CommandError::UnknownParameter);
    }
    Ok(Command::Rcpt { to })
}

fn trim_end_blanks(mut line: &[u8]) -> &[u8] {
    while let [rest @ .., b' ' | b'\t'] = line {
        line = rest;
    }
    line
}

/// True when `line` is a BDAT command, well-formed or not: the verb followed by the end of
/// the line or by anything but a letter or digit ("BDAT\t16" and "BDAT:16" are a client
/// that means BDAT and frames it badly, not an unknown verb).
pub fn starts_bdat(line: &[u8]) -> bool {
    line.get(..4)
        .is_some_and(|verb| verb.eq_ignore_ascii_case(b"BDAT"))
        && line.get(4).is_none_or(|b| !b.is_ascii_alphanumeric())
}

/// BDAT arguments, `rest` being the line after the verb: ` size [LAST]` (RFC 3030 §2).
/// Whatever else is wrong, a chunk of the announced size follows the line, so an error
/// says whether that size could be read: the session must either skip exactly that many
/// octets or give up on the connection.
fn parse_bdat(rest: &[u8]) -> Result<Command<'static>, CommandError> {
    // Exactly one SP before the size: with any other separator we would be guessing.
    let Some(args) = rest.strip_prefix(b" ") else {
        return Err(CommandError::BdatSizeUnreadable);
    };
    // The size ends at any blank, so "16\tLAST" still yields a size to skip by; a size
    // that is not plain digits ("16x", "", 21 digits) leaves the chunk's end unknown.
    let size_end = args
        .iter()
        .position(|b| *b == b' ' || *b == b'\t')
        .unwrap_or(args.len());
    let size_bytes = std::str::from_utf8(&args[..size_end])
        .ok()
        .and_then(|text| parse_number(text).ok())
        .ok_or(CommandError::BdatSizeUnreadable)?;
    let last = match &args[size_end..] {
        b"" => false,
        [b' ', word @ ..] if word.eq_ignore_ascii_case(b"LAST") => true,
        _ => return Err(CommandError::BdatSyntax { size_bytes }),
    };
    Ok(Command::Bdat { size_bytes, last })
}

/// A decimal number of at most 20 digits; values beyond u64 saturate, which every limit
/// then refuses.
fn parse_number(text: &str) -> Result<u64, CommandError> {
    if text.is_empty()
        || text.len() > MAX_NUMBER_DIGITS
        || !text.bytes().all(|b| b.is_ascii_digit())
    {
        return Err(CommandError::Syntax);
    }
    Ok(text.bytes().fold(0u64, |n, d| {
        n.saturating_mul(10).saturating_add(u64::from(d - b'0'))
    }))
}

/// Splits ` KEY[=VALUE] KEY[=VALUE]...` (RFC 5321 §4.1.2 esmtp-param). Checks the syntax
/// of every parameter up front so a malformed one is 501 even after an unknown one.
fn esmtp_params(rest: &str) -> Result<impl Iterator<Item = (&str, Option<&str>)>, CommandError> {
    if !rest.is_empty() && !rest.starts_with(' ') {
        // Something glued to the closing '>'.
        return Err(CommandError::Syntax);
    }
    let split = |param: &str| -> Result<(), CommandError> {
        let (keyword, value) = match param.split_once('=') {
            Some((k, v)) => (k, Some(v)),
            None => (param, None),
        };
        let keyword_ok = keyword
            .bytes()
            .next()
            .is_some_and(|b| b.is_ascii_alphanumeric())
            && keyword
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-');
        let value_ok = value.is_none_or(|v| {
            !v.is_empty() && v.bytes().all(|b| (33..=126).contains(&b) && b != b'=')
        });
        if keyword_ok && value_ok {
            Ok(())
        } else {
            Err(CommandError::Syntax)
        }
    };
    let params = rest.split(' ').filter(|p| !p.is_empty());
    for param in params.clone() {
        split(param)?;
    }
    Ok(params.map(|param| match param.split_once('=') {
        Some((k, v)) => (k, Some(v)),
        None => (param, None),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::smtp::address::Mailbox;
    use proptest::prelude::*;

    fn mailbox(text: &str) -> Mailbox<'_> {
        address::parse_mailbox(text).unwrap()
    }

    #[test]
    fn table() {
        use Command::*;
        use CommandError::*;
        let table: Vec<(&str, Result<Command<'_>, CommandError>)> = vec![
            (
                "EHLO client.test",
                Ok(Ehlo {
                    domain: "client.test",
                }),
            ),
            (
                "ehlo [127.0.0.1]",
                Ok(Ehlo {
                    domain: "[127.0.0.1]",
                }),
            ),
            ("HELO x", Ok(Helo { domain: "x" })),
            ("EHLO", Err(Syntax)),
            ("EHLO a b", Err(Syntax)),
            (
                "MAIL FROM:<>",
                Ok(Mail {
                    from: ReversePath::Null,
                    params: MailParams::default(),
                }),
            ),
            (
                "mail from:<a@b.test>",
                Ok(Mail {
                    from: ReversePath::Mailbox(mailbox("a@b.test")),
                    params: MailParams::default(),
                }),
            ),
            (
                "MAIL FROM: <a@b.test>",
                Ok(Mail {
                    from: ReversePath::Mailbox(mailbox("a@b.test")),
                    params: MailParams::default(),
                }),
            ),
            (
                "MAIL FROM:<a@b.test> SIZE=1000 BODY=8BITMIME SMTPUTF8",
                Ok(Mail {
                    from: ReversePath::Mailbox(mailbox("a@b.test")),
                    params: MailParams {
                        size_bytes: Some(1000),
                        body: Some(BodyType::EightBitMime),
                        smtputf8: true,
                    },
                }),
            ),
            (
                "MAIL FROM:<> body=7bit",
                Ok(Mail {
                    from: ReversePath::Null,
                    params: MailParams {
                        body: Some(BodyType::SevenBit),
                        ..MailParams::default()
                    },
                }),
            ),
            (
                "MAIL FROM:<> SIZE=99999999999999999999",
                Ok(Mail {
                    from: ReversePath::Null,
                    params: MailParams {
                        size_bytes: Some(u64::MAX),
                        ..MailParams::default()
                    },
                }),
            ),
            ("MAIL FROM:<> SIZE=999999999999999999999", Err(Syntax)),
            ("MAIL FROM:<> SIZE=", Err(Syntax)),
            ("MAIL FROM:<> SIZE=12a", Err(Syntax)),
            ("MAIL FROM:<> SIZE=1 SIZE=2", Err(Syntax)),
            ("MAIL FROM:<> BODY=BINARYMIME", Err(Syntax)),
            ("MAIL FROM:<> SMTPUTF8=yes", Err(Syntax)),
            ("MAIL FROM:<> RET=FULL", Err(UnknownParameter)),
            ("MAIL FROM:<> X-FOO", Err(UnknownParameter)),
            ("MAIL FROM:<>SIZE=1", Err(Syntax)),
            ("MAIL FROM:<> =1", Err(Syntax)),
            ("MAIL FROM:a@b.test", Err(BadSender(AddressError::Syntax))),
            ("MAIL TO:<a@b.test>", Err(Syntax)),
            ("MAIL", Err(Syntax)),
            (
                "RCPT TO:<a@b.test>",
                Ok(Rcpt {
                    to: ForwardPath::Mailbox(mailbox("a@b.test")),
                }),
            ),
            (
                "RCPT TO:<Postmaster>",
                Ok(Rcpt {
                    to: ForwardPath::Postmaster("Postmaster"),
                }),
            ),
            ("RCPT TO:<a@b.test> NOTIFY=NEVER", Err(UnknownParameter)),
            ("RCPT TO:<a@>", Err(BadRecipient(AddressError::Syntax))),
            ("RCPT FROM:<a@b.test>", Err(Syntax)),
            ("DATA", Ok(Data)),
            ("data  ", Ok(Data)),
            ("DATA x", Err(Syntax)),
            (
                "BDAT 100",
                Ok(Bdat {
                    size_bytes: 100,
                    last: false,
                }),
            ),
            (
                "BDAT 0 LAST",
                Ok(Bdat {
                    size_bytes: 0,
                    last: true,
                }),
            ),
            (
                "bdat 5 last",
                Ok(Bdat {
                    size_bytes: 5,
                    last: true,
                }),
            ),
            (
                "BDAT 5 LAST  ",
                Ok(Bdat {
                    size_bytes: 5,
                    last: true,
                }),
            ),
            ("BDAT 5 FIRST", Err(BdatSyntax { size_bytes: 5 })),
            ("BDAT 5 LAST x", Err(BdatSyntax { size_bytes: 5 })),
            ("BDAT 16  LAST", Err(BdatSyntax { size_bytes: 16 })),
            ("BDAT 16\tLAST", Err(BdatSyntax { size_bytes: 16 })),
            ("BDAT 16 LASTX", Err(BdatSyntax { size_bytes: 16 })),
            (
                "BDAT 99999999999999999999 x",
                Err(BdatSyntax {
                    size_bytes: u64::MAX,
                }),
            ),
            ("BDAT", Err(BdatSizeUnreadable)),
            ("BDAT -1", Err(BdatSizeUnreadable)),
            ("BDAT  16 LAST", Err(BdatSizeUnreadable)),
            ("BDAT\t16 LAST", Err(BdatSizeUnreadable)),
            ("BDAT:16", Err(BdatSizeUnreadable)),
            ("BDAT 16x LAST", Err(BdatSizeUnreadable)),
            ("BDAT 0x10", Err(BdatSizeUnreadable)),
            ("BDAT 999999999999999999999 LAST", Err(BdatSizeUnreadable)),
            ("BDATX 16", Err(Unrecognized)),
            ("RSET", Ok(Rset)),
            ("RSET now", Err(Syntax)),
            ("NOOP", Ok(Noop)),
            ("NOOP anything goes", Ok(Noop)),
            ("QUIT", Ok(Quit)),
            ("VRFY alice", Ok(Vrfy)),
            ("VRFY", Err(Syntax)),
            ("HELP", Ok(Help)),
            ("HELP MAIL", Ok(Help)),
            ("STARTTLS", Ok(StartTls)),
            (
                "AUTH PLAIN",
                Ok(Auth {
                    mechanism: "PLAIN",
                    initial_response: None,
                }),
            ),
            (
                "auth login dXNlcg==",
                Ok(Auth {
                    mechanism: "login",
                    initial_response: Some("dXNlcg=="),
                }),
            ),
            (
                "AUTH PLAIN =",
                Ok(Auth {
                    mechanism: "PLAIN",
                    initial_response: Some("="),
                }),
            ),
            ("AUTH", Err(Syntax)),
            ("AUTH PLAIN a b", Err(Syntax)),
            ("AUTH PL/AIN", Err(Syntax)),
            ("AUTH  PLAIN", Err(Syntax)),
            ("AUTH ABCDEFGHIJKLMNOPQRSTU", Err(Syntax)),
            ("EXPN list", Ok(NotImplemented)),
            ("GET / HTTP/1.1", Err(Http)),
            ("POST /submit HTTP/1.1", Err(Http)),
            ("CONNECT example.test:25 HTTP/1.1", Err(Http)),
            ("GET", Err(Unrecognized)),
            ("", Err(Unrecognized)),
            ("FOO", Err(Unrecognized)),
            ("MAILFROM:<>", Err(Unrecognized)),
        ];
        for (line, want) in table {
            assert_eq!(parse(line.as_bytes()), want, "line {line:?}");
        }
    }

    #[test]
    fn http_request_lines_are_recognised_whatever_follows() {
        for (line, http) in [
            (&b"GET / HTTP/1.1"[..], true),
            (
                b"post /aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa",
                true,
            ),
            (b"CONNECT x:25 HTTP/1.1\n", true),
            (b"OPTIONS * HTTP/1.1", true),
            (b"GET", false),
            (b"GET ", false),
            (b"GETX / HTTP/1.1", false),
            (b"MAIL FROM:<a@b>", false),
            (b"", false),
        ] {
            assert_eq!(
                starts_http_request(line),
                http,
                "{:?}",
                String::from_utf8_lossy(line)
            );
        }
    }

    #[test]
    fn non_utf8_is_unrecognized() {
        assert_eq!(
            parse(b"MAIL FROM:<\xff@b.test>"),
            Err(CommandError::Unrecognized)
        );
    }

    #[test]
    fn bdat_with_junk_still_announces_its_chunk() {
        // Not UTF-8, which other commands refuse as unrecognized: the size still counts.
        assert_eq!(
            parse(b"BDAT 16 LAST\xff"),
            Err(CommandError::BdatSyntax { size_bytes: 16 })
        );
        assert_eq!(parse(b"BDAT \xff16"), Err(CommandError::BdatSizeUnreadable));
        assert_eq!(
            parse(b"bdat\xc3\xa9 1"),
            Err(CommandError::BdatSizeUnreadable)
        );
    }

    #[test]
    fn every_error_has_a_failure_reply() {
        for error in [
            CommandError::Unrecognized,
            CommandError::Syntax,
            CommandError::BadSender(AddressError::Syntax),
            CommandError::BadRecipient(AddressError::TooLong),
            CommandError::UnknownParameter,
            CommandError::Http,
            CommandError::BdatSyntax { size_bytes: 1 },
            CommandError::BdatSizeUnreadable,
        ] {
            assert!(error.reply().is_permanent_failure(), "{error:?}");
        }
    }

    proptest! {
        #[test]
        fn never_panics(line in proptest::collection::vec(any::<u8>(), 0..600)) {
            let _ = parse(&line);
        }

        #[test]
        fn never_panics_on_near_commands(
            verb in "(MAIL FROM:|RCPT TO:|BDAT |EHLO |GET |AUTH )",
            rest in "[ -~]{0,300}",
        ) {
            let _ = parse(format!("{verb}{rest}").as_bytes());
        }

        #[test]
        fn size_round_trips(size in any::<u64>()) {
            let line = format!("MAIL FROM:<a@b.test> SIZE={size}");
            match parse(line.as_bytes()) {
                Ok(Command::Mail { params, .. }) => prop_assert_eq!(params.size_bytes, Some(size)),
                other => prop_assert!(false, "{:?}", other),
            }
        }
    }
}
