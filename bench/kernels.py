#!/usr/bin/env python
"""Benchmark table of the fused kernels in csrc/ against PyTorch (and apex when installed).

    python bench/kernels.py                   # full table on the current CUDA device
    python bench/kernels.py --only layer_norm --reps 200
    python bench/kernels.py --markdown out.md # also write the table as Markdown
    python bench/kernels.py --smoke           # tiny shapes, any device: checks the script runs

What is measured
  * copy bandwidth: a device-to-device copy of a 1 GiB tensor (bytes read + written / time);
  * per op and implementation: median time over --reps repetitions, each timed with CUDA events
    (after --warmup untimed runs); "fwd" under torch.no_grad, "fwd+bwd" = forward with autograd
    plus torch.autograd.grad of the outputs (what a training step runs);
  * GB/s: the op's *minimal* memory traffic (listed per op below) divided by the time, the same
    byte count for every implementation, and that as a percentage of the copy bandwidth;
  * speed-up: torch's (resp. the per-tensor LAMB loop's) time over the implementation's.

Minimal traffic (e = bytes per element of the activations):
  LayerNorm      fwd: read x (+ residual), write y (+ the pre-norm sum when training with one);
                 bwd: read dy and the normalised input, write dx.  Weights and per-row
                 statistics are negligible and not counted.
  masked softmax fwd: read x, write y; bwd: read y and dy, write dx (masks of [b,1,1,k] are
                 negligible; a [b,1,q,k] mask adds its bytes once per forward).
  LAMB           the two-phase algorithm (per-tensor norms between the phases, pretrain/ops/lamb.py):
                 phase 1 reads p, g, m, v and writes m, v, u; phase 2 reads p, u and writes p
                 (10 float32 passes with float32 gradients).

Targets: LayerNorm and softmax fwd+bwd >= 80% of copy bandwidth and faster than torch;
LAMB >= 75% of copy bandwidth and >= 3x the per-tensor loop.  Figures belong in
docs/benchmarks.md only from a real GPU run (with the device name and date this prints).
"""
import argparse
import datetime
import math
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, List, Optional

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pretrain import ops  # noqa: E402
from pretrain.ops import lamb as lamb_ref  # noqa: E402
from pretrain.ops import lamb_fused  # noqa: E402


# ----------------------------------------------------------------------------- timing
class Timer:
    def __init__(self, device: torch.device, reps: int, warmup: int):
        self.device, self.reps, self.warmup = device, reps, warmup

    def __call__(self, fn: Callable[[], object]) -> float:
        """Median milliseconds of fn()."""
        for _ in range(self.warmup):
            fn()
        if self.device.type != "cuda":
            times = []
            for _ in range(self.reps):
                t0 = time.perf_counter()
                fn()
                times.append((time.perf_counter() - t0) * 1e3)
            return statistics.median(times)
        torch.cuda.synchronize(self.device)
        events = []
        for _ in range(self.reps):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            events.append((start, end))
        torch.cuda.synchronize(self.device)
        return statistics.median(s.elapsed_time(e) for s, e in events)


def copy_bandwidth(device: torch.device, timer: Timer, nbytes: int) -> float:
    """GB/s of a device-to-device copy (bytes read + bytes written)."""
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    ms = timer(lambda: dst.copy_(src))
    return 2 * nbytes / (ms * 1e-3) / 1e9


# ----------------------------------------------------------------------------- results
@dataclass
class Row:
    op: str
    shape: str
    dtype: str
    impl: str
    fwd_ms: Optional[float]
    fwdbwd_ms: Optional[float]
    gbytes: float  # minimal traffic of fwd+bwd (or of the step), GB
    baseline_ms: Optional[float]
    note: str = ""

    def cells(self, copy_gbs: float) -> List[str]:
        t = self.fwdbwd_ms if self.fwdbwd_ms is not None else self.fwd_ms
        gbs = self.gbytes / (t * 1e-3) if t else None
        return [self.op, self.shape, self.dtype, self.impl,
                _fmt(self.fwd_ms, "{:.3f}"), _fmt(self.fwdbwd_ms, "{:.3f}"),
                _fmt(gbs, "{:.0f}"), _fmt(gbs / copy_gbs * 100 if gbs else None, "{:.0f}%"),
                _fmt(self.baseline_ms / t if (self.baseline_ms and t) else None, "{:.2f}x"), self.note]


HEADER = ["op", "shape", "dtype", "impl", "fwd ms", "fwd+bwd ms", "GB/s", "% copy", "speed-up", "note"]


def _fmt(v, spec):
    return "-" if v is None else spec.format(v)


def _unavailable(op, shape, dtype, impl, why, gbytes=0.0):
    return Row(op, shape, dtype, impl, None, None, gbytes, None, f"n/a: {why}")


def _dtype_name(dt: torch.dtype) -> str:
    return str(dt).replace("torch.", "")


# ----------------------------------------------------------------------------- LayerNorm
def _apex_layer_norm():
    try:
        from apex.normalization.fused_layer_norm import (fused_layer_norm_affine,
                                                         mixed_dtype_fused_layer_norm_affine)
    except Exception as exc:  # noqa: BLE001 - any import problem: apex not usable
        return None, f"apex not importable ({type(exc).__name__})"

    def run(s, w, b, eps):
        if w.dtype != s.dtype:
            return mixed_dtype_fused_layer_norm_affine(s, w, b, (s.shape[-1],), eps)
        return fused_layer_norm_affine(s, w, b, (s.shape[-1],), eps)

    return run, ""


def bench_layer_norm(device, timer, shapes, dtypes, kernel_impl) -> List[Row]:
    rows = []
    apex_ln, apex_why = _apex_layer_norm()
    for (n_rows, hidden) in shapes:
        for dtype, wdtype in dtypes:
            for residual in (False, True):
                e = torch.finfo(dtype).bits // 8
                n = n_rows * hidden
                gb_fwd = (2 + (2 if residual else 0)) * e * n / 1e9  # x (+r) in, y (+sum) out
                gb = gb_fwd + 3 * e * n / 1e9
                x = torch.randn(n_rows, hidden, device=device, dtype=dtype, requires_grad=True)
                r = torch.randn_like(x, requires_grad=True) if residual else None
                w = torch.randn(hidden, device=device, dtype=wdtype, requires_grad=True)
                b = torch.randn(hidden, device=device, dtype=wdtype, requires_grad=True)
                dy = torch.randn_like(x)
                leaves = [t for t in (x, r, w, b) if t is not None]
                shape = f"{n_rows}x{hidden}"
                dlabel = f"{_dtype_name(dtype)}/w {_dtype_name(wdtype)}"
                name = "layer_norm + residual" if residual else "layer_norm"

                def torch_fwd():
                    return F.layer_norm(x + r if residual else x, (hidden,), w, b, 1e-12)

                def ours_fwd():
                    return ops.layer_norm(x, w, b, 1e-12, residual=r, impl=kernel_impl)

                impls = [("torch", torch_fwd), ("ours", ours_fwd)]
                if apex_ln is not None:
                    impls.append(("apex", lambda: apex_ln(x + r if residual else x, w, b, 1e-12)))
                times = {}
                for impl, fwd in impls:
                    try:
                        with torch.no_grad():
                            t_f = timer(fwd)
                        t_fb = timer(lambda: torch.autograd.grad(fwd(), leaves, dy))
                    except Exception as exc:  # noqa: BLE001 - report, keep benchmarking
                        rows.append(_unavailable(name, shape, dlabel, impl, f"{type(exc).__name__}: {exc}"[:80], gb))
                        continue
                    times[impl] = t_fb
                    rows.append(Row(name, shape, dlabel, impl, t_f, t_fb, gb, times.get("torch"),
                                    "" if impl != "ours" or kernel_impl == "cuda" else "reference fallback"))
                if apex_ln is None:
                    rows.append(_unavailable(name, shape, dlabel, "apex", apex_why, gb))
    return rows


# ----------------------------------------------------------------------------- softmax
def _apex_softmax():
    try:
        import scaled_masked_softmax_cuda  # apex's fused kernel (apex/csrc/megatron)
    except Exception as exc:  # noqa: BLE001
        return None, f"apex scaled_masked_softmax_cuda not importable ({type(exc).__name__})"

    class _Fn(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x, masked_u8, scale):
            scale_t = torch.tensor([scale])
            y = scaled_masked_softmax_cuda.forward(x, masked_u8, scale_t)
            ctx.save_for_backward(y, scale_t)
            return y

        @staticmethod
        def backward(ctx, dy):
            y, scale_t = ctx.saved_tensors
            return scaled_masked_softmax_cuda.backward(dy.contiguous(), y, scale_t[0]), None, None

    return _Fn.apply, ""


def bench_softmax(device, timer, shapes, dtypes, kernel_impl) -> List[Row]:
    rows = []
    apex_sm, apex_why = _apex_softmax()
    for (b, h, q, k) in shapes:
        for dtype in dtypes:
            e = torch.finfo(dtype).bits // 8
            n = b * h * q * k
            gb = 5 * e * n / 1e9
            x = torch.randn(b, h, q, k, device=device, dtype=dtype, requires_grad=True)
            lengths = torch.randint(k // 2, k + 1, (b,), device=device)
            keep = (torch.arange(k, device=device)[None, :] < lengths[:, None])[:, None, None, :]
            additive = torch.zeros(keep.shape, device=device, dtype=dtype).masked_fill(~keep, -10000.0)
            masked_u8 = (~keep).expand(b, 1, q, k).to(torch.uint8).contiguous()
            dy = torch.randn_like(x)
            scale = 1.0 / math.sqrt(64)
            shape = f"{b}x{h}x{q}x{k}"

            def torch_fwd():
                return torch.softmax(x * scale + additive, dim=-1)

            def ours_fwd():
                return ops.scaled_masked_softmax(x, keep, scale, impl=kernel_impl)

            impls = [("torch", torch_fwd), ("ours", ours_fwd)]
            if apex_sm is not None:
                impls.append(("apex", lambda: apex_sm(x, masked_u8, scale)))
            times = {}
            for impl, fwd in impls:
                try:
                    with torch.no_grad():
                        t_f = timer(fwd)
                    t_fb = timer(lambda: torch.autograd.grad(fwd(), [x], dy))
                except Exception as exc:  # noqa: BLE001
                    rows.append(_unavailable("masked softmax", shape, _dtype_name(dtype), impl,
                                             f"{type(exc).__name__}: {exc}"[:80], gb))
                    continue
                times[impl] = t_fb
                rows.append(Row("masked softmax", shape, _dtype_name(dtype), impl, t_f, t_fb, gb, times.get("torch"),
                                "" if impl != "ours" or kernel_impl == "cuda" else "reference fallback"))
            if apex_sm is None:
                rows.append(_unavailable("masked softmax", shape, _dtype_name(dtype), "apex", apex_why, gb))
    return rows


# ----------------------------------------------------------------------------- LAMB
def bert_param_shapes(hidden: int, layers: int, vocab: int = 30522, seq: int = 512) -> List[tuple]:
    """Parameter shapes of a BERT encoder with MLM head (the tensor-size mix LAMB steps)."""
    inter = 4 * hidden
    shapes = [(vocab, hidden), (seq, hidden), (2, hidden), (hidden,), (hidden,)]
    for _ in range(layers):
        shapes += [(hidden, hidden), (hidden,)] * 4  # q, k, v, attention output
        shapes += [(hidden,), (hidden,)]  # attention LayerNorm
        shapes += [(inter, hidden), (inter,), (hidden, inter), (hidden,), (hidden,), (hidden,)]
    shapes += [(hidden, hidden), (hidden,), (hidden, hidden), (hidden,), (hidden,), (hidden,), (vocab,)]
    return shapes


def foreach_lamb_step(params, grads, ms, vs, *, lr, beta1, beta2, eps, weight_decays, adapt, step,
                      bias_correction, min_trust_ratio, max_trust_ratio):
    """LAMB written with torch._foreach ops (the 'foreach' baseline; same math as the reference)."""
    bc1 = 1 - beta1 ** step if bias_correction else 1.0
    bc2 = 1 - beta2 ** step if bias_correction else 1.0
    torch._foreach_mul_(ms, beta1)
    torch._foreach_add_(ms, grads, alpha=1 - beta1)
    torch._foreach_mul_(vs, beta2)
    torch._foreach_addcmul_(vs, grads, grads, value=1 - beta2)
    denom = torch._foreach_div(vs, bc2)
    torch._foreach_sqrt_(denom)
    torch._foreach_add_(denom, eps)
    updates = torch._foreach_div(ms, bc1)
    torch._foreach_div_(updates, denom)
    torch._foreach_add_(updates, torch._foreach_mul(params, list(weight_decays)))
    pn = torch.stack(torch._foreach_norm(params))
    un = torch.stack(torch._foreach_norm(updates))
    ratios = lamb_ref.trust_ratios(pn, un, adapt, min_trust_ratio=min_trust_ratio, max_trust_ratio=max_trust_ratio)
    torch._foreach_mul_(updates, list((ratios * lr).unbind()))
    torch._foreach_sub_(params, updates)


def _apex_lamb():
    try:
        from apex.optimizers import FusedLAMB
    except Exception as exc:  # noqa: BLE001
        return None, f"apex not importable ({type(exc).__name__})"
    return FusedLAMB, ""


def bench_lamb(device, timer, hidden, layers, grad_dtype) -> List[Row]:
    shapes = bert_param_shapes(hidden, layers)
    gen = torch.Generator(device=device).manual_seed(0)
    params = [torch.randn(s, device=device, generator=gen) * 0.02 for s in shapes]
    grads = [(torch.randn(s, device=device, generator=gen) * 1e-3).to(grad_dtype) for s in shapes]
    grads32 = [g.float() for g in grads]
    ms = [torch.zeros_like(p) for p in params]
    vs = [torch.zeros_like(p) for p in params]
    n = sum(p.numel() for p in params)
    ge = torch.finfo(grad_dtype).bits // 8
    gb = (9 * 4 + ge) * n / 1e9
    wds = [0.0 if len(s) == 1 else 0.01 for s in shapes]
    adapt = [wd > 0 for wd in wds]
    kw = dict(lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-6, weight_decays=wds, adapt=adapt, step=10,
              bias_correction=True, min_trust_ratio=0.0, max_trust_ratio=10.0)
    label = f"BERT h{hidden} L{layers}: {len(shapes)} tensors, {n / 1e6:.0f}M params"
    dt = f"fp32 master, {_dtype_name(grad_dtype)} grads"
    rows = []
    t_loop = timer(lambda: lamb_ref.lamb_step_reference(params, grads32, ms, vs, **kw))
    rows.append(Row("LAMB step", label, dt, "per-tensor loop (reference)", t_loop, None, gb, t_loop))
    t_each = timer(lambda: foreach_lamb_step(params, grads32, ms, vs, **kw))
    rows.append(Row("LAMB step", label, dt, "torch._foreach", t_each, None, gb, t_loop))
    fused_ok = lamb_fused.available() or device.type != "cuda"
    note = "" if lamb_fused.available() else "reference fallback (no CUDA kernels here)"
    if fused_ok:
        t_ours = timer(lambda: lamb_fused.lamb_step(params, grads, ms, vs, **kw))
        rows.append(Row("LAMB step", label, dt, "ours (fused, 2 launches)", t_ours, None, gb, t_loop, note))
    else:
        rows.append(_unavailable("LAMB step", label, dt, "ours", "extension unavailable", gb))
    fused_lamb, why = _apex_lamb()
    if fused_lamb is not None and device.type == "cuda":
        ps = [torch.nn.Parameter(p.clone()) for p in params]
        for p, g in zip(ps, grads32):
            p.grad = g
        opt = fused_lamb([{"params": [p for p, a in zip(ps, adapt) if a], "weight_decay": 0.01},
                          {"params": [p for p, a in zip(ps, adapt) if not a], "weight_decay": 0.0}],
                         lr=1e-3, max_grad_norm=0.0)
        t_apex = timer(opt.step)
        rows.append(Row("LAMB step", label, dt, "apex FusedLAMB", t_apex, None, gb, t_loop))
    else:
        rows.append(_unavailable("LAMB step", label, dt, "apex FusedLAMB", why or "needs CUDA", gb))
    return rows


# ----------------------------------------------------------------------------- main
def render(rows: List[Row], copy_gbs: float, markdown: bool) -> str:
    table = [HEADER] + [r.cells(copy_gbs) for r in rows]
    if markdown:
        lines = ["| " + " | ".join(table[0]) + " |", "|" + "---|" * len(HEADER)]
        lines += ["| " + " | ".join(r) + " |" for r in table[1:]]
        return "\n".join(lines)
    widths = [max(len(r[i]) for r in table) for i in range(len(HEADER))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in table)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", choices=["layer_norm", "softmax", "lamb"], action="append",
                    help="run only these benchmarks (repeatable)")
    ap.add_argument("--reps", type=int, default=100)
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--lamb-model", choices=["base", "large"], default="large")
    ap.add_argument("--markdown", type=Path, help="also write the table (with device and date) here")
    ap.add_argument("--smoke", action="store_true",
                    help="tiny shapes, 2 reps, any device: checks the script runs (timings meaningless)")
    args = ap.parse_args(argv)

    if not torch.cuda.is_available() and not args.smoke:
        print("bench/kernels.py: no CUDA device available; nothing to benchmark "
              "(the kernels and their timings need a GPU).")
        return 0
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    reps, warmup = (2, 1) if args.smoke else (args.reps, args.warmup)
    timer = Timer(device, reps, warmup)
    kernel_impl = "cuda" if (device.type == "cuda" and ops.cuda_available()) else "auto"
    only = set(args.only or ["layer_norm", "softmax", "lamb"])

    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        copy_gbs = copy_bandwidth(device, timer, 1 << 30)
    else:
        name = "CPU (smoke run: timings are meaningless)"
        copy_gbs = copy_bandwidth(device, timer, 1 << 22)
    low = [(torch.float16, torch.float16), (torch.bfloat16, torch.bfloat16), (torch.bfloat16, torch.float32)]
    rows: List[Row] = []
    if "layer_norm" in only:
        shapes = [(64, 768)] if args.smoke else [(16384, 768), (16384, 1024), (8192, 4096), (4096, 8192)]
        rows += bench_layer_norm(device, timer, shapes, low if not args.smoke else low[:1], kernel_impl)
    if "softmax" in only:
        shapes = [(2, 2, 8, 64)] if args.smoke else [(32, 12, 512, 512), (16, 16, 512, 512), (256, 12, 128, 128),
                                                       (4, 16, 4096, 4096)]
        dts = [torch.float16, torch.bfloat16] if not args.smoke else [torch.float16]
        rows += bench_softmax(device, timer, shapes, dts, kernel_impl)
    if "lamb" in only:
        hidden, layers = (64, 2) if args.smoke else ((768, 12) if args.lamb_model == "base" else (1024, 24))
        for gdt in ([torch.float32] if args.smoke else [torch.float32, torch.bfloat16]):
            rows += bench_lamb(device, timer, hidden, layers, gdt)

    stamp = datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
    head = (f"device: {name}; {stamp}; torch {torch.__version__} (CUDA {torch.version.cuda}); "
            f"kernels: {'bertforge_C' if kernel_impl == 'cuda' else 'unavailable, reference fallback'}; "
            f"copy bandwidth {copy_gbs:.0f} GB/s; median of {reps} reps")
    print(head)
    print(render(rows, copy_gbs, markdown=False))
    if args.markdown:
        args.markdown.write_text(f"{head}\n\n{render(rows, copy_gbs, markdown=True)}\n", encoding="utf-8")
        print(f"wrote {args.markdown}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
