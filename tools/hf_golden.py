#!/usr/bin/env python3
"""Golden values from a reference no one here wrote: Hugging Face transformers' Qwen3-MoE.

Loads a model directory written by `mop export` (config.json + model.safetensors) as
Qwen3MoeForCausalLM in float64, runs a fixed batch with labels, backpropagates the loss, and
stores in one safetensors file:
  input_ids        (B, T) int64, the batch; position t predicts token t + 1 of its row
  logits           (B, T, V) float64
  loss             () float64, mean cross-entropy over the B * (T - 1) predicted tokens
  grad.<name>      float64 gradient of every parameter under its checkpoint name
                   (per-expert names, even where transformers stores experts fused)
tests/checkpoint/test_hf_golden.cpp compares mop's CPU forward and backward against it.

Run where PyTorch and transformers exist:
  python3 tools/hf_golden.py --model tests/golden/qwen3_tiny --out tests/golden/qwen3_tiny/golden.safetensors
"""
import argparse
import json
import re
import sys

import torch
from safetensors.torch import load_file, save_file


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--seq", type=int, default=24)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    import transformers
    from transformers import AutoConfig, Qwen3MoeForCausalLM

    cfg = AutoConfig.from_pretrained(args.model)
    cfg.output_router_logits = False  # loss = cross-entropy only; mop's test sets lb_coef = 0
    kwargs = dict(config=cfg, torch_dtype=torch.float64, attn_implementation="eager")
    try:  # transformers 5: the default grouped_mm experts kernel has no float64
        model = Qwen3MoeForCausalLM.from_pretrained(args.model, experts_implementation="eager", **kwargs)
    except TypeError:
        model = Qwen3MoeForCausalLM.from_pretrained(args.model, **kwargs)
    model.train()  # no dropout in this architecture; train() only enables grads paths

    # Map every checkpoint tensor to the model's parameters to prove the loaded weights are
    # exactly ours (this also pins down how transformers fuses experts).
    ours = load_file(f"{args.model}/model.safetensors")
    E = cfg.num_experts
    F = cfg.moe_intermediate_size

    # Fused expert tensors may be (E, out, in) or (E, in, out) depending on the version, and
    # the two can have the same shape; the layout is chosen by matching the checkpoint's values.
    transposed = {}

    def split(name, t, decide=False):
        """Model parameter -> {checkpoint name: tensor view}."""
        m = re.match(r"(model\.layers\.\d+\.mlp\.experts)\.(gate_up_proj|down_proj)$", name)
        if not (m and t.dim() == 3):
            key = name if name.endswith(".weight") or name.endswith(".bias") else name + ".weight"
            return {key: t}
        base, kind = m.groups()

        def views(tr):
            out = {}
            for e in range(E):
                w = t[e].T if tr else t[e]  # (out, in) as in nn.Linear
                if kind == "gate_up_proj":
                    out[f"{base}.{e}.gate_proj.weight"] = w[:F]
                    out[f"{base}.{e}.up_proj.weight"] = w[F:]
                else:
                    out[f"{base}.{e}.down_proj.weight"] = w
            return out

        if decide:
            for tr in (False, True):
                v = views(tr)
                if all(k in ours and tuple(x.shape) == tuple(ours[k].shape) and
                       torch.equal(x, ours[k].to(torch.float64)) for k, x in v.items()):
                    transposed[name] = tr
                    break
            else:
                sys.exit(f"{name} {tuple(t.shape)}: matches the checkpoint in neither layout")
        return views(transposed[name])

    seen = set()
    for name, p in model.named_parameters():
        for ck, view in split(name, p.detach(), decide=True).items():
            if ck not in ours:
                sys.exit(f"model parameter {name} -> {ck} is not in the checkpoint")
            diff = (view - ours[ck].to(torch.float64)).abs().max().item()
            if diff != 0:
                sys.exit(f"{ck}: loaded weights differ from the checkpoint by {diff}")
            seen.add(ck)
    missing = set(ours) - seen
    if missing:
        sys.exit(f"checkpoint tensors not used by the model: {sorted(missing)[:5]}")

    g = torch.Generator().manual_seed(args.seed)
    ids = torch.randint(0, 256, (args.batch, args.seq), generator=g)
    # The loss is computed here rather than with labels=: transformers casts logits to float32
    # inside its loss, which would leave the gradients with float32 precision.
    out = model(input_ids=ids)
    V = out.logits.shape[-1]
    loss = torch.nn.functional.cross_entropy(out.logits[:, :-1].reshape(-1, V), ids[:, 1:].reshape(-1))
    loss.backward()

    tensors = {"input_ids": ids.contiguous(), "logits": out.logits.detach().contiguous(),
               "loss": loss.detach().reshape(())}
    for name, p in model.named_parameters():
        for ck, view in split(name, p.grad).items():
            tensors["grad." + ck] = view.contiguous().clone()
    meta = {"transformers": transformers.__version__, "torch": torch.__version__,
            "note": "float64 forward/backward of Qwen3MoeForCausalLM, eager attention"}
    save_file(tensors, args.out, metadata=meta)
    print(f"wrote {args.out}: loss {loss.item():.10f}, {len(tensors)} tensors, "
          f"transformers {transformers.__version__}, torch {torch.__version__}")


if __name__ == "__main__":
    main()
