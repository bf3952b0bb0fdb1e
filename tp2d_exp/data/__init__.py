"""From text to training batches: the corpus (synthetic, local files, HF datasets), the project's tokenizer,
tokenized and packed samples cached on disk, and the mesh-independent batch order each dp rank slices."""
