"""An Nsight Compute target: one eager decode step of a 2-layer model with Small 4's exact shapes (Q4_0), between
cudaProfilerStart/Stop; prints the backend calls in launch order so the kernels can be labelled. On the GPU machine:
    ncu --profile-from-start off --clock-control none --section SpeedOfLight --section Occupancy \\
        --section WarpStateStats --section MemoryWorkloadAnalysis --section LaunchStats --csv --page details \\
        python3 bench/ncu_step.py /tmp/tekken.json > ncu.csv"""
import sys, os
import numpy as np
from convert.synthetic import write_random_gguf
path = "/tmp/small4-2l.gguf"
if not os.path.exists(path):
    write_random_gguf(path, "q4_0", seed=0, tokenizer=sys.argv[1], num_hidden_layers=2)
import localmoe, cupy
m = localmoe.load(path, backend="cuda", n_ctx=512)
be = m.backend
be.use_graphs = False
ids = [1] + list(range(1000, 1035))
cache = m.new_cache()
m.prefill(np.array(ids), cache)
for t in range(3):
    m.net.forward(np.array([1000 + t]), cache, last_only=True)
be.stream.synchronize()
order = []
for meth in ("linear", "linear_heads", "rmsnorm", "mla_rope", "attention", "route", "expert_ffn"):
    def wrapped(*a, _f=getattr(be, meth), _n=meth, **kw):
        order.append(_n + (":" + a[0].name if hasattr(a[0], "name") else ""))
        return _f(*a, **kw)
    setattr(be, meth, wrapped)
cupy.cuda.runtime.profilerStart()
m.net.forward(np.array([2000]), cache, last_only=True)
be.stream.synchronize()
cupy.cuda.runtime.profilerStop()
print("CALLS", " | ".join(order))
