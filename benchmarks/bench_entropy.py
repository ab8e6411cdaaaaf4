"""Forward + backward time and peak memory of entropy terms over a large vocabulary (not a test).

    python benchmarks/bench_entropy.py                      # CPU, fp32, N = 256 and 1024, V = 151,936
    python benchmarks/bench_entropy.py --device cuda --dtype bf16 --n 4096,16384
    python benchmarks/bench_entropy.py --reference-overhead --n 128   # cost of the reference statistics

Cases: verl 0.4.1's entropy_from_logits (eager and torch.compile'd), and ours: full entropy, TRE-K (K = 2),
TRE-P (p = 0.99, exact and capped at 256 like the reference), and the actor's one-pass call (TRE-P value plus the
logged statistics); ``*_ref`` cases add the reference statistics every method logs (tail masses outside the top 2
and 10, the p = 0.99 nucleus size; ``*_ref_no_nucleus`` without the nucleus) to the same call without them. Each case runs in a fresh subprocess so that peak memory is its own: on CUDA
max_memory_allocated, on CPU the growth of the process's peak resident set (which also counts memory the C
allocator keeps after a free: +-100 MiB between runs; MALLOC_MMAP_THRESHOLD_=1048576 removes that, at twice the
time); both are reported above the logits (the logits' gradient included), in MiB and as a multiple of the
logits' size. At the end, the goals of the
speed/memory issue are printed as measured / goal where the run covers them.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

CASES = ("verl_eager", "verl_compiled", "full", "tre_k", "tre_p", "tre_p_cap256", "actor_tre_p",
         "actor_full", "actor_full_ref", "actor_full_ref_no_nucleus", "actor_tre_k", "actor_tre_k_ref", "actor_tre_p_ref")
_REF = {"reference_top_k": (2, 10), "reference_top_p": 0.99}


def _entropy_fn(case: str):
    import torch
    import verl.utils.torch_functional as verl_F

    from verl_tre.utils.torch_functional import entropy_from_logits, entropy_terms

    return {
        "verl_eager": verl_F.entropy_from_logits,
        "verl_compiled": torch.compile(verl_F.entropy_from_logits, dynamic=True),
        "full": entropy_from_logits,
        "tre_k": lambda x: entropy_from_logits(x, top_k=2),
        "tre_p": lambda x: entropy_from_logits(x, top_p=0.99),
        "tre_p_cap256": lambda x: entropy_from_logits(x, top_p=0.99, max_region_size=256),
        "actor_tre_p": lambda x: entropy_terms(x, top_p=0.99).value,
        "actor_full": lambda x: entropy_terms(x).value,
        "actor_full_ref": lambda x: entropy_terms(x, **_REF).value,
        "actor_full_ref_no_nucleus": lambda x: entropy_terms(x, reference_top_k=(2, 10)).value,
        "actor_tre_k": lambda x: entropy_terms(x, top_k=2).value,
        "actor_tre_k_ref": lambda x: entropy_terms(x, top_k=2, **_REF).value,
        "actor_tre_p_ref": lambda x: entropy_terms(x, top_p=0.99, **_REF).value,
    }[case]


def _llm_like_logits(n: int, vocab: int, dtype, device):
    """A heavy-tailed next-token distribution: a few strong candidates over a long tail, varying per row."""
    import torch

    gen = torch.Generator(device=device).manual_seed(0)
    logits = torch.randn(n, vocab, generator=gen, device=device).mul_(2.0)
    logits[:, :8] += torch.rand(n, 8, generator=gen, device=device) * torch.linspace(12, 2, 8, device=device)
    logits = logits.to(dtype)
    return logits.requires_grad_()


def run_one(case: str, n: int, vocab: int, dtype_name: str, device: str, repeat: int) -> dict:
    """Times one case in this process; returns {"ms": best of `repeat`, "peak_mib": memory above the logits}."""
    import torch

    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype_name]
    fn = _entropy_fn(case)
    # CPU: the process's peak resident set before the logits exist; the logits are then built in place.
    before_logits = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    logits = _llm_like_logits(n, vocab, dtype, device)
    logits_bytes = logits.numel() * logits.element_size()
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

    def step():
        logits.grad = None
        fn(logits).float().sum().backward()
        sync()

    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        step()
        peak = torch.cuda.max_memory_allocated() - base
    else:
        step()
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before_logits - logits_bytes
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return {"ms": min(times) * 1e3, "peak_mib": peak / 2**20, "logits_mib": logits_bytes / 2**20}


def reference_overhead(n: int, vocab: int, dtype_name: str, device: str, repeat: int) -> None:
    """Prints the no-grad forward time (what the actor spends on statistics at entropy_coeff = 0) of each
    regularizer's one-pass call with and without the reference statistics, and their ratio. The calls alternate in
    one process and each keeps its best of ``repeat`` rounds, so a machine whose load drifts still gives fair
    ratios."""
    import torch

    from verl_tre.utils.torch_functional import entropy_terms

    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype_name]
    x = _llm_like_logits(n, vocab, dtype, device).detach()
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    ref = {"reference_top_k": (2, 10), "reference_top_p": 0.99}
    cases = {}
    for name, kw in (("full", {}), ("tre_k", {"top_k": 2}), ("tre_p", {"top_p": 0.99})):
        cases[name] = kw
        cases[f"{name}+ref"] = {**kw, **ref}
        cases[f"{name}+ref_no_nucleus"] = {**kw, "reference_top_k": (2, 10)}
    best = dict.fromkeys(cases, float("inf"))
    with torch.no_grad():
        for round_ in range(repeat + 1):  # round 0 warms up
            for name, kw in cases.items():
                sync()
                start = time.perf_counter()
                entropy_terms(x, **kw)
                sync()
                if round_:
                    best[name] = min(best[name], time.perf_counter() - start)
    print(f"# reference statistics (K = 2, 10; p = 0.99), no-grad forward, N = {n}, best of {repeat}, interleaved")
    for name in ("full", "tre_k", "tre_p"):
        base = best[name]
        print(f"{name:<6} {base * 1e3:9.1f} ms   +ref {best[name + '+ref'] / base:5.2f}x   "
              f"+ref without nucleus {best[name + '+ref_no_nucleus'] / base:5.2f}x")


def _goals(results: dict, device: str, dtype: str) -> list[str]:
    lines = []

    def get(case, n):
        return results.get((case, n))

    if device == "cpu" and dtype == "fp32" and get("verl_eager", 1024):
        eager = get("verl_eager", 1024)["ms"]
        for case, limit in (("tre_k", 0.5), ("tre_p", 1.0)):
            if get(case, 1024):
                ratio = get(case, 1024)["ms"] / eager
                lines.append(f"CPU fp32 N=1024 {case}: {ratio:.2f}x / {limit:.1f}x verl eager  {'MET' if ratio <= limit else 'NOT MET'}")
    if device == "cuda" and dtype == "bf16" and get("verl_compiled", 16384):
        compiled = get("verl_compiled", 16384)["ms"]
        for case, ms_goal, rel_goal, mem_goal in (("tre_k", 16.0, 1.0, 1.1), ("tre_p", 24.0, 1.5, 1.25)):
            r = get(case, 16384)
            if r:
                mem = r["peak_mib"] / r["logits_mib"]
                ok = r["ms"] <= ms_goal and r["ms"] <= rel_goal * compiled and mem <= mem_goal
                lines.append(
                    f"GPU bf16 N=16384 {case}: {r['ms']:.1f} ms / {ms_goal:.0f} ms, {r['ms'] / compiled:.2f}x / {rel_goal}x "
                    f"compiled, memory {mem:.2f}x / {mem_goal}x logits  {'MET' if ok else 'NOT MET'}"
                )
    # Chunking: beyond the gradient (the size of the logits), memory should not grow with N.
    sizes = sorted({n for _, n in results})
    for case in ("full", "tre_k", "tre_p"):
        extra = [(n, results[(case, n)]["peak_mib"] - results[(case, n)]["logits_mib"]) for n in sizes if (case, n) in results]
        if len(extra) > 1:
            cells = ", ".join(f"N={n}: {mib:.0f} MiB" for n, mib in extra)
            lines.append(f"{case} memory beyond logits' size (the gradient): {cells}  (should not grow with N)")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    parser.add_argument("--n", default="256,1024", help="comma-separated token counts")
    parser.add_argument("--vocab", type=int, default=151_936)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--cases", default=",".join(CASES), help=f"comma-separated subset of {', '.join(CASES)}")
    parser.add_argument("--one", nargs=2, metavar=("CASE", "N"), help=argparse.SUPPRESS)  # subprocess mode
    parser.add_argument("--reference-overhead", action="store_true", help="time the reference statistics instead (first N)")
    args = parser.parse_args()

    if args.reference_overhead:
        reference_overhead(int(args.n.split(",")[0]), args.vocab, args.dtype, args.device, args.repeat)
        return

    if args.one:
        print(json.dumps(run_one(args.one[0], int(args.one[1]), args.vocab, args.dtype, args.device, args.repeat)))
        return

    import torch

    cases = [c for c in args.cases.split(",") if c]
    unknown = set(cases) - set(CASES)
    if unknown:
        parser.error(f"unknown case(s) {sorted(unknown)}; choose from {', '.join(CASES)}")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda needs a CUDA GPU; this machine has none")
    where = torch.cuda.get_device_name() if args.device == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"# {where}; torch {torch.__version__}; V = {args.vocab:,}; {args.dtype}; forward + backward; best of {args.repeat}")
    print(f"{'case':<14} {'N':>7} {'ms':>10} {'peak MiB':>10} {'x logits':>9}")
    results = {}
    for n in (int(x) for x in args.n.split(",")):
        for case in cases:
            cmd = [sys.executable, __file__, "--one", case, str(n), "--vocab", str(args.vocab), "--dtype", args.dtype,
                   "--device", args.device, "--repeat", str(args.repeat)]
            done = subprocess.run(cmd, capture_output=True, text=True)
            if done.returncode != 0:
                print(f"{case:<14} {n:>7} failed: {done.stderr.strip().splitlines()[-1] if done.stderr.strip() else done.returncode}")
                continue
            r = json.loads(done.stdout.strip().splitlines()[-1])
            results[(case, n)] = r
            print(f"{case:<14} {n:>7} {r['ms']:>10.1f} {r['peak_mib']:>10.1f} {r['peak_mib'] / r['logits_mib']:>9.2f}", flush=True)
    for line in _goals(results, args.device, args.dtype):
        print(line)


if __name__ == "__main__":
    main()
