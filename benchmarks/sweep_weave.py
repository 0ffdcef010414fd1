"""The weave's prefill time against where the batch is cut and how many CTAs its reductions get,
with baseline and nocomm from the same run (CUDA graphs, random weights of a real shape).

    torchrun --nproc-per-node 4 benchmarks/sweep_weave.py --tokens 8192,16384 \
        --shifts 0,0.03,0.06,0.12 --ctas 8,16 [--layers 8] [--shape llama3-70b]

A shift f cuts at T/2 + f*T (rounded to the splitter's alignment): f > 0 makes half A, whose
attention is the cheaper one (its queries see fewer keys), the larger half. Rank 0 prints a
table; every rank must run it.
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", default="8192,16384")
    ap.add_argument("--shifts", default="0,0.03,0.06,0.12")
    ap.add_argument("--ctas", default="8,16")
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--shape", default="llama3-70b")
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()

    from weavelm.bench.prefill import PrefillTimer
    from weavelm.weave.executor import WEAVE_CTAS
    from weavelm.weave.wave_model import default_align
    from weavelm.parallel.state import init_parallel
    tp = int(os.environ.get("WORLD_SIZE", "1"))
    state = init_parallel(tp, "cuda")
    runner = PrefillTimer(args.shape, args.layers, tp, "p2p", None)
    schedule = runner.schedule
    align = default_align(tp)
    rows = []
    for T in (int(t) for t in args.tokens.split(",")):
        def ms(mode, split=None):
            return runner.time(T, mode, split, repeats=args.repeats, graph=True) * 1e3
        base, nocomm = ms("baseline"), ms("nocomm")
        model_split = runner.split_for(T)
        for f in (float(x) for x in args.shifts.split(",")):
            split = round((T / 2 + f * T) / align) * align
            for c in (int(x) for x in args.ctas.split(",")):
                schedule.weave_ctas = c or WEAVE_CTAS
                w = ms("weave", split)
                rows.append((T, f, split, c, w, base, nocomm))
                if state.is_first:
                    print(f"T={T} shift={f:+.3f} split={split} ctas={c}: weave {w:.2f} ms, "
                          f"baseline {base:.2f}, nocomm {nocomm:.2f} (splitter: {model_split})",
                          flush=True)
        schedule.weave_ctas = WEAVE_CTAS
    if state.is_first:
        print(f"\n### weave vs cut and CTAs: {args.shape} ({args.layers} layers), TP={tp}, "
              "CUDA graphs, ms (median)\n")
        print("| tokens | shift | split (A) | CTAs | weave | vs baseline | / nocomm |")
        print("| --- | --- | --- | --- | --- | --- | --- |")
        for T, f, split, c, w, base, nocomm in rows:
            print(f"| {T} | {f:+.3f} | {split} | {c} | {w:.2f} | {base / w:.3f}x | "
                  f"{w / nocomm:.3f}x |")


if __name__ == "__main__":
    main()
