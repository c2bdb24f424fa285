"""Row filter for the xiaolm_mc lm-evaluation-harness tasks: skip the rows ``xiaolm eval mc`` skips (an answer that
is not A-D, an empty question, a missing option), so both scorers evaluate the same questions."""


def _text(value) -> str:
    return "" if value is None or value != value else str(value).strip()  # value != value: a NaN


def process_docs(dataset):
    def ok(doc) -> bool:
        if _text(doc.get("Answer")).upper() not in ("A", "B", "C", "D"):
            return False
        if not _text(doc.get("Question")):
            return False
        return all(doc.get(k) is not None and doc.get(k) == doc.get(k) for k in ("A", "B", "C", "D"))

    return dataset.filter(ok)
