//! SMTP replies: a basic code (RFC 5321 §4.2) plus an enhanced status code (RFC 3463,
//! advertised as ENHANCEDSTATUSCODES per RFC 2034).
//!
//! Replies are written straight into the session's output buffer: no `Vec` per reply.

use std::fmt;

/// An enhanced status code `class.subject.detail` (RFC 3463), e.g. `5.1.1`.
///
/// Clients and log readers act on these rather than on reply text, so every reply
/// after the greeting and EHLO carries one (RFC 2034 §3).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EnhancedCode {
    /// 2 = success, 4 = transient failure, 5 = permanent failure; always equals the
    /// first digit of the basic code it travels with.
    pub class: u8,
    /// What the status is about (1 = addressing, 3 = mail system, 5 = protocol, ...).
    pub subject: u16,
    /// The precise condition within the subject.
    pub detail: u16,
}

impl EnhancedCode {
    /// Builds a code; `const` so replies can be constants.
    pub const fn new(class: u8, subject: u16, detail: u16) -> EnhancedCode {
        EnhancedCode {
            class,
            subject,
            detail,
        }
    }
}

impl fmt::Display for EnhancedCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}.{}", self.class, self.subject, self.detail)
    }
}

/// A single-line reply whose text is fixed; the common case, so it costs no allocation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Reply {
    /// Basic three-digit reply code (RFC 5321 §4.2.2).
    pub code: u16,
    /// Enhanced status code; `None` only for replies RFC 2034 exempts (354).
    pub enhanced: Option<EnhancedCode>,
    /// Human-readable text; never starts a new line.
    pub text: &'static str,
}

impl Reply {
    /// Builds a reply with an enhanced code.
    pub const fn new(code: u16, enhanced: EnhancedCode, text: &'static str) -> Reply {
        Reply {
            code,
            enhanced: Some(enhanced),
            text,
        }
    }

    /// True for 4xx and 5xx replies.
    pub fn is_failure(&self) -> bool {
        self.code >= 400
    }

    /// True for 5xx replies, the ones that count towards the error limit.
    pub fn is_permanent_failure(&self) -> bool {
        self.code >= 500
    }

    /// Appends the reply line with its CRLF to `out`.
    pub fn write_to(&self, out: &mut Vec<u8>) {
        write_line(out, self.code, false, self.enhanced, self.text.as_bytes());
    }
}

/// Appends one reply line `code[-| ][enhanced ]text\r\n` to `out`.
///
/// `more` selects the continuation separator `-` used by every line of a multi-line
/// reply but the last (RFC 5321 §4.2.1).
pub fn write_line(
    out: &mut Vec<u8>,
    code: u16,
    more: bool,
    enhanced: Option<EnhancedCode>,
    text: &[u8],
) {
    use std::io::Write;
    // Writing to a Vec cannot fail.
    let _ = write!(out, "{}{}", code, if more { '-' } else { ' ' });
    if let Some(enhanced) = enhanced {
        let _ = write!(out, "{} ", enhanced);
    }
    out.extend_from_slice(text);
    out.extend_from_slice(b"\r\n");
}

/// Replies the session sends; named by condition so call sites read as prose.
pub mod replies {
    use super::{EnhancedCode as E, Reply};

    /// Generic success (NOOP, RSET, MAIL).
    pub const OK: Reply = Reply::new(250, E::new(2, 0, 0), "Ok");
    /// MAIL accepted.
    pub const SENDER_OK: Reply = Reply::new(250, E::new(2, 1, 0), "Sender ok");
    /// RCPT accepted (2.1.5: destination address valid).
    pub const RECIPIENT_OK: Reply = Reply::new(250, E::new(2, 1, 5), "Recipient ok");
    /// Answer to DATA: the body may follow. RFC 2034 exempts intermediate replies.
    pub const START_DATA: Reply = Reply {
        code: 354,
        enhanced: None,
        text: "End data with <CR><LF>.<CR><LF>",
    };
    /// QUIT.
    pub const BYE: Reply = Reply::new(221, E::new(2, 0, 0), "Bye");
    /// VRFY: we never disclose which users exist (RFC 5321 §3.5.3).
    pub const CANNOT_VRFY: Reply = Reply::new(
        252,
        E::new(2, 0, 0),
        "Cannot VRFY user, but will accept message and attempt delivery",
    );
    /// HELP.
    pub const HELP: Reply = Reply::new(
        214,
        E::new(2, 0, 0),
        "Commands: EHLO HELO MAIL RCPT DATA BDAT RSET NOOP QUIT VRFY HELP",
    );

    /// Unknown verb.
    pub const UNRECOGNIZED: Reply = Reply::new(500, E::new(5, 5, 1), "Command unrecognized");
    /// Command line over 512 octets (RFC 5321 §4.5.3.1.4).
    pub const LINE_TOO_LONG: Reply = Reply::new(500, E::new(5, 5, 2), "Line too long");
    /// A CR or LF that is not part of a CRLF pair in a command (SMTP smuggling defence).
    pub const BARE_LINE_ENDING: Reply = Reply::new(
        500,
        E::new(5, 5, 2),
        "Bare CR or LF not allowed; lines end with <CR><LF>",
    );
    /// Malformed arguments.
    pub const SYNTAX_ERROR: Reply = Reply::new(501, E::new(5, 5, 4), "Syntax error in arguments");
    /// Malformed reverse-path.
    pub const BAD_SENDER_SYNTAX: Reply =
        Reply::new(501, E::new(5, 1, 7), "Bad sender address syntax");
    /// Malformed forward-path.
    pub const BAD_RECIPIENT_SYNTAX: Reply =
        Reply::new(501, E::new(5, 1, 3), "Bad recipient address syntax");
    /// Local part, domain or forward-path over the RFC 5321 §4.5.3.1 limits.
    pub const PATH_TOO_LONG: Reply = Reply::new(501, E::new(5, 1, 3), "Path too long");
    /// The same for a reverse-path: RFC 3463's X.1.7 is the sender's address, X.1.3 the
    /// recipient's.
    pub const SENDER_PATH_TOO_LONG: Reply = Reply::new(501, E::new(5, 1, 7), "Path too long");
    /// Known verbs we deliberately do not offer (EXPN, TURN, STARTTLS/AUTH until configured).
    pub const NOT_IMPLEMENTED: Reply = Reply::new(502, E::new(5, 5, 1), "Command not implemented");
    /// MAIL before EHLO/HELO.
    pub const NEED_HELO: Reply = Reply::new(503, E::new(5, 5, 1), "Send EHLO or HELO first");
    /// MAIL inside a transaction.
    pub const NESTED_MAIL: Reply = Reply::new(503, E::new(5, 5, 1), "Sender already specified");
    /// RCPT, DATA or BDAT without MAIL.
    pub const NEED_MAIL: Reply = Reply::new(503, E::new(5, 5, 1), "Send MAIL first");
    /// DATA or BDAT after MAIL when every RCPT was refused (RFC 5321 §3.3, RFC 2920 §3.1).
    pub const NO_VALID_RECIPIENTS: Reply = Reply::new(554, E::new(5, 5, 1), "No valid recipients");
    /// DATA after BDAT in the same transaction (RFC 3030 §2).
    pub const DATA_AFTER_BDAT: Reply =
        Reply::new(503, E::new(5, 5, 1), "DATA not allowed after BDAT");
    /// MAIL or RCPT parameter we do not know (RFC 5321 §4.1.1.11).
    pub const UNKNOWN_PARAMETER: Reply =
        Reply::new(555, E::new(5, 5, 4), "Unsupported MAIL or RCPT parameter");
    /// Non-ASCII address without the SMTPUTF8 parameter (RFC 6531 §3.5).
    pub const NEED_SMTPUTF8: Reply = Reply::new(
        553,
        E::new(5, 6, 7),
        "Non-ASCII address requires the SMTPUTF8 parameter",
    );
    /// RCPT to a local domain with no such user.
    pub const UNKNOWN_USER: Reply = Reply::new(550, E::new(5, 1, 1), "No such user here");
    /// RCPT to a remote domain from a client that may not relay: we are never an open relay.
    pub const RELAY_DENIED: Reply = Reply::new(554, E::new(5, 7, 1), "Relay access denied");
    /// RCPT beyond `max_recipients` (RFC 5321 §4.5.3.1.8: the client retries the rest later).
    pub const TOO_MANY_RECIPIENTS: Reply = Reply::new(452, E::new(4, 5, 3), "Too many recipients");
    /// Declared or actual size over `max_message_size`.
    pub const MESSAGE_TOO_BIG: Reply = Reply::new(
        552,
        E::new(5, 3, 4),
        "Message size exceeds fixed maximum message size",
    );
    /// DATA/BDAT body containing a bare CR or LF: refused whole rather than normalised, so
    /// no server behind us can read a different message boundary into it (SMTP smuggling,
    /// RFC 5321 §2.3.8). 5.6.0 = "other media error": the content itself is at fault.
    pub const BARE_LINE_ENDING_IN_DATA: Reply = Reply::new(
        550,
        E::new(5, 6, 0),
        "Message refused: bare CR or LF in data; lines end with <CR><LF>",
    );
    /// The store's group commit failed; the client should retry.
    pub const STORE_SYNC_FAILED: Reply = Reply::new(
        451,
        E::new(4, 3, 0),
        "Local error: message not stored, try again later",
    );
    /// Below the free-space floor.
    pub const STORE_DISK_FULL: Reply =
        Reply::new(452, E::new(4, 3, 1), "Insufficient system storage");
    /// Server is draining (shutdown): the connection closes after this reply.
    pub const SHUTTING_DOWN: Reply = Reply::new(
        421,
        E::new(4, 3, 2),
        "Service shutting down, closing transmission channel",
    );
    /// Idle too long (the loop's `idle_timeout_secs` or minimum data rate); the connection closes.
    pub const TIMEOUT: Reply = Reply::new(
        421,
        E::new(4, 4, 2),
        "Timeout exceeded, closing transmission channel",
    );
    /// Error limit reached; the connection closes after this reply.
    pub const TOO_MANY_ERRORS: Reply = Reply::new(
        421,
        E::new(4, 7, 0),
        "Too many errors, closing transmission channel",
    );
    /// STARTTLS accepted: the handshake starts right after this line.
    pub const READY_TO_START_TLS: Reply = Reply::new(220, E::new(2, 0, 0), "Ready to start TLS");
    /// Bytes followed STARTTLS before the handshake (CVE-2011-0411): they are never run and
    /// the connection closes after this reply.
    pub const DATA_AFTER_STARTTLS: Reply = Reply::new(
        554,
        E::new(5, 5, 1),
        "Commands pipelined after STARTTLS are refused; closing",
    );
    /// STARTTLS on a connection that is already TLS; the connection closes after this reply.
    pub const TLS_ALREADY_ACTIVE: Reply =
        Reply::new(554, E::new(5, 5, 1), "TLS already active; closing");
    /// AUTH (or MAIL on a listener that requires AUTH) before TLS where TLS could be had.
    pub const NEED_STARTTLS: Reply =
        Reply::new(530, E::new(5, 7, 0), "Must issue a STARTTLS command first");
    /// MAIL before AUTH on a submission or implicit-TLS listener.
    pub const AUTH_REQUIRED: Reply = Reply::new(530, E::new(5, 7, 0), "Authentication required");
    /// AUTH where it is not offered: neither TLS nor loopback, and no STARTTLS to get TLS.
    pub const AUTH_NOT_AVAILABLE: Reply = Reply::new(
        502,
        E::new(5, 5, 1),
        "Authentication not available on this connection",
    );
    /// A second AUTH after a successful one (RFC 4954 §4).
    pub const ALREADY_AUTHENTICATED: Reply =
        Reply::new(503, E::new(5, 5, 1), "Already authenticated");
    /// AUTH inside a mail transaction (RFC 4954 §4).
    pub const AUTH_IN_TRANSACTION: Reply = Reply::new(
        503,
        E::new(5, 5, 1),
        "AUTH not permitted during a mail transaction",
    );
    /// A SASL mechanism we do not offer.
    pub const UNKNOWN_MECHANISM: Reply =
        Reply::new(504, E::new(5, 5, 4), "Unrecognized authentication type");
    /// The client answered a 334 challenge with `*` (RFC 4954 §4).
    pub const AUTH_CANCELLED: Reply = Reply::new(501, E::new(5, 0, 0), "Authentication cancelled");
    /// A SASL response that is not base64 or not a well-formed PLAIN/LOGIN answer.
    pub const AUTH_MALFORMED: Reply = Reply::new(
        501,
        E::new(5, 5, 2),
        "Cannot decode the authentication response",
    );
    /// Credentials verified (RFC 4954 §6).
    pub const AUTH_SUCCEEDED: Reply = Reply::new(235, E::new(2, 7, 0), "Authentication successful");
    /// Wrong user or password (RFC 4954 §6); sent after the throttle's delay.
    pub const AUTH_FAILED: Reply =
        Reply::new(535, E::new(5, 7, 8), "Authentication credentials invalid");
    /// An authenticated client used a MAIL FROM that is not its own address.
    pub const SENDER_NOT_OWNED: Reply = Reply::new(
        553,
        E::new(5, 7, 1),
        "Sender address is not owned by the authenticated user",
    );
    /// A BDAT whose chunk size cannot be read: the chunk's end is unknown, so its bytes
    /// could only be misread as commands; the connection closes after this reply. 501
    /// rather than 421 because retrying the same command would fail the same way.
    pub const BDAT_SIZE_UNREADABLE: Reply = Reply::new(
        501,
        E::new(5, 5, 4),
        "Syntax: BDAT <size> [LAST]; chunk size unreadable, closing",
    );
    /// An HTTP request on the SMTP port (cross-protocol attack); the connection closes.
    pub const HTTP_REFUSED: Reply = Reply::new(
        554,
        E::new(5, 7, 0),
        "This is an SMTP server, not HTTP; closing",
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn single_lines_render_with_enhanced_codes() {
        let table: &[(Reply, &str)] = &[
            (replies::OK, "250 2.0.0 Ok\r\n"),
            (replies::UNKNOWN_USER, "550 5.1.1 No such user here\r\n"),
            (
                replies::START_DATA,
                "354 End data with <CR><LF>.<CR><LF>\r\n",
            ),
            (
                replies::TOO_MANY_RECIPIENTS,
                "452 4.5.3 Too many recipients\r\n",
            ),
        ];
        for (reply, want) in table {
            let mut out = Vec::new();
            reply.write_to(&mut out);
            assert_eq!(String::from_utf8(out).unwrap(), *want);
        }
    }

    #[test]
    fn continuation_lines_use_a_dash() {
        let mut out = Vec::new();
        write_line(&mut out, 250, true, None, b"host");
        write_line(&mut out, 250, false, None, b"PIPELINING");
        assert_eq!(out, b"250-host\r\n250 PIPELINING\r\n");
    }

    #[test]
    fn enhanced_class_matches_basic_code_class() {
        use replies::*;
        for reply in [
            OK,
            SENDER_OK,
            RECIPIENT_OK,
            BYE,
            CANNOT_VRFY,
            HELP,
            UNRECOGNIZED,
            LINE_TOO_LONG,
            BARE_LINE_ENDING,
            SYNTAX_ERROR,
            BAD_SENDER_SYNTAX,
            BAD_RECIPIENT_SYNTAX,
            PATH_TOO_LONG,
            SENDER_PATH_TOO_LONG,
            NOT_IMPLEMENTED,
            NEED_HELO,
            NESTED_MAIL,
            NEED_MAIL,
            DATA_AFTER_BDAT,
            UNKNOWN_PARAMETER,
            NEED_SMTPUTF8,
            UNKNOWN_USER,
            RELAY_DENIED,
            TOO_MANY_RECIPIENTS,
            MESSAGE_TOO_BIG,
            BARE_LINE_ENDING_IN_DATA,
            STORE_SYNC_FAILED,
            STORE_DISK_FULL,
            SHUTTING_DOWN,
            TOO_MANY_ERRORS,
            HTTP_REFUSED,
            TIMEOUT,
            READY_TO_START_TLS,
            DATA_AFTER_STARTTLS,
            TLS_ALREADY_ACTIVE,
            NEED_STARTTLS,
            AUTH_REQUIRED,
            AUTH_NOT_AVAILABLE,
            ALREADY_AUTHENTICATED,
            AUTH_IN_TRANSACTION,
            UNKNOWN_MECHANISM,
            AUTH_CANCELLED,
            AUTH_MALFORMED,
            AUTH_SUCCEEDED,
            AUTH_FAILED,
            SENDER_NOT_OWNED,
        ] {
            let enhanced = reply.enhanced.expect("every reply but 354 has a code");
            assert_eq!(u16::from(enhanced.class), reply.code / 100, "{reply:?}");
        }
    }
}
