"""``python -m yoloprune <command>``: the CLI (see ``yoloprune.compiler.cli``)."""

from yoloprune.compiler.cli import main

raise SystemExit(main())
