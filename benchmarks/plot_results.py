"""Plots for RESULTS.md from the JSON the GPU runs bring back (matplotlib, on any machine).

    python3 benchmarks/plot_results.py fused  bench_fused_comm.json benchmarks/fused_comm.png
    python3 benchmarks/plot_results.py prefill prefill.json          benchmarks/prefill.png
"""
import json
import sys


def plot_fused(data, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    tokens, ctas = data["tokens"], data["ctas"]
    sweep = {tuple(map(int, k.split("|"))): v for k, v in data["sweep"].items()}
    res = {}
    for k, v in data["res"].items():
        name, T = k.rsplit("|", 1)
        res[(name, int(T))] = v
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(12, 4.5))
    best = [min(sweep.get((T, c), float("inf")) for c in ctas) for T in tokens]
    kernel = data.get("default_kernel", "pull")
    a1.plot(tokens, best, "o-", label=f"weavelm fused p2p, {kernel} kernel (best CTAs)")
    other = {tuple(map(int, k.split("|"))): v for k, v in data.get("sweep_other", {}).items()}
    if other:
        a1.plot(tokens, [min(other.get((T, c), float("inf")) for c in ctas) for T in tokens],
                "o:", label=f"weavelm fused p2p, {'pull' if kernel == 'scatter' else 'scatter'} "
                            "kernel (best CTAs)")
    for name in ("NCCL all-reduce + RMSNorm", "torch symm two-shot + RMSNorm",
                 "NCCL all-reduce only"):
        ys = [res.get((name, T), float("nan")) for T in tokens]
        a1.plot(tokens, ys, ".--", label=name)
    a1.set(xscale="log", yscale="log", xlabel="tokens", ylabel="µs",
           title=f"all-reduce + residual + RMSNorm, {data['world']}× {data['gpu']}, "
                 f"D={data['hidden']}")
    a1.legend(fontsize=8)
    for T in tokens:
        if T >= 512:
            a2.plot(ctas, [sweep.get((T, c), float("nan")) for c in ctas], "o-", label=f"{T}")
    a2.set(xscale="log", yscale="log", xlabel="CTAs", ylabel="µs", title="CTA sweep (tokens)")
    a2.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    kind, src, dst = sys.argv[1:4]
    data = json.load(open(src))
    if kind == "fused":
        plot_fused(data, dst)
    else:
        sys.path.insert(0, ".")
        from weavelm.bench.prefill import plot
        plot(data, dst)
    print(f"wrote {dst}")
