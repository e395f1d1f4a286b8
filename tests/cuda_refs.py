"""Build the GPU-test reference set on a machine with Transformers 5.23 (no GPU needed).

    python tests/cuda_refs.py .cudaref

writes, per case (tiny random mistral4 and mixtral) and quant (f32, q8_0, q4_0): `<case>-<quant>.gguf`
(our converter), `<case>-<quant>.logits.npy` (the CPU backend's logits for `<case>.ids.npy`), and on
f32 `<case>.greedy.npy` (64 greedy tokens from the first 8 ids). tests/test_cuda.py compares the CUDA
backend with these on the GPU machine (set LOCALMOE_CUDA_REFS to the folder).
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))

N_POS = 32          # prompt positions for the logits comparison (one prefill batch)
N_GREEDY = 64
PROMPT = 8

CASES = {
    "mistral4": ("make_mistral4", dict(vocab=8192, hidden=128, layers=2, heads=4, q_lora=64, kv_lora=64,
                                       nope=64, rope=32, v_dim=32, experts=8, top_k=4, moe_inter=64,
                                       inter=128, router_std=0.2)),
    "mixtral": ("make_mixtral", dict(vocab=32000, hidden=64, heads=4, kv_heads=2, experts=8, top_k=2,
                                     inter=128, layers=2, router_std=0.2)),
}
QUANTS = ("f32", "q8_0", "q4_0")


def main(out: Path) -> None:
    import checkpoints
    import localmoe
    from convert import convert

    out.mkdir(parents=True, exist_ok=True)
    for name, (factory, kw) in CASES.items():
        src, _ = getattr(checkpoints, factory)(out / f"{name}-hf", **kw)
        ids = np.concatenate([[1], np.random.default_rng(0).integers(3, kw["vocab"], N_POS - 1)]).astype(np.int64)
        np.save(out / f"{name}.ids.npy", ids)
        for q in QUANTS:
            path = out / f"{name}-{q}.gguf"
            convert(src, path, q)
            m = localmoe.load(path, backend="cpu")
            np.save(out / f"{name}-{q}.logits.npy", m.logits(ids))
            np.save(out / f"{name}-{q}.greedy.npy", np.array(list(m.generate(ids[:PROMPT], max_tokens=N_GREEDY,
                                                                               stop=())), np.int64))
        import shutil
        shutil.rmtree(src)
    print("wrote", sorted(p.name for p in out.iterdir()))


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else ".cudaref"))
