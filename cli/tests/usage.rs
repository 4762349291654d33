//! modectl's own failures: bad flags and an endpoint where nothing answers.

use std::process::Command;

const MODECTL: &str = env!("CARGO_BIN_EXE_modectl");

#[test]
fn a_bad_flag_is_a_usage_error_with_exit_2() {
    let out = Command::new(MODECTL)
        .args(["cluster", "status", "--bogus"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--bogus"));
}

#[test]
fn no_node_answering_is_exit_4_with_a_clear_message() {
    // A port nothing listens on: bind one, then free it.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let out = Command::new(MODECTL)
        .args([
            "--endpoint",
            &format!("127.0.0.1:{port}"),
            "cluster",
            "status",
        ])
        .env_remove("MODE_ENDPOINT")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(4));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&format!("no mode node answers at http://127.0.0.1:{port}")),
        "{err}"
    );
    assert!(err.contains("MODE_ENDPOINT"), "{err}");
}

#[test]
fn the_endpoint_can_come_from_mode_endpoint() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let out = Command::new(MODECTL)
        .args(["node", "ls"])
        .env("MODE_ENDPOINT", format!("127.0.0.1:{port}"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(4));
    assert!(String::from_utf8_lossy(&out.stderr).contains(&format!("127.0.0.1:{port}")));
}

#[test]
fn completion_scripts_complete_subcommands_in_bash_and_exist_for_zsh_and_fish() {
    for shell in ["zsh", "fish"] {
        let out = Command::new(MODECTL)
            .args(["completion", shell])
            .output()
            .unwrap();
        assert!(out.status.success(), "{shell}: {out:?}");
        assert!(
            String::from_utf8_lossy(&out.stdout).contains("svc"),
            "{shell}"
        );
    }
    // Bash runs the script and completes `modectl sv` to `svc`, `modectl svc ap` to `apply`.
    let script = format!(
        "source <({MODECTL} completion bash) && \
         COMP_WORDS=(modectl sv); COMP_CWORD=1; _modectl modectl sv modectl; echo \"[${{COMPREPLY[*]}}]\"; \
         COMP_WORDS=(modectl svc ap); COMP_CWORD=2; _modectl modectl ap svc; echo \"[${{COMPREPLY[*]}}]\""
    );
    let out = Command::new("bash").args(["-c", &script]).output().unwrap();
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{out:?}");
    let lines: Vec<&str> = said.lines().collect();
    assert_eq!(lines, ["[svc]", "[apply]"], "{out:?}");
    let bad = Command::new(MODECTL)
        .args(["completion", "tcsh"])
        .output()
        .unwrap();
    assert_eq!(bad.status.code(), Some(2));
}
