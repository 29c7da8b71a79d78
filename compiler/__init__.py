"""The compiler: its passes (score, plan, apply, recover, export, report) and the CLI."""
