"""Pipeline steps: each a small callable taking the run context, listed in ``conf/pipeline/``."""
