"""Benchmarks. Run each as a module from the repo root, e.g. `uv run python -m bench.kmeans`: run as a
plain script, this folder would lead sys.path and `bench/tokenize.py` would shadow the standard
library's `tokenize`."""
