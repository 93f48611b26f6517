//! TLS and AUTH on the real binary (issue 9): STARTTLS, STLS and implicit TLS with a
//! throw-away CA, driven by Python's ssl/smtplib/poplib, `openssl s_client` and curl; the
//! injection cases in one packet; AUTH success, failure and throttling; submission relay;
//! certificate reload on SIGHUP.

mod common;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::{mail_config, LineClient, Server};

/// A CA and a leaf for `mx.ringmail.test`, `localhost` and 127.0.0.1, written as PEM files.
struct TestPki {
    ca: PathBuf,
    cert: PathBuf,
    key: PathBuf,
}

fn make_pki(dir: &Path, tag: &str) -> TestPki {
    use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair, SanType};
    let ca_key = KeyPair::generate().unwrap();
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(DnType::CommonName, format!("ringmail test CA {tag}"));
    let ca = ca_params.self_signed(&ca_key).unwrap();
    let leaf_key = KeyPair::generate().unwrap();
    let mut leaf_params =
        CertificateParams::new(vec!["mx.ringmail.test".into(), "localhost".into()]).unwrap();
    leaf_params
        .subject_alt_names
        .push(SanType::IpAddress("127.0.0.1".parse().unwrap()));
    leaf_params
        .distinguished_name
        .push(DnType::CommonName, format!("mx.ringmail.test {tag}"));
    let leaf = leaf_params.signed_by(&leaf_key, &ca, &ca_key).unwrap();
    let pki = TestPki {
        ca: dir.join(format!("ca-{tag}.pem")),
        cert: dir.join("cert.pem"),
        key: dir.join("key.pem"),
    };
    std::fs::write(&pki.ca, ca.pem()).unwrap();
    std::fs::write(&pki.cert, leaf.pem()).unwrap();
    std::fs::write(&pki.key, leaf_key.serialize_pem()).unwrap();
    pki
}

/// Users alice/bob/carol (password "pw"), `[tls]`, submission and implicit-TLS listeners for
/// SMTP and POP3, and no relay networks: only AUTH lets a client relay.
fn tls_config(dir: &Path, pki: &TestPki) -> String {
    let tls = format!(
        "[tls]\ncert = \"{}\"\nkey = \"{}\"\n",
        pki.cert.display(),
        pki.key.display()
    );
    let smtp = "submission_listen = [\"127.0.0.1:0\"]\ntls_listen = [\"127.0.0.1:0\"]\nrelay_networks = []\n";
    mail_config(dir, 2, "", smtp)
        .replace(
            "[pop3]\nlisten = [\"127.0.0.1:0\"]\n",
            "[pop3]\nlisten = [\"127.0.0.1:0\"]\ntls_listen = [\"127.0.0.1:0\"]\n",
        )
        .replace("[relay]\n", &format!("{tls}[relay]\n"))
}

fn start(dir: &Path) -> (Server, TestPki) {
    let pki = make_pki(dir, "one");
    let server = Server::start(dir, &tls_config(dir, &pki));
    (server, pki)
}

fn have(tool: &str, arg: &str) -> bool {
    let found = Command::new(tool)
        .arg(arg)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok();
    if !found {
        eprintln!("skipped: {tool} missing");
    }
    found
}

/// Runs a Python script with `args`; panics with its output if it fails.
fn python(script: &str, args: &[String]) -> String {
    let out = Command::new("python3")
        .arg("-c")
        .arg(script)
        .args(args)
        .output()
        .expect("python3");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "python failed:\n{text}");
    text
}

fn run_with_stdin(cmd: &mut Command, stdin: &[u8]) -> Output {
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut input = child.stdin.take().unwrap();
    let bytes = stdin.to_vec();
    let writer = std::thread::spawn(move || {
        for line in bytes.split_inclusive(|&b| b == b'\n') {
            // Paced so the tools read each answer before the next command.
            std::thread::sleep(Duration::from_millis(150));
            if input.write_all(line).is_err() {
                return;
            }
        }
        std::thread::sleep(Duration::from_millis(500));
    });
    let out = child.wait_with_output().unwrap();
    let _ = writer.join();
    out
}

/// Everything the server sends until it closes; panics if it does not close within the
/// socket's read timeout.
fn read_to_end(stream: &mut std::net::TcpStream) -> Vec<u8> {
    use std::io::Read;
    let mut all = Vec::new();
    stream
        .read_to_end(&mut all)
        .expect("the server closes the connection");
    all
}

const SUBMIT_AND_FETCH: &str = r#"
import smtplib, poplib, socket, ssl, sys
sub, smtps, pop3s, pop3, ca = sys.argv[1:6]
ctx = ssl.create_default_context(cafile=ca)
def hp(a):
    h, p = a.rsplit(":", 1)
    return h, int(p)
# Submission with STARTTLS, certificate verified against the test CA, AUTH PLAIN.
s = smtplib.SMTP(*hp(sub), local_hostname="client.test")
s.ehlo()
assert s.has_extn("starttls"), s.esmtp_features
s.starttls(context=ctx)
s.ehlo()
assert "PLAIN" in s.esmtp_features["auth"], s.esmtp_features
s.login("alice@example.test", "pw")
refused = s.sendmail("alice@example.test", ["bob@example.test", "someone@far.test"],
                     b"Subject: starttls\r\n\r\nvia submission\r\n")
assert refused == {}, refused
s.quit()
# Implicit TLS, AUTH LOGIN.
s = smtplib.SMTP_SSL(*hp(smtps), context=ctx, local_hostname="client.test")
s.ehlo()
assert "STARTTLS" not in s.esmtp_features
s.user, s.password = "carol@example.test", "pw"
code, text = s.auth("LOGIN", s.auth_login, initial_response_ok=False)
assert code == 235, (code, text)
s.sendmail("carol@example.test", ["bob@example.test"], b"Subject: smtps\r\n\r\nvia 465\r\n")
s.quit()
# POP3 over implicit TLS, then STLS.
p = poplib.POP3_SSL(*hp(pop3s), context=ctx)
p.user("bob@example.test"); p.pass_("pw")
msgs = [b"\r\n".join(p.retr(i + 1)[1]) for i in range(len(p.list()[1]))]
p.quit()
assert len(msgs) == 2, msgs
assert any(b"with ESMTPSA" in m and b"via submission" in m for m in msgs), msgs
assert any(b"with ESMTPSA" in m and b"via 465" in m for m in msgs), msgs
# Pipelined over implicit TLS: every command in one write, the answers in order.
with socket.create_connection(hp(pop3s)) as raw, ctx.wrap_socket(raw, server_hostname="localhost") as t:
    t.sendall(b"USER bob@example.test\r\nPASS pw\r\nRETR 1\r\nNOOP\r\nRETR 2\r\nQUIT\r\n")
    got = b""
    while True:
        chunk = t.recv(65536)
        if not chunk:
            break
        got += chunk
# greeting, USER, PASS, +OK and message 1, NOOP, +OK and message 2, QUIT's +OK
parts = got.split(b"\r\n.\r\n")
assert len(parts) == 3, got
assert parts[0].startswith(b"+OK") and parts[0].endswith(msgs[0]), got
assert parts[1].startswith(b"+OK") and parts[1].endswith(msgs[1]), got
assert parts[2].startswith(b"+OK") and parts[2].endswith(b"\r\n"), got
p = poplib.POP3(*hp(pop3))
assert "STLS" in p.capa(), p.capa()
p.stls(context=ctx)
assert "STLS" not in p.capa()
p.user("bob@example.test"); p.pass_("pw")
assert p.stat()[0] == 2
p.quit()
print("ok")
"#;

#[test]
fn python_submits_over_starttls_and_implicit_tls_and_fetches_over_pop3s_and_stls() {
    if !have("python3", "--version") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (server, pki) = start(dir.path());
    let args = [
        server.addr("submission").to_string(),
        server.addr("smtps").to_string(),
        server.addr("pop3s").to_string(),
        server.addr("pop3").to_string(),
        pki.ca.display().to_string(),
    ];
    let out = python(SUBMIT_AND_FETCH, &args);
    assert!(out.contains("ok"), "{out}");
}

#[test]
fn lettre_submits_over_starttls_with_rustls_and_auth() {
    use lettre::transport::smtp::authentication::{Credentials, Mechanism};
    use lettre::transport::smtp::client::{Certificate, Tls, TlsParameters};
    use lettre::{Message, SmtpTransport, Transport};
    let dir = tempfile::tempdir().unwrap();
    let (server, pki) = start(dir.path());
    let ca = Certificate::from_pem(&std::fs::read(&pki.ca).unwrap()).unwrap();
    let tls = TlsParameters::builder("mx.ringmail.test".into())
        .add_root_certificate(ca)
        .build_rustls()
        .unwrap();
    let submission = server.addr("submission");
    let mailer = SmtpTransport::builder_dangerous(submission.ip().to_string())
        .port(submission.port())
        .tls(Tls::Required(tls))
        .credentials(Credentials::new("alice@example.test".into(), "pw".into()))
        .authentication(vec![Mechanism::Plain])
        .build();
    let email = Message::builder()
        .from("alice@example.test".parse().unwrap())
        .to("bob@example.test".parse().unwrap())
        .to("someone@far.test".parse().unwrap())
        .subject("over STARTTLS")
        .body("sent by lettre over rustls\r\n".to_string())
        .unwrap();
    let response = mailer.send(&email).unwrap();
    assert_eq!(u16::from(response.code()), 250);
    let got = common::pop3_retrieve_all(server.addr("pop3"), "bob@example.test");
    assert_eq!(got.len(), 1);
    let text = String::from_utf8_lossy(&got[0]);
    // RFC 3848: ESMTPSA, the submission was both encrypted and authenticated.
    assert!(text.contains("with ESMTPSA"), "{text}");
    assert!(text.contains("sent by lettre over rustls"), "{text}");
}

#[test]
fn submission_requires_auth_and_the_senders_own_address() {
    let dir = tempfile::tempdir().unwrap();
    let (server, _pki) = start(dir.path());
    let mut c = LineClient::connect(server.addr("submission"));
    assert!(c.reply().starts_with("220 "));
    let ehlo = c.command("EHLO client.test");
    assert!(ehlo.contains("250-STARTTLS"), "{ehlo}");
    assert!(
        ehlo.contains("AUTH PLAIN LOGIN"),
        "loopback offers AUTH: {ehlo}"
    );
    let r = c.command("MAIL FROM:<alice@example.test>");
    assert!(r.starts_with("530 5.7.0"), "{r}");
    // "\0alice@example.test\0pw"
    let r = c.command("AUTH PLAIN AGFsaWNlQGV4YW1wbGUudGVzdABwdw==");
    assert!(r.starts_with("235 2.7.0"), "{r}");
    let r = c.command("MAIL FROM:<bob@example.test>");
    assert!(r.starts_with("553 5.7.1"), "{r}");
    assert!(c
        .command("MAIL FROM:<alice@example.test>")
        .starts_with("250"));
    let r = c.command("RCPT TO:<x@far.test>");
    assert!(r.starts_with("250"), "authenticated relay: {r}");
    // The MX listener, with no relay networks, relays for nobody unauthenticated.
    let mut mx = LineClient::connect(server.addr("smtp"));
    mx.reply();
    mx.command("EHLO client.test");
    assert!(mx.command("MAIL FROM:<s@far.test>").starts_with("250"));
    let r = mx.command("RCPT TO:<x@far.test>");
    assert!(r.starts_with("554 5.7.1"), "{r}");
}

#[test]
fn failed_auth_is_slowed_down_and_logged() {
    let dir = tempfile::tempdir().unwrap();
    let (server, _pki) = start(dir.path());
    let mut c = LineClient::connect(server.addr("submission"));
    c.reply();
    c.command("EHLO client.test");
    let mut delays = Vec::new();
    for _ in 0..2 {
        let started = Instant::now();
        // "\0alice@example.test\0nope"
        let r = c.command("AUTH PLAIN AGFsaWNlQGV4YW1wbGUudGVzdABub3Bl");
        assert!(r.starts_with("535 5.7.8"), "{r}");
        delays.push(started.elapsed());
    }
    // Each failure waits its throttle delay, and the delay grows: 500 ms, then 1 s (timing
    // on a loaded machine is noisy, so the growth is read from the log).
    assert!(
        delays.iter().all(|d| *d >= Duration::from_millis(400)),
        "{delays:?}"
    );
    std::thread::sleep(Duration::from_millis(100));
    let logs = server.stderr_lines();
    for delay in ["answering in 500ms", "answering in 1s"] {
        assert!(logs.iter().any(|l| l.contains(delay)), "{delay}: {logs:#?}");
    }
    // A later success still works and resets nothing it should not.
    let r = c.command("AUTH PLAIN AGFsaWNlQGV4YW1wbGUudGVzdABwdw==");
    assert!(r.starts_with("235"), "{r}");
    assert!(
        logs.iter()
            .any(|l| l.contains("smtp login failed") && l.contains("127.0.0.1")),
        "{logs:#?}"
    );
}

/// A handshake that takes longer than the idle timeout is not held against the client: its
/// idle time starts once the handshake is done.
const SLOW_HANDSHAKES: &str = r#"
import smtplib, poplib, socket, ssl, sys, time
sub, pop3, ca = sys.argv[1:4]
ctx = ssl.create_default_context(cafile=ca)
def hp(a):
    h, p = a.rsplit(":", 1)
    return h, int(p)
def slow_wrap(sock):
    time.sleep(1.5)
    return ctx.wrap_socket(sock, server_hostname="localhost")
s = smtplib.SMTP(*hp(sub), local_hostname="client.test")
s.ehlo()
code, _ = s.docmd("STARTTLS")
assert code == 220, code
s.sock = slow_wrap(s.sock)
s.file = None
code, text = s.ehlo()
assert code == 250, (code, text)
s.quit()
p = poplib.POP3(*hp(pop3))
p._shortcmd("STLS")
p.sock = slow_wrap(p.sock)
p.file = p.sock.makefile("rb")
assert "STLS" not in p.capa(), "no fresh session after STLS"
p.quit()
print("ok")
"#;

#[test]
fn a_slow_starttls_or_stls_handshake_does_not_use_up_the_idle_timeout() {
    if !have("python3", "--version") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let pki = make_pki(dir.path(), "one");
    let config = tls_config(dir.path(), &pki)
        .replace(
            "relay_networks = []\n",
            "relay_networks = []\nidle_timeout_secs = 1\n",
        )
        .replace(
            "tls_listen = [\"127.0.0.1:0\"]\n[tls]",
            "tls_listen = [\"127.0.0.1:0\"]\nidle_timeout_secs = 1\n[tls]",
        );
    assert!(
        config.matches("idle_timeout_secs = 1").count() == 2,
        "{config}"
    );
    let server = Server::start(dir.path(), &config);
    let args = [
        server.addr("submission").to_string(),
        server.addr("pop3").to_string(),
        pki.ca.display().to_string(),
    ];
    let out = python(SLOW_HANDSHAKES, &args);
    assert!(out.contains("ok"), "{out}");
}

/// Over the connection limit, an implicit-TLS port cannot say why in plain text (the client
/// expects a handshake): it closes, which a client takes as a temporary failure too.
#[test]
fn over_the_connection_limit_the_implicit_tls_ports_close_without_plain_text() {
    let dir = tempfile::tempdir().unwrap();
    let pki = make_pki(dir.path(), "one");
    let config = tls_config(dir.path(), &pki).replace(
        "relay_networks = []\n",
        "relay_networks = []\nmax_connections_per_ip = 1\n",
    );
    let server = Server::start(dir.path(), &config);
    // Hold this address's one SMTP slot and its one POP3 slot.
    let mut smtp = LineClient::connect(server.addr("smtp"));
    assert!(smtp.reply().starts_with("220"));
    let mut pop3 = LineClient::connect(server.addr("pop3"));
    assert!(pop3.line().starts_with("+OK"));
    for label in ["smtps", "pop3s"] {
        let mut stream = std::net::TcpStream::connect(server.addr(label)).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        let mut got = Vec::new();
        // A reset is as good as a close here; a timeout would leave `got` empty too, so
        // the plain ports below show that refusals are being made.
        let _ = std::io::Read::read_to_end(&mut stream, &mut got);
        assert!(
            got.is_empty(),
            "{label} sent {:?}",
            String::from_utf8_lossy(&got)
        );
    }
    // The plain ports still say why.
    let mut refused = LineClient::connect(server.addr("smtp"));
    assert!(refused.reply().starts_with("421 4.7.0"));
    let mut refused = LineClient::connect(server.addr("pop3"));
    assert!(refused.line().starts_with("-ERR [SYS/TEMP]"));
}

#[test]
fn injected_commands_after_starttls_or_stls_in_one_packet_are_never_run() {
    let dir = tempfile::tempdir().unwrap();
    let (server, _pki) = start(dir.path());
    let injections: [&[u8]; 3] = [
        b"STARTTLS\r\nMAIL FROM:<evil@far.test>\r\nRCPT TO:<bob@example.test>\r\n",
        b"STARTTLS\r\nAUTH PLAIN AGFsaWNlQGV4YW1wbGUudGVzdABwdw==\r\n",
        b"STARTTLS\r\nQUIT\r\n",
    ];
    for injection in injections {
        for listener in ["smtp", "submission"] {
            let mut c = LineClient::connect(server.addr(listener));
            c.reply();
            c.command("EHLO client.test");
            c.send(injection);
            let r = c.reply();
            assert!(r.starts_with("554 5.5.1"), "{listener}: {r}");
            assert_eq!(c.line(), "", "nothing after the refusal: closed");
        }
    }
    let mut p = LineClient::connect(server.addr("pop3"));
    assert!(p.line().starts_with("+OK"));
    p.send(b"STLS\r\nUSER alice@example.test\r\nPASS pw\r\n");
    let r = p.line();
    assert!(r.starts_with("-ERR"), "{r}");
    assert_eq!(p.line(), "", "closed");
    // Nothing was stored for bob.
    let mut bob = LineClient::connect(server.addr("pop3"));
    bob.line();
    bob.command("USER bob@example.test");
    assert!(bob.command("PASS pw").starts_with("+OK"));
    assert!(bob.command("STAT").starts_with("+OK 0 "));
}

#[test]
fn garbage_instead_of_a_client_hello_ends_the_connection_cleanly() {
    let dir = tempfile::tempdir().unwrap();
    let (server, _pki) = start(dir.path());
    let mut c = LineClient::connect(server.addr("smtp"));
    c.reply();
    c.command("EHLO client.test");
    assert!(c.command("STARTTLS").starts_with("220 2.0.0"));
    // Plain text where the ClientHello belongs: no SMTP reply, just (a TLS alert and) the end.
    c.send(b"MAIL FROM:<evil@far.test>\r\n");
    let rest = read_to_end(&mut c.stream);
    assert!(!rest.windows(3).any(|w| w == b"250"), "{rest:?}");
    // Same on the implicit-TLS listeners.
    for listener in ["smtps", "pop3s"] {
        let mut c = LineClient::connect(server.addr(listener));
        c.send(b"EHLO client.test\r\nUSER bob@example.test\r\n");
        let rest = read_to_end(&mut c.stream);
        assert!(
            !rest.starts_with(b"220") && !rest.starts_with(b"+OK"),
            "{listener}: {rest:?}"
        );
    }
    // And the server still serves.
    let mut c = LineClient::connect(server.addr("smtp"));
    assert!(c.reply().starts_with("220 "));
}

#[test]
fn openssl_s_client_starttls_smtp_and_pop3_verify_the_chain() {
    if !have("openssl", "version") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (server, pki) = start(dir.path());
    let cases = [
        (
            "smtp",
            "smtp",
            &b"EHLO client.test\r\nQUIT\r\n"[..],
            "250 AUTH PLAIN LOGIN",
        ),
        ("pop3", "pop3", &b"CAPA\r\nQUIT\r\n"[..], "SASL PLAIN"),
    ];
    for (listener, proto, script, want) in cases {
        // -quiet: no command letters (a line starting with Q would quit), and with
        // -verify_return_error a chain that does not verify aborts the handshake.
        let out = run_with_stdin(
            Command::new("openssl")
                .args(["s_client", "-quiet", "-verify_return_error"])
                .args(["-starttls", proto])
                .arg("-CAfile")
                .arg(&pki.ca)
                .args(["-verify_hostname", "mx.ringmail.test"])
                .arg("-connect")
                .arg(server.addr(listener).to_string()),
            script,
        );
        let text = String::from_utf8_lossy(&out.stdout);
        let errors = String::from_utf8_lossy(&out.stderr);
        assert!(errors.contains("verify return:1"), "{listener}: {errors}");
        assert!(text.contains(want), "{listener}: {text}\n{errors}");
    }
}

#[test]
fn curl_ssl_reqd_sends_over_submission_and_fetches_over_pop3() {
    if !have("curl", "--version") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (server, pki) = start(dir.path());
    let mail = dir.path().join("mail.txt");
    std::fs::write(
        &mail,
        "Subject: curl tls\r\n\r\nsent by curl over STARTTLS\r\n",
    )
    .unwrap();
    let out = Command::new("curl")
        .args(["-sS", "--ssl-reqd", "--cacert"])
        .arg(&pki.ca)
        .arg(format!("smtp://{}/client.test", server.addr("submission")))
        .args(["--user", "alice@example.test:pw"])
        .args(["--mail-from", "alice@example.test"])
        .args(["--mail-rcpt", "carol@example.test", "-T"])
        .arg(&mail)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = Command::new("curl")
        .args(["-sS", "--ssl-reqd", "--cacert"])
        .arg(&pki.ca)
        .args(["--user", "carol@example.test:pw"])
        .arg(format!("pop3://{}/1", server.addr("pop3")))
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains("sent by curl over STARTTLS"), "{text}");
    assert!(text.contains("with ESMTPSA"), "{text}");
}

const PEER_CERT_CN: &str = r#"
import socket, ssl, sys
host, port = sys.argv[1].rsplit(":", 1)
ctx = ssl.create_default_context(cafile=sys.argv[2])
with socket.create_connection((host, int(port))) as raw:
    with ctx.wrap_socket(raw, server_hostname="mx.ringmail.test") as tls:
        subject = dict(x[0] for x in tls.getpeercert()["subject"])
        assert tls.recv(100).startswith(b"220 ")
        print(subject["commonName"])
"#;

#[test]
fn sighup_reloads_the_certificate_without_dropping_connections_and_ignores_bad_files() {
    if !have("python3", "--version") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (server, first) = start(dir.path());
    let smtps = server.addr("smtps").to_string();
    let cn = |ca: &Path| python(PEER_CERT_CN, &[smtps.clone(), ca.display().to_string()]);
    assert_eq!(cn(&first.ca).trim(), "mx.ringmail.test one");

    // A connection open across the reloads keeps working.
    let mut open = LineClient::connect(server.addr("submission"));
    open.reply();
    open.command("EHLO client.test");

    // A bad key: logged, ignored, the old identity still served.
    std::fs::write(&first.key, "not a key").unwrap();
    server.signal(libc::SIGHUP);
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(cn(&first.ca).trim(), "mx.ringmail.test one");
    let logs = server.stderr_lines();
    assert!(logs.iter().any(|l| l.contains("tls.key")), "{logs:#?}");

    let second = make_pki(dir.path(), "two");
    server.signal(libc::SIGHUP);
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(cn(&second.ca).trim(), "mx.ringmail.test two");
    assert!(open.command("NOOP").starts_with("250"));
}

#[test]
fn a_bad_certificate_at_start_names_the_key_and_exits_1() {
    let dir = tempfile::tempdir().unwrap();
    let pki = make_pki(dir.path(), "one");
    std::fs::write(&pki.cert, "garbage").unwrap();
    let config_path = dir.path().join("ringmail.toml");
    std::fs::write(&config_path, tls_config(dir.path(), &pki)).unwrap();
    let out = Command::new(common::BIN)
        .arg("serve")
        .arg("--config")
        .arg(&config_path)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("tls.cert"), "{stderr}");
    assert!(stderr.contains("cert.pem"), "{stderr}");
}
