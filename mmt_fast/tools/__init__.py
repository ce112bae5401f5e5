"""What the inference commands do, as library functions: classify clips
(:mod:`~mmt_fast.tools.predict`), cluster a split's embeddings
(:mod:`~mmt_fast.tools.analysis`), Grad-CAM of one clip (:mod:`~mmt_fast.tools.explain`).
They build on :mod:`mmt_fast.inference`; the commands (:mod:`mmt_fast.commands`) parse the
arguments and call them."""
