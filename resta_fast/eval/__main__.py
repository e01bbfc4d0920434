"""python -m resta_fast.eval: the eval/tune subcommands on their own."""

from resta_fast.eval.cli import main

raise SystemExit(main())
