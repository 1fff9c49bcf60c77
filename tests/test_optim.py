"""Server-side updates match torch.optim, across shards, with exact global-norm clipping."""

from __future__ import annotations

import math

import pytest
import torch

from pslm.errors import ConfigError, RefusedError
from pslm.ps.core.keyspace import KeySpace
from pslm.ps.core.optim import OptimizerConfig, ScheduleConfig
from pslm.ps.server.shard import RowGrad, ShardStore, clip_coef

SHAPES = {"w1": (6, 5), "b1": (5,), "w2": (5, 3), "ln": (3,)}


def _reference_optimizer(cfg: OptimizerConfig, params: dict[str, torch.Tensor]):
    decay = [p for p in params.values() if p.dim() >= 2]
    rest = [p for p in params.values() if p.dim() < 2]
    groups = [
        {"params": decay, "weight_decay": cfg.weight_decay},
        {"params": rest, "weight_decay": 0.0},
    ]
    if cfg.name == "sgd":
        return torch.optim.SGD(
            groups,
            lr=cfg.lr,
            momentum=cfg.momentum,
            dampening=cfg.dampening,
            nesterov=cfg.nesterov,
            fused=True,
        )
    cls = torch.optim.AdamW if cfg.name == "adamw" else torch.optim.Adam
    return cls(groups, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, fused=True)


def _slices(ks: KeySpace, server: int, tensors: dict[str, torch.Tensor]) -> list[torch.Tensor]:
    return [
        tensors[ks.tensors[c.tensor].name].reshape(-1)[c.offset : c.offset + c.length].clone()
        for c in ks.shard(server)
    ]


def _pieces(ks: KeySpace, server: int, tensors: dict[str, torch.Tensor]) -> list[torch.Tensor]:
    chunks = _slices(ks, server, tensors)
    return [torch.cat(chunks[lo:hi]) for lo, hi in ks.pieces(server)]


def _gather(ks: KeySpace, stores: list[ShardStore]) -> dict[str, torch.Tensor]:
    out = {t.name: torch.empty(t.shape) for t in ks.tensors}
    for s, store in enumerate(stores):
        for c, view in zip(ks.shard(s), store.views, strict=True):
            out[ks.tensors[c.tensor].name].view(-1)[c.offset : c.offset + c.length] = view
    return out


CONFIGS = [
    OptimizerConfig(
        name="adamw",
        lr=1e-2,
        weight_decay=0.1,
        clip_norm=0.5,
        schedule=ScheduleConfig(kind="cosine", warmup_steps=3, decay_steps=8, min_lr=1e-3),
    ),
    OptimizerConfig(name="adam", lr=1e-2, betas=(0.8, 0.95), weight_decay=0.01),
    OptimizerConfig(
        name="sgd", lr=0.05, momentum=0.9, nesterov=True, weight_decay=0.01, clip_norm=1.0
    ),
    OptimizerConfig(name="sgd", lr=0.05, momentum=0.5, dampening=0.3),
    OptimizerConfig(name="sgd", lr=0.1),
]


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: f"{c.name}-clip{c.clip_norm}")
def test_two_shards_match_torch_optim(cfg: OptimizerConfig) -> None:
    gen = torch.Generator().manual_seed(0)
    init = {n: torch.randn(s, generator=gen) for n, s in SHAPES.items()}
    ks = KeySpace.build(((n, s) for n, s in SHAPES.items()), 2, chunk_bytes=32)
    stores = [ShardStore(ks, s, cfg) for s in range(2)]
    for s, store in enumerate(stores):
        store.load(_pieces(ks, s, init))
    ref = {n: t.clone().requires_grad_() for n, t in init.items()}
    opt = _reference_optimizer(cfg, ref)
    for step in range(10):
        pushes = [
            {n: torch.randn(s, generator=gen) * 3 for n, s in SHAPES.items()} for _ in range(2)
        ]
        for n, p in ref.items():
            p.grad = (pushes[0][n] + pushes[1][n]) * 0.5
        if cfg.clip_norm:
            torch.nn.utils.clip_grad_norm_(list(ref.values()), cfg.clip_norm)
        for group in opt.param_groups:
            group["lr"] = cfg.lr_at(step)
        opt.step()

        reduced = [
            store.reduce([(1.0, _slices(ks, s, p)) for p in pushes])
            for s, store in enumerate(stores)
        ]
        total = sum(store.sq_norm(g) * f**2 for store, (g, f) in zip(stores, reduced, strict=True))
        for store, (g, f) in zip(stores, reduced, strict=True):
            store.apply(g, f * clip_coef(total, cfg.clip_norm))
    got = _gather(ks, stores)
    for n, p in ref.items():
        torch.testing.assert_close(got[n], p.detach(), rtol=1e-6, atol=1e-7)
    assert all(store.version == 10 for store in stores)


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: f"{c.name}-clip{c.clip_norm}")
def test_an_update_in_stages_equals_one_apply(cfg: OptimizerConfig) -> None:
    """A server answers each reply once its chunks are updated (``ShardStore.update``): spans
    in any order, overlapping, partly repeated, must give exactly ``apply``'s result, with
    every chunk stepped once and the version moved only by ``finish``."""
    gen = torch.Generator().manual_seed(1)
    init = {n: torch.randn(s, generator=gen) for n, s in SHAPES.items()}
    ks = KeySpace.build(((n, s) for n, s in SHAPES.items()), 1, chunk_bytes=16)
    whole, staged = ShardStore(ks, 0, cfg), ShardStore(ks, 0, cfg)
    for store in (whole, staged):
        store.load(_pieces(ks, 0, init))
    n = whole.n_dense
    assert n >= 6  # enough chunks for the spans below to split the decay groups
    for _ in range(4):
        grads = _slices(ks, 0, {k: torch.randn(s, generator=gen) for k, s in SHAPES.items()})
        whole.apply([g.clone() for g in grads], 0.7)
        update = staged.update([g.clone() for g in grads], 0.7)
        for lo, hi in [(n - 2, n), (1, 4), (2, 5), (n - 2, n + 3)]:
            update.span(lo, hi)
            assert staged.version == whole.version - 1
        update.finish()
        assert staged.version == whole.version
    for a, b in zip(whole.views, staged.views, strict=True):
        assert torch.equal(a, b)
    for name, views in whole.state_views.items():
        for a, b in zip(views, staged.state_views[name], strict=True):
            assert torch.equal(a, b), name
    assert torch.equal(whole.step_counts, staged.step_counts)


def test_weighted_mean_and_single_push() -> None:
    ks = KeySpace.build([("w", (4, 4))], 1, chunk_bytes=16)
    store = ShardStore(ks, 0, OptimizerConfig(name="sgd", lr=1.0))
    a, b, c = torch.randn(16), torch.randn(16), torch.randn(16)
    grads, factor = store.reduce([(3.0, list(a.split(4))), (1.0, list(b.split(4)))])
    torch.testing.assert_close(torch.cat(grads) * factor, (3 * a + b) / 4)
    grads, factor = store.reduce([(2.0, list(a.split(4))), (2.0, list(b.split(4)))])
    assert factor == 0.5 and torch.equal(torch.cat(grads) * factor, (a + b) * 0.5)
    grads, factor = store.reduce([(1.0, list(t.split(4))) for t in (a, b, c)])
    torch.testing.assert_close(torch.cat(grads) * factor, (a + b + c) / 3)
    single, factor = store.reduce([(1.0, list(a.split(4)))])
    assert factor == 1.0 and single[0].data_ptr() == a.data_ptr()  # used as it came, no copy
    half, _ = store.reduce([(1.0, [x.half() for x in a.split(4)])])
    assert half[0].dtype == torch.float32 and torch.equal(torch.cat(half), a.half().float())


def test_pushes_are_unpacked_into_chunk_views_without_copies() -> None:
    ks = KeySpace.build([("w1", (4, 4)), ("big", (1 << 18,)), ("w2", (2, 4))], 1)
    store = ShardStore(ks, 0, OptimizerConfig())
    assert ks.pieces(0) == [(0, 2), (2, 3)]  # the decayed w1 and w2 packed, big alone
    small, big = torch.randn(24), torch.randn(1 << 18)
    views = store.unpack([small, big], "push")
    assert len(views) == len(store.chunks) and views[0].data_ptr() == small.data_ptr()
    assert torch.equal(torch.cat(views), torch.cat([small, big]))
    assert [v.numel() for v in views] == store.lengths == [16, 8, 1 << 18]


def test_push_of_wrong_shape_or_dtype_is_refused() -> None:
    ks = KeySpace.build([("w", (4, 4)), ("b", (2,)), ("c", (2,))], 1, chunk_bytes=32)
    store = ShardStore(ks, 0, OptimizerConfig())  # pieces: w's two chunks alone, b and c packed
    assert ks.pieces(0) == [(0, 1), (1, 2), (2, 4)]
    with pytest.raises(RefusedError, match="3 pieces"):
        store.unpack([torch.zeros(8), torch.zeros(8), torch.zeros(2), torch.zeros(2)], "push")
    with pytest.raises(RefusedError, match=r"shape \[4\]"):
        store.unpack([torch.zeros(8), torch.zeros(8), torch.zeros(3)], "push")
    with pytest.raises(RefusedError, match="int64"):
        store.unpack([torch.zeros(8), torch.zeros(8, dtype=torch.int64), torch.zeros(4)], "push")
    assert [t.numel() for t in store.unpack([torch.zeros(8)] * 2 + [torch.zeros(4)], "")] == [
        8,
        8,
        2,
        2,
    ]


def test_clip_coef_matches_clip_grad_norm() -> None:
    grads = [torch.randn(7) * 5, torch.randn(3, 4)]
    params = [torch.zeros_like(g, requires_grad=True) for g in grads]
    for p, g in zip(params, grads, strict=True):
        p.grad = g.clone()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    sq = sum(float(g.pow(2).sum()) for g in grads)
    coef = clip_coef(sq, 1.0)
    for p, g in zip(params, grads, strict=True):
        torch.testing.assert_close(p.grad, g * coef)
    assert clip_coef(0.25, 1.0) == 1.0 and clip_coef(4.0, 0.0) == 1.0


def test_schedules() -> None:
    cos = ScheduleConfig(kind="cosine", warmup_steps=10, decay_steps=110, min_lr=0.1)
    assert cos.lr_at(1.0, 0) == pytest.approx(0.1)
    assert cos.lr_at(1.0, 9) == pytest.approx(1.0)
    assert cos.lr_at(1.0, 10) == pytest.approx(1.0)
    assert cos.lr_at(1.0, 60) == pytest.approx(0.55)
    assert cos.lr_at(1.0, 110) == cos.lr_at(1.0, 500) == pytest.approx(0.1)
    const = ScheduleConfig(warmup_steps=4)
    assert [const.lr_at(2.0, s) for s in range(6)] == [0.5, 1.0, 1.5, 2.0, 2.0, 2.0]
    assert ScheduleConfig().lr_at(3.0, 0) == 3.0
    assert math.isclose(cos.lr_at(1.0, 35), 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi / 4)))


def test_config_round_trips_and_validates() -> None:
    cfg = CONFIGS[0]
    assert OptimizerConfig.from_dict(cfg.to_dict()) == cfg
    for bad in [
        {"name": "lion"},
        {"lr": -1.0},
        {"lr": "fast"},
        {"betas": [0.9]},
        {"nesterov": True},
        {"momentum": True},
        {"schedule": {"kind": "cosine", "decay_steps": 0}},
        {"schedule": {"kind": "step"}},
        {"surprise": 1},
        "adamw",
    ]:
        with pytest.raises(ConfigError):
            OptimizerConfig.from_dict(bad)


def test_clipping_an_infinite_norm_zeroes_the_gradient_as_torch_does() -> None:
    cfg = OptimizerConfig(name="adamw", lr=0.1, weight_decay=0.5, clip_norm=1.0)
    ks = KeySpace.build([("w", (4, 4))], 1)
    store = ShardStore(ks, 0, cfg)
    store.load([torch.ones(16)])
    grads, factor = store.reduce([(1.0, [torch.full((16,), 1e20)])])
    sq = store.sq_norm(grads)
    assert sq == float("inf") and clip_coef(sq, 1.0) == 0.0
    store.apply(grads, factor * clip_coef(sq, 1.0))
    ref = torch.nn.Parameter(torch.ones(16))
    ref.grad = torch.full((16,), 1e20)
    torch.nn.utils.clip_grad_norm_([ref], 1.0)  # torch: factor 0, the gradient becomes 0
    torch.optim.AdamW([ref], lr=0.1, weight_decay=0.5).step()
    torch.testing.assert_close(store.params, ref.detach())  # only weight decay moved it
    assert store.version == 1


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_pushes_are_summed_in_fp32(dtype: torch.dtype) -> None:
    ks = KeySpace.build([("w", (8,))], 1)
    store = ShardStore(ks, 0, OptimizerConfig(name="sgd", lr=1.0))
    big = [torch.full((8,), 40000.0).to(dtype)]
    grads, factor = store.reduce([(1.0, big), (1.0, big)])
    assert torch.isfinite(grads[0]).all() and grads[0][0] == 2 * big[0][0].float()
    grads, factor = store.reduce([(12.0, big), (1.0, [torch.ones(8).to(dtype)])])
    assert torch.isfinite(grads[0]).all() and grads[0][0] == 12 * big[0][0].float() + 1


def test_relocated_parameters_leave_the_old_memory_alone() -> None:
    ks = KeySpace.build([("w", (4, 4)), ("b", (4,))], 1)
    store = ShardStore(ks, 0, OptimizerConfig(name="sgd", lr=1.0))
    store.load([torch.arange(20.0)])
    sent = store.packed[0]  # what a reply in flight still reads
    (_, (frame,)) = store.packed_wire  # the frame replies are made of
    store.relocate_params()
    store.apply([torch.ones(16), torch.ones(4)])
    store.apply([torch.ones(16), torch.ones(4)])  # (the second with everything made once)
    assert torch.equal(sent, torch.arange(20.0))
    assert bytes(frame) == torch.arange(20.0).numpy().tobytes()
    assert torch.equal(store.packed[0], torch.arange(20.0) - 2)
    assert bytes(store.packed_wire[1][0]) == store.packed[0].numpy().tobytes()
    assert store.views[0].data_ptr() == store.params.data_ptr() != sent.data_ptr()


@pytest.mark.parametrize("field", ["weight_decay", "eps", "clip_norm", "momentum"])
def test_non_finite_settings_are_refused(field: str) -> None:
    with pytest.raises(ConfigError, match="finite"):
        OptimizerConfig.from_dict({field: float("nan")})


def _row_grads(ks: KeySpace, server: int, rows: torch.Tensor, values: torch.Tensor) -> list:
    """A push to ``server`` of rows of the row tensor "emb" (and zeros for dense chunks)."""
    out: list = []
    for c in ks.shard(server):
        spec = ks.tensors[c.tensor]
        if not spec.rows:
            out.append(torch.zeros(c.length))
            continue
        first, n = c.offset // spec.row_width, c.length // spec.row_width
        mine = (rows >= first) & (rows < first + n)
        out.append(RowGrad(rows[mine] - first, values[mine]))
    return out


def test_row_chunks_update_like_sparse_adam() -> None:
    """Two pushes of overlapping rows, meaned, clipped-like scaled, over 2 shards: the same
    parameters and moments as torch.optim.SparseAdam given the mean gradient's rows."""
    cfg = OptimizerConfig(name="adamw", lr=1e-2, betas=(0.8, 0.95), weight_decay=0.1)
    gen = torch.Generator().manual_seed(1)
    init = torch.randn(10, 4, generator=gen)
    # 3 rows (48 bytes) per chunk: chunks of rows 0-2, 3-5, 6-8, 9
    ks = KeySpace.build([("w", (4, 4)), ("emb", (10, 4))], 2, chunk_bytes=48, rows=["emb"])
    assert [c.length for c in ks.chunks if ks.tensors[c.tensor].rows] == [12, 12, 12, 4]
    assert not ks.tensors[1].decay
    stores = [ShardStore(ks, s, cfg) for s in range(2)]
    for s, store in enumerate(stores):
        values = _slices(ks, s, {"w": torch.zeros(4, 4), "emb": init})
        for view, v in zip(store.views, values, strict=True):
            view.copy_(v)
    emb = torch.nn.Parameter(init.clone())
    ref = torch.optim.SparseAdam([emb], lr=cfg.lr, betas=cfg.betas)
    for step in range(6):
        a_rows = torch.tensor(sorted({0, 4, 9, step}))
        b_rows = torch.tensor(sorted({4, 5, (3 * step) % 10}))
        a, b = (
            torch.randn(len(a_rows), 4, generator=gen),
            torch.randn(len(b_rows), 4, generator=gen),
        )
        for s, store in enumerate(stores):
            pushes = [(1.0, _row_grads(ks, s, a_rows, a)), (1.0, _row_grads(ks, s, b_rows, b))]
            grads, factor = store.reduce(pushes)
            store.apply(grads, factor * 0.7)
        dense = torch.zeros(10, 4)
        dense.index_add_(0, a_rows, a)
        dense.index_add_(0, b_rows, b)
        rows = torch.cat([a_rows, b_rows]).unique()
        g = dense[rows] * 0.5 * 0.7
        emb.grad = torch.sparse_coo_tensor(rows[None], g, (10, 4), check_invariants=True)
        ref.step()
        got = _gather(ks, stores)["emb"]
        torch.testing.assert_close(got, emb.detach(), rtol=1e-6, atol=1e-7)
    untouched = torch.tensor(sorted(set(range(10)) - {0, 4, 5, 9, 1, 2, 3, 6, 8}))
    assert torch.equal(_gather(ks, stores)["emb"][untouched], init[untouched])  # row 7
    state = ref.state[emb]
    for name in ("exp_avg", "exp_avg_sq"):
        got = torch.empty(10, 4)
        for s, store in enumerate(stores):
            for c, view in zip(ks.shard(s), store.state_views[name], strict=True):
                if ks.tensors[c.tensor].rows:
                    got.view(-1)[c.offset : c.offset + c.length] = view
        torch.testing.assert_close(got, state[name], rtol=1e-6, atol=1e-8)


def test_row_pushes_are_checked() -> None:
    ks = KeySpace.build([("emb", (10, 4))], 1, chunk_bytes=48, rows=["emb"])
    store = ShardStore(ks, 0, OptimizerConfig(name="adam"))
    for bad in ([3, 1], [0, 0], [-1], [3]):  # unsorted, repeated, negative, past the chunk end
        with pytest.raises(RefusedError, match="sorted unique"):
            store.row_grad(torch.tensor(bad), torch.zeros(len(bad) * 4), 1)
    with pytest.raises(RefusedError, match="need 8 float values"):
        store.row_grad(torch.tensor([0, 1]), torch.zeros(7), 0)
    with pytest.raises(ConfigError, match="lazy"):
        ShardStore(ks, 0, OptimizerConfig(name="sgd"))
