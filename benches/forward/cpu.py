import os, sys; sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import *
def cpu(pid):
    f = open(f"/proc/{pid}/stat").read().rsplit(")",1)[1].split()
    return (int(f[11]) + int(f[12])) / 100
D = f"{ROOT}/tp"; coap = free_port(socket.SOCK_DGRAM)
db = f"{D}/gw/data/gateway.db"; n = q(db, "SELECT count(*) FROM readings")
for extra in ["", "gzip = false\n"]:
  for run in range(2):
    c = sqlite3.connect(db); c.execute("DELETE FROM forward_cursor"); c.commit(); c.close()
    shutil.rmtree(f"{D}/vm", ignore_errors=True)
    vm = Vm(f"{D}/vm").start()
    g = Gw(f"{D}/gw", coap, vm.url(), extra)
    t0 = g.running_at; c0 = cpu(g.p.pid); v0 = cpu(vm.p.pid)
    while backlog(g.db) > 0: time.sleep(0.02)
    t = time.time() - t0; c1 = cpu(g.p.pid); v1 = cpu(vm.p.pid)
    print(f"{extra.strip() or 'gzip'} run {run}: {n/t:.0f} lines/s; gateway cpu {c1-c0:.2f}s ({(c1-c0)/n*1e6:.2f} us/line), vm cpu {v1-v0:.2f}s; wall {t:.2f}s", flush=True)
    g.stop(); vm.stop()
