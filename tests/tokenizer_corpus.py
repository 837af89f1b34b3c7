"""A varied, deterministic corpus of strings for checking a tokenizer against an oracle.

``corpus()`` returns well over 1,000 strings: many scripts, emoji sequences, code, numbers,
whitespace runs, CRLF, contractions, special-token text, seeded random Unicode and a few strings
longer than 25,000 characters. ``long_window_string()`` returns one string of more than 400,000
characters (kept apart: tests encode it once). Everything is built from fixed seeds.
"""

from __future__ import annotations

import functools
import itertools
import random

SCRIPTS = [
    # Latin with accents, and other Latin-script languages
    "Hello, world! The quick brown fox jumps over the lazy dog.",
    "Ça va? Où est la bibliothèque? Élève, garçon, naïve, cœur, déjà-vu.",
    "Fußgängerübergänge und Größenverhältnisse: Äpfel, Öl, Übermut.",
    "¿Qué tal, señor Muñoz? ¡Mañana será otro día!",
    "Zażółć gęślą jaźń. Čeština: příliš žluťoučký kůň úpěl ďábelské ódy.",
    "Tiếng Việt có dấu: Người ta thường nói rằng học, học nữa, học mãi.",
    "İstanbul'da ılık şarap içtik; Ağaç, çiçek, öğün.",
    "Ångström, Øresund, æble, Þórr, ðæt, ŋ, ĳ, ﬁ ligature, ǅ titlecase.",
    # Cyrillic, Greek
    "Съешь же ещё этих мягких французских булок, да выпей чаю.",
    "Україна, Ґанок, Їжак, Єнот; Беларусь: Ўзвышша.",
    "Ξεσκεπάζω την ψυχοφθόρα βδελυγμία. Αλφάβητο: αβγδεζηθικλμνξοπρστυφχψω.",
    # Right to left
    "العربية لغة جميلة. مرحبا بالعالم! ١٢٣٤٥٦٧٨٩٠",
    "שלום עולם! עברית נכתבת מימין לשמאל. 12 תפוחים.",
    "فارسی: سلام دنیا، حال شما چطور است؟ ۱۲۳۴",
    # Indic, Southeast Asian
    "हिन्दी भाषा देवनागरी लिपि में लिखी जाती है। नमस्ते दुनिया! १२३४५",
    "বাংলা ভাষা, தமிழ் மொழி, తెలుగు, ಕನ್ನಡ, മലയാളം, ગુજરાતી, ਪੰਜਾਬੀ.",
    "ภาษาไทยไม่มีช่องว่างระหว่างคำ สวัสดีครับ ๑๒๓",
    "ພາສາລາວ, ភាសាខ្មែរ, မြန်မာဘာသာ, བོད་ཡིག",
    # CJK, Hangul
    "中文没有空格。我爱北京天安门，天安门上太阳升。",
    "日本語：ひらがな、カタカナ、漢字。ｶﾀｶﾅ半角。東京は晴れです。",
    "한국어 문장입니다. 안녕하세요, 세계! 훈민정음 ㄱㄴㄷ.",
    "繁體中文：臺灣、香港。𠀀𠀁𪚥 (supplementary ideographs).",
    # Other scripts
    "ქართული ენა, Հայերեն լեզու, አማርኛ ቋንቋ, ᏣᎳᎩ, ᚠᚢᚦᚨᚱᚲ, 𓀀𓀁𓀂.",
    "Math: ∀x∈ℝ, ∃y: x² + y² ≤ 1; ∑ᵢ aᵢ = ∫₀¹ f(t) dt ≈ π/4 ≠ ∞.",
    "𝐁𝐨𝐥𝐝 𝔉𝔯𝔞𝔨𝔱𝔲𝔯 𝕯𝖔𝖚𝖇𝖑𝖊 ＦＵＬＬＷＩＤＴＨ ⅫⅣ ①②③",
    "Combining: e\u0301 a\u0308 n\u0303 o\u0328\u0301 Z\u0336a\u0337l\u0338g\u0335o\u0334",
]

EMOJI = [
    "😀😃😄😁😆😅🤣😂🙂🙃",
    "👍 👍🏻 👍🏼 👍🏽 👍🏾 👍🏿",
    "👨‍👩‍👧‍👦 family, 👩‍❤️‍💋‍👨 kiss, 🏳️‍🌈 flag, 🧑🏽‍💻 coder",
    "🇫🇷🇩🇪🇯🇵🇺🇸 flags; 1️⃣ #️⃣ *️⃣ keycaps; ☺️ ♥️ ✔️ variation selectors",
    "I ❤️ Unicode!!! 🎉🎉🎉 (🌍, 🌎, 🌏)",
    "🏴󠁧󠁢󠁳󠁣󠁴󠁿 tag sequence, 👁️‍🗨️ eye, 🐻‍❄️ polar bear",
]

CODE = [
    "def f(x: int) -> int:\n    return x ** 2 + 1  # square\n\nprint(f(3))\n",
    "class Foo(Bar):\n\tdef __init__(self):\n\t\tsuper().__init__()\n\t\tself._x = {'a': [1, 2]}\n",
    '#include <stdio.h>\nint main(void) {\n    printf("%d\\n", 42);\n    return 0;\n}\n',
    'fn main() {\n    let v: Vec<u8> = (0..10).map(|i| i * 2).collect();\n    println!("{:?}", v);\n}',
    "const add = (a, b) => a + b;\nconsole.log(`sum=${add(1, 2)}`); // => 3\n",
    '<html>\n  <body class="main">&nbsp;&lt;div&gt;</body>\n</html>',
    '{"name": "nucleus", "version": "0.1.0", "ids": [128000, 128001], "ok": true, "x": null}',
    "SELECT id, name FROM users WHERE age >= 18 AND name LIKE '%son' ORDER BY id DESC;",
    '#!/usr/bin/env bash\nset -euo pipefail\nfor f in *.txt; do echo "$f" | wc -c; done\n',
    "x = [i for i in range(10) if i % 2 == 0]\nassert x == [0, 2, 4, 6, 8], x\n",
    "  if (a != b && c <= d || !e) { return -1; } else if (a >>= 2) {}",
    'package main\n\nimport "fmt"\n\nfunc main() {\n\tfmt.Println("hi")\n}\n',
    "\\begin{equation}\n  E = mc^2 \\quad \\frac{a}{b}\n\\end{equation}",
    "diff --git a/x.py b/x.py\n@@ -1,3 +1,3 @@\n-old line\n+new line\n",
]

CONTRACTIONS = ["'s", "'t", "'re", "'ve", "'m", "'ll", "'d"]

SPECIAL_TEXT = [
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|start_header_id|>user<|end_header_id|>\n\nhi<|eot_id|>",
    "<|eot_id|>",
    "<|reserved_special_token_0|>",
    "<|reserved_special_token_250|>",
    "text<|eot_id|>text",
    "<|eot_id|><|eot_id|><|begin_of_text|>",
    "<|eot_id",
    "<|not_a_token|>",
    "< |eot_id| >",
    " <|eot_id|> ",
    "<|EOT_ID|>",
    "<|<|eot_id|>|>",
]

WHITESPACE_CHARS = [
    " ",
    "\t",
    "\n",
    "\r\n",
    "\r",
    "\v",
    "\f",
    "\u00a0",
    "\u3000",
    "\u2028",
    "\u2003",
]

# Characters to draw random strings from: many classes the pre-tokenisation regex separates.
_ALPHABET = "".join(
    [
        "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789",
        " \t\n\r'\"!?.,;:-_()[]{}<>|/\\@#$%^&*+=~`",
        "éèüöäßçñøåÉÜ",
        "абвгдежзАБВГ",
        "αβγδΩΣ",
        "عربي",
        "שלום",
        "हिन्दी",
        "ไทย",
        "中文字日本語",
        "한국어",
        "١٢٣४५६",
        "\u00a0\u3000\u2028\u0301",
        "😀👍🏽\u200d❤️",
    ]
)


def _numbers() -> list[str]:
    rng = random.Random(1)
    out = []
    for n in range(1, 41):
        digits = "".join(rng.choice("0123456789") for _ in range(n))
        out += [digits, f"x{digits}y", f"-{digits}.5", f"{digits} {digits}"]
    out += ["3.14159", "1,234,567.89", "1e-10", "0x1F", "2024-01-31", "12:34:56", "v1.2.3"]
    out += ["١٢٣٤", "१२३४५६७", "１２３４５", "²³¹", "Ⅻ", "½ ¾", "123abc456def7890"]
    return out


def _whitespace() -> list[str]:
    out = []
    for ch, n in itertools.product(WHITESPACE_CHARS, [1, 2, 3, 4, 7, 16, 17, 100]):
        out += [ch * n, f"a{ch * n}b", f"{ch * n}word", f"word{ch * n}", f"a.{ch * n}!"]
    out += ["line one\r\nline two\r\n\r\nline four\r\n", "a\r\n\r\n\r\nb", "\r\r\n\n\r", "  \n  \n"]
    out += ["\t\t\tindented\n\t\t\t\tmore", " \t \n \t", "trailing   ", "   leading", ""]
    return out


def _contractions() -> list[str]:
    out = []
    for c in CONTRACTIONS:
        for form in (c, c.upper(), c[:2] + c[2:].upper() if len(c) > 2 else c.upper()):
            out += [f"it{form}", f"they{form} here", form, f"x {form} y", f"''{form}"]
    out += ["don't I'M they'RE we'Ve you'LL he'D she's", "rock 'n' roll", "it’s (curly)", "O'Neil"]
    return out


def _random_strings(seed: int, count: int) -> list[str]:
    rng = random.Random(seed)
    out = []
    for _ in range(count):
        n = rng.randrange(1, 80)
        out.append("".join(rng.choice(_ALPHABET) for _ in range(n)))
    return out


def _random_codepoints(seed: int, count: int) -> list[str]:
    """Random code points from all planes (no surrogates, which a str-to-UTF-8 step rejects)."""
    rng = random.Random(seed)
    out = []
    for _ in range(count):
        cps = (rng.randrange(0x110000) for _ in range(rng.randrange(1, 40)))
        out.append("".join(chr(c) for c in cps if not 0xD800 <= c < 0xE000))
    return out


def _mixtures(seed: int, count: int, parts: list[str]) -> list[str]:
    rng = random.Random(seed)
    return ["".join(rng.choice(parts) for _ in range(rng.randrange(2, 6))) for _ in range(count)]


def long_strings() -> list[str]:
    """Strings longer than 25,000 characters (runs longer than 25,000 get cut by the reference)."""
    prose = " ".join(SCRIPTS) + "\n"
    return [
        " " * 30_000,
        "a" * 60_000,
        "1" * 25_001,
        "\n" * 30_000,
        "ab" * 15_000,
        "x" * 25_000 + " " * 25_000 + "y" * 25_000,  # runs of exactly 25,000: no cut
        (prose * 200)[:100_000],  # long, but short runs: no cut
        "é" * 25_003 + "\t" * 25_005 + "😀" * 10,
    ]


def long_window_string() -> str:
    """More than 400,000 characters; the 400,000-character window boundary cuts "unde|rstanding"."""
    head = "lorem ipsum " * 33_333  # 399,996 characters
    s = head + "understanding is the point " + "dolor sit amet " * 10_000
    assert s[399_996:400_000] == "unde"
    return s


@functools.lru_cache(maxsize=1)
def corpus() -> tuple[str, ...]:
    """The whole corpus, deterministic, with more than 1,000 strings."""
    base = SCRIPTS + EMOJI + CODE + SPECIAL_TEXT + _numbers() + _whitespace() + _contractions()
    strings = (
        base
        + _random_strings(seed=2, count=400)
        + _random_codepoints(seed=3, count=300)
        + _mixtures(seed=4, count=300, parts=base)
        + long_strings()
    )
    return tuple(strings)
