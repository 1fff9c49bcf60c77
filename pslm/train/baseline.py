"""The classical baseline: TF-IDF features and logistic regression (scikit-learn), trained
and tested on the same split as the fine-tuned model.

    result = run_baseline(split, language="zh", pos=("n", "v", "a", "d"), stopwords=True)
    result.predictions            # label indices for split.test

English text is cut into words by scikit-learn's own pattern (lower-cased). Chinese text has
no spaces: it is segmented with jieba first; ``pos`` keeps only the words whose jieba
part-of-speech tag starts with one of the given letters (n nouns, v verbs, a adjectives, d
adverbs, ...), and ``stopwords`` drops the function words of ``ZH_STOPWORDS``. Negations and
degree adverbs (不, 没, 很, 太) are no stop words here: they carry sentiment.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from pslm.errors import ConfigError
from pslm.lm.labelled import Split

ZH_STOPWORDS = frozenset(
    "的 了 是 在 和 与 及 或 而 也 就 都 又 还 着 过 之 其 这 那 这个 那个 这些 那些 "
    "一个 一些 我们 你们 他们 她们 它们 自己 把 被 让 给 对 从 向 到 为 以 于 所 "
    "因为 所以 但是 而且 如果 虽然 然后 还是 只是 或者 以及 并且 吧 吗 呢 啊 呀 哦 嗯 "
    "个 些 么 地 得 等 等等 ， 。 、 ！ ？ ： ； “ ” ‘ ’ （ ） 《 》 … — · , . ! ? : ;".split()
)
"""Chinese function words and punctuation, written for this project."""


@dataclass(frozen=True, slots=True)
class BaselineResult:
    predictions: list[int]
    """Label indices predicted for the test texts."""
    features: int
    """Size of the TF-IDF vocabulary."""


def zh_tokenizer(pos: Sequence[str] = (), stopwords: bool = False) -> Callable[[str], list[str]]:
    """A jieba tokenizer for Chinese text, keeping words whose POS tag starts with one of
    ``pos`` (all words if empty) and dropping ``ZH_STOPWORDS`` if ``stopwords``."""
    try:
        import jieba
        import jieba.posseg
    except ImportError:
        raise ConfigError("Chinese text needs jieba: pip install 'pslm[zh]'") from None
    jieba.setLogLevel(60)  # no "Building prefix dict" chatter
    prefixes = tuple(pos)

    def tokens(text: str) -> list[str]:
        if prefixes:
            words = [w.word for w in jieba.posseg.cut(text) if w.flag.startswith(prefixes)]
        else:
            words = list(jieba.cut(text))
        return [w for w in words if w.strip() and not (stopwords and w in ZH_STOPWORDS)]

    return tokens


def run_baseline(
    split: Split,
    *,
    language: str = "en",
    pos: Sequence[str] = (),
    stopwords: bool = False,
    seed: int = 0,
) -> BaselineResult:
    """Fit TF-IDF (words and word pairs, sublinear term frequency) + logistic regression on
    ``split.train``; predict ``split.test``."""
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression

    if language == "zh":
        vectorizer = TfidfVectorizer(
            tokenizer=zh_tokenizer(pos, stopwords),
            token_pattern=None,
            lowercase=False,
            ngram_range=(1, 2),
            sublinear_tf=True,
        )
    elif language == "en":
        vectorizer = TfidfVectorizer(
            ngram_range=(1, 2),
            sublinear_tf=True,
            stop_words="english" if stopwords else None,
        )
    else:
        raise ConfigError(f"language must be en or zh, got {language!r}")
    x_train = vectorizer.fit_transform(split.train.texts)
    model = LogisticRegression(max_iter=2000, C=10.0, random_state=seed)
    model.fit(x_train, split.train.targets)
    predictions = model.predict(vectorizer.transform(split.test.texts))
    return BaselineResult([int(p) for p in predictions], len(vectorizer.vocabulary_))


def language_of(texts: Sequence[str]) -> str:
    """``zh`` if most characters of a sample of ``texts`` are CJK ideographs, else ``en``."""
    sample = "".join(texts[:200])
    cjk = sum(1 for ch in sample if "\u4e00" <= ch <= "\u9fff")
    letters = sum(1 for ch in sample if ch.isalpha())
    return "zh" if letters and cjk / letters > 0.5 else "en"
