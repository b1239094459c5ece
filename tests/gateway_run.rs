//! `nbiot-gateway run` as an operator runs it: the real binary with a config file, its HTTP
//! API, profile reload on SIGHUP, the `devices` CLI against it, and a clean SIGTERM stop.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

const DEADLINE: Duration = Duration::from_secs(20);

struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> TempDir {
        let dir = std::env::temp_dir().join(format!("nbiot-run-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("create temp dir");
        TempDir(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A running gateway; killed if the test fails before stopping it.
struct Gateway {
    child: Child,
    url: String,
    stderr_lines: mpsc::Receiver<String>,
}

impl Drop for Gateway {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start(dir: &Path, profiles: &Path) -> Gateway {
    let config = dir.join("gateway.toml");
    std::fs::write(
        &config,
        format!(
            "[coap]\nlisten = \"127.0.0.1:0\"\n[mqtt]\nmode = \"off\"\n[http]\nlisten = \"127.0.0.1:0\"\n[store]\npath = \"{}\"\n[profiles]\ndir = \"{}\"\n",
            dir.join("data/gateway.db").display(),
            profiles.display()
        ),
    )
    .expect("write config");
    let mut child = Command::new(env!("CARGO_BIN_EXE_nbiot-gateway"))
        .args(["run", "--config", config.to_str().expect("path")])
        .env("RUST_LOG", "info")
        .stderr(Stdio::piped())
        .spawn()
        .expect("start the gateway");
    let (tx, rx) = mpsc::channel();
    let stderr = child.stderr.take().expect("stderr");
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    // The port is chosen at run time; the gateway logs the address it bound.
    let deadline = Instant::now() + DEADLINE;
    let addr = loop {
        let line = rx
            .recv_timeout(deadline.saturating_duration_since(Instant::now()))
            .expect("the gateway logs `Gateway running.` before the deadline");
        if line.contains("Gateway running.") {
            let addr = line
                .split_whitespace()
                .find_map(|w| w.strip_prefix("http="))
                .expect("the line names the HTTP address")
                .to_owned();
            break addr;
        }
    };
    Gateway {
        child,
        url: format!("http://{addr}"),
        stderr_lines: rx,
    }
}

fn cli(url: &str, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_nbiot-gateway"))
        .arg("devices")
        .args(args)
        .args(["--url", url])
        .env_remove("NBIOT_TOKEN")
        .output()
        .expect("run the CLI")
}

fn stdout(out: &Output) -> String {
    assert!(
        out.status.success(),
        "exit {:?}: {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn profile_names(url: &str) -> Vec<String> {
    let body = reqwest::blocking_get(&format!("{url}/api/v1/profiles"));
    let v: serde_json::Value = serde_json::from_str(&body).expect("JSON");
    v.as_array()
        .expect("a list")
        .iter()
        .map(|p| p["name"].as_str().expect("name").to_owned())
        .collect()
}

/// A tiny blocking GET over the async client, so the test needs no runtime of its own.
mod reqwest {
    pub fn blocking_get(url: &str) -> String {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        rt.block_on(async {
            ::reqwest::get(url)
                .await
                .expect("GET")
                .error_for_status()
                .expect("2xx")
                .text()
                .await
                .expect("body")
        })
    }
}

fn minimal_profile(name: &str) -> String {
    format!("name = \"{name}\"\ndescription = \"test\"\nmeasurement = \"m\"\ncodec = \"cjt188\"\n")
}

#[test]
fn run_serves_reloads_on_sighup_and_stops_on_sigterm() {
    let dir = TempDir::new("main");
    let profiles = dir.0.join("profiles");
    std::fs::create_dir_all(&profiles).expect("mkdir");
    std::fs::write(profiles.join("a.toml"), minimal_profile("meter-a")).expect("write");

    let gw = start(&dir.0, &profiles);
    assert_eq!(profile_names(&gw.url), ["meter-a"]);

    // Devices through the CLI, against the running gateway.
    stdout(&cli(
        &gw.url,
        &[
            "add",
            "860000000000009",
            "--profile",
            "meter-a",
            "--label",
            "district=north",
            "--param",
            "depth_m=2.5",
        ],
    ));
    let csv = dir.0.join("fleet.csv");
    std::fs::write(
        &csv,
        "device,profile,label:district\nm-2,meter-a,south\nm-3,meter-a,north\n",
    )
    .expect("write csv");
    stdout(&cli(&gw.url, &["import", csv.to_str().expect("path")]));
    let listed = stdout(&cli(&gw.url, &["list", "--label", "district=north"]));
    assert!(
        listed.contains("860000000000009") && listed.contains("m-3"),
        "{listed}"
    );
    assert!(!listed.contains("m-2"), "{listed}");
    stdout(&cli(&gw.url, &["remove", "m-3"]));
    let listed = stdout(&cli(&gw.url, &["list"]));
    assert!(
        !listed.contains("m-3") && listed.contains("m-2"),
        "{listed}"
    );
    let bad = cli(&gw.url, &["add", "m-9", "--profile", "no-such-profile"]);
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("no-such-profile"));

    // A new profile and a broken edit of an existing one, then SIGHUP: the new one loads,
    // the broken one keeps its previous version in force.
    std::fs::write(profiles.join("b.toml"), minimal_profile("meter-b")).expect("write");
    std::fs::write(
        profiles.join("a.toml"),
        "name = \"meter-a\"\ncodec = \"broken\"\n",
    )
    .expect("write");
    let pid = gw.child.id().to_string();
    assert!(Command::new("kill")
        .args(["-HUP", &pid])
        .status()
        .expect("kill")
        .success());
    let deadline = Instant::now() + DEADLINE;
    loop {
        let names = profile_names(&gw.url);
        if names == ["meter-a", "meter-b"] {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "profiles after SIGHUP: {names:?}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }

    // SIGTERM: a clean stop, logged, exit 0.
    let mut gw = gw;
    assert!(Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .expect("kill")
        .success());
    let deadline = Instant::now() + DEADLINE;
    let status = loop {
        if let Some(status) = gw.child.try_wait().expect("wait") {
            break status;
        }
        assert!(
            Instant::now() < deadline,
            "the gateway did not stop after SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(status.success(), "{status:?}");
    let log: Vec<String> = gw.stderr_lines.try_iter().collect();
    assert!(
        log.iter().any(|l| l.contains("Gateway stopped.")),
        "{log:#?}"
    );

    // The registry survived the restart-less reload and is on disk for the next start.
    let gw = start(&dir.0, &profiles);
    let listed = stdout(&cli(&gw.url, &["list"]));
    assert!(
        listed.contains("860000000000009") && listed.contains("m-2"),
        "{listed}"
    );
}

#[test]
fn run_refuses_a_bad_config_with_file_and_line() {
    let dir = TempDir::new("badcfg");
    let config = dir.0.join("gateway.toml");
    std::fs::write(&config, "[http]\nlisten = \"127.0.0.1:0\"\nlisen = \"x\"\n").expect("write");
    let out = Command::new(env!("CARGO_BIN_EXE_nbiot-gateway"))
        .args(["run", "--config", config.to_str().expect("path")])
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("gateway.toml:3:1: unknown field `lisen`"),
        "{err}"
    );
}
