"""The CNN with BatchNorm example; run main.py."""
