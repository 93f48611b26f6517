//! The engine on the real binary: start-up lines, signals, configuration errors, port and
//! data_dir conflicts, host limits (issue 2).

mod common;

use common::{config_text, run_cli, Server};
use std::net::TcpListener;
use std::process::Command;
use std::time::Duration;

#[test]
fn listening_lines_resolve_port_zero_and_every_shard_shares_it() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), &config_text(dir.path(), 2, ""));
    let smtp = server.addr("smtp");
    assert_ne!(smtp.port(), 0);
    assert_ne!(server.addr("pop3").port(), 0);
    // Both shards listen on the one resolved port (SO_REUSEPORT).
    let out = Command::new("ss")
        .args(["-ltnH", &format!("sport = :{}", smtp.port())])
        .output();
    if let Ok(out) = out {
        let listening = String::from_utf8_lossy(&out.stdout).lines().count();
        assert_eq!(listening, 2, "{}", String::from_utf8_lossy(&out.stdout));
    }
    std::net::TcpStream::connect(smtp).unwrap();
}

#[test]
fn sigterm_and_sigint_drain_and_exit_zero() {
    for signal in [libc::SIGTERM, libc::SIGINT] {
        let dir = tempfile::tempdir().unwrap();
        let mut server = Server::start(dir.path(), &config_text(dir.path(), 2, ""));
        server.signal(signal);
        let status = server.wait(Duration::from_secs(15));
        assert_eq!(
            status.code(),
            Some(0),
            "signal {signal}: {:?}",
            server.stderr_lines()
        );
    }
}

#[test]
fn a_port_in_use_is_named_and_exits_one() {
    let dir = tempfile::tempdir().unwrap();
    let taken = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port();
    let config = config_text(dir.path(), 1, "").replace(
        "[smtp]\nlisten = [\"127.0.0.1:0\"]",
        &format!("[smtp]\nlisten = [\"127.0.0.1:{port}\"]"),
    );
    std::fs::write(dir.path().join("c.toml"), config).unwrap();
    let (status, _, err) = run_cli(
        &[
            "serve",
            "--config",
            dir.path().join("c.toml").to_str().unwrap(),
        ],
        "",
    );
    assert_eq!(status.code(), Some(1), "{err}");
    assert!(err.contains(&format!("127.0.0.1:{port}")), "{err}");
    assert!(err.contains("smtp.listen"), "{err}");
    assert!(err.contains("in use"), "{err}");
}

#[test]
fn a_second_instance_cannot_share_a_port_or_the_data_dir() {
    let dir = tempfile::tempdir().unwrap();
    let first = Server::start(dir.path(), &config_text(dir.path(), 2, ""));
    // Same ports, other data_dir: refused although the first listens with SO_REUSEPORT.
    let other = tempfile::tempdir().unwrap();
    let config = config_text(other.path(), 1, "").replace(
        "[smtp]\nlisten = [\"127.0.0.1:0\"]",
        &format!("[smtp]\nlisten = [\"{}\"]", first.addr("smtp")),
    );
    std::fs::write(other.path().join("c.toml"), config).unwrap();
    let (status, _, err) = run_cli(
        &[
            "serve",
            "--config",
            other.path().join("c.toml").to_str().unwrap(),
        ],
        "",
    );
    assert_eq!(status.code(), Some(1), "{err}");
    assert!(err.contains(&first.addr("smtp").to_string()), "{err}");

    // Same data_dir, other ports: refused, naming the data_dir.
    let (status, _, err) = run_cli(
        &["serve", "--config", first.config_path.to_str().unwrap()],
        "",
    );
    assert_eq!(status.code(), Some(1), "{err}");
    assert!(err.contains("in use by another ringmail"), "{err}");
    assert!(
        err.contains(&dir.path().join("data").display().to_string()),
        "{err}"
    );
}

#[test]
fn check_config_reports_every_problem_and_exits_two() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.toml");
    std::fs::write(
        &path,
        "shards = \"many\"\nsurprise = 1\n[smtp]\nlisten = [\"localhost\"]\n[relay]\nretry_schedule_secs = [-1]\n",
    )
    .unwrap();
    let (status, out, err) = run_cli(&["check-config", "--config", path.to_str().unwrap()], "");
    assert_eq!(status.code(), Some(2));
    assert!(out.is_empty());
    for key in [
        "shards",
        "surprise",
        "smtp.listen[0]",
        "relay.retry_schedule_secs[0]",
    ] {
        assert!(err.contains(key), "{key} missing in {err}");
    }
    assert!(err.contains("bad.toml"), "{err}");
    assert!(!err.contains("panicked at"), "{err}");

    std::fs::write(&path, "hostname = \"x\"\n\n[smtp\nlisten = []\n").unwrap();
    let (status, _, err) = run_cli(&["check-config", "--config", path.to_str().unwrap()], "");
    assert_eq!(status.code(), Some(2));
    assert!(err.contains("line 3"), "{err}");

    let (status, _, err) = run_cli(&["serve", "--config", "/nonexistent/ringmail.toml"], "");
    assert_eq!(status.code(), Some(2));
    assert!(err.contains("/nonexistent/ringmail.toml"), "{err}");
}

#[test]
fn check_config_prints_the_effective_configuration() {
    let (status, out, _) = run_cli(&["check-config"], "");
    assert_eq!(status.code(), Some(0));
    for line in [
        "data_dir = \"./ringmail-data\"",
        "max_message_size = 26214400",
        "[relay]",
    ] {
        assert!(out.contains(line), "{line} missing in {out}");
    }
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("c.toml");
    std::fs::write(&path, "[relay]\nretry_schedule_secs = [0.2, 0.5]\n").unwrap();
    let (status, out, _) = run_cli(&["check-config", "--config", path.to_str().unwrap()], "");
    assert_eq!(status.code(), Some(0));
    assert!(out.contains("retry_schedule_secs = [0.2, 0.5]"), "{out}");
}

#[test]
fn hash_password_prints_an_argon2id_phc_string() {
    let (status, out, _) = run_cli(&["hash-password"], "correct horse\n");
    assert_eq!(status.code(), Some(0));
    assert!(out.starts_with("$argon2id$v=19$m=19456,t=2,p=1$"), "{out}");
}

fn have(tool: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {tool}")])
        .output()
        .is_ok_and(|o| o.status.success())
}

#[test]
fn starts_as_an_unprivileged_user_under_the_default_memlock_limit() {
    if !have("setpriv") || unsafe { libc::geteuid() } != 0 {
        eprintln!("skipped: needs root and setpriv to switch to nobody");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path();
    std::fs::set_permissions(data, std::os::unix::fs::PermissionsExt::from_mode(0o777)).unwrap();
    let config = config_text(data, 2, "");
    // The build tree may sit where `nobody` cannot enter (e.g. under /root): run a copy.
    let program = data.join("ringmail");
    std::fs::copy(common::BIN, &program).unwrap();
    let mut server = Server::start_with(data, &config, |cmd| {
        let args: Vec<_> = cmd.get_args().map(|a| a.to_owned()).collect();
        *cmd = Command::new("setpriv");
        cmd.args([
            "--reuid=nobody",
            "--regid=nogroup",
            "--clear-groups",
            "--inh-caps=-all",
        ])
        .arg("prlimit")
        .arg("--memlock=8388608:8388608")
        .arg("--")
        .arg(program)
        .args(args)
        .env("RINGMAIL_LOG", "info")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
        cmd
    });
    std::net::TcpStream::connect(server.addr("smtp")).unwrap();
    server.signal(libc::SIGTERM);
    assert_eq!(server.wait(Duration::from_secs(15)).code(), Some(0));
    let log = server.stderr_lines().join("\n");
    assert!(log.contains("locked-memory limit is 8192 KiB"), "{log}");
}

#[test]
fn too_little_locked_memory_is_named_and_exits_one() {
    if !have("prlimit") || unsafe { libc::geteuid() } != 0 {
        eprintln!("skipped: needs root and prlimit");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("c.toml");
    std::fs::write(&path, config_text(dir.path(), 1, "")).unwrap();
    std::fs::set_permissions(
        dir.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o777),
    )
    .unwrap();
    let program = dir.path().join("ringmail");
    std::fs::copy(common::BIN, &program).unwrap();
    let out = Command::new("setpriv")
        .args([
            "--reuid=nobody",
            "--regid=nogroup",
            "--clear-groups",
            "--inh-caps=-all",
        ])
        .args(["prlimit", "--memlock=262144:262144", "--"])
        .arg(&program)
        .args(["serve", "--config", path.to_str().unwrap()])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("RLIMIT_MEMLOCK"), "{err}");
}
