"""The demo guest's application: a warm-up that does real work, then a service.

Warm-up builds an inverted index over a deterministic synthetic corpus (the kind of work
a search service or a cache does before it can answer); then the process forks into the
background and "answers" by printing a heartbeat line with a query result every
``--interval`` seconds, so dom0 can time exactly when the application answers again after
a crash. Run as the ``start`` command of the agent's ``app`` phase: it returns once the
warm-up is done, so the phase boundary (and its image) comes after the warm-up.
Standard library only; runs inside the guest.
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import time

WORDS = [f"w{i:04d}" for i in range(4000)] + ["alpha", "omega"]


def corpus(documents: int, seed: int = 42) -> list[list[str]]:
    """A deterministic synthetic corpus: ``documents`` documents of 40 words."""
    rng = random.Random(seed)
    return [rng.choices(WORDS, k=40) for _ in range(documents)]


def build_index(docs: list[list[str]]) -> dict[str, set[int]]:
    """word -> ids of the documents containing it."""
    index: dict[str, set[int]] = {}
    for doc_id, words in enumerate(docs):
        for word in words:
            index.setdefault(word, set()).add(doc_id)
    return index


def fill_cache(docs: list[list[str]], index: dict[str, set[int]],
               words: int = 300) -> dict[str, list[str]]:
    """Precompute the 10 words most often seen with each of the first ``words`` words
    (what a search service caches before it takes traffic)."""
    cache = {}
    for word in WORDS[:words]:
        counts: dict[str, int] = {}
        for doc_id in index.get(word, ()):
            for other in docs[doc_id]:
                counts[other] = counts.get(other, 0) + 1
        cache[word] = sorted(counts, key=counts.__getitem__, reverse=True)[:10]
    return cache


def answer(index: dict[str, set[int]]) -> int:
    """The query the service answers: documents containing both alpha and omega."""
    return len(index.get("alpha", set()) & index.get("omega", set()))


def serve(index: dict[str, set[int]], interval: float) -> None:
    result = answer(index)
    with open("/dev/console", "w") as console:
        n = 0
        while True:
            n += 1
            console.write(f"XENPBR-APP: alive n={n} answer={result}\n")
            console.flush()
            time.sleep(interval)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--documents", type=int, default=20000)
    parser.add_argument("--interval", type=float, default=0.2)
    args = parser.parse_args()
    start = time.monotonic()
    docs = corpus(args.documents)
    index = build_index(docs)
    cache = fill_cache(docs, index)
    took = time.monotonic() - start
    print(f"XENPBR-APP: warm-up done in {took:.1f} s, {len(index)} words, "
          f"{len(cache)} cached, answer={answer(index)}", flush=True)
    if os.fork() == 0:
        os.setsid()
        serve(index, args.interval)
    return 0


if __name__ == "__main__":
    sys.exit(main())
