import os, sys; sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import *
rate, dur, fwd = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3] == "fwd"
D = f"{ROOT}/rss"; shutil.rmtree(D, ignore_errors=True); os.makedirs(D)
vm = Vm(f"{D}/vm").start() if fwd else None
gw = Gw(f"{D}/gw", free_port(socket.SOCK_DGRAM), vm.url() if fwd else None)
ld = load(gw, "--register", "--devices", "5000", "--rate", str(rate), "--duration", str(dur))
t0 = time.time(); out = []
while ld.poll() is None:
    out.append((time.time() - t0, gw.rss_kb())); time.sleep(1)
ld.communicate()
print(" ".join(f"{t:.0f}:{r//1024}M" for t, r in out[::10]))
gw.stop()
if vm: vm.stop()
