"""yoloprune: a structured channel-pruning compiler for YOLO object detectors.

The installed package maps the repository's folders: ``yoloprune.graphs`` (model families,
safe loading, the dependency graph, plans), ``yoloprune.compiler`` (the passes and the CLI) and
``yoloprune.kernels`` (runtimes, timing, latency tables). Importing this package imports
nothing else: torch and friends load with the subpackage that needs them.
"""

__version__ = "0.1.0"
