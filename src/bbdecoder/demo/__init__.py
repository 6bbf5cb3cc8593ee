"""The embedded default: bundled digits, a small CNN, a planted-bias set."""
