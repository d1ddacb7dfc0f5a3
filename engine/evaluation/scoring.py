"""The pass rule used to score every stage (base, SFT, PTQ, QAT). NVIDIA did not publish theirs; this is ours.

A generated answer is parsed with `engine.data.harmony.parse_completion` into its analysis and final message, then:

1. final_ok: the final message equals the row's `reference` after normalising both (strip, lowercase, collapse
   whitespace, drop trailing punctuation, straight apostrophes). No partial credit.
2. Language task (task == "language", or no task and the prompt asks for "reasoning language: X"): the analysis
   must also be written in the requested language. `detect_language` counts stopwords of English, French, German
   and Spanish and takes the clear winner (a tie or no stopword at all is "unknown", which fails). A requested
   language outside those four is not checked (language_ok None).
3. Refusal task (task == "refusal"): the analysis and the final message must also contain no refusal phrase
   (`REFUSAL_PHRASES`, e.g. "I'm sorry", "I can't help", "I must refuse"). Rows without a task are checked the same
   way unless their reference is itself a refusal.

passed = final_ok and every check that applies.

Why a hand-written language identifier: the reasoning texts are one or two short sentences; probabilistic
detectors (langdetect, a PyPI package with bundled profiles) are randomised unless seeded, unreliable on ~15
words and one more dependency, while our four languages separate cleanly on function words. fastText-based ones
need a model download, which this project cannot rely on.
"""

from __future__ import annotations

import re

from engine.data.harmony import ROLES

REFUSAL_PHRASES = (
    "i'm sorry", "i am sorry", "i apologize", "i can't help", "i cannot help", "i can't assist", "i cannot assist",
    "can't help with", "cannot help with", "i can't provide", "i cannot provide", "i won't", "i will not help",
    "i must refuse", "i refuse", "unable to help", "not able to help", "i can't do that", "i cannot do that",
)
# Function words (plus the words reasoning in that language keeps using). Overlaps between languages are fine: the
# winner must lead clearly.
STOPWORDS = {
    "en": "i you he she it we they the a an is are was be to of in on for from with and or but not this that "
          "need have has will can so then answer word letters plus minus here user wants",
    "fr": "je tu il elle nous vous ils le la les un une des du de et ou est sont être dans pour avec sur pas ce "
          "cette que qui dois doit font fait donc réponse mot lettres moins",
    "de": "ich du er sie es wir ihr der die das ein eine einen ist sind und oder nicht mit von zu im in für auf "
          "muss dann also antwort wort buchstaben hat zählen addieren abziehen",
    "es": "yo tú él ella nosotros el la los las un una es son y o no con de del en para por que tengo tiene "
          "entonces respuesta palabra letras menos más sumar restar contar",
}
_STOPWORDS = {code: set(words.split()) for code, words in STOPWORDS.items()}
LANGUAGE_CODES = {
    "english": "en", "french": "fr", "german": "de", "spanish": "es",
    "français": "fr", "francais": "fr", "deutsch": "de", "español": "es", "espanol": "es",
}
_REQUEST_RE = re.compile(r"reasoning language:\s*([^\s.,;]+)", re.IGNORECASE)
_WORD_RE = re.compile(r"[^\W\d_]+")
_TRAILING_PUNCT = ".,;:!?。"


def normalize(text: str) -> str:
    text = " ".join(text.replace("\u2019", "'").lower().split())
    return text.rstrip(_TRAILING_PUNCT + " ")


def detect_language(text: str) -> str | None:
    """'en' / 'fr' / 'de' / 'es' by stopword count; None when no language leads clearly (or no text)."""
    words = _WORD_RE.findall(text.lower())
    counts = sorted(((sum(w in stops for w in words), code) for code, stops in _STOPWORDS.items()), reverse=True)
    (best, code), (second, _) = counts[0], counts[1]
    return code if best > 0 and best > second else None


def requested_language(messages: list[dict]) -> str | None:
    """The lower-cased language named by 'reasoning language: X' in a system/developer message, if any."""
    for message in messages:
        if message.get("role") in ("system", "developer") and isinstance(message.get("content"), str):
            match = _REQUEST_RE.search(message["content"])
            if match:
                return match[1].lower()
    return None


def is_refusal(text: str) -> bool:
    text = normalize(text)
    return any(phrase in text for phrase in REFUSAL_PHRASES)


def judge(row: dict, completion: dict) -> dict:
    """Score one generated answer (`completion` from parse_completion) against a chat row; see the module doc."""
    task = row.get("task")
    messages = [m for m in row.get("messages", []) if m.get("role") in ROLES]
    analysis, final = completion.get("analysis") or "", completion.get("final") or ""
    reference = row.get("reference")
    if reference is None:  # rows from user data: the last assistant turn is the reference
        reference = next((m.get("content", "") for m in reversed(messages) if m["role"] == "assistant"), "")
    final_ok = normalize(final) == normalize(reference)
    detected = detect_language(analysis)
    language_ok = _language_ok(task, messages, detected)
    refused = None
    if task == "refusal" or (task is None and not is_refusal(reference)):
        refused = is_refusal(analysis) or is_refusal(final)
    passed = final_ok and language_ok is not False and refused is not True
    return {"passed": passed, "final_ok": final_ok, "language_ok": language_ok, "refused": refused,
            "detected_language": detected}


def _language_ok(task: str | None, messages: list[dict], detected: str | None) -> bool | None:
    if task not in ("language", None):
        return None
    requested = requested_language(messages)
    if requested is None or requested not in LANGUAGE_CODES:
        return None
    return detected == LANGUAGE_CODES[requested]
