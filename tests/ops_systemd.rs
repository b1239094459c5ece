//! The shipped systemd unit (ops/systemd/nbiot-gateway.service): `systemd-analyze verify`
//! accepts it (with ExecStart pointed at the binary under test, since the unit names its
//! installed path), its hardening scores as systemd's "OK" exposure level, and it keeps the
//! settings the gateway's behaviour relies on.

use std::path::Path;
use std::process::Command;

fn unit_text() -> String {
    std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("ops/systemd/nbiot-gateway.service"),
    )
    .expect("read the unit")
}

/// The unit with the installed binary path replaced by the one under test, in a temp dir.
fn unit_for_test(tag: &str) -> (std::path::PathBuf, std::path::PathBuf) {
    let text = unit_text().replace(
        "/usr/local/bin/nbiot-gateway",
        env!("CARGO_BIN_EXE_nbiot-gateway"),
    );
    let dir = std::env::temp_dir().join(format!("nbiot-ops-systemd-{tag}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let path = dir.join("nbiot-gateway.service");
    std::fs::write(&path, text).expect("write unit");
    (dir, path)
}

#[test]
fn systemd_analyze_verifies_the_unit() {
    let (dir, unit) = unit_for_test("verify");
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .arg(&unit)
        .output()
        .expect("systemd-analyze runs (Debian systemd; scripts/test.sh installs it)");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let _ = std::fs::remove_dir_all(dir);
    assert!(out.status.success(), "{text}");
    assert!(text.trim().is_empty(), "warnings:\n{text}");
}

#[test]
fn the_unit_is_hardened() {
    let (dir, unit) = unit_for_test("security");
    let out = Command::new("systemd-analyze")
        .args(["--offline=true", "security"])
        .arg(&unit)
        .output()
        .expect("systemd-analyze runs");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let _ = std::fs::remove_dir_all(dir);
    let level: f64 = text
        .lines()
        .find_map(|l| l.split_once("Overall exposure level for nbiot-gateway.service: "))
        .and_then(|(_, rest)| rest.split_whitespace().next()?.parse().ok())
        .unwrap_or_else(|| panic!("no exposure level in:\n{text}"));
    assert!(level <= 2.0, "exposure {level}:\n{text}");
}

#[test]
fn the_unit_keeps_what_the_gateway_relies_on() {
    let text = unit_text();
    for line in [
        // SIGHUP reloads the device profiles.
        "ExecReload=/bin/kill -HUP $MAINPID",
        // SIGTERM drains: sources, pipeline commit and acks, forwarder flush.
        "KillSignal=SIGTERM",
        "Restart=on-failure",
        "StateDirectory=nbiot-gateway",
        "ReadWritePaths=/var/lib/nbiot-gateway",
        "NoNewPrivileges=yes",
        "ProtectSystem=strict",
        "LimitNOFILE=65536",
        "DynamicUser=yes",
    ] {
        assert!(text.lines().any(|l| l == line), "the unit lacks `{line}`");
    }
    let stop: u64 = text
        .lines()
        .find_map(|l| l.strip_prefix("TimeoutStopSec="))
        .and_then(|v| v.strip_suffix('s'))
        .and_then(|v| v.parse().ok())
        .expect("TimeoutStopSec=<n>s");
    // CoAP and MQTT drain (5 s each, in parallel) + commit + forwarder flush (5 s).
    assert!(stop >= 15, "TimeoutStopSec={stop}s is shorter than a drain");
    // /proc/net/udp (the CoAP drop counter) must stay readable: no ProcSubset=pid.
    assert!(!text.contains("ProcSubset="));
}
