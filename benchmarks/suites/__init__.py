"""One module per suite. Each defines ``SUMMARY`` (one line), ``add_arguments(parser)``,
``run(args) -> dict`` (the JSON payload, measured in fresh processes where timings matter)
and ``render(document) -> str`` (the markdown tables of docs/benchmarks.md). Heavy imports
(torch, voxreg) happen inside functions, so ``python -m benchmarks --list`` stays fast."""
