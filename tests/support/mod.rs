//! What the integration tests that run the real binaries share: a temp dir, the real
//! `nbiot-gateway` binary started with a config file (its stderr collected line by line),
//! plain HTTP GETs, VictoriaMetrics, and polling with a deadline. Each test file uses part
//! of it (`mod support;`).
#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

pub const DEADLINE: Duration = Duration::from_secs(30);

/// Polls `f` every 50 ms until it returns Some, or panics with `what` at the deadline.
pub fn wait_for<T>(what: &str, deadline: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let end = Instant::now() + deadline;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(Instant::now() < end, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A loopback port that was free a moment ago (for servers that cannot bind port 0 and
/// report it).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("bind a free port")
}

pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> TempDir {
        let dir = std::env::temp_dir().join(format!("nbiot-test-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("create temp dir");
        TempDir(dir)
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

pub fn shipped_profiles() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("device-profiles")
}

/// `GET path` over plain HTTP/1.0: (status, body).
pub fn http_get(addr: &str, path: &str) -> std::io::Result<(u16, String)> {
    let mut stream = TcpStream::connect(addr)?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    write!(stream, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n")?;
    let mut response = String::new();
    stream.read_to_string(&mut response)?;
    let (head, body) = response.split_once("\r\n\r\n").unwrap_or((&response, ""));
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    Ok((status, body.to_owned()))
}

/// A running `nbiot-gateway run --config FILE`, killed on drop.
pub struct Gateway {
    pub child: Child,
    /// host:port of the HTTP API.
    pub http: String,
    pub coap: String,
    pub mqtt: String,
    /// Every stderr line so far.
    pub log: Arc<Mutex<Vec<String>>>,
}

impl Drop for Gateway {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The config every ops test starts from: loopback ports chosen by the OS, the store in
/// `dir`, the shipped profiles; `extra` adds sections (`[mqtt]` by default is off).
pub fn config(dir: &TempDir, extra: &str) -> PathBuf {
    let path = dir.path("gateway.toml");
    let mqtt = if extra.contains("[mqtt]") {
        ""
    } else {
        "[mqtt]\nmode = \"off\"\n"
    };
    std::fs::write(
        &path,
        format!(
            "[coap]\nlisten = \"127.0.0.1:0\"\n\
             [http]\nlisten = \"127.0.0.1:0\"\n\
             [store]\npath = \"{}\"\n\
             [profiles]\ndir = \"{}\"\n{mqtt}{extra}",
            dir.path("data/gateway.db").display(),
            shipped_profiles().display()
        ),
    )
    .expect("write config");
    path
}

impl Gateway {
    /// Starts the gateway with `args` after `run --config FILE`, and `env`; waits for
    /// `Gateway running.` and reads the bound addresses from that line (text or JSON).
    pub fn start(config: &Path, args: &[&str], env: &[(&str, &str)]) -> Gateway {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_nbiot-gateway"));
        cmd.args(["run", "--config", config.to_str().expect("utf-8 path")])
            .args(args)
            .env("RUST_LOG", "info")
            .env_remove("NBIOT_LOG_FORMAT")
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().expect("start nbiot-gateway");
        let log = Arc::new(Mutex::new(Vec::new()));
        let stderr = child.stderr.take().expect("stderr");
        {
            let log = Arc::clone(&log);
            std::thread::spawn(move || {
                for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                    log.lock().expect("log lock").push(line);
                }
            });
        }
        let mut gw = Gateway {
            child,
            http: String::new(),
            coap: String::new(),
            mqtt: String::new(),
            log,
        };
        let line = wait_for("`Gateway running.` in the log", DEADLINE, || {
            if let Ok(Some(status)) = gw.child.try_wait() {
                panic!("the gateway exited: {status}; log:\n{}", gw.log_text());
            }
            gw.lines()
                .into_iter()
                .find(|l| l.contains("Gateway running."))
        });
        let field = |name: &str| -> String {
            if line.starts_with('{') {
                let v: serde_json::Value = serde_json::from_str(&line).expect("JSON log line");
                v[name].as_str().unwrap_or_default().to_owned()
            } else {
                line.split_whitespace()
                    .find_map(|w| w.strip_prefix(&format!("{name}=")))
                    .unwrap_or_default()
                    .to_owned()
            }
        };
        gw.http = field("http");
        gw.coap = field("coap");
        gw.mqtt = field("mqtt");
        gw
    }

    pub fn lines(&self) -> Vec<String> {
        self.log.lock().expect("log lock").clone()
    }

    pub fn log_text(&self) -> String {
        self.lines().join("\n")
    }

    pub fn get(&self, path: &str) -> (u16, String) {
        http_get(&self.http, path).expect("GET from the gateway")
    }

    pub fn metrics(&self) -> String {
        let (status, body) = self.get("/metrics");
        assert_eq!(status, 200, "{body}");
        body
    }

    /// `nbiot-gateway devices …` against this gateway.
    pub fn devices(&self, args: &[&str], token: Option<&str>) {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_nbiot-gateway"));
        cmd.arg("devices")
            .args(args)
            .args(["--url", &format!("http://{}", self.http)]);
        match token {
            Some(t) => cmd.env("NBIOT_TOKEN", t),
            None => cmd.env_remove("NBIOT_TOKEN"),
        };
        let out = cmd.output().expect("nbiot-gateway devices");
        assert!(
            out.status.success(),
            "devices {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// SIGTERM, then waits for a clean exit.
    pub fn stop(&mut self) {
        let pid = self.child.id().to_string();
        assert!(Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .expect("kill")
            .success());
        let status = wait_for("the gateway to exit after SIGTERM", DEADLINE, || {
            self.child.try_wait().expect("wait")
        });
        assert!(status.success(), "exit after SIGTERM: {status:?}");
    }
}

/// `coap-client-notls -m post` of `payload` to `/up/{device}`: libcoap's output.
pub fn coap_post(dir: &TempDir, coap: &str, device: &str, payload: &[u8]) -> String {
    let file = dir.path(&format!("payload-{device}.bin"));
    std::fs::write(&file, payload).expect("write payload");
    let out = Command::new("coap-client-notls")
        .args(["-m", "post", "-B", "10", "-f", file.to_str().expect("path")])
        .arg(format!("coap://{coap}/up/{device}"))
        .output()
        .expect("coap-client-notls runs (Debian libcoap3-bin)");
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Runs the `nbiot-load` CoAP fleet against `gw` with `extra` arguments (`--register` to
/// register its devices first) and returns its JSON summary.
pub fn load(
    gw: &Gateway,
    devices: u32,
    rate: u32,
    seconds: f64,
    extra: &[&str],
) -> serde_json::Value {
    let out = Command::new(env!("CARGO_BIN_EXE_nbiot-load"))
        .args(extra)
        .args([
            "--coap",
            &gw.coap,
            "--api",
            &format!("http://{}", gw.http),
            "--devices",
            &devices.to_string(),
            "--rate",
            &rate.to_string(),
            "--duration",
            &seconds.to_string(),
            "--json",
        ])
        .output()
        .expect("run nbiot-load");
    assert!(
        out.status.success(),
        "nbiot-load: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("nbiot-load prints a JSON summary")
}

/// One sample of the Prometheus text format: name, labels (sorted), value.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    pub name: String,
    pub labels: Vec<(String, String)>,
    pub value: f64,
}

/// Parses the sample lines of a Prometheus text exposition (comments skipped). Label values
/// here never contain `,` or `"` escapes (closed sets), which keeps this short.
pub fn parse_exposition(text: &str) -> Vec<Sample> {
    let mut samples = Vec::new();
    for line in text.lines() {
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let (series, value) = line.rsplit_once(' ').expect("`series value`");
        let (name, labels) = match series.split_once('{') {
            Some((name, rest)) => {
                let inner = rest.strip_suffix('}').expect("closing brace");
                let mut labels: Vec<(String, String)> = inner
                    .split(',')
                    .filter(|p| !p.is_empty())
                    .map(|p| {
                        let (k, v) = p.split_once('=').expect("label=value");
                        (k.to_owned(), v.trim_matches('"').to_owned())
                    })
                    .collect();
                labels.sort();
                (name.to_owned(), labels)
            }
            None => (series.to_owned(), Vec::new()),
        };
        let value = match value {
            "+Inf" => f64::INFINITY,
            "-Inf" => f64::NEG_INFINITY,
            v => v.parse().expect("sample value"),
        };
        samples.push(Sample {
            name,
            labels,
            value,
        });
    }
    samples
}

impl Sample {
    pub fn label(&self, key: &str) -> Option<&str> {
        self.labels
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    pub fn label_names(&self) -> Vec<&str> {
        self.labels.iter().map(|(k, _)| k.as_str()).collect()
    }
}

/// The value of the sample `name` whose labels include every `(key, value)` in `labels`.
pub fn value(samples: &[Sample], name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    samples
        .iter()
        .find(|s| s.name == name && labels.iter().all(|(k, v)| s.label(k) == Some(*v)))
        .map(|s| s.value)
}

pub fn addr(s: &str) -> SocketAddr {
    s.parse().expect("socket address")
}

/// A child process killed on drop.
pub struct Server(pub Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

pub fn victoria_metrics(dir: &TempDir) -> (Server, String) {
    let port = free_port();
    let child = Command::new("/usr/bin/victoria-metrics")
        .arg(format!("-storageDataPath={}", dir.path("vm").display()))
        .arg(format!("-httpListenAddr=127.0.0.1:{port}"))
        .arg("-loggerLevel=ERROR")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start victoria-metrics (Debian victoria-metrics)");
    let addr = format!("127.0.0.1:{port}");
    wait_for("VictoriaMetrics to answer /health", DEADLINE, || {
        http_get(&addr, "/health").ok().filter(|(s, _)| *s == 200)
    });
    (Server(child), addr)
}
