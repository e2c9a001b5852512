"""The core: a loaded model and its runs, on the model's device. No rpyc, no IPython.

Where things happen:

- ``specs``: what a caller asks for (breakpoints, sampling, edits), parsed and validated.
- ``architecture`` / ``sites``: where the blocks, norms, heads and sub-layer sites are, per model family.
- ``pause``: one context manager that stops a forward at a module (baukit's ``Trace``/``StopForward``).
- ``stepping``: a generation step: forward until a pause, continue from a checkpoint, pick the token.
- ``engine``: the registry of runs and the public calls (generate, resume, fork, edit, ...).
- ``runs``: a run's state and the tensors it holds; ``residency``/``offload``: moving them to host memory.
- ``kvcache`` (copy-on-write forks of HF caches), ``graphs`` (CUDA-graph replay of fork tails).
- ``models``: loading hub ids, directories, the embedded default and random shapes.
- ``reference``: plain HF generation with the same edits made by torch hooks, the yardstick of exactness.
"""
