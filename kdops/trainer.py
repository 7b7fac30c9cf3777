"""One training loop for every task kind; what differs per kind is the loss function and the batch source.

``Trainer(cfg)`` sets up ``accelerate`` (bf16 autocast on CUDA; data parallel under ``accelerate launch``) and
seeds torch; ``fit`` runs epochs or optimiser steps with gradient accumulation, warm-up + decay, clipping,
validation with early stopping (keeping the best weights), a progress bar, history records, and checkpoints a
killed run resumes from exactly: safetensors for tensors (weights, optimiser state, RNG states), JSON for the rest.

Scaling is configuration: started by ``torchrun --nproc_per_node N`` or ``accelerate launch --multi_gpu
--num_processes N`` (gloo on CPU), every process runs the same code; the model is wrapped for data parallel (gradients
averaged), each epoch's micro-batches are padded so that every process takes as many steps (``even_batches``),
validation runs on the main process and its early-stopping decision is broadcast, and only the main process writes
checkpoints. ``processes()`` gives a round the rest: main-first blocks (a cache the main process fills), a barrier,
a broadcast.

As TRL's trainers share one loop and differ in ``compute_loss``, a kind supplies ``loss_fn(model, batch,
progress) -> (loss, logs)`` (``progress``: share of the optimiser steps done, for schedules) and a ``BatchSource``:
one epoch's micro-batches, or an endless stream in step mode, drawn from its own seeded RNG, whose state a
checkpoint keeps so that a resumed run draws what the uninterrupted run would have drawn.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import json
import logging
import math
import os
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Callable, Iterable, Protocol, Sequence

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from kdops.paths import atomic_write

log = logging.getLogger(__name__)

LossFn = Callable[[torch.nn.Module, Any, float], "tuple[torch.Tensor, dict[str, float]]"]


@dataclass(frozen=True)
class TrainerConfig:
    epochs: int | None = field(default=1, metadata={"help": "Passes over the batch source; None: step mode (max_steps)."})
    max_steps: int | None = field(default=None, metadata={"help": "Optimiser steps: the length in step mode, a cap otherwise."})
    lr: float = field(default=1e-4, metadata={"help": "Peak AdamW learning rate (parameter groups may scale it)."})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay."})
    warmup_share: float = field(default=0.06, metadata={"help": "Share of the steps spent warming the learning rate up."})
    schedule: str = field(default="linear", metadata={"help": "Decay after warm-up: 'linear' or 'cosine' (to 0)."})
    grad_accum: int = field(default=1, metadata={"help": "Micro-batches per optimiser step."})
    max_grad_norm: float | None = field(default=1.0, metadata={"help": "Clip the model's gradient norm (None: off)."})
    early_stopping_patience: int = field(default=0, metadata={"help": "Validations without a better score before stopping (0: off)."})
    eval_every: int = field(default=0, metadata={"help": "Validate every this many steps and at the end (0: after each epoch)."})
    checkpoint_every: int = field(default=0, metadata={"help": "Also checkpoint every this many steps (always after each epoch)."})
    mixed_precision: str = field(default="auto", metadata={"help": "'auto' (bf16 on CUDA), 'no' or 'bf16'."})
    compile: str = field(default="no", metadata={"help": "torch.compile the model: 'auto' (on CUDA), 'yes' or 'no'."})
    device: str = field(default="auto", metadata={"help": "'auto' (CUDA when there is one), 'cpu' or 'cuda'."})
    seed: int = field(default=13, metadata={"help": "Seed of torch (init, dropout); batch sources seed their own RNG."})

    def __post_init__(self) -> None:
        if self.epochs is None and not self.max_steps:
            raise ValueError("step mode (epochs=None) needs max_steps.")
        if any(v is not None and v < 1 for v in (self.epochs, self.max_steps, self.grad_accum)) or self.lr <= 0:
            raise ValueError("epochs, max_steps and grad_accum must be >= 1 (or None) and lr positive.")
        if not 0.0 <= self.warmup_share < 1.0 or min(self.early_stopping_patience, self.eval_every, self.checkpoint_every) < 0:
            raise ValueError("warmup_share must be in [0, 1); early_stopping_patience, eval_every, checkpoint_every >= 0.")
        for name, allowed in (("schedule", ("linear", "cosine")), ("mixed_precision", ("auto", "no", "bf16")),
                              ("compile", ("auto", "yes", "no")), ("device", ("auto", "cpu", "cuda"))):
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {getattr(self, name)!r}.")


class BatchSource(Protocol):
    batches_per_epoch: int | None  # micro-batches in one epoch over all processes; None: an endless stream

    def epoch(self, epoch: int, progress: float, batch_share: float) -> Iterable[Any]:
        """The micro-batches of ``epoch``; ``len(batch)`` rows each. ``progress``: the share of training done when
        it starts; each micro-batch drawn adds ``batch_share`` (over all processes and accumulation steps)."""

    def state(self) -> dict:
        """JSON state of the source's RNG."""

    def load_state(self, state: dict) -> None: ...


def learning_rate(base: float, step: int, total: int, warm: int, schedule: str) -> float:
    """The rate of optimiser step ``step`` (0-based) of ``total``: linear warm-up over ``warm`` steps to ``base``,
    then linear or cosine decay to 0."""
    if schedule == "cosine":
        if step < warm:
            return base * (step + 1) / warm
        return 0.5 * base * (1 + math.cos(math.pi * (step - warm) / max(1, total - warm)))
    return base * min((step + 1) / warm, max(0.0, (total - step) / max(1, total - warm)))


@dataclass
class TrainState:
    """What a resumed run needs besides tensors: ``state.json`` of a checkpoint."""

    epoch: int = -1  # the epoch in progress, or the last one finished when epoch_done
    epoch_done: bool = True
    batches_done: int = 0  # micro-batches of `epoch` this process has trained on
    epoch_start_step: int = 0
    source: dict = field(default_factory=dict)  # the batch source's RNG when `epoch` started
    step: int = 0  # optimiser steps done
    epoch_loss: float = 0.0  # summed over the epoch's micro-batches
    last_logs: dict = field(default_factory=dict)
    history: list = field(default_factory=list)  # one record per epoch
    steps: list = field(default_factory=list)  # one record per optimiser step
    evals: list = field(default_factory=list)  # validations between epochs (eval_every > 0)
    best: float | None = None
    best_epoch: int = -1
    best_step: int = -1
    last_eval_step: int = -1
    bad: int = 0  # validations since the best
    stopped: bool = False
    seen: int = 0  # rows trained on by this process


@dataclass
class TrainResult:
    history: list[dict]
    steps: list[dict]
    evals: list[dict]
    best_epoch: int
    best_step: int
    step: int
    seconds: float
    samples_per_s: float


class Trainer:
    """The accelerate setup of one training run; ``fit`` trains."""

    def __init__(self, cfg: TrainerConfig):
        self.cfg = cfg
        cpu = cfg.device == "cpu" or not torch.cuda.is_available()
        mp = cfg.mixed_precision if cfg.mixed_precision != "auto" else ("no" if cpu else "bf16")
        self.accelerator = _accelerator(cpu, mp)
        self.compile = cfg.compile == "yes" or (cfg.compile == "auto" and not cpu)
        # this loop accumulates gradients itself; an accumulate() block elsewhere may have left the shared flag off
        self.accelerator.gradient_state._set_sync_gradients(True)
        torch.manual_seed(cfg.seed)  # after accelerate, before the caller builds anything random

    @property
    def device(self) -> torch.device:
        return self.accelerator.device

    def prepare(self, module: torch.nn.Module) -> torch.nn.Module:
        """Place a module the loss trains alongside the model (a feature projector) and wrap it for data parallel."""
        return self.accelerator.prepare(module)

    def fit(self, model: torch.nn.Module, batches: BatchSource, loss_fn: LossFn, *,
            param_groups: list[dict] | None = None, extra_modules: Sequence[torch.nn.Module] = (),
            validate: Callable[[torch.nn.Module], dict] | None = None,
            score: Callable[[dict], float | None] | None = None,
            on_record: Callable[[dict], None] | None = None, on_epoch_start: Callable[[int], None] | None = None,
            checkpoint_dir: Path | None = None, progress: bool = True, desc: str = "train") -> TrainResult:
        """Train ``model`` in place. ``param_groups``: AdamW groups (default: every trainable parameter at ``lr``);
        ``extra_modules`` (prepared with ``prepare``) are trained at ``lr`` and checkpointed too. ``validate(model)``
        returns metrics; ``score(metrics)`` (higher is better) drives early stopping and the best weights.
        ``on_record(record)`` sees each epoch record (MLflow logging); ``on_epoch_start(epoch)`` may freeze layers."""
        run = _Fit(self, model, batches, loss_fn, param_groups, extra_modules, validate, score, on_record,
                   on_epoch_start, Path(checkpoint_dir) if checkpoint_dir is not None else None)
        return run.train(progress, desc)


@dataclass(frozen=True)
class Processes:
    """The processes of one run: ``count`` of them under a launcher, one when started plainly (then every method is
    free and touches no distributed state)."""

    index: int = 0
    count: int = 1

    @property
    def is_main(self) -> bool:
        return self.index == 0

    def wait(self) -> None:
        """Every process waits here until all have arrived."""
        if self.count > 1:
            torch.distributed.barrier()

    @contextlib.contextmanager
    def main_first(self):
        """The main process runs the block first (fills a cache); the others wait for it, then run the block (and
        find the cache full)."""
        if not self.is_main:
            self.wait()
        yield
        if self.is_main:
            self.wait()

    def broadcast(self, value):
        """The main process's ``value`` on every process (an in-memory object; the others block until it is sent)."""
        if self.count == 1:
            return value
        box = [value]
        torch.distributed.broadcast_object_list(box, src=0)
        return box[0]


@functools.cache
def _warn_one_cpu_process() -> None:
    log.warning("`accelerate launch --cpu` started a single process; for several CPU processes use "
                "`accelerate launch --multi_gpu --num_processes N` (gloo on a machine without GPUs) or torchrun.")


def processes(device: str = "auto") -> Processes:
    """This run's processes. Under ``torchrun`` / ``accelerate launch`` (``WORLD_SIZE`` > 1) this joins the process
    group accelerate sets up, the one the trainer then uses (gloo on CPU); a plain start touches nothing."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        if os.environ.get("MASTER_ADDR") and os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true"):
            _warn_one_cpu_process()  # accelerate's --cpu launcher starts one process unless given an MPI hostfile
        return Processes()
    from accelerate.state import PartialState

    state = PartialState(cpu=device == "cpu" or not torch.cuda.is_available())
    return Processes(state.process_index, state.num_processes)


def even_batches(batches: list, count: int) -> list:
    """One epoch's micro-batches padded for ``count`` processes taking every ``count``-th one, as accelerate's
    ``even_batches`` pads a batch sampler: a short batch of row indices (a numpy array) is completed with rows from
    the start of the epoch, and batches from the start are repeated until every process gets as many; so every
    process takes the same number of optimiser steps (a process left with one step fewer would hang its peers
    in the gradient all-reduce)."""
    if count <= 1 or not batches:
        return batches
    out = list(batches)
    if isinstance(out[0], np.ndarray):
        size = max(len(b) for b in out)
        rows = np.concatenate(out)
        reps = -(-size // len(rows))  # fewer rows in the epoch than one batch: cycle them
        start = np.tile(rows, reps)
        out = [b if len(b) == size else np.concatenate([b, start[:size - len(b)]]) for b in out]
    out += [out[i % len(batches)] for i in range(-len(out) % count)]
    return out


def _accelerator(cpu: bool, mixed_precision: str):
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, PartialState

    try:
        return Accelerator(mixed_precision=mixed_precision, cpu=cpu)
    except ValueError:
        # accelerate keeps one process-wide state: one process may switch device or precision between rounds
        if PartialState().num_processes > 1:
            raise
        AcceleratorState._reset_state(reset_partial_state=True)
        return Accelerator(mixed_precision=mixed_precision, cpu=cpu)


class _Fit:
    """One ``Trainer.fit`` call: the prepared model and optimiser, the state, the loop."""

    def __init__(self, trainer: Trainer, model, source, loss_fn, param_groups, extra_modules, validate, score,
                 on_record, on_epoch_start, checkpoint_dir):
        cfg, acc = trainer.cfg, trainer.accelerator
        self.cfg, self.acc, self.source, self.loss_fn = cfg, acc, source, loss_fn
        self.validate_fn, self.score = validate, score
        self.on_record, self.on_epoch_start = on_record, on_epoch_start
        self.dir, self.raw, self.extras = checkpoint_dir, model, list(extra_modules)
        groups = param_groups or [{"params": [p for p in model.parameters() if p.requires_grad], "lr": cfg.lr}]
        groups = list(groups) + [{"params": list(m.parameters()), "lr": cfg.lr} for m in self.extras]
        opt = torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.base_lrs = [g["lr"] for g in opt.param_groups]
        if on_epoch_start is not None and acc.num_processes > 1:
            from accelerate.utils import DistributedDataParallelKwargs

            # on_epoch_start may freeze parameters: data parallel must not wait for gradients they no longer get
            acc.ddp_handler = DistributedDataParallelKwargs(find_unused_parameters=True)
        self.model, self.opt = acc.prepare(model, opt)
        if trainer.compile:
            self.model = torch.compile(self.model)
        self.total = self._total_steps()
        self.warm = max(1, int(cfg.warmup_share * self.total))
        self.state, self.best_weights, self.best_saved = TrainState(), None, -1
        self._resume()

    def _total_steps(self) -> int:
        cfg, per = self.cfg, self.source.batches_per_epoch
        if cfg.epochs is None or per is None:
            if not cfg.max_steps:
                raise ValueError("an endless batch source needs max_steps.")
            return cfg.max_steps
        per_process = math.ceil(per / self.acc.num_processes)
        total = cfg.epochs * math.ceil(per_process / cfg.grad_accum)
        return min(total, cfg.max_steps) if cfg.max_steps else total

    # -- the loop ---------------------------------------------------------------------------------

    def train(self, progress: bool, desc: str) -> TrainResult:
        s, t0 = self.state, time.perf_counter()
        seen0 = s.seen
        self.bar = tqdm(total=self.total, initial=s.step, desc=desc, unit="step",
                        disable=not (progress and self.acc.is_main_process))
        self.model.train()
        epoch = s.epoch + 1 if s.epoch_done else s.epoch
        while not self._finished(epoch):
            self._epoch(epoch)
            epoch += 1
        self.bar.close()
        self._keep_best()
        model = self.acc.unwrap_model(self.model, keep_fp32_wrapper=False)  # later forwards run in full precision
        model.eval()
        elapsed = time.perf_counter() - t0
        return TrainResult(s.history, s.steps, s.evals, s.best_epoch, s.best_step, s.step, elapsed,
                           (s.seen - seen0) / elapsed if elapsed else 0.0)

    def _finished(self, epoch: int) -> bool:
        s = self.state
        return s.stopped or s.step >= self.total or (self.cfg.epochs is not None and epoch >= self.cfg.epochs)

    def _epoch(self, epoch: int) -> None:
        s, cfg, acc = self.state, self.cfg, self.acc
        if s.epoch != epoch or s.epoch_done:  # a fresh epoch (not one a checkpoint stopped halfway through)
            s.epoch, s.epoch_done, s.batches_done, s.epoch_start_step = epoch, False, 0, s.step
            s.source, s.epoch_loss = self.source.state(), 0.0
        if self.on_epoch_start is not None:
            self.on_epoch_start(epoch)
        per_batch = 1.0 / (max(1, self.total) * cfg.grad_accum * acc.num_processes)
        drawn = self.source.epoch(epoch, s.epoch_start_step / max(1, self.total), per_batch)
        if acc.num_processes > 1 and self.source.batches_per_epoch is not None:
            drawn = even_batches(list(drawn), acc.num_processes)
        mine = itertools.islice(drawn, acc.process_index, None, acc.num_processes)  # this process's share
        it = itertools.islice(mine, s.batches_done, None)  # skip what a resumed run already trained on
        while s.step < self.total and not s.stopped:
            group = list(itertools.islice(it, cfg.grad_accum))
            if not group:
                break
            self._step(group)
            if cfg.eval_every and (s.step % cfg.eval_every == 0 or s.step == self.total):
                self._validate(None)
            if cfg.checkpoint_every and s.step % cfg.checkpoint_every == 0 and s.step < self.total:
                self._checkpoint()  # after the step's validation, which the checkpoint then holds
        self._end_epoch(epoch)

    def _step(self, group: list) -> None:
        s, acc, cfg = self.state, self.acc, self.cfg
        progress = s.step / max(1, self.total)
        for g, base in zip(self.opt.param_groups, self.base_lrs):
            g["lr"] = learning_rate(base, s.step, self.total, self.warm, cfg.schedule)
        means: dict[str, float] = {}
        for i, batch in enumerate(group):
            # gradients are synchronised across processes on the last micro-batch only
            sync = contextlib.nullcontext() if i == len(group) - 1 else acc.no_sync(self.model)
            with sync, acc.autocast():
                loss, logs = self.loss_fn(self.model, batch, progress)
                acc.backward(loss / len(group))
            value = float(loss.detach())
            for k, v in (("loss", value), *logs.items()):
                means[k] = means.get(k, 0.0) + float(v) / len(group)
            s.epoch_loss, s.batches_done = s.epoch_loss + value, s.batches_done + 1
            s.seen += len(batch)
        if cfg.max_grad_norm:
            acc.clip_grad_norm_(self.model.parameters(), cfg.max_grad_norm)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        s.steps.append({"step": s.step, "lr": self.opt.param_groups[0]["lr"], **means})
        s.step += 1
        s.last_logs = {k: float(v) for k, v in logs.items()}
        self.bar.update(1)
        self.bar.set_postfix({k: f"{v:.3f}" for k, v in means.items()})

    def _end_epoch(self, epoch: int) -> None:
        s, acc = self.state, self.acc
        mean = s.epoch_loss / max(1, s.batches_done)
        record = {"epoch": epoch, "step": s.step, "train_loss": mean, **s.last_logs}
        if not self.cfg.eval_every:
            self._validate(record)
        s.history.append(record)
        log.info("epoch %d: %s", epoch, record)
        if self.on_record is not None and acc.is_main_process:
            self.on_record(record)
        s.epoch_done, s.source = True, self.source.state()
        self._checkpoint()
        if s.stopped:
            log.info("early stopping after epoch %d (best: epoch %d, step %d)", epoch, s.best_epoch, s.best_step)

    # -- validation and the best weights -----------------------------------------------------------

    def _validate(self, record: dict | None) -> None:
        """Validate (main process); merge the metrics into ``record``, or add an eval record when None."""
        if self.validate_fn is None:
            return
        s = self.state
        metrics = {}
        if self.acc.is_main_process:
            self.model.eval()
            metrics = self.validate_fn(self.raw)
            self.model.train()
        if record is None:
            s.evals.append({"step": s.step, **metrics})
        else:
            record.update(metrics)
        value = self.score(metrics) if self.score is not None and metrics else None
        if value is not None:
            s.last_eval_step = s.step
            if s.best is None or value > s.best:
                s.best, s.best_epoch, s.best_step, s.bad = value, s.epoch, s.step, 0
                self.best_weights = {k: v.detach().clone() for k, v in self.raw.state_dict().items()}
            else:
                s.bad += 1
            patience = self.cfg.early_stopping_patience
            s.stopped = bool(patience and s.bad >= patience)
        if self.acc.num_processes > 1:
            from accelerate.utils import broadcast_object_list

            s.stopped = broadcast_object_list([s.stopped])[0]

    def _keep_best(self) -> None:
        """Load the best validated weights when the run ended past them."""
        s = self.state
        if s.best_step < 0 or s.best_step == s.last_eval_step:
            return
        if self.best_weights is None and self.dir is not None and (self.dir / "best.safetensors").exists():
            self.best_weights = load_file(str(self.dir / "best.safetensors"), device=str(self.acc.device))
        if self.best_weights is not None:
            self.raw.load_state_dict(self.best_weights)

    # -- checkpoints: safetensors for tensors, JSON for the rest (no pickle, so no torch.save) ----------

    def _modules(self) -> dict[str, torch.nn.Module]:
        return {"model": self.raw, **{f"extra{i}": self.acc.unwrap_model(m) for i, m in enumerate(self.extras)}}

    def _checkpoint(self) -> None:
        if self.dir is None or not self.acc.is_main_process:
            return
        d = self.dir
        d.mkdir(parents=True, exist_ok=True)
        weights = {f"{name}.{k}": v for name, m in self._modules().items() for k, v in m.state_dict().items()}
        save_file(_cpu(weights), str(d / "weights.safetensors"))
        if self.best_weights is not None and self.best_saved != self.state.best_step:
            save_file(_cpu(self.best_weights), str(d / "best.safetensors"))
            self.best_saved = self.state.best_step
        opt_meta = _save_optimizer(self.opt, d / "optimizer.safetensors")
        save_file(_rng_states(), str(d / "rng.safetensors"))
        # state.json is written last: when it names a step, every file above holds that step
        atomic_write(d / "state.json", {**asdict(self.state), "optimizer": opt_meta})

    def _resume(self) -> None:
        d = self.dir
        if d is None or not (d / "state.json").exists():
            return
        raw = json.loads((d / "state.json").read_text())
        if "optimizer" not in raw or "source" not in raw:
            log.warning("checkpoint in %s is from an older kdops: starting afresh", d)
            return
        self.state = TrainState(**{f.name: raw[f.name] for f in fields(TrainState) if f.name in raw})
        weights = load_file(str(d / "weights.safetensors"), device=str(self.acc.device))
        for name, m in self._modules().items():
            m.load_state_dict({k.split(".", 1)[1]: v for k, v in weights.items() if k.split(".", 1)[0] == name})
        _load_optimizer(self.opt, d / "optimizer.safetensors", raw["optimizer"])
        _set_rng_states(load_file(str(d / "rng.safetensors")))
        self.source.load_state(self.state.source)
        log.info("resumed from %s at epoch %d, step %d", d, self.state.epoch, self.state.step)


def _cpu(tensors: dict) -> dict:
    # copies: safetensors refuses tensors that share memory (a tied embedding and LM head)
    return {k: v.detach().to("cpu", copy=True).contiguous() for k, v in tensors.items()}


def _save_optimizer(opt, path: Path) -> dict:
    """The optimiser's per-parameter state as safetensors; returns the shapes (0-d tensors are stored as (1,))."""
    tensors, shapes = {}, {}
    for i, st in opt.state_dict()["state"].items():
        for k, v in st.items():
            if torch.is_tensor(v):
                tensors[f"{i}.{k}"] = v.detach().reshape(-1) if v.dim() == 0 else v.detach()
                shapes[f"{i}.{k}"] = list(v.shape)
    if tensors:
        save_file(_cpu(tensors), str(path))
    return shapes


def _load_optimizer(opt, path: Path, shapes: dict) -> None:
    if not shapes:
        return
    tensors, state = load_file(str(path)), {}
    for key, shape in shapes.items():
        i, name = key.split(".", 1)
        state.setdefault(int(i), {})[name] = tensors[key].reshape(shape)
    # hyperparameters stay as this run built them; torch places each state tensor where its parameter lives
    opt.load_state_dict({"state": state, "param_groups": opt.state_dict()["param_groups"]})


def _rng_states() -> dict:
    states = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        states.update({f"cuda.{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
    return states


def _set_rng_states(states: dict) -> None:
    torch.set_rng_state(states["torch"])
    cuda = [states[k] for k in sorted((k for k in states if k.startswith("cuda.")), key=lambda k: int(k[5:]))]
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)
