"""The token-weighted language-model example; run main.py."""
