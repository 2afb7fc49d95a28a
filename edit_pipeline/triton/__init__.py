"""Thin Python backend `model.py` templates; the builder copies them into the repository."""
