"""amc.jobs: end-to-end jobs (train -> compress -> fine-tune -> export) behind the `amc` command.

`amc.jobs.compress.run(argv)` is the main job; each job module exposes `configure(parser)` and
`run_from_args(namespace) -> exit code` so `amc/cli.py` can register it as a subcommand.
"""
