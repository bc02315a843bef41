"""The command line: ``python -m zerograph demo | explain | bench`` (one module each)."""
