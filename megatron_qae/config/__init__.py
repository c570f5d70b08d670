"""The run configuration: `loading` (YAML + dotted overrides, cross-field checks) and `sections`
(one frozen dataclass per config section)."""
