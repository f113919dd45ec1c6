"""lmtune: adapt an open LLM to a small labeled dataset, and measure which adaptation to trust."""
