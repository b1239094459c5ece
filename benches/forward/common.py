import subprocess, time, sqlite3, os, json, socket, shutil, re, threading, sys
# Forwarding measurements of issue #5 (BENCHMARKS.md): a real gateway, VictoriaMetrics and
# nbiot-load. Build first: `cargo build --release --bins`. BIN / OUT override the paths.
_REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BIN = os.environ.get("BIN", os.path.join(os.environ.get("CARGO_TARGET_DIR", os.path.join(_REPO, "target")), "release"))
ROOT = os.environ.get("OUT", "/tmp/nbiot-forward-bench")
PROFILES = os.path.join(_REPO, "device-profiles")

def free_port(kind=socket.SOCK_STREAM):
    s = socket.socket(socket.AF_INET, kind); s.bind(("127.0.0.1", 0)); p = s.getsockname()[1]; s.close(); return p

def http_ok(port, path="/health"):
    try:
        s = socket.create_connection(("127.0.0.1", port), timeout=1)
        s.sendall(f"GET {path} HTTP/1.0\r\n\r\n".encode()); d = s.recv(100); s.close()
        return b" 200 " in d
    except OSError:
        return False

class Vm:
    def __init__(self, data, port=None):
        self.data, self.port, self.p = data, port or free_port(), None
    def start(self):
        self.p = subprocess.Popen(["/usr/bin/victoria-metrics", f"-storageDataPath={self.data}",
            f"-httpListenAddr=127.0.0.1:{self.port}", "-dedup.minScrapeInterval=1ms", "-retentionPeriod=100y",
            "-loggerLevel=ERROR"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        while not http_ok(self.port): time.sleep(0.05)
        return self
    def stop(self):
        self.p.terminate(); self.p.wait()
    def url(self): return f"http://127.0.0.1:{self.port}"

class Gw:
    def __init__(self, dirpath, coap_port, influx_url=None, extra=""):
        self.dir = dirpath
        os.makedirs(dirpath, exist_ok=True)
        self.db = f"{dirpath}/data/gateway.db"
        cfg = (f'[coap]\nlisten = "127.0.0.1:{coap_port}"\n[http]\nlisten = "127.0.0.1:0"\n[mqtt]\nmode = "off"\n'
               f'[store]\npath = "{self.db}"\n[profiles]\ndir = "{PROFILES}"\n')
        if influx_url:
            cfg += f'[influxdb]\nurl = "{influx_url}"\norg = "city"\nbucket = "nbiot"\n{extra}'
        open(f"{dirpath}/gateway.toml", "w").write(cfg)
        self.p = subprocess.Popen([f"{BIN}/nbiot-gateway", "run", "--config", f"{dirpath}/gateway.toml"],
            stderr=subprocess.PIPE, text=True, env=dict(os.environ, RUST_LOG="info"))
        self.log = []
        for line in self.p.stderr:
            self.log.append(line)
            if "Gateway running." in line:
                self.running_at = time.time()
                self.http = re.search(r"http=(\S+)", line).group(1)
                self.coap = re.search(r"coap=(\S+)", line).group(1)
                break
        threading.Thread(target=self._drain, daemon=True).start()
    def _drain(self):
        for line in self.p.stderr: self.log.append(line)
    def stop(self):
        self.p.terminate(); self.p.wait()
    def rss_kb(self):
        for l in open(f"/proc/{self.p.pid}/status"):
            if l.startswith("VmRSS:"): return int(l.split()[1])

def q(db, sql):
    c = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=10)
    try: return c.execute(sql).fetchone()[0]
    finally: c.close()

def backlog(db):
    return q(db, "SELECT coalesce((SELECT max(id) FROM readings),0) - coalesce((SELECT reading_id FROM forward_cursor WHERE name='influxdb'),0)")

def load(gw, *args):
    return subprocess.Popen([f"{BIN}/nbiot-load", "--coap", gw.coap, "--api", f"http://{gw.http}", "--json", "--gateway-pid", str(gw.p.pid), *args],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
