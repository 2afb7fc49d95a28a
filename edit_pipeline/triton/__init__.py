"""The thin Python backend model.py files the builder copies into a repository: they
translate Triton requests into the edit pipeline's inputs and back, and reach the
components through BLS (`bls.py`)."""
