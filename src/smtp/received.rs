//! The `Received:` trace header every stored message starts with (RFC 5321 §4.4).
//!
//! Built at ingest and stored as a separate piece of the log record, in front of the
//! client's bytes, so the body is never copied to prepend it.

use std::net::IpAddr;

/// The WITH clause (RFC 3848, RFC 6531 §3.7.3): how the message reached us.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    /// HELO.
    Smtp,
    /// EHLO.
    Esmtp,
    /// EHLO over TLS.
    Esmtps,
    /// EHLO, authenticated.
    Esmtpa,
    /// EHLO over TLS, authenticated.
    Esmtpsa,
    /// EHLO with SMTPUTF8.
    Utf8Smtp,
    /// SMTPUTF8 over TLS.
    Utf8Smtps,
    /// SMTPUTF8, authenticated.
    Utf8Smtpa,
    /// SMTPUTF8 over TLS, authenticated.
    Utf8Smtpsa,
}

impl Protocol {
    /// Picks the registered keyword for a session's properties.
    pub fn new(esmtp: bool, tls: bool, authenticated: bool, smtputf8: bool) -> Protocol {
        match (esmtp, smtputf8, tls, authenticated) {
            (false, ..) => Protocol::Smtp,
            (true, false, false, false) => Protocol::Esmtp,
            (true, false, true, false) => Protocol::Esmtps,
            (true, false, false, true) => Protocol::Esmtpa,
            (true, false, true, true) => Protocol::Esmtpsa,
            (true, true, false, false) => Protocol::Utf8Smtp,
            (true, true, true, false) => Protocol::Utf8Smtps,
            (true, true, false, true) => Protocol::Utf8Smtpa,
            (true, true, true, true) => Protocol::Utf8Smtpsa,
        }
    }

    /// The keyword as it appears after `with`.
    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Smtp => "SMTP",
            Protocol::Esmtp => "ESMTP",
            Protocol::Esmtps => "ESMTPS",
            Protocol::Esmtpa => "ESMTPA",
            Protocol::Esmtpsa => "ESMTPSA",
            Protocol::Utf8Smtp => "UTF8SMTP",
            Protocol::Utf8Smtps => "UTF8SMTPS",
            Protocol::Utf8Smtpa => "UTF8SMTPA",
            Protocol::Utf8Smtpsa => "UTF8SMTPSA",
        }
    }
}

/// What the header records.
#[derive(Debug, Clone, Copy)]
pub struct ReceivedFields<'a> {
    /// The client's EHLO/HELO argument (already checked printable by the parser).
    pub helo: &'a str,
    /// The client's IP address, which unlike HELO cannot be forged over TCP.
    pub peer_ip: IpAddr,
    /// Our `hostname`.
    pub hostname: &'a str,
    /// The WITH keyword.
    pub protocol: Protocol,
    /// The queue id we answered with, so logs and headers can be matched.
    pub queue_id: &'a str,
    /// The single recipient, named only when there is exactly one (naming several would
    /// disclose Bcc recipients to each other).
    pub recipient: Option<&'a str>,
    /// When the message was received, seconds since the Unix epoch (UTC).
    pub unix_time_secs: i64,
}

/// The longest header [`build`] makes: a 255-octet HELO name and host name (the parser's
/// and the configuration's limits), an IPv6 address, a 256-octet recipient, a queue id of
/// any shard and record, a date of any year. Log records leave this much room for it.
pub const MAX_RECEIVED_BYTES: usize = 1024;

/// Builds the complete header, folded, ending with CRLF.
pub fn build(fields: &ReceivedFields<'_>) -> Vec<u8> {
    let ip = match fields.peer_ip {
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => v4.to_string(),
            None => format!("IPv6:{v6}"),
        },
        IpAddr::V4(v4) => v4.to_string(),
    };
    let recipient = match fields.recipient {
        Some(rcpt) => format!("\r\n\tfor <{rcpt}>"),
        None => String::new(),
    };
    // RFC 5321 §4.4: the FROM clause is a domain or an address literal, then a comment. A
    // HELO that is neither ("evil(", "a;b") would break the header's syntax, so the client's
    // address takes its place and the HELO goes into the comment, where only a parenthesis
    // or a backslash could end it early.
    let from = if is_header_safe_name(fields.helo) {
        format!("{} ([{ip}])", fields.helo)
    } else {
        let helo: String = fields
            .helo
            .chars()
            .map(|c| {
                if matches!(c, '(' | ')' | '\\') {
                    '?'
                } else {
                    c
                }
            })
            .collect();
        format!("[{ip}] (HELO {helo})")
    };
    format!(
        "Received: from {}\r\n\tby {} (ringmail) with {} id {}{};\r\n\t{}\r\n",
        from,
        fields.hostname,
        fields.protocol.as_str(),
        fields.queue_id,
        recipient,
        rfc5322_date(fields.unix_time_secs),
    )
    .into_bytes()
}

/// A HELO that can stand as the FROM clause's domain: a domain or an address literal, or
/// a name of letters, digits, dots, hyphens and underscores (real clients send
/// "localhost" and underscored names; those break nothing).
fn is_header_safe_name(helo: &str) -> bool {
    crate::smtp::address::parse_domain(helo).is_ok()
        || helo
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b) || b >= 0x80)
}

/// Formats a time as an RFC 5322 §3.3 date in UTC: `Thu, 26 Nov 2026 19:25:56 +0000`.
pub fn rfc5322_date(unix_time_secs: i64) -> String {
    const DAYS: [&str; 7] = ["Thu", "Fri", "Sat", "Sun", "Mon", "Tue", "Wed"];
    const MONTHS: [&str; 12] = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ];
    let days = unix_time_secs.div_euclid(86_400);
    let secs_of_day = unix_time_secs.rem_euclid(86_400);
    let (year, month, day) = civil_from_days(days);
    format!(
        "{}, {} {} {} {:02}:{:02}:{:02} +0000",
        DAYS[days.rem_euclid(7) as usize],
        day,
        MONTHS[(month - 1) as usize],
        year,
        secs_of_day / 3600,
        secs_of_day % 3600 / 60,
        secs_of_day % 60,
    )
}

/// Days since 1970-01-01 to (year, month 1-12, day 1-31) in the proleptic Gregorian
/// calendar (Howard Hinnant's `civil_from_days`), so no date crate is needed.
fn civil_from_days(days: i64) -> (i64, i64, i64) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let day_of_era = z.rem_euclid(146_097);
    let year_of_era =
        (day_of_era - day_of_era / 1460 + day_of_era / 36_524 - day_of_era / 146_096) / 365;
    let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
    let mp = (5 * day_of_year + 2) / 153;
    let day = day_of_year - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = year_of_era + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dates() {
        let table: &[(i64, &str)] = &[
            (0, "Thu, 1 Jan 1970 00:00:00 +0000"),
            (951_782_400, "Tue, 29 Feb 2000 00:00:00 +0000"),
            (1_798_313_156, "Sat, 26 Dec 2026 19:25:56 +0000"),
            (1_709_251_199, "Thu, 29 Feb 2024 23:59:59 +0000"),
            (-1, "Wed, 31 Dec 1969 23:59:59 +0000"),
            (4_102_444_800, "Fri, 1 Jan 2100 00:00:00 +0000"),
        ];
        for (secs, want) in table {
            assert_eq!(rfc5322_date(*secs), *want, "{secs}");
        }
    }

    #[test]
    fn protocols() {
        assert_eq!(Protocol::new(false, true, true, true), Protocol::Smtp);
        assert_eq!(Protocol::new(true, false, false, false).as_str(), "ESMTP");
        assert_eq!(Protocol::new(true, true, false, false).as_str(), "ESMTPS");
        assert_eq!(Protocol::new(true, true, true, false).as_str(), "ESMTPSA");
        assert_eq!(Protocol::new(true, false, true, true).as_str(), "UTF8SMTPA");
    }

    #[test]
    fn a_helo_that_is_not_a_name_goes_into_the_comment() {
        for (helo, from) in [
            ("client.test", "from client.test ([192.0.2.7])"),
            ("my_host", "from my_host ([192.0.2.7])"),
            ("[192.0.2.7]", "from [192.0.2.7] ([192.0.2.7])"),
            ("evil(", "from [192.0.2.7] (HELO evil?)"),
            ("a;b)\\(c", "from [192.0.2.7] (HELO a;b???c)"),
            ("x@y", "from [192.0.2.7] (HELO x@y)"),
        ] {
            let fields = ReceivedFields {
                helo,
                peer_ip: "192.0.2.7".parse().unwrap(),
                hostname: "mx.example.test",
                protocol: Protocol::Esmtp,
                queue_id: "0001ABC",
                recipient: None,
                unix_time_secs: 0,
            };
            let header = String::from_utf8(build(&fields)).unwrap();
            assert!(
                header.starts_with(&format!("Received: {from}\r\n")),
                "{helo}: {header}"
            );
        }
    }

    #[test]
    fn the_longest_header_fits_its_bound() {
        for helo in [
            "h".repeat(crate::smtp::address::MAX_DOMAIN_BYTES),
            "(".repeat(crate::smtp::address::MAX_DOMAIN_BYTES),
        ] {
            longest_header_fits(&helo);
        }
    }

    fn longest_header_fits(helo: &str) {
        let hostname = format!("{}.test", "n".repeat(250));
        let recipient = "r".repeat(crate::smtp::address::MAX_PATH_BYTES);
        let queue_id = format!("{:03X}{:011X}", crate::config::MAX_SHARDS, u64::MAX);
        let fields = ReceivedFields {
            helo,
            peer_ip: "ffff:ffff:ffff:ffff:ffff:ffff:ffff:fffe".parse().unwrap(),
            hostname: &hostname,
            protocol: Protocol::Utf8Smtpsa,
            queue_id: &queue_id,
            recipient: Some(&recipient),
            unix_time_secs: i64::MIN / 2,
        };
        let header = build(&fields);
        assert!(header.len() <= MAX_RECEIVED_BYTES, "{}", header.len());
    }

    #[test]
    fn header() {
        let mut fields = ReceivedFields {
            helo: "client.test",
            peer_ip: "192.0.2.7".parse().unwrap(),
            hostname: "mx.example.test",
            protocol: Protocol::Esmtp,
            queue_id: "0001ABC",
            recipient: Some("a@example.test"),
            unix_time_secs: 0,
        };
        assert_eq!(
            String::from_utf8(build(&fields)).unwrap(),
            "Received: from client.test ([192.0.2.7])\r\n\tby mx.example.test (ringmail) \
             with ESMTP id 0001ABC\r\n\tfor <a@example.test>;\r\n\tThu, 1 Jan 1970 00:00:00 +0000\r\n"
        );
        fields.recipient = None;
        fields.peer_ip = "2001:db8::1".parse().unwrap();
        let header = String::from_utf8(build(&fields)).unwrap();
        assert!(header.starts_with("Received: from client.test ([IPv6:2001:db8::1])\r\n"));
        assert!(!header.contains("for <"));
        fields.peer_ip = "::ffff:192.0.2.9".parse().unwrap();
        assert!(String::from_utf8(build(&fields))
            .unwrap()
            .contains("([192.0.2.9])"));
        // Every line is short and ends with CRLF; continuation lines start with a tab.
        for line in header.split_terminator("\r\n") {
            assert!(line.len() < 78 && !line.contains('\n'));
        }
    }
}
