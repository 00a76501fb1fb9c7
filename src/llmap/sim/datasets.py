"""Synthetic data sets with a hidden truth, for the simulator's groups (:mod:`llmap.sim.groups`).

- :func:`titles`: news-like titles in event families whose sizes are skewed as news
  is (a few large stories, many small ones; at least 3 titles each).
- :func:`entities`: names of entities, each written one to several ways (resolve's
  duplicates), most entities written once.
- :func:`adjusted_rand` and :func:`pair_scores` score a labeling against the truth.

Each returns rows ``{"id", "text", "group", "name"}``; :func:`write` puts them in a CSV
file that serves both as a job's input and as the simulator's ``--groups`` file.
Everything is a function of the seed.
"""

from __future__ import annotations

import csv
import random
from collections import Counter
from itertools import combinations
from math import comb
from pathlib import Path

__all__ = ["adjusted_rand", "entities", "pair_scores", "skewed_sizes", "titles", "write"]

_PLACES = ("Kyiv", "Gaza", "Taipei", "Manila", "Lagos", "Quito", "Kerala", "Sahel", "Donbas", "Aleppo", "Mosul",
           "Hormuz", "Crimea", "Darfur", "Sinai", "Kashmir", "Tigray", "Sudan", "Haiti", "Yemen", "Niger", "Mali",
           "Basra", "Odesa", "Kharkiv", "Busan", "Okinawa", "Luzon", "Java", "Benghazi", "Tripoli", "Idlib",
           "Rafah", "Goma", "Kabul", "Herat", "Karachi", "Dhaka", "Yangon", "Caracas")
_EVENTS = ("ceasefire talks", "drone strikes", "flood relief", "election dispute", "border clashes", "naval standoff",
           "grain corridor", "refugee crisis", "cyberattack", "coup attempt", "sanctions package", "hostage deal",
           "earthquake response", "port blockade", "missile test", "peace summit", "aid convoy", "power outage",
           "protest crackdown", "arms shipment")
_ACTORS = ("UN envoy", "NATO", "the EU", "Washington", "Beijing", "Moscow", "Ankara", "Tehran", "the AU", "Kyiv",
           "rebels", "the army", "aid groups", "the IMF", "ministers", "the navy", "militias", "observers")
_VERBS = ("warns over", "backs", "rejects", "condemns", "extends", "halts", "pushes", "weighs", "delays", "joins")
_DETAILS = ("as deadline nears", "after overnight talks", "amid fresh fighting", "officials say", "sources say",
            "in a surprise move", "despite pressure", "as losses mount", "for a second week", "before the vote",
            "under new terms", "in early hours", "after weeks of delay", "as crowds gather")
_FIRST = ("Acme", "Globex", "Initech", "Umbrella", "Stark", "Wayne", "Hooli", "Vandelay", "Soylent", "Tyrell",
          "Cyberdyne", "Wonka", "Gringotts", "Pied Piper", "Massive", "Oscorp", "Aperture", "Monarch", "Dunder",
          "Sterling", "Prestige", "Buy n Large", "Nakatomi", "Zorg", "Virtucon", "Krusty", "Bluth", "Duff")
_SECOND = ("Holdings", "Foods", "Logistics", "Energy", "Media", "Labs", "Capital", "Motors", "Health", "Systems",
           "Textiles", "Mining", "Airlines", "Pharma", "Robotics", "Insurance", "Retail", "Shipping")
_SUFFIX = (("Corporation", "Corp.", "Corp"), ("Incorporated", "Inc.", "Inc"), ("Limited", "Ltd.", "Ltd"),
           ("Company", "Co.", "Co"), ("Group", "Grp.", "Group"))
_CITIES = ("Laramie", "Casper", "Cody", "Denver", "Boise", "Reno", "Tulsa", "Omaha", "Fargo", "Helena", "Provo")


def skewed_sizes(n: int, k: int, *, minimum: int = 3, alpha: float = 1.1) -> list[int]:
    """``k`` sizes summing to ``n``, each at least ``minimum``, falling like a power law (Zipf, ``alpha``)."""
    if n < k * minimum:
        raise ValueError(f"{n} rows cannot fill {k} groups of at least {minimum}")
    weights = [1.0 / (i + 2) ** alpha for i in range(k)]
    spare = n - k * minimum
    total = sum(weights)
    sizes = [minimum + int(spare * w / total) for w in weights]
    for i in range(n - sum(sizes)):
        sizes[i % k] += 1
    return sizes


def titles(n: int = 7500, families: int = 300, *, seed: int = 20) -> list[dict]:
    """``n`` news titles in ``families`` event families (sizes from :func:`skewed_sizes`), in a shuffled order."""
    rng = random.Random(seed)
    combos = [(e, p) for e in _EVENTS for p in _PLACES]
    rng.shuffle(combos)
    if families > len(combos):
        raise ValueError(f"at most {len(combos)} families")
    rows = []
    for f, size in enumerate(skewed_sizes(n, families)):
        event, place = combos[f]
        name = f"{event.capitalize()} in {place}"
        for i in range(size):
            actor, verb, detail = rng.choice(_ACTORS), rng.choice(_VERBS), rng.choice(_DETAILS)
            text = f"{actor.capitalize()} {verb} {event} in {place} {detail} ({f}.{i})"
            rows.append({"text": text, "group": f"g{f}", "name": name})
    rng.shuffle(rows)
    return [{"id": f"t{i:05d}", **r} for i, r in enumerate(rows)]


def entities(n_entities: int = 2500, *, seed: int = 21) -> list[dict]:
    """Names of ``n_entities`` companies, each written 1 to 5 ways (most once), in a shuffled order."""
    rng = random.Random(seed)
    rows = []
    seen: set[str] = set()
    for e in range(n_entities):
        first, second, suffix = rng.choice(_FIRST), rng.choice(_SECOND), rng.choice(_SUFFIX)
        city = rng.choice(_CITIES)
        base = f"{first} {second}"
        name = f"{base} {suffix[0]} ({city} #{e})"
        k = rng.choices((1, 2, 3, 4, 5), weights=(50, 25, 12, 8, 5))[0]
        forms = [f"{base} {suffix[0]}", f"{base} {suffix[1]}", f"{base.upper()} {suffix[2]}",
                 f"{base.lower()} {suffix[2].lower()}", f"{first} {second[0]}. {suffix[1]}"]
        for form in forms[:k]:
            text = f"{form}, {city} #{e}"
            if text in seen:
                continue
            seen.add(text)
            rows.append({"text": text, "group": f"e{e}", "name": name})
    rng.shuffle(rows)
    return [{"id": f"n{i:05d}", **r} for i, r in enumerate(rows)]


def write(rows: list[dict], path: Path) -> Path:
    """Write ``rows`` (``id``, ``text``, ``group``, ``name``) as CSV: a job's input and the simulator's groups file."""
    path = Path(path)
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=["id", "text", "group", "name"])
        w.writeheader()
        w.writerows(rows)
    return path


def adjusted_rand(truth: list, pred: list) -> float:
    """The adjusted Rand index of ``pred`` against ``truth`` (Hubert and Arabie, 1985): 1 for the same
    partition, about 0 for a random one. A None label is a group of its own (a row no family fits)."""
    pred = [p if p is not None else ("_none", i) for i, p in enumerate(pred)]
    n = len(truth)
    if n < 2:
        return 1.0
    index = sum(comb(v, 2) for v in Counter(zip(truth, pred, strict=True)).values())
    sa = sum(comb(v, 2) for v in Counter(truth).values())
    sb = sum(comb(v, 2) for v in Counter(pred).values())
    expected = sa * sb / comb(n, 2)
    top = (sa + sb) / 2
    return 1.0 if top == expected else (index - expected) / (top - expected)


def pair_scores(truth: list, pred: list) -> tuple[float, float, int]:
    """Pair recall and precision of ``pred`` against ``truth`` (pairs of rows in one group), and the true pairs."""
    def pairs(labels: list) -> set[tuple[int, int]]:
        by: dict = {}
        for i, g in enumerate(labels):
            if g is not None:
                by.setdefault(g, []).append(i)
        return {p for members in by.values() for p in combinations(members, 2)}

    t, p = pairs(truth), pairs(pred)
    hit = len(t & p)
    return (hit / len(t) if t else 1.0), (hit / len(p) if p else 1.0), len(t)
