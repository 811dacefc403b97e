#!/usr/bin/env python3
"""PyTorch FSDP2 baseline for mop: the same MoE decoder math, trained the way a tuned PyTorch stack would.

The model is the mop preset (DESIGN.md): pre-norm decoder, GQA attention with QK-norm and RoPE through SDPA,
softmax top-k router with renormalised weights, dropless experts through torch._grouped_mm, switch
load-balancing loss, untied head, mean cross-entropy. Training: FSDP2 (bf16 compute, fp32 master weights and
fp32 gradient reduction), fused AdamW, optional per-layer activation checkpointing, torch.compile, forced
cuDNN attention, and FSDP2 CPU offload. Tensors are row-major; N = tokens on this rank, K = top_k,
E = experts, D = hidden, F = expert FFN width, V = vocab.

  python3 bench/baselines/torch_fsdp2.py --preset moe-1b --seq 4096 --batch 4 [--compile] [--ac] [--cudnn]
  torchrun --nproc_per_node 2 bench/baselines/torch_fsdp2.py --preset moe-7b --seq 4096 --batch 2 --ac

Progress goes to stderr; rank 0 prints exactly one JSON line on stdout (an out-of-memory run included).
"""
import argparse
import contextlib
import json
import os
import socket
import sys
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard
from torch.distributed.tensor import DTensor
from torch.nn.attention import SDPBackend, sdpa_kernel

# layers, hidden, heads, kv_heads, head_dim, experts, top_k, expert_ffn, vocab (DESIGN.md presets; tiny = bytes + 3)
PRESETS = {
    "tiny": (2, 64, 4, 2, 16, 8, 2, 32, 259),
    "moe-1b": (12, 1024, 16, 4, 64, 32, 4, 512, 32000),
    "moe-7b": (16, 2048, 16, 4, 128, 64, 8, 768, 151936),
    "qwen3-30b-a3b": (48, 2048, 32, 4, 128, 128, 8, 768, 151936),
}
KEYS = ("layers", "hidden", "heads", "kv_heads", "head_dim", "experts", "top_k", "ffn", "vocab")
NORM_EPS, ROPE_THETA, LB_COEF, INIT_STD = 1e-6, 1e6, 0.01, 0.02


def param_counts(c):
    """(total, active matmul) parameters, the formula of mop's model_counts(): active = attention + router +
    top_k experts per layer + the head; the embedding is a lookup, so it is in total but not active."""
    D, hd = c.hidden, c.head_dim
    attn = D * (c.heads + 2 * c.kv_heads) * hd + c.heads * hd * D
    expert = 3 * D * c.ffn
    total = 2 * c.vocab * D + D + c.layers * (attn + 2 * D + 2 * hd + c.experts * (expert + D))
    active = c.vocab * D + c.layers * (attn + c.experts * D + c.top_k * expert)
    return total, active


def flops_per_token(c, seq):
    # DESIGN.md: 6 x active matmul params + 6 x layers x heads x head_dim x T (causal attention, fwd + bwd).
    return 6.0 * param_counts(c)[1] + 6.0 * c.layers * c.heads * c.head_dim * seq


class RMSNorm(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return F.rms_norm(x, (x.shape[-1],), self.weight, NORM_EPS)  # fp32 statistics inside the kernel


def rope_tables(seq, head_dim, device, dtype):
    """cos, sin of shape (T, 1, head_dim) in the Hugging Face rotate_half layout (frequencies repeated twice)."""
    inv_freq = 1.0 / ROPE_THETA ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim)
    ang = torch.outer(torch.arange(seq, device=device, dtype=torch.float32), inv_freq)
    ang = torch.cat([ang, ang], dim=-1)[:, None, :]
    return ang.cos().to(dtype), ang.sin().to(dtype)


def apply_rope(x, cos, sin):  # x (B, T, H, hd)
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin


class Attention(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.h, self.kv, self.hd = c.heads, c.kv_heads, c.head_dim
        self.wq = nn.Linear(c.hidden, c.heads * c.head_dim, bias=False)
        self.wk = nn.Linear(c.hidden, c.kv_heads * c.head_dim, bias=False)
        self.wv = nn.Linear(c.hidden, c.kv_heads * c.head_dim, bias=False)
        self.wo = nn.Linear(c.heads * c.head_dim, c.hidden, bias=False)
        self.q_norm, self.k_norm = RMSNorm(c.head_dim), RMSNorm(c.head_dim)

    def forward(self, x, cos, sin):  # x (B, T, D)
        B, T, _ = x.shape
        # QK-norm over head_dim per head, then RoPE; kept in (B, T, H, hd) so the transposes below are views.
        q = apply_rope(self.q_norm(self.wq(x).view(B, T, self.h, self.hd)), cos, sin)
        k = apply_rope(self.k_norm(self.wk(x).view(B, T, self.kv, self.hd)), cos, sin)
        v = self.wv(x).view(B, T, self.kv, self.hd)
        # enable_gqa: the cuDNN and flash backends read the shared kv heads themselves (head h uses kv h // (H/KV),
        # HF's repeat_kv order); no repeated copy of k and v is materialised.
        o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                           is_causal=True, enable_gqa=True)
        return self.wo(o.transpose(1, 2).reshape(B, T, self.h * self.hd))


class MoE(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.e, self.k = c.experts, c.top_k
        self.router = nn.Linear(c.hidden, c.experts, bias=False)
        self.w13 = nn.Parameter(torch.empty(c.experts, 2 * c.ffn, c.hidden))  # (E, 2F, D): gate rows, then up rows
        self.w2 = nn.Parameter(torch.empty(c.experts, c.hidden, c.ffn))  # (E, D, F)

    def experts(self, xs, counts):  # xs (N*K, D) sorted by expert, counts (E,)
        if xs.is_cuda:
            # One grouped GEMM per projection; offs are the group ends, left on the device (no host sync).
            offs = counts.cumsum(0).to(torch.int32)
            gate, up = torch._grouped_mm(xs, self.w13.transpose(-2, -1), offs=offs).chunk(2, dim=-1)
            return torch._grouped_mm(F.silu(gate) * up, self.w2.transpose(-2, -1), offs=offs)
        # CPU smoke tests only (fp32; _grouped_mm wants bf16): the same math, one expert at a time.
        ends = counts.cumsum(0).tolist()
        out = []
        for e, (lo, hi) in enumerate(zip([0] + ends[:-1], ends)):
            gate, up = (xs[lo:hi] @ self.w13[e].t()).chunk(2, dim=-1)
            out.append((F.silu(gate) * up) @ self.w2[e].t())
        return torch.cat(out)

    def forward(self, x):  # x (B, T, D) -> (B, T, D), switch loss
        B, T, D = x.shape
        x = x.reshape(B * T, D)
        N = x.shape[0]
        probs = F.softmax(self.router(x).float(), dim=-1)  # (N, E) fp32
        top_w, top_e = probs.topk(self.k, dim=-1)  # (N, K)
        top_w = top_w / top_w.sum(dim=-1, keepdim=True)
        flat_e = top_e.reshape(-1)  # (N*K,) assignment n*K+j -> expert
        # scatter_add_ rather than bincount: a fixed output shape, so torch.compile needs no dynamic shapes.
        counts = torch.zeros(self.e, dtype=torch.int64, device=x.device)
        counts.scatter_add_(0, flat_e, torch.ones_like(flat_e))  # (E,) assignments per expert
        aux = self.e * torch.sum(counts.float() / (N * self.k) * probs.mean(dim=0))  # E * sum_e f_e * P_e
        # Dropless dispatch: stable sort of the N*K assignments by expert, gather rows, run, combine.
        order = torch.argsort(flat_e, stable=True)
        tok = order // self.k
        ys = self.experts(x.index_select(0, tok), counts)  # (N*K, D)
        ys = ys * top_w.reshape(-1)[order].to(ys.dtype)[:, None]
        # Sum the K contributions of a token in fp32, store bf16; the fp32 copy is transient (autograd saves
        # only ys and the weights, for the multiply).
        out = torch.zeros(N, D, dtype=torch.float32, device=x.device).index_add_(0, tok, ys.float())
        return out.to(x.dtype).view(B, T, D), aux


class Block(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.attn_norm, self.attn = RMSNorm(c.hidden), Attention(c)
        self.moe_norm, self.moe = RMSNorm(c.hidden), MoE(c)

    def forward(self, x, cos, sin):
        x = x + self.attn(self.attn_norm(x), cos, sin)
        y, aux = self.moe(self.moe_norm(x))
        return x + y, aux


class Model(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.c = c
        self.embed = nn.Embedding(c.vocab, c.hidden)
        self.layers = nn.ModuleList(Block(c) for _ in range(c.layers))
        self.norm = RMSNorm(c.hidden)
        self.head = nn.Linear(c.hidden, c.vocab, bias=False)

    def forward(self, ids, targets):  # ids, targets (B, T) -> mean cross-entropy, mean switch loss
        h = self.embed(ids)
        cos, sin = rope_tables(ids.shape[1], self.c.head_dim, ids.device, h.dtype)
        aux = 0.0
        for layer in self.layers:
            h, a = layer(h, cos, sin)
            aux = aux + a
        # Plain PyTorch head: bf16 logits, upcast to fp32 for the loss (the N x V memory DESIGN.md measures).
        logits = self.head(self.norm(h))
        ce = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten())
        return ce, aux / len(self.layers)


def init_distributed():
    """torchrun sets RANK/WORLD_SIZE; a plain `python3` run becomes a 1-rank group on a free local port."""
    if "RANK" not in os.environ:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    if torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", device_id=device)
    else:
        device = torch.device("cpu")
        dist.init_process_group("gloo")
    return device, dist.get_rank(), dist.get_world_size()


def build(c, args, device, world):
    """Meta-device model -> AC -> compile -> FSDP2 per layer and root -> materialise -> init (torchtitan order)."""
    with torch.device("meta"):  # no memory yet: each rank later allocates only its own shard
        model = Model(c)
    for i, layer in enumerate(model.layers):
        if args.ac:  # the layer keeps only its input; everything inside is recomputed in backward
            layer = checkpoint_wrapper(layer, preserve_rng_state=False)  # no randomness in a layer
        if args.compile:
            layer = torch.compile(layer)
        model.layers[i] = layer
    cuda = device.type == "cuda"
    # fp32 parameters are the master copy; FSDP2 all-gathers them as bf16 and reduce-scatters fp32 gradients.
    # On the CPU (smoke tests) everything stays fp32.
    mp = MixedPrecisionPolicy()
    if cuda:
        mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    offload = CPUOffloadPolicy() if args.cpu_offload else OffloadPolicy()
    mesh = init_device_mesh(device.type, (world,))
    for layer in model.layers:
        fully_shard(layer, mesh=mesh, mp_policy=mp, offload_policy=offload)
    fully_shard(model, mesh=mesh, mp_policy=mp, offload_policy=offload)  # embedding, final norm, head
    model.to_empty(device="cpu" if args.cpu_offload else device)  # offloaded shards live in pinned host memory
    with torch.no_grad():
        # Each rank fills its own shard from its own seed: no DTensor RNG bookkeeping, same distribution.
        gen = torch.Generator(device="cpu" if args.cpu_offload else device).manual_seed(args.seed + dist.get_rank())
        for p in model.parameters():
            t = p.to_local() if isinstance(p, DTensor) else p
            if p.ndim == 1:  # the only 1-D parameters are norm weights (there are no biases)
                t.fill_(1.0)
            else:
                t.normal_(0.0, INIT_STD, generator=gen)
    return model


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", default="moe-1b", choices=sorted(PRESETS))
    ap.add_argument("--layers", type=int, help="override the preset's layer count")
    ap.add_argument("--seq", type=int, default=4096, help="tokens per sequence")
    ap.add_argument("--batch", type=int, default=4, help="sequences per GPU")
    ap.add_argument("--steps", type=int, default=20, help="optimizer steps, warmup included")
    ap.add_argument("--warmup", type=int, default=5, help="untimed steps (compilation, allocator, cuDNN plans)")
    ap.add_argument("--ac", action="store_true", help="activation checkpointing per decoder layer")
    ap.add_argument("--compile", action="store_true", help="torch.compile each decoder layer")
    ap.add_argument("--cudnn", action="store_true", help="force SDPA's cuDNN attention backend")
    ap.add_argument("--cpu-offload", action="store_true", help="FSDP2 CPUOffloadPolicy (params, grads, AdamW on host)")
    ap.add_argument("--peak-tflops", type=float, default=790.0, help="MFU denominator (measured H200 bf16 rate)")
    ap.add_argument("--seed", type=int, default=1234)
    args = ap.parse_args()
    if not 0 <= args.warmup < args.steps:
        ap.error(f"--warmup {args.warmup} must be in [0, --steps {args.steps})")

    c = argparse.Namespace(**dict(zip(KEYS, PRESETS[args.preset])))
    if args.layers is not None:
        c.layers = args.layers
    if not torch.cuda.is_available() and (args.cudnn or args.cpu_offload):
        ap.error("--cudnn and --cpu-offload need a CUDA device")
    device, rank, world = init_distributed()
    cuda = device.type == "cuda"
    settings = "+".join(n for n, on in [("compile", args.compile), ("ac", args.ac), ("cudnn", args.cudnn),
                                        ("offload", args.cpu_offload)] if on) or "eager"
    total, active = param_counts(c)

    def log(msg):
        if rank == 0:
            print(msg, file=sys.stderr, flush=True)

    log(f"{args.preset}: {c.layers} layers, params {total:,} total ({total / 1e9:.2f}B) / {active:,} active "
        f"({active / 1e9:.2f}B); {world} rank(s) on {device.type}, seq {args.seq} x batch {args.batch} per GPU, "
        f"{settings}")
    if args.compile:
        # Every layer is compiled separately; let each have its cache entry instead of falling back to eager.
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 2 * c.layers)
    result = dict(impl="torch-fsdp2", preset=args.preset, layers=c.layers, gpus=world, seq=args.seq,
                  batch=args.batch, settings=settings)
    try:
        model = build(c, args, device, world)
        built = sum(p.numel() for p in model.parameters())  # DTensor numel is the global size
        assert built == total, f"model has {built} parameters, the formula {total}"
        opt = torch.optim.AdamW(model.parameters(), lr=3e-4, betas=(0.9, 0.95), weight_decay=0.1, fused=True)
        # Synthetic data: one fixed random batch per rank, so a falling loss shows the step really trains.
        gen = torch.Generator(device=device).manual_seed(args.seed + 1000 + rank)
        ids = torch.randint(0, c.vocab, (args.batch, args.seq + 1), device=device, generator=gen)
        inputs, targets = ids[:, :-1].contiguous(), ids[:, 1:].contiguous()
        # The backend choice must cover backward too: checkpointed layers re-run SDPA there.
        attn_ctx = sdpa_kernel([SDPBackend.CUDNN_ATTENTION]) if args.cudnn else contextlib.nullcontext()
        sync = torch.cuda.synchronize if cuda else (lambda: None)
        losses = []
        with attn_ctx:
            for step in range(args.steps):
                if step == args.warmup:
                    sync()
                    t0 = time.perf_counter()
                t = time.perf_counter()
                ce, aux = model(inputs, targets)
                (ce + LB_COEF * aux).backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
                losses.append(ce.detach())
                if rank == 0:  # .item() syncs rank 0 once per step: negligible next to a step
                    log(f"step {step + 1}/{args.steps}  loss {ce.item():.4f}  aux {aux.item():.4f}  "
                        f"{(time.perf_counter() - t) * 1e3:.0f} ms{'' if step >= args.warmup else '  (warmup)'}")
        sync()
        elapsed = time.perf_counter() - t0
    except Exception as e:
        if not (isinstance(e, torch.OutOfMemoryError) or "out of memory" in str(e).lower()):
            raise
        # An out-of-memory run is a result (DESIGN.md's table has them), not a crash: one JSON line, exit 0.
        # os._exit skips the process-group teardown, which can hang when ranks stopped at different collectives.
        log(f"out of memory: {str(e).splitlines()[0]}")
        if rank == 0:
            print(json.dumps({**result, "params_total": total, "error": "out of memory"}), flush=True)
        os._exit(0)

    tok_s = args.batch * args.seq * (args.steps - args.warmup) / elapsed
    tflops = tok_s * flops_per_token(c, args.seq) / 1e12
    result.update(tokens_per_s_per_gpu=round(tok_s, 1), tflops_per_gpu=round(tflops, 2),
                  mfu=round(tflops / args.peak_tflops, 4),
                  peak_gib=round(torch.cuda.max_memory_allocated(device) / 2**30, 2) if cuda else 0.0,
                  params_total=total, loss_first=round(losses[0].item(), 4), loss_last=round(losses[-1].item(), 4))
    log(f"{tok_s:,.0f} tokens/s/GPU, {tflops:.1f} TFLOP/s/GPU, MFU {100 * tflops / args.peak_tflops:.1f}% "
        f"of {args.peak_tflops:g}, peak {result['peak_gib']} GiB")
    if rank == 0:
        print(json.dumps(result), flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
