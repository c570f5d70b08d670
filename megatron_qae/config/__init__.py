"""The run configuration: `loading` (the root `Config` that composes the sections, YAML + dotted
overrides, cross-section checks), `sections` and `algo` (the trainer-side sections); the
rollout-side sections live in rollout_sglang.config, beside the code that reads them."""
