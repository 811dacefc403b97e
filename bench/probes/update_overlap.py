# Does a memory-bound optimizer update on a low-priority stream hide under compute-bound GEMMs on a
# high-priority one? Times a GEMM chain (moe-7b expert shapes) alone, a fused AdamW over fp32 state
# alone, the two one after the other, and the two on concurrent streams.
import torch

torch.manual_seed(0)
dev = "cuda"
A = torch.randn(65536, 2048, device=dev, dtype=torch.bfloat16)
W = torch.randn(2048, 1536, device=dev, dtype=torch.bfloat16)
C = torch.empty(65536, 1536, device=dev, dtype=torch.bfloat16)
P, parts = 500_000_000, 10
p = [torch.randn(P // parts, device=dev) for _ in range(parts)]
g = [torch.randn_like(x) for x in p]
m = [torch.zeros_like(x) for x in p]
v = [torch.zeros_like(x) for x in p]
step = [torch.tensor(1.0, device=dev) for _ in p]
hi = torch.cuda.Stream(priority=-5)
lo = torch.cuda.Stream(priority=0)


def gemms(n):
    for _ in range(n):
        torch.mm(A, W, out=C)


def adam(reps):
    for _ in range(reps):
        torch._fused_adamw_(p, g, m, v, [], step, lr=1e-4, beta1=0.9, beta2=0.95, weight_decay=0.1, eps=1e-8,
                            amsgrad=False, maximize=False)


def timed(fn):
    torch.cuda.synchronize()
    s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    s.record()
    fn()
    e.record()
    torch.cuda.synchronize()
    return s.elapsed_time(e)


def both_serial():
    gemms(60)
    adam(2)


def both_concurrent():
    cur = torch.cuda.current_stream()
    hi.wait_stream(cur)
    lo.wait_stream(cur)
    with torch.cuda.stream(lo):
        adam(2)
    with torch.cuda.stream(hi):
        gemms(60)
    cur.wait_stream(hi)
    cur.wait_stream(lo)


for name, fn in [("gemms", lambda: gemms(60)), ("adam", lambda: adam(2)), ("serial", both_serial),
                 ("concurrent", both_concurrent)]:
    fn()
    t = sorted(timed(fn) for _ in range(5))[2]
    print(f"{name:11s} {t:8.2f} ms")
