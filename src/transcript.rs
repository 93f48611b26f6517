//! The escapes of the golden dialogue files (`tests/dialogues/`), shared by the unit runners
//! of `smtp` and `pop3` and by `tests/dialogues.rs`, which includes this file by path.

/// Decodes `\r \n \t \0 \\ \xHH`.
pub fn unescape(text: &str) -> Result<Vec<u8>, String> {
    let mut out = Vec::with_capacity(text.len());
    let bytes = text.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] != b'\\' {
            out.push(bytes[i]);
            i += 1;
            continue;
        }
        let escape = bytes.get(i + 1).ok_or("dangling backslash")?;
        i += 2;
        out.push(match escape {
            b'r' => b'\r',
            b'n' => b'\n',
            b't' => b'\t',
            b'0' => 0,
            b'\\' => b'\\',
            b'x' => {
                let hex = text.get(i..i + 2).ok_or("short \\x escape")?;
                i += 2;
                u8::from_str_radix(hex, 16).map_err(|e| format!("bad \\x{hex}: {e}"))?
            }
            other => return Err(format!("unknown escape \\{}", *other as char)),
        });
    }
    Ok(out)
}
