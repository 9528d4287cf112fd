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
pub(crate) fn header_value_matcher(h: &route::HeaderMatcher) -> Result<StrMatch, Reject> {
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
