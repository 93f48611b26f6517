//! POP3 command parser: one line in (without its terminator), one [`Command`] out.
//!
//! Keywords are case-insensitive (RFC 1939 §3). Arguments are separated by spaces; we tolerate
//! repeated and trailing spaces because some clients send them, but reject extra arguments.
//! `PASS` takes the rest of the line verbatim, so passwords may contain spaces (RFC 1939 §7).

/// A parsed command. Borrowed from the input line: parsing allocates nothing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command<'a> {
    /// `CAPA` (RFC 2449): list capabilities.
    Capa,
    /// `USER name`: first half of plain-text login.
    User(&'a str),
    /// `PASS password`: second half; the password is everything after `PASS `.
    Pass(&'a str),
    /// `AUTH [mechanism [initial-response]]` (RFC 5034). No mechanism lists the mechanisms.
    Auth {
        /// SASL mechanism name as sent (compare case-insensitively).
        mechanism: Option<&'a str>,
        /// Base64 initial response; `=` stands for an empty one.
        initial_response: Option<&'a str>,
    },
    /// `STLS` (RFC 2595): start TLS.
    Stls,
    /// `STAT`: count and size of the maildrop.
    Stat,
    /// `LIST [msg]`.
    List(Option<u64>),
    /// `UIDL [msg]`.
    Uidl(Option<u64>),
    /// `RETR msg`.
    Retr(u64),
    /// `TOP msg n`: headers and the first `lines` body lines.
    Top {
        /// Message number, 1-based.
        message: u64,
        /// Body lines wanted.
        lines: u64,
    },
    /// `DELE msg`.
    Dele(u64),
    /// `NOOP`.
    Noop,
    /// `RSET`: unmark deletions.
    Rset,
    /// `QUIT`.
    Quit,
}

/// Why a line is not a command we can run. The message is what follows `-ERR `.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum CommandError {
    /// The keyword is not one we implement (APOP included: we keep no plain-text secrets).
    #[error("unknown command")]
    Unknown,
    /// A control character, or bytes that are not UTF-8, where text is expected.
    #[error("invalid characters in command")]
    BadCharacters,
    /// An argument is missing, surplus or not a number where one is needed.
    #[error("syntax error: {0}")]
    Syntax(&'static str),
}

/// Parses one command line, given without its CRLF (or bare LF).
pub fn parse_command(line: &[u8]) -> Result<Command<'_>, CommandError> {
    if line.iter().any(|&b| b < 0x20 || b == 0x7f) {
        return Err(CommandError::BadCharacters);
    }
    let line = std::str::from_utf8(line).map_err(|_| CommandError::BadCharacters)?;
    let (keyword, rest) = match line.split_once(' ') {
        Some((keyword, rest)) => (keyword, rest),
        None => (line, ""),
    };
    if keyword.len() > 4 {
        return Err(CommandError::Unknown);
    }
    let mut upper = [0u8; 4];
    upper[..keyword.len()].copy_from_slice(keyword.as_bytes());
    upper.make_ascii_uppercase();
    let keyword = &upper[..keyword.len()];

    if keyword == b"PASS" {
        // One argument that may hold spaces: everything after the single separator.
        return if rest.is_empty() {
            Err(CommandError::Syntax("PASS needs a password"))
        } else {
            Ok(Command::Pass(rest))
        };
    }

    let mut args = rest.split(' ').filter(|a| !a.is_empty());
    let mut arg = || args.next();
    let command = match keyword {
        b"CAPA" => Command::Capa,
        b"STLS" => Command::Stls,
        b"STAT" => Command::Stat,
        b"NOOP" => Command::Noop,
        b"RSET" => Command::Rset,
        b"QUIT" => Command::Quit,
        b"USER" => Command::User(arg().ok_or(CommandError::Syntax("USER needs a name"))?),
        b"AUTH" => {
            let mechanism = arg();
            let initial_response = arg();
            Command::Auth {
                mechanism,
                initial_response,
            }
        }
        b"LIST" => Command::List(arg().map(message_number).transpose()?),
        b"UIDL" => Command::Uidl(arg().map(message_number).transpose()?),
        b"RETR" => Command::Retr(message_number(
            arg().ok_or(CommandError::Syntax("RETR needs a message number"))?,
        )?),
        b"DELE" => Command::Dele(message_number(
            arg().ok_or(CommandError::Syntax("DELE needs a message number"))?,
        )?),
        b"TOP" => {
            let message = arg().ok_or(CommandError::Syntax("TOP needs a message number"))?;
            let lines = arg().ok_or(CommandError::Syntax("TOP needs a line count"))?;
            Command::Top {
                message: message_number(message)?,
                lines: number(lines).ok_or(CommandError::Syntax("line count is not a number"))?,
            }
        }
        _ => return Err(CommandError::Unknown),
    };
    if arg().is_some() {
        return Err(CommandError::Syntax("too many arguments"));
    }
    Ok(command)
}

/// A message number argument: decimal digits. Values too large for u64 saturate, which no
/// maildrop reaches, so they end as "no such message" rather than a syntax error.
fn message_number(arg: &str) -> Result<u64, CommandError> {
    number(arg).ok_or(CommandError::Syntax("message number is not a number"))
}

/// Decimal digits only (no sign, no spaces), saturating at `u64::MAX`.
fn number(arg: &str) -> Option<u64> {
    if arg.is_empty() || !arg.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    Some(arg.bytes().fold(0u64, |n, digit| {
        n.saturating_mul(10).saturating_add(u64::from(digit - b'0'))
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use Command::*;
    use CommandError::*;

    #[test]
    fn command_table() {
        let cases: &[(&[u8], Result<Command, CommandError>)] = &[
            (b"CAPA", Ok(Capa)),
            (b"capa", Ok(Capa)),
            (b"Stat", Ok(Stat)),
            (b"NOOP", Ok(Noop)),
            (b"RSET", Ok(Rset)),
            (b"QUIT", Ok(Quit)),
            (b"STLS", Ok(Stls)),
            (b"QUIT ", Ok(Quit)),
            (b"QUIT now", Err(Syntax("too many arguments"))),
            (b"USER alice@example.test", Ok(User("alice@example.test"))),
            (b"user  alice@example.test ", Ok(User("alice@example.test"))),
            (b"USER", Err(Syntax("USER needs a name"))),
            (b"USER a b", Err(Syntax("too many arguments"))),
            (
                "USER jos\u{e9}@example.test".as_bytes(),
                Ok(User("jos\u{e9}@example.test")),
            ),
            (b"PASS secret", Ok(Pass("secret"))),
            (b"PASS  two words ", Ok(Pass(" two words "))),
            (b"PASS", Err(Syntax("PASS needs a password"))),
            (b"PASS ", Err(Syntax("PASS needs a password"))),
            (
                b"AUTH",
                Ok(Auth {
                    mechanism: None,
                    initial_response: None,
                }),
            ),
            (
                b"AUTH PLAIN",
                Ok(Auth {
                    mechanism: Some("PLAIN"),
                    initial_response: None,
                }),
            ),
            (
                b"auth plain AGEAYg==",
                Ok(Auth {
                    mechanism: Some("plain"),
                    initial_response: Some("AGEAYg=="),
                }),
            ),
            (
                b"AUTH PLAIN =",
                Ok(Auth {
                    mechanism: Some("PLAIN"),
                    initial_response: Some("="),
                }),
            ),
            (b"AUTH PLAIN a b", Err(Syntax("too many arguments"))),
            (b"LIST", Ok(List(None))),
            (b"LIST 3", Ok(List(Some(3)))),
            (b"LIST 0", Ok(List(Some(0)))),
            (b"LIST x", Err(Syntax("message number is not a number"))),
            (b"LIST -1", Err(Syntax("message number is not a number"))),
            (b"LIST +1", Err(Syntax("message number is not a number"))),
            (b"LIST 1 2", Err(Syntax("too many arguments"))),
            (b"LIST 99999999999999999999999", Ok(List(Some(u64::MAX)))),
            (b"UIDL", Ok(Uidl(None))),
            (b"UIDL 12", Ok(Uidl(Some(12)))),
            (b"RETR 1", Ok(Retr(1))),
            (b"RETR", Err(Syntax("RETR needs a message number"))),
            (b"DELE 7", Ok(Dele(7))),
            (b"DELE", Err(Syntax("DELE needs a message number"))),
            (
                b"TOP 1 10",
                Ok(Top {
                    message: 1,
                    lines: 10,
                }),
            ),
            (
                b"top 2 0",
                Ok(Top {
                    message: 2,
                    lines: 0,
                }),
            ),
            (b"TOP 1", Err(Syntax("TOP needs a line count"))),
            (b"TOP", Err(Syntax("TOP needs a message number"))),
            (b"TOP 1 x", Err(Syntax("line count is not a number"))),
            (b"TOP 1 2 3", Err(Syntax("too many arguments"))),
            (b"", Err(Unknown)),
            (b" QUIT", Err(Unknown)),
            (b"APOP alice 0123", Err(Unknown)),
            (b"QUITX", Err(Unknown)),
            (b"RETRIEVE 1", Err(Unknown)),
            (b"NOOP\r", Err(BadCharacters)),
            (b"USER a\0b", Err(BadCharacters)),
            (b"PASS a\tb", Err(BadCharacters)),
            (b"USER \xff", Err(BadCharacters)),
            (b"\x7fQUIT", Err(BadCharacters)),
        ];
        for (line, expected) in cases {
            assert_eq!(
                &parse_command(line),
                expected,
                "{:?}",
                String::from_utf8_lossy(line)
            );
        }
    }

    proptest! {
        #[test]
        fn never_panics(line in proptest::collection::vec(any::<u8>(), 0..300)) {
            let _ = parse_command(&line);
        }

        #[test]
        fn message_numbers_round_trip(n in any::<u64>(), keyword in "(list|uidl|retr|dele|LIST|UIDL|RETR|DELE|List|Uidl|rEtR|dElE)") {
            let line = format!("{keyword} {n}");
            let expected = match keyword.to_ascii_uppercase().as_str() {
                "LIST" => List(Some(n)),
                "UIDL" => Uidl(Some(n)),
                "RETR" => Retr(n),
                _ => Dele(n),
            };
            prop_assert_eq!(parse_command(line.as_bytes()), Ok(expected));
        }

        #[test]
        fn passwords_are_taken_verbatim(password in "[ -~]{1,200}") {
            let line = format!("PASS {password}");
            prop_assert_eq!(parse_command(line.as_bytes()), Ok(Pass(&password)));
        }
    }
}
