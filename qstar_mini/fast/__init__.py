"""Speed-ups that keep the numbers: each computes exactly what a naive path of the core computes.

A first reader may skip this folder. ``attention``: which attention runs the masked steps;
``block_attention``: the thought mask's attention without its zeros (the CPU default);
``flex_attention``: the same mask as a FlexAttention predicate (for GPUs); ``rescore``:
sample thoughts without a graph, then score them in one pass (memory for compute). Every
one is tested equal to the dense mask and the naive loop in values and gradients.
"""
