"""The configuration of a training run: one typed section per component, TOML in and out.

    cfg = TrainConfig()                                   # the defaults of `pslm train`
    cfg = load_config("configs/shakespeare-char.toml")    # a file: unknown keys are errors
    cfg = cfg.override(train={"steps": 100}, cluster={"workers": 1})
    Path("config.toml").write_text(dump_toml(cfg.to_dict()))

Sections: [model], [data], [optim], [train], [cluster], [finetune]. Every field has a
docstring; invalid values raise ConfigError in ``__post_init__``.
"""

from __future__ import annotations

import json
import math
import random
import tomllib
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from pslm.errors import ConfigError
from pslm.lm.model import PRESETS, GPTConfig
from pslm.lm.tokenizer import KINDS
from pslm.ps.core.consistency import Consistency
from pslm.ps.core.optim import OptimizerConfig, ScheduleConfig
from pslm.ps.core.push import check_codecs


@dataclass(kw_only=True, slots=True)
class ModelSection:
    preset: str = "small"
    """``tiny``, ``small`` or ``gpt2``; the fields below override it when set."""
    n_layer: int = 0
    """Transformer blocks (0: the preset's)."""
    n_head: int = 0
    """Attention heads (0: the preset's)."""
    n_embd: int = 0
    """Width (0: the preset's)."""
    block_size: int = 0
    """Context length in tokens (0: the preset's)."""
    dropout: float = 0.0
    """Dropout in training; 0 keeps results independent of the number of workers."""
    bias: bool = True
    """Biases in linear layers and LayerNorms."""
    tie_embeddings: bool = True
    """Share the output head's weight with the token embedding. Untied, the embedding is a row
    tensor on the parameter servers (except under local:H): workers push and pull only the rows
    of their batch's tokens, and the servers update it with lazy Adam (SparseAdam)."""

    def __post_init__(self) -> None:
        if self.preset not in PRESETS:
            raise ConfigError(
                f"unknown model preset {self.preset!r}; choose from {sorted(PRESETS)}"
            )
        for name in ("n_layer", "n_head", "n_embd", "block_size"):
            if getattr(self, name) < 0:
                raise ConfigError(
                    f"model.{name} must be >= 1 (or 0: the preset's), got {getattr(self, name)}"
                )
        self.gpt(vocab_size=2)  # the shape must make sense before any data is prepared

    def resolved(self) -> ModelSection:
        """The same model with every size spelled out (no 0 = "the preset's")."""
        shape = self.gpt(vocab_size=2)
        return replace(
            self,
            n_layer=shape.n_layer,
            n_head=shape.n_head,
            n_embd=shape.n_embd,
            block_size=shape.block_size,
        )

    def gpt(self, vocab_size: int) -> GPTConfig:
        """The model's shape for a tokenizer of ``vocab_size`` tokens."""
        sizes = {k: getattr(self, k) for k in ("n_layer", "n_head", "n_embd", "block_size")}
        return GPTConfig.preset(
            self.preset,
            vocab_size=vocab_size,
            dropout=self.dropout,
            bias=self.bias,
            tie_embeddings=self.tie_embeddings,
            **{k: v for k, v in sizes.items() if v},
        )


@dataclass(kw_only=True, slots=True)
class DataSection:
    name: str = "bbc-news"
    """A built-in corpus (bbc-news, zh-news, zh-news+reviews) or a path: a text file, a
    directory of text files, or JSONL with a ``text`` field."""
    tokenizer: str = "bpe"
    """``bpe`` (byte-level, trained on the corpus), ``bpe-jieba`` (BPE that never merges
    across the words jieba cuts Chinese text into) or ``char``."""
    vocab_size: int = 4096
    """BPE vocabulary size."""
    val_fraction: float = 0.1
    """Share of the corpus held out for validation."""
    cache_dir: str = ""
    """Where prepared token files are cached (default ``$PSLM_CACHE`` or ~/.cache/pslm)."""

    def __post_init__(self) -> None:
        if self.tokenizer not in KINDS:
            raise ConfigError(f"tokenizer must be one of {KINDS}, got {self.tokenizer!r}")
        if not 0.0 < self.val_fraction < 1.0:
            raise ConfigError(f"val_fraction must lie in (0, 1), got {self.val_fraction}")


@dataclass(kw_only=True, slots=True)
class OptimSection:
    name: str = "adamw"
    """``adamw``, ``adam`` or ``sgd``, run by the servers."""
    lr: float = 2e-3
    """Peak learning rate."""
    min_lr: float = 2e-4
    """Final learning rate of the cosine schedule."""
    warmup_steps: int = -1
    """Linear warmup steps (-1: a tenth of the steps, at most 100)."""
    decay_steps: int = 0
    """Step at which the cosine reaches min_lr (0: the last step); schedule=constant ignores."""
    schedule: str = "cosine"
    """``cosine`` or ``constant``."""
    betas: tuple[float, float] = (0.9, 0.99)
    """Adam moment coefficients."""
    weight_decay: float = 0.1
    """Decoupled weight decay on tensors with 2+ dimensions."""
    eps: float = 1e-8
    """Adam epsilon."""
    clip_norm: float = 1.0
    """Global gradient-norm clipping (0: off)."""
    momentum: float = 0.0
    """SGD momentum."""
    nesterov: bool = False
    """SGD Nesterov momentum."""

    def resolved(self, steps: int) -> OptimSection:
        """The same settings with the warmup and decay steps spelled out for ``steps``."""
        sched = self.optimizer(steps).schedule
        return replace(
            self, warmup_steps=sched.warmup_steps, decay_steps=sched.decay_steps or self.decay_steps
        )

    def optimizer(self, steps: int) -> OptimizerConfig:
        """The servers' update rule for a run of ``steps`` steps."""
        warmup = min(100, steps // 10) if self.warmup_steps < 0 else self.warmup_steps
        if self.schedule == "cosine":
            sched = ScheduleConfig(
                kind="cosine",
                warmup_steps=warmup,
                decay_steps=self.decay_steps or steps,
                min_lr=self.min_lr,
            )
        else:
            sched = ScheduleConfig(kind=self.schedule, warmup_steps=warmup)
        return OptimizerConfig(
            name=self.name,
            lr=self.lr,
            betas=self.betas,
            weight_decay=self.weight_decay,
            eps=self.eps,
            clip_norm=self.clip_norm,
            momentum=self.momentum,
            nesterov=self.nesterov,
            schedule=sched,
        )


@dataclass(kw_only=True, slots=True)
class TrainSection:
    steps: int = 1200
    """Optimizer steps (global batches)."""
    batch_size: int = 16
    """Global batch, in sequences per step, split over the workers."""
    seed: int = 1337
    """Seeds the model's initial values and the order of the batches."""
    eval_interval: int = 200
    """Steps between validation-loss evaluations (the last step always evaluates)."""
    eval_iters: int = 40
    """Validation batches per evaluation (the same batches every time)."""
    checkpoint_interval: int = 400
    """Steps between checkpoints (the last step always writes one)."""
    keep_checkpoints: int = 2
    """Checkpoints kept; older ones are deleted."""
    sample_tokens: int = 200
    """Tokens generated as a sample at the end (0: none)."""
    sample_prompt: str = ""
    """Prompt of the final sample (empty: start from end-of-text)."""
    device: str = "cpu"
    """Where workers compute: ``cpu`` or ``cuda`` (``cuda:N``)."""
    threads: int = 1
    """Intra-op threads per worker (one thread per process is fastest on CPU)."""
    slow_worker: str = ""
    """Experiment knob ``RANK:FACTOR``: that worker computes FACTOR times slower, always."""
    straggle: str = ""
    """Experiment knob ``PROB:FACTOR``: each step, with probability PROB (drawn from the seed),
    a worker's step is delayed by FACTOR times its compute time (transient stragglers)."""

    max_skips: int = 5
    """Consecutive steps skipped because a gradient was not finite that stop the run with an
    error (0: never stop). Each skipped step is recorded in metrics.jsonl (``skipped``)."""
    nan_grads: str = ""
    """Test knob ``SHARE:FIRST-LAST``: the loss and gradients of that share of the batch (the
    worker of that rank's, unless it died) are NaN at steps FIRST to LAST (counted from 0), to
    see them skipped."""

    def poisoned(self, share: int, step: int) -> bool:
        """Whether ``nan_grads`` makes ``share``'s gradients at ``step`` NaN."""
        if not self.nan_grads:
            return False
        who, first, last = _nan_grads(self.nan_grads)
        return who == share and first <= step <= last

    def slowdown(self, rank: int, step: int, num_workers: int) -> float:
        """Extra compute time, as a multiple of the real one, for ``rank`` at ``step``."""
        extra = 0.0
        if self.slow_worker:
            who, factor = _pair(self.slow_worker, "slow_worker", int)
            extra += max(0.0, factor - 1.0) if who == rank else 0.0
        if self.straggle:
            prob, factor = _pair(self.straggle, "straggle", float)
            draw = random.Random(self.seed * 1_000_003 + step * num_workers + rank).random()
            extra += factor if draw < prob else 0.0
        return extra

    def __post_init__(self) -> None:
        for name in (
            "steps",
            "batch_size",
            "eval_interval",
            "eval_iters",
            "checkpoint_interval",
            "keep_checkpoints",
            "threads",
        ):
            if getattr(self, name) < 1:
                raise ConfigError(f"train.{name} must be >= 1, got {getattr(self, name)}")
        if not (self.device == "cpu" or self.device.startswith("cuda")):
            raise ConfigError(f"device must be cpu or cuda[:N], got {self.device!r}")
        if self.seed < 0 or self.sample_tokens < 0:
            raise ConfigError("train.seed and train.sample_tokens must be >= 0")
        if self.slow_worker:
            _pair(self.slow_worker, "slow_worker", int)
        if self.nan_grads:
            _nan_grads(self.nan_grads)
        if self.max_skips < 0:
            raise ConfigError(f"train.max_skips must be >= 0 (0: never stop), got {self.max_skips}")
        if self.straggle:
            prob, _ = _pair(self.straggle, "straggle", float)
            if not 0.0 <= prob <= 1.0:
                raise ConfigError(f"straggle probability must lie in [0, 1], got {prob}")


@dataclass(kw_only=True, slots=True)
class ClusterSection:
    workers: int = 2
    """Worker processes."""
    servers: int = 2
    """Server processes."""
    consistency: str = "bsp"
    """``bsp``, ``ssp:S`` (bounded staleness S), ``asp`` or ``local:H`` (local SGD, averaging
    every H steps); see pslm.ps.core.consistency."""
    push_codec: str = "none"
    """Gradient compression: none, bf16, fp16, int8 or topk:RATIO (lossy ones with error
    feedback)."""
    pull_codec: str = "none"
    """Parameter compression on pulls: none, bf16 or fp16."""
    overlap: bool = False
    """Push gradients while backward still runs (in buckets, last layers first) and let the
    next forward pass wait for each layer's new values only when it reaches that layer.
    Changes when bytes travel, not what is computed. CPU workers; not under local:H, whose
    exchanges are rare."""
    bucket_bytes: int = 1 << 20
    """With overlap: gradients travel in buckets of about this many bytes."""
    shm: bool = True
    """Workers and servers on the same machine exchange dense values through shared memory
    instead of the socket (uncompressed, without overlap; ``pslm.ps.client.shm``). The same
    values either way; false: the socket always (to measure the network path)."""
    secure: bool = False
    """Encrypt all traffic (ZeroMQ CURVE). Either way every node must prove the cluster's
    secret, which the launcher makes up for each run."""
    launcher: str = "local"
    """``local`` (processes on this machine) or ``ray`` (Ray actors, ``pslm.ps.launch.ray``)."""
    ray_address: str = ""
    """The Ray cluster: ``auto``, ``ray://host:port``, ``local`` (a private one on this
    machine); empty: ``auto`` if RAY_ADDRESS is set, else ``local``."""
    worker_restarts: int = 3
    """BSP: how many times in all the launcher starts a dead worker again; meanwhile the
    others train its share of every batch, and it gets one back when it rejoins. Other
    consistency models, or overlap, cannot hand a dead worker's share over: a dead worker
    fails the run."""
    server_restarts: int = 3
    """With backups: how many times in all the launcher starts a dead server again (it comes
    back as the backup of the shard that lost one)."""
    replicas: int = -1
    """Backups per shard, 0 or 1: a backup is a server process that keeps a copy of a shard
    and serves it when the shard's server dies (nothing lost). -1: 1 with two or more
    servers and no overlap (whose pushes in parts a new server could not complete), else 0."""
    timeout: float = 120.0
    """Seconds any request may wait before the run fails."""
    heartbeat_interval: float = 1.0
    """Seconds between heartbeats."""
    heartbeat_timeout: float = 5.0
    """Seconds of silence before a node is declared dead."""

    def __post_init__(self) -> None:
        if self.workers < 1 or self.servers < 1:
            raise ConfigError("need at least one worker and one server")
        if self.worker_restarts < 0 or self.server_restarts < 0:
            raise ConfigError("cluster.worker_restarts and server_restarts must be >= 0")
        if self.replicas not in (-1, 0, 1):
            raise ConfigError(f"cluster.replicas must be 0 or 1 (-1: auto), got {self.replicas}")
        if self.bucket_bytes < 1:
            raise ConfigError(f"cluster.bucket_bytes must be >= 1, got {self.bucket_bytes}")
        if not (self.timeout > 0 and 0 < self.heartbeat_interval < self.heartbeat_timeout):
            raise ConfigError("need timeout > 0 and 0 < heartbeat_interval < heartbeat_timeout")
        self.consistency = str(Consistency.parse(self.consistency))
        self.push_codec = check_codecs(self.push_codec, self.pull_codec)
        if self.launcher not in ("local", "ray"):
            raise ConfigError(f"cluster.launcher must be local or ray, got {self.launcher!r}")


@dataclass(kw_only=True, slots=True)
class FinetuneSection:
    task: str = ""
    """Empty: pre-training a language model. ``classify``: fine-tuning a pretrained one with a
    classification head on labelled text (``pslm finetune``)."""
    pretrained: str = ""
    """The checkpoint directory of the pretrained run."""
    labels: list[str] = field(default_factory=list)
    """The label names, in the order of the head's outputs."""
    split_seed: int = 0
    """The seed of the train / validation / test split."""
    folds: int = 0
    """k-fold cross-validation: 0 splits 80/10/10; k >= 2 tests on fold ``fold`` of k (a run
    per fold covers every text once)."""
    fold: int = 0
    """With ``folds``: which fold is the test part (0 .. folds - 1)."""
    pooling: str = "mean"
    """How a window of text becomes one vector: the mean of its final hidden states
    (``mean``) or the state at its last token (``last``)."""
    windows: int = 8
    """A text is read as up to this many windows of the model's context (its first
    ``windows * block_size`` tokens); its logits are the mean of theirs."""

    def __post_init__(self) -> None:
        if self.task not in ("", "classify"):
            raise ConfigError(f"finetune.task must be classify (or empty), got {self.task!r}")
        if self.folds == 1 or self.folds < 0 or (self.folds and not 0 <= self.fold < self.folds):
            raise ConfigError(
                f"need folds >= 2 and 0 <= fold < folds, got {self.folds}, {self.fold}"
            )
        if self.task and (not self.pretrained or len(self.labels) < 2):
            raise ConfigError("a fine-tuning run needs its pretrained checkpoint and 2+ labels")
        if self.pooling not in ("mean", "last"):
            raise ConfigError(f"finetune.pooling must be mean or last, got {self.pooling!r}")
        if not 1 <= self.windows <= 64:
            raise ConfigError(f"finetune.windows must lie in [1, 64], got {self.windows}")
        self.labels = [str(x) for x in self.labels]

    def model_meta(self) -> dict[str, Any]:
        """What a checkpoint's meta says of the task ({} for a language model)."""
        if not self.task:
            return {}
        return {
            "task": self.task,
            "labels": self.labels,
            "pooling": self.pooling,
            "windows": self.windows,
        }


SECTIONS = {
    "model": ModelSection,
    "data": DataSection,
    "optim": OptimSection,
    "train": TrainSection,
    "cluster": ClusterSection,
    "finetune": FinetuneSection,
}


@dataclass(kw_only=True, slots=True)
class TrainConfig:
    """Everything a run needs: one section per component, and where the run goes."""

    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    optim: OptimSection = field(default_factory=OptimSection)
    train: TrainSection = field(default_factory=TrainSection)
    cluster: ClusterSection = field(default_factory=ClusterSection)
    finetune: FinetuneSection = field(default_factory=FinetuneSection)
    run_dir: str = ""
    """Where the run goes: a new or empty directory (empty: runs/<corpus>-<date>-<time>)."""

    def __post_init__(self) -> None:
        self.optim.optimizer(self.train.steps)  # raises ConfigError for a bad combination
        if self.cluster.overlap and self.cluster.replicas == 1:
            raise ConfigError(
                "backups do not work with overlap: a promoted backup could not complete a push "
                "whose parts the dead server had acknowledged; use --replicas 0"
            )
        if self.cluster.overlap and self.train.device != "cpu":
            raise ConfigError("cluster.overlap runs on CPU workers only (device = cpu)")
        if self.row_embeddings and self.optim.name == "sgd":
            raise ConfigError(
                "untied embeddings are updated with lazy Adam on the servers: use adam or adamw"
            )
        if self.train.batch_size < self.cluster.workers:
            raise ConfigError(
                f"batch size {self.train.batch_size} is smaller than "
                f"{self.cluster.workers} workers: every worker needs a row"
            )

    @property
    def recovers_workers(self) -> bool:
        """Whether a dead worker's shares can go to the others (BSP without overlap)."""
        return self.cluster.consistency == "bsp" and not self.cluster.overlap

    @property
    def replicas(self) -> int:
        """Backups per shard (``cluster.replicas``, with -1 resolved)."""
        c = self.cluster
        if c.replicas >= 0:
            return c.replicas
        return 1 if c.servers >= 2 and not c.overlap else 0

    @property
    def row_embeddings(self) -> bool:
        """Whether the token embedding travels by rows (untied, and not under local SGD)."""
        return not self.model.tie_embeddings and not self.cluster.consistency.startswith("local")

    def resolved(self) -> TrainConfig:
        """This configuration with every derived value spelled out, as a run records it."""
        return replace(
            self, model=self.model.resolved(), optim=self.optim.resolved(self.train.steps)
        )

    def override(self, **sections: dict[str, Any]) -> TrainConfig:
        """A copy with fields changed, e.g. ``override(train={"steps": 10})``."""
        changed: dict[str, Any] = {}
        for name, values in sections.items():
            section = getattr(self, name)
            changed[name] = _section(SECTIONS[name], {**asdict(section), **values})
        return replace(self, **changed)

    def to_dict(self) -> dict[str, Any]:
        d = {name: asdict(getattr(self, name)) for name in SECTIONS}
        d["optim"]["betas"] = list(self.optim.betas)
        return {"run_dir": self.run_dir, **d}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        unknown = set(d) - set(SECTIONS) - {"run_dir"}
        if unknown:
            raise ConfigError(f"unknown config sections: {sorted(unknown)}")
        finetune = d.get("finetune")
        if isinstance(finetune, dict) and finetune.get("task") and "pooling" not in finetune:
            # a fine-tuning run from before pooling and windows: its head read last tokens
            d = {**d, "finetune": {**finetune, "pooling": "last", "windows": 1}}
        kw: dict[str, Any] = {name: _section(SECTIONS[name], d.get(name, {})) for name in SECTIONS}
        return cls(run_dir=str(d.get("run_dir", "")), **kw)


def _pair(text: str, name: str, first: type) -> tuple[Any, float]:
    """``A:B`` as (first(A), float(B)), B >= 1 or >= 0; ConfigError naming the knob."""
    a, sep, b = text.partition(":")
    try:
        pair = first(a), float(b)
    except ValueError:
        pair = None
    if not sep or pair is None or not (pair[1] >= 0 and math.isfinite(pair[1])) or pair[0] < 0:
        raise ConfigError(
            f"{name} must look like {'RANK:FACTOR' if first is int else 'PROB:FACTOR'}"
            f", got {text!r}"
        )
    return pair


def _nan_grads(text: str) -> tuple[int, int, int]:
    """``RANK:FIRST-LAST`` as three ints; ConfigError naming the knob."""
    rank, _, span = text.partition(":")
    first, _, last = span.partition("-")
    try:
        out = int(rank), int(first), int(last or first)
    except ValueError:
        out = (-1, 0, 0)
    if min(out) < 0 or out[2] < out[1]:
        raise ConfigError(f"train.nan_grads must look like SHARE:FIRST-LAST, got {text!r}")
    return out


def _section(cls: type, values: dict[str, Any]) -> Any:
    if not isinstance(values, dict):
        raise ConfigError(f"[{_name(cls)}] must be a table")
    known = {f.name: f for f in fields(cls)}
    if unknown := set(values) - set(known):
        raise ConfigError(f"unknown settings in [{_name(cls)}]: {sorted(unknown)}")
    typed = {}
    for key, value in values.items():
        typed[key] = _coerce(cls, key, known[key].type, value)
    return cls(**typed)


def _coerce(cls: type, key: str, kind: Any, value: Any) -> Any:
    kind = str(kind)
    where = f"{_name(cls)}.{key}"
    if kind == "bool":
        if not isinstance(value, bool):
            raise ConfigError(f"{where} must be true or false, got {value!r}")
        return value
    if kind == "int":
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where} must be an integer, got {value!r}")
        return value
    if kind == "float":
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where} must be a number, got {value!r}")
        return float(value)
    if kind == "str":
        if not isinstance(value, str):
            raise ConfigError(f"{where} must be a string, got {value!r}")
        return value
    if kind == "list[str]":
        if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
            raise ConfigError(f"{where} must be a list of strings, got {value!r}")
        return list(value)
    if isinstance(value, (list, tuple)) and len(value) == 2:  # betas
        if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value):
            return (float(value[0]), float(value[1]))
    raise ConfigError(f"{where} must be a pair of numbers, got {value!r}")


def _name(cls: type) -> str:
    return next(k for k, v in SECTIONS.items() if v is cls)


def load_config(path: str | Path) -> TrainConfig:
    """Read a TOML file; ConfigError naming what is wrong."""
    try:
        with open(path, "rb") as f:
            doc = tomllib.load(f)
    except OSError as exc:
        raise ConfigError(f"cannot read config {path}: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path} is not valid TOML: {exc}") from None
    return TrainConfig.from_dict(doc)


def dump_toml(d: dict[str, Any]) -> str:
    """TOML for a dict of scalars and one level of tables (what ``to_dict`` returns)."""
    lines = [f"{k} = {_toml_value(v)}" for k, v in d.items() if not isinstance(v, dict)]
    for name, table in d.items():
        if isinstance(table, dict):
            lines.append(f"\n[{name}]")
            lines.extend(f"{k} = {_toml_value(v)}" for k, v in table.items())
    return "\n".join(lines) + "\n"


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    return json.dumps(str(v), ensure_ascii=False)  # a TOML basic string
