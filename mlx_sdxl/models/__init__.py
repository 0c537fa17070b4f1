"""Pure-MLX model definitions (NHWC activations, diffusers parameter names)."""
