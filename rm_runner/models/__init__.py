"""Where weights come from. A model source is any `_target_` with ``resolve() -> Path``
(a directory ``from_pretrained`` can load) or a hub id string."""
