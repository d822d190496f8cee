"""The methods: the adapter contract (base.py), the shared training loop (training.py), scoring and the val grid
search (tuning.py), and one module per method. Imports ``caches`` only, never the application (``fewclip``)."""
