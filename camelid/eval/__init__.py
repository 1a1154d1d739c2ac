"""Evaluation: perplexity (and later multiple-choice scoring and harness adapters)."""
