# Points/s forwarded to VictoriaMetrics: a store holding a backlog, the gateway started with
# [influxdb] and no ingest; time from "Gateway running." until the cursor reaches max(id).
import os, sys; sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import *
D = f"{ROOT}/tp"; shutil.rmtree(D, ignore_errors=True); os.makedirs(D)
coap = free_port(socket.SOCK_DGRAM)
rate, dur = sys.argv[1], sys.argv[2]
gw = Gw(f"{D}/gw", coap)
l = load(gw, "--register", "--devices", "2000", "--rate", rate, "--duration", dur)
out, err = l.communicate(); print("fill:", out.strip()[:400], err[-300:])
gw.stop()
n = q(gw.db, "SELECT count(*) FROM readings"); fields = q(gw.db, "SELECT sum((SELECT count(*) FROM json_each(fields) WHERE type != 'text')) FROM readings")
print(f"readings {n}, numeric/bool fields {fields}")
extra = sys.argv[3] if len(sys.argv) > 3 else ""
for run in range(3):
    c = sqlite3.connect(gw.db); c.execute("DELETE FROM forward_cursor"); c.commit(); c.close()
    shutil.rmtree(f"{D}/vm", ignore_errors=True)
    vm = Vm(f"{D}/vm").start()
    g = Gw(f"{D}/gw", coap, vm.url(), extra)
    t0 = g.running_at
    while backlog(g.db) > 0: time.sleep(0.02)
    t = time.time() - t0
    print(f"run {run}: {n} lines in {t:.2f}s = {n/t:.0f} lines/s, {fields/t:.0f} numeric fields/s; rss {g.rss_kb()} kB", flush=True)
    g.stop(); vm.stop()
