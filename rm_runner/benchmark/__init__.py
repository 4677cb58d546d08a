"""pipeline=benchmark: the metric schema, the in-process runner and the HTTP load generator."""
