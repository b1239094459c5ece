# Drain after a TSDB outage at a steady ingest rate, and the gateway's RSS during the outage.
# usage: outage.py RATE OUTAGE_S [BEFORE_S AFTER_S]   (defaults 30 and 150)
import os, sys, statistics; sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import *
rate, outage = int(sys.argv[1]), int(sys.argv[2])
before, after = (int(sys.argv[3]), int(sys.argv[4])) if len(sys.argv) > 4 else (30, 150)
D = f"{ROOT}/outage"; shutil.rmtree(D, ignore_errors=True); os.makedirs(D)
vm = Vm(f"{D}/vm").start()
gw = Gw(f"{D}/gw", free_port(socket.SOCK_DGRAM), vm.url())
ld = load(gw, "--register", "--devices", "5000", "--rate", str(rate), "--duration", str(before + outage + after))
t0 = time.time(); samples = []; events = {}
def cur(): return q(gw.db, "SELECT coalesce((SELECT reading_id FROM forward_cursor WHERE name='influxdb'),0)")
def maxid(): return q(gw.db, "SELECT coalesce(max(id),0) FROM readings")
while ld.poll() is None:
    t = time.time() - t0
    if "down" not in events and t >= before: vm.stop(); events["down"] = t
    if "up" not in events and t >= before + outage: vm.start(); events["up"] = time.time() - t0
    try: samples.append((time.time() - t0, cur(), maxid(), gw.rss_kb()))
    except Exception as e: pass
    time.sleep(0.5)
out, err = ld.communicate()
s = json.loads(out)
print("load:", {k: s[k] for k in ["acked", "acked_per_second", "codes"]}, "p99 ack ms", s["ack_latency_ms"]["p99"])
up = events["up"]; lines_per_s = rate * 6
pre = [x for x in samples if x[0] < events["down"]]
during = [x for x in samples if events["down"] + 5 <= x[0] < up]
print(f"RSS kB before outage: median {statistics.median(r for *_, r in pre):.0f}; during outage: start {during[0][3]}, median {statistics.median(r for *_, r in during):.0f}, max {max(r for *_, r in during)}, end {during[-1][3]}")
print("RSS during outage every 15 s:", [r for (t, c, m, r) in during][::30])
at_up = min((x for x in samples if x[0] >= up), key=lambda x: x[0])
b0 = at_up[2] - at_up[1]
first = next(x for x in samples if x[0] >= up and x[1] > at_up[1])
caught = next((x for x in samples if x[0] > first[0] and x[2] - x[1] < lines_per_s), None)
print(f"backlog at TSDB restart: {b0} readings ({b0/lines_per_s:.0f} s of ingest); first write after restart +{first[0]-up:.1f}s")
if caught:
    dt = caught[0] - first[0]
    gross = (caught[1] - first[1]) / dt
    print(f"caught up after {dt:.1f}s of draining (+{caught[0]-up:.1f}s from restart): forwarded {gross:.0f} readings/s while ingesting {lines_per_s}/s = {gross/lines_per_s:.1f}x ingest; net drain {b0/dt:.0f}/s")
else:
    print("did not catch up before the load ended; last backlog", samples[-1][2] - samples[-1][1])
rss = [r for (t, c, m, r) in samples]
print("RSS max overall", max(rss))
json.dump({"events": events, "samples": samples}, open(f"{ROOT}/outage-{rate}-{outage}-{int(t0)}.json", "w"))
gw.stop(); vm.stop()
