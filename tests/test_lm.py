"""The language-model layer: model, tokenizers, corpora, token files, batches, generation."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from pslm.errors import ConfigError
from pslm.lm.checkpoint import (
    latest_checkpoint,
    newest_verified,
    publish,
    set_aside,
    step_dir,
    verify,
    write_model,
)
from pslm.lm.corpus import load_corpus
from pslm.lm.data import GlobalBatches, get_batch, prepare, worker_slice
from pslm.lm.generate import generate
from pslm.lm.model import GPT, GPTConfig, KVCache
from pslm.lm.tokenizer import load_tokenizer, train_tokenizer

TEXT = "The quick brown fox jumps over the lazy dog. 敏捷的棕色狐狸跳过了懒狗。\n" * 20


def tiny(vocab: int = 50, **kw: int) -> GPT:
    torch.manual_seed(0)
    return GPT(GPTConfig.preset("tiny", vocab_size=vocab, block_size=16, **kw))


def test_forward_shapes_loss_and_tied_head() -> None:
    model = tiny()
    idx = torch.randint(0, 50, (3, 16))
    logits, loss = model(idx, torch.randint(0, 50, (3, 16)))
    assert logits.shape == (3, 16, 50) and loss is not None
    assert abs(loss.item() - np.log(50)) < 0.5  # near uniform at initialisation
    assert model.lm_head.weight is model.transformer.wte.weight
    names = [n for n, _ in model.named_parameters()]
    assert "lm_head.weight" not in names and len(names) == len(set(names))
    last, none = model(idx)
    assert last.shape == (3, 1, 50) and none is None
    with pytest.raises(ValueError, match="block_size"):
        model(torch.zeros(1, 17, dtype=torch.long))


def test_kv_cache_gives_the_same_logits() -> None:
    model = tiny().eval()
    idx = torch.randint(0, 50, (1, 10))
    full, _ = model(idx, idx)
    cache = KVCache.for_model(model)
    first, _ = model(idx[:, :6], cache=cache)
    torch.testing.assert_close(first[0, -1], full[0, 5], rtol=1e-5, atol=1e-5)
    for t in range(6, 10):
        step, _ = model(idx[:, t : t + 1], cache=cache)
        torch.testing.assert_close(step[0, -1], full[0, t], rtol=1e-5, atol=1e-5)
    assert cache.length == 10


def test_generation_with_and_without_cache_is_the_same_and_seeded() -> None:
    model = tiny()
    prompt = [1, 2, 3]
    greedy = generate(model, prompt, max_new_tokens=30, temperature=0.0)  # runs past block 16
    assert greedy == generate(model, prompt, max_new_tokens=30, temperature=0.0, use_cache=False)
    a = generate(model, prompt, max_new_tokens=20, temperature=1.0, top_k=10, top_p=0.9, seed=7)
    b = generate(
        model,
        prompt,
        max_new_tokens=20,
        temperature=1.0,
        top_k=10,
        top_p=0.9,
        seed=7,
        use_cache=False,
    )
    c = generate(model, prompt, max_new_tokens=20, temperature=1.0, top_k=10, top_p=0.9, seed=8)
    assert a == b and a != c and len(a) == 20 and model.training
    assert set(generate(model, prompt, max_new_tokens=40, top_k=1, seed=3)) == set(greedy[:40])
    with pytest.raises(ConfigError, match="prompt is empty"):
        generate(model, [], max_new_tokens=1)


@pytest.mark.parametrize("kind", ["bpe", "char"])
def test_tokenizers_round_trip_english_and_chinese(tmp_path, kind: str) -> None:
    tok = train_tokenizer(kind, [TEXT], vocab_size=300)
    ids = tok.encode(TEXT)
    assert tok.decode(ids) == TEXT
    if kind == "bpe":
        assert len(ids) < len(TEXT.encode("utf-8")) and tok.vocab_size <= 300
        unseen = "Ünïcødé 中文分词 ✓"
        assert tok.decode(tok.encode(unseen)) == unseen  # bytes: nothing is unknown
    tok.save(tmp_path / "tokenizer.json")
    again = load_tokenizer(tmp_path / "tokenizer.json")
    assert again.encode(TEXT) == ids and again.eot_id == tok.eot_id and again.kind == kind


def test_char_tokenizer_refuses_unseen_characters() -> None:
    tok = train_tokenizer("char", ["abc"])
    assert tok.encode("cab") == [3, 1, 2] and tok.eot_id == 0 and tok.vocab_size == 4
    with pytest.raises(ConfigError, match="'z' is not in"):
        tok.encode("z")


def test_bad_tokenizer_files(tmp_path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        load_tokenizer(tmp_path / "missing.json")
    (tmp_path / "junk.json").write_text('{"model": 3}')
    with pytest.raises(ConfigError, match="not a tokenizer"):
        load_tokenizer(tmp_path / "junk.json")


def test_corpora_from_files_directories_and_jsonl(tmp_path) -> None:
    (tmp_path / "a.txt").write_text("first document")
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "x.txt").write_text("one")
    (tmp_path / "d" / "y.md").write_text("two")
    (tmp_path / "d" / "z.bin").write_bytes(b"\x00\x01")
    (tmp_path / "c.jsonl").write_text(
        '{"text": "alpha"}\n\n{"text": "beta\u2028gamma", "label": 1}\n', encoding="utf-8"
    )
    assert load_corpus(str(tmp_path / "a.txt")).documents == ["first document"]
    assert load_corpus(str(tmp_path / "d")).documents == ["one", "two"]
    assert load_corpus(str(tmp_path / "c.jsonl")).documents == ["alpha", "beta\u2028gamma"]


def test_bbc_news_is_built_in() -> None:
    corpus = load_corpus("bbc-news")
    assert len(corpus.documents) == 2225 and 4_900_000 < corpus.chars < 5_100_000


@pytest.mark.parametrize(
    "content, fragment",
    [
        (None, "unknown corpus"),
        ("", "no text"),
        ("  \n", "no text"),
        (b"\xff\xfe", "not UTF-8"),
        ('{"txt": 1}\n', "field 'text'"),
        ("{oops\n", "not JSON"),
    ],
)
def test_bad_corpora(tmp_path, content, fragment) -> None:
    path = tmp_path / ("c.jsonl" if isinstance(content, str) and "{" in content else "c.txt")
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif content is not None:
        path.write_text(content)
    with pytest.raises(ConfigError, match=fragment):
        load_corpus(str(path) if content is not None else "no-such-corpus")


def test_prepared_data_is_split_cached_and_reused(tmp_path) -> None:
    (tmp_path / "book.txt").write_text(TEXT)
    corpus = load_corpus(str(tmp_path / "book.txt"))
    data = prepare(corpus, tokenizer="char", val_fraction=0.1, cache_dir=tmp_path / "cache")
    tok = data.tokenizer()
    train, val = data.tokens("train"), data.tokens("val")
    cut = int(len(TEXT) * 0.9)
    assert tok.decode(list(train)) == TEXT[:cut] and tok.decode(list(val)) == TEXT[cut:]
    assert train.dtype == np.uint16 and train[-1] == tok.eot_id
    again = prepare(corpus, tokenizer="char", val_fraction=0.1, cache_dir=tmp_path / "cache")
    assert again.path == data.path
    assert len(list((tmp_path / "cache").iterdir())) == 1
    other = prepare(corpus, tokenizer="char", val_fraction=0.2, cache_dir=tmp_path / "cache")
    assert other.path != data.path
    meta = json.loads((data.path / "meta.json").read_text())
    assert meta["train_tokens"] == cut + 1


def test_multi_document_split_keeps_documents_whole(tmp_path) -> None:
    docs = [f"document number {i} " * 5 for i in range(40)]
    (tmp_path / "c.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    data = prepare(
        load_corpus(str(tmp_path / "c.jsonl")), tokenizer="bpe", vocab_size=300, cache_dir=tmp_path
    )
    tok = data.tokenizer()
    pieces = {}
    for split in ("train", "val"):
        ids = list(data.tokens(split))
        assert ids[-1] == tok.eot_id
        ends = [i for i, t in enumerate(ids) if t == tok.eot_id]
        pieces[split] = [
            tok.decode(ids[a + 1 : b]) for a, b in zip([-1] + ends, ends, strict=False)
        ]
    assert len(pieces["val"]) == 4 and len(pieces["train"]) == 36  # 10% of 40, each whole
    assert sorted(pieces["train"] + pieces["val"]) == sorted(docs)


def test_global_batches_do_not_depend_on_the_number_of_workers() -> None:
    tokens = np.arange(1000, dtype=np.uint16)
    batches = GlobalBatches(len(tokens), block_size=8, batch_size=12, seed=3)
    off = batches.offsets(5)
    assert (off == batches.offsets(5)).all() and not (off == batches.offsets(6)).all()
    assert off.max() + 8 < len(tokens)
    x, y = get_batch(tokens, off, 8)
    assert x.shape == (12, 8) and torch.equal(x[:, 1:], y[:, :-1])
    for workers in (1, 2, 3, 4):
        rows = [worker_slice(r, workers, 12) for r in range(workers)]
        assert rows[0][0] == 0 and rows[-1][1] == 12
        assert all(a[1] == b[0] for a, b in zip(rows, rows[1:], strict=False))
    with pytest.raises(ConfigError, match="smaller than"):
        worker_slice(0, 5, 4)


def test_checkpoints_are_ordered_by_step_number_not_as_text(tmp_path) -> None:
    for step in (9_999_998, 9_999_999, 10_000_000):
        step_dir(tmp_path, step).mkdir(parents=True)
    assert latest_checkpoint(tmp_path) == step_dir(tmp_path, 10_000_000)
    tmp = tmp_path / "checkpoints" / ".tmp-step_10000001"
    tmp.mkdir()
    publish(tmp, step_dir(tmp_path, 10_000_001), keep=2)  # the two oldest go
    kept = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert kept == ["step_10000000", "step_10000001"]


def test_a_damaged_checkpoint_is_named_and_passed_over_for_the_one_before(tmp_path) -> None:
    model = tiny(30)
    for step in (10, 20):
        path = step_dir(tmp_path, step)
        path.mkdir(parents=True)
        (path / "shard-000-of-001.safetensors").write_bytes(bytes(range(256)) * 8)  # a server's
        write_model(path, model, {"step": step})
    old, new = step_dir(tmp_path, 10), step_dir(tmp_path, 20)
    assert verify(new) is None and newest_verified(tmp_path) == (new, [])
    shard = new / "shard-000-of-001.safetensors"
    shard.write_bytes(shard.read_bytes()[:-1])  # cut short
    assert verify(new) == "shard-000-of-001.safetensors has 2047 bytes, not the 2048 written"
    assert newest_verified(tmp_path) == (old, [(new, str(verify(new)))])
    shard.write_bytes(bytes(2048))  # the right size, other bytes
    assert "digest differs" in str(verify(new))
    meta = json.loads((old / "meta.json").read_text())
    (old / "meta.json").write_text(json.dumps({**meta, "files": {"model.safetensors": 5}}))
    assert verify(old) == "bad meta.json (the entry of model.safetensors is not a table)"
    (old / "meta.json").write_text(json.dumps(meta))
    (old / "model.safetensors").unlink()
    assert verify(old) == "model.safetensors is missing"
    (new / "meta.json").write_text("{")
    path, passed = newest_verified(tmp_path)
    assert path is None and passed[0][1].startswith("bad meta.json")
    moved = set_aside(new)
    assert moved == tmp_path / "checkpoints" / "damaged" / "step_0000020" and not new.exists()
    new.mkdir()  # the same step damaged a second time
    assert set_aside(new).name == "step_0000020.1" and latest_checkpoint(tmp_path) == old
