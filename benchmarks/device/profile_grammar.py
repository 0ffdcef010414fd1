"""Where a structured-output step's time goes: for 64 rows of a 128k vocabulary (the shape
tokenizer of make_shape_tokenizer.py, a JSON array-of-integers schema), per step: xgrammar's
bitmask fill on the host, the mask's copy and apply on the device (each apply backend), and
the matchers' accept.

    python3 benchmarks/device/profile_grammar.py [cpu|cuda] [TOKENIZER_DIR=.shape_tok]
"""
import json
import sys
import time

import torch
from transformers import AutoTokenizer

from weavelm.engine.structured import Constraint, Grammars


def main(dev: str, tok_dir: str) -> None:
    tok = AutoTokenizer.from_pretrained(tok_dir)
    g = Grammars(tok, len(tok), {len(tok) - 1})
    c = Constraint("json", json.dumps({"type": "array", "items": {"type": "integer"}}))
    matchers = [g.matcher(c) for _ in range(64)]
    V = len(tok)
    logits = torch.randn(64, V, device=dev)
    bitmask = g.xgr.allocate_token_bitmask(64, V)
    backends = ["auto", "torch_native"] + (["cuda", "triton"] if dev == "cuda" else ["cpu"])
    for backend in backends:
        fill = apply = accept = 0.0
        try:
            for step in range(40):
                t0 = time.perf_counter()
                for i, m in enumerate(matchers):
                    m.fill_next_token_bitmask(bitmask, i)
                t1 = time.perf_counter()
                masked = logits.clone()
                g.xgr.apply_token_bitmask_inplace(masked, bitmask.to(dev, non_blocking=True),
                                                  vocab_size=V, indices=list(range(64)),
                                                  backend=backend)
                tokens = masked.argmax(-1).tolist()
                t2 = time.perf_counter()
                for m, t in zip(matchers, tokens):
                    if not m.accept_token(t) or m.is_terminated():
                        m.reset()
                t3 = time.perf_counter()
                if step >= 10:                      # after warm-up (compiles)
                    fill, apply, accept = fill + t1 - t0, apply + t2 - t1, accept + t3 - t2
        except Exception as e:                      # noqa: BLE001 - a backend not there
            print(f"{backend}: {type(e).__name__}: {str(e)[:100]}")
            continue
        print(f"{dev} {backend}: per step ms: fill {fill / 30 * 1e3:.2f}, copy+apply+argmax "
              f"{apply / 30 * 1e3:.2f}, accept {accept / 30 * 1e3:.2f}")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "cpu", sys.argv[2] if len(sys.argv) > 2
         else ".shape_tok")
