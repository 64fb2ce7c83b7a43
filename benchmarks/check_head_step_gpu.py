"""Quick GPU check of the head step against its torch reference at a small size (every option on).

python3 benchmarks/check_head_step_gpu.py
"""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from elmo_kernels import head_step as hs  # noqa: E402


def main() -> int:
    torch.manual_seed(0)
    failures = 0
    for dtype, fp8_dots in [(torch.bfloat16, False), (torch.float8_e4m3fn, True), (torch.float8_e4m3fn, False)]:
        w0 = (torch.randn(4096, 768, device="cuda") * 0.05).to(dtype)
        x = torch.randn(100, 768, device="cuda").to(torch.bfloat16)
        rows, cols = torch.randint(0, 100, (500,), device="cuda"), torch.randint(0, 4000, (500,), device="cuda")
        ex_rows, ex_cols = rows[:50], torch.randint(0, 4000, (50,), device="cuda")
        kahan = (torch.randn(512, 768, device="cuda") * 1e-4).to(torch.bfloat16)
        cfg = hs.HeadStepConfig(lr=0.1, weight_decay=1e-3, seed=3, compute_loss=True, fp8_dots=fp8_dots)
        out = {}
        for impl in ("triton", "torch"):
            w, k = [w0.clone()], kahan.clone()
            res = hs.head_step(
                w,
                x,
                rows,
                cols,
                cfg,
                num_labels=4000,
                kahan=k,
                impl=impl,
                exclude_rows=ex_rows,
                exclude_cols=torch.cat([cols[:1], ex_cols[1:]]),
            )
            out[impl] = (w[0], res, k)
        (wt, rt, kt), (wr, rr, kr) = out["triton"], out["torch"]
        differ = (wt.float() != wr.float()).float().mean().item()
        dx_err = ((rt.dx - rr.dx).norm() / rr.dx.norm()).item()
        kahan_differ = (kt.float() != kr.float()).float().mean().item()
        ok = differ < (0.05 if fp8_dots else 1e-3) and dx_err < (2e-3 if fp8_dots else 1e-4)
        ok = ok and abs(rt.loss - rr.loss) < 1e-3 * abs(rr.loss) and torch.equal(wt[4000:], w0[4000:])
        failures += not ok
        print(
            f"{dtype} fp8_dots={fp8_dots}: W differing {differ:.4%}, dX rel err {dx_err:.2e}, "
            f"Kahan differing {kahan_differ:.2%}, loss {rt.loss:.4f} vs {rr.loss:.4f}: {'ok' if ok else 'FAIL'}"
        )
    return failures


if __name__ == "__main__":
    sys.exit(main())
