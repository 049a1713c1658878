"""Inference: generation, serving, expert offloading and quantized experts."""
