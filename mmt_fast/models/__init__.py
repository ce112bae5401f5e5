"""Model definitions: MAT and the video MViTv2 (one multiscale encoder), AST,
AVBottleneck and MMT."""
