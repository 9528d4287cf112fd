//! Envoy's RBAC HTTP filter (`envoy.filters.http.rbac`) for what istiod writes from
//! AuthorizationPolicies: ALLOW or DENY rules whose policies match when any permission and any
//! principal match. Permissions: any, `:method` and other headers, URL path, destination port,
//! and/or/not. Principals: any, authenticated principal name (the peer certificate's URI SAN),
//! headers, and/or/not. Denied requests get 403 `RBAC: access denied`; stats
//! `http.PREFIX.rbac.allowed|denied`, as Envoy counts them (each filter counts its own decision).

use envoy_types::pb::envoy::config::rbac::v3 as pb;
use envoy_types::pb::envoy::extensions::filters::http::rbac::v3 as filter;

use super::proto::{string_match, Reject, StrMatch, ValueMatch};

/// A header condition; the name may be a pseudo-header (`:method`, `:path`, `:authority`).
#[derive(Debug)]
pub struct HeaderMatch {
    pub name: HeaderKey,
    pub value: ValueMatch,
}

#[derive(Debug)]
pub enum HeaderKey {
    Method,
    Path,
    Authority,
    Header(http::HeaderName),
}

fn header_matcher(
    h: &envoy_types::pb::envoy::config::route::v3::HeaderMatcher,
) -> Result<HeaderMatch, Reject> {
    let invalid = || format!("RBAC: invalid header name {:?}", h.name);
    let name = match h.name.to_ascii_lowercase().as_str() {
        ":method" => HeaderKey::Method,
        ":path" => HeaderKey::Path,
        ":authority" => HeaderKey::Authority,
        n if n.starts_with(':') || n.is_empty() => return Err(invalid()),
        n => HeaderKey::Header(http::HeaderName::from_bytes(n.as_bytes()).map_err(|_| invalid())?),
    };
    Ok(HeaderMatch {
        value: ValueMatch::of(h)?,
        name,
    })
}

/// Envoy's local reply body for a denied request.
pub const DENIED_BODY: &str = "RBAC: access denied";

#[derive(Debug)]
pub struct Rbac {
    pub deny: bool,
    /// (policy name, policy), in name order (Envoy's map is unordered; any match decides).
    pub policies: Vec<(String, Policy)>,
}

#[derive(Debug)]
pub struct Policy {
    pub permissions: Vec<Permission>,
    pub principals: Vec<Principal>,
}

#[derive(Debug)]
pub enum Permission {
    Any,
    And(Vec<Permission>),
    Or(Vec<Permission>),
    Not(Box<Permission>),
    Header(HeaderMatch),
    Path(StrMatch),
    Port(u16),
}

#[derive(Debug)]
pub enum Principal {
    Any,
    And(Vec<Principal>),
    Or(Vec<Principal>),
    Not(Box<Principal>),
    /// Any authenticated peer (None) or one whose name matches.
    Authenticated(Option<StrMatch>),
    Header(HeaderMatch),
}

/// What a decision looks at.
pub struct Request<'a> {
    pub headers: &'a http::HeaderMap,
    pub method: &'a str,
    /// Without the query (what `url_path` matches).
    pub path: &'a str,
    /// With the query (the `:path` header).
    pub full_path: &'a str,
    pub authority: Option<&'a str>,
    pub port: u16,
    /// The peer certificate's URI SAN (TLS with a client certificate), if any.
    pub peer: Option<&'a str>,
}

fn header_matches(h: &HeaderMatch, r: &Request) -> bool {
    let v = match &h.name {
        HeaderKey::Method => Some(r.method),
        HeaderKey::Path => Some(r.full_path),
        HeaderKey::Authority => r.authority,
        HeaderKey::Header(name) => return h.value.matches_header(r.headers, name),
    };
    h.value.matches(v.map(str::as_bytes))
}

impl Permission {
    fn matches(&self, r: &Request) -> bool {
        match self {
            Permission::Any => true,
            Permission::And(l) => l.iter().all(|p| p.matches(r)),
            Permission::Or(l) => l.iter().any(|p| p.matches(r)),
            Permission::Not(p) => !p.matches(r),
            Permission::Header(h) => header_matches(h, r),
            Permission::Path(m) => m.matches(Some(r.path)),
            Permission::Port(p) => *p == r.port,
        }
    }
}

impl Principal {
    fn matches(&self, r: &Request) -> bool {
        match self {
            Principal::Any => true,
            Principal::And(l) => l.iter().all(|p| p.matches(r)),
            Principal::Or(l) => l.iter().any(|p| p.matches(r)),
            Principal::Not(p) => !p.matches(r),
            Principal::Authenticated(None) => r.peer.is_some(),
            Principal::Authenticated(Some(m)) => r.peer.is_some() && m.matches(r.peer),
            Principal::Header(h) => header_matches(h, r),
        }
    }
}

impl Rbac {
    /// Whether the request may go on.
    pub fn allows(&self, r: &Request) -> bool {
        let hit = self.policies.iter().any(|(_, p)| {
            p.permissions.iter().any(|x| x.matches(r)) && p.principals.iter().any(|x| x.matches(r))
        });
        hit != self.deny
    }
}

fn permission(p: &pb::Permission) -> Result<Permission, Reject> {
    use pb::permission::Rule;
    Ok(match &p.rule {
        Some(Rule::Any(true)) => Permission::Any,
        Some(Rule::AndRules(s)) => Permission::And(s.rules.iter().map(permission).collect::<Result<_, _>>()?),
        Some(Rule::OrRules(s)) => Permission::Or(s.rules.iter().map(permission).collect::<Result<_, _>>()?),
        Some(Rule::NotRule(n)) => Permission::Not(Box::new(permission(n)?)),
        Some(Rule::Header(h)) => Permission::Header(header_matcher(h)?),
        Some(Rule::UrlPath(m)) => {
            use envoy_types::pb::envoy::r#type::matcher::v3::path_matcher::Rule as P;
            match &m.rule {
                Some(P::Path(s)) => Permission::Path(string_match(s)?),
                None => return Err("RBAC url_path without a matcher".into()),
            }
        }
        Some(Rule::DestinationPort(p)) if *p > 0 && *p <= 65535 => Permission::Port(*p as u16),
        _ => return Err("RBAC permission: any, header, url_path, destination_port and and/or/not rules are supported".into()),
    })
}

fn principal(p: &pb::Principal) -> Result<Principal, Reject> {
    use pb::principal::Identifier;
    Ok(match &p.identifier {
        Some(Identifier::Any(true)) => Principal::Any,
        Some(Identifier::AndIds(s)) => {
            Principal::And(s.ids.iter().map(principal).collect::<Result<_, _>>()?)
        }
        Some(Identifier::OrIds(s)) => {
            Principal::Or(s.ids.iter().map(principal).collect::<Result<_, _>>()?)
        }
        Some(Identifier::NotId(n)) => Principal::Not(Box::new(principal(n)?)),
        Some(Identifier::Authenticated(a)) => {
            Principal::Authenticated(a.principal_name.as_ref().map(string_match).transpose()?)
        }
        Some(Identifier::Header(h)) => Principal::Header(header_matcher(h)?),
        _ => {
            return Err(
                "RBAC principal: any, authenticated, header and and/or/not ids are supported"
                    .into(),
            )
        }
    })
}

/// The filter's config; `None` when it has no rules (Envoy then lets everything through).
pub fn rbac(f: &filter::Rbac) -> Result<Option<Rbac>, Reject> {
    if f.matcher.is_some() || f.shadow_matcher.is_some() || f.shadow_rules.is_some() {
        return Err("RBAC: matchers and shadow rules are not supported".into());
    }
    let Some(rules) = &f.rules else {
        return Ok(None);
    };
    let deny = match pb::rbac::Action::try_from(rules.action) {
        Ok(pb::rbac::Action::Allow) => false,
        Ok(pb::rbac::Action::Deny) => true,
        _ => return Err("RBAC: ALLOW and DENY actions are supported".into()),
    };
    let mut policies = Vec::new();
    for (name, p) in &rules.policies {
        if p.condition.is_some() || p.checked_condition.is_some() {
            return Err(format!(
                "RBAC policy {name}: CEL conditions are not supported"
            ));
        }
        policies.push((
            name.clone(),
            Policy {
                permissions: p
                    .permissions
                    .iter()
                    .map(permission)
                    .collect::<Result<_, _>>()?,
                principals: p
                    .principals
                    .iter()
                    .map(principal)
                    .collect::<Result<_, _>>()?,
            },
        ));
    }
    policies.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(Some(Rbac { deny, policies }))
}
