"""Answer parsing and rewards.

    python reward.py "<|lvr_start|>junk<|lvr_end|> left <answer>B</answer>"   # parse one response
"""
from __future__ import annotations

import re
import sys

import data

SPAN_RE = re.compile(re.escape(data.LVR_START) + r".*?(?:" + re.escape(data.LVR_END) + r"|$)", re.S)
TAGGED_RE = re.compile(r"<answer>\s*\(?([A-Z])\)?\s*</answer>")
OPEN_TAG_RE = re.compile(r"<answer>\s*\(?([A-Z])\b")
BARE_RE = re.compile(r"(?:^|[\s:(])\(?([A-Z])\)?\.?\s*$")
END_TOKENS = re.compile("|".join(re.escape(t) for t in (data.IM_END, "<|endoftext|>")))


def strip_latent_spans(text: str) -> str:
    """Drop everything from each <|lvr_start|> to its <|lvr_end|> (or to the end when unclosed)."""
    return SPAN_RE.sub(" ", text)


def parse_answer(text: str) -> str | None:
    """The answer letter of a response: the last <answer>X</answer>; failing that an unclosed
    <answer>X, or a lone letter ending the response. Text inside latent spans is ignored."""
    t = END_TOKENS.sub(" ", strip_latent_spans(text))
    for pattern in (TAGGED_RE, OPEN_TAG_RE):
        found = pattern.findall(t)
        if found:
            return found[-1]
    m = BARE_RE.search(t.strip())
    return m.group(1) if m else None


def has_format(text: str) -> bool:
    """Exactly one well-formed <answer>X</answer> outside latent spans, and spans closed."""
    outside = strip_latent_spans(text)
    closed = text.count(data.LVR_START) == text.count(data.LVR_END)
    return closed and len(TAGGED_RE.findall(outside)) == 1


if __name__ == "__main__":
    for arg in sys.argv[1:]:
        print(repr(arg), "->", parse_answer(arg), "format ok" if has_format(arg) else "bad format")
