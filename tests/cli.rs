//! The binary's contract: exit codes and error messages as docs/contracts.md gives them.

use std::process::Command;

fn meshbench() -> Command {
    Command::new(env!("CARGO_BIN_EXE_meshbench"))
}

#[test]
fn pilot_with_an_invalid_config_file_exits_2_naming_the_problem() {
    let dir = std::env::temp_dir().join(format!("meshbench-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let f = dir.join("bad.yaml");
    std::fs::write(&f, "apiVersion: v1\nkind: Service\nmetadata: {name: a}\nspec: {ports: [{port: 80}]}\n---\napiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: a}\nspec:\n  hosts: [a]\n  http:\n  - route:\n    - destination: {host: b}\n").unwrap();
    let out = meshbench()
        .args([
            "pilot",
            "--xds-addr",
            "127.0.0.1:0",
            "--api-addr",
            "127.0.0.1:0",
            "--strict-references",
            "--config",
        ])
        .arg(&f)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("bad.yaml: document 2"), "{stderr}");
    assert!(
        stderr.contains("spec.http[0].route[0].destination.host"),
        "{stderr}"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn pilot_on_a_taken_port_exits_3() {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap().to_string();
    let out = meshbench()
        .args(["pilot", "--xds-addr", &addr, "--api-addr", "127.0.0.1:0"])
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(3),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn pilot_help_documents_the_flags() {
    let out = meshbench().args(["pilot", "--help"]).output().unwrap();
    let help = String::from_utf8_lossy(&out.stdout);
    for flag in [
        "--xds-addr",
        "--api-addr",
        "--config",
        "--debounce",
        "--debounce-max",
    ] {
        assert!(help.contains(flag), "{flag} missing from:\n{help}");
    }
}

/// `meshbench bench proxy --quick` produces the documented JSON (numbers are not asserted:
/// performance is measured, not tested) and leaves no process behind.
#[test]
fn bench_proxy_quick_writes_the_documented_report() {
    let envoy = std::env::var_os("MESHBENCH_ENVOY").filter(|p| std::path::Path::new(p).exists());
    if envoy.is_none() && std::env::var("CI").as_deref() == Ok("true") {
        panic!("Envoy not found: set MESHBENCH_ENVOY");
    }
    let dir = std::env::temp_dir().join(format!("meshbench-bench-test-{}", std::process::id()));
    let out = dir.join("proxy.json");
    let run = meshbench()
        .args(["bench", "proxy", "--quick", "--rate", "200", "--out"])
        .arg(&out)
        .output()
        .unwrap();
    assert_eq!(
        run.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&out).unwrap()).unwrap();
    let mut targets = vec!["direct", "meshbench"];
    if envoy.is_some() {
        targets.push("envoy");
    }
    // ci/test.sh installs nginx (the reference proxy) and wrk (the reference client).
    let ci = std::env::var("CI").as_deref() == Ok("true");
    let nginx = meshbench::bench::find_nginx().is_some();
    assert!(nginx || !ci, "nginx not found");
    if nginx {
        targets.push("nginx");
    }
    let wrk = std::process::Command::new("wrk").arg("-v").output().is_ok();
    assert!(wrk || !ci, "wrk not found");
    for case in ["c16", "c64", "rate"] {
        for &t in &targets {
            let e = &report["cases"][case][t];
            for k in ["rps", "p50_ms", "p99_ms"] {
                assert!(
                    e[k].as_f64().is_some_and(|v| v > 0.0),
                    "{case}.{t}.{k}: {e}"
                );
            }
            assert_eq!(e["errors"], 0, "{case}.{t}: {e}");
            // wrk beside the generator on every closed-loop case, and the ratios.
            if wrk && case != "rate" {
                for k in ["rps", "p50_ms", "p99_ms", "cpu_us_per_request"] {
                    assert!(
                        e["wrk"][k].as_f64().is_some_and(|v| v > 0.0),
                        "{case}.{t}.wrk.{k}: {e}"
                    );
                }
                assert!(
                    report["generator_vs_wrk"]
                        .as_array()
                        .unwrap()
                        .iter()
                        .any(|a| a["case"] == case && a["target"] == t),
                    "no agreement for {case}.{t}"
                );
            }
            if t != "direct" {
                assert!(
                    e["peak_rss_mb"].as_f64().is_some_and(|v| v > 0.0),
                    "{case}.{t}: {e}"
                );
                assert!(e["cpu_s"].as_f64().is_some(), "{case}.{t}: {e}");
            }
        }
    }
    if nginx {
        for k in ["c16.meshbench_rps_vs_nginx", "c64.meshbench_p99_vs_nginx"] {
            assert!(report["ratios"][k].as_f64().is_some(), "{k} missing");
        }
    }
    assert!(std::fs::read_to_string(out.with_extension("svg"))
        .unwrap()
        .starts_with("<svg"));
    std::fs::remove_dir_all(&dir).unwrap();
    // kill_on_drop children are gone once the command has exited.
    let ps = std::process::Command::new("pgrep")
        .args(["-f", "bench-meshbench"])
        .output()
        .unwrap();
    assert!(
        ps.stdout.is_empty(),
        "leftover proxy: {}",
        String::from_utf8_lossy(&ps.stdout)
    );
    let ps = std::process::Command::new("pgrep")
        .args(["-f", "nginx -p /tmp/meshbench-bench-[0-9]"])
        .output()
        .unwrap();
    assert!(
        ps.stdout.is_empty(),
        "leftover nginx: {}",
        String::from_utf8_lossy(&ps.stdout)
    );
}

/// `meshbench bench scoping` at a small size: with a Sidecar per tenant, a service added in
/// tenant 0 sends nothing to other tenants' proxies (without scoping it reaches every proxy),
/// and the initial sync per proxy is smaller. Byte counts are what the simulated proxies
/// received, so the zero is exact; ratios are printed, not asserted.
#[test]
fn bench_scoping_keeps_changes_inside_their_tenant() {
    let dir = std::env::temp_dir().join(format!("meshbench-scoping-test-{}", std::process::id()));
    let run = meshbench()
        .args([
            "bench",
            "scoping",
            "--services",
            "40",
            "--tenants",
            "4",
            "--proxies",
            "40",
            "--changes",
            "1",
            "--out",
        ])
        .arg(&dir)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert_eq!(run.status.code(), Some(0), "{stderr}");
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("scoping.json")).unwrap()).unwrap();
    let cases = report["cases"].as_array().unwrap();
    assert_eq!(cases.len(), 4);
    for c in cases {
        let add = &c["service_add"];
        let other = add["bytes_other_tenants"].as_f64().unwrap();
        let touched = add["other_tenant_proxies_touched"].as_f64().unwrap();
        assert!(add["bytes_own_tenant"].as_f64().unwrap() > 0.0, "{c}");
        if c["scoped"] == true {
            assert_eq!((other, touched), (0.0, 0.0), "{c}");
            assert_eq!(
                c["endpoint_add"]["bytes_other_tenants"].as_f64(),
                Some(0.0),
                "{c}"
            );
        } else {
            assert!(other > 0.0 && touched == 30.0, "{c}");
        }
        assert!(!c["sidecars"].as_array().unwrap().is_empty());
    }
    for xds in ["sotw", "delta"] {
        let initial = |scoped: bool| {
            cases
                .iter()
                .find(|c| c["xds"] == xds && c["scoped"] == scoped)
                .unwrap()["initial_bytes_per_proxy_mean"]
                .as_f64()
                .unwrap()
        };
        assert!(initial(true) < initial(false), "{xds}");
    }
    assert!(std::fs::read_to_string(dir.join("scoping.md"))
        .unwrap()
        .contains("unscoped / scoped"));
    std::fs::remove_dir_all(&dir).unwrap();
}
