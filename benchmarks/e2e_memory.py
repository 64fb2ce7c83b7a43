"""End-to-end peak memory and throughput: a BERT-base encoder + a 2,812,281-label head (the paper's headline).

    python benchmarks/e2e_memory.py --out e2e_memory.json            # on the H200 (torch, triton, transformers)

Encoder: `transformers.BertModel(BertConfig())` with random weights, bf16, SDPA attention, mean pooling, sequence
length 128, batch 128, AdamW on the bf16 parameters (torch's; torch-optimi is not on the GPU machine), activation
checkpointing on by default (`--no-checkpointing` for the other row). Heads, one after another in one process:
  fp8   ELMO: float8_e4m3fn weights, `elmo_kernels.head_step` (fused logits/grad/update, stochastic rounding)
  bf16  ELMO: bfloat16 weights, the same kernels
  fp32  the baseline: fp32 master weights, bf16 GEMMs per label chunk, the weight gradient materialized (fp32,
        L x D) and applied by SGD after the pass (PyTorch AMP style)
For each: a few warm-up steps, then `--steps` timed steps; peak = torch.cuda.max_memory_allocated over the timed
steps (weights, optimizer state, activations, everything). The repository is not installed there: its root is put
on sys.path. Keep the whole run under ~5 minutes.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from elmo_kernels.head_step import LABEL_ALIGN, HeadStepConfig, head_step  # noqa: E402

GIB = 2**30


def build_encoder(args, device):
    from transformers import BertConfig, BertModel

    cfg = BertConfig(num_hidden_layers=args.layers) if args.layers else BertConfig()
    if args.hidden:  # a small encoder (e.g. 6 layers x 384, MiniLM-sized): 64-dim heads, 4x MLP
        cfg.hidden_size, cfg.num_attention_heads, cfg.intermediate_size = (
            args.hidden,
            args.hidden // 64,
            4 * args.hidden,
        )
    cfg._attn_implementation = "sdpa"
    model = BertModel(cfg, add_pooling_layer=False).to(device=device, dtype=torch.bfloat16)
    mode = getattr(args, "encoder_fp8_mode", "")
    if mode:
        # torchao's FP8 training linears (dynamic per-tensor scales), as the paper does for the encoder
        from torchao.float8 import convert_to_float8_training

        def divisible(module, fqn):
            return (
                isinstance(module, torch.nn.Linear) and module.in_features % 16 == 0 and module.out_features % 16 == 0
            )

        convert_to_float8_training(model, module_filter_fn=divisible)
        if mode == "compiled":
            model = torch.compile(model)
    if args.checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    return model, cfg.hidden_size, cfg.vocab_size


def encode(model, ids, mask):
    hidden = model(input_ids=ids, attention_mask=mask).last_hidden_state
    m = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * m).sum(1) / m.sum(1).clamp_min(1)


class ElmoHead:
    """Low-precision weights in label chunks, trained by the fused kernels (no gradient tensor, no master copy)."""

    def __init__(self, labels, dim, dtype, chunk, device, lr, kernel="auto"):
        rows = -(-labels // LABEL_ALIGN) * LABEL_ALIGN
        self.weight = torch.empty(rows, dim, dtype=dtype, device=device)
        for c in self.weight.split(chunk):  # init chunk by chunk: no fp32 copy of the whole head
            c.copy_((torch.randn(c.shape, device=device) * 0.05).to(dtype))
        self.chunks, self.labels, self.lr, self.kernel = list(self.weight.split(chunk)), labels, lr, kernel

    def step(self, x, pos_rows, pos_cols, seed):
        cfg = HeadStepConfig(lr=self.lr, seed=seed, kernel=self.kernel)
        return head_step(self.chunks, x, pos_rows, pos_cols, cfg, num_labels=self.labels).dx


class Fp32MasterHead:
    """fp32 weights; per chunk bf16 copies for the GEMMs; the fp32 weight gradient is materialized, then SGD."""

    def __init__(self, labels, dim, chunk, device, lr):
        self.weight = torch.empty(labels, dim, dtype=torch.float32, device=device)
        for c in self.weight.split(chunk):
            c.normal_(0, 0.05)
        self.grad = torch.zeros_like(self.weight)
        self.chunk, self.lr = chunk, lr

    def step(self, x, pos_rows, pos_cols, seed):
        xb = x.to(torch.bfloat16)
        pos_rows, pos_cols = pos_rows.to(x.device), pos_cols.to(x.device)
        dx = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
        for start in range(0, self.weight.shape[0], self.chunk):
            w = self.weight[start : start + self.chunk]
            wb = w.to(torch.bfloat16)
            g = torch.sigmoid((xb @ wb.T).float())
            sel = (pos_cols >= start) & (pos_cols < start + w.shape[0])
            g[pos_rows[sel], pos_cols[sel] - start] -= 1.0
            gb = g.to(torch.bfloat16)
            dx += (gb @ wb).float()
            self.grad[start : start + self.chunk] = (gb.T @ xb).float()
        self.weight.add_(self.grad, alpha=-self.lr)
        return dx


def run_variant(name, args, device, fp8_encoder=""):
    args.encoder_fp8_mode = fp8_encoder
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    model, dim, vocab = build_encoder(args, device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    if name == "fp32":
        head = Fp32MasterHead(args.labels, dim, args.chunk, device, lr=1e-3)
    else:
        dtype = torch.float8_e4m3fn if name.startswith("fp8") else torch.bfloat16
        kernel = name.split(":")[1] if ":" in name else "auto"  # e.g. "fp8:fused"
        head = ElmoHead(args.labels, dim, dtype, args.chunk, device, lr=1e-3, kernel=kernel)
    gen = torch.Generator(device=device).manual_seed(0)
    ids = torch.randint(0, vocab, (args.batch, args.seq), device=device, generator=gen)
    mask = torch.ones_like(ids)
    per_row = 5
    # The pairs live on the CPU, as the trainer passes them (the head step then needs no host synchronisation).
    pair_gen = torch.Generator().manual_seed(0)
    pos_rows = torch.arange(args.batch).repeat_interleave(per_row)
    times, head_times = [], []
    start_evt, end_evt = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    for step in range(args.warmup + args.steps):
        if step == args.warmup:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        pos_cols = torch.randint(0, args.labels, (args.batch * per_row,), generator=pair_gen)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        x = encode(model, ids, mask)
        start_evt.record()
        dx = head.step(x.detach(), pos_rows, pos_cols, seed=step)
        end_evt.record()
        x.backward(dx.to(x.dtype))
        opt.step()
        opt.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        if step >= args.warmup:
            times.append(time.perf_counter() - t0)
            head_times.append(start_evt.elapsed_time(end_evt) / 1e3)
    peak = torch.cuda.max_memory_allocated() / GIB
    head_gib = head.weight.numel() * head.weight.element_size() / GIB
    del model, opt, head
    times.sort()
    head_times.sort()
    median = times[len(times) // 2]
    head_median = head_times[len(head_times) // 2]
    return {
        "head": name,
        "encoder_linears": f"fp8 (torchao, {fp8_encoder})" if fp8_encoder else "bf16",
        "checkpointing": args.checkpointing,
        "peak_gib": round(peak, 3),
        "head_weights_gib": round(head_gib, 3),
        "samples_per_s": round(args.batch / median, 1),
        "step_ms_median": round(1e3 * median, 2),
        "head_ms_median": round(1e3 * head_median, 2),
        "head_share": round(head_median / median, 3),
    }


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--labels", type=int, default=2_812_281)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--layers", type=int, default=0, help="BERT layers (0: BertConfig's default, 12)")
    p.add_argument("--hidden", type=int, default=0, help="BERT hidden size (0: BertConfig's default, 768)")
    p.add_argument("--chunk", type=int, default=262_144, help="labels per chunk (a multiple of 16)")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--heads", default="fp8,bf16,fp32", help="fp8, bf16, fp32; fp8:fused for the one-pass kernel")
    p.add_argument("--no-checkpointing", dest="checkpointing", action="store_false")
    p.add_argument("--also-without-checkpointing", action="store_true", help="add an fp8 row without checkpointing")
    p.add_argument("--fp8-encoder", action="store_true", help="add fp8-head rows with torchao FP8 encoder linears")
    p.add_argument("--out", default="e2e_memory.json")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("e2e_memory needs a CUDA GPU")
    device = torch.device("cuda")
    rows = [run_variant(h, args, device) for h in args.heads.split(",")]
    if args.fp8_encoder:
        for mode in ("eager", "compiled"):
            try:
                rows.append(run_variant("fp8", args, device, fp8_encoder=mode))
            except Exception as e:  # report and go on: the other rows still stand
                print(f"fp8 encoder ({mode}) failed: {type(e).__name__}: {str(e)[:300]}", flush=True)
    if args.also_without_checkpointing:
        args.checkpointing = False
        rows.append(run_variant("fp8", args, device))
    import transformers
    import triton

    meta = {
        "gpu": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "transformers": transformers.__version__,
        "date": time.strftime("%Y-%m-%d"),
        "labels": args.labels,
        "batch": args.batch,
        "seq": args.seq,
        "encoder": f"BERT config, {args.layers or 12} layers x {args.hidden or 768}, random weights, bf16, SDPA",
    }
    Path(args.out).write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    print(meta["gpu"])
    print("| head | encoder linears | checkpointing | peak GiB | head weights GiB | samples/s | step ms | head ms |")
    print("|---|---|---|---:|---:|---:|---:|---:|")
    for r in rows:
        print(
            f"| {r['head']} | {r['encoder_linears']} | {r['checkpointing']} | {r['peak_gib']:.2f} | "
            f"{r['head_weights_gib']:.2f} | "
            f"{r['samples_per_s']:.0f} | {r['step_ms_median']:.1f} | {r['head_ms_median']:.1f} |"
        )


if __name__ == "__main__":
    main()
