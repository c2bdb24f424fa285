"""Stories a model writes from openings, shown the way a reader should see them.

A story ends where the model ended it (its end-of-text). When the token budget runs out first, the story is cut
back to its last sentence end within the budget and marked as cut, rather than shown stopping mid-sentence
("……妈妈笑着说"). Broken characters never show (the shared detokenizer drops them and counts the bytes). The
quickstart, the training report's samples and ``eval judge`` all write stories through ``tell_stories``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

SENTENCE_ENDS = "。！？!?…"
CLOSERS = "”’」』\"')）》"   # a closing quote or bracket after a sentence end belongs to that sentence


@dataclass
class Story:
    opening: str
    text: str            # the continuation shown (cut back to a sentence end when the budget ran out)
    cut: bool            # the budget ran out before the model ended the story
    ended: str           # "eos", "stop" or "length" (see ``Generated``)
    dropped_bytes: int   # bytes of broken characters left out
    raw: str = ""        # the continuation as generated, before cutting back

    @property
    def full(self) -> str:
        return self.opening + self.text


def last_sentence_end(text: str) -> int:
    """Length of the longest prefix of ``text`` that ends a sentence (closing quotes included); 0 when none."""
    best = 0
    for i, ch in enumerate(text):
        if ch in SENTENCE_ENDS:
            j = i + 1
            while j < len(text) and text[j] in SENTENCE_ENDS + CLOSERS:
                j += 1
            best = j
    return best


def trim_story(text: str, ended: str) -> tuple[str, bool]:
    """``(shown text, cut)``: a story the model ended is kept whole; one the budget cut is cut back to its last
    sentence end (kept whole, marked cut, when it has none)."""
    text = text.rstrip()
    if ended != "length":
        return text, False
    end = last_sentence_end(text)
    return (text[:end] if end else text), True


def tell_stories(model, tokenizer, openings: list[str], sampling, prompt_ids: Optional[list[list[int]]] = None
                 ) -> list[Story]:
    """One story per opening (``sampling``: a ``SamplingConfig``), each ended at end-of-text or cut back to a
    sentence end."""
    from xiaolm.infer.generate import generate_samples

    results = generate_samples(model, tokenizer, openings, sampling, prompt_ids=prompt_ids)
    stories = []
    for opening, r in zip(openings, results):
        text, cut = trim_story(r.text, r.ended)
        stories.append(Story(opening, text, cut, r.ended, r.dropped_bytes, r.text))
    return stories


def story_line(story: Story, budget: Optional[int] = None) -> str:
    """The story on one line as a reader sees it, with a note when it was cut."""
    text = " ".join(story.full.split())
    if story.cut:
        where = f"the {budget}-token budget" if budget else "the token budget"
        text += f" [cut at {where}: ends at its last full sentence]" if last_sentence_end(story.text) else \
            f"… [cut at {where}]"
    return text
