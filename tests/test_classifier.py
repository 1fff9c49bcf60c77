"""The classification head on a GPT: pooling (mean, last token), windows of long texts,
loading a pretrained trunk, learning."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pslm.errors import ConfigError
from pslm.lm.classifier import GPTClassifier, classify, encode_texts
from pslm.lm.model import GPT, GPTConfig
from pslm.lm.tokenizer import CharTokenizer

CONFIG = GPTConfig(vocab_size=20, block_size=16, n_layer=2, n_head=2, n_embd=16, dropout=0.0)


@pytest.mark.parametrize("pooling", ["mean", "last"])
def test_padding_changes_no_text(pooling: str) -> None:
    torch.manual_seed(0)
    model = GPTClassifier(CONFIG, num_labels=3, pooling=pooling).eval()
    a, b = torch.randint(1, 20, (5,)), torch.randint(1, 20, (11,))
    batch = torch.zeros(2, 16, dtype=torch.long)
    batch[0, :5], batch[1, :11] = a, b
    logits, loss = model(batch, torch.tensor([5, 11]))
    assert logits.shape == (2, 3) and loss is None
    alone, _ = model(a[None], torch.tensor([5]))
    torch.testing.assert_close(logits[0], alone[0])
    batch[0, 5:] = 7  # other padding: the same
    torch.testing.assert_close(model(batch, torch.tensor([5, 11]))[0], logits)


def test_the_poolings_differ_and_last_reads_the_last_token_only() -> None:
    torch.manual_seed(0)
    last = GPTClassifier(CONFIG, num_labels=3, pooling="last").eval()
    mean = GPTClassifier(CONFIG, num_labels=3, pooling="mean").eval()
    mean.load_state_dict(last.state_dict())
    a = torch.randint(1, 20, (1, 9))
    n = torch.tensor([9])
    assert not torch.allclose(last(a, n)[0], mean(a, n)[0])
    # the last token's state, normalised and scored, by hand
    t = last.transformer
    x = t.wte(a) + t.wpe(torch.arange(9))
    for i, block in enumerate(t.h):
        x = block(x, None, i)
    torch.testing.assert_close(last(a, n)[0], last.score(t.ln_f(x[:, -1])))
    torch.testing.assert_close(mean(a, n)[0], mean.score(t.ln_f(x).mean(dim=1)))
    with pytest.raises(ConfigError, match="pooling"):
        GPTClassifier(CONFIG, num_labels=3, pooling="max")


def test_a_pretrained_trunk_loads_and_the_head_is_new() -> None:
    torch.manual_seed(1)
    pretrained = {n: p.detach().clone() for n, p in GPT(CONFIG).named_parameters()}
    torch.manual_seed(2)
    model = GPTClassifier(CONFIG, num_labels=2)
    head = model.score.weight.detach().clone()
    model.load_pretrained(pretrained)
    for name, p in model.named_parameters():
        if name.startswith("score."):
            continue
        assert torch.equal(p, pretrained[name]), name
    assert torch.equal(model.score.weight, head)
    assert not any(n.startswith("lm_head") for n, _ in model.named_parameters())
    with pytest.raises(ConfigError, match="shape"):
        GPTClassifier(CONFIG.with_(n_embd=32), num_labels=2).load_pretrained(pretrained)
    with pytest.raises(ConfigError, match="lacks"):
        model.load_pretrained({})
    with pytest.raises(ConfigError, match="two labels"):
        GPTClassifier(CONFIG, num_labels=1)


def test_it_learns_a_toy_task() -> None:
    torch.manual_seed(3)
    model = GPTClassifier(CONFIG, num_labels=2)
    x = torch.randint(1, 20, (64, 12))
    y = (x == 5).any(dim=1).long()  # does the text hold token 5?
    lengths = torch.full((64,), 12)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    first = None
    for _ in range(150):
        _, loss = model(x, lengths, y)
        assert loss is not None
        first = first or loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.2 * first


def test_texts_are_cut_padded_and_never_empty() -> None:
    tok = CharTokenizer("abcdef ")
    enc = encode_texts(tok, ["abc", "", "abcdefabcdef"], block_size=8)
    x, lengths = enc.x, enc.lengths
    assert x.shape == (3, 8) and lengths.tolist() == [3, 1, 8]
    assert x[1, 0] == tok.eot_id and tok.decode(x[2].tolist()) == "abcdefab"
    assert (x[0, 3:] == 0).all() and enc.offsets.tolist() == [0, 1, 2, 3]


def test_long_texts_are_read_in_windows_and_their_logits_averaged() -> None:
    tok = CharTokenizer("abcdef ")
    text = "abcdef " * 5  # 35 characters: windows of 8, 8, 8, 8, 3
    enc = encode_texts(tok, ["ab", text], block_size=8, windows=3)
    assert enc.offsets.tolist() == [0, 1, 4] and enc.counts().tolist() == [1, 3]
    assert enc.lengths.tolist() == [2, 8, 8, 8]
    pieces = [tok.decode(r[:n].tolist()) for r, n in zip(enc.x, enc.lengths, strict=True)]
    assert pieces[0] == "ab" and "".join(pieces[1:]) == text[:24]
    torch.manual_seed(4)
    model = GPTClassifier(CONFIG, num_labels=3).eval()
    probs = classify(model, enc, batch=2)  # batches that cut through a text's windows
    assert probs.shape == (2, 3)
    rows = torch.from_numpy(enc.x[1:].astype("int64"))
    with torch.no_grad():
        window_logits, _ = model(rows, torch.from_numpy(enc.lengths[1:].astype("int64")))
    torch.testing.assert_close(probs[1], torch.softmax(window_logits.mean(dim=0), dim=-1))
    with pytest.raises(ConfigError, match="windows"):
        encode_texts(tok, ["ab"], block_size=8, windows=0)


def test_a_steps_windows_are_drawn_for_the_global_batch(tmp_path) -> None:
    """Under BSP any number of workers must train on the same windows: worker r's slice of
    the global batch is the same whatever the slicing, and long texts get different windows
    at different steps."""
    from safetensors.torch import save_file

    from pslm.lm.labelled import Labelled, Split
    from pslm.train.config import TrainConfig
    from pslm.train.tasks import ClassifyTask, prepare_classify

    tok = CharTokenizer("abcdef ")
    texts = [("abcdef " * (1 + i % 6))[: 3 + 5 * i] for i in range(24)]
    part = Labelled("toy", texts, [i % 2 for i in range(24)], ["x", "y"])
    cfg = TrainConfig.from_dict(
        {
            "model": {"preset": "tiny", "block_size": 8},
            "train": {"batch_size": 6, "seed": 3},
            "finetune": {"task": "classify", "pretrained": "/p", "labels": ["x", "y"]},
        }
    )
    gpt = GPT(cfg.model.gpt(tok.vocab_size))
    pretrained = tmp_path / "pre"
    pretrained.mkdir()
    params = {n: p.detach().clone() for n, p in gpt.named_parameters()}
    save_file(params, pretrained / "model.safetensors")
    split = Split(part, part, part)
    data = prepare_classify(tmp_path / "data", split, tok, 8, pretrained, windows=4)
    task = ClassifyTask(cfg, data, torch.device("cpu"))
    drawn = []
    for step in range(12):
        whole = task.batch(step, 0, 6)
        halves = [task.batch(step, 0, 3), task.batch(step, 3, 6)]
        texts = task.order(step)
        rows = task.windows(step, texts)
        assert (rows >= task.train.offsets[texts]).all()
        assert (rows < task.train.offsets[texts + 1]).all()
        for i in (1, 2):  # lengths and labels
            assert torch.equal(whole[i], torch.cat([h[i] for h in halves]))
        width = whole[0].shape[1]
        for h, lo in zip(halves, (0, 3), strict=True):
            assert torch.equal(h[0], whole[0][lo : lo + 3, : h[0].shape[1]])
            assert (whole[0][lo : lo + 3, h[0].shape[1] : width] == 0).all()
        drawn.append(dict(zip(texts.tolist(), rows.tolist(), strict=True)))
    long_text = int(np.argmax(task.train.counts()))
    assert len({d[long_text] for d in drawn if long_text in d}) > 1
    np.save(tmp_path / "data" / "train_win.npy", np.array([0, 5, 3]))  # a damaged split
    with pytest.raises(ConfigError, match="inconsistent"):
        data.arrays("train")
