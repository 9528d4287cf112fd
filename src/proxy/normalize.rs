//! Request path normalization, as Envoy's HTTP connection manager does it before any filter
//! (RBAC included) and before routing: `normalize_path` (RFC 3986 dot segments, as Chromium's
//! URL canonicalizer that Envoy uses: `%2E` counts as a dot, `\` as a slash, escaped
//! unreserved characters are decoded, characters a path may not hold are escaped),
//! `merge_slashes`, and `path_with_escaped_slashes_action`. The query is left as it is.
//! istiod sets `normalize_path` on every HTTP connection manager (mesh config
//! `pathNormalization` BASE): without it `/public/../admin` would pass a policy on `/admin`.

use std::borrow::Cow;

/// What a listener's HTTP connection manager does to request paths.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PathOptions {
    pub normalize: bool,
    pub merge_slashes: bool,
    pub escaped_slashes: EscapedSlashes,
}

/// `path_with_escaped_slashes_action` (`%2F`, `%5C` in either case).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum EscapedSlashes {
    /// KEEP_UNCHANGED (and Envoy's default for IMPLEMENTATION_SPECIFIC_DEFAULT).
    #[default]
    Keep,
    /// REJECT_REQUEST: 400.
    Reject,
    /// UNESCAPE_AND_FORWARD: decoded before the other steps.
    Unescape,
}

#[derive(Debug, PartialEq, Eq)]
pub enum Outcome {
    Unchanged,
    Rewritten(String),
    /// 400 (Envoy's `path_normalization_failed` / escaped slashes rejected).
    Reject,
}

impl PathOptions {
    pub fn is_noop(&self) -> bool {
        *self == PathOptions::default()
    }

    /// The request target (path and query) after the connection manager's rewrites.
    pub fn apply(&self, path_and_query: &str) -> Outcome {
        if path_and_query == "*" {
            return Outcome::Unchanged;
        }
        let (path, query) = match path_and_query.find('?') {
            Some(i) => path_and_query.split_at(i),
            None => (path_and_query, ""),
        };
        let mut cur = Cow::Borrowed(path);
        if self.escaped_slashes != EscapedSlashes::Keep && has_escaped_slash(path) {
            if self.escaped_slashes == EscapedSlashes::Reject {
                return Outcome::Reject;
            }
            cur = Cow::Owned(unescape_slashes(path));
        }
        if self.normalize {
            if let Some(c) = canonical(&cur) {
                cur = Cow::Owned(c);
            }
        }
        if self.merge_slashes && cur.contains("//") {
            cur = Cow::Owned(merge_slashes(&cur));
        }
        match cur {
            Cow::Borrowed(_) => Outcome::Unchanged,
            Cow::Owned(p) if p == path => Outcome::Unchanged,
            Cow::Owned(mut p) => {
                p.push_str(query);
                Outcome::Rewritten(p)
            }
        }
    }
}

fn has_escaped_slash(path: &str) -> bool {
    path.as_bytes()
        .windows(3)
        .any(|w| w[0] == b'%' && matches!((w[1], w[2] | 0x20), (b'2', b'f') | (b'5', b'c')))
}

fn unescape_slashes(path: &str) -> String {
    let b = path.as_bytes();
    let mut out: Vec<u8> = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' && i + 2 < b.len() {
            match (b[i + 1], b[i + 2] | 0x20) {
                (b'2', b'f') => {
                    out.push(b'/');
                    i += 3;
                    continue;
                }
                (b'5', b'c') => {
                    out.push(b'\\');
                    i += 3;
                    continue;
                }
                _ => {}
            }
        }
        out.push(b[i]);
        i += 1;
    }
    // Only ASCII escapes were replaced by ASCII bytes: still UTF-8.
    String::from_utf8(out).unwrap_or_else(|e| String::from_utf8_lossy(e.as_bytes()).into_owned())
}

fn merge_slashes(path: &str) -> String {
    let mut out = String::with_capacity(path.len());
    for c in path.chars() {
        if c == '/' && out.ends_with('/') {
            continue;
        }
        out.push(c);
    }
    out
}

/// Characters Envoy's canonicalizer escapes in a path (besides controls and non-ASCII bytes;
/// `|` and `^` included, as Envoy 1.40 was seen to do).
fn must_escape(b: u8) -> bool {
    b <= 0x20
        || b >= 0x7f
        || matches!(
            b,
            b'"' | b'#' | b'<' | b'>' | b'`' | b'{' | b'}' | b'|' | b'^'
        )
}

fn unreserved(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~')
}

/// Whether the path is already canonical as far as a quick scan can tell: starts with `/`,
/// no escapes, backslashes or characters to escape, no segment starting with a dot.
fn plainly_canonical(b: &[u8]) -> bool {
    b.first() == Some(&b'/')
        && !b.iter().any(|&c| c == b'%' || c == b'\\' || must_escape(c))
        && !b.windows(2).any(|w| w == b"/.")
}

/// The canonical form of a path (no query), or `None` when it is canonical already.
pub fn canonical(path: &str) -> Option<String> {
    let b = path.as_bytes();
    if plainly_canonical(b) {
        return None;
    }
    let body = path.strip_prefix(['/', '\\']).unwrap_or(path);
    let parts: Vec<&str> = body.split(['/', '\\']).collect();
    let mut out: Vec<String> = Vec::with_capacity(parts.len());
    for (i, raw) in parts.iter().enumerate() {
        let last = i + 1 == parts.len();
        let seg = canonical_segment(raw);
        match seg.as_str() {
            "." => {}
            ".." => {
                out.pop();
            }
            _ => {
                out.push(seg);
                continue;
            }
        }
        // A trailing dot segment leaves the directory: `/a/b/..` is `/a/`.
        if last {
            out.push(String::new());
        }
    }
    let mut s = String::with_capacity(path.len() + 1);
    for seg in &out {
        s.push('/');
        s.push_str(seg);
    }
    if out.is_empty() {
        s.push('/');
    }
    (s != path).then_some(s)
}

fn hex(c: u8) -> Option<u8> {
    (c as char).to_digit(16).map(|d| d as u8)
}

fn canonical_segment(raw: &str) -> String {
    const HEX: &[u8; 16] = b"0123456789ABCDEF";
    let b = raw.as_bytes();
    let mut out = String::with_capacity(raw.len());
    let mut i = 0;
    while i < b.len() {
        let c = b[i];
        if c == b'%' {
            if let (Some(h), Some(l)) = (
                b.get(i + 1).copied().and_then(hex),
                b.get(i + 2).copied().and_then(hex),
            ) {
                let v = h << 4 | l;
                if unreserved(v) {
                    out.push(v as char);
                } else {
                    out.push_str(&raw[i..i + 3]);
                }
                i += 3;
                continue;
            }
            // An invalid escape passes through.
            out.push('%');
        } else if must_escape(c) {
            out.push('%');
            out.push(HEX[(c >> 4) as usize] as char);
            out.push(HEX[(c & 15) as usize] as char);
        } else {
            out.push(c as char);
        }
        i += 1;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn norm(p: &str) -> String {
        canonical(p).unwrap_or_else(|| p.to_string())
    }

    #[test]
    fn dot_segments_escapes_and_backslashes() {
        // Envoy's own cases (path_utility_test.cc) and RFC 3986 section 5.2.4.
        for (raw, want) in [
            ("/a/b/../c", "/a/c"),
            ("/a/b/./c", "/a/b/c"),
            ("a/b/../c", "/a/c"),
            ("/a/b/../../../../c", "/c"),
            ("/a/..\\c", "/c"),
            ("/%c0%af", "/%c0%af"),
            ("/%5c%25", "/%5c%25"),
            ("/a/b/%2E%2E/c", "/a/c"),
            ("/a/b/%2e./c", "/a/c"),
            ("/a/b/.%2E", "/a/"),
            ("/a/b/..", "/a/"),
            ("/a/b/.", "/a/b/"),
            ("/..", "/"),
            ("/", "/"),
            ("/%61dmin", "/admin"),
            ("/a%7Eb%2fc", "/a~b%2fc"),
            ("/a//b", "/a//b"),
            ("/a b", "/a%20b"),
            ("/a{b}|c^d", "/a%7Bb%7D%7Cc%5Ed"),
            ("/a[b]c'!$&()*+,;=:@", "/a[b]c'!$&()*+,;=:@"),
            ("/A/%2a/%7e", "/A/%2a/~"),
            ("/100%", "/100%"),
            ("/.well-known/x", "/.well-known/x"),
            ("/productpage", "/productpage"),
        ] {
            assert_eq!(norm(raw), want, "{raw}");
        }
        assert_eq!(canonical("/static/bootstrap.min.css"), None);
    }

    #[test]
    fn options_apply_in_envoys_order_and_keep_the_query() {
        let base = PathOptions {
            normalize: true,
            ..Default::default()
        };
        assert_eq!(
            base.apply("/a/../b?x=/../y"),
            Outcome::Rewritten("/b?x=/../y".into())
        );
        assert_eq!(base.apply("/b?x=1"), Outcome::Unchanged);
        assert_eq!(base.apply("/a/..%2fb"), Outcome::Unchanged);
        let merge = PathOptions {
            merge_slashes: true,
            ..base
        };
        assert_eq!(merge.apply("//a///b/"), Outcome::Rewritten("/a/b/".into()));
        let reject = PathOptions {
            escaped_slashes: EscapedSlashes::Reject,
            ..base
        };
        assert_eq!(reject.apply("/a/..%2Fb"), Outcome::Reject);
        let unescape = PathOptions {
            escaped_slashes: EscapedSlashes::Unescape,
            ..base
        };
        assert_eq!(
            unescape.apply("/a/b/..%2fc"),
            Outcome::Rewritten("/a/c".into())
        );
        assert_eq!(
            unescape.apply("/a%5c..%5cb"),
            Outcome::Rewritten("/b".into())
        );
        assert!(PathOptions::default().is_noop());
        assert_eq!(PathOptions::default().apply("/a/../b"), Outcome::Unchanged);
    }
}
