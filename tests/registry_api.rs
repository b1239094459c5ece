//! The device registry and the HTTP API, end to end: a real axum server on a loopback port
//! chosen at run time, a real reqwest client, a real SQLite file in a temp dir, and profiles
//! loaded from TOML files by `profiles::load_dir`.
//!
//! The 100k-device import test prints its timings and the registry's memory per device
//! (`cargo test --release --test registry_api -- --nocapture import_100k`); it runs alone
//! (the others wait on `GATE`) so the memory figures are its own.

use std::alloc::{GlobalAlloc, Layout, System};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicIsize, AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Instant;

use nbiot_gateway::api::{self, ApiState, ServeError};
use nbiot_gateway::cli::devices::{run_async, DevicesCommand};
use nbiot_gateway::config::{Role, TokenConfig};
use nbiot_gateway::profiles::{self, SharedProfiles};
use nbiot_gateway::registry::Registry;
use nbiot_gateway::store::Store;
use reqwest::{Method, RequestBuilder, StatusCode};
use serde_json::{json, Value};
use tokio_util::sync::CancellationToken;

// ---------------------------------------------------------------------------------------
// Harness
// ---------------------------------------------------------------------------------------

/// Counts live Rust heap bytes, so the registry's memory per device is measured exactly
/// (SQLite allocates through libc and is not counted here; RSS is reported too).
struct CountingAlloc;

static LIVE_HEAP: AtomicIsize = AtomicIsize::new(0);

unsafe impl GlobalAlloc for CountingAlloc {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let p = System.alloc(layout);
        if !p.is_null() {
            LIVE_HEAP.fetch_add(layout.size() as isize, Ordering::Relaxed);
        }
        p
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        let p = System.alloc_zeroed(layout);
        if !p.is_null() {
            LIVE_HEAP.fetch_add(layout.size() as isize, Ordering::Relaxed);
        }
        p
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        System.dealloc(ptr, layout);
        LIVE_HEAP.fetch_sub(layout.size() as isize, Ordering::Relaxed);
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let p = System.realloc(ptr, layout, new_size);
        if !p.is_null() {
            LIVE_HEAP.fetch_add(
                new_size as isize - layout.size() as isize,
                Ordering::Relaxed,
            );
        }
        p
    }
}

#[global_allocator]
static ALLOC: CountingAlloc = CountingAlloc;

/// Tests share the process; the 100k test takes this exclusively so nothing else allocates
/// while it measures.
static GATE: tokio::sync::RwLock<()> = tokio::sync::RwLock::const_new(());

const ADMIN: &str = "admin-secret-token";
const READER: &str = "reader-secret-token";

/// A fresh directory under the system temp dir, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> TempDir {
        static N: AtomicU32 = AtomicU32::new(0);
        let dir = std::env::temp_dir().join(format!(
            "nbiot-registry-api-{tag}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        TempDir(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A minimal valid profile file (the built-in `dragino` codec, no examples).
fn write_profile(dir: &Path, name: &str, description: &str) {
    std::fs::write(
        dir.join(format!("{name}.toml")),
        format!(
            "name = \"{name}\"\ndescription = \"{description}\"\nmeasurement = \"{name}_m\"\n\
             codec = \"dragino\"\n"
        ),
    )
    .unwrap();
}

struct Options {
    profiles: &'static [&'static str],
    tokens: bool,
    reload: bool,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            profiles: &["cover", "meter"],
            tokens: true,
            reload: true,
        }
    }
}

/// A running API over a fresh database and profiles directory.
struct Gateway {
    url: String,
    client: reqwest::Client,
    registry: Registry,
    profiles_dir: PathBuf,
    db_path: PathBuf,
    shutdown: CancellationToken,
    server: tokio::task::JoinHandle<Result<(), ServeError>>,
    _dir: TempDir,
}

fn tokens() -> Vec<TokenConfig> {
    vec![
        TokenConfig {
            token: ADMIN.into(),
            role: Role::Admin,
        },
        TokenConfig {
            token: READER.into(),
            role: Role::Read,
        },
    ]
}

impl Gateway {
    async fn start(opts: Options) -> Gateway {
        let dir = TempDir::new("gw");
        let profiles_dir = dir.0.join("profiles");
        std::fs::create_dir_all(&profiles_dir).unwrap();
        for name in opts.profiles {
            write_profile(&profiles_dir, name, &format!("{name} test profile"));
        }
        let report = profiles::load_dir(&profiles_dir);
        assert!(report.errors.is_empty(), "{:?}", report.errors);
        assert_eq!(report.set.len(), opts.profiles.len());
        let shared = SharedProfiles::new(report.set);
        let db_path = dir.0.join("data/gateway.db");
        let store = Arc::new(Store::open(&db_path).unwrap());
        let registry = Registry::open(store, shared).await.unwrap();
        let tokens = if opts.tokens { tokens() } else { Vec::new() };
        let mut state = ApiState::new(registry.clone(), &tokens);
        if opts.reload {
            let d = profiles_dir.clone();
            state = state.with_reload(move || profiles::load_dir(&d));
        }
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let shutdown = CancellationToken::new();
        let server = tokio::spawn(api::serve(
            listener,
            state,
            shutdown.clone().cancelled_owned(),
        ));
        Gateway {
            url,
            client: reqwest::Client::new(),
            registry,
            profiles_dir,
            db_path,
            shutdown,
            server,
            _dir: dir,
        }
    }

    fn anon(&self, method: Method, path: &str) -> RequestBuilder {
        self.client.request(method, format!("{}{path}", self.url))
    }

    fn admin(&self, method: Method, path: &str) -> RequestBuilder {
        self.anon(method, path).bearer_auth(ADMIN)
    }

    fn reader(&self, method: Method, path: &str) -> RequestBuilder {
        self.anon(method, path).bearer_auth(READER)
    }

    async fn put_device(&self, id: &str, body: Value) -> (StatusCode, Value) {
        send(
            self.admin(Method::PUT, &format!("/api/v1/devices/{id}"))
                .json(&body),
        )
        .await
    }

    /// Stops the server gracefully and checks it stopped cleanly.
    async fn stop(self) {
        self.shutdown.cancel();
        self.server.await.unwrap().unwrap();
    }
}

/// Sends and returns the status and the JSON body (Null when empty).
async fn send(request: RequestBuilder) -> (StatusCode, Value) {
    let response = request.send().await.unwrap();
    let status = response.status();
    let bytes = response.bytes().await.unwrap();
    let body = if bytes.is_empty() {
        Value::Null
    } else {
        serde_json::from_slice(&bytes)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(&bytes)))
    };
    (status, body)
}

/// The `field` of every error in an API error's `detail.errors`, sorted.
fn error_fields(body: &Value) -> Vec<String> {
    let mut fields: Vec<String> = body["detail"]["errors"]
        .as_array()
        .unwrap_or_else(|| panic!("no detail.errors in {body}"))
        .iter()
        .map(|e| e["field"].as_str().unwrap().to_owned())
        .collect();
    fields.sort();
    fields
}

fn ids(page: &Value) -> Vec<&str> {
    page["devices"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["id"].as_str().unwrap())
        .collect()
}

// ---------------------------------------------------------------------------------------
// Health
// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn health_and_readiness() {
    let _g = GATE.read().await;
    let gw = Gateway::start(Options::default()).await;
    let (status, body) = send(gw.anon(Method::GET, "/healthz")).await;
    assert_eq!((status, body), (StatusCode::OK, json!({"status": "ok"})));
    let (status, body) = send(gw.anon(Method::GET, "/readyz")).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        body,
        json!({"status": "ready", "checks": {
            "store": {"ok": true},
            "profiles": {"ok": true, "loaded": 2},
        }})
    );

    // A store that stops taking writes makes the gateway not ready, and says why.
    let store = Arc::clone(gw.registry.store());
    store
        .lock()
        .pragma_update(None, "query_only", true)
        .unwrap();
    let (status, body) = send(gw.anon(Method::GET, "/readyz")).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(body["status"], "not_ready");
    assert_eq!(body["checks"]["store"]["ok"], false);
    let error = body["checks"]["store"]["error"].as_str().unwrap();
    assert!(
        error.starts_with("the store does not take writes: "),
        "{error}"
    );
    assert_eq!(body["checks"]["profiles"]["ok"], true);
    store
        .lock()
        .pragma_update(None, "query_only", false)
        .unwrap();
    let (status, _) = send(gw.anon(Method::GET, "/readyz")).await;
    assert_eq!(status, StatusCode::OK);
    gw.stop().await;

    let gw = Gateway::start(Options {
        profiles: &[],
        ..Options::default()
    })
    .await;
    let (status, body) = send(gw.anon(Method::GET, "/readyz")).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(body["status"], "not_ready");
    assert_eq!(body["checks"]["store"], json!({"ok": true}));
    assert_eq!(body["checks"]["profiles"]["ok"], false);
    assert_eq!(
        body["checks"]["profiles"]["error"],
        "no device profile is loaded"
    );
    gw.stop().await;
}

// ---------------------------------------------------------------------------------------
// Devices
// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn device_crud_and_token_semantics() {
    let _g = GATE.read().await;
    let gw = Gateway::start(Options::default()).await;
    let id = "490154203237518";
    let path = format!("/api/v1/devices/{id}");

    // Create: 201 with Location, the token never echoed.
    let response = gw
        .admin(Method::PUT, &path)
        .json(&json!({"profile": "cover", "labels": {"district": "north"},
                      "params": {"depth_m": 2.5, "alarm": true, "kind": "deep"},
                      "token": "device-token-1"}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::CREATED);
    assert_eq!(response.headers()["location"], path.as_str());
    let created: Value = response.json().await.unwrap();
    let created_at = created["created_at"].as_str().unwrap().to_owned();
    assert!(
        created_at.ends_with('Z') && created_at.len() == 20,
        "{created_at}"
    );
    assert_eq!(
        created,
        json!({"id": id, "profile": "cover", "labels": {"district": "north"},
               "params": {"alarm": true, "depth_m": 2.5, "kind": "deep"},
               "has_token": true, "created_at": created_at, "updated_at": created_at})
    );

    // The hot path sees it at once.
    let device = gw.registry.lookup(id).unwrap();
    assert_eq!(device.profile(), "cover");
    assert_eq!(device.label("district"), Some("north"));
    assert_eq!(device.param("depth_m").and_then(|p| p.as_f64()), Some(2.5));
    assert!(gw.registry.verify_token(id, Some("device-token-1")));
    assert!(!gw.registry.verify_token(id, Some("device-token-2")));
    assert!(!gw.registry.verify_token(id, None));
    assert!(!gw.registry.verify_token("unknown", None));

    let (status, got) = send(gw.reader(Method::GET, &path)).await;
    assert_eq!((status, &got), (StatusCode::OK, &created));

    // Replace: 200; labels and params replaced whole; token kept when left out;
    // created_at kept.
    let (status, replaced) = gw
        .put_device(id, json!({"profile": "meter", "labels": {"site": "s1"}}))
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(replaced["profile"], "meter");
    assert_eq!(replaced["labels"], json!({"site": "s1"}));
    assert_eq!(replaced["params"], json!({}));
    assert_eq!(replaced["has_token"], true);
    assert_eq!(replaced["created_at"], created_at.as_str());
    assert!(gw.registry.verify_token(id, Some("device-token-1")));
    assert_eq!(gw.registry.lookup(id).unwrap().label("district"), None);

    // A GET body can be PUT back as is.
    let (status, _) = gw.put_device(id, replaced.clone()).await;
    assert_eq!(status, StatusCode::OK);

    // Create-only on an existing id: 409.
    let (status, body) = send(
        gw.admin(Method::PUT, &path)
            .header("if-none-match", "*")
            .json(&json!({"profile": "cover"})),
    )
    .await;
    assert_eq!(status, StatusCode::CONFLICT);
    assert_eq!(body["detail"], json!({"device": id}));

    // token: null removes it; then any uplink may speak for the device.
    let (_, body) = gw
        .put_device(id, json!({"profile": "meter", "token": null}))
        .await;
    assert_eq!(body["has_token"], false);
    assert!(gw.registry.verify_token(id, None));

    // Survives a restart: a new store and registry on the same file see the same device.
    let (_, before_restart) = send(gw.reader(Method::GET, &path)).await;
    let store2 = Arc::new(Store::open(&gw.db_path).unwrap());
    let reg2 = Registry::open(store2, gw.registry.profiles().clone())
        .await
        .unwrap();
    assert_eq!(
        serde_json::to_value(&*reg2.lookup(id).unwrap()).unwrap(),
        before_restart
    );

    // Delete: 204, then 404 for GET and DELETE.
    let (status, body) = send(gw.admin(Method::DELETE, &path)).await;
    assert_eq!((status, body), (StatusCode::NO_CONTENT, Value::Null));
    assert!(gw.registry.lookup(id).is_none());
    let (status, body) = send(gw.reader(Method::GET, &path)).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_eq!(
        body,
        json!({"error": format!("device `{id}` is not registered"), "detail": {"device": id}})
    );
    let (status, _) = send(gw.admin(Method::DELETE, &path)).await;
    assert_eq!(status, StatusCode::NOT_FOUND);

    // A device called "import" is reachable despite the import route.
    let (status, _) = gw.put_device("import", json!({"profile": "cover"})).await;
    assert_eq!(status, StatusCode::CREATED);
    let (status, body) = send(gw.reader(Method::GET, "/api/v1/devices/import")).await;
    assert_eq!(
        (status, body["id"].as_str()),
        (StatusCode::OK, Some("import"))
    );
    let (status, _) = send(gw.admin(Method::DELETE, "/api/v1/devices/import")).await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    gw.stop().await;
}

#[tokio::test]
async fn list_filters_and_paging() {
    let _g = GATE.read().await;
    let gw = Gateway::start(Options::default()).await;
    for (id, profile, labels) in [
        ("a1", "cover", json!({"district": "north"})),
        ("a2", "cover", json!({"district": "south"})),
        ("a3", "meter", json!({"district": "north"})),
        ("a4", "meter", json!({"district": "north", "site": "x"})),
    ] {
        let (status, _) = gw
            .put_device(id, json!({"profile": profile, "labels": labels}))
            .await;
        assert_eq!(status, StatusCode::CREATED);
    }
    let list = |query: &'static str| {
        let r = gw.reader(Method::GET, &format!("/api/v1/devices{query}"));
        async move { send(r).await }
    };
    let (status, page) = list("").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(ids(&page), ["a1", "a2", "a3", "a4"]);
    assert_eq!(
        (page["total"].as_u64(), page["limit"].as_u64()),
        (Some(4), Some(100))
    );

    let (_, page) = list("?profile=cover").await;
    assert_eq!(
        (ids(&page), page["total"].as_u64()),
        (vec!["a1", "a2"], Some(2))
    );
    let (_, page) = list("?label.district=north").await;
    assert_eq!(ids(&page), ["a1", "a3", "a4"]);
    let (_, page) = list("?profile=meter&label.district=north&label.site=x").await;
    assert_eq!(ids(&page), ["a4"]);
    let (_, page) = list("?label.district=east").await;
    assert_eq!((ids(&page).len(), page["total"].as_u64()), (0, Some(0)));
    let (_, page) = list("?limit=2").await;
    assert_eq!(
        (ids(&page), page["total"].as_u64()),
        (vec!["a1", "a2"], Some(4))
    );
    let (_, page) = list("?limit=2&offset=2").await;
    assert_eq!(ids(&page), ["a3", "a4"]);

    for (query, needle) in [
        ("?limit=0", "limit must be"),
        ("?limit=1001", "limit must be"),
        ("?offset=-1", "offset must be"),
        ("?colour=red", "unknown query parameter `colour`"),
        ("?label.Bad=x", "not a label name"),
    ] {
        let (status, body) = list(query).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{query}");
        assert!(
            body["error"].as_str().unwrap().contains(needle),
            "{query}: {body}"
        );
    }

    // Per-profile counts show in the profile list.
    let (_, profiles) = send(gw.reader(Method::GET, "/api/v1/profiles")).await;
    let counts: Vec<(&str, u64)> = profiles
        .as_array()
        .unwrap()
        .iter()
        .map(|p| (p["name"].as_str().unwrap(), p["devices"].as_u64().unwrap()))
        .collect();
    assert_eq!(counts, [("cover", 2), ("meter", 2)]);
    let by_profile = gw.registry.count_by_profile();
    assert_eq!(by_profile.get("cover"), Some(&2));
    gw.stop().await;
}

#[tokio::test]
async fn auth_roles() {
    let _g = GATE.read().await;
    let gw = Gateway::start(Options::default()).await;

    let response = gw
        .anon(Method::GET, "/api/v1/devices")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
    assert_eq!(
        response.headers()["www-authenticate"],
        r#"Bearer realm="nbiot-gateway""#
    );
    let body: Value = response.json().await.unwrap();
    assert_eq!(
        body,
        json!({"error": "this endpoint needs an `Authorization: Bearer <token>` header",
               "detail": null})
    );

    let response = gw
        .anon(Method::GET, "/api/v1/devices")
        .bearer_auth("wrong-token")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
    assert!(response.headers()["www-authenticate"]
        .to_str()
        .unwrap()
        .contains(r#"error="invalid_token""#));

    // Read role: GETs and test decodes, not writes.
    let (status, _) = send(gw.reader(Method::GET, "/api/v1/devices")).await;
    assert_eq!(status, StatusCode::OK);
    let (status, _) = send(gw.reader(Method::GET, "/api/v1/profiles")).await;
    assert_eq!(status, StatusCode::OK);
    let (status, _) = send(gw.reader(Method::POST, "/api/v1/profiles/cover/decode")).await;
    assert_eq!(
        status,
        StatusCode::UNPROCESSABLE_ENTITY,
        "empty payload, but allowed"
    );
    for (method, path) in [
        (Method::PUT, "/api/v1/devices/x1"),
        (Method::DELETE, "/api/v1/devices/x1"),
        (Method::POST, "/api/v1/devices/import"),
        (Method::POST, "/api/v1/profiles/reload"),
    ] {
        let (status, body) = send(
            gw.reader(method.clone(), path)
                .json(&json!({"profile": "cover"})),
        )
        .await;
        assert_eq!(status, StatusCode::FORBIDDEN, "{method} {path}");
        assert_eq!(
            body,
            json!({"error": "this request needs the admin role",
                   "detail": {"needed_role": "admin"}})
        );
    }
    assert!(gw.registry.lookup("x1").is_none());
    let (status, _) = gw.put_device("x1", json!({"profile": "cover"})).await;
    assert_eq!(status, StatusCode::CREATED);

    // Probes need no token.
    let (status, _) = send(gw.anon(Method::GET, "/healthz")).await;
    assert_eq!(status, StatusCode::OK);
    gw.stop().await;

    // Without tokens the API is open...
    let gw = Gateway::start(Options {
        tokens: false,
        ..Options::default()
    })
    .await;
    let (status, _) = send(
        gw.anon(Method::PUT, "/api/v1/devices/x1")
            .json(&json!({"profile": "cover"})),
    )
    .await;
    assert_eq!(status, StatusCode::CREATED);
    let registry = gw.registry.clone();
    gw.stop().await;

    // ...and therefore refuses to serve anywhere but loopback.
    let listener = tokio::net::TcpListener::bind("0.0.0.0:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let open = ApiState::new(registry.clone(), &[]);
    match api::serve(listener, open, std::future::pending()).await {
        Err(ServeError::OpenOnPublicAddress { addr: a }) => assert_eq!(a, addr),
        other => panic!("expected a refusal, got {other:?}"),
    }
    assert!(api::check_listen(addr, &[]).is_err());
    assert!(api::check_listen(addr, &tokens()).is_ok());
    assert!(api::check_listen("127.0.0.1:8080".parse().unwrap(), &[]).is_ok());
}

#[tokio::test]
async fn validation_errors_name_the_field() {
    let _g = GATE.read().await;
    let gw = Gateway::start(Options::default()).await;

    let (status, body) = gw.put_device("bad%20id", json!({"profile": "cover"})).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(
        body["detail"]["errors"],
        json!([{"field": "id",
                "message": "contains ' '; a device id uses only A-Z a-z 0-9 . _ : -"}])
    );

    let (status, body) = gw
        .put_device("490154203237519", json!({"profile": "cover"}))
        .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    assert!(body["detail"]["errors"][0]["message"]
        .as_str()
        .unwrap()
        .contains("check digit"));

    let (status, body) = gw
        .put_device(
            "d1",
            json!({"profile": "nope", "labels": {"District": "x", "ok": ""},
                   "params": {"x": [1], "y": null, "Z": 1}, "token": "short", "colour": 1}),
        )
        .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    // Shape errors (types, unknown members) are reported before content errors.
    assert_eq!(error_fields(&body), ["colour", "params.x", "params.y"]);

    let (status, body) = gw
        .put_device(
            "d1",
            json!({"profile": "nope", "labels": {"District": "x", "ok": ""},
                   "params": {"Z": 1}, "token": "short"}),
        )
        .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(
        error_fields(&body),
        [
            "labels.District",
            "labels.ok",
            "params.Z",
            "profile",
            "token"
        ]
    );
    let profile_error = body["detail"]["errors"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["field"] == "profile")
        .unwrap();
    assert_eq!(profile_error["message"], "unknown profile `nope`");
    assert!(body["error"]
        .as_str()
        .unwrap()
        .starts_with("invalid device: "));

    let (status, body) = gw.put_device("d1", json!({"labels": {}})).await;
    assert_eq!(
        (status, error_fields(&body)),
        (StatusCode::UNPROCESSABLE_ENTITY, vec!["profile".to_owned()])
    );

    let (status, body) = send(
        gw.admin(Method::PUT, "/api/v1/devices/d1")
            .header("content-type", "application/json")
            .body("{\"profile\":"),
    )
    .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(body["error"]
        .as_str()
        .unwrap()
        .starts_with("the body is not valid JSON"));

    let big = json!({"profile": "cover", "labels": {"x": "y".repeat(70_000)}});
    let (status, body) = gw.put_device("d1", big).await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(body["detail"], json!({"limit_bytes": 65536}));

    let (status, body) = send(gw.reader(Method::GET, "/api/v2/nothing")).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_eq!(body["error"], "no such endpoint: GET /api/v2/nothing");
    let (status, body) = send(gw.admin(Method::PATCH, "/api/v1/devices/d1")).await;
    assert_eq!(status, StatusCode::METHOD_NOT_ALLOWED);
    assert_eq!(body["error"], "PATCH is not allowed on /api/v1/devices/d1");

    assert!(gw.registry.is_empty());
    gw.stop().await;
}

// ---------------------------------------------------------------------------------------
// CSV import
// ---------------------------------------------------------------------------------------

const MIXED_CSV: &str = "\
device,profile,label:district,param:depth_m,token
dev-1,cover,north,2.5,device-token-1
bad id,cover,north,1,
dev-3,nope,north,1,
dev-4,cover,north,2.5m,
dev-1,cover,south,1,
dev-6,cover,north
\"dev-7\",meter,\"quoted, district\",3,
";

/// (line, column) of every reported row error.
fn row_errors(report: &Value) -> Vec<(u64, Option<String>, String)> {
    report["errors"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            (
                e["line"].as_u64().unwrap(),
                e["column"].as_str().map(str::to_owned),
                e["message"].as_str().unwrap().to_owned(),
            )
        })
        .collect()
}

fn expected_mixed_errors() -> Vec<(u64, Option<String>, String)> {
    let s = |x: &str| x.to_owned();
    vec![
        (3, Some(s("device")), s("contains ' '; a device id uses only A-Z a-z 0-9 . _ : -")),
        (4, Some(s("profile")), s("unknown profile `nope`")),
        (
            5,
            Some(s("param:depth_m")),
            s("`2.5m` starts like a number but is not one (use a plain decimal number such as 2.5)"),
        ),
        (6, Some(s("device")), s("duplicate device id (first on line 2)")),
        (7, None, s("has 3 columns, the header has 5")),
    ]
}

async fn import(gw: &Gateway, query: &str, csv: impl Into<reqwest::Body>) -> (StatusCode, Value) {
    send(
        gw.admin(Method::POST, &format!("/api/v1/devices/import{query}"))
            .header("content-type", "text/csv")
            .body(csv),
    )
    .await
}

#[tokio::test]
async fn csv_import_all_or_nothing_then_partial() {
    let _g = GATE.read().await;
    let gw = Gateway::start(Options::default()).await;

    // All or nothing (the default): every bad row reported, nothing imported.
    let (status, body) = import(&gw, "", MIXED_CSV).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(
        body["error"],
        "5 of 7 row(s) are invalid; nothing was imported"
    );
    let report = &body["detail"];
    assert_eq!(row_errors(report), expected_mixed_errors());
    assert_eq!(
        (&report["rows"], &report["imported"], &report["rejected"]),
        (&json!(7), &json!(0), &json!(5))
    );
    assert_eq!(report["errors"][0]["device"], "bad id");
    assert!(gw.registry.is_empty());
    let (_, page) = send(gw.reader(Method::GET, "/api/v1/devices")).await;
    assert_eq!(page["total"], 0);

    // Partial: the good rows go in, the same bad rows are reported.
    let (status, report) = import(&gw, "?partial=true", MIXED_CSV).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(row_errors(&report), expected_mixed_errors());
    assert_eq!(
        (
            &report["rows"],
            &report["imported"],
            &report["created"],
            &report["updated"],
            &report["rejected"]
        ),
        (&json!(7), &json!(2), &json!(2), &json!(0), &json!(5))
    );
    let d1 = gw.registry.lookup("dev-1").unwrap();
    assert_eq!(d1.label("district"), Some("north"));
    assert_eq!(d1.param("depth_m").and_then(|p| p.as_f64()), Some(2.5));
    assert!(gw.registry.verify_token("dev-1", Some("device-token-1")));
    let d7 = gw.registry.lookup("dev-7").unwrap();
    assert_eq!(d7.label("district"), Some("quoted, district"));
    assert!(!d7.has_token());
    assert_eq!(gw.registry.len(), 2);

    // Re-import replaces; an empty token cell keeps the token; CRLF and a BOM are fine.
    let csv = "\u{feff}device,profile,label:site,token\r\ndev-1,meter,s9,\r\ndev-8,cover,,\r\n";
    let (status, report) = import(&gw, "", csv).await;
    assert_eq!(status, StatusCode::OK, "{report}");
    assert_eq!(
        (&report["created"], &report["updated"]),
        (&json!(1), &json!(1))
    );
    let d1 = gw.registry.lookup("dev-1").unwrap();
    assert_eq!(
        (d1.profile(), d1.label("site"), d1.label("district")),
        ("meter", Some("s9"), None)
    );
    assert!(gw.registry.verify_token("dev-1", Some("device-token-1")));

    // A bad header refuses the file even with partial=true.
    let (status, body) = import(&gw, "?partial=true", "device,profile,colour\nx,cover,red\n").await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(
        row_errors(&body["detail"]),
        [(
            1,
            Some("colour".to_owned()),
            "is not a device field (expected device, profile, token, label:<key> or param:<key>)"
                .to_owned()
        )]
    );
    let (status, body) = import(&gw, "", "").await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(body["detail"]["errors"][0]["line"], 1);
    let (status, body) = import(&gw, "", vec![0xff, 0xfe, b'\n']).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(body["error"].as_str().unwrap().contains("not UTF-8"));
    let (status, _) = import(&gw, "?partial=maybe", "device,profile\n").await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(gw.registry.len(), 3);
    gw.stop().await;
}

// ---------------------------------------------------------------------------------------
// Profiles
// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn profiles_list_show_and_decode_errors() {
    let _g = GATE.read().await;
    let gw = Gateway::start(Options::default()).await;

    let (status, list) = send(gw.reader(Method::GET, "/api/v1/profiles")).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        list,
        json!([
            {"name": "cover", "description": "cover test profile", "measurement": "cover_m",
             "codec": "dragino", "devices": 0},
            {"name": "meter", "description": "meter test profile", "measurement": "meter_m",
             "codec": "dragino", "devices": 0},
        ])
    );
    let (status, profile) = send(gw.reader(Method::GET, "/api/v1/profiles/cover")).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        (&profile["name"], &profile["measurement"], &profile["codec"]),
        (&json!("cover"), &json!("cover_m"), &json!("dragino"))
    );
    let (status, body) = send(gw.reader(Method::GET, "/api/v1/profiles/nope")).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_eq!(
        body,
        json!({"error": "profile `nope` is not loaded", "detail": {"profile": "nope"}})
    );

    // Decode errors: 422 with the DecodeError code (what the codec says about an empty
    // payload is the codec's business; the code is one of the closed set).
    let (status, body) = send(gw.reader(Method::POST, "/api/v1/profiles/cover/decode")).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(body["detail"]["profile"], "cover");
    let code = body["detail"]["code"].as_str().unwrap();
    assert!(nbiot_codecs::DecodeError::CODES.contains(&code), "{code}");

    // {"hex": …} with a bad hex digit: the hex decoder's error, offset included.
    let (status, body) = send(
        gw.reader(Method::POST, "/api/v1/profiles/cover/decode")
            .json(&json!({"hex": "0a zz"})),
    )
    .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(
        body["detail"],
        json!({"code": "encoding", "profile": "cover", "offset": 3})
    );
    let (status, body) = send(
        gw.reader(Method::POST, "/api/v1/profiles/cover/decode")
            .json(&json!({"hex": 5})),
    )
    .await;
    assert_eq!(
        (status, error_fields(&body)),
        (StatusCode::UNPROCESSABLE_ENTITY, vec!["hex".to_owned()])
    );
    let (status, _) = send(
        gw.reader(Method::POST, "/api/v1/profiles/cover/decode")
            .header("content-type", "application/json")
            .body("{"),
    )
    .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    let (status, body) = send(
        gw.reader(Method::POST, "/api/v1/profiles/cover/decode")
            .body(vec![0u8; 70_000]),
    )
    .await;
    assert_eq!(
        (status, &body["detail"]),
        (
            StatusCode::PAYLOAD_TOO_LARGE,
            &json!({"limit_bytes": 65536})
        )
    );
    let (status, _) = send(
        gw.reader(Method::POST, "/api/v1/profiles/nope/decode")
            .body("00"),
    )
    .await;
    assert_eq!(status, StatusCode::NOT_FOUND);

    // Whatever a payload decodes to, a 200 is a JSON array of readings.
    let (status, body) = send(
        gw.reader(Method::POST, "/api/v1/profiles/cover/decode")
            .json(&json!({"hex": "00"})),
    )
    .await;
    assert!(
        (status == StatusCode::OK && body.is_array())
            || (status == StatusCode::UNPROCESSABLE_ENTITY && body["detail"]["code"].is_string()),
        "{status} {body}"
    );
    gw.stop().await;
}

#[tokio::test]
async fn reload_merges_and_keeps_failed_profiles() {
    let _g = GATE.read().await;
    let gw = Gateway::start(Options {
        profiles: &["cover", "meter", "gone"],
        ..Options::default()
    })
    .await;
    let (status, _) = gw.put_device("on-gone", json!({"profile": "gone"})).await;
    assert_eq!(status, StatusCode::CREATED);

    // cover edited, meter broken, gone deleted, fresh added.
    write_profile(&gw.profiles_dir, "cover", "cover v2");
    std::fs::write(gw.profiles_dir.join("meter.toml"), "name = \n").unwrap();
    std::fs::remove_file(gw.profiles_dir.join("gone.toml")).unwrap();
    write_profile(&gw.profiles_dir, "fresh", "fresh profile");

    let (status, body) = send(gw.admin(Method::POST, "/api/v1/profiles/reload")).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{body}");
    assert_eq!(
        body["error"],
        "1 profile file(s) failed to load; the previous version of each stays in force"
    );
    let outcome = &body["detail"];
    assert_eq!(outcome["loaded"], json!(["cover", "fresh"]));
    assert_eq!(outcome["kept"], json!(["meter"]));
    assert_eq!(outcome["removed"], json!(["gone"]));
    assert_eq!(outcome["devices_without_profile"], json!({"gone": 1}));
    let errors = outcome["errors"].as_array().unwrap();
    assert!(!errors.is_empty());
    assert!(errors
        .iter()
        .all(|e| e["file"].as_str().unwrap().ends_with("meter.toml")));

    let (_, cover) = send(gw.reader(Method::GET, "/api/v1/profiles/cover")).await;
    assert_eq!(cover["description"], "cover v2");
    let (status, meter) = send(gw.reader(Method::GET, "/api/v1/profiles/meter")).await;
    assert_eq!(
        (status, &meter["description"]),
        (StatusCode::OK, &json!("meter test profile"))
    );
    let (status, _) = send(gw.reader(Method::GET, "/api/v1/profiles/gone")).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let (status, _) = send(gw.reader(Method::GET, "/api/v1/profiles/fresh")).await;
    assert_eq!(status, StatusCode::OK);
    // The device stays registered; new registrations need a profile in force.
    assert_eq!(gw.registry.lookup("on-gone").unwrap().profile(), "gone");
    let (status, _) = gw.put_device("on-gone-2", json!({"profile": "gone"})).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);

    // Fixed: a clean reload is a 200.
    write_profile(&gw.profiles_dir, "meter", "meter v2");
    let (status, outcome) = send(gw.admin(Method::POST, "/api/v1/profiles/reload")).await;
    assert_eq!(status, StatusCode::OK, "{outcome}");
    assert_eq!(
        outcome,
        json!({"loaded": ["cover", "fresh", "meter"], "kept": [], "removed": [],
               "devices_without_profile": {}, "errors": []})
    );
    let (_, meter) = send(gw.reader(Method::GET, "/api/v1/profiles/meter")).await;
    assert_eq!(meter["description"], "meter v2");
    gw.stop().await;

    // No reload callback: 501.
    let gw = Gateway::start(Options {
        reload: false,
        ..Options::default()
    })
    .await;
    let (status, _) = send(gw.admin(Method::POST, "/api/v1/profiles/reload")).await;
    assert_eq!(status, StatusCode::NOT_IMPLEMENTED);
    gw.stop().await;
}

// ---------------------------------------------------------------------------------------
// CLI client
// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn cli_devices_against_a_running_gateway() {
    let _g = GATE.read().await;
    let gw = Gateway::start(Options::default()).await;
    let admin = || Some(ADMIN.to_owned());
    let add = |id: &str, replace: bool| DevicesCommand::Add {
        id: id.to_owned(),
        profile: "cover".into(),
        labels: vec!["district=north".into()],
        params: vec!["depth_m=2.5".into(), "deep=true".into()],
        token: Some("device-token-1".into()),
        replace,
    };

    run_async(add("490154203237518", false), &gw.url, admin())
        .await
        .unwrap();
    let d = gw.registry.lookup("490154203237518").unwrap();
    assert_eq!(d.label("district"), Some("north"));
    assert_eq!(d.param("depth_m").and_then(|p| p.as_f64()), Some(2.5));
    assert!(gw.registry.verify_token(d.id(), Some("device-token-1")));

    let e = run_async(add("490154203237518", false), &gw.url, admin())
        .await
        .unwrap_err();
    assert_eq!(
        e.to_string(),
        "device 490154203237518 is already registered (use --replace to overwrite it)"
    );
    run_async(add("490154203237518", true), &gw.url, admin())
        .await
        .unwrap();

    let e = run_async(
        DevicesCommand::Add {
            id: "x1".into(),
            profile: "cover".into(),
            labels: vec![],
            params: vec!["depth_m=2.5m".into()],
            token: None,
            replace: false,
        },
        &gw.url,
        admin(),
    )
    .await
    .unwrap_err();
    assert!(e.to_string().starts_with("--param depth_m: `2.5m`"), "{e}");

    run_async(
        DevicesCommand::List {
            profile: Some("cover".into()),
            labels: vec!["district=north".into()],
            limit: None,
        },
        &gw.url,
        Some(READER.to_owned()),
    )
    .await
    .unwrap();

    let dir = TempDir::new("cli");
    let good = dir.0.join("good.csv");
    std::fs::write(&good, "device,profile\nc1,cover\nc2,meter\n").unwrap();
    run_async(
        DevicesCommand::Import {
            file: good,
            partial: false,
        },
        &gw.url,
        admin(),
    )
    .await
    .unwrap();
    assert_eq!(gw.registry.len(), 3);

    let bad = dir.0.join("bad.csv");
    std::fs::write(&bad, "device,profile\nc3,cover\nc4,nope\n").unwrap();
    let import_bad = |partial| DevicesCommand::Import {
        file: bad.clone(),
        partial,
    };
    let e = run_async(import_bad(false), &gw.url, admin())
        .await
        .unwrap_err();
    assert!(
        e.to_string()
            .ends_with("1 of 2 row(s) are invalid; nothing was imported (HTTP 422) (--partial imports the good rows)"),
        "{e}"
    );
    assert!(gw.registry.lookup("c3").is_none());
    let e = run_async(import_bad(true), &gw.url, admin())
        .await
        .unwrap_err();
    assert!(e.to_string().starts_with("1 of 2 row(s) in "), "{e}");
    assert!(gw.registry.lookup("c3").is_some());

    run_async(DevicesCommand::Remove { id: "c3".into() }, &gw.url, admin())
        .await
        .unwrap();
    let e = run_async(DevicesCommand::Remove { id: "c3".into() }, &gw.url, admin())
        .await
        .unwrap_err();
    assert_eq!(e.to_string(), "device `c3` is not registered (HTTP 404)");

    let e = run_async(DevicesCommand::Remove { id: "c1".into() }, &gw.url, None)
        .await
        .unwrap_err();
    assert!(
        e.to_string().ends_with("(HTTP 401); set NBIOT_TOKEN"),
        "{e}"
    );
    let url = gw.url.clone();
    gw.stop().await;
    let e = run_async(DevicesCommand::Remove { id: "c1".into() }, &url, admin())
        .await
        .unwrap_err();
    assert!(
        e.to_string()
            .starts_with(&format!("cannot reach the gateway at {url}")),
        "{e}"
    );
}

// ---------------------------------------------------------------------------------------
// Scale
// ---------------------------------------------------------------------------------------

fn vm_rss_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

#[tokio::test]
async fn import_100k_devices() {
    const N: usize = 100_000;
    let _g = GATE.write().await;
    let gw = Gateway::start(Options::default()).await;

    // Two labels (16 districts, 1000 sites), one param, a token on every tenth device.
    let mut csv = String::with_capacity(N * 64);
    csv.push_str("device,profile,label:district,label:site,param:depth_m,token\n");
    for i in 0..N {
        let profile = if i % 2 == 0 { "cover" } else { "meter" };
        let token = if i % 10 == 0 {
            format!("device-token-{i:08}")
        } else {
            String::new()
        };
        csv.push_str(&format!(
            "dev-{i:06},{profile},district-{},site-{},{},{token}\n",
            i % 16,
            i % 1000,
            1.0 + (i % 30) as f64 / 10.0
        ));
    }
    let csv_bytes = csv.len();

    let started = Instant::now();
    let (status, report) = import(&gw, "", csv).await;
    let import_elapsed = started.elapsed();
    assert_eq!(status, StatusCode::OK, "{}", report["error"]);
    assert_eq!(
        (&report["imported"], &report["created"], &report["rejected"]),
        (&json!(N), &json!(N), &json!(0))
    );
    assert_eq!(gw.registry.len(), N);
    assert!(gw
        .registry
        .verify_token("dev-050000", Some("device-token-00050000")));
    assert_eq!(
        gw.registry.lookup("dev-099999").unwrap().label("site"),
        Some("site-999")
    );
    let (_, page) = send(gw.reader(
        Method::GET,
        "/api/v1/devices?label.district=district-3&limit=5",
    ))
    .await;
    assert_eq!(page["total"], N / 16);
    assert_eq!(ids(&page).len(), 5);

    // Memory of the in-memory index: load it again from the database.
    let heap_before = LIVE_HEAP.load(Ordering::Relaxed);
    let rss_before = vm_rss_bytes();
    let started = Instant::now();
    let reloaded = Registry::open(
        Arc::clone(gw.registry.store()),
        gw.registry.profiles().clone(),
    )
    .await
    .unwrap();
    let load_elapsed = started.elapsed();
    let heap_after = LIVE_HEAP.load(Ordering::Relaxed);
    let rss_after = vm_rss_bytes();
    assert_eq!(reloaded.len(), N);
    let heap_per_device = (heap_after - heap_before) as f64 / N as f64;
    let rss_per_device = match (rss_before, rss_after) {
        (Some(b), Some(a)) => Some((a as f64 - b as f64) / N as f64),
        _ => None,
    };
    eprintln!(
        "import_100k: {N} devices, {csv_bytes} bytes of CSV, imported in {import_elapsed:?} \
         (HTTP + parse + validate + one transaction); index loaded from the database in \
         {load_elapsed:?}; heap {heap_per_device:.0} bytes/device; RSS {} bytes/device",
        rss_per_device.map_or("n/a".to_owned(), |r| format!("{r:.0}"))
    );
    // Sanity bounds only (no timing asserts): a device is more than its id and far less
    // than a few KiB.
    assert!(
        heap_per_device > 16.0 && heap_per_device < 2048.0,
        "{heap_per_device}"
    );
    drop(reloaded);
    gw.stop().await;
}
