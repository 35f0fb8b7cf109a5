"""Builds the bundled dirty corpus `jaxllm/assets/kjv-dirty/part-0000{0..3}.jsonl.gz`: the New Testament
chapters of `builtin:kjv` (`builtin:kjv-nt`, Matthew .. 2 John, 236 chapters) with injected junk, duplicates,
foreign-language text, personal data and evaluation text, for the worked example of `jaxllm data prepare
configs/data-kjv.yaml` (docs/data.md).

    python tools/make_dirty_corpus.py jaxllm/assets/kjv-dirty

Deterministic (numpy seed 0, gzip without a timestamp): running it again reproduces the files byte for byte.
Every record is {"text", "kind"} (plus "of": the chapter a copy was made from), records without an id (the
reader gives them "part-0000K.jsonl.gz:LINE"). KIND is
- `chapter`:      a genuine chapter, unchanged;
- `boilerplate`:  a genuine chapter with web boilerplate lines added (share/subscribe/cookie/copyright lines);
- `pii`:          a genuine chapter with a contact line holding an e-mail address and a phone number;
- `exact-copy`:   a verbatim copy of another chapter;
- `near-copy`:    a copy with a heading added, one verse dropped and about 1% of its words replaced
                  (word 5-gram Jaccard with its original printed by this script);
- `junk`:         navigation menus, lorem ipsum, cookie/javascript notices, spam, symbol and number tables;
- `non-english`:  French, German, Spanish and Italian paragraphs;
- `contaminated`: commentary quoting verses of `builtin:kjv-valid` (Revelation, Jude, 3 John), the evaluation
                  text the decontamination stage removes.
The records are shuffled together and split into four shards of (almost) equal size.
"""

from __future__ import annotations

import argparse
import gzip
import json
from pathlib import Path

import numpy as np

ASSETS = Path(__file__).resolve().parent.parent / "jaxllm" / "assets"
NT_START = 929  # the first New Testament chapter (Matthew 1) in kjv.jsonl.gz
SHARDS = 4
COUNTS = {"boilerplate": 20, "pii": 15, "exact-copy": 25, "near-copy": 25, "contaminated": 10}

BOILERPLATE = [
    "Share this chapter on Facebook | Twitter | Email",
    "Click here to subscribe to our daily verse newsletter",
    "This website uses cookies to improve your experience. Read our cookie policy",
    "Copyright 2024 Bible Reading Online. All rights reserved. Terms of use",
    "Previous chapter | Next chapter | Back to top",
]
JUNK = [
    "Home\nAbout us\nOur ministry\nContact\nLogin\nRegister\nCart (0)\nSearch\nFAQ\nSitemap",
    ("Lorem ipsum dolor sit amet, consectetur adipiscing elit, sed do eiusmod tempor incididunt ut labore et "
     "dolore magna aliqua. Ut enim ad minim veniam, quis nostrud exercitation ullamco laboris nisi ut aliquip ex "
     "ea commodo consequat. Duis aute irure dolor in reprehenderit in voluptate velit esse cillum dolore."),
    ("Please enable JavaScript to view this page. This site uses cookies; by continuing you accept our privacy "
     "policy and terms of use. Your browser is out of date."),
    "BUY CHEAP BIBLES NOW!!! " * 40,
    "best price " * 17 + "best price",
    "#### ### ## #### ### ## #### ### ## ... ... ... #### ### ## #### ### ## #### ### ## ... ... ...",
    "1 2 3 4 5 6 7 8 9 10\n11 12 13 14 15 16 17 18 19 20\n21 22 23 24 25 26 27 28 29 30\n31 32 33 34 35 36",
    "Error 404: page not found\nThe page you requested could not be found\nReturn to the home page",
]
FOREIGN = {
    "fr": "Au commencement de la ville il y avait une petite maison près de la rivière. Les enfants y jouaient "
          "chaque matin avant d'aller à l'école, et leur grand-mère leur racontait des histoires anciennes. "
          "Le soir, toute la famille se réunissait autour de la table pour partager le repas et parler de la "
          "journée. Personne ne se souvenait de l'année où la maison avait été construite.",
    "de": "Am Anfang des Tages ging der alte Mann langsam zum Markt, um frisches Brot und Gemüse zu kaufen. "
          "Die Händler kannten ihn seit vielen Jahren und grüßten ihn freundlich. Danach setzte er sich in den "
          "kleinen Park neben der Kirche und las die Zeitung, bis die Sonne hoch am Himmel stand und es Zeit "
          "für das Mittagessen war.",
    "es": "En el principio del verano los campesinos del pueblo se levantaban muy temprano para trabajar en los "
          "campos antes del calor. Las mujeres preparaban el pan y los niños llevaban agua desde el pozo. Por "
          "la tarde todos descansaban a la sombra de los árboles y escuchaban las historias de los abuelos "
          "sobre los tiempos pasados.",
    "it": "All'inizio della primavera i pescatori del villaggio riparavano le reti sulla spiaggia e preparavano "
          "le barche per la stagione. Le donne vendevano il pesce al mercato della piazza e i bambini correvano "
          "tra le bancarelle. La sera le famiglie si riunivano per cenare insieme e raccontare le notizie del "
          "giorno.",
}
COMMENTARY = [
    "Commentary for the evening study group.",
    "Readers have understood these words in many different ways over the centuries.",
    "Notice the imagery of the passage and how it speaks to the hope of the first readers.",
    "Take time to discuss the passage together before the closing prayer.",
]


def _read(path: Path) -> list[str]:
    return [json.loads(line)["text"] for line in gzip.decompress(path.read_bytes()).decode().splitlines()]


def _shingles(text: str, n: int = 5) -> set:
    words = text.lower().split()
    return {tuple(words[i:i + n]) for i in range(len(words) - n + 1)}


def _near_copy(chapter: str, rng: np.random.Generator) -> str:
    title, *verses = chapter.split("\n")
    if len(verses) > 3:
        del verses[int(rng.integers(len(verses)))]
    words = "\n".join(verses).split(" ")
    vocabulary = sorted({w for w in words if w.isalpha()})
    for i in rng.choice(len(words), size=max(1, len(words) // 100), replace=False):
        if "\n" not in words[i]:
            words[i] = vocabulary[int(rng.integers(len(vocabulary)))]
    return f"{title}\nToday's reading from the daily plan.\n" + " ".join(words)


def build(rng: np.random.Generator) -> tuple[list[dict], list[float]]:
    chapters = _read(ASSETS / "kjv.jsonl.gz")[NT_START:]
    valid_verses = [v for text in _read(ASSETS / "kjv-valid.jsonl.gz") for v in text.split("\n")[1:]
                    if len(v.split()) >= 15]
    records = [{"text": c, "kind": "chapter"} for c in chapters]
    order = rng.permutation(len(records))
    at = 0

    def take(n: int) -> list[int]:
        nonlocal at
        at += n
        return [int(i) for i in order[at - n:at]]

    for i in take(COUNTS["boilerplate"]):
        lines = records[i]["text"].split("\n")
        for line in rng.choice(BOILERPLATE, size=2, replace=False):
            lines.insert(int(rng.integers(1, len(lines) + 1)), str(line))
        records[i] = {"text": "\n".join(lines), "kind": "boilerplate"}
    for n, i in enumerate(take(COUNTS["pii"])):
        contact = f"For prayer requests write to reader{n}@example.org or call +1 (555) {100 + n:03d}-{4000 + n:04d}."
        records[i] = {"text": records[i]["text"] + "\n" + contact, "kind": "pii"}
    extra = []
    for i in rng.choice(len(chapters), size=COUNTS["exact-copy"], replace=False):
        extra.append({"text": chapters[i], "kind": "exact-copy", "of": chapters[i].split("\n")[0]})
    similarities = []
    for i in rng.choice(len(chapters), size=COUNTS["near-copy"], replace=False):
        text = _near_copy(chapters[i], rng)
        a, b = _shingles(chapters[i]), _shingles(text)
        similarities.append(len(a & b) / len(a | b))
        extra.append({"text": text, "kind": "near-copy", "of": chapters[i].split("\n")[0]})
    for i, junk in enumerate(JUNK * 3):
        extra.append({"text": junk if i < len(JUNK) else f"{junk}\n{JUNK[(i + 3) % len(JUNK)]}", "kind": "junk"})
    for i in range(20):
        lang = sorted(FOREIGN)[i % len(FOREIGN)]
        sentences = FOREIGN[lang].split(". ")
        start = i // len(FOREIGN) % len(sentences)
        extra.append({"text": ". ".join(sentences[start:] + sentences[:start]), "kind": "non-english"})
    for _ in range(COUNTS["contaminated"]):
        quoted = [valid_verses[int(j)] for j in rng.choice(len(valid_verses), size=2, replace=False)]
        parts = [COMMENTARY[0], quoted[0], COMMENTARY[1], COMMENTARY[2], quoted[1], COMMENTARY[3]]
        extra.append({"text": "\n".join(parts), "kind": "contaminated"})
    for record in extra:
        records.insert(int(rng.integers(len(records) + 1)), record)
    return records, similarities


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", nargs="?", default=str(ASSETS / "kjv-dirty"), help="directory to write")
    args = parser.parse_args()
    records, similarities = build(np.random.default_rng(0))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    bounds = np.linspace(0, len(records), SHARDS + 1).astype(int)
    for k in range(SHARDS):
        data = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records[bounds[k]:bounds[k + 1]])
        (out / f"part-{k:05d}.jsonl.gz").write_bytes(gzip.compress(data.encode(), compresslevel=9, mtime=0))
    kinds: dict[str, int] = {}
    for r in records:
        kinds[r["kind"]] = kinds.get(r["kind"], 0) + 1
    print(f"wrote {len(records)} records in {SHARDS} shards to {out}: {kinds}")
    print(f"near-copies: word 5-gram Jaccard with their originals {min(similarities):.2f} .. "
          f"{max(similarities):.2f} (mean {np.mean(similarities):.2f})")


if __name__ == "__main__":
    main()
