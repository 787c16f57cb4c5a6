"""selfref-entropy: attention entropy of self-referent prompts, base vs instruction-tuned checkpoints."""

__version__ = "0.1.0"
