"""pqm: personalised quantised ASR recipes (NF4 + LoRA speaker adaptation)."""

__version__ = "0.1.0"
