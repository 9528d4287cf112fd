//! Transparent capture as Istio's `proxy_init` (istio-iptables, REDIRECT mode) writes it: the
//! nat rules that send a pod's inbound TCP to the sidecar's 15006 and its outbound TCP to
//! 15001, except the sidecar's own traffic (uid/gid 1337), loopback traffic of the app, and
//! the ports the sidecar itself serves (admin, readiness, agent). Rendered for
//! `iptables-restore`; `meshbench capture-rules` prints them.

/// The sidecar's user and group: its own connections are never captured.
pub const PROXY_UID: u32 = 1337;
/// Where captured outbound connections go (`virtualOutbound`).
pub const OUTBOUND_CAPTURE_PORT: u16 = 15001;
/// Where captured inbound connections go (`virtualInbound`).
pub const INBOUND_CAPTURE_PORT: u16 = 15006;
/// Inbound ports Istio leaves alone: HBONE, merged Prometheus, readiness, agent.
pub const ISTIO_EXCLUDED_INBOUND: [u16; 4] = [15008, 15090, 15021, 15020];

/// What to leave out besides Istio's defaults.
#[derive(Clone, Debug, Default)]
pub struct Rules {
    /// Inbound ports not captured (e.g. the sidecar's admin port, a control port).
    pub exclude_inbound: Vec<u16>,
    /// Outbound destination ports not captured (e.g. pilot's xDS port, when the sidecar runs
    /// under another uid).
    pub exclude_outbound: Vec<u16>,
}

impl Rules {
    /// The `iptables-restore` input (nat table only; other tables are left as they are, so
    /// apply it with `--noflush`).
    pub fn render(&self) -> String {
        let uid = PROXY_UID;
        let mut r = vec![
            "*nat".to_string(),
            ":ISTIO_INBOUND - [0:0]".into(),
            ":ISTIO_IN_REDIRECT - [0:0]".into(),
            ":ISTIO_OUTPUT - [0:0]".into(),
            ":ISTIO_REDIRECT - [0:0]".into(),
            "-A PREROUTING -p tcp -j ISTIO_INBOUND".into(),
            "-A OUTPUT -p tcp -j ISTIO_OUTPUT".into(),
        ];
        let mut inbound: Vec<u16> = ISTIO_EXCLUDED_INBOUND.to_vec();
        inbound.extend(&self.exclude_inbound);
        inbound.sort_unstable();
        inbound.dedup();
        for p in inbound {
            r.push(format!("-A ISTIO_INBOUND -p tcp --dport {p} -j RETURN"));
        }
        r.push("-A ISTIO_INBOUND -p tcp -j ISTIO_IN_REDIRECT".into());
        r.push(format!(
            "-A ISTIO_IN_REDIRECT -p tcp -j REDIRECT --to-ports {INBOUND_CAPTURE_PORT}"
        ));
        r.push("-A ISTIO_OUTPUT -s 127.0.0.6/32 -o lo -j RETURN".into());
        for p in &self.exclude_outbound {
            r.push(format!("-A ISTIO_OUTPUT -p tcp --dport {p} -j RETURN"));
        }
        for m in ["uid-owner", "gid-owner"] {
            // The sidecar calling its own pod's address over loopback is inbound traffic.
            r.push(format!(
                "-A ISTIO_OUTPUT ! -d 127.0.0.1/32 -o lo -m owner --{m} {uid} -j ISTIO_IN_REDIRECT"
            ));
            r.push(format!(
                "-A ISTIO_OUTPUT -o lo -m owner ! --{m} {uid} -j RETURN"
            ));
            r.push(format!("-A ISTIO_OUTPUT -m owner --{m} {uid} -j RETURN"));
        }
        r.push("-A ISTIO_OUTPUT -d 127.0.0.1/32 -j RETURN".into());
        r.push("-A ISTIO_OUTPUT -j ISTIO_REDIRECT".into());
        r.push(format!(
            "-A ISTIO_REDIRECT -p tcp -j REDIRECT --to-ports {OUTBOUND_CAPTURE_PORT}"
        ));
        r.push("COMMIT".into());
        let mut s = r.join("\n");
        s.push('\n');
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn istios_chains_in_istios_order() {
        let s = Rules {
            exclude_inbound: vec![15000],
            exclude_outbound: vec![15010],
        }
        .render();
        let lines: Vec<&str> = s.lines().collect();
        assert_eq!(lines[0], "*nat");
        assert_eq!(*lines.last().unwrap(), "COMMIT");
        for chain in [
            "ISTIO_INBOUND",
            "ISTIO_IN_REDIRECT",
            "ISTIO_OUTPUT",
            "ISTIO_REDIRECT",
        ] {
            assert!(
                lines.contains(&format!(":{chain} - [0:0]").as_str()),
                "{chain}"
            );
        }
        let pos = |l: &str| {
            lines
                .iter()
                .position(|x| *x == l)
                .unwrap_or_else(|| panic!("{l}"))
        };
        // Exclusions come before the catch-all redirects.
        assert!(
            pos("-A ISTIO_INBOUND -p tcp --dport 15000 -j RETURN")
                < pos("-A ISTIO_INBOUND -p tcp -j ISTIO_IN_REDIRECT")
        );
        assert!(
            pos("-A ISTIO_OUTPUT -m owner --uid-owner 1337 -j RETURN")
                < pos("-A ISTIO_OUTPUT -j ISTIO_REDIRECT")
        );
        assert!(
            pos("-A ISTIO_OUTPUT -p tcp --dport 15010 -j RETURN")
                < pos("-A ISTIO_OUTPUT -j ISTIO_REDIRECT")
        );
        assert!(lines.contains(&"-A ISTIO_REDIRECT -p tcp -j REDIRECT --to-ports 15001"));
        assert!(lines.contains(&"-A ISTIO_IN_REDIRECT -p tcp -j REDIRECT --to-ports 15006"));
    }
}
