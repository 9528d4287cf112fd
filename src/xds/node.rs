//! A proxy's identity as Istio sidecars present it: node id
//! `sidecar~POD_IP~POD_NAME.NAMESPACE~NAMESPACE.svc.cluster.local`, node.cluster = the app's
//! service name, `node.metadata.LABELS` = the pod labels, and (meshbench's own key)
//! `node.metadata.APP_IP` = the pod-local address the app listens on (default 127.0.0.1).

use envoy_types::pb::envoy::config::core::v3::Node;
use envoy_types::pb::google::protobuf::{value::Kind as ValueKind, Struct};
use serde::{Deserialize, Serialize};

use crate::model::{Labels, DEFAULT_NAMESPACE, DOMAIN_SUFFIX};

pub const APP_IP_KEY: &str = "APP_IP";
/// Istio's key for how the pod's traffic reaches the sidecar; `REDIRECT` (iptables capture)
/// gets Istio's listener layout (`virtualOutbound`, `virtualInbound`, `0.0.0.0_PORT`).
pub const INTERCEPTION_MODE_KEY: &str = "INTERCEPTION_MODE";
pub const REDIRECT: &str = "REDIRECT";
pub const LABELS_KEY: &str = "LABELS";
pub const DEFAULT_APP_IP: &str = "127.0.0.1";

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeInfo {
    pub id: String,
    pub cluster: String,
    /// Pod IP from the node id; `None` when the id is not in Istio's sidecar form (then the
    /// proxy gets clusters and routes but no listeners).
    pub ip: Option<String>,
    pub pod: String,
    pub namespace: String,
    pub labels: Labels,
    pub app_ip: String,
    /// Traffic is captured (INTERCEPTION_MODE REDIRECT): Istio's listener layout.
    pub capture: bool,
    /// A gateway (`router~...`): it gets gateway listeners and routes, no sidecar ones.
    #[serde(default)]
    pub router: bool,
    /// Over mutual TLS: the identity its client certificate proved (its secrets are issued
    /// for that identity).
    #[serde(skip)]
    pub proven: Option<String>,
}

/// Builds the node id Istio would give a sidecar.
pub fn sidecar_id(ip: &str, pod: &str, namespace: &str) -> String {
    format!("sidecar~{ip}~{pod}.{namespace}~{namespace}.{DOMAIN_SUFFIX}")
}

/// Builds the node id Istio gives a gateway proxy.
pub fn router_id(ip: &str, pod: &str, namespace: &str) -> String {
    format!("router~{ip}~{pod}.{namespace}~{namespace}.{DOMAIN_SUFFIX}")
}

impl NodeInfo {
    pub fn from_node(node: &Node) -> NodeInfo {
        let parts: Vec<&str> = node.id.split('~').collect();
        let (ip, pod, namespace) = match parts.as_slice() {
            // A wildcard or multicast "pod IP" would make listeners bind every interface.
            [_, ip, pod_ns, _]
                if ip
                    .parse::<std::net::IpAddr>()
                    .is_ok_and(|a| !a.is_unspecified() && !a.is_multicast()) =>
            {
                let (pod, ns) = pod_ns
                    .split_once('.')
                    .unwrap_or((pod_ns, DEFAULT_NAMESPACE));
                (Some(ip.to_string()), pod.to_string(), ns.to_string())
            }
            _ => (None, node.id.clone(), DEFAULT_NAMESPACE.to_string()),
        };
        let meta = node.metadata.as_ref();
        let labels = meta
            .and_then(|m| struct_field(m, LABELS_KEY))
            .and_then(|v| match v {
                ValueKind::StructValue(s) => Some(
                    s.fields
                        .iter()
                        .filter_map(|(k, v)| match &v.kind {
                            Some(ValueKind::StringValue(s)) => Some((k.clone(), s.clone())),
                            _ => None,
                        })
                        .collect(),
                ),
                _ => None,
            })
            .unwrap_or_default();
        let app_ip = meta
            .and_then(|m| struct_field(m, APP_IP_KEY))
            .and_then(|v| match v {
                ValueKind::StringValue(s) => Some(s.clone()),
                _ => None,
            })
            .unwrap_or_else(|| DEFAULT_APP_IP.to_string());
        let capture = meta
            .and_then(|m| struct_field(m, INTERCEPTION_MODE_KEY))
            .is_some_and(|v| matches!(v, ValueKind::StringValue(s) if s == REDIRECT));
        NodeInfo {
            id: node.id.clone(),
            cluster: node.cluster.clone(),
            ip,
            pod,
            namespace,
            labels,
            app_ip,
            capture,
            router: parts.first() == Some(&"router"),
            proven: None,
        }
    }
}

fn struct_field<'a>(s: &'a Struct, key: &str) -> Option<&'a ValueKind> {
    s.fields.get(key).and_then(|v| v.kind.as_ref())
}

/// The metadata struct a captured sidecar sends: LABELS, APP_IP and INTERCEPTION_MODE REDIRECT.
pub fn capture_metadata(labels: &Labels, app_ip: &str) -> Struct {
    let mut m = metadata(labels, app_ip);
    m.fields.insert(
        INTERCEPTION_MODE_KEY.to_string(),
        envoy_types::pb::google::protobuf::Value {
            kind: Some(ValueKind::StringValue(REDIRECT.to_string())),
        },
    );
    m
}

/// The metadata struct a sidecar sends: LABELS and APP_IP.
pub fn metadata(labels: &Labels, app_ip: &str) -> Struct {
    use envoy_types::pb::google::protobuf::Value;
    let string = |s: &str| Value {
        kind: Some(ValueKind::StringValue(s.to_string())),
    };
    let labels = Struct {
        fields: labels.iter().map(|(k, v)| (k.clone(), string(v))).collect(),
    };
    Struct {
        fields: [
            (
                LABELS_KEY.to_string(),
                Value {
                    kind: Some(ValueKind::StructValue(labels)),
                },
            ),
            (APP_IP_KEY.to_string(), string(app_ip)),
        ]
        .into_iter()
        .collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_istio_sidecar_ids() {
        let labels: Labels = [("app".to_string(), "reviews".to_string())].into();
        let node = Node {
            id: sidecar_id("127.0.1.2", "reviews-v1-abc", "default"),
            cluster: "reviews".into(),
            metadata: Some(metadata(&labels, "127.0.2.2")),
            ..Default::default()
        };
        let info = NodeInfo::from_node(&node);
        assert_eq!(info.ip.as_deref(), Some("127.0.1.2"));
        assert_eq!(info.pod, "reviews-v1-abc");
        assert_eq!(info.namespace, "default");
        assert_eq!(info.labels, labels);
        assert_eq!(info.app_ip, "127.0.2.2");
        let other = NodeInfo::from_node(&Node {
            id: "sim-17".into(),
            ..Default::default()
        });
        assert_eq!(other.ip, None);
        assert!(!info.router);
        assert!(!info.capture);
        let captured = NodeInfo::from_node(&Node {
            id: sidecar_id("127.0.1.2", "reviews-v1-abc", "default"),
            metadata: Some(capture_metadata(&labels, "127.0.0.1")),
            ..Default::default()
        });
        assert!(captured.capture);
        let gw = NodeInfo::from_node(&Node {
            id: router_id("127.0.1.3", "istio-ingressgateway-0", "istio-system"),
            ..Default::default()
        });
        assert!(gw.router);
        assert_eq!(gw.namespace, "istio-system");
    }
}
