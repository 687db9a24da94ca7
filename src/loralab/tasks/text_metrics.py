"""Generated text against its references: corpus BLEU and ROUGE-L, and exact match.

The E2E task's metrics (the paper's Table 3 reports BLEU and ROUGE-L), shared with the
scoring of a user's own completions (``loralab eval --data``).
"""

from __future__ import annotations

from collections.abc import Sequence


def bleu_rouge(hypotheses: Sequence[str], references: Sequence[Sequence[str]]) -> dict:
    """Corpus BLEU (sacrebleu) and mean best-reference ROUGE-L F1, both 0–100."""
    import sacrebleu  # imported here so that listing tasks stays cheap
    from rouge_score import rouge_scorer

    if not hypotheses:
        return {"bleu": 0.0, "rouge_l": 0.0}
    width = max(len(refs) for refs in references)
    # sacrebleu wants one stream per reference slot; None marks a missing reference
    streams = [[refs[i] if i < len(refs) else None for refs in references] for i in range(width)]
    bleu = sacrebleu.corpus_bleu(list(hypotheses), streams).score
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    rouge = [
        max(scorer.score(ref, hyp)["rougeL"].fmeasure for ref in refs)
        for hyp, refs in zip(hypotheses, references, strict=True)
    ]
    return {"bleu": bleu, "rouge_l": 100.0 * sum(rouge) / len(rouge)}


def exact_match(hypotheses: Sequence[str], references: Sequence[str]) -> float:
    """The share (0–100) of hypotheses equal to their reference, both stripped."""
    if not hypotheses:
        return 0.0
    same = sum(h.strip() == r.strip() for h, r in zip(hypotheses, references, strict=True))
    return 100.0 * same / len(hypotheses)
