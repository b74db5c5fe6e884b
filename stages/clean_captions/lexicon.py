r"""English word frequencies for the short-caption language check (`short_caption_policy: lexicon`).

Language identifiers guess on two- to four-word captions (`a blurred wall clock` → zh 0.52 with
fastText), so the stage also asks a word-frequency list: a unigram naive-Bayes comparison of
English against every other Latin-script language wordfreq knows. A short caption is English when
every word (2+ letters) is in the list and, against each other language, the summed log-frequency
advantage of English (Zipf units, each word's advantage capped at ``CAP``) is at least the stage's
margin (`yellow tulips`, `blueberry muffins`); `gelbe Tulpen`, `une horloge` have unknown words
and go to the language identifier.

``en_lexicon.txt.gz`` (next to this module) has one line per English word with Zipf frequency ≥
``MIN_ZIPF``: ``word<TAB>en_zipf<TAB>lang:zipf,...`` listing only the languages where the word's
frequency is within ``CAP`` of English or above (others count as English + ``CAP``). Words are
lower-case letter runs (`[^\W\d_]+`). Derived from wordfreq's data (CC BY-SA 4.0,
https://github.com/rspeer/wordfreq; the derived list is under the same licence). Rebuild it, with
wordfreq installed, by ``python -m curate.stages.clean_captions.lexicon``.
"""

from __future__ import annotations

import functools
import gzip
import re
from pathlib import Path

LEXICON_PATH = Path(__file__).with_name("en_lexicon.txt.gz")
MIN_ZIPF = 2.5
CAP = 1.0
#: Latin-script languages compared against English.
OTHER_LANGUAGES = (
    "ca", "cs", "da", "de", "es", "fi", "fil", "fr", "hr", "hu", "id", "is", "it", "lt", "lv", "ms", "nb", "nl",
    "pl", "pt", "ro", "sk", "sl", "sv", "tr", "vi",
)
WORD_RE = re.compile(r"[^\W\d_]+")

class Lexicon:
    """word -> {language: English advantage in Zipf units, below CAP}; languages not listed count CAP.

    A word's line is parsed on first lookup: parsing all ~51k lines up front cost ~0.5 s CPU in every worker
    process, and only the words of short captions are ever looked up.
    """

    def __init__(self, lines: dict[str, str]) -> None:
        self._lines = lines  # word -> "en_zipf<TAB>lang:zipf,..."
        self._parsed: dict[str, dict[str, float]] = {}

    def __len__(self) -> int:
        return len(self._lines)

    def __contains__(self, word: object) -> bool:
        return word in self._lines

    def get(self, word: str) -> dict[str, float] | None:
        parsed = self._parsed.get(word)
        if parsed is None:
            line = self._lines.get(word)
            if line is None:
                return None
            en, _, others = line.partition("\t")
            zipf = float(en)
            parsed = {
                lang: round(zipf - float(value), 2)
                for lang, _, value in (item.partition(":") for item in others.split(",") if item)
            }
            self._parsed[word] = parsed  # same value from any thread: a racing duplicate parse is harmless
        return parsed


@functools.lru_cache(maxsize=1)
def load() -> Lexicon:
    """The bundled list (word -> {language: English advantage}, parsed per word on first use)."""
    with gzip.open(LEXICON_PATH, "rt", encoding="utf-8") as f:
        text = f.read()
    lines: dict[str, str] = {}
    for line in text.splitlines():
        word, _, rest = line.partition("\t")
        lines[word] = rest
    return Lexicon(lines)


def english_margin(words: list[str], lexicon: Lexicon) -> float | None:
    """Smallest summed English advantage over any other language; None when a word is unknown."""
    totals: dict[str, float] = {}
    known = 0
    for word in words:
        advantages = lexicon.get(word)
        if advantages is None:
            return None
        known += 1
        for lang, advantage in advantages.items():
            totals[lang] = totals.get(lang, 0.0) + advantage - CAP
    if not known:
        return None
    # Each language starts from CAP per word; listed words replace CAP by their advantage.
    return known * CAP + min(totals.values(), default=0.0)


def build(path: Path = LEXICON_PATH) -> int:
    """Write the list from wordfreq (needs `pip install wordfreq`); returns the number of words."""
    import wordfreq

    rows: list[str] = []
    for word in wordfreq.iter_wordlist("en"):
        en = wordfreq.zipf_frequency(word, "en")
        if en < MIN_ZIPF:
            break  # iter_wordlist is in descending frequency
        if not WORD_RE.fullmatch(word):
            continue
        close = []
        for lang in OTHER_LANGUAGES:
            other = wordfreq.zipf_frequency(word, lang)
            if other > en - CAP:
                close.append(f"{lang}:{other:.2f}")
        rows.append(f"{word}\t{en:.2f}\t{','.join(close)}")
    with gzip.GzipFile(path, "wb", mtime=0) as f:
        f.write(("\n".join(sorted(rows)) + "\n").encode("utf-8"))
    return len(rows)


if __name__ == "__main__":
    print(f"wrote {LEXICON_PATH}: {build()} words")
