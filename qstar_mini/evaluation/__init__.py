"""Evaluations, one file per question asked of a trained model.

``arithmetic``: every figure on the course's arithmetic corpus (``evaluate``);
``token_gains``: does thinking help, and at which tokens; ``thought_quality``: are the
thoughts the working; ``gsm8k`` and ``commonsense_qa``: the paper's two benchmarks' formats;
``any_text``: any JSONL or ``datasets`` text; ``harness``: EleutherAI's lm-evaluation-harness.
"""
