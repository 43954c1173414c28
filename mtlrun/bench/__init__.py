"""`make bench`: what a training iteration costs per strategy, against hand-written PyTorch loops, on the built-in
benchmark and on real-shaped NYUv2, Cityscapes and CelebA inputs; or, with --architectures, per architecture."""
