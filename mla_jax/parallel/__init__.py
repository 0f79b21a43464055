"""Running on several devices: logical axes to mesh axes, meshes, and `plan` (what fits where)."""
