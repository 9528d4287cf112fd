//! AuthorizationPolicy -> Envoy's RBAC HTTP filter, as istiod translates it for a sidecar's
//! inbound listeners: a DENY filter then an ALLOW filter (each only when a policy of that
//! action selects the workload), one RBAC policy per rule named `ns[NS]-policy[NAME]-rule[I]`.
//! A rule's sources become principals (principal names are `spiffe://` + the value;
//! namespaces a regex on the principal), its operations permissions (`:method` header, URL
//! path, destination port); each list of values is an OR, fields and conditions an AND,
//! `not` values a negation. An ALLOW policy without rules allows nothing.

use std::collections::HashMap;

use envoy_types::pb::envoy::config::rbac::v3 as pb;
use envoy_types::pb::envoy::config::route::v3 as route;
use envoy_types::pb::envoy::extensions::filters::http::rbac::v3 as filter;
use envoy_types::pb::envoy::r#type::matcher::v3 as matcher;

use crate::model::{AuthorizationPolicySpec, AuthzAction, AuthzRule, Labels, Mesh, Values};

pub const RBAC_FILTER: &str = "envoy.filters.http.rbac";

/// Istio's string matching of policy values: `*` any non-empty value, `x*` a prefix, `*x` a
/// suffix, else exact.
fn string(v: &str, prefix: &str) -> matcher::StringMatcher {
    use matcher::string_matcher::MatchPattern;
    let pattern = if v == "*" {
        MatchPattern::SafeRegex(matcher::RegexMatcher {
            regex: ".+".into(),
            ..Default::default()
        })
    } else if let Some(s) = v.strip_prefix('*') {
        MatchPattern::Suffix(s.to_string())
    } else if let Some(p) = v.strip_suffix('*') {
        MatchPattern::Prefix(format!("{prefix}{p}"))
    } else {
        MatchPattern::Exact(format!("{prefix}{v}"))
    };
    matcher::StringMatcher {
        match_pattern: Some(pattern),
        ..Default::default()
    }
}

fn regex_escape(s: &str) -> String {
    regex::escape(s)
}

/// A namespace value as a regex on the principal name (`.*/ns/NS/.*`).
fn namespace(v: &str) -> matcher::StringMatcher {
    let ns = match v {
        "*" => ".+".to_string(),
        v => {
            let (pre, rest) = v.strip_prefix('*').map_or(("", v), |r| (".*", r));
            let (mid, post) = rest.strip_suffix('*').map_or((rest, ""), |r| (r, ".*"));
            format!("{pre}{}{post}", regex_escape(mid))
        }
    };
    matcher::StringMatcher {
        match_pattern: Some(matcher::string_matcher::MatchPattern::SafeRegex(
            matcher::RegexMatcher {
                regex: format!(".*/ns/{ns}/.*"),
                ..Default::default()
            },
        )),
        ..Default::default()
    }
}

fn authenticated(m: matcher::StringMatcher) -> pb::Principal {
    pb::Principal {
        identifier: Some(pb::principal::Identifier::Authenticated(
            pb::principal::Authenticated {
                principal_name: Some(m),
            },
        )),
    }
}

fn header(name: &str, m: matcher::StringMatcher) -> route::HeaderMatcher {
    route::HeaderMatcher {
        name: name.to_string(),
        header_match_specifier: Some(route::header_matcher::HeaderMatchSpecifier::StringMatch(m)),
        ..Default::default()
    }
}

fn or_ids(ids: Vec<pb::Principal>) -> pb::Principal {
    pb::Principal {
        identifier: Some(pb::principal::Identifier::OrIds(pb::principal::Set { ids })),
    }
}

fn not_id(p: pb::Principal) -> pb::Principal {
    pb::Principal {
        identifier: Some(pb::principal::Identifier::NotId(Box::new(p))),
    }
}

fn and_ids(ids: Vec<pb::Principal>) -> pb::Principal {
    if ids.is_empty() {
        return pb::Principal {
            identifier: Some(pb::principal::Identifier::Any(true)),
        };
    }
    pb::Principal {
        identifier: Some(pb::principal::Identifier::AndIds(pb::principal::Set {
            ids,
        })),
    }
}

fn or_rules(rules: Vec<pb::Permission>) -> pb::Permission {
    pb::Permission {
        rule: Some(pb::permission::Rule::OrRules(pb::permission::Set { rules })),
    }
}

fn not_rule(p: pb::Permission) -> pb::Permission {
    pb::Permission {
        rule: Some(pb::permission::Rule::NotRule(Box::new(p))),
    }
}

fn and_rules(rules: Vec<pb::Permission>) -> pb::Permission {
    if rules.is_empty() {
        return pb::Permission {
            rule: Some(pb::permission::Rule::Any(true)),
        };
    }
    pb::Permission {
        rule: Some(pb::permission::Rule::AndRules(pb::permission::Set {
            rules,
        })),
    }
}

/// A field's values (OR) and negated values (NOT OR) appended to an AND list.
fn principal_field(out: &mut Vec<pb::Principal>, v: &Values, one: impl Fn(&str) -> pb::Principal) {
    if !v.is.is_empty() {
        out.push(or_ids(v.is.iter().map(|x| one(x)).collect()));
    }
    if !v.not.is_empty() {
        out.push(not_id(or_ids(v.not.iter().map(|x| one(x)).collect())));
    }
}

fn permission_field(
    out: &mut Vec<pb::Permission>,
    v: &Values,
    one: impl Fn(&str) -> pb::Permission,
) {
    if !v.is.is_empty() {
        out.push(or_rules(v.is.iter().map(|x| one(x)).collect()));
    }
    if !v.not.is_empty() {
        out.push(not_rule(or_rules(v.not.iter().map(|x| one(x)).collect())));
    }
}

fn principal_name(v: &str) -> pb::Principal {
    authenticated(string(v, "spiffe://"))
}

fn method(v: &str) -> pb::Permission {
    pb::Permission {
        rule: Some(pb::permission::Rule::Header(header(
            ":method",
            string(v, ""),
        ))),
    }
}

fn path(v: &str) -> pb::Permission {
    pb::Permission {
        rule: Some(pb::permission::Rule::UrlPath(matcher::PathMatcher {
            rule: Some(matcher::path_matcher::Rule::Path(string(v, ""))),
        })),
    }
}

fn port(v: &str) -> pb::Permission {
    pb::Permission {
        rule: Some(pb::permission::Rule::DestinationPort(
            v.parse::<u32>().unwrap_or(0),
        )),
    }
}

fn policy(rule: &AuthzRule) -> pb::Policy {
    // Conditions: on the source (principals) or the destination (permissions).
    let mut when_principals = Vec::new();
    let mut when_permissions = Vec::new();
    for c in &rule.when {
        match c.key.as_str() {
            "source.principal" => principal_field(&mut when_principals, &c.values, principal_name),
            "source.namespace" => principal_field(&mut when_principals, &c.values, |v| {
                authenticated(namespace(v))
            }),
            "destination.port" => permission_field(&mut when_permissions, &c.values, port),
            key => {
                let name = key
                    .strip_prefix("request.headers[")
                    .and_then(|k| k.strip_suffix(']'))
                    .unwrap_or(key);
                principal_field(&mut when_principals, &c.values, |v| pb::Principal {
                    identifier: Some(pb::principal::Identifier::Header(header(
                        name,
                        string(v, ""),
                    ))),
                })
            }
        }
    }
    let principals = if rule.from.is_empty() {
        vec![and_ids(when_principals)]
    } else {
        rule.from
            .iter()
            .map(|s| {
                let mut ids = Vec::new();
                principal_field(&mut ids, &s.principals, principal_name);
                principal_field(&mut ids, &s.namespaces, |v| authenticated(namespace(v)));
                ids.extend(when_principals.iter().cloned());
                and_ids(ids)
            })
            .collect()
    };
    let permissions = if rule.to.is_empty() {
        vec![and_rules(when_permissions)]
    } else {
        rule.to
            .iter()
            .map(|o| {
                let mut rules = Vec::new();
                permission_field(&mut rules, &o.methods, method);
                permission_field(&mut rules, &o.paths, path);
                permission_field(&mut rules, &o.ports, port);
                rules.extend(when_permissions.iter().cloned());
                and_rules(rules)
            })
            .collect()
    };
    pb::Policy {
        permissions,
        principals,
        ..Default::default()
    }
}

/// The RBAC filters of a workload of `namespace` with `labels`: (DENY, ALLOW), each `None`
/// when no policy of that action selects it.
pub fn filters(mesh: &Mesh, namespace: &str, labels: &Labels) -> Vec<filter::Rbac> {
    let mut deny = HashMap::new();
    let mut allow = HashMap::new();
    let (mut any_deny, mut any_allow) = (false, false);
    for ((ns, name), p) in mesh.authorization_for(namespace, labels) {
        let AuthorizationPolicySpec { action, rules, .. } = p;
        let target = match action {
            AuthzAction::Deny => {
                any_deny = true;
                &mut deny
            }
            AuthzAction::Allow => {
                any_allow = true;
                &mut allow
            }
        };
        for (i, r) in rules.iter().enumerate() {
            target.insert(format!("ns[{ns}]-policy[{name}]-rule[{i}]"), policy(r));
        }
    }
    let rbac = |action: pb::rbac::Action, policies| filter::Rbac {
        rules: Some(pb::Rbac {
            action: action as i32,
            policies,
            ..Default::default()
        }),
        ..Default::default()
    };
    let mut out = Vec::new();
    if any_deny {
        out.push(rbac(pb::rbac::Action::Deny, deny));
    }
    if any_allow {
        out.push(rbac(pb::rbac::Action::Allow, allow));
    }
    out
}
