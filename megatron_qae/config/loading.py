"""The run configuration: one typed tree of frozen dataclasses, composed here.

What it does: composes the root `Config` from the sections, each defined beside the code that
reads it (trainer side: sections.py, algo.py; rollout side: rollout_sglang.config); loads YAML
files plus dotted `key=value` overrides through OmegaConf structured configs (unknown keys and
wrong types are errors); validates the constraints across trainer and rollout sections and
against the model (ValueError naming the field, the value and the fix); writes the resolved
config into the run directory. Derived values are properties. What it does not: re-declare
megatron-core's or SGLang's own knobs (the `*_overrides` / `sglang_args` dicts pass them
through, checked against upstream fields), or silently rewrite anything.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from megatron_qae.config.algo import AlgoConfig
from megatron_qae.config.sections import ModelConfig, OptimConfig, ParallelConfig, RayConfig, RunConfig, TrainConfig
from rollout_sglang.config import (DataConfig, EngineConfig, RewardConfig, RolloutConfig, check_rollout_sections,
                                   cpu_max_sequences)
from rollout_sglang.config_checks import fail


@dataclass(frozen=True)
class Config:
    """The whole run."""

    run: RunConfig = field(default_factory=RunConfig)
    """Run directory, steps, logging, checkpoint and eval cadence."""
    model: ModelConfig = field(default_factory=ModelConfig)
    """The policy model (HF Qwen2 directory) and its numerics."""
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    """Megatron parallel layout of the trainer."""
    optim: OptimConfig = field(default_factory=OptimConfig)
    """AdamW and the LR schedule."""
    algo: AlgoConfig = field(default_factory=AlgoConfig)
    """QAE advantage and the DAPO loss."""
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    """Sampling, batch sizes and dynamic sampling."""
    engine: EngineConfig = field(default_factory=EngineConfig)
    """Rollout engines (SGLang on GPU, our CPU server otherwise)."""
    reward: RewardConfig = field(default_factory=RewardConfig)
    """Reward function and overlong penalty."""
    data: DataConfig = field(default_factory=DataConfig)
    """Prompt data sets."""
    ray: RayConfig = field(default_factory=RayConfig)
    """Ray cluster to join, or a local one."""
    train: TrainConfig = field(default_factory=TrainConfig)
    """Micro-batching of the trainer."""

    @property
    def loss_algo(self) -> AlgoConfig:
        """`algo` as the loss applies it: algo.tis_cap=null resolved against model.fp8
        (`AlgoConfig.effective_tis_cap`); the written config keeps what the user set."""
        return dataclasses.replace(self.algo, tis_cap=self.algo.effective_tis_cap(self.model.fp8 is not None))

    def __post_init__(self) -> None:
        r = self.rollout
        check_rollout_sections(r, self.engine, self.reward)
        self._check_sizes()
        if self.model.fp8 and self.model.params_dtype != "bfloat16":
            fail("model.fp8", self.model.fp8, "FP8 training needs model.params_dtype=bfloat16")
        if r.async_steps and self.loss_algo.tis_cap is None:
            # The trainer's old log-probs are one version newer than the policy that sampled:
            # without the truncated importance weight the loss is biased by the staleness.
            fail("rollout.async_steps", r.async_steps, "one-step off-policy needs truncated importance "
                  "sampling against the rollout log-probs: set algo.tis_cap (e.g. 2.0)")
        if r.async_steps and self.engine.colocate:
            fail("rollout.async_steps", r.async_steps, "colocated engines share the trainer's GPUs, so "
                  "generation cannot overlap training: set engine.colocate=false or rollout.async_steps=0")

    def _check_sizes(self) -> None:
        """Sizes that only make sense against another section's."""
        multiple = math.lcm(16, self.parallel.tp)  # batch/batching.py seq_multiple: every row is padded to it
        if self.train.micro_batch_max_tokens < multiple:
            fail("train.micro_batch_max_tokens", self.train.micro_batch_max_tokens,
                 f"must be >= {multiple}: every micro-batch row is padded to a multiple of lcm(16, parallel.tp)")
        eval_sequences, most = self.rollout.groups_per_request * self.run.eval_n_samples, cpu_max_sequences(self.engine)
        if most is not None and eval_sequences > most:
            fail("run.eval_n_samples", self.run.eval_n_samples,
                 f"x rollout.groups_per_request={self.rollout.groups_per_request} = {eval_sequences} sequences "
                 f"per eval request, the CPU server serves at most {most}; lower either")


def _load_error(exc: OmegaConfBaseException, source: str) -> ValueError:
    """ValueError naming where the bad entry came from, its dotted key, value and the fix."""
    key = str(getattr(exc, "full_key", None) or getattr(exc, "key", None) or "")
    msg = str(exc).splitlines()[0]
    section, _, leaf = key.rpartition(".")
    fields = _fields_of(section)
    if leaf and leaf not in fields and "Did you mean" in msg:
        fix = "rename the key"
    elif leaf and leaf not in fields:
        close = difflib.get_close_matches(leaf, list(fields), n=3)
        fix = f"did you mean {close}?" if close else f"known keys here: {sorted(fields)}"
    elif leaf:
        fix = f"give a value of type {fields[leaf]}"
    else:
        fix = "each section is a mapping of the fields listed in docs/config.md"
    return ValueError(f"{source}: config key {key or '?'!r}: {msg}; {fix} (see docs/config.md)")


def _fields_of(section: str) -> dict[str, str]:
    """{field name: type} of the dataclass at dotted `section` ('' = the top level)."""
    cls: Any = Config
    for part in [p for p in section.split(".") if p]:
        sub = {f.name: f.default_factory for f in dataclasses.fields(cls)
               if f.default_factory is not dataclasses.MISSING}
        if part not in sub or not dataclasses.is_dataclass(sub[part]):
            return {}
        cls = sub[part]
    return {f.name: str(f.type) for f in dataclasses.fields(cls)}


@functools.cache
def _defaults():
    """The structured defaults, built once (most of a load's time); OmegaConf.merge copies it."""
    return OmegaConf.structured(Config)


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Defaults, then the YAML file, then dotted `key=value` overrides; validated."""
    merged = _defaults()
    if path is not None:
        if not Path(path).is_file():
            raise ValueError(f"--config {str(path)!r} does not exist; pass a YAML file under configs/")
        try:
            merged = OmegaConf.merge(merged, OmegaConf.load(path))
        except OmegaConfBaseException as exc:
            raise _load_error(exc, str(path)) from None
        except yaml.YAMLError as exc:
            raise ValueError(f"{path}: not valid YAML: {' '.join(str(exc).split())}") from None
    for item in overrides or []:
        if "=" not in item:
            raise ValueError(f"override {item!r} is not key=value (e.g. algo.quantile_k=0.6)")
        try:
            merged = OmegaConf.merge(merged, OmegaConf.from_dotlist([item]))
        except OmegaConfBaseException as exc:
            raise _load_error(exc, f"override {item!r}") from None
        except yaml.YAMLError as exc:  # the value is parsed as YAML
            raise ValueError(f"override {item!r}: the value is not valid YAML ({str(exc).splitlines()[0]}); "
                             "quote it, or write a list as [a, b] and a mapping as {k: v}") from None
    try:
        return OmegaConf.to_object(merged)
    except OmegaConfBaseException as exc:
        raise _load_error(exc, "config") from None


def to_dict(cfg: Config) -> dict[str, Any]:
    """Plain nested dict of the config (for logs, W&B and the run directory)."""
    return OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True)


def save_config(cfg: Config, run_dir: str | Path) -> Path:
    """Write the resolved config to `<run_dir>/config.yaml`; loading it gives back `cfg`."""
    out = Path(run_dir) / "config.yaml"
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".yaml.tmp")
    tmp.write_text(OmegaConf.to_yaml(OmegaConf.structured(cfg)))
    tmp.replace(out)
    return out


def validate_against_model(cfg: Config, hf: dict[str, Any]) -> None:
    """Constraints that need the model's HF config.json (trainer and engine layouts, lengths)."""
    heads, layers, vocab = hf["num_attention_heads"], hf["num_hidden_layers"], hf["vocab_size"]
    kv = hf.get("num_key_value_heads", heads)
    tp, pp, vpp = cfg.parallel.tp, cfg.parallel.pp, cfg.parallel.vpp or 1
    if heads % tp or kv % tp:
        fail("parallel.tp", tp, f"must divide num_attention_heads={heads} and num_key_value_heads={kv}")
    if vocab % tp:
        fail("parallel.tp", tp, f"must divide vocab_size={vocab} (vocab-parallel embedding)")
    if layers % (pp * vpp):
        fail("parallel.pp", pp, f"pp*vpp={pp * vpp} must divide num_hidden_layers={layers}")
    etp = cfg.engine.engine_tp
    if heads % etp or (kv % etp and etp % kv):
        fail("engine.engine_tp", etp, f"must divide num_attention_heads={heads}, and divide or be a "
              f"multiple of num_key_value_heads={kv} (SGLang's tensor-parallel split)")
    total = cfg.rollout.max_prompt_tokens + cfg.rollout.max_response_tokens
    limit = hf.get("max_position_embeddings", total)
    if total > limit:
        fail("rollout.max_response_tokens", cfg.rollout.max_response_tokens,
              f"prompt + response = {total} exceeds the model's max_position_embeddings={limit}; "
              "lower rollout.max_prompt_tokens / rollout.max_response_tokens")
