"""The MLP-on-digits example; run main.py."""
