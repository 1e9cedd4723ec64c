"""A run's numbers, from the ranks to the files: the one all-reduce per step (what each rank summed
over its window, plus the stop and write-error flags every rank must agree on), the step record's
throughput, memory and Propulsion statistics, and where records go: metrics.jsonl, TensorBoard and
the progress bar, written by rank 0.

A failed write (disk full, permissions) must not stop rank 0 alone mid-step while the others
wait in a collective: it is kept and carried to every rank by the next step's all-reduce (or by
`MetricsSink.check()` before a checkpoint), which then raise the same OutputWriteError.
"""
from __future__ import annotations

import json
import logging
import re
import resource
import sys
from dataclasses import astuple, dataclass, fields
from pathlib import Path

import torch

from propulsion_ds import data, distributed as dist
from propulsion_ds.collective import rank0_write
from propulsion_ds.errors import OutputWriteError
from propulsion_ds.fsutil import write_text_atomic
from propulsion_ds.train.loss import target_tokens

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------- the per-step reduction
@dataclass
class WindowSums:
    loss_sum: float = 0.0         # per-token losses, summed
    targets: float = 0.0          # target (label) tokens
    tokens: float = 0.0           # real (non-pad) tokens
    rows: float = 0.0             # packed/padded rows

    def add(self, loss_sum: torch.Tensor, batch: dict) -> None:
        self.loss_sum += float(loss_sum.detach())
        self.targets += target_tokens(batch)
        self.tokens += float(data.real_tokens(batch))
        self.rows += float(batch["input_ids"].shape[0])


@dataclass
class StepTotals:
    sums: WindowSums              # over every rank
    stop: bool                    # some rank got a stop signal
    write_failed: bool            # rank 0 could not write metrics/TensorBoard
    peak_memory: list             # bytes, per rank


def reduce_step(sums: WindowSums, stop: bool, write_failed: bool, peak_bytes: int,
                rank: int, world: int) -> StepTotals:
    """Collective: one all-reduce for everything a step logs and every rank must agree on."""
    n = len(fields(WindowSums))
    memory = [0.0] * world
    memory[rank] = float(peak_bytes)
    out = dist.all_reduce(list(astuple(sums)) + [float(stop), float(write_failed)] + memory)
    return StepTotals(WindowSums(*out[:n]), out[n] > 0, out[n + 1] > 0, out[n + 2:])


def window_targets(window: list) -> float:
    """Collective: the target tokens of an accumulation window on all ranks."""
    n, = dist.all_reduce([float(sum(target_tokens(b) for b in window))])
    return n


# ----------------------------------------------------------------------------- the record
LAYER = re.compile(r"\.(\d+)\.")


def peak_memory_bytes() -> int:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated()
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss if sys.platform == "darwin" else rss * 1024


def flops_per_token(n_params: int, trainable_weights: bool = False) -> float:
    """Forward 2N; backward 2N for activation gradients, plus 2N more only if weights train."""
    return (6.0 if trainable_weights else 4.0) * n_params


def estimate_mfu(n_params: int, tokens_per_s: float, peak_flops: float | None) -> float | None:
    """nanoGPT-style model FLOPs utilisation; None where the peak is unknown (CPU)."""
    if not peak_flops:
        return None
    return flops_per_token(n_params) * tokens_per_s / peak_flops


GPU_PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L40S": 362e12, "A10G": 125e12}


def gpu_peak_flops() -> float | None:
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    return next((v for k, v in GPU_PEAK_BF16.items() if k in name), None)


def layer_of(module_name: str) -> str:
    m = LAYER.search(module_name)
    return f"layer_{int(m.group(1)):03d}" if m else module_name.replace(".", "_")


def propulsion_stats(scales: dict) -> tuple[dict, torch.Tensor]:
    """Per-layer mean |z**k - 1| and all z**k values (for a histogram)."""
    groups: dict[str, list] = {}
    for name, s in scales.items():
        groups.setdefault(layer_of(name), []).append((s.float() - 1).abs())
    per_layer = {k: torch.cat(v).mean().item() for k, v in groups.items()}
    values = torch.cat([s.float().flatten() for s in scales.values()])
    return per_layer, values


# ----------------------------------------------------------------------------- the sinks
METRICS_FILE = "metrics.jsonl"
# Step record key -> TensorBoard tag; grad_norm and mfu only when known.
STEP_SCALARS = {"loss": "train/loss", "lr": "train/lr", "grad_norm": "train/grad_norm",
                "tokens_per_s": "perf/tokens_per_s", "samples_per_s": "perf/samples_per_s",
                "skipped_batches": "train/skipped_batches", "skipped_steps": "train/skipped_steps",
                "mfu": "perf/mfu"}


class MetricsSink:
    def __init__(self, out: Path, rank: int, every_steps: int):
        self.out, self.rank, self.every_steps = Path(out), rank, every_steps
        self.records: list[dict] = []     # this process's records (eval loss on every rank)
        self.writer = None
        self.error: BaseException | None = None
        self.bar = None

    def open(self, config_json: str, resume_step: int | None) -> None:
        """Collective: rank 0 writes config.json and opens the TensorBoard writer."""
        def open_files():
            self.out.mkdir(parents=True, exist_ok=True)
            write_text_atomic(self.out / "config.json", config_json)
            from torch.utils.tensorboard import SummaryWriter
            # purge_step hides events a killed run logged after the checkpoint we resume from.
            self.writer = SummaryWriter(str(self.out / "tensorboard"),
                                        purge_step=None if resume_step is None else resume_step + 1)
        rank0_write(open_files, f"cannot write to output_dir {self.out}", self.out)

    def rank0(self, fn) -> None:
        """Run a rank-0 write; a failure is kept for the next all-reduce to carry to every rank."""
        if self.rank != 0 or self.error is not None:
            return
        try:
            fn()
        except Exception as e:  # noqa: BLE001 - TensorBoard re-raises its writer thread's errors
            self.error = e
            log.error("writing under %s failed: %s", self.out, e)

    def record(self, record: dict) -> None:
        self.records.append(record)

        def append():
            with open(self.out / METRICS_FILE, "a") as f:
                f.write(json.dumps(record) + "\n")
        self.rank0(append)

    def scalars(self, values: dict, step: int) -> None:
        if self.writer:
            self.rank0(lambda: [self.writer.add_scalar(tag, v, step) for tag, v in values.items()])

    def log_step(self, record: dict, mem_per_rank: list) -> None:
        self.record(record)
        step = record["step"]
        if step % self.every_steps == 0:
            values = {tag: record[k] for k, tag in STEP_SCALARS.items() if record.get(k) is not None}
            values.update({f"memory/peak_mb_rank{r}": m / 2**20 for r, m in enumerate(mem_per_rank)})
            self.scalars(values, step)
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{record['loss']:.4f}", tok_s=f"{record['tokens_per_s']:.0f}")
            self.bar.update(1)

    def log_propulsion(self, per_layer: dict, values, step: int) -> None:
        if not self.writer:
            return

        def write():
            for name, v in per_layer.items():
                self.writer.add_scalar(f"propulsion/mean_abs_zk_minus_1/{name}", v, step)
            self.writer.add_histogram("propulsion/zk", values, step)
            self.writer.flush()
        self.rank0(write)

    def flush(self) -> None:
        if self.writer:
            self.rank0(self.writer.flush)

    def start_bar(self, total: int, initial: int) -> None:
        from tqdm.auto import tqdm
        self.bar = tqdm(total=total, initial=initial, disable=self.rank != 0, desc="train", unit="step",
                        dynamic_ncols=True)

    def close_bar(self) -> None:
        if self.bar is not None:
            self.bar.close()      # also on errors: the error line must not be glued to the bar
            self.bar = None

    def check(self, last_good: str) -> None:
        """Collective: a write that failed on rank 0 stops every rank before a checkpoint is
        written, so no checkpoint ever lies past a hole in metrics.jsonl."""
        failed, = dist.all_reduce([float(self.error is not None)])
        if failed:
            self.raise_error(last_good)

    def raise_error(self, last_good: str):
        cause = "see rank 0's log" if self.error is None else " ".join(str(self.error).split())[:200]
        raise OutputWriteError(
            f"rank 0 could not write metrics or TensorBoard events under {self.out} ({cause}); "
            f"newest checkpoint: {last_good} (resume with --resume)")

    def rewind(self, step: int) -> None:
        """On resume: rank 0 drops records after ``step`` so metrics.jsonl reads as one
        uninterrupted run. A line a kill cut short (no newline, not JSON) is dropped too."""
        path = self.out / METRICS_FILE

        def truncate():
            if not path.is_file():
                return
            keep = []
            for line in path.read_text(errors="replace").splitlines():
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    continue
                if isinstance(record, dict) and isinstance(record.get("step"), int) and record["step"] <= step:
                    keep.append(line)
            write_text_atomic(path, "".join(line + "\n" for line in keep))
        self.rank0(truncate)          # a failure is a metrics write error, raised by the next check

    def close(self) -> None:
        self.close_bar()
        if self.writer:
            try:
                self.writer.close()
            except Exception as e:  # noqa: BLE001 - never mask the error that ended the run
                log.warning("closing TensorBoard writer: %s", e)
            self.writer = None
