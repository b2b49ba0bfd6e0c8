"""Typed parameters of a serving trial (the grid's keys for ``kind: serving``).

Sections mirror the grid file: ``backend``, ``policy.*``, ``engine.*``, ``load.*``, ``slo.*``,
``quality.*``, plus ``model``, ``weights``, ``dtype``, ``device``, ``transport`` and
``percentiles``. Unknown keys are errors (``KindParams`` forbids extras).
"""

from __future__ import annotations

import math
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, create_model, field_validator, model_validator
from pydantic.fields import FieldInfo

from backends.kvcache.policies import POLICIES
from backends.kvcache.presets import PRESETS, REAL_WEIGHTS
from backends.kvcache.vllm.model_folder import CACHE_DTYPES
from workloads.kind import KindParams
from workloads.serving.systems.registry import SYSTEMS

ArrivalName = Literal["poisson", "gamma", "constant", "trace"]
LengthDistName = Literal["fixed", "uniform", "normal", "lognormal"]


class Section(BaseModel):
    """A nested parameter section: unknown keys are errors."""

    model_config = ConfigDict(extra="forbid")


class BackendParams(Section):
    """The system under test: a name from the systems registry plus launch options."""

    name: str = "full"
    # vllm: interpreter of the environment that has vLLM (``vllm serve`` runs from it).
    python: str | None = None
    startup_timeout_s: float = Field(default=300.0, gt=0)
    # vllm: extra command-line arguments for ``vllm serve``.
    extra_args: list[str] = Field(default_factory=list)

    @field_validator("name")
    @classmethod
    def _known_backend(cls, name: str) -> str:
        if name not in SYSTEMS:  # reading the registry imports every system module once
            raise ValueError(SYSTEMS.unknown(name))
        return name

    @field_validator("extra_args")
    @classmethod
    def _sized_cache_dtype(cls, args: list[str]) -> list[str]:
        value = _flag_value(args, "--kv-cache-dtype")
        if value is not None and value not in CACHE_DTYPES:
            # orch sizes vLLM's cache and reports its bytes from the bytes per element
            raise ValueError(f"--kv-cache-dtype {value!r} is not one orch can size "
                             f"(allowed: {', '.join(CACHE_DTYPES)})")
        return args

    def kv_cache_dtype(self) -> str:
        """vLLM's KV-cache dtype as ``extra_args`` sets it (``auto``: the model's dtype)."""
        return _flag_value(self.extra_args, "--kv-cache-dtype") or "auto"


def _flag_value(args: list[str], flag: str) -> str | None:
    """The value of the last ``flag X`` or ``flag=X`` in command-line arguments, or None."""
    value = None
    for i, arg in enumerate(args):
        if arg == flag and i + 1 < len(args):
            value = args[i + 1]
        elif arg.startswith(flag + "="):
            value = arg.split("=", 1)[1]
    return value


class PolicySection(Section):
    """Base of the grid's ``policy`` section (its fields are derived, see ``PolicyParams``)."""

    def engine_params(self) -> dict[str, Any]:
        """The knobs that were set, as the engine's ``policy_params``."""
        return {k: v for k, v in self.model_dump().items() if v is not None}


def _union_of_policy_knobs() -> dict[str, Any]:
    """Every registered policy's knobs, each optional (``None`` leaves the policy's default).

    A knob two policies share must carry the same constraints (say ``kv_budget`` in (0, 1]).
    """
    fields: dict[str, Any] = {}
    owners: dict[str, str] = {}
    for policy_name, policy in sorted(POLICIES.items()):
        for knob, info in policy.params_model.model_fields.items():
            if knob in fields and fields[knob][1].metadata != info.metadata:
                raise TypeError(f"policy knob {knob!r} has different constraints in {owners[knob]!r} "
                                f"and {policy_name!r}")
            if knob not in fields:
                owners[knob] = policy_name
                fields[knob] = (info.annotation | None, FieldInfo.merge_field_infos(info, default=None))
    return fields


# Cache-policy knobs: the union of the registered policies' own (a grid sets one section for a
# whole backend axis; each policy gets the knobs it has). ``None`` leaves the engine's default.
PolicyParams = create_model(
    "PolicyParams", __base__=PolicySection, __doc__="Cache-policy knobs (the union of the registered policies' own).",
    **_union_of_policy_knobs(),
)


class EngineParams(Section):
    """Engine sizing; ``None`` leaves the default of the backend on its device (an omitted knob never
    makes a trial fail: our engine's block size is 16, vLLM picks its own)."""

    kv_cache_bytes: int | None = Field(default=None, gt=0)
    kv_cache_blocks: int | None = Field(default=None, gt=0)
    max_num_seqs: int = Field(default=32, ge=1)
    block_size: int | None = Field(default=None, ge=1)
    max_model_len: int | None = Field(default=None, ge=1)
    # Decode under CUDA graphs (ours and vLLM's): None = on for a GPU, off on CPU; false = eager.
    cuda_graphs: bool | None = None
    # Our engine: launch the next decode step before reading this one's tokens back (hides the
    # host's work between steps); None = on for a GPU, off on CPU; false = synchronous steps.
    async_scheduling: bool | None = None
    # vllm only.
    gpu_memory_utilization: float | None = Field(default=None, gt=0, le=1)
    enable_prefix_caching: bool = False

    @model_validator(mode="after")
    def _one_cache_size(self) -> EngineParams:
        if self.kv_cache_bytes is not None and self.kv_cache_blocks is not None:
            raise ValueError("give engine.kv_cache_bytes or engine.kv_cache_blocks, not both")
        return self


class NeedleParams(Section):
    """The needle-retrieval prompts of ``load.prompt_source: needle`` (workloads/serving/load/needle.py)."""

    # Where the asked needle sits (0 = start of the haystack, 1 = end); request i uses depths[i % len].
    depths: list[float] = Field(default_factory=lambda: [0.1, 0.3, 0.5, 0.7, 0.9], min_length=1)
    num_keys: int = Field(default=1, ge=1, le=16)  # needles hidden; > 1 adds distractors (distinct keys)
    value_digits: int = Field(default=7, ge=2, le=12)
    chat: bool = True  # wrap in the model's chat template, the assistant turn opened with the answer's lead-in

    @field_validator("depths")
    @classmethod
    def _depths_in_range(cls, values: list[float]) -> list[float]:
        bad = [d for d in values if not 0 <= d <= 1]
        if bad:
            raise ValueError(f"load.needle.depths must lie in [0, 1]; got {bad}")
        return values


class LoadParams(Section):
    """The open-loop load: arrivals, lengths, prompts."""

    arrival: ArrivalName = "poisson"
    request_rate: float = Field(default=1.0, gt=0)  # requests/s; .inf sends everything at t=0
    burstiness: float = Field(default=1.0, gt=0)  # gamma shape; 1.0 = Poisson
    num_requests: int | None = Field(default=None, ge=1)  # default 100 (trace: the whole trace)
    input_len: int = Field(default=128, ge=1)
    output_len: int = Field(default=32, ge=1)
    input_dist: LengthDistName = "fixed"
    output_dist: LengthDistName = "fixed"
    # uniform: half-width as a fraction of the mean; normal: std / mean; lognormal: sigma.
    input_spread: float = Field(default=0.0, ge=0)
    output_spread: float = Field(default=0.0, ge=0)
    # needle: KJV haystacks hiding key/value needles; outputs are scored (needle_accuracy).
    prompt_source: Literal["synthetic", "corpus", "needle"] = "synthetic"
    needle: NeedleParams = Field(default_factory=NeedleParams)
    trace: str | None = None  # JSONL path; one object per line (see workloads/serving/load/trace.py)
    max_concurrency: int | None = Field(default=None, ge=1)
    ignore_eos: bool = True
    seed: int = 0

    @field_validator("request_rate", mode="before")
    @classmethod
    def _infinite_rate(cls, value: Any) -> Any:
        """An infinite rate is spelled 'inf' in a grid (strict parsing takes no other string)."""
        return math.inf if value == "inf" else value

    @model_validator(mode="after")
    def _trace_needs_path(self) -> LoadParams:
        if self.arrival == "trace" and not self.trace:
            raise ValueError("load.arrival 'trace' needs load.trace (path to a JSONL file)")
        if self.arrival != "trace" and self.trace:
            raise ValueError("load.trace is only read when load.arrival is 'trace'")
        # Defaults written out (a canonical round trip) are fine; a setting that would be ignored is not.
        if self.prompt_source != "needle" and self.needle != NeedleParams():
            raise ValueError("load.needle is only read when load.prompt_source is 'needle'")
        if self.arrival == "gamma" and math.isinf(self.burstiness):
            raise ValueError("load.burstiness must be finite for 'gamma'; use arrival 'constant'")
        for side in ("input", "output"):
            spread = getattr(self, f"{side}_spread")
            if getattr(self, f"{side}_dist") == "uniform" and spread > 1:
                raise ValueError(f"load.{side}_spread must be in [0, 1] for {side}_dist 'uniform' "
                                 f"(lengths in mean*(1 +- spread)); got {spread:g}")
        return self


class SloParams(Section):
    """Service-level objectives for goodput (milliseconds); unset ones are not checked."""

    ttft_ms: float | None = Field(default=None, gt=0)
    tpot_ms: float | None = Field(default=None, gt=0)
    e2el_ms: float | None = Field(default=None, gt=0)

    def as_seconds(self) -> dict[str, float]:
        """The SLOs that were given, keyed by metric name, in seconds."""
        given = {"ttft": self.ttft_ms, "tpot": self.tpot_ms, "e2el": self.e2el_ms}
        return {k: v / 1000.0 for k, v in given.items() if v is not None}


class QualityParams(Section):
    """Output quality against the ``full`` cache on real text (perplexity ratio, token agreement)."""

    # None: on for our engine's lossy policies with real weights, off otherwise.
    enabled: bool | None = None
    num_texts: int = Field(default=4, ge=1)
    text_len: int = Field(default=128, ge=4)  # tokens per text (prompt + continuation)
    prompt_len: int | None = Field(default=None, ge=1)  # default: half of text_len

    @model_validator(mode="after")
    def _prompt_shorter_than_text(self) -> QualityParams:
        if self.prompt_len is not None and self.prompt_len >= self.text_len:
            raise ValueError("quality.prompt_len must be smaller than quality.text_len")
        return self

    def resolved_prompt_len(self) -> int:
        """Prompt tokens per text (the rest is scored / generated)."""
        return self.prompt_len if self.prompt_len is not None else self.text_len // 2


class ServingParams(KindParams):
    """Everything one serving trial needs."""

    model: str = "opt-125m"
    weights: Literal["real", "dummy"] = "dummy"
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    device: Literal["cpu", "cuda"] = "cpu"
    backend: BackendParams = Field(default_factory=BackendParams)
    policy: PolicyParams = Field(default_factory=PolicyParams)
    engine: EngineParams = Field(default_factory=EngineParams)
    load: LoadParams = Field(default_factory=LoadParams)
    slo: SloParams = Field(default_factory=SloParams)
    quality: QualityParams = Field(default_factory=QualityParams)
    # auto: our engine in process; vLLM in process when it imports in the trial's environment,
    # else `vllm serve` over HTTP.
    transport: Literal["auto", "inprocess", "http"] = "auto"
    percentiles: list[float] = Field(default_factory=lambda: [50.0, 90.0, 99.0])
    seed: int = 0  # engine seed (dummy weights)

    @field_validator("backend", mode="before")
    @classmethod
    def _backend_from_name(cls, value: Any) -> Any:
        # Grids write `backend: h2o` as often as `backend: {name: vllm, python: ...}`.
        return {"name": value} if isinstance(value, str) else value

    @field_validator("percentiles")
    @classmethod
    def _percentiles_in_range(cls, values: list[float]) -> list[float]:
        bad = [p for p in values if not 0 <= p <= 100]
        if bad or not values:
            raise ValueError(f"percentiles must be a non-empty list of numbers in [0, 100]; got {values}")
        return values

    @model_validator(mode="after")
    def _weights_serve_the_prompts(self) -> ServingParams:
        # Rules of the code, not of a node's files (whether a folder or .gguf exists is checked
        # where the trial runs).
        if self.load.prompt_source in ("corpus", "needle") and self.weights == "dummy":
            raise ValueError(f"load.prompt_source {self.load.prompt_source!r} needs a tokenizer: use weights 'real' "
                             f"(e.g. smollm2-135m)")
        if self.weights == "real" and self.model in PRESETS and self.model not in REAL_WEIGHTS:
            raise ValueError(f"model {self.model!r} is a preset without offline weights: use weights 'dummy' "
                             f"(real weights: {', '.join(sorted(REAL_WEIGHTS))})")
        return self

    @model_validator(mode="after")
    def _knobs_fit_the_policy(self) -> ServingParams:
        # The union section checks each knob alone; the policy's own model checks how they combine
        # (h2o: fractions or counts), so a grid is refused here, not when a trial builds its engine.
        policy = POLICIES.get(self.backend.name)
        if policy is not None:
            policy.params_model.resolve(policy.name, self.policy_knobs(policy.name))
        return self

    def policy_knobs(self, policy: str) -> dict[str, Any]:
        """The ``policy.*`` knobs that were set and that ``policy`` takes.

        A grid sets one ``policy`` section for a whole ``backend`` axis (say ``kv_budget`` for
        full, h2o and streaming alike); each policy gets the knobs it has. Misspelled knobs never
        get here: ``PolicyParams`` rejects unknown keys.
        """
        accepted = POLICIES[policy].params_model.model_fields if policy in POLICIES else {}
        return {k: v for k, v in self.policy.engine_params().items() if k in accepted}

    def quality_enabled(self) -> bool:
        """Whether this trial measures quality (explicit setting, else lossy policy + real weights).

        Quality needs our engine's ``score``/``generate``: other backends (vllm) never measure it.
        """
        policy = POLICIES.get(self.backend.name)
        if policy is None:
            return False
        if self.quality.enabled is not None:
            return self.quality.enabled
        return self.weights == "real" and policy.lossy
