"""An English-like corpus generated offline and deterministically, so the default job and every test train
on text with real word statistics and no network.

Words are the 5000 most frequent English words (assets/english_words.tsv) drawn with their Zipf
frequencies; each word also has a few preferred successors, so there is structure beyond unigrams for a
tiny model to learn (its loss falls well below the unigram entropy within a few hundred steps).
Document lengths vary widely, as in real corpora, so padding and packing differ the way they do on
real text.
"""

from __future__ import annotations

import random
from functools import lru_cache
from pathlib import Path

WORDS_FILE = Path(__file__).parent / "assets" / "english_words.tsv"
SUCCESSORS = 6
P_FOLLOW = 0.75  # chance the next word is one of the current word's preferred successors


@lru_cache(maxsize=1)
def vocabulary() -> tuple[list[str], list[float]]:
    words, weights = [], []
    for line in WORDS_FILE.read_text().splitlines():
        if line.startswith("#"):
            continue
        word, zipf = line.split("\t")
        words.append(word)
        weights.append(10 ** float(zipf))
    return words, weights


def documents(n: int, seed: int = 0) -> list[str]:
    """`n` documents of 1-12 sentences; the same (n, seed) always gives the same text."""
    words, weights = vocabulary()
    rng = random.Random(seed)
    successors = [rng.choices(range(len(words)), weights=weights, k=SUCCESSORS) for _ in words]
    cum = _cumulative(weights)
    docs = []
    for _ in range(n):
        sentences = []
        for _ in range(rng.randint(1, 12)):
            w = rng.choices(range(len(words)), cum_weights=cum)[0]
            tokens = [words[w]]
            for _ in range(rng.randint(4, 20)):
                w = rng.choice(successors[w]) if rng.random() < P_FOLLOW else \
                    rng.choices(range(len(words)), cum_weights=cum)[0]
                tokens.append(words[w])
                # Punctuation and numbers, as in real prose, so a tokenizer trained here learns them too.
                u = rng.random()
                if u < 0.08:
                    tokens[-1] += ","
                elif u < 0.10:
                    tokens.append(str(rng.choice([rng.randint(1, 99), rng.randint(1800, 2025)])))
                elif u < 0.11:
                    tokens[-1] = f"({tokens[-1]})"
            sentences.append(" ".join(tokens).capitalize() + ".")
        docs.append(" ".join(sentences))
    return docs


def _cumulative(weights: list[float]) -> list[float]:
    out, total = [], 0.0
    for w in weights:
        total += w
        out.append(total)
    return out
