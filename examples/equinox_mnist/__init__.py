"""Equinox's MNIST-tutorial CNN on digits; run main.py."""
