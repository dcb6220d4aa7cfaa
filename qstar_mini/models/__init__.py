"""The base models Quiet-STaR starts from, and the check that a model works through our path.

``tiny``: the course's character-level base (built, pretrained, loaded). ``pretrained``: real
models fetched once and used offline (SmolLM2). ``check``: before training, does a model give
its own numbers through qstar_mini's pieces (and which attention ``auto`` picks).
"""
