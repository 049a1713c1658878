"""Vision MoE: a ViT whose MLPs are MoE layers (V-MoE), IDX image data, training and comparison."""
