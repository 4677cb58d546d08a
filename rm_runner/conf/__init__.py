"""The config tree, shipped as package data so an installed rm_runner finds it (pkg://rm_runner.conf)."""
