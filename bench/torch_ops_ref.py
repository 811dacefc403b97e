#!/usr/bin/env python3
"""PyTorch references for `mop bench ops`, timed in the same call on the same GPU.

The kernel rates DESIGN.md quotes, measured again here so the ratios in bench/results/*-ops.md are
same-call: the device-to-device copy ceiling, cuDNN SDPA (causal, 16K tokens, 16 heads, head dim
128 and 64), torch._grouped_mm on the moe-7b expert shape next to a dense GEMM of the same FLOPs,
and the plain PyTorch LM head + cross-entropy (time and extra memory) next to its three bf16 GEMMs.
Timing as mop's event timer: warm-up, then the median of per-call event samples, the L2 flushed
(256 MiB memset) before each sample.

  python3 bench/torch_ops_ref.py [--out FILE.jsonl] [--only copy,attention,grouped,head]
"""
import argparse
import json
import math
import os

import torch
import torch.nn.functional as F

dev = "cuda"
bf16 = torch.bfloat16
_flush = None


def median_ms(fn, warmup=3, samples=10):
    global _flush
    if _flush is None:
        _flush = torch.empty(256 << 20, dtype=torch.uint8, device=dev)
    for _ in range(warmup):
        fn()
    ev = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(samples)]
    for a, b in ev:
        _flush.zero_()
        a.record()
        fn()
        b.record()
    torch.cuda.synchronize()
    t = sorted(a.elapsed_time(b) for a, b in ev)
    n = len(t)
    return t[n // 2] if n % 2 else 0.5 * (t[n // 2 - 1] + t[n // 2])


rows = []


def row(kernel, shape, ms, flops=0.0, nbytes=0.0, **extra):
    r = {"impl": "torch " + torch.__version__, "kernel": kernel, "shape": shape, "us": ms * 1e3}
    if flops:
        r["tflops"] = flops / (ms * 1e9)
    if nbytes:
        r["gbps"] = nbytes / (ms * 1e6)
    r.update(extra)
    rows.append(r)
    print(json.dumps(r), flush=True)


def copy_ceiling():
    n = 2 << 30
    a = torch.empty(n, dtype=torch.uint8, device=dev).random_()
    b = torch.empty_like(a)
    row("copy D2D", "2 GiB", median_ms(lambda: b.copy_(a)), nbytes=2.0 * n)


def attention(hd):
    from torch.nn.attention import SDPBackend, sdpa_kernel
    S, H = 16384, 16
    q, k, v = (torch.empty(1, H, S, hd, dtype=bf16, device=dev).uniform_(-1, 1).requires_grad_() for _ in range(3))
    do = torch.empty(1, H, S, hd, dtype=bf16, device=dev).uniform_(-1, 1)
    fwd = 2.0 * 2.0 * S * S / 2 * H * hd
    with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
        o = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        f = median_ms(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True))
        b = median_ms(lambda: torch.autograd.grad(o, (q, k, v), do, retain_graph=True))
    shape = f"1x{S} H {H}/{H} hd {hd}"
    row(f"SDPA cuDNN fwd hd{hd}", shape, f, flops=fwd)
    row(f"SDPA cuDNN bwd hd{hd}", shape, b, flops=2.5 * fwd)


def grouped():
    M, I, O, E = 65536, 2048, 1536, 64
    x = torch.empty(M, I, dtype=bf16, device=dev).uniform_(-1, 1).requires_grad_()
    w = torch.empty(E, O, I, dtype=bf16, device=dev).uniform_(-0.05, 0.05).requires_grad_()
    dy = torch.empty(M, O, dtype=bf16, device=dev).uniform_(-1, 1)
    offs = torch.arange(1, E + 1, device=dev, dtype=torch.int32) * (M // E)
    flops = 2.0 * M * I * O
    shape = f"{M}x{I} -> {O}, {E} experts"
    y = torch._grouped_mm(x, w.transpose(-2, -1), offs=offs)
    row("_grouped_mm fwd", shape, median_ms(lambda: torch._grouped_mm(x, w.transpose(-2, -1), offs=offs)),
        flops=flops)
    # Autograd's backward: dgrad and wgrad, two products of the forward's FLOPs.
    row("_grouped_mm bwd (dgrad + wgrad)", shape,
        median_ms(lambda: torch.autograd.grad(y, (x, w), dy, retain_graph=True)), flops=2 * flops)
    with torch.no_grad():
        wd = torch.empty(I, O, dtype=bf16, device=dev).uniform_(-0.05, 0.05)
        row("dense mm same FLOPs fwd", f"{M}x{I} -> {O}", median_ms(lambda: x @ wd), flops=flops)
        dyd, wt = dy, wd.t().contiguous()
        row("dense mm same FLOPs dgrad", f"{M}x{I} -> {O}", median_ms(lambda: dyd @ wt), flops=flops)
        row("dense mm same FLOPs wgrad", f"{M}x{I} -> {O}", median_ms(lambda: dyd.t() @ x), flops=flops)


def head():
    N, D, V = 16384, 2048, 151936
    h = torch.empty(N, D, dtype=bf16, device=dev).uniform_(-1, 1).requires_grad_()
    W = torch.empty(V, D, dtype=bf16, device=dev).uniform_(-0.02, 0.02).requires_grad_()
    t = torch.randint(0, V, (N,), device=dev)
    shape = f"{N}x{D} -> {V}"

    def plain():
        h.grad = W.grad = None
        loss = F.cross_entropy((h @ W.t()).float(), t)
        loss.backward()
        return loss

    torch.cuda.synchronize()
    h.grad = W.grad = None
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    loss = plain()
    torch.cuda.synchronize()
    extra = (torch.cuda.max_memory_allocated() - base) / 2**30
    ms = median_ms(plain, warmup=1, samples=5)
    row("plain head + CE fwd+bwd (fp32 logits)", shape, ms, flops=3 * 2.0 * N * D * V, extra_gib=extra,
        loss=float(loss), ln_v=math.log(V))
    h.grad = W.grad = None
    with torch.no_grad():
        dl = torch.empty(N, V, dtype=bf16, device=dev).uniform_(-1e-4, 1e-4)
        hh, WW = h.detach(), W.detach()
        g1 = median_ms(lambda: hh @ WW.t(), samples=5)
        g2 = median_ms(lambda: dl @ WW, samples=5)
        g3 = median_ms(lambda: dl.t() @ hh, samples=5)
    for name, g in (("logits = h W^T", g1), ("dh = dlogits W", g2), ("dW = dlogits^T h", g3)):
        row("plain GEMM " + name, shape, g, flops=2.0 * N * D * V)
    row("3 plain GEMMs", shape, g1 + g2 + g3, flops=3 * 2.0 * N * D * V, plain_over_gemms=ms / (g1 + g2 + g3))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=os.path.join(os.environ.get("OUT", "."), "torch_ops_ref.jsonl"))
    steps = {"copy": [copy_ceiling], "attention": [lambda: attention(128), lambda: attention(64)],
             "grouped": [grouped], "head": [head]}
    ap.add_argument("--only", default="", help="comma-separated: " + ", ".join(steps) + " (default: all)")
    args = ap.parse_args()
    only = [w for w in args.only.split(",") if w] or list(steps)
    for w in only:
        if w not in steps:
            ap.error(f"--only: unknown group '{w}'; groups: {', '.join(steps)}")
    print(f"# {torch.cuda.get_device_name()} torch {torch.__version__} cuDNN {torch.backends.cudnn.version()}",
          flush=True)
    for step in [f for w in only for f in steps[w]]:
        try:
            step()
        except Exception as e:  # one failed reference must not lose the others
            print(json.dumps({"error": f"{type(e).__name__}: {e}"[:300]}), flush=True)
        torch.cuda.empty_cache()
    with open(args.out, "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")


if __name__ == "__main__":
    main()
