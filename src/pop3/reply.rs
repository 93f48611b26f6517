//! Replies: status lines with RFC 2449 response codes, written straight into the session's
//! output buffer (no Vec per reply), and the buffer itself.

use std::fmt;
use std::io::Write;

/// Extended response codes (RFC 2449 §8, RFC 3206), sent in brackets after `-ERR`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RespCode {
    /// Credentials were wrong or may not be used this way (RFC 3206 §4). We also use it for
    /// plain-text login refused on an unprotected connection: the client can fix that by using
    /// STLS or another connection, which is about how it authenticates, not a server fault
    /// ([SYS/PERM] would make clients report the server as broken). Dovecot does the same.
    Auth,
    /// The maildrop is locked by another session (RFC 2449 §8.1.2).
    InUse,
    /// A temporary server-side failure: retrying later may work (RFC 3206 §5).
    SysTemp,
    /// A permanent server-side failure (RFC 3206 §5).
    SysPerm,
}

impl fmt::Display for RespCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            RespCode::Auth => "AUTH",
            RespCode::InUse => "IN-USE",
            RespCode::SysTemp => "SYS/TEMP",
            RespCode::SysPerm => "SYS/PERM",
        })
    }
}

/// Bytes queued for the client. Consumed from the front as the socket takes them; the front
/// gap is reclaimed lazily so that consuming is O(1).
#[derive(Debug, Default)]
pub struct OutputBuffer {
    /// Queued bytes; the unsent ones are `bytes[start..]`.
    bytes: Vec<u8>,
    /// How many leading bytes the socket already took.
    start: usize,
}

impl OutputBuffer {
    /// The bytes not yet sent.
    pub fn pending(&self) -> &[u8] {
        &self.bytes[self.start..]
    }

    /// How many bytes are not yet sent.
    pub fn len(&self) -> usize {
        self.bytes.len() - self.start
    }

    /// True when everything was sent.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Marks `n` more bytes as sent (clamped to what is queued).
    pub fn consume(&mut self, n: usize) {
        self.start = (self.start + n).min(self.bytes.len());
        if self.start == self.bytes.len() {
            self.bytes.clear();
            self.start = 0;
        }
    }

    /// Appends raw bytes, first reclaiming the sent prefix when it is the larger part.
    fn append(&mut self, data: &[u8]) {
        if self.start > 0 && self.start >= self.bytes.len() / 2 {
            self.bytes.drain(..self.start);
            self.start = 0;
        }
        self.bytes.extend_from_slice(data);
    }

    /// Appends formatted text; the formatting goes directly into the buffer.
    fn append_fmt(&mut self, args: fmt::Arguments<'_>) {
        if self.start > 0 && self.start >= self.bytes.len() / 2 {
            self.bytes.drain(..self.start);
            self.start = 0;
        }
        // Writing into a Vec cannot fail.
        let _ = self.bytes.write_fmt(args);
    }

    /// `+OK <text>\r\n`.
    pub fn ok(&mut self, text: fmt::Arguments<'_>) {
        self.append_fmt(format_args!("+OK {text}\r\n"));
    }

    /// `+OK\r\n` with no text (NOOP).
    pub fn ok_bare(&mut self) {
        self.append(b"+OK\r\n");
    }

    /// `-ERR [CODE] <text>\r\n`, or without the bracket when `code` is `None`.
    pub fn err(&mut self, code: Option<RespCode>, text: fmt::Arguments<'_>) {
        match code {
            Some(code) => self.append_fmt(format_args!("-ERR [{code}] {text}\r\n")),
            None => self.append_fmt(format_args!("-ERR {text}\r\n")),
        }
    }

    /// One line of a multi-line response. Callers only pass lines that cannot start with `.`
    /// (numbers, capability names, UIDLs validated at load), so no dot-stuffing is needed.
    pub fn line(&mut self, text: fmt::Arguments<'_>) {
        self.append_fmt(format_args!("{text}\r\n"));
    }

    /// The `.` line that ends a multi-line response.
    pub fn end_multiline(&mut self) {
        self.append(b".\r\n");
    }

    /// The SASL continuation with an empty challenge (RFC 5034 §4): `+ \r\n`.
    pub fn continuation(&mut self) {
        self.append(b"+ \r\n");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replies_are_formatted_with_codes() {
        let mut out = OutputBuffer::default();
        out.ok(format_args!("{} messages", 3));
        out.ok_bare();
        out.err(Some(RespCode::InUse), format_args!("locked"));
        out.err(Some(RespCode::SysTemp), format_args!("later"));
        out.err(None, format_args!("no such message"));
        out.line(format_args!("1 120"));
        out.end_multiline();
        out.continuation();
        assert_eq!(
            out.pending(),
            b"+OK 3 messages\r\n+OK\r\n-ERR [IN-USE] locked\r\n-ERR [SYS/TEMP] later\r\n-ERR no such message\r\n1 120\r\n.\r\n+ \r\n"
        );
    }

    #[test]
    fn consuming_in_pieces_keeps_order_and_reclaims_space() {
        let mut out = OutputBuffer::default();
        out.ok(format_args!("one"));
        out.consume(4);
        assert_eq!(out.pending(), b"one\r\n");
        out.ok(format_args!("two"));
        assert_eq!(out.pending(), b"one\r\n+OK two\r\n");
        out.consume(100);
        assert!(out.is_empty());
        assert_eq!(out.len(), 0);
        out.err(Some(RespCode::SysPerm), format_args!("x"));
        assert_eq!(out.pending(), b"-ERR [SYS/PERM] x\r\n");
    }
}
