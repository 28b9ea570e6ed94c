"""LAMB stays LAMB under DeepSpeed ZeRO: 2-rank trajectories equal the unpartitioned reference.

One pair of worker processes (this file run as a script, gloo on loopback, DS_ACCELERATOR=cpu,
fp32) trains the same small model from the same initial weights on the same global batches in
several DeepSpeed configurations and saves the parameters after every step.  The tests compare
them with a single-process run of plain PyTorch + our Lamb on the whole batch (grad clipping
included: DeepSpeed's ``gradient_clipping`` there, Lamb's own ``max_grad_norm`` here).

The model's tensors have deliberately different scales, so trust ratios of partition pieces differ
a lot from those of whole tensors, and a partition boundary falls inside a weight matrix (checked).
The negative control runs Lamb on ZeRO-2 with each flat partition treated as one tensor -- what an
optimizer unaware of the partitioning computes -- and must miss the reference by far more than the
tolerance.
"""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from torch import nn

STEPS = 5
GLOBAL_BATCH = 8
WORLD = 2
RTOL = 1e-6  # per tensor: max |zero - reference| <= RTOL * max |reference|
LR = 2e-2
CLIP = 1.0

pytestmark = pytest.mark.slow


# --------------------------------------------------------------------------------------------
# Model and data, shared by the workers and the reference
# --------------------------------------------------------------------------------------------
class ScaledNet(nn.Module):
    """Linear/LayerNorm stack with weights of very different scales (trust ratios ~1e-2 .. 1e2)."""

    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(12, 40)
        self.norm1 = nn.LayerNorm(40)
        self.mid = nn.Linear(40, 24)
        self.norm2 = nn.LayerNorm(24)
        self.out = nn.Linear(24, 3)

    def forward(self, x):
        x = self.norm1(torch.tanh(self.inp(x)))
        x = self.norm2(torch.tanh(self.mid(x)))
        return self.out(x)


def make_model() -> ScaledNet:
    torch.manual_seed(0)
    model = ScaledNet()
    with torch.no_grad():
        model.inp.weight.mul_(3.0)
        model.mid.weight.mul_(0.1)
        model.out.weight.mul_(3.0)
        model.norm1.weight.normal_(1.0, 0.5)
        model.norm1.bias.normal_(0.0, 1.0)
        model.norm2.bias.normal_(0.0, 2.0)
        model.out.bias.fill_(0.5)
    return model


def make_data() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(STEPS, GLOBAL_BATCH, 12, generator=generator)
    y = torch.randn(STEPS, GLOBAL_BATCH, 3, generator=generator)
    return x, y


def loss_fn(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return (model(x) - y).square().mean()


def opt_config(name: str = "lamb"):
    from pretrain.config import OptimizerConfig
    # AdamW has no trust ratio to scale its steps to the weights: a LAMB-sized lr would dwarf mid.weight.
    lr = LR if name == "lamb" else LR / 20
    return OptimizerConfig(name=name, lr=lr, weight_decay=0.01, max_grad_norm=CLIP, max_trust_ratio=10.0)


# --------------------------------------------------------------------------------------------
# Scenarios run by the workers
# --------------------------------------------------------------------------------------------
SCENARIOS = {
    # name: (optimizer, zero_optimization section, gradient accumulation steps, naive)
    "zero0": ("lamb", {"stage": 0}, 1, False),
    "zero1": ("lamb", {"stage": 1}, 1, False),
    "zero2": ("lamb", {"stage": 2, "overlap_comm": True, "contiguous_gradients": True}, 1, False),
    "zero2_no_overlap_round_robin": ("lamb", {"stage": 2, "overlap_comm": False, "contiguous_gradients": False,
                                              "round_robin_gradients": True}, 1, False),
    "zero2_accum2": ("lamb", {"stage": 2, "overlap_comm": True}, 2, False),
    "zero3": ("lamb", {"stage": 3, "stage3_param_persistence_threshold": 0}, 1, False),
    "zero2_naive": ("lamb", {"stage": 2}, 1, True),
    "zero2_adamw": ("adamw", {"stage": 2}, 1, False),
    "zero2_unattached": ("lamb", {"stage": 2}, 1, None),  # None: attach nothing, expect a refusal
    # bf16 weights: DeepSpeedZeroOptimizer (stage 1, bf16 grads), BF16_Optimizer (stage 1, fp32 grad
    # accumulation), FP16_UnfusedOptimizer (stage 0: per-tensor fp32 masters).
    "zero1_bf16": ("lamb", {"stage": 1}, 1, False),
    "zero1_bf16_fp32_accum": ("lamb", {"stage": 1}, 1, False),
    "zero0_bf16": ("lamb", {"stage": 0}, 1, False),
}
EXTRA_DS_CONFIG = {
    "zero1_bf16": {"bf16": {"enabled": True}},
    "zero1_bf16_fp32_accum": {"bf16": {"enabled": True}, "data_types": {"grad_accum_dtype": "fp32"}},
    "zero0_bf16": {"bf16": {"enabled": True}},
}


def _snapshot(engine) -> dict[str, torch.Tensor]:
    import deepspeed
    params = list(engine.module.parameters())
    with deepspeed.zero.GatheredParameters(params, enabled=hasattr(params[0], "ds_id")):
        return {name: p.detach().clone() for name, p in engine.module.named_parameters()}


def _register_naive_layouts(engine) -> None:
    """Treat each flat partition as ONE tensor: the per-partition trust ratio of an unaware LAMB."""
    from pretrain.optim.partition import PartitionLayout, Segment
    zero_opt = engine.optimizer
    for flat in zero_opt.single_partition_of_fp32_groups:
        layout = PartitionLayout(flat, (Segment(0, 0, flat.numel(), 0),), ("flat partition",), None, 1)
        engine.optimizer.optimizer.register_partition_layout(layout)


def run_scenario(name: str, rank: int) -> dict:
    import deepspeed
    from pretrain.engine import initialize
    from pretrain.engine.config import optimizer_entries
    from pretrain.optim import build_optimizer

    optimizer_name, zero, accum, naive = SCENARIOS[name]
    cfg = opt_config(optimizer_name)
    model = make_model()
    optimizer = build_optimizer(model, cfg, "reference")
    micro = GLOBAL_BATCH // WORLD // accum
    ds_config = {"train_batch_size": GLOBAL_BATCH, "train_micro_batch_size_per_gpu": micro,
                 "gradient_accumulation_steps": accum, "zero_optimization": zero, "steps_per_print": 10**9,
                 **optimizer_entries(cfg), **EXTRA_DS_CONFIG.get(name, {})}
    if naive is False:
        engine, attached = initialize(model, optimizer, ds_config)   # what the training engine does
    else:
        with optimizer.held():
            engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config)
        if naive:
            _register_naive_layouts(engine)
        attached = "naive" if naive else "nothing"
    layouts = [[[s.tensor_index, s.start, s.length, s.tensor_offset] for s in layout.segments]
               for layout in getattr(optimizer, "_layouts", {}).values()]
    x, y = make_data()
    trajectory = [_snapshot(engine)]
    for step in range(STEPS):
        local_x = x[step].chunk(WORLD)[rank].chunk(accum)
        local_y = y[step].chunk(WORLD)[rank].chunk(accum)
        dtype = next(engine.module.parameters()).dtype
        for mx, my in zip(local_x, local_y):
            engine.backward(loss_fn(engine, mx.to(dtype), my.to(dtype)))
            engine.step()
        trajectory.append(_snapshot(engine))
    engine.destroy()
    return {"trajectory": trajectory, "attached": attached, "layouts": layouts}


def worker(out_dir: str, names: list[str]) -> None:
    import deepspeed
    torch.set_num_threads(1)
    deepspeed.init_distributed(dist_backend="gloo")
    rank = int(os.environ["RANK"])
    results = {}
    for name in names:
        started = time.perf_counter()
        try:
            results[name] = run_scenario(name, rank)
        except Exception as err:  # recorded so one broken scenario does not hide the others
            results[name] = {"error": f"{type(err).__name__}: {err}"}
        torch.distributed.barrier()
        print(f"scenario {name}: {time.perf_counter() - started:.1f} s", flush=True)
    torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))


# --------------------------------------------------------------------------------------------
# Launch and reference
# --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def zero_runs(tmp_path_factory) -> list[dict]:
    out_dir = tmp_path_factory.mktemp("lamb_zero")
    from pretrain.distributed import free_port

    port = free_port()
    repo = str(Path(__file__).resolve().parents[2])
    procs = []
    for rank in range(WORLD):
        env = dict(os.environ, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(WORLD),
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1",
                   PYTHONPATH=os.pathsep.join(filter(None, [repo, os.environ.get("PYTHONPATH")])))
        log = open(out_dir / f"rank{rank}.log", "w")
        procs.append((subprocess.Popen([sys.executable, __file__, "worker", str(out_dir)], env=env,
                                       stdout=log, stderr=subprocess.STDOUT), log))
    for proc, log in procs:
        try:
            proc.wait(timeout=300)
        finally:
            if proc.poll() is None:
                proc.kill()
            log.close()
    for rank, (proc, _) in enumerate(procs):
        if proc.returncode != 0:
            tail = (out_dir / f"rank{rank}.log").read_text()[-4000:]
            pytest.fail(f"worker rank {rank} exited with {proc.returncode}:\n{tail}")
    return [torch.load(out_dir / f"rank{rank}.pt") for rank in range(WORLD)]


def reference_trajectory(optimizer_name: str, micro_batches: int = WORLD) -> list[dict[str, torch.Tensor]]:
    """Single process, whole global batch, our optimizer without DeepSpeed (Lamb clips by itself).

    The batch is cut into the same micro-batches the ranks see and their gradients summed, as
    DeepSpeed does; cutting it differently changes fp32 rounding, which this ill-conditioned
    model amplifies to ~1e-5 (measured), while the partitioning itself changes nothing."""
    from pretrain.optim import build_optimizer
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the workers' reduction order
    try:
        model = make_model()
        optimizer = build_optimizer(model, opt_config(optimizer_name), "reference", clips_itself=True)
        x, y = make_data()
        trajectory = [{n: p.detach().clone() for n, p in model.named_parameters()}]
        for step in range(STEPS):
            optimizer.zero_grad()
            for mx, my in zip(x[step].chunk(micro_batches), y[step].chunk(micro_batches)):
                (loss_fn(model, mx, my) / micro_batches).backward()
            if optimizer_name == "adamw":
                torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)
            optimizer.step()
            trajectory.append({n: p.detach().clone() for n, p in model.named_parameters()})
        return trajectory
    finally:
        torch.set_num_threads(threads)


def max_relative_difference(run: list[dict], reference: list[dict]) -> float:
    """max over steps and tensors of max|run - ref| / max|ref|."""
    worst = 0.0
    for got, want in zip(run, reference, strict=True):
        for name, ref in want.items():
            worst = max(worst, ((got[name] - ref).abs().max() / ref.abs().max()).item())
    return worst


def _scenario(zero_runs, name: str) -> dict:
    result = zero_runs[0][name]
    if "error" in result:
        pytest.fail(f"scenario {name} failed in the worker: {result['error']}")
    return result


# --------------------------------------------------------------------------------------------
# Tests
# --------------------------------------------------------------------------------------------
def test_reference_moves_parameters_substantially():
    """Guard for the comparisons below: 5 steps change every weight tensor far beyond RTOL."""
    reference = reference_trajectory("lamb")
    for name, start in reference[0].items():
        moved = ((reference[-1][name] - start).abs().max() / reference[-1][name].abs().max()).item()
        assert moved > 1e3 * RTOL, (name, moved)


@pytest.mark.parametrize("scenario, attached", [
    ("zero0", "unpartitioned"),
    ("zero1", "zero-1/2"),
    ("zero2", "zero-1/2"),
    ("zero2_no_overlap_round_robin", "zero-1/2"),
    ("zero2_accum2", "zero-1/2"),
    ("zero3", "zero-3"),
])
def test_lamb_under_zero_follows_unpartitioned_reference(zero_runs, scenario, attached):
    result = _scenario(zero_runs, scenario)
    assert result["attached"] == attached
    micro_batches = WORLD * SCENARIOS[scenario][2]
    difference = max_relative_difference(result["trajectory"], reference_trajectory("lamb", micro_batches))
    print(f"{scenario}: max relative trajectory difference {difference:.2e}")
    assert difference <= RTOL
    # Both ranks hold the same full parameters.
    assert max_relative_difference(zero_runs[1][scenario]["trajectory"], result["trajectory"]) == 0.0


def test_a_partition_boundary_falls_inside_a_tensor(zero_runs):
    """Rank 0's last segment and rank 1's first segment of a flat group belong to one tensor."""
    split = []
    for layouts0, layouts1 in zip(_scenario(zero_runs, "zero2")["layouts"],
                                  zero_runs[1]["zero2"]["layouts"]):
        last0, first1 = layouts0[-1], layouts1[0]
        if last0[0] == first1[0]:
            assert first1[3] == last0[3] + last0[2]  # rank 1 continues where rank 0 stopped
            split.append(last0[0])
    assert split, "no tensor is split between the ranks: the test would not exercise the cross-rank norm"


def test_naive_per_partition_trust_ratio_diverges(zero_runs):
    """Negative control: the same harness with per-partition trust ratios misses by far more than RTOL."""
    result = _scenario(zero_runs, "zero2_naive")
    difference = max_relative_difference(result["trajectory"], reference_trajectory("lamb"))
    print(f"naive per-partition LAMB: max relative trajectory difference {difference:.2e}")
    assert difference > 1e3 * RTOL


def test_adamw_under_zero2_follows_unpartitioned_reference(zero_runs):
    result = _scenario(zero_runs, "zero2_adamw")
    assert result["attached"] == "none"
    difference = max_relative_difference(result["trajectory"], reference_trajectory("adamw"))
    print(f"adamw zero2: max relative trajectory difference {difference:.2e}")
    assert difference <= RTOL


def test_lamb_refuses_zero_partitions_without_layout(zero_runs):
    """Without the layout attached, Lamb raises instead of using per-partition trust ratios."""
    for rank in range(WORLD):
        error = zero_runs[rank]["zero2_unattached"].get("error", "")
        assert error.startswith("UnknownTensorError") and "attach_layout" in error


@pytest.mark.parametrize("scenario, attached", [
    ("zero1_bf16", "zero-1/2"),
    ("zero1_bf16_fp32_accum", "bf16-optimizer"),
    ("zero0_bf16", "whole-tensor copies"),
])
def test_lamb_attaches_to_bf16_optimizers(zero_runs, scenario, attached):
    """bf16 weights: the layout is derived (and checked against memory at attach) for each of
    DeepSpeed's bf16 optimizer wrappers, and training moves every tensor, identically on both ranks.
    (Trajectories are not compared: bf16 rounding dominates any fp32 reference.)"""
    result = _scenario(zero_runs, scenario)
    assert result["attached"] == attached
    first, last = result["trajectory"][0], result["trajectory"][-1]
    for name, start in first.items():
        assert start.dtype == torch.bfloat16 and torch.isfinite(last[name]).all()
        assert not torch.equal(start, last[name]), name
    assert max_relative_difference(zero_runs[1][scenario]["trajectory"], result["trajectory"]) == 0.0


if __name__ == "__main__" and sys.argv[1:2] == ["worker"]:
    worker(sys.argv[2], sys.argv[3:] or list(SCENARIOS))
