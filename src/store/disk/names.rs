//! Room name → directory name: the one mapping that keeps a room inside the
//! data dir.
//!
//! Room names are 1–32 chars of `[A-Za-z0-9_.-]`, so `.`, `..` and `...` are
//! valid rooms, and `Lobby` and `lobby` are two rooms. A directory name must
//! be neither `.` nor `..`, and must not collide with another room's on a
//! case-insensitive file system (macOS, Windows shares). The mapping:
//!
//! - `a`–`z`, `0`–`9`, `_` and `-` are kept as they are;
//! - every other byte (upper case letters, `.`, and anything a caller might
//!   pass that is not a valid room name) becomes `%` and two **lower case**
//!   hex digits: `Lobby` → `%4cobby`, `..` → `%2e%2e`, `a.b` → `a%2eb`.
//!
//! The output only ever holds `[a-z0-9_%-]`, so it is the same under case
//! folding (no two rooms can collide), never starts with `.`, has no `/`, and
//! decoding it gives the name back (the mapping is one-to-one). Nothing here
//! touches the file system.

/// The directory name for `room` (see the module doc for the mapping).
pub(crate) fn encode(room: &str) -> String {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut out = String::with_capacity(room.len() * 3);
    for &b in room.as_bytes() {
        if kept_as_is(b) {
            out.push(char::from(b));
        } else {
            out.push('%');
            out.push(char::from(HEX[usize::from(b >> 4)]));
            out.push(char::from(HEX[usize::from(b & 0x0f)]));
        }
    }
    out
}

/// The room whose directory is `dir`, or `None` when `dir` is not a name
/// [`encode`] produces (a stray file an operator left, a temp file): such
/// entries are skipped, never guessed at.
pub(crate) fn decode(dir: &str) -> Option<String> {
    let bytes = dir.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let b = bytes[i];
        if kept_as_is(b) {
            out.push(b);
            i += 1;
        } else if b == b'%' {
            let hi = hex_value(*bytes.get(i + 1)?)?;
            let lo = hex_value(*bytes.get(i + 2)?)?;
            let v = (hi << 4) | lo;
            // Only the canonical form decodes, so each room has exactly one
            // directory name ("%61" is not another spelling of "a").
            if kept_as_is(v) {
                return None;
            }
            out.push(v);
            i += 3;
        } else {
            return None;
        }
    }
    if out.is_empty() {
        return None;
    }
    String::from_utf8(out).ok()
}

/// Bytes that stand for themselves: lower case only, so that the encoded
/// name is stable under case folding.
fn kept_as_is(b: u8) -> bool {
    b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-'
}

/// Lower-case hex digits only: `encode` never writes upper case ones.
fn hex_value(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dots_and_case_map_to_distinct_safe_names() {
        let rooms = [
            ".", "..", "...", "a", "A", "a.b", "A.B", "Lobby", "lobby", "x_y-z",
        ];
        let mut seen = std::collections::HashSet::new();
        for room in rooms {
            let dir = encode(room);
            assert!(
                dir != "." && dir != ".." && !dir.starts_with('.'),
                "{room} -> {dir}"
            );
            assert!(!dir.contains('/'));
            // Distinct even after case folding.
            assert!(
                seen.insert(dir.to_ascii_lowercase()),
                "{room} collides as {dir}"
            );
            assert_eq!(decode(&dir).as_deref(), Some(room));
        }
        assert_eq!(encode(".."), "%2e%2e");
        assert_eq!(encode("Lobby"), "%4cobby");
    }

    #[test]
    fn only_canonical_names_decode() {
        assert_eq!(decode("%61"), None);
        assert_eq!(decode("%2E"), None);
        assert_eq!(decode("%2"), None);
        assert_eq!(decode("a%"), None);
        assert_eq!(decode("LOCK"), None);
        assert_eq!(decode("x.tmp"), None);
        assert_eq!(decode(""), None);
    }
}
