//! The binary's contract: exit codes and error messages as DESIGN.md gives them.

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
