"""Forward + backward time and peak memory of the lm head's log-probs and entropy terms (not a test).

    python benchmarks/bench_fused_linear.py                          # CPU, fp32, H = 1536, N = 1024 and 2048
    python benchmarks/bench_fused_linear.py --n 1024,2048,4096       # the unfused N = 4,096 takes ~12 GiB above the inputs
    python benchmarks/bench_fused_linear.py --threads 1 --hidden 256 # on a CPU shared with other jobs
    python benchmarks/bench_fused_linear.py --device cuda --dtype bf16 --n 16384

Cases, each on hidden states [N, H] and the lm_head weight [V, H] (V = 151,936), backward of
sum(g1 * log_probs + g2 * value) into both:
  unfused: logits = hidden @ weight.T / T materialized, verl 0.4.1's logprobs_from_logits and our entropy_terms
           on them (the actor with use_fused_kernels=false);
  fused:   fused_linear_entropy_terms (the actor with use_fused_kernels=true).
The entropy is TRE-P (p = 0.99, with the statistics, as update_policy computes it) unless --method says otherwise.

Each case runs in a fresh subprocess, one step after another: a first step (warm-up) whose growth of the process's
peak resident set (ru_maxrss) is the RSS figure, which also counts memory the C allocator keeps after a free; then
the timed step(s); then one step under torch.profiler's memory tracking, whose peak of live tensor storage bytes
(every allocation and free of the step, in order) is the live figure. On CUDA the memory is max_memory_allocated.
Memory is reported above the inputs and their gradients (hidden, weight and their .grad), in MiB and as a
multiple of the size of the logits [N, V] in the inputs' dtype. The goals are printed as measured / goal: memory
at most 0.25x the logits and flat in N; time at most 1.3x the unfused path's on CPU (fp32), 1.2x on a GPU (bf16).

On a CPU shared with other work, more threads than free cores make every parallel operation wait for a descheduled
thread: the many small operations of the chunked paths then take several times longer, by however much the other
load happens to be (measured: 2 threads on 2 cores next to a 2-thread job made both paths 3-7x slower than 1
thread, and erratically so). --threads 1 gives stable ratios there; the load average is printed with the table.
--rounds R runs the pair of cases R times alternately and keeps each case's fastest time.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

CASES = ("unfused", "fused")
METHODS = {"full": {}, "tre_k": {"top_k": 2}, "tre_p": {"top_p": 0.99}}


def _inputs(n: int, hidden: int, vocab: int, dtype, device):
    """LLM-like hidden states and weight: logits with a few strong candidates over a long tail."""
    import torch

    gen = torch.Generator(device=device).manual_seed(0)
    h = torch.randn(n, hidden, generator=gen, device=device).div_(hidden**0.5).mul_(3.0)
    w = torch.randn(vocab, hidden, generator=gen, device=device)
    labels = torch.randint(0, vocab, (n,), generator=gen, device=device)
    grads = torch.randn(2, n, generator=gen, device=device)
    return h.to(dtype).requires_grad_(), w.to(dtype).requires_grad_(), labels, grads


def _step_fn(case: str, method: dict, temperature: float):
    import verl.utils.torch_functional as verl_F

    from verl_tre.utils.torch_functional import entropy_terms, fused_linear_entropy_terms

    def unfused(h, w, labels):
        logits = (h @ w.T).div_(temperature)
        log_probs = verl_F.logprobs_from_logits(logits, labels, inplace_backward=False)
        return log_probs, entropy_terms(logits, **method).value

    def fused(h, w, labels):
        log_probs, terms = fused_linear_entropy_terms(h, w, labels, temperature=temperature, **method)
        return log_probs, terms.value

    return {"unfused": unfused, "fused": fused}[case]


def _live_peak_bytes(step) -> int:
    """Peak of live tensor storage bytes during step() above what was live before it, from torch.profiler's record
    of every allocation (+bytes) and free (-bytes) on the CPU allocator, in time order."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    events.sort(key=lambda e: e.start_ns())
    live = peak = 0
    for e in events:
        live += e.nbytes()
        peak = max(peak, live)
    return peak


def run_one(case: str, n: int, args) -> dict:
    """Runs one case in this process: {"ms": best of repeat, "rss_mib" and "live_mib": peaks above the inputs and
    their gradients (RSS on CPU, max_memory_allocated on CUDA as "live"), "logits_mib"}."""
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    fn = _step_fn(case, METHODS[args.method], 0.7)
    torch.ones(8, 8, requires_grad=True).sum().backward()  # autograd's own start-up, before the baseline
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    h, w, labels, grads = _inputs(n, args.hidden, args.vocab, dtype, args.device)
    inputs_bytes = 2 * (h.numel() + w.numel()) * h.element_size()  # the inputs and their gradients
    logits_bytes = n * args.vocab * h.element_size()
    sync = torch.cuda.synchronize if args.device == "cuda" else (lambda: None)

    def step():
        h.grad = w.grad = None
        log_probs, value = fn(h, w, labels)
        ((log_probs.float() * grads[0]).sum() + (value.float() * grads[1]).sum()).backward()
        sync()

    rss = None
    if args.device == "cuda":
        base = torch.cuda.memory_allocated()
        h.grad = w.grad = None
        torch.cuda.reset_peak_memory_stats()
        step()
        live = torch.cuda.max_memory_allocated() - base - inputs_bytes // 2
    else:
        step()
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before - inputs_bytes
    times = []
    for _ in range(args.repeat):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    if args.device != "cuda":
        h.grad = w.grad = None
        live = _live_peak_bytes(step) - inputs_bytes // 2  # the step allocates the gradients
    mib = 2**20
    return {"ms": min(times) * 1e3, "live_mib": live / mib, "rss_mib": None if rss is None else rss / mib,
            "logits_mib": logits_bytes / mib}


def _goals(results: dict, device: str) -> list[str]:
    time_goal = 1.2 if device == "cuda" else 1.3
    lines = []
    fused = sorted(n for case, n in results if case == "fused")
    for n in fused:
        r = results[("fused", n)]
        mems = [("live", r["live_mib"])] + ([("RSS", r["rss_mib"])] if r["rss_mib"] is not None else [])
        line = f"N={n}: fused memory " + ", ".join(
            f"{name} {m / r['logits_mib']:.3f}x / 0.25x logits {'MET' if m / r['logits_mib'] <= 0.25 else 'NOT MET'}"
            for name, m in mems
        )
        if ("unfused", n) in results:
            ratio = r["ms"] / results[("unfused", n)]["ms"]
            line += f"; time {ratio:.2f}x / {time_goal}x unfused {'MET' if ratio <= time_goal else 'NOT MET'}"
        lines.append(line)
    if len(fused) > 1:
        cells = ", ".join(f"N={n}: {results[('fused', n)]['live_mib']:.0f} MiB" for n in fused)
        lines.append(f"fused live memory above inputs and gradients: {cells} (should not grow with N)")
    return lines


def _load() -> str:
    return " ".join(f"{x:.1f}" for x in os.getloadavg())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--dtype", default=None, choices=["fp32", "bf16"], help="default: fp32 on CPU, bf16 on CUDA")
    parser.add_argument("--n", default=None, help="comma-separated token counts (default: 1024,2048 on CPU, 16384 on CUDA)")
    parser.add_argument("--hidden", type=int, default=1536, help="H (1536: Qwen2.5-1.5B)")
    parser.add_argument("--vocab", type=int, default=151_936)
    parser.add_argument("--method", default="tre_p", choices=list(METHODS))
    parser.add_argument("--repeat", type=int, default=1, help="timed steps per case and round (after one warm-up)")
    parser.add_argument("--rounds", type=int, default=1, help="runs of each case, alternating; the fastest counts")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's own)")
    parser.add_argument("--cases", default=",".join(CASES))
    parser.add_argument("--one", nargs=2, metavar=("CASE", "N"), help=argparse.SUPPRESS)  # subprocess mode
    args = parser.parse_args()
    args.dtype = args.dtype or ("bf16" if args.device == "cuda" else "fp32")

    if args.one:
        print(json.dumps(run_one(args.one[0], int(args.one[1]), args)))
        return

    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda needs a CUDA GPU; this machine has none")
    sizes = [int(x) for x in (args.n or ("16384" if args.device == "cuda" else "1024,2048")).split(",")]
    threads = args.threads or torch.get_num_threads()
    where = torch.cuda.get_device_name() if args.device == "cuda" else f"CPU, {threads} of {os.cpu_count()} threads"
    print(f"# {where}; torch {torch.__version__}; V = {args.vocab:,}, H = {args.hidden}; {args.dtype}; "
          f"{args.method}; forward + backward; best of {args.repeat} x {args.rounds} round(s) after one warm-up step")
    print(f"# {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; load average {_load()}")
    if args.device == "cpu" and threads > 1 and os.getloadavg()[0] + threads > (os.cpu_count() or 1) + 0.5:
        print(f"# warning: other load and {threads} threads exceed the {os.cpu_count()} cores; times will be erratic "
              "(see --threads 1)")
    print(f"{'case':<8} {'N':>6} {'ms':>10} {'live MiB':>9} {'x logits':>9} {'RSS MiB':>9} {'x logits':>9}"
          "  (memory above inputs+grads)")
    results = {}
    for n in sizes:
        for _ in range(args.rounds):
            for case in args.cases.split(","):
                cmd = [sys.executable, __file__, "--one", case, str(n), "--device", args.device,
                       "--dtype", args.dtype, "--hidden", str(args.hidden), "--vocab", str(args.vocab),
                       "--method", args.method, "--repeat", str(args.repeat), "--threads", str(args.threads)]
                done = subprocess.run(cmd, capture_output=True, text=True)
                if done.returncode != 0:
                    tail = done.stderr.strip().splitlines()[-1] if done.stderr.strip() else f"exit {done.returncode}"
                    print(f"{case:<8} {n:>6} failed: {tail}", flush=True)
                    continue
                r = json.loads(done.stdout.strip().splitlines()[-1])
                rss = "" if r["rss_mib"] is None else f"{r['rss_mib']:>9.0f} {r['rss_mib'] / r['logits_mib']:>9.3f}"
                live = f"{r['live_mib']:>9.0f} {r['live_mib'] / r['logits_mib']:>9.3f}"
                print(f"{case:<8} {n:>6} {r['ms']:>10.0f} {live} {rss}", flush=True)
                if (case, n) in results:  # the goals take the fastest round
                    r["ms"] = min(r["ms"], results[(case, n)]["ms"])
                results[(case, n)] = r
    print(f"# load average at the end {_load()}")
    for line in _goals(results, args.device):
        print(line)


if __name__ == "__main__":
    main()
