//! The edge helpers every proto conversion of the proxy shares: the NACK reason type, typed
//! `Any` decoding, and Envoy's string and header value matchers.

use envoy_types::pb::envoy::config::route::v3 as route;
use envoy_types::pb::envoy::r#type::matcher::v3 as matcher;
use envoy_types::pb::google::protobuf::Any;
use prost::{Message, Name};

/// Why a resource was rejected; becomes the NACK's error_detail.
pub type Reject = String;

pub fn decode<T: Message + Default + Name>(any: &Any) -> Result<T, Reject> {
    if any.type_url != T::type_url() {
        return Err(format!(
            "expected {} but got {}",
            T::type_url(),
            any.type_url
        ));
    }
    T::decode(any.value.as_slice()).map_err(|e| format!("cannot decode {}: {e}", T::full_name()))
}

#[derive(Debug)]
pub enum StrMatch {
    Exact(String),
    Prefix(String),
    Suffix(String),
    Contains(String),
    Regex(regex::Regex),
    Present(bool),
}

impl StrMatch {
    /// Bytes as Envoy matches header values: a value that is not UTF-8 is compared byte by
    /// byte (regexes see it with replacement characters).
    pub fn matches_bytes(&self, v: &[u8]) -> bool {
        match self {
            StrMatch::Present(p) => *p,
            StrMatch::Exact(s) => v == s.as_bytes(),
            StrMatch::Prefix(s) => v.starts_with(s.as_bytes()),
            StrMatch::Suffix(s) => v.ends_with(s.as_bytes()),
            StrMatch::Contains(s) => s.is_empty() || v.windows(s.len()).any(|w| w == s.as_bytes()),
            StrMatch::Regex(r) => match std::str::from_utf8(v) {
                Ok(v) => r.is_match(v),
                Err(_) => r.is_match(&String::from_utf8_lossy(v)),
            },
        }
    }

    pub fn matches(&self, v: Option<&str>) -> bool {
        match (self, v) {
            (StrMatch::Present(p), v) => v.is_some() == *p,
            (_, None) => false,
            (StrMatch::Exact(s), Some(v)) => v == s,
            (StrMatch::Prefix(s), Some(v)) => v.starts_with(s.as_str()),
            (StrMatch::Suffix(s), Some(v)) => v.ends_with(s.as_str()),
            (StrMatch::Contains(s), Some(v)) => v.contains(s.as_str()),
            (StrMatch::Regex(r), Some(v)) => r.is_match(v),
        }
    }
}

/// A header condition as Envoy 1.40's `HeaderMatcher` evaluates it: a header given more than
/// once matches when any of its values does (each value on its own, not joined; a value with
/// commas is one value), and `invert_match` inverts that; an absent header matches nothing,
/// inverted or not, unless it is a presence test or `treat_missing_header_as_empty` makes it
/// the empty value. Observed with real Envoy in tests/mtls.rs and tests/proxy_differential.rs.
#[derive(Debug)]
pub struct ValueMatch {
    pub matcher: StrMatch,
    pub invert: bool,
    pub missing_as_empty: bool,
}

impl ValueMatch {
    pub fn of(h: &route::HeaderMatcher) -> Result<ValueMatch, Reject> {
        Ok(ValueMatch {
            matcher: header_value_matcher(h)?,
            invert: h.invert_match,
            missing_as_empty: h.treat_missing_header_as_empty,
        })
    }

    /// Against a single value, or none.
    pub fn matches(&self, v: Option<&[u8]>) -> bool {
        match v {
            Some(v) => self.matcher.matches_bytes(v) != self.invert,
            None => self.absent(),
        }
    }

    fn absent(&self) -> bool {
        match &self.matcher {
            _ if self.missing_as_empty => self.matcher.matches_bytes(b"") != self.invert,
            // An absent header matches only `present_match: false`, or an inverted
            // `present_match: true`.
            StrMatch::Present(p) => *p == self.invert,
            _ => false,
        }
    }

    /// Against every value of a header of `headers`.
    pub fn matches_header(&self, headers: &http::HeaderMap, name: &http::HeaderName) -> bool {
        let mut values = headers.get_all(name).iter().peekable();
        if values.peek().is_none() {
            return self.absent();
        }
        values.any(|v| self.matcher.matches_bytes(v.as_bytes())) != self.invert
    }
}

pub(crate) fn regex(r: &matcher::RegexMatcher) -> Result<regex::Regex, Reject> {
    regex::Regex::new(&format!("^(?:{})$", r.regex)).map_err(|e| {
        format!(
            "invalid regex {:?}: {}",
            r.regex,
            e.to_string().lines().last().unwrap_or("")
        )
    })
}

/// How a header matcher matches the value (its name aside: RBAC names pseudo-headers).
#[allow(deprecated)] // the deprecated header matchers are still sent by control planes
fn header_value_matcher(h: &route::HeaderMatcher) -> Result<StrMatch, Reject> {
    use route::header_matcher::HeaderMatchSpecifier as H;
    Ok(match &h.header_match_specifier {
        Some(H::ExactMatch(s)) => StrMatch::Exact(s.clone()),
        Some(H::PrefixMatch(s)) => StrMatch::Prefix(s.clone()),
        Some(H::SuffixMatch(s)) => StrMatch::Suffix(s.clone()),
        Some(H::ContainsMatch(s)) => StrMatch::Contains(s.clone()),
        Some(H::SafeRegexMatch(re)) => StrMatch::Regex(regex(re)?),
        Some(H::PresentMatch(p)) => StrMatch::Present(*p),
        Some(H::StringMatch(sm)) => string_match(sm)?,
        None => StrMatch::Present(true),
        Some(_) => return Err(format!("header {}: unsupported header match", h.name)),
    })
}

pub(crate) fn string_match(m: &matcher::StringMatcher) -> Result<StrMatch, Reject> {
    use matcher::string_matcher::MatchPattern;
    if m.ignore_case {
        return Err("ignore_case string matching is not supported".into());
    }
    Ok(match &m.match_pattern {
        Some(MatchPattern::Exact(s)) => StrMatch::Exact(s.clone()),
        Some(MatchPattern::Prefix(s)) => StrMatch::Prefix(s.clone()),
        Some(MatchPattern::Suffix(s)) => StrMatch::Suffix(s.clone()),
        Some(MatchPattern::Contains(s)) => StrMatch::Contains(s.clone()),
        Some(MatchPattern::SafeRegex(r)) => StrMatch::Regex(regex(r)?),
        _ => return Err("unsupported string match".into()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hm(m: StrMatch, invert: bool, missing_as_empty: bool) -> ValueMatch {
        ValueMatch {
            matcher: m,
            invert,
            missing_as_empty,
        }
    }

    /// Envoy's header matching: absent headers match nothing, inverted or not, except presence
    /// tests and `treat_missing_header_as_empty`; of repeated headers any value may match.
    #[test]
    fn header_matching_follows_envoy() {
        let exact = || StrMatch::Exact("a".into());
        assert!(!hm(exact(), false, false).matches(None));
        assert!(!hm(exact(), true, false).matches(None));
        assert!(hm(exact(), true, true).matches(None));
        assert!(!hm(exact(), false, true).matches(None));
        assert!(hm(StrMatch::Exact(String::new()), false, true).matches(None));
        assert!(!hm(StrMatch::Present(true), false, false).matches(None));
        assert!(hm(StrMatch::Present(true), true, false).matches(None));
        assert!(hm(StrMatch::Present(false), false, false).matches(None));
        assert!(!hm(StrMatch::Present(false), true, false).matches(None));
        assert!(hm(StrMatch::Present(true), false, true).matches(None));

        let mut headers = http::HeaderMap::new();
        let name = http::HeaderName::from_static("x-tag");
        headers.append(&name, "b".parse().unwrap());
        assert!(!hm(exact(), false, false).matches_header(&headers, &name));
        assert!(hm(exact(), true, false).matches_header(&headers, &name));
        // Any value matching is a match, which invert_match then inverts.
        headers.append(&name, "a".parse().unwrap());
        assert!(hm(exact(), false, false).matches_header(&headers, &name));
        assert!(!hm(exact(), true, false).matches_header(&headers, &name));
        assert!(!hm(StrMatch::Exact("b,a".into()), false, false).matches_header(&headers, &name));
        let mut one = http::HeaderMap::new();
        one.insert(&name, "b,a".parse().unwrap());
        assert!(!hm(exact(), false, false).matches_header(&one, &name));
        // Bytes that are not UTF-8 still match by bytes.
        let raw = http::HeaderValue::from_bytes(b"caf\xe9").unwrap();
        let mut h = http::HeaderMap::new();
        h.insert(&name, raw);
        assert!(hm(StrMatch::Prefix("caf".into()), false, false).matches_header(&h, &name));
        assert!(hm(StrMatch::Exact("caf".into()), true, false).matches_header(&h, &name));
        assert!(hm(StrMatch::Contains("af".into()), false, false).matches_header(&h, &name));
    }
}
