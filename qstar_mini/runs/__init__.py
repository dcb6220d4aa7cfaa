"""Run machinery: what keeps a training run's files safe, resumable and shardable.

A first reader may skip this folder: nothing here changes a number. ``folder``: the run
folder (lock, resume, recovery); ``checkpoint``: saving and verifying checkpoints, no pickle;
``sharding``: FSDP through Accelerate; ``signals``: stopping cleanly on Ctrl-C.
"""
