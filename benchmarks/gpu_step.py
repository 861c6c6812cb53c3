"""GPU step benchmark: a bge-base-sized BERT (built from a config, random weights) trained with
bge-ray's embedder, loss, optimizer and DeepSpeed config on one GPU, in bf16.

Measures optimizer steps/s, tokens/s (real and padded), peak GPU memory and model FLOPs
utilisation for a few variants (SDPA vs eager attention, gradient checkpointing, ZeRO stage,
batch size). Batches are synthetic token ids with FlagEmbedding-like shapes: B queries of up to
64 tokens and B x group passages of 96-256 tokens, padded to the longest in the batch.
No Ray here: this isolates the per-worker step that Ray Train runs.

    python benchmarks/gpu_step.py --out gpu_step.json
    python benchmarks/gpu_step.py --device cpu --tiny --steps 2 --warmup 1   # the smoke test, no GPU

MFU = model FLOPs per step / step time / the GPU's dense bf16 peak, with model FLOPs per token
= 6 x (non-embedding parameters) + 12 x layers x hidden x (sequence length): ``mfu`` over the padded
tokens the GPU computes, ``mfu_real`` over the real tokens alone (each at its own sequence's length),
the work a run actually needed.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch

# dense bf16 peaks by card name; L40S before L4, which its name contains
PEAK_BF16_TFLOPS = {"H100": 989.4, "H200": 989.4, "A100": 312.0, "L40S": 362.0, "L4": 121.0, "A10G": 125.0}


def peak_tflops(name: str) -> float | None:
    for key, value in PEAK_BF16_TFLOPS.items():
        if key in name:
            return value
    return None


def make_batch(batch: int, group: int, qlen: int, plen: int, vocab: int, gen: torch.Generator) -> dict:
    def segment(n: int, lo: int, hi: int) -> tuple[torch.Tensor, torch.Tensor]:
        lengths = torch.randint(lo, hi + 1, (n,), generator=gen)
        longest = int(lengths.max())
        ids = torch.randint(1000, vocab, (n, longest), generator=gen)
        mask = (torch.arange(longest).unsqueeze(0) < lengths.unsqueeze(1)).long()
        ids = ids * mask
        ids[:, 0] = 101
        return ids, mask

    q_ids, q_mask = segment(batch, 8, qlen)
    p_ids, p_mask = segment(batch * group, 96, plen)
    return {"q_input_ids": q_ids, "q_attention_mask": q_mask, "p_input_ids": p_ids, "p_attention_mask": p_mask}


SHAPES = {"base": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072),
          "tiny": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128)}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def run_variant(name: str, attn: str, grad_ckpt: bool, zero: str, batch: int, group: int, steps: int, warmup: int,
                qlen: int, plen: int, device: torch.device, shape: str = "base") -> dict:
    import deepspeed
    from transformers import BertConfig, BertModel

    from bge_ray.config import FinetuneConfig
    from bge_ray.config.deepspeed import build_deepspeed_config, fill_model_sizes
    from bge_ray.model.embedder import Embedder
    from bge_ray.model.loss import contrastive_loss
    from bge_ray.model.optim import build_optimizer, build_scheduler

    torch.manual_seed(0)
    bert_cfg = BertConfig(vocab_size=30522, max_position_embeddings=512, **SHAPES[shape])
    bert_cfg._attn_implementation = attn
    model = Embedder(BertModel(bert_cfg), pooling="cls", normalize=True)
    if grad_ckpt:
        model.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    cfg = FinetuneConfig(model_name_or_path="bge-base-from-config", train_data=["synthetic"], output_dir="/tmp/x",
                         per_device_train_batch_size=batch, train_group_size=group, bf16=device.type == "cuda",
                         use_gpu=device.type == "cuda", deepspeed=zero, learning_rate=1e-5, temperature=0.02)
    total = warmup + steps
    ds_config = fill_model_sizes(build_deepspeed_config(cfg, world_size=1, total_steps=total), bert_cfg.hidden_size,
                                 sum(p.numel() for p in model.parameters()))
    optimizer = build_optimizer(model, cfg)
    scheduler = build_scheduler(optimizer, cfg, 2, total)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config,
                                           dist_init_required=False)
    non_embed = sum(p.numel() for n, p in model.named_parameters() if "embeddings" not in n)
    gen = torch.Generator().manual_seed(1)
    batches = [make_batch(batch, group, qlen, plen, 30522, gen) for _ in range(4)]
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    losses, flops, real_flops, real_tokens, padded_tokens = [], 0.0, 0.0, 0, 0
    per_token = 6 * non_embed
    per_token_per_position = 12 * bert_cfg.num_hidden_layers * bert_cfg.hidden_size
    t0 = None
    for step in range(total):
        if step == warmup:
            sync(device)
            t0 = time.perf_counter()
        b = {k: v.to(device, non_blocking=True) for k, v in batches[step % len(batches)].items()}
        q, p = engine(b["q_input_ids"], b["q_attention_mask"], b["p_input_ids"], b["p_attention_mask"])
        loss = contrastive_loss(q.float(), p.float(), cfg.temperature)
        engine.backward(loss)
        engine.step()
        if step >= warmup:
            losses.append(loss.detach())
            for ids_key, mask_key in (("q_input_ids", "q_attention_mask"), ("p_input_ids", "p_attention_mask")):
                n, s = b[ids_key].shape
                lengths = batches[step % len(batches)][mask_key].sum(dim=1).double()
                padded_tokens += n * s
                real_tokens += int(lengths.sum())
                flops += n * s * (per_token + per_token_per_position * s)
                real_flops += float((lengths * (per_token + per_token_per_position * lengths)).sum())
    sync(device)
    elapsed = time.perf_counter() - t0
    peak = peak_tflops(torch.cuda.get_device_name()) if device.type == "cuda" else None
    out = {
        "variant": name, "attn": attn, "gradient_checkpointing": grad_ckpt, "deepspeed": zero,
        "batch": batch, "group": group, "steps_timed": steps, "step_s": elapsed / steps,
        "query_groups_per_s": batch * steps / elapsed,
        "tokens_per_s_real": real_tokens / elapsed, "tokens_per_s_padded": padded_tokens / elapsed,
        "model_tflops_per_s": flops / elapsed / 1e12,
        "mfu": (flops / elapsed / 1e12 / peak) if peak else None,
        "real_model_tflops_per_s": real_flops / elapsed / 1e12,
        "mfu_real": (real_flops / elapsed / 1e12 / peak) if peak else None,
        "peak_gpu_mem_gib": torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None,
        "loss_first": float(losses[0]), "loss_last": float(losses[-1]),
        "loss_finite": bool(torch.isfinite(torch.stack(losses)).all()),
    }
    engine.destroy() if hasattr(engine, "destroy") else None
    del engine, model, optimizer
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return out


VARIANTS = [
    # name, attn, grad_ckpt, zero, batch
    ("sdpa-zero2-b32", "sdpa", False, "zero2", 32),
    ("eager-zero2-b32", "eager", False, "zero2", 32),
    ("sdpa-zero2-b32-gc", "sdpa", True, "zero2", 32),
    ("sdpa-zero0-b32", "sdpa", False, "zero0", 32),
    ("sdpa-zero2-b64", "sdpa", False, "zero2", 64),
]


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--group", type=int, default=8)
    ap.add_argument("--qlen", type=int, default=64)
    ap.add_argument("--plen", type=int, default=256)
    ap.add_argument("--only", default=None, help="comma-separated variant names")
    ap.add_argument("--out", default="gpu_step.json")
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--tiny", action="store_true", help="a 2-layer, 64-wide BERT (the smoke test)")
    ap.add_argument("--batch", type=int, default=None, help="queries per step for every variant run")
    args = ap.parse_args()
    for k, v in {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29533", "RANK": "0", "WORLD_SIZE": "1",
                 "LOCAL_RANK": "0"}.items():
        os.environ.setdefault(k, v)
    import deepspeed

    device = torch.device(args.device)
    deepspeed.init_distributed(dist_backend="nccl" if device.type == "cuda" else "gloo")
    if device.type == "cuda":
        torch.cuda.set_device(0)
    results = {"gpu": torch.cuda.get_device_name() if device.type == "cuda" else None, "torch": torch.__version__,
               "deepspeed": deepspeed.__version__, "model": "tiny" if args.tiny else "base", "variants": []}
    wanted = set(args.only.split(",")) if args.only else None
    for name, attn, gc, zero, batch in VARIANTS:
        if wanted and name not in wanted:
            continue
        try:
            r = run_variant(name, attn, gc, zero, args.batch or batch, args.group, args.steps, args.warmup, args.qlen, args.plen,
                            device, "tiny" if args.tiny else "base")
        except Exception as e:  # noqa: BLE001 - a failed variant is recorded and reported, the others still run
            r = {"variant": name, "error": f"{type(e).__name__}: {e}"}
        results["variants"].append(r)
        print(json.dumps(r), flush=True)
        with open(args.out, "w") as f:
            json.dump(results, f, indent=2)
    return 1 if any("error" in r for r in results["variants"]) else 0


if __name__ == "__main__":
    raise SystemExit(main())
