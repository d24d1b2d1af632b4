"""The staff console (`oprecon web`): server-rendered pages behind a login over the same
state database and settings as the worker, calling the same functions as the CLI."""
