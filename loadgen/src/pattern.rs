//! Address patterns such as `user{0..99}@example.test`, expanded round-robin.
//!
//! A pattern holds at most one numeric range. Values are computed on demand from an
//! index, so a huge range costs nothing: `nth(i)` never materialises the list.

use thiserror::Error;

/// Longest pattern we accept; addresses are limited to 256 octets anyway (RFC 5321 §4.5.3.1.3).
const MAX_PATTERN_LEN_BYTES: usize = 512;

/// Why a pattern was refused.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum PatternError {
    /// Empty patterns would produce empty addresses.
    #[error("pattern is empty")]
    Empty,
    /// Guards against absurd inputs; an SMTP path cannot be that long.
    #[error("pattern is longer than {MAX_PATTERN_LEN_BYTES} bytes")]
    TooLong,
    /// Only one `{a..b}` is supported, so expansion order stays obvious.
    #[error("pattern has more than one {{a..b}} range")]
    SeveralRanges,
    /// A `{` that does not start a well-formed `{a..b}` range.
    #[error("malformed range in pattern (expected {{FIRST..LAST}} with FIRST <= LAST, decimal)")]
    BadRange,
}

/// A parsed pattern: `prefix`, then an optional number from a range, then `suffix`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pattern {
    /// Text before the range (or the whole pattern when there is no range).
    prefix: String,
    /// Inclusive range of numbers, `None` for a fixed string.
    range: Option<(u64, u64)>,
    /// Zero-padding width, set when FIRST is written with leading zeros (`{00..99}`).
    pad_width: usize,
    /// Text after the range.
    suffix: String,
}

impl Pattern {
    /// Parses `text`; braces are only allowed as one `{FIRST..LAST}` range.
    pub fn parse(text: &str) -> Result<Self, PatternError> {
        if text.is_empty() {
            return Err(PatternError::Empty);
        }
        if text.len() > MAX_PATTERN_LEN_BYTES {
            return Err(PatternError::TooLong);
        }
        let Some(open) = text.find('{') else {
            if text.contains('}') {
                return Err(PatternError::BadRange);
            }
            return Ok(Self {
                prefix: text.to_string(),
                range: None,
                pad_width: 0,
                suffix: String::new(),
            });
        };
        let close = text[open..].find('}').ok_or(PatternError::BadRange)? + open;
        let suffix = &text[close + 1..];
        if suffix.contains('{') {
            return Err(PatternError::SeveralRanges);
        }
        if suffix.contains('}') || text[..open].contains('}') {
            return Err(PatternError::BadRange);
        }
        let (first_text, last_text) = text[open + 1..close]
            .split_once("..")
            .ok_or(PatternError::BadRange)?;
        let is_decimal = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
        if !is_decimal(first_text) || !is_decimal(last_text) {
            return Err(PatternError::BadRange);
        }
        let first: u64 = first_text.parse().map_err(|_| PatternError::BadRange)?;
        let last: u64 = last_text.parse().map_err(|_| PatternError::BadRange)?;
        if first > last || last == u64::MAX {
            return Err(PatternError::BadRange);
        }
        let pad_width = if first_text.len() > 1 && first_text.starts_with('0') {
            first_text.len()
        } else {
            0
        };
        Ok(Self {
            prefix: text[..open].to_string(),
            range: Some((first, last)),
            pad_width,
            suffix: suffix.to_string(),
        })
    }

    /// How many distinct values the pattern expands to.
    pub fn count(&self) -> u64 {
        match self.range {
            Some((first, last)) => last - first + 1,
            None => 1,
        }
    }

    /// The value for index `index`, wrapping round-robin over the range.
    pub fn nth(&self, index: u64) -> String {
        match self.range {
            None => self.prefix.clone(),
            Some((first, _)) => {
                let number = first + index % self.count();
                format!(
                    "{}{:0width$}{}",
                    self.prefix,
                    number,
                    self.suffix,
                    width = self.pad_width
                )
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn expands_round_robin() {
        let table: &[(&str, u64, &str)] = &[
            ("u7@bench.test", 0, "u7@bench.test"),
            ("u7@bench.test", 5, "u7@bench.test"),
            ("user{0..99}@example.test", 0, "user0@example.test"),
            ("user{0..99}@example.test", 99, "user99@example.test"),
            ("user{0..99}@example.test", 100, "user0@example.test"),
            ("u{5..7}@x", 4, "u6@x"),
            ("u{00..99}@x", 3, "u03@x"),
            ("{1..2}", 1, "2"),
        ];
        for (text, index, want) in table {
            let pattern = Pattern::parse(text).unwrap();
            assert_eq!(pattern.nth(*index), *want, "{text} #{index}");
        }
    }

    #[test]
    fn counts_values() {
        assert_eq!(Pattern::parse("a").unwrap().count(), 1);
        assert_eq!(Pattern::parse("a{0..99}").unwrap().count(), 100);
        assert_eq!(Pattern::parse("a{3..3}").unwrap().count(), 1);
    }

    #[test]
    fn refuses_malformed() {
        let table: &[(&str, PatternError)] = &[
            ("", PatternError::Empty),
            ("u{0..9}{0..9}", PatternError::SeveralRanges),
            ("u{9..0}", PatternError::BadRange),
            ("u{0..}", PatternError::BadRange),
            ("u{a..b}", PatternError::BadRange),
            ("u{0.9}", PatternError::BadRange),
            ("u{0..9", PatternError::BadRange),
            ("u}0..9", PatternError::BadRange),
            ("u{-1..9}", PatternError::BadRange),
            ("u{0..99999999999999999999999}", PatternError::BadRange),
        ];
        for (text, want) in table {
            assert_eq!(Pattern::parse(text).unwrap_err(), *want, "{text}");
        }
        assert_eq!(
            Pattern::parse(&"x".repeat(600)).unwrap_err(),
            PatternError::TooLong
        );
    }

    proptest! {
        #[test]
        fn never_panics(text in ".{0,80}", index in any::<u64>()) {
            if let Ok(pattern) = Pattern::parse(&text) {
                let value = pattern.nth(index);
                prop_assert!(!value.is_empty() || text.is_empty());
            }
        }

        #[test]
        fn range_values_stay_in_range(first in 0u64..1000, span in 0u64..1000, index in any::<u64>()) {
            let pattern = Pattern::parse(&format!("u{{{}..{}}}@d", first, first + span)).unwrap();
            let value = pattern.nth(index);
            let number: u64 = value[1..value.len() - 2].parse().unwrap();
            prop_assert!(number >= first && number <= first + span);
            prop_assert_eq!(number, first + index % (span + 1));
        }
    }
}
